"""One choice of a completion response as OpenAI / vLLM shape it: logprobs, echo, prompt logprobs.

The engine reports each token's log-probability and its position's most likely tokens
(vsc.runtime.logprobs: raw model logprobs, vLLM's default `logprobs_mode`); this module
turns them into the response fields, as vLLM's OpenAI server does:

- completions `logprobs`: {tokens, token_logprobs, top_logprobs, text_offset}; each
  top_logprobs entry holds the chosen token and then the k most likely, keyed by token
  string (k + 1 entries at most); echoed prompt tokens come first, the very first with a
  null logprob and null top_logprobs;
- chat `logprobs`: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]},
  top_logprobs the first k of (chosen token, then the most likely ones);
- `prompt_logprobs` (a vLLM extension): per prompt token, null for the first, else
  {token id: {logprob, rank, decoded_token}} for the prompt token and the k most likely.

Token strings are each token decoded alone (special tokens kept), as vLLM's `decoded_token`;
logprobs are clamped at -9999.0 (JSON has no -inf), as vLLM does.
"""
from __future__ import annotations

from typing import Any

from vsc.runtime.api import TokenLogprobs

FLOOR = -9999.0


class TokenText:
    """Token id -> its text decoded alone (cached: at most one entry per vocabulary token)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            try:
                s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            except TypeError:          # a tokenizer without the keyword
                s = self.tokenizer.decode([token_id])
            self.cache[token_id] = s
        return s


def _ranked(lp: TokenLogprobs) -> list[tuple[int, float]]:
    """The chosen token, then the most likely ones (each id once), as vLLM orders them."""
    out = [(lp.token_id, lp.logprob)]
    out += [(t, v) for t, v in lp.top if t != lp.token_id]
    return out


def _clamp(v: float) -> float:
    return v if v > FLOOR else FLOOR


class Choice:
    """One choice being collected (or streamed): its tokens, text and logprobs so far."""

    __slots__ = ("index", "chat", "logprobs", "echo", "echo_only", "prompt_text", "prompt_ids", "prompt_k",
                 "text_len", "token_ids", "lps", "prompt_lps", "parts", "finish_reason", "cumulative",
                 "completion_tokens")

    def __init__(self, index: int, chat: bool, logprobs: int | None, echo: bool, echo_only: bool,
                 prompt_text: str, prompt_ids: list[int], prompt_k: int | None):
        self.index, self.chat, self.logprobs = index, chat, logprobs
        self.echo, self.echo_only = echo, echo_only
        self.prompt_text, self.prompt_ids, self.prompt_k = prompt_text, prompt_ids, prompt_k
        self.text_len = 0               # characters of text sent so far (completions text_offset)
        self.token_ids: list[int] = []
        self.lps: list[TokenLogprobs | None] = []
        self.prompt_lps: list[TokenLogprobs | None] | None = None
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.cumulative = 0.0           # sum of the sampled tokens' logprobs (best_of ranks by it)
        self.completion_tokens = 0

    @property
    def detailed(self) -> bool:
        """Chunks need more than the text (the fast streaming path does not apply)."""
        return self.logprobs is not None or self.echo or self.prompt_k is not None

    def add(self, token_ids: list[int], text: str, lps: list[TokenLogprobs] | None,
            prompt_lps: list[TokenLogprobs | None] | None) -> tuple[str, list[int], list[Any]]:
        """Record one event; returns what this event shows: (text, token ids, logprobs entries),
        the echoed prompt included on the first."""
        if not (lps or prompt_lps or self.echo):     # plain text (most requests)
            self.completion_tokens += len(token_ids)
            self.parts.append(text)
            entries = [None] * len(token_ids)
            if self.logprobs is not None:           # asked for, but this engine reports none
                self.token_ids.extend(token_ids)
                self.lps.extend(entries)
            return text, token_ids, entries
        if prompt_lps is not None:
            self.prompt_lps = prompt_lps
        if lps:
            self.cumulative += sum(lp.logprob for lp in lps)
        self.completion_tokens += len(token_ids)
        entries: list[Any] = list(lps) if lps else [None] * len(token_ids)
        if self.echo_only:              # max_tokens 0 with echo: the prompt alone, once
            token_ids, text, entries = [], "", []
        if self.echo and not self.parts:
            prompt_entries = self.prompt_lps if self.prompt_lps is not None else [None] * len(self.prompt_ids)
            token_ids = self.prompt_ids + token_ids
            text = self.prompt_text + text
            entries = list(prompt_entries) + entries
        self.parts.append(text)
        self.token_ids.extend(token_ids)
        self.lps.extend(entries)
        return text, token_ids, entries

    def logprobs_json(self, tok: TokenText, token_ids: list[int], entries: list[Any]) -> dict | None:
        """The `logprobs` field for these tokens (None when the request did not ask)."""
        if self.logprobs is None:
            return None
        k = self.logprobs
        if self.chat:
            content = []
            for token_id, lp in zip(token_ids, entries):
                s = tok(token_id)
                item: dict[str, Any] = {"token": s, "logprob": _clamp(lp.logprob) if lp else FLOOR,
                                        "bytes": list(s.encode("utf-8", errors="replace")), "top_logprobs": []}
                if lp is not None and k:
                    item["top_logprobs"] = [{"token": (t := tok(i)), "logprob": _clamp(v),
                                             "bytes": list(t.encode("utf-8", errors="replace"))}
                                            for i, v in _ranked(lp)[:k]]
                content.append(item)
            return {"content": content}
        tokens, values, tops, offsets = [], [], [], []
        offset = self.text_len
        for token_id, lp in zip(token_ids, entries):
            s = tok(token_id)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            if lp is None:
                values.append(None)
                tops.append(None)
            else:
                values.append(_clamp(lp.logprob))
                tops.append({tok(i): _clamp(v) for i, v in _ranked(lp)[:k + 1]})
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def prompt_logprobs_json(self, tok: TokenText) -> list | None:
        """vLLM's `prompt_logprobs` (None when not asked for)."""
        if self.prompt_k is None or self.prompt_lps is None:
            return None
        out: list[dict | None] = []
        for lp in self.prompt_lps:
            if lp is None:
                out.append(None)
                continue
            entry = {str(lp.token_id): {"logprob": _clamp(lp.logprob), "rank": lp.rank,
                                        "decoded_token": tok(lp.token_id)}}
            for rank, (i, v) in enumerate(lp.top[:self.prompt_k], start=1):
                entry.setdefault(str(i), {"logprob": _clamp(v), "rank": rank, "decoded_token": tok(i)})
            out.append(entry)
        return out
