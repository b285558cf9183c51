"""The harness of the OpenAI conformance suite (tests/api/test_conformance_*.py): a real LLMEngine
over a toy model whose logits are a pure function of the context, with the tiny model's tokenizer,
served in-process on a loopback port; and one way to call it through the official openai SDK in
each of its modes (sync, async, streamed sync, streamed async), every mode giving back the SDK's
own response type so one test body checks them all.

The toy model (`Toy.logits`): every token outside `Toy.support` (specials, and tokens whose text
is not unique, so that a token's text names its id) has logit -1e9; the others have a
pseudo-random logit in [1, 3) seeded by the last token, so greedy decoding walks a fixed chain and
sampling is free. Two marker tokens in the context change it: " copy" makes the last token the
most likely (logit 4: greedy repeats itself forever, which the penalties break), " return" makes
EOS the most likely (logit 10: the model wants to stop at once, which min_tokens holds off), " function"
makes the model write `script` (a server's, e.g. a tool call) and then EOS: the next token is the
longest one that continues the script after the longest end of the context's text that begins it
(so it follows the script through any tokenization, and a grammar that forbids the script's next
token makes it start over).
`Toy.greedy` decodes greedily in plain Python with vLLM's logits adjustments, the reference the
server's outputs are compared to."""
from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from pathlib import Path

import openai
import torch
from openai.types import Completion

from http_fakes import serving
from toy_runner import ContextRunner
from vsc.runtime.api import EngineConfig
from vsc.runtime.engine import LLMEngine
from vsc.runtime.tokenizer import Tokenizer

torch.set_num_threads(1)

TINY = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"
MODEL = "toy"
VOCAB = 2048
MODES = ("sync", "async", "stream", "async-stream")
STREAMED = ("stream", "async-stream")
COPY, RETURN, SCRIPT = " copy", " return", " function"        # the marker words (one token each)
NEG = -1e9


@functools.cache
def tokenizer() -> Tokenizer:
    return Tokenizer.from_model_dir(TINY)


class Toy:
    def __init__(self, tok: Tokenizer, script: str = ""):
        self.tok, self.script = tok, script
        strings = [tok.decode([i], skip_special_tokens=False) for i in range(VOCAB)]
        counts = Counter(strings)
        self.eos = min(tok.eos_token_ids)
        self.support = [i for i, s in enumerate(strings) if i > 2 and counts[s] == 1 and "\ufffd" not in s]
        self.id_of = {strings[i]: i for i in self.support}
        self.text_of = strings
        self.copy, self.ret, self.scripted = (self.marker(w) for w in (COPY, RETURN, SCRIPT))
        self._off = torch.full((VOCAB,), NEG)
        self._off[self.support] = 0.0
        self._cache: dict[int, torch.Tensor] = {}

    def marker(self, word: str) -> int:
        (token,) = self.tok.encode(word)
        return token

    def _base(self, last: int) -> torch.Tensor:
        base = self._cache.get(last)
        if base is None:
            g = torch.Generator().manual_seed(last)
            base = self._cache[last] = torch.where(self._off == 0, torch.rand(VOCAB, generator=g) * 2.0 + 1.0,
                                                   self._off)
        return base

    def logits(self, context) -> torch.Tensor:
        logits = self._base(context[-1]).clone()
        if self.copy in context and context[-1] in self.id_of.values():
            logits[context[-1]] = 4.0
        if self.ret in context:
            logits[self.eos] = 10.0
        if self.script and self.scripted in context:
            logits[self._next_in_script(context)] = 20.0
        return logits

    def _next_in_script(self, context) -> int:
        tail = self.tok.decode(list(context[-4 * len(self.script):]), skip_special_tokens=False)
        done = max(k for k in range(min(len(tail), len(self.script)) + 1) if tail.endswith(self.script[:k]))
        rest = self.script[done:]
        if not rest:
            return self.eos
        return max((i for i in self.support if rest.startswith(self.text_of[i])), key=lambda i: len(self.text_of[i]))

    def logprobs(self, context) -> torch.Tensor:
        return torch.log_softmax(self.logits(list(context)), dim=-1)

    def ids(self, token_strings: list[str]) -> list[int]:
        """The token ids of a response's token strings (each names one supported token)."""
        return [self.id_of[s] for s in token_strings]

    def greedy(self, prompt: list[int], max_tokens: int, *, logit_bias: dict[int, float] | None = None,
               presence: float = 0.0, frequency: float = 0.0, repetition: float = 1.0, min_tokens: int = 0,
               stop_at_eos: bool = True) -> list[int]:
        """Greedy decoding with vLLM's logits adjustments, one token at a time in plain Python."""
        out: list[int] = []
        while len(out) < max_tokens:
            logits = self.logits(prompt + out)
            if len(out) < min_tokens:
                logits[self.eos] = float("-inf")
            for t, b in (logit_bias or {}).items():
                logits[t] += b
            seen = Counter(out)
            for t in set(prompt) | set(out):
                if repetition != 1.0:
                    logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
            for t, c in seen.items():
                logits[t] -= frequency * c + presence
            token = int(logits.argmax())
            out.append(token)
            if token == self.eos and stop_at_eos:
                break
        return out

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


