"""Every sampling / prompt parameter vLLM's OpenAI server takes has its effect here too, or is
refused: driven by the official openai SDK (extra_body for vLLM's own fields).

Two servers: the fake engine (what reaches the engine, prompts as characters, chat echo and
roles, 400s, unknown fields), and the real LLMEngine over a toy model with the tiny model's
tokenizer, where each parameter's effect on the output is asserted."""
from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx2 as httpx
import pytest
import torch

from http_fakes import EOS, MODEL, FakeEngine, FakeTokenizer, expected, serving
from vsc.models.tiny import make_tiny
from vsc.runtime.api import EngineConfig, GenerateRequest, SamplingParams
from vsc.runtime.constrain import ANY_JSON_OBJECT, canonical_schema
from vsc.runtime.engine import LLMEngine
from vsc.runtime.tokenizer import Tokenizer
from toy_runner import ContextRunner

torch.set_num_threads(1)

CHAT = [{"role": "user", "content": "hi"}]


class RecordingTokenizer(FakeTokenizer):
    """The fake tokenizer, rendering continue_final_message as a template does (no end of turn)."""

    def apply_chat_template(self, messages, add_generation_prompt=True, continue_final_message=False):
        text = super().apply_chat_template(messages, add_generation_prompt)
        return text[:-1] if continue_final_message else text


@pytest.fixture(scope="module")
def fake():
    with serving(FakeEngine(max_context=256), tokenizer=RecordingTokenizer()) as lv:
        yield lv


def sent(live, out) -> GenerateRequest:
    return live.engine.requests[out.id]


def prompt_text(request: GenerateRequest) -> str:
    return "".join(chr(i) for i in request.prompt_ids if i > EOS)


# --- what reaches the engine ---------------------------------------------------------------------

def test_sampling_fields_reach_the_engine(fake):
    client = fake.client()
    out = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=8, presence_penalty=0.5, frequency_penalty=-0.25,
        logit_bias={"104": -100, "105": 7.5},
        extra_body={"min_p": 0.2, "repetition_penalty": 1.3, "min_tokens": 3, "include_stop_str_in_output": True})
    p = sent(fake, out).params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.min_tokens) == \
        (0.5, -0.25, 1.3, 0.2, 3)
    assert p.logit_bias == {104: -100.0, 105: 7.5} and p.include_stop_str_in_output
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=4,
                                          extra_body={"min_p": 1.0})
    assert sent(fake, chat).params.min_p == 1.0


def test_min_tokens_above_the_resolved_max_tokens_is_400(fake):
    # chat max_tokens defaults to the rest of the context: 256 - prompt; min_tokens must fit in it
    r = httpx.post(fake.url + "/v1/chat/completions", json={"messages": CHAT, "min_tokens": 250}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text


def test_structured_outputs_json_uses_json_mode_and_the_rest_is_refused(fake):
    client = fake.client()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for so in ({"json": schema}, {"json": json.dumps(schema)}):
        out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,
                                             extra_body={"structured_outputs": so})
        assert sent(fake, out).params.json_schema == canonical_schema(schema)
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=4,
                                    extra_body={"structured_outputs": {"json_object": True}})
    assert sent(fake, out).params.json_schema == ANY_JSON_OBJECT
    for body, param in [({"structured_outputs": {"choice": ["a", "b"]}}, "structured_outputs"),
                        ({"structured_outputs": {"json": schema}, "response_format": {"type": "json_object"}},
                         "structured_outputs")]:
        r = httpx.post(fake.url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, **body}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "\n" not in r.json()["error"]["message"]


def test_response_format_text_is_sent_as_text_only(fake):
    client = fake.client()
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, response_format={"type": "text"})
    p = sent(fake, out).params
    assert p.text_only and p.json_schema is None
    assert not sent(fake, client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)).params.text_only


def test_text_parts_are_joined_with_newlines_as_vllm_does(fake):
    messages = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    out = fake.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert prompt_text(sent(fake, out)) == "<|user|>one\ntwo\n<|assistant|>"


@pytest.mark.parametrize("k,side,keep", [(4, None, "orld"), (4, "left", "orld"), (4, "right", "hel"),     # BOS + "hel"
                                         (-1, None, "hello world"), (50, None, "hello world")])
