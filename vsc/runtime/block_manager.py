"""Paged KV-cache bookkeeping: which cache blocks are free, and who holds the others.

The cache is `num_blocks` blocks of `block_size` token slots; a sequence's block table
lists its blocks in order, so token `p` lives in slot
`table[p // block_size] * block_size + p % block_size`. Blocks carry reference counts so
that a prefix cache can later share full blocks between sequences (`fork` / `incref`);
a block returns to the free list only when its count drops to 0.

A contiguous cache is the same thing with `block_size = max_context` and one block per
sequence, so the scheduler needs no second code path.

Writing into a block whose count is above 1 would change another sequence's KV: callers
share only full blocks (copy-on-write of a partial last block is not done here).
"""
from __future__ import annotations

from collections import deque


class NoFreeBlocks(Exception):
    """An allocation asked for more blocks than are free (callers check `can_*` first)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # FIFO: a freed block is reused as late as possible (keeps its content longest
        # for a future prefix cache, and makes use-after-free bugs show up in tests).
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.refcount = [0] * num_blocks

    # --- queries ---------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks needed to hold `n_tokens` tokens."""
        return -(-n_tokens // self.block_size)

    def can_allocate(self, n_tokens: int) -> bool:
        """Whether a new sequence of `n_tokens` tokens fits now."""
        return self.blocks_for(n_tokens) <= len(self.free_blocks)

    def can_grow(self, table: list[int], n_tokens: int) -> bool:
        """Whether `table` can be extended to hold `n_tokens` tokens."""
        return self.blocks_for(n_tokens) - len(table) <= len(self.free_blocks)

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
        if need > len(free):
            raise NoFreeBlocks(f"need {need} blocks, {len(free)} free")
        refcount = self.refcount
        for _ in range(need):
            block = free.popleft()
            refcount[block] = 1
            table.append(block)

    append_slot = grow

    def incref(self, block: int) -> None:
        """One more holder of a used block (a prefix-cache hit)."""
        if self.refcount[block] <= 0:
            raise ValueError(f"incref of free block {block}")
        self.refcount[block] += 1

    def fork(self, table: list[int]) -> list[int]:
        """A new table sharing every block of `table` (e.g. parallel samples of one prompt)."""
        for block in table:
            self.incref(block)
        return list(table)

    def free(self, table: list[int]) -> None:
        """Drop one reference to each block of `table`; blocks nobody holds become free.

        Blocks are released from the end of the table backwards, so a sequence's first
        blocks (its shared prefix, if any) go to the back of the free list last.
        """
        refcount = self.refcount
        free = self.free_blocks
        for block in reversed(table):
            count = refcount[block]
            if count <= 0:
                raise ValueError(f"double free of block {block}")
            refcount[block] = count - 1
            if count == 1:
                free.append(block)
        table.clear()

    def check(self) -> None:
        """Assert the free list and the counts agree (for tests and debugging)."""
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is on the free list twice"
        for block, count in enumerate(self.refcount):
            assert count >= 0, f"block {block} has count {count}"
            assert (count == 0) == (block in free), f"block {block}: count {count}, free {block in free}"
