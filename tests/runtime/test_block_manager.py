"""BlockManager: allocation, growth, sharing by reference count, and a hypothesis property
that random alloc/grow/fork/free sequences keep the free list and the counts consistent."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsc.runtime.block_manager import BlockManager, NoFreeBlocks


def test_allocate_and_grow_take_a_new_block_only_when_the_last_is_full():
    bm = BlockManager(num_blocks=8, block_size=4)
    table = bm.allocate(5)                  # 5 tokens: 2 blocks
    assert len(table) == 2 and bm.num_used == 2 and bm.num_free == 6
    for n in (6, 7, 8):                     # fill the second block
        bm.append_slot(table, n)
        assert len(table) == 2
    bm.append_slot(table, 9)                # the 9th token opens a third block
    assert len(table) == 3 and bm.num_used == 3
    assert len(set(table)) == 3
    bm.free(table)
    assert table == [] and bm.num_used == 0 and bm.num_free == 8
    bm.check()


def test_can_allocate_and_can_grow_count_blocks_not_tokens():
    bm = BlockManager(num_blocks=3, block_size=4)
    assert bm.can_allocate(12) and not bm.can_allocate(13)
    table = bm.allocate(6)
    assert bm.can_grow(table, 12) and not bm.can_grow(table, 13)
    assert not bm.can_allocate(5)
    with pytest.raises(NoFreeBlocks):
        bm.grow(table, 13)
    assert len(table) == 2 and bm.num_free == 1          # a failed grow changes nothing


def test_fork_shares_blocks_until_the_last_holder_frees_them():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = bm.allocate(4)
    b = bm.fork(a)
    assert b == a and b is not a
    assert [bm.refcount[x] for x in a] == [2, 2]
    bm.free(a)
    assert bm.num_used == 2 and bm.num_free == 2          # b still holds them
    kept = b[0]
    bm.incref(kept)                                       # e.g. a prefix cache holds it too
    bm.free(b)
    assert bm.num_used == 1 and bm.refcount[kept] == 1 and kept not in bm.free_blocks
    bm.free([kept])
    assert bm.num_used == 0
    bm.check()


def test_double_free_and_incref_of_a_free_block_are_errors():
    bm = BlockManager(num_blocks=2, block_size=2)
    table = bm.allocate(2)
    block = table[0]
    bm.free(list(table))
    with pytest.raises(ValueError, match="double free"):
        bm.free(table)
    with pytest.raises(ValueError, match="incref of free block"):
        bm.incref(block)


def test_freed_blocks_are_reused_last():
    bm = BlockManager(num_blocks=4, block_size=1)
    first = bm.allocate(1)
    bm.free(list(first))
    assert bm.allocate(3)[0] != first[0]


def test_contiguous_layout_is_one_block_per_sequence():
    bm = BlockManager(num_blocks=2, block_size=64)       # block_size = max_context
    a = bm.allocate(10)
    for n in range(11, 65):
        bm.append_slot(a, n)
    assert len(a) == 1
    b = bm.allocate(64)
    assert len(b) == 1 and not bm.can_allocate(1)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(1, 20)),
        st.tuples(st.just("grow"), st.integers(0, 50), st.integers(1, 8)),
        st.tuples(st.just("fork"), st.integers(0, 50)),
        st.tuples(st.just("incref"), st.integers(0, 50)),
        st.tuples(st.just("free"), st.integers(0, 50)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 12), block_size=st.integers(1, 4), program=ops)
def test_random_programs_keep_counts_and_free_list_consistent(num_blocks, block_size, program):
    bm = BlockManager(num_blocks, block_size)
    tables: list[tuple[list[int], int]] = []     # (table, tokens it holds)
    extra: list[int] = []                         # blocks held through incref alone
    for op in program:
        if op[0] == "alloc":
            if bm.can_allocate(op[1]):
                tables.append((bm.allocate(op[1]), op[1]))
            else:
                with pytest.raises(NoFreeBlocks):
                    bm.allocate(op[1])
        elif not tables:
            continue
        else:
            i = op[1] % len(tables)
            table, n = tables[i]
            if op[0] == "grow":
                new_n = n + op[2]
                if bm.can_grow(table, new_n):
                    bm.grow(table, new_n)
                    tables[i] = (table, new_n)
            elif op[0] == "fork":
                tables.append((bm.fork(table), n))
            elif op[0] == "incref" and table:
                bm.incref(table[0])
                extra.append(table[0])
            elif op[0] == "free":
                bm.free(table)
                tables.pop(i)
        bm.check()
        # every count equals the number of holders; used + free == total
        holders = [0] * num_blocks
        for table, n in tables:
            assert len(table) == bm.blocks_for(n)
            for b in table:
                holders[b] += 1
        for b in extra:
            holders[b] += 1
        assert holders == bm.refcount
        assert bm.num_used + bm.num_free == num_blocks
        assert bm.num_used == sum(1 for h in holders if h)
        assert not set(bm.free_blocks) & {b for b, h in enumerate(holders) if h}
    for table, _ in tables:
        bm.free(table)
    for b in extra:
        bm.free([b])
    assert bm.num_free == num_blocks
    bm.check()