def test_truncate_prompt_tokens_keeps_the_last_or_first_k(fake, k, side, keep):
    extra = {"truncate_prompt_tokens": k} | ({"truncation_side": side} if side else {})
    out = fake.client().completions.create(model=MODEL, prompt="hello world", max_tokens=4, extra_body=extra)
    assert prompt_text(sent(fake, out)) == keep
    assert out.usage.prompt_tokens == len(sent(fake, out).prompt_ids)


def test_truncate_prompt_tokens_on_chat_keeps_the_end_of_the_rendered_prompt(fake):
    out = fake.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,
                                                extra_body={"truncate_prompt_tokens": 6})
    assert prompt_text(sent(fake, out)) == "tant|>" and out.usage.prompt_tokens == 6


def test_add_generation_prompt_false_gives_the_last_messages_role(fake):
    client = fake.client()
    messages = CHAT + [{"role": "assistant", "content": "Once upon"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                         extra_body={"add_generation_prompt": False})
    assert prompt_text(sent(fake, out)).endswith("<|assistant|>Once upon\n")
    assert out.choices[0].message.role == "assistant"
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,
                                         extra_body={"add_generation_prompt": False})
    assert prompt_text(sent(fake, out)) == "<|user|>hi\n"
    assert out.choices[0].message.role == "user"                       # vLLM: the last message's role


def test_continue_final_message_leaves_the_last_message_open(fake):
    messages = CHAT + [{"role": "assistant", "content": "Once upon"}]
    out = fake.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4,
        extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert prompt_text(sent(fake, out)).endswith("<|assistant|>Once upon")
    r = httpx.post(fake.url + "/v1/chat/completions", json={"messages": messages, "continue_final_message": True},
                   timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_chat_echo_puts_the_last_message_first_streamed_or_not(fake):
    client = fake.client()
    messages = CHAT + [{"role": "assistant", "content": "Once upon"}]
    extra = {"echo": True, "add_generation_prompt": False, "continue_final_message": True}
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, extra_body=extra)
    assert out.choices[0].message.content == "Once upon" + expected(6)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True,
                                                 extra_body=extra))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert deltas[0] == "Once upon" and "".join(deltas) == "Once upon" + expected(6)
    # the last message is the user's, the reply the assistant's: nothing to echo
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, extra_body={"echo": True})
    assert out.choices[0].message.content == expected(6)


def test_unknown_fields_are_logged_once_and_ignored_known_ones_never(fake, caplog):
    client = fake.client()
    with caplog.at_level(logging.WARNING, logger="vsc.runtime.http"):
        out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, user="u1",
                                             extra_body={"frobnicate": 1, "skip_special_tokens": True})
    assert out.choices[0].message.content == expected(4)
    lines = [r.getMessage() for r in caplog.records if "ignored request field" in r.getMessage()]
    assert len(lines) == 1 and "'frobnicate'" in lines[0] and "skip_special_tokens" not in lines[0]   # known: off
    assert "user" not in lines[0].replace("'frobnicate'", "")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vsc.runtime.http"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, presence_penalty=1.0, user="u",
                                  extra_body={"min_p": 0.1, "truncate_prompt_tokens": 3, "min_tokens": 1})
    assert not [r for r in caplog.records if "ignored request field" in r.getMessage()]


# --- effects on a real engine ----------------------------------------------------------------------

VOCAB = 2048


def Runner(logits_of, num_blocks=128, block_size=16):
    return ContextRunner(logits_of, VOCAB, num_blocks, block_size)


def repeating(context):
    """Prefers repeating the last token (greedy repeats forever unless penalized); no specials."""
    g = torch.Generator().manual_seed(context[-1])
    logits = torch.rand(VOCAB, generator=g) * 2.0 + 1.0
    logits[:3] = -1e9
    logits[context[-1]] = 4.0
    return logits


def eager_to_stop(eos):
    def logits_of(context):
        logits = repeating(context)
        logits[eos] = 10.0                   # the model always wants to stop
        return logits
    return logits_of


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    return Tokenizer.from_model_dir(make_tiny(tmp_path_factory.mktemp("tiny-http") / "llama", arch="llama"))


