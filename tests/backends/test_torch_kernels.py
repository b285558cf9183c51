"""Each torch kernel against a plain (float64, loop-level) reference on random inputs."""
from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from vsc.runtime.api import StepBatch
from vsc.runtime.kernels import TORCH_KERNELS
from vsc.runtime.kernels import torch_ops as K

torch.set_num_threads(1)


def rand(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded differently for every test (from its node id), never zeros."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()) + 1)


def test_every_lowered_torch_kernel_has_an_implementation():
    from vsc.ir.kernels import KERNELS
    torch_kernels = {name for name in KERNELS if name.startswith("torch.")}
    assert set(TORCH_KERNELS) == torch_kernels - {"torch.sample"}


def test_elementwise_kernels(gen):
    a, b = rand(gen, 5, 7), rand(gen, 5, 7)
    assert torch.equal(K.add(a, b), a + b)
    assert torch.equal(K.mul(a, b), a * b)
    torch.testing.assert_close(K.silu(a), a / (1 + torch.exp(-a)))
    x = rand(gen, 3, 8)
    expected = x[:, :4] / (1 + torch.exp(-x[:, :4])) * x[:, 4:]
    torch.testing.assert_close(K.silu_mul(x), expected)


def test_embedding_and_linear(gen):
    table = rand(gen, 11, 6)
    tokens = torch.tensor([3, 0, 10, 3])
    assert torch.equal(K.embedding(tokens, table), table[[3, 0, 10, 3]])
    x, w, bias = rand(gen, 4, 6), rand(gen, 9, 6), rand(gen, 9)
    ref = torch.stack([torch.stack([sum(x[t, i].double() * w[o, i].double() for i in range(6)) for o in range(9)])
                       for t in range(4)])
    torch.testing.assert_close(K.linear(x, w).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.linear(x, w, bias).double(), ref + bias.double(), rtol=1e-5, atol=1e-5)


def test_split_is_views_of_the_last_dim(gen):
    x = rand(gen, 3, 10)
    q, k, v = K.split(x, (6, 2, 2))
    assert torch.equal(q, x[:, :6]) and torch.equal(k, x[:, 6:8]) and torch.equal(v, x[:, 8:])
    assert q.data_ptr() == x.data_ptr()          # no copy


def test_rmsnorm_matches_definition(gen):
    x, w = rand(gen, 6, 16, scale=3.0), 1 + rand(gen, 16, scale=0.1)
    xd = x.double()
    ref = xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 1e-5) * w.double()
    torch.testing.assert_close(K.rmsnorm(x, w, 1e-5).double(), ref, rtol=1e-5, atol=1e-6)


def test_rmsnorm_bf16_computes_statistics_in_fp32(gen):
    x, w = rand(gen, 4, 64, scale=50.0).bfloat16(), torch.ones(64, dtype=torch.bfloat16)
    out = K.rmsnorm(x, w, 1e-6)
    assert out.dtype == torch.bfloat16
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out.float(), ref.bfloat16().float())


def _rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float, head_dim: int) -> torch.Tensor:
    """Rotate each (j, j + hd/2) pair of each head by position * theta^(-2j/hd), in float64."""
    t = x.shape[0]
    xh = x.double().reshape(t, -1, head_dim)
    half = head_dim // 2
    out = torch.empty_like(xh)
    for j in range(half):
        angle = positions.double() * theta ** (-2.0 * j / head_dim)
        c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
        x1, x2 = xh[:, :, j], xh[:, :, j + half]
        out[:, :, j] = x1 * c - x2 * s
        out[:, :, j + half] = x2 * c + x1 * s
    return out.reshape(t, -1)


def test_rope_rotates_pairs_by_position(gen):
    head_dim, theta = 16, 10000.0
    table = K.RotaryTable(theta, head_dim, max_position=300)
    positions = torch.tensor([0, 1, 7, 42, 299, 3])
    q, k = rand(gen, 6, 4 * head_dim), rand(gen, 6, 2 * head_dim)
    cos, sin = table.lookup(positions)
    q_rot, k_rot = K.rope(q, k, cos, sin, head_dim)
    torch.testing.assert_close(q_rot.double(), _rope_reference(q, positions, theta, head_dim), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k_rot.double(), _rope_reference(k, positions, theta, head_dim), rtol=1e-4, atol=1e-4)
    assert torch.equal(q_rot[0], q[0])          # position 0 is the identity


def test_rope_table_matches_transformers(gen):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=128, rope_theta=500.0)
    hf = LlamaRotaryEmbedding(cfg)
    positions = torch.tensor([5, 0, 127, 64])
    q, k = rand(gen, 1, 4, 4, 16), rand(gen, 1, 2, 4, 16)       # [batch, heads, T, hd]
    cos, sin = hf(q, positions[None])
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    ours_cos, ours_sin = K.RotaryTable(500.0, 16, 128).lookup(positions)
    q_ours, k_ours = K.rope(q[0].transpose(0, 1).reshape(4, -1), k[0].transpose(0, 1).reshape(4, -1), ours_cos, ours_sin, 16)
    assert torch.equal(q_ours, q_hf[0].transpose(0, 1).reshape(4, -1))
    assert torch.equal(k_ours, k_hf[0].transpose(0, 1).reshape(4, -1))


