"""The serving engine: a step loop on its own thread, streams to asyncio callers.

Threads. One dedicated engine thread owns the scheduler, the block manager and every
Sequence after submission; it schedules a step, runs the model (torch releases the GIL
in the forward, so the HTTP event loop stays responsive), samples, detokenizes and hands
events back. Other threads touch only the inbox and the abort set, under one lock, and
read `stats()`. With no work the thread sleeps on a condition variable (no busy spin).

Events. `generate()` gives each request an asyncio.Queue; after each step the engine
thread makes one `loop.call_soon_threadsafe` per event loop carrying all of that step's
events for that loop (one wake-up per step, not per token).

Timestamps for metrics (TTFT, ITL). The engine calls `on_token(request_id, now,
is_first)` on the engine thread, right after a step samples that request's token: `now`
is `time.monotonic()` once per step (the moment its tokens exist), `is_first` is True for
the request's first generated token. TTFT = now - request.arrival_time on the first call;
ITL = the gap between consecutive calls. Pass it to the constructor or assign
`engine.on_token` before `start()`; it must be cheap and thread-safe (a prometheus
histogram's observe() is); if it raises, it is logged and switched off. Each Sequence
also keeps `first_token_time` and `last_token_time`.

The runner may have a `device` attribute (default cpu): step tensors and seeded
generators are made there. `create_kv_cache()` is called once, by `start()`.

Speculative decoding (EngineConfig.speculative_method, vsc.runtime.speculative). Before
each step the proposer drafts up to k tokens for every decoding, unconstrained sequence
(n-gram / prompt lookup over its tokens, or a draft model's greedy steps, run after
scheduling once the drafts' blocks exist); the step verifies them in one forward pass and
a sequence may get several tokens from it, delivered as one TokenEvent. Outputs are those
of plain decoding (greedy: the same tokens; seeded sampling: the same tokens too; see
that module). `stats()` counts drafts verified and accepted. A request that carries a
predicted output (SamplingParams.prediction) is drafted from it whatever the plan's method
(PredictionProposer); its events count the prediction's accepted and rejected drafts. A
json-mode request is drafted with the tokens its grammar forces (jump-forward,
EngineConfig.jump_forward), each drafted row masked by the grammar state after the drafts
before it.

Finishing. "stop": EOS (unless ignore_eos), a stop_token_id, or a stop string (the text
ends before it), or in json mode (vsc.runtime.constrain) a complete JSON document;
"length": max_tokens (admission keeps prompt + max_tokens within max_context); "abort": `abort()` or shutdown;
"error": the step that carried the request raised (the error is logged, the request's
blocks are freed, and the engine keeps serving everyone else).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable

import torch

from vsc.runtime.admission import TTFTPredictor, retry_after_s
from vsc.runtime.api import (EngineConfig, GenerateRequest, InvalidRequest, ModelRunner, Overloaded, QueueFull,
                             TokenEvent, TokenLogprobs)
from vsc.runtime.block_manager import BlockManager
from vsc.runtime.logprobs import MAX_LOGPROBS, token_logprobs
from vsc.runtime.constrain import GrammarFailure, apply_constraints, compiler_for, make_constraint
from vsc.runtime.enums import OVERLOAD_POLICIES
from vsc.runtime.penalties import TokenCounts, adjust_logits
from vsc.runtime.sampler import Sampler
from vsc.runtime.scheduler import ScheduledStep, Scheduler
from vsc.runtime.sequence import Sequence
from vsc.runtime.speculative import (
    JUMP_FORWARD_K, PredictionProposer, SpecGate, draft_limit, make_proposer, prediction_proposer, rewind, verify,
    wants_drafts)
from vsc.runtime.tokenizer import IncrementalDetokenizer

log = logging.getLogger("vsc.runtime.engine")

OnToken = Callable[[str, float, bool], None]


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Any, config: EngineConfig, model_name: str,
                 on_token: OnToken | None = None, num_blocks: int | None = None, draft_runner: Any = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name
        self.max_context = config.max_context
        self.on_token = on_token
        # Verification only (the accuracy check): called with every row of raw model logits
        # before sampling; None in a server, where it costs nothing.
        self.logits_hook: Callable[[str, int, torch.Tensor], None] | None = None
        cache = runner.cache_config
        self.device = torch.device(getattr(runner, "device", "cpu"))
        # num_blocks: a smaller cache than the plan's (the accuracy check's engine run)
        self.num_blocks = num_blocks
        self.block_manager = BlockManager(num_blocks or cache.num_blocks, cache.block_size)
        self.scheduler = Scheduler(config, self.block_manager, self.device)
        self.sampler = Sampler()
        self.vocab_size = runner.vocab_size
        self.eos_token_ids = frozenset(getattr(tokenizer, "eos_token_ids", ()) or ())
        if config.json_schema is not None:   # json mode: compile the deployment's grammar now, not on a request
            make_constraint(tokenizer, self.vocab_size, config.json_schema)
        self.kv_cache: Any = None
        # speculative decoding (vsc.runtime.speculative); method "draft" runs `draft_runner`
        # (default: the runner's `draft_runner` attribute), a runner of the draft model
        if draft_runner is None and config.speculative_method == "draft":
            draft_runner = getattr(runner, "draft_runner", None)
        self.proposer = make_proposer(config.speculative_method, config.speculative_k, config.speculative_ngram,
                                      draft_runner)
        self.draft_runner = draft_runner if config.speculative_method == "draft" else None
        # a request's own predicted output drafts it, whatever the plan's method
        self.predictions = prediction_proposer(config.speculative_method, config.speculative_k)
        self.spec_gate = SpecGate()          # guessed drafts only while they measure faster
        self.spec_draft_tokens = 0          # drafts verified
        self.spec_accepted_tokens = 0       # of those, accepted
        self.jump_forward_tokens = 0        # of those, grammar-forced tokens of json-mode requests
        # admission by the TTFT objective (overload = shed, vsc.runtime.admission): measured always,
        # consulted at submission only when shedding
        if config.overload not in OVERLOAD_POLICIES:
            raise ValueError(f"unknown overload policy {config.overload!r} (one of: {', '.join(OVERLOAD_POLICIES)})")
        if config.overload == "shed" and not config.ttft_slo_ms > 0:
            raise ValueError("overload = shed needs a positive ttft_slo_ms")
        self.ttft = TTFTPredictor()
        self.shed_requests = 0              # refused as predicted to miss the TTFT objective

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._live: dict[str, Sequence] = {}     # submitted and not yet finished
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.num_steps = 0
        self.num_errors = 0

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Allocate the KV cache and start the engine thread."""
        if self._thread is not None:
            return
        if self.kv_cache is None:
            if self.num_blocks is None:
                self.kv_cache = self.runner.create_kv_cache()
            else:
                self.kv_cache = self.runner.create_kv_cache(num_blocks=self.num_blocks)
            if self.draft_runner is not None:     # same block geometry: the draft KV uses the same tables
                self.draft_runner.create_kv_cache(num_blocks=self.block_manager.num_blocks)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vsc-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the thread after its current step; every unfinished request ends with "abort"."""
        thread = self._thread
        if thread is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify()
        thread.join()
        self._thread = None
        leftovers = list(self.scheduler.running) + list(self.scheduler.waiting) + self._inbox
        self._inbox.clear()
        self._finish_now(leftovers, "abort")

    def is_alive(self) -> bool:
        """The engine thread is running (the HTTP /health check reads this)."""
        return self._thread is not None and self._thread.is_alive()

    # --- the Engine protocol ---------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Submit `request` and stream its events; the last one has finish_reason set.

        Raises InvalidRequest or QueueFull before the first event. If the consumer stops
        early (client gone, task cancelled), the request is aborted.
        """
        seq = self._make_sequence(request)
        seq.loop = asyncio.get_running_loop()
        seq.queue = asyncio.Queue()
        self._submit(seq, request.fork_of)
        finished = False
        try:
            while True:
                event = await seq.queue.get()
                if event.finish_reason is not None:
                    finished = True
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request.request_id)

    def admit_schema(self, schema: str) -> None:
        """Compile a request's JSON Schema for this engine's tokenizer (cached), so a schema the
        grammar engine refuses is refused before the request is submitted. Raises SchemaError
        (an InvalidRequest). Thread-safe: the HTTP layer runs it off its event loop."""
        compiler_for(self.tokenizer, self.vocab_size).admit(schema)

    def abort(self, request_id: str) -> None:
        with self._wake:
            if request_id in self._live:
                self._aborts.add(request_id)
                self._wake.notify()

    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + len(self._inbox),
            "kv_blocks_used": bm.num_used,
            "kv_blocks_total": bm.num_blocks,
            "generated_tokens": self.generated_tokens,
            "prompt_tokens": self.prompt_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "steps": self.num_steps,
            "errors": self.num_errors,
            # prefix cache (0 without one): tokens looked up / found cached at admission,
            # blocks now cached, cached blocks evicted for reuse
            "prefix_query_tokens": self.scheduler.prefix_query_tokens,
            "prefix_hit_tokens": self.scheduler.prefix_hit_tokens,
            "prefix_cached_blocks": bm.num_cached,
            "prefix_evictions": bm.num_evicted,
            # n > 1: prompt tokens a request's copies shared from the first (fork), not computed
            "forked_tokens": self.scheduler.forked_tokens,
            # speculative decoding (0 without it): draft tokens verified, and accepted
            "spec_draft_tokens": self.spec_draft_tokens,
            "spec_accepted_tokens": self.spec_accepted_tokens,
            "jump_forward_tokens": self.jump_forward_tokens,
            # admission by the TTFT objective (overload = shed): requests refused
            "shed_requests": self.shed_requests,
        }

    # --- submission (caller's thread) ------------------------------------------------

    def _make_sequence(self, request: GenerateRequest) -> Sequence:
        p = request.params
        self.scheduler.check_request(len(request.prompt_ids), p.max_tokens)
        if p.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {p.temperature}")
        if not 0.0 < p.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {p.top_p}")
        if p.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {p.top_k}")
        if not 0.0 <= p.min_p <= 1.0:
            raise InvalidRequest(f"min_p must be in [0, 1], got {p.min_p}")
        if not 0 <= p.min_tokens <= p.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens={p.max_tokens}], got {p.min_tokens}")
        if not p.repetition_penalty > 0.0 or p.repetition_penalty == float("inf"):
            raise InvalidRequest(f"repetition_penalty must be a finite number > 0, got {p.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(p, name) <= 2.0:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {getattr(p, name)}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(p, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise InvalidRequest(f"{name} must be between 0 and {MAX_LOGPROBS}, got {k}")
        vocab = self.vocab_size
        ids = request.prompt_ids
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
        if p.prediction and (min(p.prediction) < 0 or max(p.prediction) >= vocab):
            raise InvalidRequest(f"prediction token ids must be in [0, {vocab})")
        if p.logit_bias and (min(p.logit_bias) < 0 or max(p.logit_bias) >= vocab):
            raise InvalidRequest(f"logit_bias token ids must be in [0, {vocab})")
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, request.prompt_ids, p.stop, min_tokens=p.min_tokens,
                                           include_stop=p.include_stop_str_in_output)
        seq = Sequence(request, detok, self.device)
        seq.counts = TokenCounts.of(p, request.prompt_ids, vocab, self.device)
        # json mode: the request's schema, else the deployment's (unless the request asked for text)
        schema = None if p.text_only else (p.json_schema or self.config.json_schema)
        if schema is not None and p.min_tokens > 0:
            # the grammar ends the reply where its document ends: min_tokens could not hold it open
            e = InvalidRequest("'min_tokens' cannot be combined with JSON output (a response_format or "
                               "structured_outputs schema, tools, or this deployment's json mode): the reply ends "
                               "where its JSON document does; send 'min_tokens': 0")
            e.param = "min_tokens"
            raise e
        if schema is not None:
            seq.constraint = make_constraint(self.tokenizer, self.vocab_size, schema)  # bad schema: InvalidRequest
        return seq

    def _submit(self, seq: Sequence, fork_of: str | None = None) -> None:
        with self._wake:
            if self._thread is None or self._stopping:
                raise RuntimeError("the engine is not running (call start() first)")
            if seq.request_id in self._live:
                raise InvalidRequest(f"request id {seq.request_id!r} is already in use")
            parent = self._live.get(fork_of) if fork_of is not None else None
            if parent is not None and parent.prompt_ids == seq.token_ids:
                seq.parent = parent             # shares its prompt blocks once computed (scheduler)
            if len(self.scheduler.waiting) + len(self._inbox) >= self.config.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.config.max_waiting} requests); retry later")
            if self.config.overload == "shed":
                self._admit_by_ttft(seq.num_prompt_tokens)
            self._live[seq.request_id] = seq
            self._inbox.append(seq)
            self._wake.notify()

    def check_overload(self) -> None:
        """Raise Overloaded when even a request with an empty prompt would miss the TTFT objective
        (overload = shed): the HTTP layer asks before it renders and tokenizes a prompt, so that a
        burst's refusals cost little of the event loop the admitted requests' tokens go through."""
        if self.config.overload == "shed":
            with self._wake:
                self._admit_by_ttft(0)

    def _admit_by_ttft(self, prompt_len: int) -> None:
        """Raise Overloaded when a request's predicted TTFT exceeds the objective (called under the
        lock; the lists are copied in one C call each, their sequences' counters read as they are)."""
        cfg = self.config
        predicted = self.ttft.predict(list(self.scheduler.running), list(self.scheduler.waiting) + self._inbox,
                                      prompt_len, cfg.max_batch, cfg.order == "shortest-first")
        target = cfg.ttft_slo_ms / 1000.0
        if predicted is not None and predicted > target:
            self.shed_requests += 1
            raise Overloaded(f"the server is overloaded: this request's first token is predicted in "
                             f"{predicted * 1000:.0f} ms, over the {cfg.ttft_slo_ms:g} ms objective; retry later",
                             retry_after=retry_after_s(predicted, target))

    # --- the engine thread -----------------------------------------------------------

    def _run(self) -> None:
        scheduler = self.scheduler
        while True:
            with self._wake:
                while not (self._stopping or self._inbox or self._aborts or scheduler.has_work()):
                    self._wake.wait()
                if self._stopping:
                    return
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, set()
            try:
                for seq in inbox:
                    scheduler.add(seq)
                    self.prompt_tokens += seq.num_prompt_tokens
                if aborts:
                    self._finish_now([s for rid in aborts if (s := self._live.get(rid)) is not None], "abort")
                if scheduler.has_work():
                    self._step()
            except Exception:  # noqa: BLE001 - the thread must outlive any bug below it
                log.exception("engine loop error")
                self.num_errors += 1

    def _step(self) -> None:
        try:
            if self.proposer is not None or any(PredictionProposer.applies(s) or s.constraint is not None
                                                for s in self.scheduler.running):
                self._propose()
            step = self.scheduler.schedule()
        except Exception:  # noqa: BLE001 - a scheduler bug must not wedge the server
            log.exception("scheduling failed; failing every running request")
            self.num_errors += 1
            self._finish_now(list(self.scheduler.running), "error")
            return
        if step is None:
            # Nothing could be scheduled (should not happen: an empty cache always fits the
            # first waiting request); sleep briefly instead of spinning.
            with self._wake:
                self._wake.wait(0.01)
            return
        try:
            t0 = time.perf_counter()
            tokens0 = self.generated_tokens
            prompt_tokens = 0 if step.num_drafts else sum(n for n in step.num_new if n > 1)
            self._run_step(step)
            seconds = time.perf_counter() - t0
            self.scheduler.observe(step, seconds)
            self.ttft.observe_step(prompt_tokens, seconds)
            if step.batch.is_decode or step.num_drafts:     # prompt work would blur the comparison
                guessed = any(d and s.constraint is None for s, d in zip(step.seqs, step.num_drafts))
                if guessed or not step.num_drafts:
                    self.spec_gate.observe(guessed, self.generated_tokens - tokens0, seconds)
        except Exception:  # noqa: BLE001 - see the module docstring
            log.exception("engine step failed; failing its %d request(s)", len(step.seqs))
            self.num_errors += 1
            self._finish_now([s for s in step.seqs if not s.is_finished], "error")

    def _run_step(self, step: ScheduledStep) -> None:
        if step.num_drafts:      # speculative decoding: verify the drafts
            self._run_spec_step(step)
            return
        batch = step.batch
        logits = self.runner.decode(batch) if batch.is_decode else self.runner.prefill(batch)
        if step.prompt_rows:
            logits = self._take_prompt_logprobs(step, logits)
        self.scheduler.advance(step)
        self.num_steps += 1
        rows = step.sample_rows
        if not rows:
            return
        seqs = step.seqs
        if len(rows) != len(seqs):
            logits = logits[torch.tensor(rows, device=logits.device)]
            seqs = [seqs[r] for r in rows]
        if self.logits_hook is not None:
            self._observe_logits(seqs, logits)
        if any(s.constraint is not None for s in seqs):   # json mode: -inf where the grammar forbids
            logits = apply_constraints(logits, [s.constraint for s in seqs])
        # penalties, logit_bias, min_tokens shape what is sampled; logprobs stay the model's (vLLM's
        # default logprobs_mode, raw: after a json-mode mask, before every other adjustment)
        adjusted = self._adjust(logits, seqs, None)
        token_ids = self.sampler(adjusted, [s.params for s in seqs], [s.generator for s in seqs])
        scored = _score(logits, seqs, token_ids, range(len(seqs)))
        now = time.monotonic()
        self.generated_tokens += len(token_ids)
        events: list[tuple[Sequence, TokenEvent]] = []
        finished: list[Sequence] = []
        for i, (seq, token) in enumerate(zip(seqs, token_ids)):
            event = self._append_token(seq, token, now)
            if i in scored:
                event.logprobs = [scored[i]]
            events.append((seq, event))
            if event.finish_reason is not None:
                finished.append(seq)
        self.scheduler.finish(finished)
        self.ttft.observe_finished(finished)
        for seq in finished:
            self._live.pop(seq.request_id, None)
        self._deliver(events)

    def _adjust(self, logits: torch.Tensor, row_seqs: list[Sequence], before: list[list[int]] | None) -> torch.Tensor:
        """The logits-adjustment stage (vsc.runtime.penalties): min_tokens, logit_bias, penalties per row;
        `logits` itself when no row's request uses any."""
        if not any(s.params.adjusts_logits for s in row_seqs):
            return logits
        return adjust_logits(logits, [s.params for s in row_seqs], [s.counts for s in row_seqs],
                             [s.num_output_tokens for s in row_seqs], before, self.eos_token_ids)


    def _take_prompt_logprobs(self, step: ScheduledStep, logits: torch.Tensor) -> torch.Tensor:
        """Prompt logprobs: score the prompt rows the step returned (ScheduledStep.prompt_rows) into
        their sequences' `prompt_lp`; returns the logits of the other rows (the step's usual rows)."""
        drafting = bool(step.num_drafts)
        sampled = set(step.sample_rows)
        kept: list[int] = []
        index: list[int] = []
        tokens: list[int] = []
        ks: list[int] = []
        targets: list[tuple[Sequence, int]] = []
        at = 0
        for row, (seq, m) in enumerate(zip(step.seqs, step.prompt_rows)):
            start = seq.num_computed
            for j in range(m):            # row of position p predicts token p + 1
                index.append(at + j)
                tokens.append(seq.token_ids[start + j + 1])
                ks.append(seq.params.prompt_logprobs or 0)
                targets.append((seq, start + j + 1))
            at += m
            n = 1 if not drafting else (1 + step.num_drafts[row] if row in sampled else 0)
            kept.extend(range(at, at + n))
            at += n
        if index:
            for (seq, i), lp in zip(targets, token_logprobs(logits[torch.tensor(index, device=logits.device)],
                                                             tokens, ks)):
                seq.prompt_lp[i] = lp
        return logits[torch.tensor(kept, device=logits.device)]

    def _observe_logits(self, row_seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Hand the model's raw logits to `logits_hook(request_id, position, row)`: row i
        predicts the token at index `num_tokens + j` of its sequence, j counting that
        sequence's earlier rows in this step (drafts). Rows past a rejected draft are later
        overwritten or fall past the end; the hook keeps the last row per position."""
        seen: dict[int, int] = {}
        for i, seq in enumerate(row_seqs):
            j = seen.get(id(seq), 0)
            seen[id(seq)] = j + 1
            self.logits_hook(seq.request_id, seq.num_tokens + j, logits[i])

    # --- speculative decoding (vsc.runtime.speculative) -------------------------------

    def _propose(self) -> None:
        """Drafts for every decoding sequence, before the scheduler sizes the step around them."""
        proposer, k, max_context = self.proposer, self.config.speculative_k, self.max_context
        predictions = self.predictions
        running = self.scheduler.running
        # Guessed drafts (not the grammar's) fill a step only up to `spec_rows` rows: on a CPU a
        # step costs about the same from 1 to ~16 rows (weights streamed once) and then grows
        # with every row, so past that a rejected draft costs what a token costs (SmolLM2 fp32,
        # 16 sequences with predictions: 178 ms steps against 90 without, for 4% fewer steps).
        cap = self.config.spec_rows
        room = max(0, cap - len(running)) if cap > 0 else None
        guessed = [s for s in running if wants_drafts(s) and s.constraint is None
                   and (predictions.applies(s) or proposer is not None)]
        if guessed and self.config.spec_gate and not self.spec_gate.drafting():
            room = 0                              # drafts measured slower than plain steps: a plain step
        share = {id(s): room // len(guessed) + (i < room % len(guessed)) for i, s in enumerate(guessed)} \
            if room is not None and guessed else {}
        for seq in running:
            if not wants_drafts(seq) or seq.params.logprobs is not None:   # logprobs: one token a step
                if seq.draft_ids:
                    seq.draft_ids = []
            elif seq.constraint is not None:      # jump-forward: the tokens the grammar forces
                seq.draft_ids = (seq.constraint.forced(draft_limit(seq, JUMP_FORWARD_K, max_context))
                                 if self.config.jump_forward else [])
            elif predictions.applies(seq):
                limit = min(predictions.k, share.get(id(seq), predictions.k))
                seq.draft_ids = predictions.propose(seq, draft_limit(seq, limit, max_context))
            elif proposer is not None:
                seq.draft_ids = proposer.propose(seq, draft_limit(seq, min(k, share.get(id(seq), k)), max_context))

    def _proposer_of(self, seq: Sequence):
        """Who drafted `seq` (None: its grammar, jump-forward)."""
        if seq.constraint is not None:
            return None
        return self.predictions if self.predictions.applies(seq) else self.proposer

    def _run_spec_step(self, step: ScheduledStep) -> None:
        """A step carrying drafts: one forward pass returns logits at every drafted position,
        the sampler picks the model's token at each, and each sequence keeps its drafts up to
        the first the model disagrees with plus the model's token there (`verify`). Tokens
        are appended one by one, so a stop (token, string, json end) or max_tokens
        ends the run exactly where plain decoding would; one TokenEvent carries
        all of a sequence's tokens of the step. Only kept tokens count as computed: the
        rejected drafts' KV slots are overwritten later, and blocks grown only for them are
        freed."""
        proposer, seqs, rows, drafted = self.proposer, step.seqs, step.sample_rows, step.num_drafts
        if proposer is not None and proposer.needs_fill:
            # draft model: its tokens replace the placeholders, blocks now allocated (requests
            # drafted from their predictions already hold real drafts)
            proposer.fill(seqs, [0 if self.predictions.applies(s) or s.constraint is not None else d
                                 for s, d in zip(seqs, drafted)])
            self.scheduler.rebuild(step)
        logits = self.runner.prefill(step.batch)     # [R, V]: the last token and each draft of every sample row
        if step.prompt_rows:
            logits = self._take_prompt_logprobs(step, logits)
        self.num_steps += 1
        if not rows:
            self.scheduler.advance(step)
            return
        row_seqs = [seqs[r] for r in rows for _ in range(1 + drafted[r])]
        if self.logits_hook is not None:
            self._observe_logits(row_seqs, logits)
        if any(s.constraint is not None for s in row_seqs):
            # json mode: each row masked by the grammar state after the drafts before it
            masks = []
            for r in rows:
                c = seqs[r].constraint
                after = c.after(seqs[r].draft_ids[:drafted[r]]) if c is not None and drafted[r] else []
                masks += [c] + after + [c] * (drafted[r] - len(after))
            logits = apply_constraints(logits, masks)
        adjusted = logits
        if any(s.params.adjusts_logits for s in row_seqs):
            # each row adjusted as plain decoding would at its position: after the drafts before it
            before = [seqs[r].draft_ids[:j] for r in rows for j in range(1 + drafted[r])]
            adjusted = self._adjust(logits, row_seqs, before)
        states = {r: seqs[r].generator.get_state() for r in rows if drafted[r] and seqs[r].generator is not None}
        picks = self.sampler(adjusted, [s.params for s in row_seqs], [s.generator for s in row_seqs])
        # logprobs: of undrafted rows (a request with logprobs is never drafted)
        scored = _score(logits, row_seqs, picks, [i for i, s in enumerate(row_seqs) if s.params.logprobs is not None])
        now = time.monotonic()
        events: list[tuple[Sequence, TokenEvent]] = []
        finished: list[Sequence] = []
        accepted_by_row: dict[int, int] = {}
        at = 0
        for r in rows:
            seq, d = seqs[r], drafted[r]
            own = picks[at:at + 1 + d]
            scored_row = scored.get(at)
            at += 1 + d
            tokens = own
            if d:
                tokens, accepted = verify(seq.draft_ids[:d], own)
                accepted_by_row[r] = accepted
                self.spec_draft_tokens += d
                self.spec_accepted_tokens += accepted
                if seq.constraint is not None:
                    self.jump_forward_tokens += accepted
                elif self.predictions.applies(seq):
                    seq.prediction_accepted += accepted
                    seq.prediction_rejected += d - accepted
                if r in states and accepted < d:     # seeded: as if only the kept positions had drawn noise
                    rewind(seq.generator, states[r], accepted + 1, logits.shape[-1])
            emitted: list[int] = []
            text: list[str] = []
            for token in tokens:
                event = self._append_token(seq, token, now)
                emitted.append(token)
                text.append(event.text)
                if event.finish_reason is not None:
                    finished.append(seq)
                    break
            if scored_row is not None and not d:
                event.logprobs = [scored_row]
            if d:
                step.num_new[r] = len(emitted)     # the last token and the kept drafts hold valid KV
                event = TokenEvent(seq.request_id, emitted, "".join(text), event.finish_reason,
                                   event.prompt_tokens, event.completion_tokens,
                                   seq.prediction_accepted, seq.prediction_rejected, event.error,
                                   queue_seconds=event.queue_seconds)
            self.generated_tokens += len(emitted)
            events.append((seq, event))
        self.scheduler.advance(step)
        for r, accepted in accepted_by_row.items():
            seq = seqs[r]
            drafter = self._proposer_of(seq)
            if drafter is not None:
                drafter.accepted(seq, drafted[r], accepted)
            if seq.finish_reason is None:
                self.scheduler.release_unused_blocks(seq)
        self.scheduler.finish(finished)
        self.ttft.observe_finished(finished)
        for seq in finished:
            self._live.pop(seq.request_id, None)
        self._deliver(events)

    def _append_token(self, seq: Sequence, token: int, now: float) -> TokenEvent:
        """Record one sampled token; returns its event (finish_reason set if it ends the request)."""
        is_first = seq.first_token_time is None
        if is_first:
            seq.first_token_time = now
        seq.last_token_time = now
        seq.token_ids.append(token)
        if seq.counts is not None:
            seq.counts.add(token)
        p = seq.params
        detok = seq.detokenizer
        reason = None
        text = ""
        constraint = seq.constraint
        if constraint is not None and constraint.failure() is None and token in self.eos_token_ids \
                and not p.ignore_eos and not constraint.is_complete:    # EOS from a mask the grammar failed on
            constraint.fail(f"end of text (token {token}) before the document was complete")
        if constraint is not None and constraint.failure() is not None:
            reason = "error"           # json mode: its grammar failed (a limit hit computing this token's mask)
        elif (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
            if detok is not None:
                if p.include_stop_str_in_output:     # the stop token's own text (special tokens decode to "")
                    text = detok.add(token)
                text += detok.flush()
        else:
            if detok is not None:
                text = detok.add(token)
                if detok.stopped:
                    reason = "stop"
            if reason is None and seq.constraint is not None:
                # json mode: "stop" as soon as the document is complete (only EOS could follow)
                reason = seq.constraint.advance(token)
                if reason is not None and detok is not None:
                    text += detok.flush()
            # max_context needs no test here: admission (Scheduler.check_request) holds prompt + max_tokens
            # within it, so max_tokens always ends a sequence first.
            if reason is None and seq.num_output_tokens >= p.max_tokens:
                reason = "length"
                if detok is not None:
                    text += detok.flush()
        seq.finish_reason = reason
        if self.on_token is not None:
            try:
                self.on_token(seq.request_id, now, is_first)
            except Exception:  # noqa: BLE001 - a metrics bug must not fail requests
                log.exception("on_token hook failed; disabling it")
                self.on_token = None
        return TokenEvent(seq.request_id, [token], text, reason, seq.num_prompt_tokens, seq.num_output_tokens,
                          seq.prediction_accepted, seq.prediction_rejected, _grammar_failure(seq, reason),
                          queue_seconds=_queue_seconds(seq) if reason is not None else None,
                          prompt_logprobs=seq.prompt_lp if is_first else None)

    def _finish_now(self, seqs: list[Sequence], reason: str) -> None:
        """End `seqs` outside the normal token path (abort, error, shutdown): free and notify."""
        seqs = [s for s in seqs if not s.is_finished]
        if not seqs:
            return
        self.scheduler.finish(seqs)
        events = []
        for seq in seqs:
            seq.finish_reason = reason
            self._live.pop(seq.request_id, None)
            events.append((seq, TokenEvent(seq.request_id, [], "", reason, seq.num_prompt_tokens,
                                           seq.num_output_tokens, queue_seconds=_queue_seconds(seq))))
        self._deliver(events)

    @staticmethod
    def _deliver(events: list[tuple[Sequence, TokenEvent]]) -> None:
        """Hand events to their asyncio queues: one thread-safe call per event loop."""
        by_loop: dict[Any, list[tuple[Any, TokenEvent]]] = {}
        for seq, event in events:
            if seq.loop is not None:
                by_loop.setdefault(seq.loop, []).append((seq.queue, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:   # that event loop is closed: nobody is listening any more
                pass


def _queue_seconds(seq: Sequence) -> float | None:
    """Seconds `seq` waited from its arrival to its first scheduling (None: never scheduled,
    or no arrival time was given)."""
    if seq.scheduled_time is None or not seq.arrival_time:
        return None
    return max(0.0, seq.scheduled_time - seq.arrival_time)


def _score(logits: torch.Tensor, seqs: list[Sequence], token_ids: list[int], rows) -> dict[int, TokenLogprobs]:
    """Logprobs of the sampled tokens of the `rows` of `logits` whose sequences asked for them
    (the model's logits, json-mode masked: before temperature and the rest), by row."""
    want = [i for i in rows if seqs[i].params.logprobs is not None]
    if not want:
        return {}
    index = torch.tensor(want, device=logits.device)
    lps = token_logprobs(logits[index], [token_ids[i] for i in want], [seqs[i].params.logprobs for i in want])
    return dict(zip(want, lps))


def _grammar_failure(seq: Sequence, reason: str | None) -> GrammarFailure | None:
    """The error a json-mode request ends with when its grammar failed (None otherwise)."""
    c = seq.constraint
    if reason != "error" or c is None or c.error is None:
        return None
    own = seq.params.json_schema is not None
    whose = "the request's schema" if own else "the deployment's schema"
    message = f"json mode: {whose} failed after {seq.num_output_tokens} generated token(s): {c.error}"
    log.error("request %s: %s", seq.request_id, message)      # once: the request ends here
    return GrammarFailure(message, own_schema=own)


def _put_all(items: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