@pytest.fixture(scope="module")
def servers(tiny_tok):
    """(repeating, eager-to-stop) live servers over real engines."""
    eos = min(tiny_tok.eos_token_ids)
    engines = [LLMEngine(Runner(fn), tiny_tok, EngineConfig(max_context=256), MODEL)
               for fn in (repeating, eager_to_stop(eos))]
    for e in engines:
        e.start()
    try:
        with serving(engines[0], tokenizer=tiny_tok) as a, serving(engines[1], tokenizer=tiny_tok) as b:
            yield a, b
    finally:
        for e in engines:
            e.shutdown()


def engine_tokens(engine, prompt_ids, **params) -> list[int]:
    """Token ids the engine itself generates (called directly, from this thread's own event loop)."""
    async def main():
        r = GenerateRequest(f"direct-{time.monotonic_ns()}", prompt_ids, SamplingParams(**params), time.monotonic())
        return [t for e in [e async for e in engine.generate(r)] for t in e.token_ids]
    return asyncio.run(main())


PROMPT = "Tell me a story"


def complete(live, **kw):
    kw.setdefault("max_tokens", 12)
    return live.client().completions.create(model=MODEL, prompt=PROMPT, **kw)


def test_min_p_one_at_temperature_1_5_is_greedy(servers):
    live, _ = servers
    greedy = complete(live, temperature=0).choices[0].text
    sampled = {complete(live, temperature=1.5, seed=s).choices[0].text for s in range(4)}
    assert greedy not in sampled                                      # it samples freely ...
    for s in range(4):                                                # ... but not with min_p = 1
        assert complete(live, temperature=1.5, seed=s, extra_body={"min_p": 1.0}).choices[0].text == greedy


def test_logit_bias_minus_100_bans_the_greedy_token(servers, tiny_tok):
    live, _ = servers
    ids = tiny_tok.encode(PROMPT, add_special_tokens=True)
    plain = engine_tokens(live.engine, ids, temperature=0.0, max_tokens=12)
    banned = complete(live, temperature=0, logit_bias={str(plain[0]): -100})
    want = engine_tokens(live.engine, ids, temperature=0.0, max_tokens=12, logit_bias={plain[0]: -100.0})
    assert plain[0] not in want
    assert banned.choices[0].text == tiny_tok.decode(want) != tiny_tok.decode(plain)


@pytest.mark.parametrize("field,value", [("repetition_penalty", 2.0), ("frequency_penalty", 1.5),
                                         ("presence_penalty", 2.0)])
def test_penalties_change_greedy_output(servers, tiny_tok, field, value):
    live, _ = servers
    ids = tiny_tok.encode(PROMPT, add_special_tokens=True)
    plain = engine_tokens(live.engine, ids, temperature=0.0, max_tokens=12)
    assert len(set(plain)) == 1                                       # the toy repeats itself
    kw = {field: value} if field != "repetition_penalty" else {"extra_body": {field: value}}
    out = complete(live, temperature=0, **kw)
    want = engine_tokens(live.engine, ids, temperature=0.0, max_tokens=12, **{field: value})
    assert len(set(want)) > 1
    assert out.choices[0].text == tiny_tok.decode(want)


def test_min_tokens_suppresses_eos(servers):
    _, eager = servers
    plain = complete(eager, temperature=0)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens == 1
    held = complete(eager, temperature=0, extra_body={"min_tokens": 5})
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 6   # 5, then EOS
    chat = eager.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                                  extra_body={"min_tokens": 3})
    assert chat.usage.completion_tokens == 4 and chat.choices[0].message.content


def test_include_stop_str_in_output(servers):
    live, _ = servers
    full = complete(live, temperature=0, extra_body={"repetition_penalty": 2.0}).choices[0].text
    stop = full[3:5]
    cut = complete(live, temperature=0, stop=[stop], extra_body={"repetition_penalty": 2.0}).choices[0].text
    kept = complete(live, temperature=0, stop=[stop],
                    extra_body={"repetition_penalty": 2.0, "include_stop_str_in_output": True}).choices[0].text
    assert cut == full[:full.find(stop)] and kept == cut + stop

