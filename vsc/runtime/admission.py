"""Admission by the TTFT objective (EngineConfig.overload = "shed").

A request is refused up front (429 + Retry-After) when the server predicts that its first
token would come later than the deployment's TTFT objective: answering at once lets a
client retry elsewhere or later, where a queued request would wait seconds for a reply
that misses the objective anyway (a 300-request burst on a 16-row plan queued up to ~12 s).

The prediction, from what the engine measured (exponential moving averages):

    ttft = slot_steps * step_s + (prompt tokens ahead + this prompt) / prefill_tps

- `step_s`: the wall time of an engine step; `prefill_tps`: prompt tokens per second of the
  steps that prefilled at least MIN_PROMPT_TOKENS tokens (a whole step's time over its prompt
  tokens: decodes sharing the step count against it, which keeps the estimate on the safe side).
- prompt tokens ahead: what running sequences have not prefilled yet, plus the prompts of the
  waiting requests scheduled before this one (all of them for fcfs; those no longer than this
  one for shortest-first).
- `slot_steps`: steps until a batch row frees up for this request: each running sequence
  holds its row for its expected remaining output, each waiting request ahead takes the first
  row to free up for its expected output; a request's expected output is its max_tokens, or
  fewer once finished requests have measured an average (`output_tokens`).

Before both step measures exist (a fresh server) every request is admitted: the first steps
are what measures them.
"""
from __future__ import annotations

import heapq
import math
from typing import Iterable

from vsc.runtime.policy import MIN_QUEUE, QUEUE_PER_BATCH_ROW, queue_bound  # noqa: F401  (re-exported)
from vsc.runtime.sequence import Sequence


class TTFTPredictor:
    ALPHA = 0.2                # weight of the newest observation
    MIN_PROMPT_TOKENS = 16     # prompt tokens below which a step says little about prefill speed

    def __init__(self) -> None:
        self.step_s: float | None = None          # seconds per engine step
        self.prefill_tps: float | None = None     # prompt tokens per second of prefilling steps
        self.output_tokens: float | None = None   # output tokens of a finished request

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.ALPHA) * old + self.ALPHA * new

    # --- measurements (engine thread) ------------------------------------------------

    def observe_step(self, prompt_tokens: int, seconds: float) -> None:
        """One step's wall time and how many prompt tokens it prefilled."""
        if seconds <= 0:
            return
        self.step_s = self._mix(self.step_s, seconds)
        if prompt_tokens >= self.MIN_PROMPT_TOKENS:
            self.prefill_tps = self._mix(self.prefill_tps, prompt_tokens / seconds)

    def observe_finished(self, seqs: Iterable[Sequence]) -> None:
        """Requests that finished normally (stop / length): how long outputs run."""
        for seq in seqs:
            self.output_tokens = self._mix(self.output_tokens, float(max(1, seq.num_output_tokens)))

    # --- the prediction (any thread) --------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.step_s is not None and self.prefill_tps is not None

    def _expected_output(self, seq: Sequence) -> float:
        left = max(1, seq.params.max_tokens - seq.num_output_tokens)
        if self.output_tokens is None:
            return left
        return min(left, max(1.0, self.output_tokens - seq.num_output_tokens))

    def predict(self, running: list[Sequence], waiting: list[Sequence], prompt_len: int, max_batch: int,
                shortest_first: bool = False) -> float | None:
        """Predicted seconds to the first token of a new request with `prompt_len` prompt tokens
        behind `running` and `waiting` (in scheduling order); None before the measurements exist."""
        if not self.ready:
            return None
        ahead = [s for s in waiting if s.num_tokens <= prompt_len] if shortest_first else waiting
        prompt_ahead = sum(s.num_tokens - s.num_computed for s in ahead)
        prompt_ahead += sum(n for s in running if (n := s.num_tokens - s.num_computed) > 1)   # 1: a decode
        slot_steps = 0.0
        if len(running) + len(ahead) >= max_batch:
            rows = [self._expected_output(s) for s in running[:max_batch]]
            rows += [0.0] * (max_batch - len(rows))
            heapq.heapify(rows)
            for seq in ahead:
                heapq.heapreplace(rows, rows[0] + self._expected_output(seq))
            slot_steps = rows[0]
        return slot_steps * self.step_s + (prompt_ahead + prompt_len) / self.prefill_tps


def retry_after_s(predicted: float, target: float) -> int:
    """Retry-After (whole seconds, at least 1): about when the work ahead leaves room."""
    return max(1, math.ceil(predicted - target))
