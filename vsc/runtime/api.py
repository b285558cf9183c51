"""The contracts between the parts of a generated server.

    HTTP layer  --GenerateRequest-->  Engine  --StepBatch-->  ModelRunner (generated code)
                <--TokenEvent------          <--logits------

`vsc.runtime` is what every generated server imports; it never imports the compiler.
The generated `server/model.py` provides a ModelRunner specialized to one plan; the
engine (scheduler, KV blocks, sampler, detokenizer) and the HTTP app are generic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, NamedTuple, Protocol

import torch


class RuntimeError_(Exception):
    """Base of errors the runtime reports to a client (the HTTP layer maps them to status codes)."""

    status = 400
    code = "invalid_request_error"


class InvalidRequest(RuntimeError_):
    """A request the server will never be able to serve (bad parameters, too long)."""


class QueueFull(RuntimeError_):
    """The waiting queue is at its bound: retry later (HTTP 429, Retry-After: `retry_after` s)."""

    status = 429
    code = "rate_limit_exceeded"
    reason = "queue_full"          # the /metrics label of the rejection

    def __init__(self, message: str = "", retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(QueueFull):
    """Admission predicts the request would miss the TTFT objective (overload = shed): HTTP 429."""

    reason = "ttft_slo"


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI semantics). temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0: off
    seed: int | None = None              # same seed + same request -> same tokens
    stop: list[str] = field(default_factory=list)          # stop strings (not included in output)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    json_schema: str | None = None       # json mode: the output must be JSON matching this schema (JSON
    #                                      text); None: the deployment's schema, if it has one
    prediction: list[int] | None = None  # predicted output (OpenAI `prediction`), token ids: drafts for
    #                                      speculative decoding; the output is the same without it
    text_only: bool = False              # response_format {"type": "text"}: free text even where the
    #                                      deployment has a json-mode schema
    # Logits adjustments (vLLM's definitions; vsc.runtime.penalties), applied before temperature, so
    # greedy requests see them too: min_tokens masks EOS and stop_token_ids while fewer tokens were
    # generated (and stop strings are not looked for in their text); logit_bias adds to a token's logit;
    # repetition_penalty divides a positive logit (multiplies a negative one) of every token in the
    # prompt or the output; frequency_penalty subtracts per occurrence in the output, presence_penalty
    # once per token present in it. min_p (after temperature) drops tokens below min_p x the top one's
    # probability.
    min_p: float = 0.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    include_stop_str_in_output: bool = False   # keep the stop string (or stop token's text) in the text
    # log-probabilities (vsc.runtime.logprobs), of the raw model logits (vLLM's default logprobs_mode,
    # "raw_logprobs": before temperature, penalties; after a json-mode mask): None off, else each sampled token's and
    # this many most likely tokens' (TokenEvent.logprobs); prompt_logprobs: the same for every prompt
    # token after the first (TokenEvent.prompt_logprobs, on the first event; the prompt is computed
    # whole, never taken from the prefix cache)
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Needs per-token counts of its output (and prompt): any of the three penalties is on."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Has a logits adjustment before sampling (vsc.runtime.penalties.adjust_logits)."""
        return self.penalized or self.min_tokens > 0 or bool(self.logit_bias)


@dataclass
class GenerateRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0            # time.monotonic() when the server received it
    # a copy of a request submitted just before with the same prompt (n > 1, best_of): it shares
    # that request's computed prompt blocks (fork) instead of computing the prompt again
    fork_of: str | None = None


@dataclass
class TokenEvent:
    """One step of output for one request, pushed to the request's stream in order.

    `text` is the newly detokenized text (may be "" while a multi-byte character or a
    possible stop string is held back). The last event has `finish_reason` set:
    "stop" (EOS or stop string), "length" (max_tokens or context), "abort" (cancelled),
    "error" (the step that ran it failed; the server keeps serving others).
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # predicted outputs (set on the last event of a request with a prediction): drafts taken
    # from the prediction that the model accepted / rejected so far
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    # finish_reason "error" with a cause the client may see (json mode: its grammar failed);
    # None when a step raised (an internal error)
    error: RuntimeError_ | None = None
    # set on the last event: seconds from the request's arrival to its first scheduling (its
    # time in the waiting queue; vllm:request_queue_time_seconds); None: never scheduled. A timing,
    # not part of the output: events compare equal whatever it is
    queue_seconds: float | None = field(default=None, compare=False)
    # SamplingParams.logprobs: one TokenLogprobs per token of token_ids; prompt_logprobs (first
    # event only): one per prompt token, None for the first (nothing predicts it)
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class TokenLogprobs(NamedTuple):
    """A token's log-probability under the model (log-softmax of its raw logits), its rank (1: the
    most likely), and the `k` most likely tokens of that position as (token id, logprob), best first."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class StepBatch:
    """Everything one forward step needs, as tensors on the runner's device.

    T = total new tokens in the step, B = sequences. Sequence b's new tokens are
    tokens[query_start[b]:query_start[b+1]]; after the step its KV holds
    context_lens[b] tokens (old + new). Each new token's K/V goes to cache slot
    slot_mapping[t] = block * block_size + offset; block_tables[b] lists the blocks of
    sequence b in order (padded with 0 past its last block). For a contiguous cache the
    plan's block size is max_context and each sequence owns exactly one block.
    """

    tokens: torch.Tensor          # int64 [T]
    positions: torch.Tensor       # int64 [T]
    query_start: torch.Tensor     # int64 [B + 1]
    context_lens: torch.Tensor    # int64 [B]
    block_tables: torch.Tensor    # int64 [B, max_blocks_per_seq]
    slot_mapping: torch.Tensor    # int64 [T]
    is_decode: bool = False       # every sequence has exactly one new token
    # Host copies the runner may use to avoid device syncs (same values as the tensors).
    query_lens_host: list[int] = field(default_factory=list)
    context_lens_host: list[int] = field(default_factory=list)
    # Rows of T whose logits the step returns, in order (int64 [R]); None: each sequence's
    # last token, [B, vocab]. Speculative decoding asks for every drafted position.
    logits_rows: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class CacheConfig:
    """The KV cache a plan asks for (from the IR's cache section).

    dtype torch.int8 (the kv-int8 pass) means each layer's K and V are `QuantizedKV`s of
    `vsc.runtime.kernels.torch_ops`: int8 values plus an fp32 scale per token and kv head.
    """

    layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    dtype: torch.dtype = torch.float32
    layout: str = "paged"        # "paged" | "contiguous"


