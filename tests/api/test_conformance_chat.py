"""OpenAI conformance, /v1/chat/completions' own fields through the official openai SDK (sync, async,
streamed through the SDK's stream helper, sync and async): logprobs / top_logprobs equal to the
toy model's log-softmax, n, max_tokens and max_completion_tokens, text parts, vLLM's
add_generation_prompt / continue_final_message / echo, response_format on a json-mode deployment,
and the fields it refuses."""
from __future__ import annotations

import json
import math

import jsonschema
import openai
import pytest

from conformance import MODES, apis, toy_server

TOL = 1e-4
ASK = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Once upon a time"}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["cat", "dog"]}},
          "required": ["ok", "kind"], "additionalProperties": False}


@pytest.fixture(scope="module")
def live():
    with toy_server() as lv:
        yield lv


def rendered(live, messages, add_generation_prompt=True) -> list[int]:
    tok = live.toy.tok
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))


def test_logprobs_and_top_logprobs_are_the_models_log_softmax(live, api):
    prompt = rendered(live, ASK)
    out = api.chat(messages=ASK, max_completion_tokens=6, temperature=1.0, seed=2, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    ids = live.toy.ids([c.token for c in content])
    assert "".join(c.token for c in content) == out.choices[0].message.content and len(ids) == 6
    for i, (c, token) in enumerate(zip(content, ids)):
        lsm = live.toy.logprobs(prompt + ids[:i])
        assert math.isclose(c.logprob, float(lsm[token]), abs_tol=TOL) and c.bytes == list(c.token.encode())
        assert len(c.top_logprobs) == 3
        ranked = [token] + [t for t in lsm.topk(4).indices.tolist() if t != token]    # chosen, then most likely
        assert [t.token for t in c.top_logprobs] == [live.toy.text_of[t] for t in ranked[:3]]
        for t in c.top_logprobs:
            assert math.isclose(t.logprob, float(lsm[live.toy.id_of[t.token]]), abs_tol=TOL)
    plain = api.chat(messages=ASK, max_completion_tokens=6, temperature=1.0, seed=2)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == out.choices[0].message.content


def test_n_gives_n_distinct_choices_with_their_indices(live, api):
    out = api.chat(messages=ASK, max_completion_tokens=8, temperature=1.0, seed=9, n=3)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) == 3 and out.usage.completion_tokens == 24


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_both_max_token_fields_bound_the_reply(live, api, field):
    out = api.chat(messages=ASK, temperature=0, **{field: 5})
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(rendered(live, ASK))
    assert out.choices[0].message.content == live.toy.decode(live.toy.greedy(rendered(live, ASK), 5))
    assert out.choices[0].message.role == "assistant"


def test_text_parts_are_joined_with_newlines(live, api):
    parts = [{"type": "text", "text": "Once upon"}, {"type": "text", "text": "a time"}]
    joined = [{"role": "user", "content": "Once upon\na time"}]
    out = api.chat(messages=[{"role": "user", "content": parts}], max_completion_tokens=4, temperature=0)
    assert out.usage.prompt_tokens == len(rendered(live, joined))
    assert out.choices[0].message.content == live.toy.decode(live.toy.greedy(rendered(live, joined), 4))


def test_add_generation_prompt_false_continues_the_last_turn_as_its_role(live, api):
    messages = ASK + [{"role": "assistant", "content": "They lived"}]
    out = api.chat(messages=messages, max_completion_tokens=4, temperature=0,
                   extra_body={"add_generation_prompt": False})
    ids = rendered(live, messages, add_generation_prompt=False)
    assert out.usage.prompt_tokens == len(ids) and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == live.toy.decode(live.toy.greedy(ids, 4))
    out = api.chat(messages=ASK, max_completion_tokens=4, temperature=0, extra_body={"add_generation_prompt": False})
    assert out.choices[0].message.role == "user"              # vLLM: the last message's role
    assert out.usage.prompt_tokens == len(rendered(live, ASK, add_generation_prompt=False))


