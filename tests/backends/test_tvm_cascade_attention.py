"""The TVM cascade decode attention (vsc.backends.tvm.cascade_attention): decoding sequences that
hold a prefix in the same physical blocks read it once, merged with each one's own rest by the
softmax statistics the decode kernel now returns (its `lse`). Against torch's plain paged
attention (no cascade) on the same caches: groups of 2 to 40 members (lane tiles of 16 and their
edges), sequences outside the group in the same step, rests of one token and of many blocks,
prefixes of one block to max_context (split over the prefix), a mixed prefill step, GQA shapes."""
from __future__ import annotations

import pytest
import torch

from decode_steps import decode_step, mixed_step
from vsc.backends.tvm.build import build_quant_kernels
from vsc.runtime.kernels import tvm_ops
from vsc.runtime.kernels.torch_ops import attention_metadata, paged_attention
from vsc.runtime.kernels.tvm_ops import load_tvm_kernels

SHAPES = [(9, 3, 64, 16), (4, 2, 32, 16), (4, 4, 16, 8), (6, 1, 16, 4)]


def library(heads, kv_heads, hd, block):
    return load_tvm_kernels(build_quant_kernels([], elementwise=[("kv_write", kv_heads, hd),
                                                                 ("paged_attention", heads, kv_heads, hd, block)]), 2)


def tables_with_prefix(gen, rests, shared, block, others=(), num_blocks=None):
    """Tables of sequences holding `shared` common blocks then rests[i] own tokens, and of
    `others` sequences (context lengths) with blocks of their own; scrambled block ids."""
    lens = [shared * block + r for r in rests] + list(others)
    need = shared + sum(-(-r // block) for r in rests) + sum(-(-n // block) for n in others) + 1
    order = torch.randperm(num_blocks or need, generator=gen).tolist()
    prefix = [order.pop() for _ in range(shared)]
    tables = [prefix + [order.pop() for _ in range(-(-r // block))] for r in rests]
    tables += [[order.pop() for _ in range(-(-n // block))] for n in others]
    return tables, lens, num_blocks or need


def run(lib, batch, q, k, v, kc, vc, heads, kv_heads, hd, block, cascade, scale=0.25):
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    plain = paged_attention(q, k, v, kc1, vc1, attention_metadata(batch, block), heads, kv_heads, hd, scale)
    meta = attention_metadata(batch, block, cascade)
    fast = tvm_ops.paged_attention(lib, q, k, v, kc2, vc2, meta, heads, kv_heads, hd, scale)
    return plain, fast, meta


def calls(monkeypatch):
    seen = []
    real = tvm_ops.cascade_decode_attention
    monkeypatch.setattr(tvm_ops, "cascade_decode_attention",
                        lambda *a, **kw: seen.append(a[5].cascade.members.numel()) or real(*a, **kw))
    return seen


@pytest.mark.parametrize("heads,kv_heads,hd,block", SHAPES)
def test_cascade_matches_plain_attention(monkeypatch, heads, kv_heads, hd, block):
    lib = library(heads, kv_heads, hd, block)
    assert lib.cascade_fn(heads, kv_heads, hd, block) is not None
    seen = calls(monkeypatch)
    gen = torch.Generator().manual_seed(heads * 10 + hd)
    # rests: one token, mid-block, a block edge, several blocks; two sequences outside the group
    rests = [1, block // 2 + 1, block, 3 * block + 2, 5]
    tables, lens, nb = tables_with_prefix(gen, rests, 6, block, others=[7, 2 * block + 3])
    step = decode_step(tables, lens, block, heads, kv_heads, hd, gen, num_blocks=nb, scale=2.0)
    plain, fast, meta = run(lib, *step, heads, kv_heads, hd, block, cascade=block)
    assert meta.cascade is not None and meta.cascade.members.numel() == len(rests)
    assert seen == [len(rests)]
    torch.testing.assert_close(fast, plain, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("members", [2, 15, 16, 17, 33, 40])
def test_member_tiles_and_their_edges(monkeypatch, members):
    heads, kv_heads, hd, block = 9, 3, 64, 16
    lib = library(heads, kv_heads, hd, block)
    seen = calls(monkeypatch)
    gen = torch.Generator().manual_seed(members)
    rests = torch.randint(1, 60, (members,), generator=gen).tolist()
    tables, lens, nb = tables_with_prefix(gen, rests, 5, block, others=[40])
    # the group's rows interleaved with the other sequence's: members are not the first rows
    order = torch.randperm(len(tables), generator=gen).tolist()
    tables, lens = [tables[i] for i in order], [lens[i] for i in order]
    step = decode_step(tables, lens, block, heads, kv_heads, hd, gen, num_blocks=nb)
    plain, fast, _ = run(lib, *step, heads, kv_heads, hd, block, cascade=block)
    assert seen == [members]
    torch.testing.assert_close(fast, plain, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("threads", [1, 2, 16])
@pytest.mark.parametrize("shared", [1, 47, 127])
def test_prefixes_from_one_block_to_max_context_split(monkeypatch, threads, shared):
    """The prefix is cut into splits (more for more pool threads); the parts merge to the same result."""
    heads, kv_heads, hd, block = 9, 3, 64, 16
    lib = library(heads, kv_heads, hd, block)
    monkeypatch.setattr(tvm_ops, "_pool_threads", lambda: threads)
    gen = torch.Generator().manual_seed(shared + threads)
    rests = [1, 16] if shared == 127 else [3, 20, 1, 9]          # 127 blocks + 16 = 2048 tokens
    tables, lens, nb = tables_with_prefix(gen, rests, shared, block)
    step = decode_step(tables, lens, block, heads, kv_heads, hd, gen, num_blocks=nb, scale=3.0)
    plain, fast, meta = run(lib, *step, heads, kv_heads, hd, block, cascade=1)
    assert meta.cascade.prefix_len == shared * block
    torch.testing.assert_close(fast, plain, rtol=2e-5, atol=2e-5)


def test_decodes_of_a_mixed_prefill_step_run_as_a_cascade(monkeypatch):
    heads, kv_heads, hd, block = 9, 3, 64, 16
    lib = library(heads, kv_heads, hd, block)
    seen = calls(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    shared = 4
    # three decodes behind the shared prefix, a prompt chunk behind it too, a fresh prompt
    rests = [5, 17, 1, 40]
    tables, lens, nb = tables_with_prefix(gen, rests, shared, block, others=[30])
    news = [1, 1, 1, 24, 30]
    step = mixed_step(tables, news, lens, block, heads, kv_heads, hd, gen, nb)
    plain, fast, meta = run(lib, *step, heads, kv_heads, hd, block, cascade=block)
    assert meta.cascade is not None and seen == [3]
    torch.testing.assert_close(fast, plain, rtol=2e-5, atol=2e-5)