@contextlib.contextmanager
def toy_server(json_schema: str | None = None, max_context: int = 512, script: str = "", **config):
    """A live server (http_fakes.Live: .url, .engine, .toy) over a real engine running the toy model,
    with a prefix cache (the suite repeats its prompts: answers must not change when they are cached)."""
    tok = tokenizer()
    toy = Toy(tok, script)
    engine = LLMEngine(ContextRunner(toy.logits, VOCAB, num_blocks=256, block_size=16), tok,
                       EngineConfig(max_context=max_context, json_schema=json_schema,
                                    **{"prefix_cache": "radix", **config}), MODEL)
    engine.start()
    try:
        with serving(engine, name=MODEL, tokenizer=tok) as live:
            live.toy = toy
            yield live
    finally:
        engine.shutdown()


class Api:
    """The openai SDK against `url` in one of MODES. `chat` and `complete` give back the SDK's
    ChatCompletion / Completion whatever the mode: streamed chats through the SDK's own stream
    helper (`chat.completions.stream(...).get_final_completion()`, which reassembles content,
    logprobs and tool calls), streamed completions reassembled here from their chunks."""

    def __init__(self, url: str, mode: str):
        self.base, self.mode = url + "/v1", mode
        self.streamed = mode in STREAMED
        self._sync: openai.OpenAI | None = None
        self._async: openai.AsyncOpenAI | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # An SDK client takes ~0.1-0.2 s to build: each Api keeps one of each kind (the async one on
    # its own event loop), until close().
    def sync_client(self) -> openai.OpenAI:
        if self._sync is None:
            self._sync = openai.OpenAI(base_url=self.base, api_key="x", max_retries=0, timeout=60)
        return self._sync

    def run(self, make_coro):
        """Runs `make_coro(async_client)` on this Api's event loop; its result."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._async = openai.AsyncOpenAI(base_url=self.base, api_key="x", max_retries=0, timeout=60)
        return self._loop.run_until_complete(make_coro(self._async))

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
        if self._loop is not None:
            self._loop.run_until_complete(self._async.close())
            self._loop.close()
        self._sync = self._async = self._loop = None

    def _opts(self, kw: dict) -> dict:
        kw.setdefault("model", MODEL)
        if self.streamed:
            kw["stream_options"] = {"include_usage": True}
        return kw

    def chat(self, **kw):
        kw = self._opts(kw)
        if self.mode == "sync":
            return self.sync_client().chat.completions.create(**kw)
        if self.mode == "stream":
            with self.sync_client().chat.completions.stream(**kw) as s:
                return final(s.get_final_completion)

        async def run(c):
            if self.mode == "async":
                return await c.chat.completions.create(**kw)
            async with c.chat.completions.stream(**kw) as s:
                try:
                    return await s.get_final_completion()
                except openai.LengthFinishReasonError as e:   # the helper's parsing; the completion stands
                    return e.completion
        return self.run(run)

    def complete(self, **kw) -> Completion:
        kw = self._opts(kw)
        if self.mode == "sync":
            return self.sync_client().completions.create(**kw)
        if self.mode == "stream":
            return collect_completion(list(self.sync_client().completions.create(stream=True, **kw)))

        async def run(c):
            if self.mode == "async":
                return await c.completions.create(**kw)
            return collect_completion([ch async for ch in await c.completions.create(stream=True, **kw)])
        return self.run(run)


@contextlib.contextmanager
def apis(url: str, modes=MODES):
    """{mode: Api} for `modes`, closed on exit (a test module's fixture holds them)."""
    out = {m: Api(url, m) for m in modes}
    try:
        yield out
    finally:
        for a in out.values():
            a.close()


def final(get):
    """The stream helper's final completion (it raises for finish_reason "length", holding it)."""
    try:
        return get()
    except openai.LengthFinishReasonError as e:
        return e.completion


def collect_completion(chunks: list[Completion]) -> Completion:
    """One Completion from a completions stream's chunks (text, logprobs and finish reason per
    choice index; the usage chunk's usage)."""
    choices: dict[int, dict] = {}
    usage = None
    for ch in chunks:
        usage = ch.usage or usage
        for c in ch.choices:
            acc = choices.setdefault(c.index, {"index": c.index, "text": "", "finish_reason": None, "logprobs": None})
            acc["text"] += c.text
            acc["finish_reason"] = c.finish_reason or acc["finish_reason"]
            if c.logprobs is not None:
                lp = acc["logprobs"] = acc["logprobs"] or {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                          "text_offset": []}
                for key in lp:
                    lp[key] += getattr(c.logprobs, key) or []
    assert chunks and usage is not None, "a stream with include_usage ends with a usage chunk"
    assert all(c["finish_reason"] for c in choices.values()), "every streamed choice ends with a finish reason"
    # built as the SDK builds a response (no validation: OpenAI's own types have no null logprobs,
    # which echo's first token carries, in vLLM's shape as in OpenAI's)
    return Completion.construct(**{"id": chunks[0].id, "object": "text_completion", "created": chunks[0].created,
                                      "model": chunks[0].model, "usage": usage.model_dump(),
                                  "choices": [choices[i] for i in sorted(choices)]})