def test_continue_final_message_and_echo_continue_the_assistants_text(live, api):
    tok = live.toy.tok
    messages = ASK + [{"role": "assistant", "content": "They lived"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    ids = tok.encode(text[:text.rindex("They lived") + len("They lived")])       # no end of turn
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    out = api.chat(messages=messages, max_completion_tokens=4, temperature=0, extra_body=extra)
    assert out.usage.prompt_tokens == len(ids)
    gen = live.toy.decode(live.toy.greedy(ids, 4))
    assert out.choices[0].message.content == gen
    out = api.chat(messages=messages, max_completion_tokens=4, temperature=0, extra_body={**extra, "echo": True})
    assert out.choices[0].message.content == "They lived" + gen
    # the last message is the user's, the reply the assistant's: nothing to echo
    out = api.chat(messages=ASK, max_completion_tokens=4, temperature=0, extra_body={"echo": True})
    assert out.choices[0].message.content == live.toy.decode(live.toy.greedy(rendered(live, ASK), 4))


@pytest.fixture(scope="module")
def json_server():
    with toy_server(json_schema=json.dumps(SCHEMA, separators=(",", ":"))) as lv, apis(lv.url) as clients:
        lv.clients = clients
        yield lv


@pytest.mark.parametrize("mode", MODES)
def test_a_json_mode_deployment_answers_its_schema_unless_asked_for_text(json_server, mode):
    api = json_server.clients[mode]
    out = api.chat(messages=ASK, max_completion_tokens=40, temperature=0)
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    out = api.chat(messages=ASK, max_completion_tokens=6, temperature=0, response_format={"type": "text"})
    toy = json_server.toy
    assert out.choices[0].message.content == toy.decode(toy.greedy(rendered(json_server, ASK), 6))
    other = {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"], "additionalProperties": False}
    out = api.chat(messages=ASK, max_completion_tokens=40, temperature=0,
                   response_format={"type": "json_schema", "json_schema": {"name": "other", "schema": other}})
    jsonschema.validate(json.loads(out.choices[0].message.content), other)
    # completions too (response_format is a vLLM extension there)
    out = api.complete(prompt="Once upon a time", max_tokens=40, temperature=0)
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMA)
    out = api.complete(prompt="Once upon a time", max_tokens=6, temperature=0,
                       extra_body={"response_format": {"type": "text"}})
    assert out.choices[0].text == toy.decode(toy.greedy(toy.tok.encode("Once upon a time"), 6))


def test_a_json_mode_deployment_on_the_responses_api(json_server):
    c, toy = json_server.clients["sync"].sync_client(), json_server.toy
    r = c.responses.create(model="toy", input=ASK[1]["content"], max_output_tokens=40, temperature=0)
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), SCHEMA)
    r = c.responses.create(model="toy", input=ASK[1]["content"], max_output_tokens=5, temperature=0,
                           text={"format": {"type": "text"}})
    assert r.output_text == toy.decode(toy.greedy(rendered(json_server, ASK[1:]), 5))


@pytest.mark.parametrize("kw,param", [
    ({"extra_body": {"best_of": 2}}, "best_of"),
    ({"top_logprobs": 2}, "top_logprobs"),                                    # without logprobs
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"extra_body": {"continue_final_message": True}}, "continue_final_message"),   # needs no generation prompt
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"n": 0}, "n"),
])
def test_refused_fields_are_400s_naming_the_field(live, api, kw, param):
    kw = {"messages": ASK, "max_completion_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        api.chat(**kw)
    assert e.value.body["param"] == param and param in e.value.message and "\n" not in e.value.message


@pytest.mark.parametrize("mode", MODES)
def test_min_tokens_with_json_output_is_refused_not_ignored(json_server, mode):
    """A JSON reply ends where its document does (the grammar then allows only EOS), so min_tokens
    could not hold it open: a 400 naming min_tokens, on the deployment's own json mode and with a
    request's schema; with response_format text, min_tokens applies as usual."""
    api = json_server.clients[mode]
    other = {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"], "additionalProperties": False}
    for kw in ({}, {"response_format": {"type": "json_schema", "json_schema": {"name": "other", "schema": other}}}):
        with pytest.raises(openai.BadRequestError) as e:
            api.chat(messages=ASK, max_completion_tokens=40, temperature=0, extra_body={"min_tokens": 30}, **kw)
        assert e.value.status_code == 400 and e.value.body["param"] == "min_tokens"
        assert "cannot be combined with JSON output" in e.value.message and "\n" not in e.value.message
    out = api.chat(messages=ASK, max_completion_tokens=6, temperature=0, response_format={"type": "text"},
                   extra_body={"min_tokens": 6})
    assert out.usage.completion_tokens == 6
