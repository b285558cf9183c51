"""OpenAI tool calling through the openai SDK against the fake engine: what reaches the engine (the
prompt, the call's schema under tool_choice required / a named function), how replies become
`tool_calls` (plain and streamed), and the 400s. Schema validity by construction is checked end to
end against a compiled tiny model in tests/e2e/test_tools_e2e.py."""
from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from http_fakes import FakeEngine, FakeTokenizer, serving
from vsc.runtime import tools as tooling
from vsc.runtime.constrain import LARK_PREFIX, canonical_schema, check_schema

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
END = "\x00"      # the scripted engine's end of reply (as a complete grammar ends the real engine's)


class ScriptedEngine(FakeEngine):
    """Says `output` once and stops (finish_reason "stop")."""

    def generate(self, request):
        request.params.stop = [*request.params.stop, END]
        return super().generate(request)


@pytest.fixture(scope="module")
def live():
    with serving(ScriptedEngine(max_context=4096)) as lv:
        yield lv


def say(live, text: str) -> None:
    live.engine.output = text + END


def sent(live, rid: str):
    req = live.engine.requests[rid]
    return req, FakeTokenizer().decode(req.prompt_ids)


def test_required_constrains_the_reply_to_an_array_of_calls_and_returns_tool_calls(live):
    say(live, '[{"name":"get_weather","arguments":{"city":"Paris"}},{"name":"get_time","arguments":{}}]')
    r = live.client().chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS, tool_choice="required")
    req, _ = sent(live, r.id)
    schema = json.loads(req.params.json_schema)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert [c["properties"]["name"]["const"] for c in schema["items"]["anyOf"]] == ["get_weather", "get_time"]
    assert schema["items"]["anyOf"][0]["properties"]["arguments"] == WEATHER["function"]["parameters"]
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"} and json.loads(calls[1].function.arguments) == {}
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls) and calls[0].id != calls[1].id


def test_a_named_function_or_no_parallel_calls_constrain_to_one_call(live):
    say(live, '{"name":"get_weather","arguments":{"city":"Oslo"}}')
    c = live.client()
    r = c.chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    schema = json.loads(sent(live, r.id)[0].params.json_schema)
    assert schema["properties"]["name"] == {"const": "get_weather"} and schema["required"] == ["name", "arguments"]
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    r = c.chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS, tool_choice="required",
                                  parallel_tool_calls=False)
    schema = json.loads(sent(live, r.id)[0].params.json_schema)
    assert "anyOf" in schema and schema.get("type") != "array"
    assert r.choices[0].finish_reason == "tool_calls"


def test_auto_parses_tool_call_blocks_and_leaves_text_alone(live):
    c = live.client()
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    say(live, call)
    r = c.chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS)
    grammar = sent(live, r.id)[0].params.json_schema             # auto: text or schema-valid calls (a grammar)
    assert grammar == tooling.auto_grammar(tooling.parse({"tools": TOOLS})) and grammar.startswith(LARK_PREFIX)
    assert '"const": "get_weather"' in grammar and "call+" in grammar
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content is None
    assert m.tool_calls[0].function.name == "get_weather" and json.loads(m.tool_calls[0].function.arguments) == {
        "city": "Rome"}
    say(live, "Let me look.\n" + call)        # a call only opens a reply (the grammar's text branch is text)
    r = c.chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == "Let me look.\n" + call
    say(live, "It is sunny.")
    r = c.chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS, tool_choice="auto")
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    say(live, '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>')   # not a given tool: text
    r = c.chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS)
    assert r.choices[0].message.tool_calls is None and "launch_rockets" in r.choices[0].message.content


def test_none_never_calls_but_shows_the_tools(live):
    say(live, '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    r = live.client().chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS, tool_choice="none")
    req, prompt = sent(live, r.id)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert req.params.json_schema is None and '"name": "get_weather"' in prompt


def test_the_fallback_renders_tools_calls_and_results_into_the_prompt(live):
    say(live, "Sunny.")
    history = [{"role": "system", "content": "Be brief."}, *ASK,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    r = live.client().chat.completions.create(model="fake-model", messages=history, tools=TOOLS)
    _, prompt = sent(live, r.id)
    system = prompt.split("<|user|>")[0]
    assert system.startswith("<|system|>Be brief.\n\n# Tools") and json.dumps(WEATHER) in system
    assert '<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<|user|><tool_response>\n18 C, sunny\n</tool_response>" in prompt
    assert r.choices[0].message.content == "Sunny."


def test_streaming_sends_delta_tool_calls(live):
    say(live, '[{"name":"get_weather","arguments":{"city":"Lima"}}]')
    stream = live.client().chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS,
                                                   tool_choice="required", stream=True,
                                                   stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "get_weather", {"city": "Lima"})]
    assert calls[0].id.startswith("call_")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("fields,param,message", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "'tool_choice' names 'nope', which is not one of the tools (get_time, get_weather)"),
    ({"tool_choice": "required"}, "tool_choice", "'tool_choice' needs 'tools'"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls", "'parallel_tool_calls' needs 'tools'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools",
     "'tools[0].function.name' must be 1 to 64 letters, digits, _ or -, got 'bad name'"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "'tools[0]' must be"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "'tool_choice' must be none, auto, required"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
      "tool_choice": "required"}, "tools", "'tools': the tool call's schema: invalid JSON Schema"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "'tool_choice' required or a named function constrains the reply"),
    ({"tools": TOOLS, "n": 2}, "n", "requests with 'tools'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, "tools",
     "'tools': the tool call's schema: invalid JSON Schema"),
])
def test_bad_tool_fields_are_400s_naming_the_field(live, fields, param, message):
    before = len(live.engine.requests)
    with pytest.raises(openai.BadRequestError) as e:
        live.client().chat.completions.create(model="fake-model", messages=ASK, **fields)
    err = e.value.body
    assert err["param"] == param and err["message"].startswith(message), err
    assert len(live.engine.requests) == before


