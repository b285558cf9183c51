"""The TVM prefill attention kernel (vsc.backends.tvm.prefill_attention): causal attention of a
prefill step's new tokens over their whole context read in place from the paged cache, against
torch.paged_attention (gather + SDPA) on the same caches: prompts without cached context, chunks
and prefix-cache hits behind cached blocks (ending mid-block, on a block edge), shared blocks,
one-token decodes in the same step, long contexts; the tile order; GQA shapes."""
from __future__ import annotations

import pytest
import torch

from decode_steps import mixed_step
from vsc.backends.tvm.build import build_quant_kernels
from vsc.backends.tvm.prefill_attention import prefill_supported
from vsc.runtime.kernels import tvm_ops
from vsc.runtime.kernels.torch_ops import SequenceSpan, attention_metadata, paged_attention
from vsc.runtime.kernels.tvm_ops import load_tvm_kernels, prefill_tiles

SHAPES = [(9, 3, 64, 16), (4, 2, 32, 16), (4, 4, 16, 8), (6, 1, 16, 4)]


def library(heads, kv_heads, hd, block):
    return load_tvm_kernels(build_quant_kernels([], elementwise=[("kv_write", kv_heads, hd),
                                                                 ("paged_attention", heads, kv_heads, hd, block)]), 2)


def step(gen, news, ctx, block, heads, kv_heads, hd, shared=0, num_blocks=None):
    """A prefill step: sequence b gets news[b] new tokens ending at context ctx[b]; the first
    `shared` blocks of every table are the same physical blocks; the rest handed out scrambled."""
    need = sum(-(-c // block) for c in ctx) + 2
    num_blocks = num_blocks or need
    order = torch.randperm(num_blocks, generator=gen).tolist()
    prefix = [order.pop() for _ in range(shared)]
    tables = [prefix + [order.pop() for _ in range(-(-c // block) - shared)] for c in ctx]
    return mixed_step(tables, news, ctx, block, heads, kv_heads, hd, gen, num_blocks)


def compare(lib, batch, q, k, v, kc, vc, heads, kv_heads, hd, block, scale=0.3):
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    plain = paged_attention(q, k, v, kc1, vc1, attention_metadata(batch, block), heads, kv_heads, hd, scale)
    fast = tvm_ops.paged_attention(lib, q, k, v, kc2, vc2, attention_metadata(batch, block), heads, kv_heads, hd, scale)
    torch.testing.assert_close(fast, plain, rtol=2e-5, atol=2e-5)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)


@pytest.mark.parametrize("heads,kv_heads,hd,block", SHAPES)
def test_prompts_chunks_and_decodes_in_one_step(heads, kv_heads, hd, block):
    lib = library(heads, kv_heads, hd, block)
    assert lib.prefill_fn(heads, kv_heads, hd, block) is not None
    gen = torch.Generator().manual_seed(heads * 100 + hd)
    b = block
    # fresh prompts of 2 / a tile / a tile + 1 tokens; chunks after cached context ending mid-block and
    # on a block edge; a decode row; a chunk that starts mid-block
    news = [2, 16, 17, 5, 2 * b, 1, 3 * b + 3, 40]
    ctx = [2, 16, 17, 2 * b + 5, 4 * b, 3 * b + 1, 5 * b + 3, 40 + b // 2]
    compare(lib, *step(gen, news, ctx, block, heads, kv_heads, hd), heads, kv_heads, hd, block)


def test_a_shared_prefix_and_long_contexts():
    heads, kv_heads, hd, block = 9, 3, 64, 16
    lib = library(heads, kv_heads, hd, block)
    gen = torch.Generator().manual_seed(11)
    # three suffixes behind the same 48 cached blocks (a prefix-cache hit), one of them long
    news, ctx = [30, 7, 300], [768 + 30, 768 + 7, 1700]
    compare(lib, *step(gen, news, ctx, block, heads, kv_heads, hd, shared=48), heads, kv_heads, hd, block)
    # one prompt as long as the context allows
    compare(lib, *step(gen, [2047], [2047], block, heads, kv_heads, hd), heads, kv_heads, hd, block)


def test_the_kernel_runs_and_the_tiles_split_the_work_evenly(monkeypatch):
    heads, kv_heads, hd, block = 4, 2, 32, 16
    lib = library(heads, kv_heads, hd, block)
    real = lib.prefill_fn(heads, kv_heads, hd, block)
    seen = []
    monkeypatch.setitem(lib._funcs, ("prefill_attention", heads, kv_heads, hd, block),
                        lambda *a: (seen.append(a[4].clone()), real(*a)))
    gen = torch.Generator().manual_seed(5)
    compare(lib, *step(gen, [100, 9], [140, 9], block, heads, kv_heads, hd), heads, kv_heads, hd, block)
    (tiles,) = seen
    # every new row is in exactly one tile, at its position
    rows = sorted(r for s, r0, n, p in tiles.tolist() for r in range(r0, r0 + n))
    assert rows == list(range(109))
    assert {(s, r0, p) for s, r0, n, p in tiles.tolist() if r0 == 0 or r0 == 100} == {(0, 0, 40), (1, 100, 0)}
    # a contiguous half of the order reads about half the blocks
    spans = [SequenceSpan(0, 1000, 1000, row=0)]
    order = prefill_tiles(spans).tolist()
    cost = [p + n for _, _, n, p in order]
    assert abs(sum(cost[: len(cost) // 2]) - sum(cost) / 2) <= max(cost)


def test_dimensions_without_the_kernel_keep_the_torch_path():
    assert not prefill_supported(6, 3, 24, 8)        # head_dim not a multiple of 16
    assert not prefill_supported(6, 4, 16, 8)        # heads not a multiple of kv_heads
    lib = library(6, 3, 24, 8)
    assert lib.prefill_fn(6, 3, 24, 8) is None
    gen = torch.Generator().manual_seed(2)
    compare(lib, *step(gen, [5, 9], [21, 9], 8, 6, 3, 24), 6, 3, 24, 8)


@pytest.mark.parametrize("heads,kv_heads,hd,block", SHAPES)
def test_short_spans_run_with_the_group_in_the_lanes(heads, kv_heads, hd, block):
    """A speculative verify's step: every sequence a few rows (its last token and drafts) behind a
    long cached context. Spans of up to 16 / (heads per kv head) rows go to the short kernel
    (lanes = heads x rows of the GQA group); the result equals torch's on the same caches."""
    lib = library(heads, kv_heads, hd, block)
    most = tvm_ops.SHORT_LANES // (heads // kv_heads)
    real = lib.short_fn(heads, kv_heads, hd, block)
    assert real is not None
    calls = []
    lib._funcs[("short_attention", heads, kv_heads, hd, block)] = lambda *a: calls.append(a[4].shape[0]) or real(*a)
    gen = torch.Generator().manual_seed(heads + hd + block)
    news = [min(most, n) for n in (2, 3, most, 2, most, 3)] + [most + 1]      # the last one: the prefill kernel
    ctx = [5 * block + 3, 9 * block, 2 * block + 1, 37, 3, 11 * block + 7, 4 * block]
    ctx = [max(c, n) for c, n in zip(ctx, news)]
    compare(lib, *step(gen, news, ctx, block, heads, kv_heads, hd), heads, kv_heads, hd, block)
    assert calls and calls[0] == sum(1 for n in news if 2 <= n <= most)
