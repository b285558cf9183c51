"""Speculative decoding: guess k tokens cheaply, check them all in one forward pass of the model.

A decoding sequence normally gets one new token per step. With speculation its step also
carries d <= k *draft* tokens after its last token; the runner returns logits at all 1 + d
positions (`StepBatch.logits_rows`), the engine's sampler picks the model's own token at
each position, and the sequence keeps the drafts up to the first one that differs from
the model's pick, plus the model's pick there (or after the last draft): 1 to d + 1
tokens for one step. Outputs are exactly plain decoding's:

- greedy: the model's pick is its argmax, so every kept draft is the token plain decoding
  would have produced at that position, and so is the final pick;
- sampled: the drafts are deterministic (a draft distribution q that is one-hot on the
  draft x), for which the standard rule (Leviathan et al., Chen et al.) is: accept x with
  probability min(1, p(x) / q(x)) = p(x), on rejection sample from (p - q)+ renormalised,
  i.e. from p with x removed. The engine realises it by drawing the model's token y ~ p at
  the position with the sampler's own noise (the exponential race, vsc.runtime.sampler)
  and accepting x iff y == x: that happens with probability p(x), and given y != x, y is
  distributed as p restricted to the other tokens. `p` is after the sampler's temperature,
  top-k and top-p. Because y is drawn from the same per-request noise that plain decoding
  would draw at that position (the generator is rewound past the positions a rejection
  made moot, `rewind`), a seeded request gets the very same tokens with and without
  speculation, whatever else shares its batch.

Drafts whose tokens were rejected leave KV in cache slots past the kept tokens; the
sequence's `num_computed` counts only kept tokens, so later steps overwrite those slots.

Where drafts come from (`make_proposer`):

- "prompt-lookup" (Saxena's prompt lookup decoding): the last n tokens (n = `ngram` down
  to 1, longest first) are looked up in the prompt; the tokens that followed the first
  occurrence there are the drafts. Pays when outputs copy the prompt (code edits,
  extraction, summaries that quote).
- "ngram": the same over the whole context, prompt and output so far, most recent
  occurrence first; the drafts continue past the end of the context periodically, so a
  generation that fell into a loop is drafted k tokens at a time.
- "draft": a small model with the target's vocabulary runs k greedy decode steps
  (`DraftModelProposer`); its KV cache uses the target's block tables.
- a json-mode request's grammar (jump-forward): the tokens the grammar forces next (keys,
  punctuation, enum prefixes; llguidance's fast-forward tokens) are its drafts, up to
  JUMP_FORWARD_K. They are verified like any draft, every row masked by the grammar state
  after the drafts before it, so the output is token-by-token constrained decoding's; a
  constrained request is drafted from nothing else.
- a request's own *predicted output* (OpenAI's `prediction` field: the text the answer is
  expected to be, e.g. the code before an edit), `PredictionProposer`: the drafts are the
  prediction's tokens from where the output has got to in it. Whatever the plan's method,
  a request that carries a prediction is drafted from it (runs of up to PREDICTION_K tokens,
  or the plan's k when larger, adapted per request); a plan whose method is "prediction"
  drafts nothing else.

Both look-ups keep a per-sequence index (n-gram -> position) that is extended by the new
tokens only, so a step costs O(new tokens * ngram + k), not O(context).

This module is runtime: it never imports the compiler.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch

from vsc.runtime.api import StepBatch
from vsc.runtime.enums import SPECULATIVE_METHODS

METHODS = SPECULATIVE_METHODS


# --- acceptance ----------------------------------------------------------------------------


def accepted_length(drafts: list[int], picks: list[int]) -> int:
    """How many leading drafts the model agrees with: drafts[j] == picks[j] for every j below it.

    `picks[j]` is the model's own token at draft j's position (argmax when greedy, its
    sample when not; see the module docstring for why that is the acceptance rule).
    """
    accepted = 0
    for draft, pick in zip(drafts, picks):
        if draft != pick:
            break
        accepted += 1
    return accepted


def verify(drafts: list[int], picks: list[int]) -> tuple[list[int], int]:
    """(tokens the step emits, number of drafts accepted) for one sequence.

    `picks` has len(drafts) + 1 entries: the model's token after the sequence's last token
    and after each draft. The emitted tokens are the accepted drafts followed by the
    model's pick at the first rejected position (or the bonus pick after the last draft).
    """
    if len(picks) != len(drafts) + 1:
        raise ValueError(f"need one pick per draft plus one, got {len(picks)} picks for {len(drafts)} drafts")
    accepted = accepted_length(drafts, picks)
    return drafts[:accepted] + [picks[accepted]], accepted


def rewind(generator: torch.Generator, state: torch.Tensor, draws: int, vocab: int) -> None:
    """Reset a seeded request's generator to `state` and replay `draws` rows of sampler noise.

    The sampler drew one row of `vocab` uniforms per verified position; only the positions
    whose tokens were emitted would have been drawn by plain decoding, so the generator is
    left exactly where plain decoding would have left it.
    """
    generator.set_state(state)
    scratch = torch.empty(vocab, dtype=torch.float32, device=generator.device)     # as the sampler's noise rows
    for _ in range(draws):
        scratch.uniform_(generator=generator)


# --- proposers -----------------------------------------------------------------------------


def draft_limit(seq: Any, k: int, max_context: int) -> int:
    """Most drafts worth proposing for `seq` this step: k, but none past max_tokens or max_context
    (a step emits at most drafts + 1 tokens)."""
    left_tokens = seq.params.max_tokens - seq.num_output_tokens - 1
    left_context = max_context - seq.num_tokens - 1
    return max(0, min(k, left_tokens, left_context))


def wants_drafts(seq: Any) -> bool:
    """Whether `seq` is decoding and may be drafted: its only uncomputed token is the last one.
    (A constrained sequence is drafted only with the tokens its grammar forces: jump-forward.)"""
    return seq.num_computed == seq.num_tokens - 1


#: Most grammar-forced tokens one step appends for a constrained sequence (jump-forward).
JUMP_FORWARD_K = 32


class _NgramIndex:
    """n-gram (as a tuple, n = 1..max_n) -> end position of one occurrence in a token list.

    `add(tokens, upto)` indexes every occurrence ending at positions below `upto` that is
    not indexed yet. `latest=True` keeps the most recent occurrence, else the first.
    """

    __slots__ = ("max_n", "latest", "table", "done")

    def __init__(self, max_n: int, latest: bool):
        self.max_n = max_n
        self.latest = latest
        self.table: dict[tuple[int, ...], int] = {}
        self.done = 0                   # end positions 1..done are indexed

    def add(self, tokens: list[int], upto: int) -> None:
        table, max_n, latest = self.table, self.max_n, self.latest
        for end in range(self.done + 1, upto):
            for n in range(1, min(max_n, end) + 1):
                key = tuple(tokens[end - n:end])
                if latest or key not in table:
                    table[key] = end
        self.done = max(self.done, upto - 1)

    def find(self, tokens: list[int]) -> int | None:
        """End position of the longest indexed n-gram equal to the tail of `tokens`."""
        table = self.table
        for n in range(min(self.max_n, len(tokens)), 0, -1):
            end = table.get(tuple(tokens[-n:]))
            if end is not None:
                return end
        return None


class NgramProposer:
    """Drafts by looking the context's last n tokens up in earlier text (see the module docstring).

    prompt_only=True is prompt-lookup: only the prompt is searched (first occurrence) and
    drafts are the prompt tokens that followed; else the whole context is (most recent
    occurrence first) and drafts may run past the end of the context periodically.
    """

    needs_fill = False

    def __init__(self, k: int, ngram: int, prompt_only: bool):
        if k < 1 or ngram < 1:
            raise ValueError(f"speculative decoding needs k >= 1 and ngram >= 1, got k={k}, ngram={ngram}")
        self.k = k
        self.ngram = ngram
        self.prompt_only = prompt_only

    def propose(self, seq: Any, limit: int) -> list[int]:
        """Up to `limit` draft tokens to follow seq.token_ids ([] when nothing matches)."""
        if limit <= 0:
            return []
        tokens = seq.token_ids
        index = seq.spec
        if not isinstance(index, _NgramIndex):
            index = seq.spec = _NgramIndex(self.ngram, latest=not self.prompt_only)
        if self.prompt_only:
            prompt = seq.num_prompt_tokens
            if index.done == 0:
                index.add(tokens, prompt)           # occurrences with at least one prompt token after them
            end = index.find(tokens)
            return [] if end is None else tokens[end:min(end + limit, prompt)]
        index.add(tokens, len(tokens))          # every occurrence before the tail itself
        end = index.find(tokens)
        if end is None:
            return []
        drafts: list[int] = []
        size = len(tokens)
        for j in range(limit):
            at = end + j
            drafts.append(tokens[at] if at < size else drafts[at - size])
        return drafts

    def accepted(self, seq: Any, drafted: int, accepted: int) -> None:
        """Verification result (the index needs nothing)."""


# --- when drafting pays ---------------------------------------------------------------------


class SpecGate:
    """Whether guessed drafts pay on this machine and plan, from measured steps.

    A step with drafts verifies them through the prefill path, which may cost several decode
    steps (a compiled decode step against the eager verify, or a compute-bound batch where
    every draft costs a token's work). The gate keeps EWMAs of output tokens per second of
    decode-only steps and of steps with drafts; drafting stays on while the latter is at least
    the former. Either estimate is refreshed by a probe every PROBE_EVERY steps: one step with
    drafts while drafting is off, one without while it is on. No data yet: drafting is on.
    (Grammar-forced jump-forward drafts are never wasted and not gated.)
    """

    PROBE_EVERY = 32
    ALPHA = 0.25

    def __init__(self):
        self.plain_rate: float | None = None      # tokens / s of decode-only steps
        self.draft_rate: float | None = None      # tokens / s of steps that carried drafts
        self.steps = 0

    def drafting(self) -> bool:
        """Whether the next step may carry guessed drafts (advances the probe counter)."""
        self.steps += 1
        on = self.plain_rate is None or self.draft_rate is None or self.draft_rate >= self.plain_rate
        if self.steps % self.PROBE_EVERY == 0:
            return not on
        return on

    def observe(self, drafted: bool, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        if drafted:
            self.draft_rate = rate if self.draft_rate is None else self.draft_rate + self.ALPHA * (rate - self.draft_rate)
        else:
            self.plain_rate = rate if self.plain_rate is None else self.plain_rate + self.ALPHA * (rate - self.plain_rate)


# --- predicted outputs ---------------------------------------------------------------------

#: Longest run drafted from a request's prediction (the plan's k when larger), and the first.
PREDICTION_K = 16
PREDICTION_K_FIRST = 8
#: Longest output tail looked up in the prediction to find where the output is in it again.
PREDICTION_NGRAM = 8


class _Alignment:
    """Where a sequence's output stands in its prediction.

    `at`: the prediction position the next output token should match (None: lost, after an
    edit the model made); `seen`: output tokens accounted for; `anchor`: the last position
    known to be in step, where a re-synchronisation prefers to land; `k`: the next run's
    length; `index`: n-gram of the prediction -> end positions, ascending (n = 1..8)."""

    __slots__ = ("pred", "index", "at", "seen", "anchor", "k")

    def __init__(self, pred: list[int], k: int):
        self.pred = pred
        self.index: dict[tuple[int, ...], list[int]] = {}
        for end in range(1, len(pred) + 1):
            for n in range(1, min(PREDICTION_NGRAM, end) + 1):
                self.index.setdefault(tuple(pred[end - n:end]), []).append(end)
        self.at: int | None = 0
        self.seen = 0
        self.anchor = 0
        self.k = k

    def follow(self, output: list[int]) -> None:
        """Account for the output tokens since the last call: in step while they equal the
        prediction; once one differs, find the longest output tail that occurs in the
        prediction (the nearest occurrence at or after the anchor, else the first) and
        continue after it, as a diff re-synchronises after an edit."""
        pred = self.pred
        for token in output[self.seen:]:
            if self.at is not None and self.at < len(pred) and pred[self.at] == token:
                self.at += 1
                self.anchor = self.at
            else:
                self.at = None
        self.seen = len(output)
        if self.at is not None or not output:
            return
        for n in range(min(PREDICTION_NGRAM, len(output)), 0, -1):
            ends = self.index.get(tuple(output[-n:]))
            if ends:
                i = bisect.bisect_left(ends, self.anchor)
                self.at = ends[i] if i < len(ends) else ends[0]
                return


class PredictionProposer:
    """Drafts from each request's predicted output (SamplingParams.prediction, token ids).

    Runs start at PREDICTION_K_FIRST tokens, double while every draft is accepted (up to
    `k`), and halve (not below 2) when one is rejected: a rejection means the model made an
    edit, after which the output usually rejoins the prediction further on.
    """

    needs_fill = False

    def __init__(self, k: int = PREDICTION_K):
        if k < 1:
            raise ValueError(f"predicted outputs need k >= 1, got {k}")
        self.k = k

    @staticmethod
    def applies(seq: Any) -> bool:
        return bool(seq.params.prediction)

    def _state(self, seq: Any) -> _Alignment:
        state = seq.spec
        if not isinstance(state, _Alignment):
            state = seq.spec = _Alignment(list(seq.params.prediction), min(self.k, PREDICTION_K_FIRST))
        return state

    def propose(self, seq: Any, limit: int) -> list[int]:
        state = self._state(seq)
        state.follow(seq.output_ids)
        if limit <= 0 or state.at is None:
            return []
        return state.pred[state.at:state.at + min(limit, state.k)]

    def accepted(self, seq: Any, drafted: int, accepted: int) -> None:
        state = self._state(seq)
        state.k = min(self.k, state.k * 2) if accepted == drafted else max(2, state.k // 2)


# --- draft model ---------------------------------------------------------------------------


@dataclass
class _DraftState:
    computed: int = 0          # tokens of the sequence whose draft-model KV is in the cache
    preemptions: int = 0       # seq.num_preemptions when `computed` was last valid


class DraftModelProposer:
    """Drafts from a small model (same vocabulary) run greedily for k steps.

    The draft runner (a generated ModelRunner of the draft model, with a KV cache of the
    target's block geometry) writes its KV to the same slots as the target: the sequence's
    block table. Before drafting, a sequence's draft KV catches up with its tokens (the
    whole prompt the first time, afterwards the one or two tokens the last step kept), then
    d - 1 decode steps give drafts 1..d-1. Blocks for the drafts are allocated by the
    scheduler first, so drafting runs after scheduling: `reserve` puts placeholder drafts
    on the sequence (the scheduler trims them to the budget), `fill` replaces them with
    the draft model's tokens. A preempted sequence lost its blocks, so its draft KV is
    recomputed from the start.
    """

    needs_fill = True

    def __init__(self, k: int, runner: Any):
        if k < 1:
            raise ValueError(f"speculative decoding needs k >= 1, got {k}")
        if runner is None:
            raise ValueError("speculative method 'draft' needs a draft runner (the server folder's draft_model.py)")
        self.k = k
        self.runner = runner
        self.block_size = runner.cache_config.block_size
        self.device = torch.device(getattr(runner, "device", "cpu"))

    def propose(self, seq: Any, limit: int) -> list[int]:
        """Placeholders for up to `limit` drafts; `fill` computes them after scheduling."""
        return [0] * max(0, limit)

    def fill(self, seqs: list[Any], counts: list[int]) -> None:
        """Run the draft model: seqs[i].draft_ids[:counts[i]] become its greedy tokens."""
        work = [(s, d) for s, d in zip(seqs, counts) if d > 0]
        if not work:
            return
        entries = []
        for seq, _ in work:
            state = seq.spec
            if not isinstance(state, _DraftState) or state.preemptions != seq.num_preemptions:
                state = seq.spec = _DraftState(0, seq.num_preemptions)
            start = min(state.computed, seq.num_tokens - 1)
            entries.append((seq.token_ids[start:], start, seq.block_table))
        last = self._step(entries)
        for (seq, _), token in zip(work, last):
            seq.draft_ids[0] = token
        for j in range(1, max(d for _, d in work)):
            live = [(i, seq) for i, (seq, d) in enumerate(work) if d > j]
            last = self._step([([seq.draft_ids[j - 1]], seq.num_tokens - 1 + j, seq.block_table) for _, seq in live])
            for (_, seq), token in zip(live, last):
                seq.draft_ids[j] = token
        for seq, d in work:
            seq.spec.computed = seq.num_tokens + d - 1     # the last token and drafts 0..d-2

    def accepted(self, seq: Any, drafted: int, accepted: int) -> None:
        """After verification: the draft KV of rejected drafts is stale."""
        state = seq.spec
        if isinstance(state, _DraftState) and drafted:
            # the sequence now holds old + accepted + 1 tokens; drafts 0..min(a, d-1)-1 were fed
            # and kept, the newest token was not fed
            state.computed = min(state.computed, seq.num_tokens - 1 - accepted + min(accepted, drafted - 1))

    def _step(self, entries: list[tuple[list[int], int, list[int]]]) -> list[int]:
        """One draft-runner step: entry (tokens, first position, block table) per sequence;
        returns each sequence's greedy next token."""
        batch = build_batch(entries, self.block_size, self.device)
        runner = self.runner
        logits = runner.decode(batch) if batch.is_decode else runner.prefill(batch)
        return logits.argmax(dim=-1).tolist()


def build_batch(entries: list[tuple[list[int], int, list[int]]], block_size: int,
                device: str | torch.device = "cpu") -> StepBatch:
    """A StepBatch for sequences given as (new tokens, position of the first, block table)."""
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start = [0]
    context: list[int] = []
    width = max(len(table) for _, _, table in entries)
    tables: list[int] = []
    for new, start, table in entries:
        tokens += new
        end = start + len(new)
        positions += range(start, end)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        query_start.append(query_start[-1] + len(new))
        context.append(end)
        tables += table + [0] * (width - len(table))
    flat = torch.tensor(tokens + positions + slots + query_start + context + tables, dtype=torch.int64)
    flat = flat.to(device)
    t, b = len(tokens), len(entries)
    o = 3 * t
    return StepBatch(
        tokens=flat[:t], positions=flat[t:2 * t], slot_mapping=flat[2 * t:o],
        query_start=flat[o:o + b + 1], context_lens=flat[o + b + 1:o + 2 * b + 1],
        block_tables=flat[o + 2 * b + 1:].view(b, width), is_decode=t == b,
        query_lens_host=[len(new) for new, _, _ in entries], context_lens_host=context)


def prediction_proposer(method: str, k: int) -> PredictionProposer:
    """The proposer for requests that carry a prediction, whatever the plan's method: runs of up
    to PREDICTION_K tokens, or the plan's k when larger."""
    return PredictionProposer(max(PREDICTION_K, k if method not in ("none", "", None) else 0))


def make_proposer(method: str, k: int, ngram: int = 3, draft_runner: Any = None):
    """The proposer for an EngineConfig's speculative settings (None when method is "none")."""
    if method in ("none", "", None) or k <= 0:
        return None
    if method == "ngram":
        return NgramProposer(k, ngram, prompt_only=False)
    if method == "prompt-lookup":
        return NgramProposer(k, ngram, prompt_only=True)
    if method == "draft":
        return DraftModelProposer(k, draft_runner)
    if method == "prediction":
        return None         # requests with a prediction are drafted from it (prediction_proposer)
    raise ValueError(f"unknown speculative method {method!r} (one of {', '.join(METHODS)})")