@dataclass
class EngineConfig:
    """Scheduling knobs (from the IR's batching section and the deployment)."""

    max_context: int
    mode: str = "continuous"     # "continuous" | "static"
    max_batch: int = 16          # most sequences in one step
    max_tokens: int = 2048       # token budget of one step
    chunked_prefill: int = 0     # 0: off; else the most prompt tokens one sequence prefills per step
    prefill_tpot_ms: float = 0.0  # 0: off; else a step with decodes running gets only as many prompt
    #                               tokens as keep it within this TPOT by measured step costs
    order: str = "fcfs"          # "fcfs" | "shortest-first"
    preemption: str = "recompute"
    max_waiting: int = 256       # bound of the waiting queue; beyond it generate() raises QueueFull
    # vsc.runtime.enums.OVERLOAD_POLICIES: "queue" admits while the waiting queue has room; "shed"
    # also refuses (Overloaded) a request whose predicted TTFT exceeds ttft_slo_ms (vsc.runtime.admission)
    overload: str = "queue"
    ttft_slo_ms: float = 0.0
    prefix_cache: str = "none"   # "none" | "radix" (the prefix-cache pass): reuse cached KV of shared prefixes
    prefix_cache_capacity: int = 0   # most cached blocks kept that no request holds (0: any free block)
    json_schema: str | None = None   # json mode (the json-mode pass): every response is JSON matching this
    #                                  schema (JSON text) unless the request gives its own
    # speculative decoding (the speculative pass, vsc.runtime.speculative): where drafts come
    # from ("none" | "ngram" | "prompt-lookup" | "draft"), drafts per step, longest n-gram
    # looked up, and the draft model's folder (method "draft")
    speculative_method: str = "none"
    speculative_k: int = 0
    speculative_ngram: int = 3
    draft_model: str | None = None
    # most rows (one per decoding sequence plus drafts) a step with guessed drafts computes:
    # drafts fill a step up to it, shared among the sequences (0: no cap; grammar-forced
    # jump-forward tokens are not counted)
    spec_rows: int = 16
    # guessed drafts only while steps with drafts measure more tokens per second than plain
    # steps (vsc.runtime.speculative.SpecGate); False: always draft
    spec_gate: bool = True
    # jump-forward: a json-mode request's grammar-forced tokens join the next step as verified
    # drafts (vsc.runtime.speculative); the output is the same either way
    jump_forward: bool = True


class ModelRunner(Protocol):
    """What generated code provides: MLC-style fixed function set over one plan."""

    cache_config: CacheConfig
    vocab_size: int
    device: str                  # where StepBatch tensors must live ("cpu", "cuda")

    def create_kv_cache(self) -> Any:
        """Allocate the KV cache tensors for cache_config (called once at start)."""

    def prefill(self, batch: StepBatch) -> torch.Tensor:
        """Run new prompt tokens (maybe a chunk) of batch.num_seqs sequences; logits [B, vocab] of each last token
        (or [R, vocab] of the rows `batch.logits_rows` names, when it is set)."""

    def decode(self, batch: StepBatch) -> torch.Tensor:
        """One new token per sequence; logits [B, vocab]."""


class Engine(Protocol):
    """What the HTTP layer drives."""

    max_context: int
    model_name: str

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Submit and stream events; raises QueueFull or InvalidRequest before the first event."""

    def abort(self, request_id: str) -> None:
        """Cancel a request (client went away); its KV blocks are freed at the next step boundary."""

    def stats(self) -> dict[str, float]:
        """running, waiting, kv_blocks_used, kv_blocks_total, generated_tokens (monotonic)."""

    def admit_schema(self, schema: str) -> None:
        """Compile a request's JSON Schema (json mode) or raise InvalidRequest naming the problem;
        called off the event loop before generate()."""
