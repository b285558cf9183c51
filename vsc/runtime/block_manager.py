"""Paged KV-cache bookkeeping: which cache blocks are free, and who holds the others.

The cache is `num_blocks` blocks of `block_size` token slots; a sequence's block table
lists its blocks in order, so token `p` lives in slot
`table[p // block_size] * block_size + p % block_size`. Blocks carry reference counts so
that sequences can share full blocks (`fork` / `incref`, and prefix-cache hits); a block
is released only when its count drops to 0.

A contiguous cache is the same thing with `block_size = max_context` and one block per
sequence, so the scheduler needs no second code path.

Writing into a block whose count is above 1 would change another sequence's KV: callers
share only full blocks (copy-on-write of a partial last block is not done here).

Prefix cache (`enable_prefix_cache`, the prefix-cache pass). Full blocks a sequence has
computed are entered into a `RadixTree` (`cache_blocks`). A released block whose content
is cached does not go back to the plain free list but to an *evictable* pool in LRU order
(least recently released first); a hit (`match_prefix`, then `acquire`) takes blocks out
of that pool again. Allocation takes never-cached free blocks first, then evicts the
least recently used evictable block, uncaching it and its whole subtree (its descendants
can no longer be found: their keys name it); descendants nobody holds move to the plain
free list, held ones just stop being cached. A block with a count above 0 is never
evicted. Sequences release their tables back to front, so a sequence's deepest blocks
are the least recent and go first: the tree shrinks mostly from its leaves. `capacity`
> 0 bounds the evictable pool (blocks kept warm for reuse); 0 lets every free block keep
its content until it is needed. Evictable blocks count as free (`num_free`): they are
reclaimed on demand, so caching never makes an allocation fail or a sequence preempt.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Sequence

from vsc.runtime.prefix_cache import RadixTree


class NoFreeBlocks(Exception):
    """An allocation asked for more blocks than are free (callers check `can_*` first)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # FIFO: a freed block is reused as late as possible (makes use-after-free bugs
        # show up in tests).
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.refcount = [0] * num_blocks
        # prefix cache (off until enable_prefix_cache): cached blocks nobody holds, LRU first
        self.prefix_tree: RadixTree | None = None
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.cache_capacity = 0
        self.num_evicted = 0

    def enable_prefix_cache(self, capacity: int = 0) -> None:
        """Keep computed full blocks for reuse; `capacity` > 0 caps the blocks kept cached
        that no sequence holds (0: any free block may keep cached content)."""
        if capacity < 0:
            raise ValueError(f"prefix cache capacity must be >= 0, got {capacity}")
        if self.prefix_tree is None:
            if self.num_used:
                raise ValueError("enable the prefix cache before allocating blocks")
            self.prefix_tree = RadixTree(self.block_size)
        self.cache_capacity = capacity

    # --- queries ---------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: plain free ones plus evictable cached ones."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks whose content is in the prefix cache (held or evictable)."""
        return 0 if self.prefix_tree is None else len(self.prefix_tree)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks needed to hold `n_tokens` tokens."""
        return -(-n_tokens // self.block_size)

    def can_allocate(self, n_tokens: int, hit: Sequence[int] = ()) -> bool:
        """Whether a new sequence of `n_tokens` tokens fits now, its first blocks being the
        cached `hit` blocks (from `match_prefix`): those need no new block, but the ones
        nobody holds stop being free once taken."""
        need = self.blocks_for(n_tokens) - len(hit)
        if hit:
            refcount = self.refcount
            need += sum(1 for b in hit if refcount[b] == 0)
        return need <= self.num_free

    def can_grow(self, table: list[int], n_tokens: int) -> bool:
        """Whether `table` can be extended to hold `n_tokens` tokens."""
        return self.blocks_for(n_tokens) - len(table) <= self.num_free

    def match_prefix(self, token_ids: Sequence[int], max_blocks: int) -> list[int]:
        """Blocks of the longest cached prefix of `token_ids` (whole blocks, at most
        `max_blocks`); [] without a prefix cache. Take them with `acquire`."""
        if self.prefix_tree is None or max_blocks <= 0:
            return []
        return self.prefix_tree.match(token_ids, max_blocks)

    # --- changes ---------------------------------------------------------------------

    def allocate(self, n_tokens: int) -> list[int]:
        """A fresh block table for `n_tokens` tokens (each block's count becomes 1)."""
        table: list[int] = []
        self.grow(table, n_tokens)
        return table

    def grow(self, table: list[int], n_tokens: int) -> None:
        """Append blocks to `table` in place until it holds `n_tokens` tokens.

        Appending one token is `grow(table, new_len)`: it takes a new block only when
        the last one is full.
        """
        need = self.blocks_for(n_tokens) - len(table)
        if need <= 0:
            return
        free = self.free_blocks
        if need > len(free) + len(self.evictable):
            raise NoFreeBlocks(f"need {need} blocks, {self.num_free} free")
        refcount = self.refcount
        for _ in range(need):
            block = free.popleft() if free else self._evict_lru()
            refcount[block] = 1
            table.append(block)

    append_slot = grow

    def incref(self, block: int) -> None:
        """One more holder of a block: a used one, or a cached one nobody holds (a hit)."""
        count = self.refcount[block]
        if count <= 0:
            if count == 0 and block in self.evictable:
                del self.evictable[block]
                self.refcount[block] = 1
                return
            raise ValueError(f"incref of free block {block}")
        self.refcount[block] = count + 1

    def acquire(self, blocks: Sequence[int]) -> list[int]:
        """Hold `blocks` (a prefix-cache hit) for a new table; returns them as a list."""
        for block in blocks:
            self.incref(block)
        return list(blocks)

    def fork(self, table: list[int]) -> list[int]:
        """A new table sharing every block of `table` (e.g. parallel samples of one prompt)."""
        for block in table:
            self.incref(block)
        return list(table)

    def free(self, table: list[int]) -> None:
        """Drop one reference to each block of `table`; blocks nobody holds become free
        (evictable, if their content is cached).

        Blocks are released from the end of the table backwards, so a sequence's first
        blocks (its shared prefix, if any) are reused or evicted last.
        """
        release = self._release
        for block in reversed(table):
            release(block)
        table.clear()
        capacity = self.cache_capacity
        if capacity:
            while len(self.evictable) > capacity:
                self.free_blocks.append(self._evict_lru())

    def cache_blocks(self, table: list[int], token_ids: Sequence[int], first: int, last: int) -> None:
        """Enter the full blocks `first..last-1` of `table`, just computed for `token_ids`,
        into the prefix cache (no-op without one).

        A block whose content another sequence cached first is swapped in the table for
        that one (held instead), and the copy is released: so a sequence's cached blocks
        always form one chain from the root, and a held block's ancestors are held too
        (never evicted under it). A block whose predecessor is not cached stays uncached.
        """
        tree = self.prefix_tree
        if tree is None:
            return
        bs = self.block_size
        parent = table[first - 1] if first > 0 else None
        for i in range(first, last):
            block = table[i]
            held = tree.insert(parent, tuple(token_ids[i * bs:(i + 1) * bs]), block)
            if held is None:
                return
            if held != block:
                self.incref(held)
                table[i] = held
                self._release(block)
            parent = held

    def _release(self, block: int) -> None:
        count = self.refcount[block]
        if count <= 0:
            raise ValueError(f"double free of block {block}")
        self.refcount[block] = count - 1
        if count == 1:
            tree = self.prefix_tree
            if tree is not None and block in tree:
                self.evictable[block] = None          # most recently used end
            else:
                self.free_blocks.append(block)

    def _evict_lru(self) -> int:
        """Uncache the least recently used evictable block (and its subtree); return it, unheld."""
        block, _ = self.evictable.popitem(last=False)
        evictable = self.evictable
        for other in self.prefix_tree.remove(block):
            if other != block and other in evictable:
                del evictable[other]
                self.free_blocks.append(other)
        self.num_evicted += 1
        return block

    def check(self) -> None:
        """Assert the free list, the evictable pool, the counts and the tree agree (for tests)."""
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is on the free list twice"
        evictable = set(self.evictable)
        assert not free & evictable, f"blocks both free and evictable: {sorted(free & evictable)}"
        for block, count in enumerate(self.refcount):
            assert count >= 0, f"block {block} has count {count}"
            idle = block in free or block in evictable
            assert (count == 0) == idle, f"block {block}: count {count}, free {block in free}, evictable {block in evictable}"
        tree = self.prefix_tree
        if tree is None:
            assert not evictable, "evictable blocks without a prefix cache"
            return
        tree.check()
        assert all(b in tree for b in evictable), "an evictable block is not cached"
        assert not any(b in tree for b in free), "a plain free block is still cached"
        if self.cache_capacity:
            assert len(evictable) <= self.cache_capacity, "more evictable blocks than the capacity"
