"""Iteration-level scheduling: which sequences run in the next step, with how many tokens.

Steps are *mixed*: one step carries every running sequence's next token(s) and, with
whatever token budget is left, new prefills (whole, or chunked). Why mixed rather than
separate prefill and decode steps: a separate prefill step stalls every running decode
for as long as the prefill takes, and chunked prefill exists precisely to bound that
stall; mixing also needs no policy choosing between the two kinds of step. The runner's
`prefill` accepts any number of new tokens per sequence, so a mixed step is a `prefill`
call; a step in which every sequence has exactly one new token (the common steady state)
is marked `is_decode` and goes to the runner's faster `decode`.

Order inside a step: running sequences first, oldest first (each gets one decode token,
or its next prefill chunk), then waiting sequences in `order` (fcfs / shortest-first)
while `max_batch`, the token budget `max_tokens` and free blocks allow. Static batching
admits a new batch only when nothing is running.

Preemption (recompute): when a running sequence's next tokens need a block and none is
free, the newest running sequence is preempted: its blocks are freed and it goes back to
the front of the waiting queue, keeping its output, so its next prefill recomputes
prompt + output. Newest-first keeps the oldest requests (closest to done, longest waited)
making progress. No new sequence is admitted in a step that preempted.

The scheduler never touches the tokenizer or the model: it moves integers and builds the
step's tensors.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from vsc.runtime.api import EngineConfig, InvalidRequest, StepBatch
from vsc.runtime.block_manager import BlockManager
from vsc.runtime.sequence import Sequence, SeqStatus


@dataclass
class ScheduledStep:
    """One step: the sequences, their new-token counts, the tensors, who samples."""

    seqs: list[Sequence]
    num_new: list[int]
    batch: StepBatch
    sample_rows: list[int]        # rows of `seqs` whose prefill is complete after this step


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, device: str | torch.device = "cpu"):
        if config.mode not in ("continuous", "static"):
            raise ValueError(f"unknown batching mode {config.mode!r}")
        if config.order not in ("fcfs", "shortest-first"):
            raise ValueError(f"unknown scheduling order {config.order!r}")
        if config.max_batch < 1 or config.max_tokens < 1:
            raise ValueError("max_batch and max_tokens must be >= 1")
        self.config = config
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.device = torch.device(device)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # --- admission control -----------------------------------------------------------

    def check_request(self, prompt_len: int, max_tokens: int) -> None:
        """Raise InvalidRequest for a request this engine could never finish."""
        max_context = self.config.max_context
        if prompt_len < 1:
            raise InvalidRequest("the prompt is empty")
        if max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}")
        if prompt_len > max_context - 1:
            raise InvalidRequest(
                f"the prompt has {prompt_len} tokens, more than this model's maximum context of "
                f"{max_context} tokens allows (at most {max_context - 1} prompt tokens)")
        if prompt_len + max_tokens > max_context:
            raise InvalidRequest(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
                f"maximum context of {max_context} tokens")
        bm = self.block_manager
        if bm.blocks_for(prompt_len + max_tokens) > bm.num_blocks:
            raise InvalidRequest(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the KV cache "
                f"capacity of {bm.num_blocks * bm.block_size} tokens")

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # --- the step --------------------------------------------------------------------

    def schedule(self) -> ScheduledStep | None:
        """Pick the next step's work and allocate its blocks; None if there is nothing to run."""
        cfg = self.config
        bm = self.block_manager
        budget = cfg.max_tokens
        seqs: list[Sequence] = []
        num_new: list[int] = []
        running = self.running
        preempted = False

        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = self._chunk(seq.num_tokens - seq.num_computed, budget, True)
            if n == 0:
                i += 1
                continue
            need = seq.num_computed + n
            while not bm.can_grow(seq.block_table, need):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                bm.grow(seq.block_table, need)
                seqs.append(seq)
                num_new.append(n)
                budget -= n
                i += 1

        if not preempted and (cfg.mode == "continuous" or not running):
            waiting = self.waiting
            while waiting and len(running) < cfg.max_batch and budget > 0:
                seq = self._next_waiting()
                n = self._chunk(seq.num_tokens, budget, False)
                if n == 0 or not bm.can_allocate(n):
                    break
                self._remove_waiting(seq)
                bm.grow(seq.block_table, n)
                seq.status = SeqStatus.RUNNING
                running.append(seq)
                seqs.append(seq)
                num_new.append(n)
                budget -= n

        if not seqs:
            return None
        return self._build(seqs, num_new)

    def _chunk(self, remaining: int, budget: int, started: bool) -> int:
        """New tokens a sequence with `remaining` uncomputed tokens gets this step (0: none).

        With chunked prefill the cap is `chunked_prefill`. Without it a prefill runs whole
        or waits for a step with room, except one longer than the whole step budget, which
        could never run whole and so is split at the budget; once `started` (split), its
        rest is not held back either.
        """
        chunk = self.config.chunked_prefill
        if chunk > 0:
            return min(remaining, chunk, budget)
        if remaining <= budget:
            return remaining
        if started or remaining > self.config.max_tokens:
            return budget
        return 0

    def _next_waiting(self) -> Sequence:
        waiting = self.waiting
        first = waiting[0]
        if self.config.order == "fcfs" or first.num_preemptions:
            return first          # preempted sequences resume before anything new
        return min(waiting, key=_waiting_len)

    def _remove_waiting(self, seq: Sequence) -> None:
        if self.waiting[0] is seq:
            self.waiting.popleft()
        else:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq.block_table)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # --- after the step --------------------------------------------------------------

    def advance(self, step: ScheduledStep) -> None:
        """The step ran: its new tokens are in the KV cache."""
        for seq, n in zip(step.seqs, step.num_new):
            seq.num_computed += n

    def finish(self, seqs: list[Sequence]) -> None:
        """Release finished or aborted sequences (running or waiting) and their blocks."""
        if not seqs:
            return
        drop_running = False
        for seq in seqs:
            if seq.status is SeqStatus.RUNNING:
                drop_running = True
            elif seq.status is SeqStatus.WAITING:
                try:
                    self.waiting.remove(seq)
                except ValueError:
                    pass
            if seq.block_table:
                self.block_manager.free(seq.block_table)
            seq.status = SeqStatus.FINISHED
        if drop_running:
            self.running = [s for s in self.running if s.status is SeqStatus.RUNNING]

    # --- tensors ---------------------------------------------------------------------

    def _build(self, seqs: list[Sequence], num_new: list[int]) -> ScheduledStep:
        """The StepBatch of api.py, as views of one int64 buffer (one host->device copy).

        block_tables is as wide as the longest table in this step (not max_context's
        worth of blocks): smaller copies; a runner that needs a fixed width (graph capture)
        copies it into its own padded buffer.
        """
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        sample_rows: list[int] = []
        width = 0
        for row, (seq, n) in enumerate(zip(seqs, num_new)):
            start = seq.num_computed
            end = start + n
            table = seq.block_table
            if n == 1:
                tokens.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                tokens.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                pos = start
                while pos < end:            # one range per block touched, not per token
                    index = pos // bs
                    stop = min(end, (index + 1) * bs)
                    shift = (table[index] - index) * bs     # position -> slot within this block
                    slots.extend(range(pos + shift, stop + shift))
                    pos = stop
            query_start.append(query_start[-1] + n)
            context_lens.append(end)
            if end == seq.num_tokens:
                sample_rows.append(row)
            if len(table) > width:
                width = len(table)

        num_seqs = len(seqs)
        tables: list[int] = []
        for seq in seqs:
            table = seq.block_table
            tables.extend(table)
            if len(table) < width:
                tables.extend([0] * (width - len(table)))

        flat = torch.tensor(tokens + positions + slots + query_start + context_lens + tables,
                            dtype=torch.int64)
        if self.device.type != "cpu":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        t = len(tokens)
        o = 3 * t
        batch = StepBatch(
            tokens=flat[:t],
            positions=flat[t:2 * t],
            slot_mapping=flat[2 * t:o],
            query_start=flat[o:o + num_seqs + 1],
            context_lens=flat[o + num_seqs + 1:o + 2 * num_seqs + 1],
            block_tables=flat[o + 2 * num_seqs + 1:].view(num_seqs, width),
            is_decode=t == num_seqs,
            query_lens_host=num_new,
            context_lens_host=context_lens,
        )
        return ScheduledStep(seqs, num_new, batch, sample_rows)


def _waiting_len(seq: Sequence) -> int:
    return seq.num_tokens
