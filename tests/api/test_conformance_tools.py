"""OpenAI conformance, tool calling through the official openai SDK (sync, async, and streamed through
the SDK's stream helper, which reassembles `delta.tool_calls`): tool_choice required / named / auto /
none, parallel_tool_calls, a conversation with calls and results, and the 400s.

The toy model (tests/api/conformance.py) either samples freely (so a schema-valid call under
required / named comes from the constraint, not from the model) or, with " function" in the prompt,
writes the script its test sets (a model that calls tools, for auto)."""
from __future__ import annotations

import json

import httpx2 as httpx
import jsonschema
import openai
import pytest

from conformance import SCRIPT, toy_server

CITY = {"type": "string", "maxLength": 8}
DAYS = {"type": "integer", "minimum": 1, "maximum": 7}
WEATHER_ARGS = {"type": "object", "properties": {"city": CITY, "days": DAYS}, "required": ["city", "days"],
                "additionalProperties": False}
ALERT_ARGS = {"type": "object", "properties": {"level": {"enum": ["low", "high"]}}, "required": ["level"],
              "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city",
                                            "parameters": WEATHER_ARGS}}
ALERT = {"type": "function", "function": {"name": "set_alert", "parameters": ALERT_ARGS}}
TOOLS = [WEATHER, ALERT]
ARGS = {"get_weather": WEATHER_ARGS, "set_alert": ALERT_ARGS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALLER = [{"role": "user", "content": "Call a" + SCRIPT}]           # the toy writes its script
PARIS = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","days":3}}\n</tool_call>'
ALARM = '<tool_call>\n{"name":"set_alert","arguments":{"level":"high"}}\n</tool_call>'


@pytest.fixture(scope="module")
def live():
    with toy_server(max_context=2048) as lv:
        yield lv


def calls_of(out) -> list[tuple[str, dict]]:
    """The reply's calls as (name, arguments), each schema-valid, in a tool-calls reply."""
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content, choice
    calls = []
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, ARGS[call.function.name])
        calls.append((call.function.name, args))
    assert len({c.id for c in choice.message.tool_calls}) == len(calls)
    return calls


@pytest.mark.parametrize("seed", [1, 2])
def test_required_gives_schema_valid_calls_from_a_free_model(live, api, seed):
    out = api.chat(messages=ASK, tools=TOOLS, tool_choice="required", max_completion_tokens=300,
                   temperature=1.0, seed=seed)
    assert len(calls_of(out)) >= 1


@pytest.mark.parametrize("name", ["get_weather", "set_alert"])
def test_a_named_function_gives_one_schema_valid_call_to_it(live, api, name):
    out = api.chat(messages=ASK, tools=TOOLS, max_completion_tokens=300, temperature=1.0, seed=3,
                   tool_choice={"type": "function", "function": {"name": name}})
    assert [n for n, _ in calls_of(out)] == [name]


def test_required_without_parallel_calls_gives_one_call(live, api):
    out = api.chat(messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                   max_completion_tokens=300, temperature=1.0, seed=4)
    assert len(calls_of(out)) == 1


def test_auto_reads_the_models_calls(live, api):
    live.toy.script = PARIS + "\n" + ALARM
    out = api.chat(messages=CALLER, tools=TOOLS, max_completion_tokens=300, temperature=0)
    assert calls_of(out) == [("get_weather", {"city": "Paris", "days": 3}), ("set_alert", {"level": "high"})]
    out = api.chat(messages=CALLER, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False,
                   max_completion_tokens=300, temperature=0)
    assert calls_of(out) == [("get_weather", {"city": "Paris", "days": 3})]       # the first call only


def test_auto_constrains_a_call_the_model_gets_wrong(live, api):
    live.toy.script = PARIS.replace('"days":3', '"days":30').replace('"Paris"', '"Paris, France"')
    out = api.chat(messages=CALLER, tools=TOOLS, parallel_tool_calls=False, max_completion_tokens=300, temperature=0)
    ((name, args),) = calls_of(out)                  # 30 > 7 days, a city longer than 8 characters: cut
    assert name == "get_weather" and args["days"] == 3 and args["city"].startswith("Paris")


def test_auto_leaves_text_alone(live, api):
    live.toy.script = PARIS
    out = api.chat(messages=ASK, tools=TOOLS, max_completion_tokens=8, temperature=0)
    choice = out.choices[0]
    assert choice.message.content and not choice.message.tool_calls and choice.finish_reason == "length"
    # text that starts like a call (held while it could be one, streamed, then sent as text)
    live.toy.script = "<tool_cal is no call"
    out = api.chat(messages=CALLER, tools=TOOLS, max_completion_tokens=100, temperature=0)
    choice = out.choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (live.toy.script, None, "stop")


def test_none_shows_the_tools_but_never_calls(live, api):
    live.toy.script = PARIS
    out = api.chat(messages=CALLER, tools=TOOLS, tool_choice="none", max_completion_tokens=300, temperature=0)
    choice = out.choices[0]
    assert choice.message.content == PARIS and not choice.message.tool_calls and choice.finish_reason == "stop"
    bare = api.chat(messages=CALLER, max_completion_tokens=1, temperature=0)
    assert out.usage.prompt_tokens > bare.usage.prompt_tokens + 50                # the tools are in the prompt


def test_a_conversation_with_calls_and_results_is_rendered(live, api):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 25 C"}]
    out = api.chat(messages=messages, tools=TOOLS, tool_choice="none", max_completion_tokens=3, temperature=0)
    r = httpx.post(live.url + "/tokenize", json={"model": "toy", "messages": messages, "tools": TOOLS}, timeout=10)
    assert r.status_code == 200 and r.json()["count"] == out.usage.prompt_tokens
    text = httpx.post(live.url + "/detokenize", json={"model": "toy", "tokens": r.json()["tokens"]},
                      timeout=10).json()["prompt"]
    assert '"name": "get_weather"' in text and "<tool_response>\nSunny, 25 C\n</tool_response>" in text
    assert out.choices[0].message.content == live.toy.decode(live.toy.greedy(r.json()["tokens"], 3))


@pytest.mark.parametrize("kw,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nowhere"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"n": 2}, "n"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_fields_are_400s_naming_the_field(live, api, kw, param):
    kw = {"messages": ASK, "tools": TOOLS, "max_completion_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        api.chat(**kw)
    assert e.value.body["param"] == param and "\n" not in e.value.message
    assert len(e.value.message) < 300                     # one line, not the tools array repeated


def test_streamed_calls_are_openai_delta_tool_calls_chunks(live, clients):
    """The raw chunks, as clients without the SDK's helper read them: the role, one
    `delta.tool_calls` chunk per call (index, id, type, name, the whole arguments), the finish reason."""
    live.toy.script = PARIS + "\n" + ALARM
    chunks = list(clients["sync"].sync_client().chat.completions.create(
        model="toy", messages=CALLER, tools=TOOLS, max_completion_tokens=300, temperature=0, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert deltas[0].role == "assistant"
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert [tc.index for tc in calls] == [0, 1] and all(tc.id.startswith("call_") for tc in calls)
    assert [(tc.type, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == \
        [("function", "get_weather", {"city": "Paris", "days": 3}), ("function", "set_alert", {"level": "high"})]
    assert not any(d.content for d in deltas)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]
