"""Prefix cache: the radix tree, the block manager's evictable pool, and the scheduler's
admission with cached prefixes (hits, misses, eviction order, refcounts, and a hypothesis
simulation that checks every reused KV slot was computed after the very same prefix)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vsc.runtime.api import EngineConfig, GenerateRequest, InvalidRequest, SamplingParams
from vsc.runtime.block_manager import BlockManager
from vsc.runtime.prefix_cache import RadixTree
from vsc.runtime.scheduler import Scheduler
from vsc.runtime.sequence import Sequence

torch.set_num_threads(1)


def fill(tree: RadixTree, tokens: list[int], blocks: list[int]) -> None:
    """Cache `tokens` (whole blocks) as a chain of `blocks`."""
    bs = tree.block_size
    parent = None
    for i, block in enumerate(blocks):
        assert tree.insert(parent, tuple(tokens[i * bs:(i + 1) * bs]), block) == block
        parent = block


# --- the radix tree ---------------------------------------------------------------------

def test_tree_hits_the_whole_chain_and_stops_at_the_first_mismatch():
    tree = RadixTree(block_size=2)
    fill(tree, [1, 2, 3, 4, 5, 6], [10, 11, 12])
    assert tree.match([1, 2, 3, 4, 5, 6, 7], max_blocks=3) == [10, 11, 12]
    assert tree.match([1, 2, 3, 4, 5, 6, 7], max_blocks=2) == [10, 11]
    assert tree.match([1, 2, 3, 9, 5, 6], max_blocks=3) == [10]         # block 1 differs: 2 not looked at
    assert tree.match([1, 2, 3], max_blocks=3) == [10]                   # a partial block never hits
    assert tree.match([2, 1, 3, 4], max_blocks=2) == []
    tree.check()


def test_tree_same_tokens_after_another_prefix_or_shifted_do_not_hit():
    tree = RadixTree(block_size=2)
    fill(tree, [1, 2, 3, 4], [10, 11])
    assert tree.match([3, 4, 1, 2], max_blocks=2) == []                 # block [3, 4] exists, but after [1, 2]
    assert tree.match([0, 1, 2, 3, 4], max_blocks=2) == []              # shifted by one token
    assert tree.match([2, 3, 4], max_blocks=1) == []
    assert tree.insert(None, (3, 4), 20) == 20                           # [3, 4] at the start is another block
    assert tree.match([3, 4, 1, 2], max_blocks=2) == [20]
    tree.check()


def test_tree_insert_returns_an_existing_block_and_refuses_an_orphan():
    tree = RadixTree(block_size=2)
    fill(tree, [1, 2, 3, 4], [10, 11])
    assert tree.insert(None, (1, 2), 30) == 10                           # computed again elsewhere: share 10
    assert tree.insert(10, (3, 4), 31) == 11
    assert tree.insert(99, (5, 6), 32) is None                           # parent not cached: nothing inserted
    assert 30 not in tree and 32 not in tree and len(tree) == 2
    with pytest.raises(ValueError, match="already cached"):
        tree.insert(10, (7, 8), 11)
    with pytest.raises(ValueError, match="only full blocks"):
        tree.insert(None, (1,), 40)


def test_tree_remove_takes_the_subtree():
    tree = RadixTree(block_size=1)
    fill(tree, [1, 2, 3], [10, 11, 12])
    assert tree.insert(10, (5,), 13) == 13
    assert sorted(tree.remove(11)) == [11, 12] and tree.remove(13) == [13]
    assert tree.match([1, 2, 3], 3) == [10] and len(tree) == 1
    tree.check()


# --- the block manager ------------------------------------------------------------------

def cached_bm(num_blocks=8, block_size=2, capacity=0) -> BlockManager:
    bm = BlockManager(num_blocks, block_size)
    bm.enable_prefix_cache(capacity)
    return bm


def compute(bm: BlockManager, tokens: list[int], hit: list[int] | None = None) -> list[int]:
    """A sequence's table for `tokens`: take `hit`, allocate the rest, cache its full blocks."""
    hit = hit if hit is not None else bm.match_prefix(tokens, (len(tokens) - 1) // bm.block_size)
    table = bm.acquire(hit)
    bm.grow(table, len(tokens))
    bm.cache_blocks(table, tokens, len(hit), len(tokens) // bm.block_size)
    bm.check()
    return table


def test_a_freed_cached_block_is_evictable_and_a_hit_holds_it_again():
    bm = cached_bm()
    a = compute(bm, [1, 2, 3, 4, 5])                 # 2 full blocks cached, 1 partial
    blocks = list(a)
    bm.free(a)
    assert bm.num_used == 0 and bm.num_free == 8 and bm.num_cached == 2
    assert list(bm.evictable) == [blocks[1], blocks[0]]     # released back to front
    assert blocks[2] in bm.free_blocks                        # the partial block is not cached
    b = compute(bm, [1, 2, 3, 4, 9, 9, 9])
    assert b[:2] == blocks[:2] and [bm.refcount[x] for x in b] == [1, 1, 1, 1]
    c = compute(bm, [1, 2, 7, 7])
    assert c[0] == blocks[0] and bm.refcount[blocks[0]] == 2 and bm.refcount[blocks[1]] == 1
    bm.free(b)
    bm.free(c)
    assert bm.num_used == 0 and all(x == 0 for x in bm.refcount)
    bm.check()


def test_allocation_takes_never_cached_blocks_first_then_evicts_lru():
    bm = cached_bm(num_blocks=6, block_size=2)
    old = compute(bm, [1, 2, 3, 4])                  # cached first ...
    new = compute(bm, [5, 6, 7, 8])                  # ... then these
    o, n = list(old), list(new)
    bm.free(old)
    bm.free(new)
    assert list(bm.evictable) == [o[1], o[0], n[1], n[0]]
    t = bm.allocate(4)                                # the two never-cached blocks
    assert set(t).isdisjoint(o + n) and bm.num_evicted == 0
    t2 = bm.allocate(2)                               # now the LRU cached one: old's last block
    assert t2 == [o[1]] and bm.num_evicted == 1
    assert bm.match_prefix([1, 2, 3, 4, 0], 2) == [o[0]]
    bm.allocate(2)                                    # old's first block
    assert bm.match_prefix([1, 2, 3, 4, 0], 2) == [] and bm.match_prefix([5, 6, 7, 8, 0], 2) == n
    bm.check()


def test_evicting_a_block_uncaches_its_descendants():
    bm = cached_bm(num_blocks=4, block_size=1)
    a = compute(bm, [1, 2, 3, 4])
    blocks = list(a)
    bm.free(a[:])                                     # all evictable, deepest least recent
    bm.incref(blocks[0])                              # the root block is hit, then released: most recent
    bm.free([blocks[0]])
    assert next(iter(bm.evictable)) == blocks[3]
    # make the first block the LRU one, then evict it: the whole chain goes
    bm.incref(blocks[3])
    bm.free([blocks[3]])
    bm.incref(blocks[2])
    bm.free([blocks[2]])
    bm.incref(blocks[1])
    bm.free([blocks[1]])
    assert next(iter(bm.evictable)) == blocks[0]
    bm.allocate(1)
    assert bm.num_cached == 0 and len(bm.free_blocks) == 3 and not bm.evictable
    bm.check()


def test_a_held_block_is_never_evicted():
    bm = cached_bm(num_blocks=4, block_size=2)
    a = compute(bm, [1, 2, 3, 4])
    b = compute(bm, [1, 2, 5, 6])                     # shares a's first block
    assert b[0] == a[0]
    a_blocks = list(a)
    bm.free(a)                                        # a's first block still held by b; its second evictable
    assert list(bm.evictable) == [a_blocks[1]]
    assert not bm.can_allocate(6) and bm.can_allocate(4)
    bm.allocate(4)                                    # takes the free block and evicts a's second
    assert bm.refcount[b[0]] == 1 and b[0] in bm.prefix_tree and bm.num_evicted == 1
    assert bm.match_prefix([1, 2, 5, 6, 0], 2) == b   # b's chain is intact
    bm.check()


def test_can_allocate_counts_hit_blocks_taken_out_of_the_pool():
    bm = cached_bm(num_blocks=3, block_size=2)
    a = compute(bm, [1, 2, 3, 4, 5])
    hit = bm.match_prefix([1, 2, 3, 4, 5, 6], 2)
    bm.free(a)
    assert bm.num_free == 3
    assert bm.can_allocate(6, hit)                     # 2 cached + 1 new = all 3
    assert not bm.can_allocate(8, hit)
    b = bm.acquire(hit)
    bm.grow(b, 6)
    assert bm.num_free == 0
    bm.check()


def test_capacity_bounds_the_evictable_pool():
    bm = cached_bm(num_blocks=8, block_size=1, capacity=2)
    a = compute(bm, [1, 2, 3, 4, 5])
    blocks = list(a)
    bm.free(a)
    assert len(bm.evictable) == 2 and bm.num_cached == 2 and bm.num_free == 8
    assert bm.match_prefix([1, 2, 3, 4, 5], 5) == blocks[:2]     # the first blocks were released last
    bm.check()


def test_a_duplicate_block_is_swapped_for_the_cached_one():
    bm = cached_bm(num_blocks=8, block_size=2)
    a = bm.allocate(5)
    b = bm.allocate(5)
    bm.cache_blocks(a, [1, 2, 3, 4, 5], 0, 2)
    b_own = list(b)
    bm.cache_blocks(b, [1, 2, 3, 4, 6], 0, 2)         # computed the same prefix in the same step
    assert b[:2] == a[:2] and b[2] == b_own[2]
    assert all(x in bm.free_blocks for x in b_own[:2])
    assert bm.refcount[a[0]] == bm.refcount[a[1]] == 2
    bm.free(a)
    bm.free(b)
    assert bm.num_used == 0
    bm.check()


ops = st.lists(st.tuples(st.sampled_from(["new", "free", "alloc"]), st.integers(0, 3), st.integers(1, 12)),
               max_size=40)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(2, 12), block_size=st.integers(1, 3), capacity=st.integers(0, 3), program=ops)
def test_random_programs_keep_refcounts_and_cache_consistent(num_blocks, block_size, capacity, program):
    """Sequences from 4 shared prefixes come and go: counts equal holders, and every hit
    block holds exactly the tokens it is looked up by."""
    bm = cached_bm(num_blocks, block_size, capacity)
    content: dict[int, tuple[int, ...]] = {}          # block -> the whole prefix it was computed after
    live: list[list[int]] = []
    plain: list[list[int]] = []
    for kind, family, length in program:
        if kind == "new":
            tokens = [family * 100 + j for j in range(length)] if length % 3 else [family] + list(range(length))
            hit = bm.match_prefix(tokens, (len(tokens) - 1) // block_size)
            for i, block in enumerate(hit):
                assert content[block] == tuple(tokens[:(i + 1) * block_size])
            if not bm.can_allocate(len(tokens), hit):
                continue
            nodes = {b: bm.prefix_tree.node(b) for b in content}
            table = compute(bm, tokens, hit)
            for i in range(len(tokens) // block_size):
                node = bm.prefix_tree.node(table[i])
                if node is None:
                    continue
                want = tuple(tokens[:(i + 1) * block_size])
                if nodes.get(table[i]) is node:            # cached before: a hit or shared on insert
                    assert content[table[i]] == want
                else:                                      # newly cached (maybe a reused, evicted block)
                    content[table[i]] = want
            live.append(table)
        elif kind == "free" and live:
            bm.free(live.pop(family % len(live)))
        elif kind == "alloc" and bm.can_allocate(length):
            plain.append(bm.allocate(length))
        # a block leaving the cache may be reused for anything
        for block in list(content):
            if block not in bm.prefix_tree:
                del content[block]
        bm.check()
        holders = [0] * num_blocks
        for table in live + plain:
            for b in table:
                holders[b] += 1
        assert holders == bm.refcount
    for table in live + plain:
        bm.free(table)
    assert bm.num_used == 0
    bm.check()


# --- the scheduler ----------------------------------------------------------------------

def make(num_blocks=16, block_size=4, **cfg):
    cfg.setdefault("max_context", 64)
    cfg.setdefault("prefix_cache", "radix")
    return Scheduler(EngineConfig(**cfg), BlockManager(num_blocks, block_size))


def seq(rid, prompt, max_tokens=4):
    return Sequence(GenerateRequest(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0)))


def run_to_end(sched, s, token=99):
    while not s.is_finished:
        step = sched.schedule()
        sched.advance(step)
        for row in step.sample_rows:
            step.seqs[row].token_ids.append(token)
        sched.finish([x for x in step.seqs if x.num_output_tokens >= x.params.max_tokens])


def test_a_second_request_with_the_same_prefix_computes_only_the_tail():
    sched = make()
    shared = list(range(1, 13))                        # 3 full blocks
    a = seq("a", shared + [50, 51])
    sched.add(a)
    run_to_end(sched, a)
    b = seq("b", shared + [60, 61, 62])
    sched.add(b)
    step = sched.schedule()
    assert step.num_new == [3] and b.num_computed == 12
    assert step.batch.tokens.tolist() == [60, 61, 62]
    assert step.batch.positions.tolist() == [12, 13, 14]
    assert b.block_table[:3] == sched.block_manager.match_prefix(shared, 3)
    assert sched.prefix_hit_tokens == 12 and sched.prefix_query_tokens == len(a.token_ids) - 4 + 15
    sched.block_manager.check()


def test_a_hit_leaves_at_least_one_token_to_compute():
    sched = make()
    p = list(range(1, 9))                              # exactly 2 full blocks
    a = seq("a", p)
    sched.add(a)
    run_to_end(sched, a)
    b = seq("b", p)
    sched.add(b)
    step = sched.schedule()
    assert step.num_new == [4] and step.sample_rows == [0]      # the last block is recomputed
    assert step.batch.positions.tolist() == [4, 5, 6, 7]
    sched.advance(step)                                # and then shared with a's cached copy
    assert b.block_table == sched.block_manager.match_prefix(p + [0], 2)
    sched.block_manager.check()


def test_generated_tokens_are_cached_too():
    sched = make()
    a = seq("a", [1, 2, 3], max_tokens=6)              # prompt + output fill 2 blocks
    sched.add(a)
    run_to_end(sched, a, token=7)
    assert a.token_ids == [1, 2, 3, 7, 7, 7, 7, 7, 7]
    b = seq("b", [1, 2, 3, 7, 7, 7, 7, 7, 7, 8])
    sched.add(b)
    assert sched.schedule().num_new == [2] and b.num_computed == 8


def test_a_preempted_sequence_resumes_from_its_cached_blocks():
    sched = make(num_blocks=4, block_size=2)
    a, b = seq("a", [1, 2, 3, 4]), seq("b", [5, 6, 7])
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    sched.advance(step)
    for s in step.seqs:
        s.token_ids.append(50)
    step = sched.schedule()                            # a needs a 3rd block: b is preempted
    assert sched.num_preemptions == 1 and b.num_computed == 0
    sched.advance(step)
    a.token_ids.append(51)
    sched.finish([a])
    step = sched.schedule()                            # b's first block [5, 6] is still cached
    assert step.seqs == [b] and step.num_new == [2] and b.num_computed == 2
    assert step.batch.tokens.tolist() == [7, 50]


def test_requests_arriving_together_behind_one_prefix_compute_it_once():
    sched = make(num_blocks=32)
    shared = list(range(1, 13))                        # 3 full blocks, cached by nobody yet
    a, b, c = seq("a", shared + [50, 51]), seq("b", shared + [60, 61, 62]), seq("c", shared + [70])
    other = seq("d", [90, 91, 92])
    for s in (a, b, c, other):
        sched.add(s)
    step = sched.schedule()                            # b would compute a's blocks again: it waits
    assert step.seqs == [a] and step.num_new == [14] and sched.prefix_deferrals == 1
    sched.advance(step)
    a.token_ids.append(99)
    step = sched.schedule()                            # now the prefix is cached: b and c hit it
    assert step.seqs == [a, b, c, other] and step.num_new == [1, 3, 1, 3]
    assert b.num_computed == 12 and c.num_computed == 12 and sched.prefix_hit_tokens == 24
    assert b.block_table[:3] == a.block_table[:3] == c.block_table[:3]
    sched.block_manager.check()


def test_different_prefixes_are_admitted_together():
    sched = make(num_blocks=32)
    a, b = seq("a", list(range(1, 10))), seq("b", list(range(20, 29)))
    sched.add(a)
    sched.add(b)
    assert sched.schedule().seqs == [a, b] and sched.prefix_deferrals == 0


def test_prefix_cache_off_never_looks_up():
    sched = make(prefix_cache="none")
    a = seq("a", range(1, 10))
    sched.add(a)
    run_to_end(sched, a)
    b = seq("b", range(1, 10))
    sched.add(b)
    assert sched.schedule().num_new == [9]
    assert sched.prefix_query_tokens == 0 and sched.block_manager.num_cached == 0


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="prefix cache policy"):
        make(prefix_cache="lfu")


configs = st.fixed_dictionaries({
    "block_size": st.sampled_from([1, 2, 4]),
    "num_blocks": st.integers(6, 24),
    "max_batch": st.integers(1, 6),
    "max_tokens": st.integers(4, 24),
    "chunked_prefill": st.sampled_from([0, 0, 1, 3]),
    "prefix_cache_capacity": st.sampled_from([0, 0, 1, 4]),
})
workloads = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 2), st.integers(0, 12), st.integers(1, 8)),
                     min_size=1, max_size=10)


