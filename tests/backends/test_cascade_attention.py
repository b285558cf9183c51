"""Cascade attention (the cascade-attention pass): the shared-prefix layout and its numerics
against plain paged decode attention over the same cache."""
from __future__ import annotations

import pytest
import torch

from decode_steps import decode_step
from vsc.errors import PassFailure, PipelineError
from vsc.ir.module import walk_ops
from vsc.passes.manager import PassManager
from vsc.runtime.kernels.torch_ops import _shared_prefix, attention_metadata, paged_attention

BS, HEADS, KV_HEADS, HD = 4, 4, 2, 8


def test_the_largest_group_sharing_leading_blocks_is_found():
    tables = [[7, 8, 9, 1], [7, 8, 9, 2, 3], [5, 6], [7, 8, 4]]
    lens = [16, 19, 8, 12]
    members, shared = _shared_prefix(tables, lens, BS, min_tokens=8)
    assert members == [0, 1, 3] and shared == 2          # block 9 is not in row 3's table
    # every member keeps at least one token of its own after the prefix
    assert _shared_prefix([[7, 8], [7, 8]], [8, 8], BS, min_tokens=1) == ([0, 1], 1)
    assert _shared_prefix(tables, lens, BS, min_tokens=12) is None       # 8 shared tokens < 12
    assert _shared_prefix([[1, 2], [3, 4]], [8, 8], BS, min_tokens=1) is None   # nobody shares


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cascade_decode_matches_plain_decode(seed):
    g = torch.Generator().manual_seed(seed)
    shared = [1, 2, 3, 4, 5]                                   # a 20-token prefix held by rows 0, 1, 3
    tables = [shared + [6], shared + [7, 8], [9, 10, 11], shared + [12]]
    lens = [22, 27, 10, 21]
    batch, q, k, v, kc, vc = decode_step(tables, lens, BS, HEADS, KV_HEADS, HD, g)
    plain_meta = attention_metadata(batch, BS)
    cascade_meta = attention_metadata(batch, BS, cascade_min_tokens=8)
    assert plain_meta.cascade is None
    assert cascade_meta.cascade.members.tolist() == [0, 1, 3] and cascade_meta.cascade.prefix_len == 20
    plain = paged_attention(q, k, v, kc.clone(), vc.clone(), plain_meta, HEADS, KV_HEADS, HD, 0.3)
    cascade = paged_attention(q, k, v, kc.clone(), vc.clone(), cascade_meta, HEADS, KV_HEADS, HD, 0.3)
    torch.testing.assert_close(cascade, plain, rtol=1e-5, atol=1e-6)


def test_the_pass_needs_the_prefix_cache_and_a_float_cpu_cache(make_module):
    m = make_module()
    out = PassManager("paged-kv{block=16},prefix-cache,cascade-attention{min_tokens=32}").run(m)
    attn = [op for op in walk_ops(out.model.func.body) if op.kind == "attention"]
    assert attn and all(op.attrs["cascade_min_tokens"] == 32 for op in attn)
    with pytest.raises(PipelineError, match="requires prefix-cache earlier"):
        PassManager("paged-kv{block=16},cascade-attention").run(m)
    with pytest.raises(PassFailure, match="int8"):
        PassManager("paged-kv{block=16},kv-int8,prefix-cache,cascade-attention").run(m)
