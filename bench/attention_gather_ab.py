#!/usr/bin/env python
"""A/B in one run: SmolLM2-shaped decode attention (16 seqs, 830-token contexts, 9 heads / 3 kv heads x 64,
block 16), slot-by-slot gather vs whole-block gather, 30 layers' worth per 'step'.

    python bench/attention_gather_ab.py     # prints ms per 30-layer step for each, 3 alternating rounds
"""
import time

import torch

import vsc.runtime.kernels.torch_ops as K
from vsc.runtime.api import StepBatch
torch.set_num_threads(2)
B, ctx, bs, kv, heads, hd, nb = 16, 830, 16, 3, 9, 64, 1000
kc, vc = torch.randn(nb * bs, kv, hd), torch.randn(nb * bs, kv, hd)
width = -(-ctx // bs)
tables = torch.stack([torch.randperm(nb)[:width] for _ in range(B)])
ctxs = torch.full((B,), ctx)
pos = ctxs - 1
slots = tables[torch.arange(B), pos // bs] * bs + pos % bs
batch = StepBatch(torch.zeros(B, dtype=torch.long), pos, torch.arange(B + 1), ctxs, tables, slots, is_decode=True,
                  query_lens_host=[1] * B, context_lens_host=[ctx] * B)
q, k, v = torch.randn(B, heads * hd), torch.randn(B, kv * hd), torch.randn(B, kv * hd)


def meta_block():
    return K.attention_metadata(batch, bs)


def meta_slot():
    m = K.AttentionMetadata(batch.slot_mapping, bs, True)
    p = torch.arange(ctx)
    m.gather_slots = K._context_slots(tables, p, bs)
    m.key_mask = (p[None, :] < ctxs[:, None]).view(-1, 1, 1, ctx)
    return m


res = {}
for rnd in range(3):
    for name, mk in (("slot", meta_slot), ("block", meta_block)):
        t = time.perf_counter()
        for _ in range(3):
            m = mk()
            outs = [K.paged_attention(q, k, v, kc, vc, m, heads, kv, hd, 0.125) for _ in range(30)]
        res.setdefault(name, []).append((time.perf_counter() - t) / 3 * 1e3)
a, b = meta_slot(), meta_block()
assert torch.allclose(K.paged_attention(q, k, v, kc, vc, a, heads, kv, hd, .125), K.paged_attention(q, k, v, kc, vc, b, heads, kv, hd, .125), atol=1e-5)
for n, xs in res.items():
    print(n, "ms per 30-layer step:", [round(x, 1) for x in xs])
