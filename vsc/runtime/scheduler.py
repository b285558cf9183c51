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

Prefix cache (`config.prefix_cache == "radix"`, see vsc.runtime.prefix_cache). Admitting
a waiting sequence first looks up its longest cached prefix of full blocks, at most
`(num_tokens - 1) // block_size` of them so that at least one token is computed (the
step needs its logits): those blocks join its table (held, never written again), its
`num_computed` starts at the matched token count, and only the rest is allocated and
prefilled. After every step `advance` enters each block the step filled (prompt or
output tokens) into the tree, so the cost is one lookup per admission and one insert
per filled block, nothing per decoded token. Preempted and finished sequences release
their blocks as usual; cached ones stay reusable until evicted (LRU, by the block
manager), so a preempted sequence's recompute is mostly a hit. Requests that arrive
together behind one uncached prefix would each compute it in the same step; so admission
stops (first come, first served: nobody overtakes) at a sequence whose first uncached
block is one that a sequence admitted in this step is computing, and it is admitted next
step with that block cached (a burst of 16 prompts behind a 768-token system prompt
computes the prefix once instead of twice or more).

Copies (n > 1, best_of: a Sequence whose `parent` is set, a request with the same prompt
submitted just before it) fork their parent: a copy is admitted once its parent has computed
the prompt's full blocks (until then admission stops at it, first come first served), and its
table starts with those blocks, held, not recomputed (`forked_tokens` counts them), as a prefix
hit would; with a prefix cache the hit is the same blocks and counts as a hit.

Speculative decoding (vsc.runtime.speculative). A decoding sequence whose `draft_ids`
the engine filled gets its last token plus up to that many drafts in one step, within the
budget left after one token for each running sequence behind it, and only if their blocks
are free (drafts never preempt anyone). The step then asks the runner for the logits of
every drafted position (`StepBatch.logits_rows`, per sample row: 1 + drafts rows, in
order), which makes it a `prefill` call; a step without drafts is built exactly as before.
After verification the engine counts only the kept tokens in `num_new` before `advance`,
and `release_unused_blocks` frees blocks that were grown for rejected drafts.

TPOT objective (`config.prefill_tpot_ms`, chunked-prefill{slo=true}). A step that carries
running decodes gets at most `StepCosts.prompt_budget` prompt tokens: what the measured costs
say fits in the objective after the decode rows (the engine reports each step's wall time to
`observe`). Prompt-only steps are not capped, and at least one block of prompt tokens goes in
per step when even the decodes alone exceed the objective, so prompts always advance.

The scheduler never touches the tokenizer or the model: it moves integers and builds the
step's tensors.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from vsc.runtime.api import EngineConfig, InvalidRequest, StepBatch
from vsc.runtime.block_manager import BlockManager
from vsc.runtime.enums import BATCHING_MODES, PREEMPTION_POLICIES, PREFIX_CACHE_POLICIES, SCHEDULING_ORDERS
from vsc.runtime.sequence import Sequence, SeqStatus

log = logging.getLogger("vsc.runtime.scheduler")

#: A prompt whose logprobs are asked for is computed at most this many tokens a step: its logits
#: rows ([rows, vocab] floats) stay bounded whatever the prompt's length.
PROMPT_ROWS_PER_STEP = 512


class StepCosts:
    """What a step costs, learned from the steps run so far (exponential moving averages):
    `decode_s`, the wall time of a step of decodes only, and `token_s`, the extra time per
    prompt token of a step that also prefills. Both None until observed."""

    ALPHA = 0.2            # weight of the newest observation
    MIN_TOKENS = 16        # prompt tokens below which a step says little about their cost

    def __init__(self) -> None:
        self.decode_s: float | None = None
        self.token_s: float | None = None

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.ALPHA) * old + self.ALPHA * new

    def observe(self, decode_rows: int, prompt_tokens: int, seconds: float) -> None:
        """A step's wall time. A prompt token's cost is learned from steps that also decode (the
        steps the budget caps, whose chunks are smaller and less efficient than a prompt-only
        step's); a prompt-only step only gives the first estimate."""
        if prompt_tokens == 0:
            if decode_rows:
                self.decode_s = self._mix(self.decode_s, seconds)
        elif prompt_tokens >= self.MIN_TOKENS:
            if decode_rows and self.decode_s is not None:
                self.token_s = self._mix(self.token_s, max(seconds - self.decode_s, 0.0) / prompt_tokens)
            elif decode_rows and self.token_s is not None:      # no decode-only step seen yet
                self.decode_s = max(seconds - self.token_s * prompt_tokens, 0.0)
            elif self.token_s is None:
                self.token_s = seconds / prompt_tokens

    def prompt_budget(self, target_s: float, floor: int, ceiling: int) -> int:
        """Prompt tokens that keep a step with decodes within `target_s` (between floor and
        ceiling): the ceiling until a prompt token's cost is known; before any decode-only step
        the decodes are counted free (a first run measured a 2.3 s stall from waiting for both)."""
        if not self.token_s:
            return ceiling
        room = int((target_s - (self.decode_s or 0.0)) / self.token_s)
        return max(floor, min(ceiling, room))


