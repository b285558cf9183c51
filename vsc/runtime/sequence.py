"""Per-request state the engine keeps between steps.

`token_ids` holds the prompt followed by the output so far; `num_computed` of them are
already in the KV cache. A sequence is waiting (not in the cache), running (has blocks)
or finished. Preemption by recompute just frees its blocks and sets `num_computed` to 0:
the next prefill re-runs prompt + output, so no generated token is lost.
"""
from __future__ import annotations

import enum
from typing import Any

import torch

from vsc.runtime.api import GenerateRequest, SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    __slots__ = (
        "request_id", "token_ids", "num_prompt_tokens", "params", "arrival_time", "status",
        "block_table", "num_computed", "generator", "detokenizer", "queue", "loop",
        "finish_reason", "first_token_time", "last_token_time", "num_preemptions", "scheduled_time",
        "constraint", "draft_ids", "spec", "prediction_accepted", "prediction_rejected", "counts",
        "prompt_lp", "parent",
    )

    def __init__(self, request: GenerateRequest, detokenizer: Any = None, device: str | torch.device = "cpu"):
        self.request_id = request.request_id
        self.token_ids: list[int] = list(request.prompt_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params: SamplingParams = request.params
        self.arrival_time = request.arrival_time
        self.status = SeqStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0
        # Only seeded requests get their own generator: then their draws depend on
        # nothing else in the batch.
        seed = request.params.seed
        self.generator: torch.Generator | None = None
        if seed is not None and not request.params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        self.detokenizer = detokenizer
        self.queue: Any = None       # asyncio.Queue of TokenEvents (set by the engine)
        self.loop: Any = None        # the event loop that owns `queue`
        self.finish_reason: str | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.scheduled_time: float | None = None     # when the scheduler first took it from the waiting queue
        self.num_preemptions = 0
        # json mode: a vsc.runtime.constrain.Constraint (masks this row's logits, advanced by
        # each sampled token); None for unconstrained requests
        self.constraint: Any = None
        # speculative decoding (vsc.runtime.speculative): the tokens proposed to follow the
        # last one, verified in the next step, and the proposer's per-sequence state
        self.draft_ids: list[int] = []
        self.spec: Any = None
        # predicted outputs: drafts from the request's prediction accepted / rejected
        self.prediction_accepted = 0
        self.prediction_rejected = 0
        # penalties (vsc.runtime.penalties.TokenCounts): output-token counts as a tensor, set by the
        # engine for a request that uses a penalty; None otherwise
        self.counts: Any = None
        # prompt logprobs (SamplingParams.prompt_logprobs): entry i scores prompt token i (None for
        # the first, and until the step that computes its row); None when not asked for
        self.prompt_lp: list[Any] | None = None
        if request.params.prompt_logprobs is not None:
            self.prompt_lp = [None] * self.num_prompt_tokens
        # GenerateRequest.fork_of: the live sequence with the same prompt whose computed prompt
        # blocks this one shares at admission (then None)
        self.parent: Sequence | None = None

    @property
    def needs_prompt_rows(self) -> bool:
        """The prompt's logits rows are still wanted (prompt logprobs asked for, prefill not done):
        each prompt row must be computed, not taken from the prefix cache."""
        return self.prompt_lp is not None and len(self.token_ids) == self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed}, blocks={self.block_table})")
