"""Scheduler: the exact StepBatch layout, chunking, budgets, order, preemption, static mode,
and a hypothesis simulation that tracks what every KV slot holds across random workloads."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vsc.runtime.api import EngineConfig, GenerateRequest, InvalidRequest, SamplingParams
from vsc.runtime.block_manager import BlockManager
from vsc.runtime.scheduler import Scheduler, StepCosts
from vsc.runtime.sequence import Sequence, SeqStatus

torch.set_num_threads(1)


def make(num_blocks=8, block_size=4, **cfg):
    cfg.setdefault("max_context", 32)
    return Scheduler(EngineConfig(**cfg), BlockManager(num_blocks, block_size))


def seq(rid, prompt, max_tokens=4):
    return Sequence(GenerateRequest(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0)))


def run_step(sched, step, next_token=lambda s: 99):
    """What the engine does after the forward: advance, append sampled tokens."""
    sched.advance(step)
    for row in step.sample_rows:
        step.seqs[row].token_ids.append(next_token(step.seqs[row]))


def test_step_batch_layout_prefill_then_decode():
    sched = make()
    a, b = seq("a", [10, 11, 12, 13, 14]), seq("b", [20, 21, 22])
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    batch = step.batch
    assert step.seqs == [a, b] and step.num_new == [5, 3] and step.sample_rows == [0, 1]
    assert batch.tokens.tolist() == [10, 11, 12, 13, 14, 20, 21, 22]
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert batch.slot_mapping.tolist() == [0, 1, 2, 3, 4, 8, 9, 10]
    assert batch.query_start.tolist() == [0, 5, 8]
    assert batch.context_lens.tolist() == [5, 3]
    assert batch.block_tables.tolist() == [[0, 1], [2, 0]]
    assert batch.block_tables.shape == (2, 2)
    assert not batch.is_decode and batch.num_seqs == 2
    assert batch.query_lens_host == [5, 3] and batch.context_lens_host == [5, 3]
    assert a.status is SeqStatus.RUNNING and not sched.waiting
    run_step(sched, step, lambda s: 15 if s is a else 23)

    step = sched.schedule()
    batch = step.batch
    assert batch.is_decode
    assert batch.tokens.tolist() == [15, 23]
    assert batch.positions.tolist() == [5, 3]
    assert batch.slot_mapping.tolist() == [5, 11]
    assert batch.query_start.tolist() == [0, 1, 2] and batch.context_lens.tolist() == [6, 4]
    run_step(sched, step, lambda s: 24)

    step = sched.schedule()                  # b's 5th token opens its second block (3)
    assert step.batch.slot_mapping.tolist() == [6, 12]
    assert step.batch.block_tables.tolist() == [[0, 1], [2, 3]]


def test_chunked_prefill_splits_a_prompt_and_samples_only_after_the_last_chunk():
    sched = make(chunked_prefill=4)
    a = seq("a", range(100, 110))
    sched.add(a)
    seen = []
    for _ in range(3):
        step = sched.schedule()
        seen.append((step.num_new, step.sample_rows, step.batch.positions.tolist(),
                     step.batch.context_lens.tolist()))
        run_step(sched, step)
    assert seen == [
        ([4], [], [0, 1, 2, 3], [4]),
        ([4], [], [4, 5, 6, 7], [8]),
        ([2], [0], [8, 9], [10]),
    ]
    assert a.token_ids[-1] == 99 and a.num_computed == 10


def test_a_decode_runs_alongside_a_new_chunk_in_one_step():
    sched = make(chunked_prefill=3, num_blocks=16)
    a = seq("a", [1, 2])
    sched.add(a)
    run_step(sched, sched.schedule())
    sched.add(seq("b", range(10, 18)))
    step = sched.schedule()
    assert step.num_new == [1, 3] and step.sample_rows == [0]
    assert not step.batch.is_decode


def test_step_costs_learn_decode_and_prompt_token_costs():
    c = StepCosts()
    assert c.prompt_budget(0.1, 16, 2048) == 2048                  # nothing known: no cap
    c.observe(4, 0, 0.05)                                          # decode-only step
    assert c.decode_s == 0.05 and c.prompt_budget(0.1, 16, 2048) == 2048      # a token's cost unknown
    c.observe(4, 8, 9.0)                                           # too few prompt tokens to learn from
    assert c.token_s is None
    c.observe(4, 100, 0.15)                                        # 0.1 s more for 100 prompt tokens
    assert c.token_s == pytest.approx(0.001)
    assert c.prompt_budget(0.1, 16, 2048) == 50                    # (0.1 - 0.05) / 0.001
    assert c.prompt_budget(0.04, 16, 2048) == 16                   # decodes alone exceed it: a block
    assert c.prompt_budget(10.0, 16, 2048) == 2048
    c.observe(0, 200, 0.4)                                         # a prompt-only step: not the capped kind
    assert c.token_s == pytest.approx(0.001)
    c.observe(4, 50, 0.05 + 50 * 0.002)                            # a capped step: 2 ms a token
    assert c.token_s == pytest.approx(0.8 * 0.001 + 0.2 * 0.002)
    fresh = StepCosts()
    fresh.observe(0, 400, 0.4)                                     # the first estimate may come from prompts alone
    assert fresh.token_s == pytest.approx(0.001)
    assert fresh.prompt_budget(0.1, 16, 2048) == 100               # no decode-only step yet: decodes counted free
    fresh.observe(8, 50, 0.07)                                     # a mixed step then prices the decodes
    assert fresh.decode_s == pytest.approx(0.02)
    assert fresh.prompt_budget(0.1, 16, 2048) == 80


def test_a_tpot_objective_caps_the_prompt_tokens_of_steps_with_decodes():
    sched = make(chunked_prefill=64, num_blocks=64, block_size=4, max_context=256, max_tokens=256,
                 prefill_tpot_ms=100.0)
    a = seq("a", [1, 2], max_tokens=50)
    sched.add(a)
    first = sched.schedule()
    sched.observe(first, 0.2)                                      # a prompt-only step: uncapped, learns nothing
    run_step(sched, first)
    step = sched.schedule()                                        # a decodes alone
    assert step.num_new == [1]
    sched.observe(step, 0.05)
    run_step(sched, step)
    sched.add(seq("b", range(10, 110)))                            # a 100-token prompt arrives
    step = sched.schedule()
    assert step.num_new == [1, 64]                                 # cost of a prompt token unknown: the chunk
    sched.observe(step, 0.05 + 64 * 0.002)                         # 2 ms a prompt token
    run_step(sched, step)
    step = sched.schedule()
    assert step.num_new == [1, 25]                                 # (100 - 50) ms / 2 ms
    sched.observe(step, 0.05 + 25 * 0.002)
    run_step(sched, step)
    plain = make(chunked_prefill=64, num_blocks=64, block_size=4, max_context=256, max_tokens=256)
    assert plain.costs is None


def test_token_budget_without_chunking_waits_or_splits_only_an_oversized_prompt():
    sched = make(max_tokens=8, num_blocks=16, max_context=64)
    a, b, c = seq("a", range(6)), seq("b", range(5)), seq("c", range(1))
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()
    assert step.seqs == [a]                  # b does not fit the 2 tokens left, and c waits behind it
    run_step(sched, step)
    step = sched.schedule()
    assert step.seqs == [a, b, c] and step.num_new == [1, 5, 1]

    big = make(max_tokens=8, num_blocks=16, max_context=64)
    d = seq("d", range(20))
    big.add(d)
    lens = []
    while d.num_computed < 20:
        step = big.schedule()
        lens.append(step.num_new)
        run_step(big, step)
    assert lens == [[8], [8], [4]]


def test_a_split_prefill_keeps_going_while_decodes_take_part_of_the_budget():
    sched = make(max_tokens=8, num_blocks=32, max_context=64)
    a, b = seq("a", [1, 2]), seq("b", range(21))
    sched.add(a)
    sched.add(b)
    got = []
    while b.num_computed < 21:
        step = sched.schedule()
        got.append(step.num_new)
        run_step(sched, step)
    assert got == [[2, 6], [1, 7], [1, 7], [1, 1]]


def test_max_batch_caps_running_sequences():
    sched = make(max_batch=2, num_blocks=16)
    for i in range(5):
        sched.add(seq(f"s{i}", [i + 1]))
    step = sched.schedule()
    assert [s.request_id for s in step.seqs] == ["s0", "s1"]
    assert len(sched.running) == 2 and len(sched.waiting) == 3


def test_orders_fcfs_and_shortest_first():
    def admitted(order):
        sched = make(order=order, max_batch=1, num_blocks=16)
        for rid, n in (("long", 6), ("short", 2), ("mid", 4), ("short2", 2)):
            sched.add(seq(rid, range(n)))
        out = []
        while sched.has_work():
            step = sched.schedule()
            if step.num_new[0] > 1:
                out.append(step.seqs[0].request_id)
            run_step(sched, step)
            sched.finish([s for s in step.seqs if s.num_output_tokens >= 1])
        return out

    assert admitted("fcfs") == ["long", "short", "mid", "short2"]
    assert admitted("shortest-first") == ["short", "short2", "mid", "long"]


def test_preemption_frees_the_newest_and_it_resumes_first_with_its_output():
    sched = make(num_blocks=4, block_size=2)
    a, b = seq("a", [1, 2, 3, 4]), seq("b", [5, 6, 7])
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule(), lambda s: 50)     # a: 5 tokens, b: 4 tokens; 4 blocks used
    assert sched.block_manager.num_free == 0
    sched.add(seq("c", [9]))
    step = sched.schedule()                             # a needs a 3rd block: b (newest) is preempted
    assert step.seqs == [a]
    assert sched.num_preemptions == 1
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and b.block_table == []
    assert b.token_ids == [5, 6, 7, 50]                 # the output survives
    assert sched.waiting[0] is b and sched.running == [a]
    run_step(sched, step)
    sched.finish([a])
    step = sched.schedule()
    assert step.seqs[0] is b and step.num_new[0] == 4   # recompute prompt + output
    assert step.batch.tokens.tolist()[:4] == [5, 6, 7, 50]


def test_shortest_first_still_resumes_a_preempted_sequence_first():
    sched = make(order="shortest-first", max_batch=1, num_blocks=16)
    long_one, short = seq("long", range(9)), seq("short", [1])
    sched.add(short)
    sched._preempt(long_one)                            # as if it had been running
    assert [s.request_id for s in sched.schedule().seqs] == ["long"]


def test_the_newest_sequence_preempts_itself_when_it_needs_a_block():
    sched = make(num_blocks=3, block_size=2)
    a, b = seq("a", [1, 2, 3]), seq("b", [4, 5])
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())                   # a: 4 tokens (2 blocks), b: 3 tokens (1 block) -> 0 free
    step = sched.schedule()                             # a needs no block; b needs its 2nd: b is newest
    assert step.seqs == [a] and sched.waiting[0] is b


def test_static_mode_admits_only_when_nothing_runs():
    sched = make(mode="static", max_batch=4, num_blocks=16)
    a = seq("a", [1, 2])
    sched.add(a)
    run_step(sched, sched.schedule())
    sched.add(seq("late", [3, 4]))
    step = sched.schedule()
    assert step.seqs == [a]
    run_step(sched, step)
    sched.finish([a])
    assert [s.request_id for s in sched.schedule().seqs] == ["late"]
    assert sched.block_manager.num_used == 1


def test_check_request_names_the_limits():
    sched = make(max_context=16, num_blocks=2, block_size=4)
    with pytest.raises(InvalidRequest, match=r"maximum context of 16 tokens allows \(at most 15 prompt tokens\)"):
        sched.check_request(16, 1)
    with pytest.raises(InvalidRequest, match="plus max_tokens .4. exceeds this model's maximum context of 16"):
        sched.check_request(13, 4)
    with pytest.raises(InvalidRequest, match="KV cache capacity of 8 tokens"):
        sched.check_request(5, 4)
    sched.check_request(5, 3)


def test_contiguous_cache_is_one_block_of_max_context_per_sequence():
    sched = make(num_blocks=3, block_size=16, max_context=16)
    a, b = seq("a", [1, 2, 3]), seq("b", [4, 5])
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert step.batch.slot_mapping.tolist() == [0, 1, 2, 16, 17]
    assert step.batch.block_tables.tolist() == [[0], [1]]
    run_step(sched, step)
    assert sched.schedule().batch.slot_mapping.tolist() == [3, 18]


def test_finish_releases_waiting_and_running_sequences():
    sched = make(max_batch=1, num_blocks=8)
    a, b = seq("a", [1, 2]), seq("b", [3])
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.finish([a, b])
    assert not sched.has_work() and sched.block_manager.num_used == 0
    assert a.is_finished and b.is_finished


# --- a random workload against a mirror of the KV cache ---------------------------------

configs = st.fixed_dictionaries({
    "block_size": st.sampled_from([1, 2, 4, 16]),
    "num_blocks": st.integers(4, 24),
    "max_batch": st.integers(1, 6),
    "max_tokens": st.integers(1, 24),
    "chunked_prefill": st.sampled_from([0, 0, 1, 3, 8]),
    "order": st.sampled_from(["fcfs", "shortest-first"]),
    "mode": st.sampled_from(["continuous", "continuous", "static"]),
})
workloads = st.lists(st.tuples(st.integers(0, 6), st.integers(1, 20), st.integers(1, 10)), min_size=1, max_size=10)


@settings(max_examples=150, deadline=None)
@given(cfg=configs, work=workloads)
def test_random_workloads_finish_and_never_read_foreign_kv(cfg, work):
    """Requests (arrival step, prompt length, max_tokens) run to completion; each step only
    reads slots its own sequence wrote at those positions, respects max_batch, the token
    budget and the chunk size, and the pool is empty at the end."""
    num_blocks, block_size = cfg.pop("num_blocks"), cfg.pop("block_size")
    sched = make(num_blocks, block_size, max_context=64, **cfg)
    pending = []
    for i, (arrive, n_prompt, n_out) in enumerate(work):
        try:
            sched.check_request(n_prompt, n_out)
        except InvalidRequest:
            continue
        pending.append((arrive, seq(f"r{i}", [(i * 31 + j) % 97 for j in range(n_prompt)], n_out)))
    all_seqs = [s for _, s in pending]
    mirror: dict[int, tuple[str, int, int]] = {}         # slot -> (request, position, token)
    for step_no in range(2000):
        for arrive, s in [p for p in pending if p[0] <= step_no]:
            sched.add(s)
        pending = [p for p in pending if p[0] > step_no]
        if not sched.has_work():
            if not pending:
                break
            continue
        step = sched.schedule()
        assert step is not None, "work but nothing scheduled"
        assert len(step.seqs) <= cfg["max_batch"] and sum(step.num_new) <= cfg["max_tokens"]
        assert len({id(s) for s in step.seqs}) == len(step.seqs)
        bm = sched.block_manager
        bm.check()
        held = [b for s in sched.running for b in s.block_table]
        assert len(held) == len(set(held)) == bm.num_used
        slots = step.batch.slot_mapping.tolist()
        t = 0
        for s, n in zip(step.seqs, step.num_new):
            if cfg["chunked_prefill"] and n > 1:
                assert n <= cfg["chunked_prefill"]
            for pos in range(s.num_computed):
                slot = s.block_table[pos // block_size] * block_size + pos % block_size
                assert mirror.get(slot) == (s.request_id, pos, s.token_ids[pos])
            for pos in range(s.num_computed, s.num_computed + n):
                assert slots[t] == s.block_table[pos // block_size] * block_size + pos % block_size
                mirror[slots[t]] = (s.request_id, pos, s.token_ids[pos])
                t += 1
        run_step(sched, step, lambda s: (s.num_tokens * 7) % 97)
        sched.finish([step.seqs[r] for r in step.sample_rows
                      if step.seqs[r].num_output_tokens >= step.seqs[r].params.max_tokens])
    else:
        pytest.fail("the workload did not finish")
    assert all(s.is_finished and s.num_output_tokens == s.params.max_tokens for s in all_seqs)
    assert sched.block_manager.num_used == 0 and not sched.running and not sched.waiting
