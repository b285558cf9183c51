"""Tool calls end to end: a compiled tiny server, driven by the openai SDK, langchain-openai's
`bind_tools` and instructor's default TOOLS mode.

The tiny model's weights are random: that every call parses and fits its function's schema comes
from the constraint (tool_choice required or a named function: json mode on the call's schema),
not from the model. Each schema bounds its strings and numbers so a call ends well within
max_tokens (a string of 8 characters may take 48 as JSON escapes); the clients without a seed run greedy.
"""
from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, Field

from vsc.cli import main as vsc_main
from vsc.models.tiny import make_tiny

from live_server import Live

SPEC = """
deployment tools {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{
    arrivals = closed(4)
    prompt_tokens = uniform(8, 64)
    output_tokens = fixed(16)
  }}
  accuracy {{ greedy_exact(probes = 2) }}
  serve {{ max_context = 1024 }}
  optimize "paged-kv{{block=16}},continuous-batching{{max_batch=4,max_tokens=1024}}"
}}
"""

CITY = {"type": "string", "maxLength": 8}
DAYS = {"type": "integer", "minimum": 1, "maximum": 7}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The forecast for a city",
    "parameters": {"type": "object", "properties": {"city": CITY, "days": DAYS}, "required": ["city", "days"],
                   "additionalProperties": False}}}
ALERT = {"type": "function", "function": {
    "name": "set_alert", "parameters": {"type": "object", "properties": {"level": {"enum": ["low", "high"]}},
                                        "required": ["level"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris this week?"}]


class GetWeather(BaseModel):
    """The forecast for a city."""

    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=7)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tools")
    make_tiny(tmp / "tiny-llama", arch="llama")
    (tmp / "tools.vs").write_text(SPEC.format(model=tmp / "tiny-llama"))
    assert vsc_main(["compile", str(tmp / "tools.vs"), "-o", str(tmp / "server")]) == 0
    server = Live(tmp / "server")
    yield server
    server.close()


def assert_weather(arguments: dict) -> None:
    assert set(arguments) == {"city", "days"}, arguments
    assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 8
    assert type(arguments["days"]) is int and 1 <= arguments["days"] <= 7


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_and_named_calls_are_schema_valid(live, seed):
    c = live.client
    named = c.chat.completions.create(model=live.model, messages=ASK, tools=[WEATHER, ALERT], max_tokens=256,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                      temperature=1.0, seed=seed)
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert_weather(json.loads(call.function.arguments))

    one = c.chat.completions.create(model=live.model, messages=ASK, tools=[WEATHER, ALERT], max_tokens=256,
                                    tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed)
    (call,) = one.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert_weather(arguments)
    else:
        assert call.function.name == "set_alert" and arguments in ({"level": "low"}, {"level": "high"})


def test_a_streamed_named_call_is_schema_valid(live):
    stream = live.client.chat.completions.create(
        model=live.model, messages=ASK, tools=[WEATHER], max_tokens=256, stream=True, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    chunks = [ch for ch in stream if ch.choices]
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"] and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert_weather(json.loads(calls[0].function.arguments))


def test_langchain_bind_tools_gets_a_schema_valid_call(live):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=live.base + "/v1", api_key="unused", model=live.model,
                                      max_tokens=256, temperature=0, max_retries=0, timeout=60)
    for bound in (llm.bind_tools([GetWeather], tool_choice="GetWeather"),
                  llm.bind_tools([GetWeather], tool_choice="any", parallel_tool_calls=False)):
        (call,) = bound.invoke("What is the weather in Paris this week?").tool_calls
        assert call["name"] == "GetWeather" and call["id"].startswith("call_")
        assert_weather(call["args"])
        GetWeather.model_validate(call["args"])


def test_instructor_tools_mode_gets_a_validated_model(live):
    instructor = pytest.importorskip("instructor")
    client = instructor.from_openai(live.client)          # its default mode: a named tool_choice
    assert client.mode == instructor.Mode.TOOLS
    weather = client.chat.completions.create(model=live.model, response_model=GetWeather, max_tokens=256,
                                             temperature=0, max_retries=0, messages=ASK)
    assert isinstance(weather, GetWeather)
    assert_weather(weather.model_dump())


def test_auto_replies_are_text_or_schema_valid_calls(live):
    """tool_choice auto: the grammar lets the model write text (never text that starts like a call)
    or calls, each schema-valid. This random model writes text; which calls the grammar admits is
    checked on the same tokenizer in tests/api/test_tools_api.py."""
    for seed in (1, 2, 3):
        reply = live.client.chat.completions.create(model=live.model, messages=ASK, tools=[WEATHER], max_tokens=24,
                                                    temperature=1.0, seed=seed)
        m = reply.choices[0].message
        if m.tool_calls:
            assert reply.choices[0].finish_reason == "tool_calls"
            for call in m.tool_calls:
                assert call.function.name == "get_weather"
                assert_weather(json.loads(call.function.arguments))
        else:
            assert not (m.content or "").startswith("<tool_call>"), m.content
