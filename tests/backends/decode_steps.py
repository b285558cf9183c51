"""Decode and mixed prefill steps over a random paged KV cache, for attention-kernel tests (cascade, TVM)."""
from __future__ import annotations

import torch

from vsc.runtime.api import StepBatch


def decode_step(tables: list[list[int]], lens: list[int], block_size: int, heads: int, kv_heads: int,
                head_dim: int, generator: torch.Generator, num_blocks: int | None = None, scale: float = 1.0):
    """(batch, q, k, v, k_cache, v_cache): one new token per sequence whose blocks are `tables`
    (blocks may be shared), over a cache of random stale values (x `scale`)."""
    num_blocks = num_blocks or 1 + max(b for t in tables for b in t)
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=generator) * scale
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=generator) * scale
    width = max(len(t) for t in tables) + 1                    # padded past the longest table
    b = len(tables)
    last = [t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, lens)]
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    batch = StepBatch(tokens=t([0] * b), positions=t([n - 1 for n in lens]), query_start=t(list(range(b + 1))),
                      context_lens=t(lens), block_tables=t([x + [0] * (width - len(x)) for x in tables]),
                      slot_mapping=t(last), is_decode=True, query_lens_host=[1] * b, context_lens_host=list(lens))
    q = torch.randn(b, heads * head_dim, generator=generator)
    k = torch.randn(b, kv_heads * head_dim, generator=generator)
    v = torch.randn(b, kv_heads * head_dim, generator=generator)
    return batch, q, k, v, k_cache, v_cache


def mixed_step(tables: list[list[int]], news: list[int], ctx: list[int], block_size: int, heads: int,
               kv_heads: int, head_dim: int, generator: torch.Generator, num_blocks: int):
    """(batch, q, k, v, k_cache, v_cache): a prefill step where sequence b gets news[b] new tokens
    ending at context ctx[b] (a prompt, a chunk behind cached context, or a one-token decode),
    through its blocks `tables`, over a cache of random values."""
    width = max(len(t) for t in tables)
    positions, slots, starts = [], [], [0]
    for t, n, c in zip(tables, news, ctx):
        for p in range(c - n, c):
            positions.append(p)
            slots.append(t[p // block_size] * block_size + p % block_size)
        starts.append(starts[-1] + n)
    total = sum(news)
    L = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    batch = StepBatch(tokens=L([0] * total), positions=L(positions), query_start=L(starts), context_lens=L(ctx),
                      block_tables=L([t + [0] * (width - len(t)) for t in tables]), slot_mapping=L(slots),
                      query_lens_host=list(news), context_lens_host=list(ctx))
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=generator)
    q = torch.randn(total, heads * head_dim, generator=generator)
    k = torch.randn(total, kv_heads * head_dim, generator=generator)
    v = torch.randn(total, kv_heads * head_dim, generator=generator)
    return batch, q, k, v, k_cache, v_cache