def test_moe_matches_per_token_reference(gen):
    experts, top_k, hidden, inter, tokens = 5, 2, 12, 20, 9
    x, router = rand(gen, tokens, hidden), rand(gen, tokens, experts, scale=2.0)
    w1, w3, w2 = rand(gen, experts, inter, hidden, scale=0.3), rand(gen, experts, inter, hidden, scale=0.3), rand(gen, experts, hidden, inter, scale=0.3)
    out = K.moe(x, router, w1, w3, w2, experts, top_k)
    ref = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        p = torch.softmax(router[t].double(), -1)
        chosen = sorted(range(experts), key=lambda e: -p[e])[:top_k]
        norm = sum(p[e] for e in chosen)
        for e in chosen:
            h = x[t].double()
            y = w2[e].double() @ (F.silu(w1[e].double() @ h) * (w3[e].double() @ h))
            ref[t] += p[e] / norm * y
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_last_token_picks_each_sequences_last_row(gen):
    h = rand(gen, 10, 4)
    meta = K.AttentionMetadata(torch.zeros(10, dtype=torch.long), 16, False, last_index=torch.tensor([2, 3, 9]))
    assert torch.equal(K.last_token(h, meta), h[[2, 3, 9]])
    assert K.last_token(h, K.AttentionMetadata(torch.zeros(10, dtype=torch.long), 16, True)) is h


# --- attention over a paged / contiguous cache ----------------------------------------------