@settings(max_examples=150, deadline=None)
@given(cfg=configs, work=workloads)
def test_random_shared_prefix_workloads_read_only_kv_of_the_same_prefix(cfg, work):
    """Requests (arrival, prefix family, own tokens, max_tokens) over 3 shared prefixes: every
    slot a step reads holds the K/V of the same token at the same position after the same
    whole prefix (what exactness needs), and everything finishes with balanced counts."""
    num_blocks, block_size = cfg.pop("num_blocks"), cfg.pop("block_size")
    sched = make(num_blocks, block_size, max_context=64, **cfg)
    prefixes = [[(f * 37 + j) % 89 + 1 for j in range(9)] for f in range(3)]
    pending = []
    for i, (arrive, family, own, n_out) in enumerate(work):
        prompt = prefixes[family] + [(i * 31 + j) % 97 for j in range(own)]
        try:
            sched.check_request(len(prompt), n_out)
        except InvalidRequest:
            continue
        pending.append((arrive, seq(f"r{i}", prompt, n_out)))
    all_seqs = [s for _, s in pending]
    mirror: dict[int, tuple[int, ...]] = {}          # slot -> the tokens up to and including its own
    for step_no in range(2000):
        for _, s in [p for p in pending if p[0] <= step_no]:
            sched.add(s)
        pending = [p for p in pending if p[0] > step_no]
        if not sched.has_work():
            if not pending:
                break
            continue
        step = sched.schedule()
        assert step is not None, "work but nothing scheduled"
        bm = sched.block_manager
        bm.check()
        slots = step.batch.slot_mapping.tolist()
        written = set()
        t = 0
        for s, n in zip(step.seqs, step.num_new):
            for pos in range(s.num_computed):
                slot = s.block_table[pos // block_size] * block_size + pos % block_size
                assert mirror.get(slot) == tuple(s.token_ids[:pos + 1]), (s, pos)
            for pos in range(s.num_computed, s.num_computed + n):
                assert bm.refcount[s.block_table[pos // block_size]] == 1, "writes into a shared block"
                mirror[slots[t]] = tuple(s.token_ids[:pos + 1])
                written.add(slots[t])
                t += 1
        assert len(written) == len(slots)
        sched.advance(step)
        for row in step.sample_rows:
            s = step.seqs[row]
            s.token_ids.append((s.num_tokens * 7) % 97)
        sched.finish([step.seqs[r] for r in step.sample_rows
                      if step.seqs[r].num_output_tokens >= step.seqs[r].params.max_tokens])
    else:
        pytest.fail("the workload did not finish")
    assert all(s.is_finished and s.num_output_tokens == s.params.max_tokens for s in all_seqs)
    assert sched.block_manager.num_used == 0 and not sched.running and not sched.waiting
    sched.block_manager.check()
    assert sched.prefix_hit_tokens <= sched.prefix_query_tokens
