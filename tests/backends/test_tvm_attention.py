"""tvm.paged_attention: the TVM kernels (kv_write, paged decode attention read in place) against the
torch kernel on the same paged caches, over block-table edge cases, split-K, mixed prefill steps,
cascades; the catalog / verifier / select-kernels rules around it; a compiled server that uses it."""
from __future__ import annotations

import pytest
import torch

from decode_steps import decode_step, mixed_step
from vsc.backends.tvm.build import build_quant_kernels
from vsc.ir.module import walk_ops
from vsc.passes.manager import PassManager
from vsc.runtime.kernels import tvm_ops
from vsc.runtime.kernels.torch_ops import attention_metadata, paged_attention
from vsc.runtime.kernels.tvm_ops import decode_attention, load_tvm_kernels

SHAPES = [(4, 2, 32, 16), (9, 3, 64, 16), (6, 1, 8, 4), (4, 4, 16, 8), (6, 3, 24, 8)]


def library(heads, kv_heads, hd, block):
    return load_tvm_kernels(build_quant_kernels([], elementwise=[("kv_write", kv_heads, hd),
                                                                 ("paged_attention", heads, kv_heads, hd, block)]), 1)


def scrambled(gen, lengths, block, num_blocks=200, shared=0):
    """Block tables of `lengths` handed out in random order; the first `shared` blocks of every
    table are the same physical blocks (a prefix held through the prefix cache)."""
    order = torch.randperm(num_blocks, generator=gen).tolist()
    prefix = [order.pop() for _ in range(shared)]
    return [prefix + [order.pop() for _ in range(-(-n // block) - shared)] for n in lengths]


def both(batch, q, k, v, kc, vc, lib, heads, kv_heads, hd, block, scale=0.2, cascade=0):
    """(torch result, tvm result, torch caches, tvm caches) of one step on copies of the caches."""
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    plain = paged_attention(q, k, v, kc1, vc1, attention_metadata(batch, block, cascade), heads, kv_heads, hd, scale)
    fast = tvm_ops.paged_attention(lib, q, k, v, kc2, vc2, attention_metadata(batch, block, cascade),
                                   heads, kv_heads, hd, scale)
    return plain, fast, (kc1, vc1), (kc2, vc2)


@pytest.mark.parametrize("heads,kv_heads,hd,block", SHAPES)
def test_decode_matches_the_torch_kernel(heads, kv_heads, hd, block):
    lib = library(heads, kv_heads, hd, block)
    gen = torch.Generator().manual_seed(heads * 100 + hd)
    # a context of one token, ending mid-block, exactly filling blocks, many blocks
    lengths = [1, 37, 2 * block, 150, 9, 64, block + 1]
    tables = scrambled(gen, lengths, block)
    step = decode_step(tables, lengths, block, heads, kv_heads, hd, gen, num_blocks=200, scale=3.0)
    plain, fast, caches1, caches2 = both(*step, lib, heads, kv_heads, hd, block)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches1, caches2):                   # kv_write stored the step's K/V at the same slots
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2, 64])
def test_split_k_over_one_long_context_and_many(monkeypatch, threads):
    """Split-K (flash-decoding) comes in when rows x kv heads are few for the pool: the merged
    parts equal the one-pass result, for one sequence up to max_context and for several."""
    heads, kv_heads, hd, block = 9, 3, 64, 16
    lib = library(heads, kv_heads, hd, block)
    monkeypatch.setattr(tvm_ops, "_pool_threads", lambda: threads)
    gen = torch.Generator().manual_seed(threads)
    for lengths in ([2048], [1, 2047], [700, 5, 1300, 16]):
        tables = scrambled(gen, lengths, block, num_blocks=300)
        step = decode_step(tables, lengths, block, heads, kv_heads, hd, gen, num_blocks=300)
        plain, fast, _, _ = both(*step, lib, heads, kv_heads, hd, block)
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_sequences_sharing_prefix_blocks():
    heads, kv_heads, hd, block = 4, 2, 32, 16
    lib = library(heads, kv_heads, hd, block)
    gen = torch.Generator().manual_seed(7)
    lengths = [70, 90, 65]
    tables = scrambled(gen, lengths, block, shared=4)          # 64 shared tokens, each sequence its own tail
    step = decode_step(tables, lengths, block, heads, kv_heads, hd, gen, num_blocks=200)
    plain, fast, _, _ = both(*step, lib, heads, kv_heads, hd, block)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    # with cascade-attention's layout the step keeps the torch cascade (one read of the prefix per group)
    plain, fast, _, _ = both(*step, lib, heads, kv_heads, hd, block, cascade=32)
    assert attention_metadata(step[0], block, 32).cascade is not None
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_a_mixed_step_of_chunks_prompts_and_decodes():
    """Prefill spans (a chunk over cached context, a fresh prompt) keep torch's path; the
    one-token sequences of the same step run the TVM kernel; K/V of every row is written."""
    heads, kv_heads, hd, block = 6, 3, 24, 8
    lib = library(heads, kv_heads, hd, block)
    gen = torch.Generator().manual_seed(3)
    # seq 0: 5 new tokens after 20 cached; seq 1: one new token, context 33; seq 2: a 7-token prompt
    news, ctx = [5, 1, 7], [25, 33, 7]
    tables = scrambled(gen, ctx, block, num_blocks=40)
    batch, q, k, v, kc, vc = mixed_step(tables, news, ctx, block, heads, kv_heads, hd, gen, 40)
    plain, fast, caches1, caches2 = both(batch, q, k, v, kc, vc, lib, heads, kv_heads, hd, block)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(caches1, caches2))


def test_kv_write_takes_column_slices_of_a_wider_matrix():
    lib = library(9, 3, 64, 16)
    qkv = torch.randn(4, 960)
    k, v = qkv[:, 576:768], qkv[:, 768:]                     # views with a row stride of 960
    kc, vc = torch.zeros(64, 3, 64), torch.zeros(64, 3, 64)
    slots = torch.tensor([5, 17, 40, 63])
    lib.get("kv_write_3_64")(k, v, slots, kc, vc)
    assert torch.equal(kc[slots].reshape(4, -1), k) and torch.equal(vc[slots].reshape(4, -1), v)
    assert int((kc != 0).sum()) == k.numel() and int((vc != 0).sum()) == v.numel()   # nothing else written


def test_decode_attention_direct_call_and_empty_batch():
    heads, kv_heads, hd, block = 4, 2, 16, 4
    lib = library(heads, kv_heads, hd, block)
    kc, vc = torch.randn(32, kv_heads, hd), torch.randn(32, kv_heads, hd)
    q = torch.randn(1, heads * hd)
    tables, lens = torch.tensor([[3, 1]]), torch.tensor([6])
    out = decode_attention(lib, q, kc, vc, tables, lens, 6, block, 0.5)
    slots = torch.tensor([12, 13, 14, 15, 4, 5])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.view(1, heads, 1, hd), kc[slots].transpose(0, 1)[None], vc[slots].transpose(0, 1)[None], scale=0.5,
        enable_gqa=True)
    torch.testing.assert_close(out, ref.reshape(1, -1), rtol=1e-5, atol=1e-5)
    assert decode_attention(lib, q[:0], kc, vc, tables[:0], lens[:0], 0, block, 0.5).shape == (0, heads * hd)


def test_select_kernels_picks_it_on_a_paged_f32_cpu_plan(make_module):
    out = PassManager("paged-kv{block=16},select-kernels").run(make_module())
    assert {op.kernel.name for op in walk_ops(out.model.func.body) if op.kind == "attention"} == {"tvm.paged_attention"}
