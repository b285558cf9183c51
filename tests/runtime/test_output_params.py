"""Output-side parameters as vLLM defines them: include_stop_str_in_output and min_tokens in the
detokenizer (and through the engine), continue_final_message in the chat template (against
transformers), and response_format text on a json-mode deployment."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch
import transformers

from vsc.models.tiny import make_tiny
from vsc.runtime.api import EngineConfig, GenerateRequest, SamplingParams
from vsc.runtime.constrain import ANY_JSON_OBJECT
from vsc.runtime.engine import LLMEngine
from vsc.runtime.tokenizer import IncrementalDetokenizer, Tokenizer
from toy_runner import ContextRunner

torch.set_num_threads(1)


class ByteTok:
    """Each id is one UTF-8 byte."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def stream(detok, data: bytes) -> str:
    pieces = [detok.add(i) for i in data]
    if not detok.stopped:
        pieces.append(detok.flush())
    return "".join(pieces)


@pytest.mark.parametrize("stops, text", [(["STOP"], "abSTOPcd"), (["cd", "bcdx"], "abcdx"), (["x"], "x")])
def test_include_stop_str_in_output_keeps_the_stop_string_and_nothing_after(stops, text):
    plain = stream(IncrementalDetokenizer(ByteTok(), stop=stops), text.encode())
    kept = IncrementalDetokenizer(ByteTok(), stop=stops, include_stop=True)
    out = stream(kept, text.encode())
    assert kept.stopped
    stop = next(s for s in stops if out.endswith(s))       # the one that completed first
    assert out == plain + stop and text.startswith(out)


def test_min_tokens_ignores_stop_strings_in_the_first_tokens_text():
    text = b"aXbXcX"                           # "X" completes at tokens 2, 4 and 6
    assert stream(IncrementalDetokenizer(ByteTok(), stop=["X"]), text) == "a"
    assert stream(IncrementalDetokenizer(ByteTok(), stop=["X"], min_tokens=2), text) == "aXb"
    assert stream(IncrementalDetokenizer(ByteTok(), stop=["X"], min_tokens=3), text) == "aXb"
    assert stream(IncrementalDetokenizer(ByteTok(), stop=["X"], min_tokens=4), text) == "aXbXc"
    # a stop string that starts inside the first min_tokens tokens and ends after them counts
    assert stream(IncrementalDetokenizer(ByteTok(), stop=["XY"], min_tokens=2), b"aXYb") == "a"
    assert stream(IncrementalDetokenizer(ByteTok(), stop=["X"], min_tokens=9), text) == "aXbXcX"


# --- continue_final_message, as transformers renders it --------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny-out") / "llama", arch="llama")


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_model_dir(tiny_dir)


@pytest.mark.parametrize("last", ["The answer is", "Sure, here it comes: ", "Trailing space "])
def test_continue_final_message_renders_as_transformers(tok, tiny_dir, last):
    hf = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": last}]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    got = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert got == want
    closed = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert got != closed and closed.startswith(got.rstrip())       # the turn is left open


# --- through the engine ----------------------------------------------------------------------------

VOCAB = 2048


def Runner(num_blocks=64, block_size=16):
    return ContextRunner(toy_logits, VOCAB, num_blocks, block_size)


def toy_logits(context):
    g = torch.Generator().manual_seed(hash(context) & 0x7FFFFFFF)
    logits = torch.randn(VOCAB, generator=g) * 3.0
    logits[:3] = -1e9
    return logits


def run(engine, *requests):
    async def one(r):
        return [e async for e in engine.generate(r)]

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(r) for r in requests)), 60)
    return asyncio.run(main())


def req(rid, prompt, **params):
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 12)
    return GenerateRequest(rid, list(prompt), SamplingParams(**params), time.monotonic())


@pytest.fixture
def engine_of(tok):
    made = []

    def make(**cfg):
        cfg.setdefault("max_context", 256)
        e = LLMEngine(Runner(), tok, EngineConfig(**cfg), "toy")
        e.start()
        made.append(e)
        return e

    yield make
    for e in made:
        e.shutdown()


def text_of(events):
    return "".join(e.text for e in events)


def test_include_stop_str_and_stop_token_text_through_the_engine(engine_of, tok):
    engine = engine_of()
    prompt = [5, 6, 7, 8]
    (free,) = run(engine, req("f", prompt))
    ids = [t for e in free for t in e.token_ids]
    full = tok.decode(ids)
    stop = full[len(tok.decode(ids[:4])) - 1:][:3]                 # spans a token boundary mid-output
    cut, kept = run(engine, req("a", prompt, stop=[stop]), req("b", prompt, stop=[stop], include_stop_str_in_output=True))
    assert text_of(cut) == full[:full.find(stop)]
    assert text_of(kept) == full[:full.find(stop) + len(stop)]
    # a stop token's own text joins the output only with include_stop_str_in_output
    plain, with_text = run(engine, req("c", prompt, stop_token_ids=[ids[3]]),
                           req("d", prompt, stop_token_ids=[ids[3]], include_stop_str_in_output=True))
    assert text_of(plain) == tok.decode(ids[:3])
    assert text_of(with_text) == tok.decode(ids[:4])


def test_response_format_text_turns_a_json_mode_deployment_off_per_request(engine_of):
    engine = engine_of(json_schema=ANY_JSON_OBJECT)
    free_engine = engine_of()
    prompt = [5, 6, 7, 8]
    (json_ev,), (text_ev,) = run(engine, req("j", prompt)), run(engine, req("t", prompt, text_only=True))
    (free,) = run(free_engine, req("f", prompt))
    assert text_of(json_ev).startswith("{")                              # the deployment's schema applies
    assert [t for e in text_ev for t in e.token_ids] == [t for e in free for t in e.token_ids]
    assert text_of(text_ev) == text_of(free) and not text_of(free).startswith("{")


def test_penalties_stay_exact_under_jump_forward(engine_of):
    """A json-mode request's grammar-forced tokens are verified as drafts: each row's penalties count
    the forced tokens before it, so the output is token-by-token decoding's."""
    schema = ('{"type":"object","properties":{"name":{"type":"string","maxLength":8},'
              '"tags":{"type":"array","items":{"enum":["alpha","beta"]},"maxItems":3}},'
              '"required":["name","tags"],"additionalProperties":false}')
    prompt = [5, 6, 7, 8]
    penalty = dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2, max_tokens=40)
    jumping = engine_of(json_schema=schema, jump_forward=True)
    plain = engine_of(json_schema=schema, jump_forward=False)
    reqs = [req(f"r{i}", prompt + [9 + i], **penalty) for i in range(3)]
    got = run(jumping, *reqs)
    want = run(plain, *reqs)
    assert [[t for e in ev for t in e.token_ids] for ev in got] == [[t for e in ev for t in e.token_ids] for ev in want]
    assert jumping.stats()["jump_forward_tokens"] > 0
    unpenalized = run(plain, *[req(f"u{i}", prompt + [9 + i], max_tokens=40) for i in range(3)])
    assert [text_of(e) for e in unpenalized] != [text_of(e) for e in want]      # the penalties did act
