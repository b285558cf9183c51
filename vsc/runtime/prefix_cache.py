"""Prefix cache: a radix tree over full KV blocks, so requests that share a prompt prefix
reuse its KV instead of recomputing it.

A node stands for one cached block: the K/V of `block_size` tokens computed after exactly
the tokens of the node's ancestors. Nodes are keyed by (parent node, the block's token
ids), so block i of a prompt hits only when blocks 0..i-1 hit too, i.e. when the whole
prefix before it matches. The same tokens at other positions, or after another prefix,
have other K/V (RoPE rotates by position, attention mixes in the prefix) and must never
hit: a key made of a block's own tokens alone would hit them (the accuracy check's
one-token-shifted prompt exists to catch that).

Only full blocks are cached: a partial last block is still being written, and a block
shared between sequences must never be written again. The key is one dict lookup per
block (a tuple of the parent's id and `block_size` ints), paid at admission and when a
block fills, never per decoded token.

The tree holds no reference counts and frees nothing: `BlockManager` decides which blocks
are held, which cached blocks are evictable (held by no sequence) and which to evict; it
calls `remove`, which drops a node and its whole subtree (a child's key names its parent,
so a child can never be found once the parent is gone).
"""
from __future__ import annotations

from typing import Hashable, Sequence


class PrefixNode:
    """One cached block: `block` holds the K/V of `key`'s tokens after the parent's prefix."""

    __slots__ = ("uid", "block", "parent", "key", "children", "depth")

    def __init__(self, uid: int, block: int, parent: "PrefixNode | None", key: Hashable, depth: int):
        self.uid = uid
        self.block = block
        self.parent = parent
        self.key = key
        self.children: list[PrefixNode] = []
        self.depth = depth           # blocks from the root: this block starts at token (depth - 1) * block_size

    def __repr__(self) -> str:
        return f"PrefixNode(block={self.block}, depth={self.depth}, children={len(self.children)})"


class RadixTree:
    """Cached full blocks by (parent node, token ids); see the module docstring."""

    def __init__(self, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.root = PrefixNode(0, -1, None, None, 0)
        self._next_uid = 1
        self._by_key: dict[Hashable, PrefixNode] = {}
        self._by_block: dict[int, PrefixNode] = {}

    def key(self, parent: PrefixNode, tokens: tuple[int, ...]) -> Hashable:
        """The lookup key of a block of `tokens` right after `parent`'s prefix.

        The parent's uid (unique for the tree's lifetime, never reused) stands for the
        whole prefix before the block: equal keys mean equal token prefixes.
        """
        return (parent.uid, tokens)

    # --- queries ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_block)

    def __contains__(self, block: int) -> bool:
        return block in self._by_block

    def node(self, block: int) -> PrefixNode | None:
        return self._by_block.get(block)

    def match(self, token_ids: Sequence[int], max_blocks: int) -> list[int]:
        """Blocks of the longest cached prefix of `token_ids`, at most `max_blocks` full
        blocks; stops at the first block that is not cached after the ones before it."""
        bs = self.block_size
        get = self._by_key.get
        key = self.key
        node = self.root
        blocks: list[int] = []
        for i in range(min(max_blocks, len(token_ids) // bs)):
            child = get(key(node, tuple(token_ids[i * bs:(i + 1) * bs])))
            if child is None:
                break
            blocks.append(child.block)
            node = child
        return blocks

    # --- changes ---------------------------------------------------------------------

    def insert(self, parent_block: int | None, tokens: tuple[int, ...], block: int) -> int | None:
        """Cache `block` as holding `tokens` right after the prefix ending in `parent_block`
        (None: at the start of a sequence).

        Returns the block that now caches this content: `block`, or the block of an
        existing node with the same key (another sequence computed the same prefix first;
        the caller shares that one and frees its copy). Returns None, inserting nothing,
        when `parent_block` is not cached (its prefix could never be found).
        """
        if len(tokens) != self.block_size:
            raise ValueError(f"only full blocks are cached: got {len(tokens)} tokens, block size {self.block_size}")
        if block in self._by_block:
            raise ValueError(f"block {block} is already cached")
        if parent_block is None:
            parent = self.root
        else:
            parent = self._by_block.get(parent_block)
            if parent is None:
                return None
        key = self.key(parent, tokens)
        existing = self._by_key.get(key)
        if existing is not None:
            return existing.block
        node = PrefixNode(self._next_uid, block, parent, key, parent.depth + 1)
        self._next_uid += 1
        parent.children.append(node)
        self._by_key[key] = node
        self._by_block[block] = node
        return block

    def remove(self, block: int) -> list[int]:
        """Uncache `block` and every block below it; returns them all, `block` first."""
        node = self._by_block.get(block)
        if node is None:
            raise ValueError(f"block {block} is not cached")
        node.parent.children.remove(node)
        removed: list[int] = []
        stack = [node]
        while stack:
            n = stack.pop()
            removed.append(n.block)
            del self._by_block[n.block]
            if self._by_key.get(n.key) is n:
                del self._by_key[n.key]
            stack.extend(n.children)
            n.children = []
            n.parent = None
        return removed

    def check(self) -> None:
        """Assert that nodes, keys and blocks agree (for tests and debugging)."""
        seen = 0
        stack = list(self.root.children)
        while stack:
            n = stack.pop()
            seen += 1
            assert self._by_block.get(n.block) is n, f"block {n.block} maps to another node"
            assert n.parent is not None and n in n.parent.children, f"block {n.block} is detached from its parent"
            assert n.depth == n.parent.depth + 1
            stack.extend(n.children)
        assert seen == len(self._by_block), f"{len(self._by_block) - seen} cached blocks are unreachable from the root"
        assert len(self._by_key) == len(self._by_block), "a key without its node, or a node without its key"
        for key, n in self._by_key.items():
            assert n.key == key and self._by_block.get(n.block) is n