def test_assistant_tool_calls_must_be_well_formed(live):
    bad = [*ASK, {"role": "assistant", "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f"}}]}]
    with pytest.raises(openai.BadRequestError) as e:
        live.client().chat.completions.create(model="fake-model", messages=bad)
    assert e.value.body["param"] == "messages" and "messages[1].tool_calls[0]" in e.value.body["message"]


def test_auto_grammar_admits_text_or_schema_valid_calls_only():
    """Checked on the tiny model's tokenizer: llguidance refuses a call to an unknown tool or with bad
    arguments, and text that starts like a call; it accepts text, and calls (several unless
    parallel_tool_calls is false)."""
    from vsc.runtime.constrain import GrammarCompiler
    from vsc.runtime.tokenizer import Tokenizer
    tok = Tokenizer.from_model_dir(Path(__file__).resolve().parents[2] / "models" / "tiny-llama")
    compiler = GrammarCompiler.from_tokenizer(tok, tok.vocab_size)
    call = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Rome"}}\n</tool_call>\n'

    def accepts(text: str, parallel: bool = True) -> bool:
        plan = tooling.parse({"tools": TOOLS, "parallel_tool_calls": parallel})
        m = compiler.matcher(check_schema(tooling.auto_grammar(plan)))
        return bool(m.consume_tokens(tok.encode(text))) and not m.is_error() and m.is_accepting()
    assert accepts("It is sunny.") and accepts("<tools> are fine") and accepts("") and accepts(call)
    assert accepts(call + call) and not accepts(call + call, parallel=False)
    assert not accepts('<tool_call>\n{"name":"launch","arguments":{}}\n</tool_call>')
    assert not accepts('<tool_call>\n{"name":"get_weather","arguments":{"town":"Rome"}}\n</tool_call>')
    assert not accepts("<tool_call> sorry, just text")
    # compact JSON, as json mode's: no free whitespace inside a call for a model to spend its tokens on
    assert not accepts('<tool_call>\n{"name": "get_weather","arguments":{"city":"Rome"}}\n</tool_call>')
    assert not accepts('<tool_call>\n{"name":"get_weather","arguments":{"city":"Rome"}   }\n</tool_call>')


def test_parameter_defs_move_to_the_top_so_refs_resolve():
    item = {"type": "object", "properties": {"sku": {"type": "string"}}, "required": ["sku"]}
    params = {"type": "object", "$defs": {"Item": item},
              "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}}, "required": ["items"]}
    plan = tooling.parse({"tools": [{"type": "function", "function": {"name": "order", "parameters": params}}],
                          "tool_choice": "required"})
    schema = tooling.call_schema(plan)
    assert schema["$defs"] == {"0_Item": item}
    assert schema["items"]["properties"]["arguments"]["properties"]["items"]["items"] == {"$ref": "#/$defs/0_Item"}
    check_schema(schema)             # llguidance resolves it
    assert canonical_schema(schema)


def test_a_template_with_tool_support_receives_tools_and_argument_objects():
    from tokenizers import Tokenizer as HF
    from tokenizers.models import WordLevel

    from vsc.runtime.tokenizer import Tokenizer
    template = ("{% if tools %}TOOLS={{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n"
                "{% endif %}{% for m in messages %}{{ m.role }}:{{ m.content }}"
                "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}"
                "{{ '\\n' }}{% endfor %}")
    tok = Tokenizer(HF(WordLevel({"a": 0}, unk_token="a")), template)
    assert tok.supports_tools and not Tokenizer(HF(WordLevel({"a": 0}, unk_token="a")), "{{ messages }}").supports_tools
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    messages, extra = tooling.template_messages(history, tooling.parse({"tools": TOOLS}), native=True)
    text = tok.apply_chat_template(messages, add_generation_prompt=False, **extra)
    assert text == "TOOLS=get_weather,get_time\nuser:Weather in Paris?\nassistant:[get_weather Paris]\ntool:sunny\n"


def test_tokenize_renders_tools_and_tool_messages_as_chat_does(live):
    import httpx2 as httpx
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "noon"}]
    say(live, "Noon.")
    r = live.client().chat.completions.create(model="fake-model", messages=history, tools=TOOLS, tool_choice="none")
    tokens = httpx.post(live.url + "/tokenize", json={"messages": history, "tools": TOOLS}, timeout=10).json()["tokens"]
    assert tokens == live.engine.requests[r.id].prompt_ids
    bad = httpx.post(live.url + "/tokenize", json={"messages": ASK, "tools": [{"type": "x"}]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools"


def test_auto_streams_text_as_it_comes_and_calls_when_complete(live):
    c = live.client()
    say(live, "<tools> are fine, the weather is sunny.")
    chunks = [ch for ch in c.chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS, stream=True)
              if ch.choices]
    contents = [ch.choices[0].delta.content for ch in chunks if ch.choices[0].delta.content]
    assert "".join(contents) == "<tools> are fine, the weather is sunny." and len(contents) > 2   # not one lump
    assert chunks[-1].choices[0].finish_reason == "stop"
    say(live, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    chunks = [ch for ch in c.chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS, stream=True)
              if ch.choices]
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, tc.function.arguments) for tc in calls] == [("get_time", "{}")]
    assert not any(ch.choices[0].delta.content for ch in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