def _dense_attention(q, keys, values, past, heads, kv_heads, scale):
    """Reference: new token j (position past + j) attends to keys[: past + j + 1], GQA by
    head // (heads / kv_heads); float64, one explicit softmax per token and head."""
    n, hd = q.shape[0], keys.shape[-1]
    q = q.double().view(n, heads, hd)
    out = torch.empty(n, heads, hd, dtype=torch.float64)
    group = heads // kv_heads
    for j in range(n):
        for h in range(heads):
            kk = keys[: past + j + 1, h // group].double()
            vv = values[: past + j + 1, h // group].double()
            w = torch.softmax(kk @ q[j, h] * scale, dim=0)
            out[j, h] = w @ vv
    return out.view(n, heads * hd)


class _CacheWorld:
    """Sequences with known K/V for every position, blocks handed out in scrambled order."""

    def __init__(self, gen, lengths, block_size, num_blocks, heads=4, kv_heads=2, head_dim=8, one_block_each=False):
        self.gen, self.block_size = gen, block_size
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scale = head_dim ** -0.5 * 1.3
        order = torch.randperm(num_blocks, generator=gen).tolist()
        self.tables = []
        for length in lengths:
            count = 1 if one_block_each else -(-length // block_size)
            self.tables.append([order.pop() for _ in range(count)])
        self.q = [rand(gen, n, heads * head_dim) for n in lengths]
        self.k = [rand(gen, n, kv_heads * head_dim) for n in lengths]
        self.v = [rand(gen, n, kv_heads * head_dim) for n in lengths]
        self.done = [0] * len(lengths)
        slots = num_blocks * block_size
        self.k_cache = rand(gen, slots, kv_heads, head_dim, scale=5.0)     # stale garbage, not zeros
        self.v_cache = rand(gen, slots, kv_heads, head_dim, scale=5.0)

    def slot(self, seq, pos):
        return self.tables[seq][pos // self.block_size] * self.block_size + pos % self.block_size

    def step(self, new_counts: dict[int, int], decode=False):
        seqs = list(new_counts)
        q, k, v, pos, slots, qs, ctx = [], [], [], [], [], [0], []
        for s in seqs:
            a, b = self.done[s], self.done[s] + new_counts[s]
            q.append(self.q[s][a:b]), k.append(self.k[s][a:b]), v.append(self.v[s][a:b])
            pos += range(a, b)
            slots += [self.slot(s, p) for p in range(a, b)]
            qs.append(qs[-1] + b - a)
            ctx.append(b)
        width = max(len(self.tables[s]) for s in seqs) + 1        # padded past the longest table
        tables = [self.tables[s] + [0] * (width - len(self.tables[s])) for s in seqs]
        t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        batch = StepBatch(tokens=t(pos), positions=t(pos), query_start=t(qs), context_lens=t(ctx),
                          block_tables=t(tables), slot_mapping=t(slots), is_decode=decode,
                          query_lens_host=[new_counts[s] for s in seqs], context_lens_host=ctx)
        expected = []
        for s in seqs:
            a, b = self.done[s], self.done[s] + new_counts[s]
            expected.append(_dense_attention(self.q[s][a:b], self.k[s][:b].view(b, self.kv_heads, -1),
                                             self.v[s][:b].view(b, self.kv_heads, -1), a,
                                             self.heads, self.kv_heads, self.scale))
            self.done[s] = b
        return batch, torch.cat(q), torch.cat(k), torch.cat(v), torch.cat(expected)


@pytest.mark.parametrize("kernel", ["paged", "contiguous"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_attention_matches_dense_causal_reference(gen, kernel, heads, kv_heads):
    lengths = [41, 23, 9, 19]
    if kernel == "paged":
        world = _CacheWorld(gen, lengths, block_size=4, num_blocks=40, heads=heads, kv_heads=kv_heads)
        fn, block = K.paged_attention, 4
    else:
        world = _CacheWorld(gen, lengths, block_size=64, num_blocks=7, heads=heads, kv_heads=kv_heads, one_block_each=True)
        fn, block = K.sdpa, 64
    steps = [
        ({0: 13, 1: 23, 2: 1, 3: 5}, False),     # first chunks; seq 1 whole; seq 2 one token
        ({0: 9, 2: 8, 3: 1}, False),             # chunks over cached context, mixed with a 1-token step
        ({0: 1, 3: 1}, False),                   # one token each, sent as a prefill (engine's mixed step)
        ({0: 1, 3: 1}, True),
        ({0: 16, 3: 10}, False),                 # long chunk straddling many blocks
        ({0: 1, 3: 1}, True),
    ]
    for counts, decode in steps:
        batch, q, k, v, expected = world.step(counts, decode=decode)
        meta = K.attention_metadata(batch, block)
        assert meta.is_decode == all(n == 1 for n in counts.values())
        mixed = not meta.is_decode and 1 in counts.values()       # one-token sequences batched inside a prefill
        assert (meta.single_rows is not None) == mixed
        out = fn(q, k, v, world.k_cache, world.v_cache, meta, heads, kv_heads, world.head_dim, world.scale)
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
        # the new K/V landed in their slots
        slots = batch.slot_mapping
        torch.testing.assert_close(world.k_cache[slots], k.view(-1, kv_heads, world.head_dim))
        torch.testing.assert_close(world.v_cache[slots], v.view(-1, kv_heads, world.head_dim))


def test_decode_masks_padding_even_when_it_holds_large_values(gen):
    world = _CacheWorld(gen, [5, 30], block_size=8, num_blocks=10)
    batch, q, k, v, _ = world.step({0: 4, 1: 29})
    K.paged_attention(q, k, v, world.k_cache, world.v_cache, K.attention_metadata(batch, 8), 4, 2, 8, world.scale)
    batch, q, k, v, expected = world.step({0: 1, 1: 1}, decode=True)
    meta = K.attention_metadata(batch, 8)
    # whole blocks gathered: the 4 blocks of 8 the longest context (30) fills; the mask hides the rest
    assert meta.gather_blocks.shape == (2, 4) and meta.key_mask.shape[-1] == 32
    assert meta.key_mask.sum().item() == 5 + 30
    out = K.paged_attention(q, k, v, world.k_cache, world.v_cache, meta, 4, 2, 8, world.scale)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_block_gather_and_slot_gather_read_the_same_context(gen):
    """Decode attention gathers whole blocks for small blocks and single slots for a
    contiguous cache's one big block; both read each context's K/V identically."""
    world = _CacheWorld(gen, [5, 30], block_size=8, num_blocks=10)
    batch, q, k, v, _ = world.step({0: 4, 1: 29})
    K.paged_attention(q, k, v, world.k_cache, world.v_cache, K.attention_metadata(batch, 8), 4, 2, 8, world.scale)
    batch, *_ = world.step({0: 1, 1: 1}, decode=True)
    by_block = K.attention_metadata(batch, 8)
    by_slot = K.AttentionMetadata(batch.slot_mapping, 8, True)
    by_slot.gather_slots = K._context_slots(batch.block_tables, torch.arange(32), 8)
    assert by_block.gather_blocks is not None and by_block.gather_slots is None
    torch.testing.assert_close(K._gather_context(world.k_cache, by_block), K._gather_context(world.k_cache, by_slot))
    torch.testing.assert_close(K._gather_context(world.v_cache, by_block), K._gather_context(world.v_cache, by_slot))


def test_allocate_kv_cache_is_zeroed_per_layer():
    cache = K.allocate_kv_cache(3, 32, 2, 8)
    assert len(cache) == 3 and all(kc.shape == (32, 2, 8) and not kc.any() and not vc.any() for kc, vc in cache)
    assert cache[0][0].data_ptr() != cache[1][0].data_ptr()


def test_attention_scale_is_used(gen):
    world = _CacheWorld(gen, [6], block_size=4, num_blocks=4)
    batch, q, k, v, expected = world.step({0: 6})
    meta = K.attention_metadata(batch, 4)
    out = K.paged_attention(q, k, v, world.k_cache, world.v_cache, meta, 4, 2, 8, world.scale / 2)
    assert not torch.allclose(out.double(), expected, atol=1e-3)
    assert math.isfinite(out.abs().max().item())