@dataclass
class ScheduledStep:
    """One step: the sequences, their new-token counts, the tensors, who samples."""

    seqs: list[Sequence]
    num_new: list[int]
    batch: StepBatch
    sample_rows: list[int]        # rows of `seqs` whose prefill is complete after this step
    # speculative decoding: drafted tokens per row (after its last token); [] when the step
    # has none. Then the step's logits are batch.logits_rows: 1 + drafts rows per sample row.
    num_drafts: list[int] = field(default_factory=list)
    # prompt logprobs: per row, how many of its prompt rows' logits the step also returns (first
    # positions of its chunk, each predicting the next prompt token); [] when no row asks. Then
    # batch.logits_rows holds, per row, those rows and then the rows the step returns without them.
    prompt_rows: list[int] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, device: str | torch.device = "cpu"):
        if config.mode not in BATCHING_MODES:
            raise ValueError(f"unknown batching mode {config.mode!r}")
        if config.order not in SCHEDULING_ORDERS:
            raise ValueError(f"unknown scheduling order {config.order!r}")
        if config.preemption not in PREEMPTION_POLICIES:
            raise ValueError(f"unknown preemption policy {config.preemption!r} (known: {', '.join(PREEMPTION_POLICIES)})")
        if config.max_batch < 1 or config.max_tokens < 1:
            raise ValueError("max_batch and max_tokens must be >= 1")
        self.config = config
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.device = torch.device(device)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        if config.prefix_cache not in PREFIX_CACHE_POLICIES:
            raise ValueError(f"unknown prefix cache policy {config.prefix_cache!r}")
        self.prefix_caching = config.prefix_cache != "none"
        if self.prefix_caching:
            block_manager.enable_prefix_cache(config.prefix_cache_capacity)
        self.prefix_query_tokens = 0     # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hit_tokens = 0       # of those, tokens found cached (not recomputed)
        self.prefix_deferrals = 0        # admissions put off a step to find a block another one computes
        self.forked_tokens = 0           # prompt tokens copies (n > 1) shared from their parent, not computed
        self.costs = StepCosts() if config.prefill_tpot_ms > 0 else None

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
        prompt_left = self._prompt_budget()

        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            remaining = seq.num_tokens - seq.num_computed
            n = self._chunk(remaining, budget if remaining == 1 else min(budget, prompt_left), True)
            if remaining > 1 and seq.needs_prompt_rows:
                n = min(n, PROMPT_ROWS_PER_STEP)
            if n == 0:
                i += 1
                continue
            if remaining > 1:
                prompt_left -= n
            if remaining == 1 and seq.draft_ids:
                n += self._drafts(seq, budget - 1 - (len(running) - i - 1))
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
            prefix_caching = self.prefix_caching
            computing: set[tuple] = set()       # (last cached block, next block's tokens) admitted this step
            while waiting and len(running) < cfg.max_batch and budget > 0 and prompt_left > 0:
                seq = self._next_waiting()
                # prompt logprobs need every prompt row's logits: computed, not taken from the cache
                hit, cached = self._cached_prefix(seq) if prefix_caching and not seq.needs_prompt_rows else ((), 0)
                forked = False
                if seq.parent is not None and not seq.needs_prompt_rows:   # a copy (n > 1): share the prompt
                    shared = self._forked_prefix(seq)
                    if shared is None:           # its prompt is still being computed: next step
                        break
                    if len(shared) * self.block_size > cached:
                        hit, cached, forked = shared, len(shared) * self.block_size, True
                if prefix_caching and seq.num_tokens - cached > self.block_size:
                    # the block after its cached prefix: if a sequence admitted this step computes
                    # the same one, wait a step and find it cached (rather than compute it twice)
                    key = (hit[-1] if hit else None, tuple(seq.token_ids[cached:cached + self.block_size]))
                    if key in computing:
                        self.prefix_deferrals += 1
                        break
                    computing.add(key)
                n = self._chunk(seq.num_tokens - cached, min(budget, prompt_left), False)
                if seq.needs_prompt_rows:
                    n = min(n, PROMPT_ROWS_PER_STEP)
                if n == 0 or not bm.can_allocate(cached + n, hit):
                    break
                prompt_left -= n
                self._remove_waiting(seq)
                seq.parent = None
                if prefix_caching:
                    self.prefix_query_tokens += seq.num_tokens
                if hit:
                    seq.block_table.extend(bm.acquire(hit))
                    seq.num_computed = cached
                    if forked:
                        self.forked_tokens += cached
                    else:
                        self.prefix_hit_tokens += cached
                bm.grow(seq.block_table, cached + n)
                seq.status = SeqStatus.RUNNING
                if seq.scheduled_time is None:
                    seq.scheduled_time = time.monotonic()
                running.append(seq)
                seqs.append(seq)
                num_new.append(n)
                budget -= n

        if not seqs:
            return None
        return self._build(seqs, num_new)

    def _prompt_budget(self) -> int:
        """Prompt tokens this step may carry: the whole step budget, unless a TPOT objective is
        set and sequences are decoding (then what the measured costs allow, at least a block)."""
        cfg = self.config
        if self.costs is None or not any(s.num_tokens - s.num_computed == 1 for s in self.running):
            return cfg.max_tokens
        return self.costs.prompt_budget(cfg.prefill_tpot_ms / 1000.0, self.block_size, cfg.max_tokens)

    def observe(self, step: ScheduledStep, seconds: float) -> None:
        """The engine reports a step's wall time (feeds the TPOT objective's cost model)."""
        if self.costs is None or step.num_drafts:
            return
        decodes = sum(1 for n in step.num_new if n == 1)
        self.costs.observe(decodes, sum(n for n in step.num_new if n > 1), seconds)

    def _drafts(self, seq: Sequence, room: int) -> int:
        """Speculative decoding: how many of a decoding sequence's drafts ride along this step.

        At most `room` (the budget left after this token and one token for each running
        sequence after it), and none when their blocks are not free: drafts never preempt.
        """
        d = min(len(seq.draft_ids), room)
        if d <= 0 or not self.block_manager.can_grow(seq.block_table, seq.num_computed + 1 + d):
            return 0
        return d

    def release_unused_blocks(self, seq: Sequence) -> None:
        """Free a sequence's blocks past the one its next token goes to (speculative decoding:
        blocks grown for drafts that were rejected)."""
        table = seq.block_table
        keep = self.block_manager.blocks_for(seq.num_tokens)
        if len(table) > keep:
            tail = table[keep:]
            del table[keep:]
            self.block_manager.free(tail)

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

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], int]:
        """(blocks, tokens) of `seq`'s longest cached prefix: whole blocks, leaving at least
        one token to compute."""
        hit = self.block_manager.match_prefix(seq.token_ids, (seq.num_tokens - 1) // self.block_size)
        return hit, len(hit) * self.block_size

    def _forked_prefix(self, seq: Sequence) -> list[int] | None:
        """The full prompt blocks `seq` shares with its parent (same prompt, submitted just before it:
        n > 1), leaving at least one token to compute; None while the parent is still computing them
        (admit `seq` later), [] when there is nothing to share (a short prompt, the parent gone)."""
        parent = seq.parent
        k = (seq.num_tokens - 1) // self.block_size
        if k == 0 or parent.status is SeqStatus.FINISHED:
            return []
        if parent.num_computed < k * self.block_size:
            return None
        return parent.block_table[:k]

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
        """The step ran: its new tokens are in the KV cache.

        With a prefix cache, every block this step filled is entered into the tree (its
        K/V is final: `num_new` must count only tokens whose K/V stays).
        """
        if not self.prefix_caching:
            for seq, n in zip(step.seqs, step.num_new):
                seq.num_computed += n
            return
        bs = self.block_size
        cache_blocks = self.block_manager.cache_blocks
        for seq, n in zip(step.seqs, step.num_new):
            old = seq.num_computed
            seq.num_computed = new = old + n
            if new // bs != old // bs:           # a block filled: hash it (never per token)
                cache_blocks(seq.block_table, seq.token_ids, old // bs, new // bs)

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
                try:
                    self.block_manager.free(seq.block_table)
                except ValueError:     # corrupt counts (a bug): still end the request, never wedge
                    log.exception("freeing the blocks of %s failed", seq.request_id)
                    seq.block_table.clear()
            seq.status = SeqStatus.FINISHED
        if drop_running:
            self.running = [s for s in self.running if s.status is SeqStatus.RUNNING]

    # --- tensors ---------------------------------------------------------------------

    def rebuild(self, step: ScheduledStep) -> None:
        """Rebuild a step's tensors after its sequences' drafts changed (a draft model fills
        them in once the step's blocks are allocated)."""
        step.batch = self._build(step.seqs, step.num_new).batch

    def _build(self, seqs: list[Sequence], num_new: list[int]) -> ScheduledStep:
        """The StepBatch of api.py, as views of one int64 buffer (one host->device copy).

        block_tables is as wide as the longest table in this step (not max_context's
        worth of blocks): smaller copies; a runner that needs a fixed width (graph capture)
        copies it into its own padded buffer.
        """
        bs = self.block_size
        num_seqs = len(seqs)
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        sample_rows: list[int] = []
        num_drafts: list[int] = []
        prompt_rows: list[int] = []
        width = 0
        for row, (seq, n) in enumerate(zip(seqs, num_new)):
            start = seq.num_computed
            end = start + n
            table = seq.block_table
            drafts = end - seq.num_tokens          # > 0: speculative drafts after the last token
            num_drafts.append(max(drafts, 0))
            if n == 1:
                tokens.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                if drafts > 0:
                    tokens.extend(seq.token_ids[start:])
                    tokens.extend(seq.draft_ids[:drafts])
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
            # prompt logprobs: rows of positions start.. predict prompt tokens start+1..
            prompt_rows.append(max(0, min(end, seq.num_prompt_tokens - 1) - start) if seq.needs_prompt_rows else 0)
            query_start.append(query_start[-1] + n)
            context_lens.append(end)
            if end >= seq.num_tokens:
                sample_rows.append(row)
            if len(table) > width:
                width = len(table)

        tables: list[int] = []
        for seq in seqs:
            table = seq.block_table
            tables.extend(table)
            if len(table) < width:
                tables.extend([0] * (width - len(table)))
        # speculative decoding: logits at the last token and every draft of each sample row
        logits_rows: list[int] = []
        drafting = any(num_drafts)
        if any(prompt_rows):
            sampled = set(sample_rows)
            for row in range(num_seqs):
                start, stop = query_start[row], query_start[row + 1]
                logits_rows.extend(range(start, start + prompt_rows[row]))
                if not drafting:
                    logits_rows.append(stop - 1)
                elif row in sampled:
                    logits_rows.extend(range(stop - 1 - num_drafts[row], stop))
        else:
            prompt_rows = []
            if drafting:
                for row in sample_rows:
                    stop = query_start[row + 1]
                    logits_rows.extend(range(stop - 1 - num_drafts[row], stop))
        if not drafting:
            num_drafts = []

        flat = torch.tensor(tokens + positions + slots + query_start + context_lens + tables + logits_rows,
                            dtype=torch.int64)
        if self.device.type != "cpu":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        t = len(tokens)
        o = 3 * t
        tables_end = o + 2 * num_seqs + 1 + num_seqs * width
        batch = StepBatch(
            tokens=flat[:t],
            positions=flat[t:2 * t],
            slot_mapping=flat[2 * t:o],
            query_start=flat[o:o + num_seqs + 1],
            context_lens=flat[o + num_seqs + 1:o + 2 * num_seqs + 1],
            block_tables=flat[o + 2 * num_seqs + 1:tables_end].view(num_seqs, width),
            is_decode=t == num_seqs,
            query_lens_host=num_new,
            context_lens_host=context_lens,
            logits_rows=flat[tables_end:] if logits_rows else None,
        )
        return ScheduledStep(seqs, num_new, batch, sample_rows, num_drafts, prompt_rows)


def _waiting_len(seq: Sequence) -> int:
    return seq.num_tokens
