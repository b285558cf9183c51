"""The Triton kernels under Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py),
against the torch reference kernels of vsc.runtime.kernels.torch_ops on small random inputs.
On a GPU machine with TRITON_INTERPRET=0 the same tests run compiled, on CUDA tensors.

Every run draws a fresh seed (printed with a failure; VSC_TEST_SEED=<n> replays it).
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from vsc.runtime.kernels import triton_ops as K  # noqa: E402
from vsc.runtime.api import StepBatch  # noqa: E402
from vsc.runtime.kernels import torch_ops as R  # noqa: E402

if not K.INTERPRETED and not torch.cuda.is_available():
    pytest.skip("triton was imported in compile mode (TRITON_INTERPRET unset when it was first imported) "
                "and there is no GPU to compile for", allow_module_level=True)
DEV = "cpu" if K.INTERPRETED else "cuda"

SEED = int(os.environ.get("VSC_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture
def gen(request):
    """A generator seeded from this run's seed and the test's name; prints the seed (shown on failure)."""
    seed = (SEED + sum(map(ord, request.node.name))) % 2**31
    print(f"seed: VSC_TEST_SEED={SEED} (this test: torch seed {seed})")
    return torch.Generator().manual_seed(seed)


def randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEV, dtype=dtype)


def randint(gen, low, high, shape):
    return torch.randint(low, high, shape, generator=gen).to(DEV)


def tensor(values):
    return torch.tensor(values, device=DEV)


def close(actual, expected, dtype, what=""):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype],
                               msg=lambda m: f"{what} (VSC_TEST_SEED={SEED}): {m}")


# --- rmsnorm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,config", [((5, 96), None), ((2, 3, 40), None), ((4, 100), {"BLOCK_N": 32})])
def test_rmsnorm_matches_reference(gen, dtype, shape, config):
    x = randn(gen, *shape, dtype=dtype, scale=3.0)
    w = randn(gen, shape[-1], dtype=dtype)
    eps = 1e-5
    out = K.rmsnorm(x, w, eps, config=config)
    assert out.shape == x.shape and out.dtype == dtype
    close(out, R.rmsnorm(x, w, eps), dtype, "rmsnorm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [None, {"BLOCK_N": 16, "num_warps": 2}])
def test_fused_add_rmsnorm_updates_residual(gen, dtype, config):
    x = randn(gen, 6, 72, dtype=dtype)
    residual = randn(gen, 6, 72, dtype=dtype, scale=2.0)
    w = randn(gen, 72, dtype=dtype)
    before = residual.clone()
    out = K.rmsnorm(x, w, 1e-6, residual=residual, config=config)
    new_residual = R.add(x, before)
    # The new residual is x + residual rounded once to the dtype, as the unfused add rounds it.
    # fp32: bit-exact. bf16: within one bf16 ulp, because Triton's interpreter truncates
    # fp32 -> bf16 where the GPU (and torch) round to nearest even.
    exact = dict(atol=0, rtol=0) if dtype == torch.float32 else dict(atol=1e-6, rtol=2 ** -7)
    torch.testing.assert_close(residual, new_residual, **exact)
    close(out, R.rmsnorm(new_residual, w, 1e-6), dtype, "fused add+rmsnorm")
    assert not torch.equal(residual, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rmsnorm_is_out_of_place_like_torch_ops(gen, dtype):
    a = randn(gen, 3, 2, 48, dtype=dtype)
    b = randn(gen, 3, 2, 48, dtype=dtype)
    w = randn(gen, 48, dtype=dtype)
    a0, b0 = a.clone(), b.clone()
    norm, total = K.add_rmsnorm(a, b, w, 1e-5)
    ref_norm, ref_total = R.add_rmsnorm(a0, b0, w, 1e-5)
    assert torch.equal(a, a0) and torch.equal(b, b0)
    exact = dict(atol=0, rtol=0) if dtype == torch.float32 else dict(atol=1e-6, rtol=2 ** -7)
    torch.testing.assert_close(total, ref_total, **exact)
    close(norm, ref_norm, dtype, "add_rmsnorm")


def test_rmsnorm_rejects_bad_weight_and_config(gen):
    x = randn(gen, 2, 8)
    with pytest.raises(ValueError, match="weight shape"):
        K.rmsnorm(x, randn(gen, 7), 1e-5)
    with pytest.raises(ValueError, match="unknown config keys"):
        K.rmsnorm(x, randn(gen, 8), 1e-5, config={"BLOCK": 8})


# --- rope ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (3, 1, 8), (2, 2, 32)])
def test_rope_in_place_matches_reference(gen, dtype, heads, kv_heads, head_dim):
    t = 5
    table = R.RotaryTable(10000.0, head_dim, 64, dtype=dtype, device=DEV)
    positions = randint(gen, 0, 64, (t,))
    q = randn(gen, t, heads * head_dim, dtype=dtype)
    k = randn(gen, t, kv_heads * head_dim, dtype=dtype)
    cos, sin = table.lookup(positions)
    q_ref, k_ref = R.rope(q, k, cos, sin, head_dim)
    q1, k1 = q.clone(), k.clone()
    rq, rk = K.rope(q1, k1, cos, sin, head_dim)
    assert rq is q1 and rk is k1                       # in place
    close(q1, q_ref, dtype, "rope q (rows)")
    close(k1, k_ref, dtype, "rope k (rows)")
    q2, k2 = q.clone(), k.clone()
    K.rope(q2, k2, table.cos, table.sin, head_dim, positions=positions)
    close(q2, q_ref, dtype, "rope q (table)")
    close(k2, k_ref, dtype, "rope k (table)")


def test_rope_on_views_of_a_fused_qkv_leaves_v_alone(gen):
    heads, kv_heads, hd, t = 4, 2, 16, 3
    qkv = randn(gen, t, (heads + 2 * kv_heads) * hd)
    v_before = qkv[:, (heads + kv_heads) * hd:].clone()
    q, k, v = R.split(qkv, (heads * hd, kv_heads * hd, kv_heads * hd))
    table = R.RotaryTable(500000.0, hd, 32, device=DEV)
    positions = tensor([0, 9, 31])
    q_ref, k_ref = R.rope(q.clone(), k.clone(), *table.lookup(positions), hd)
    K.rope(q, k, table.cos, table.sin, hd, positions=positions)
    close(qkv[:, :heads * hd], q_ref, torch.float32, "rope q view")
    close(qkv[:, heads * hd:(heads + kv_heads) * hd], k_ref, torch.float32, "rope k view")
    assert torch.equal(qkv[:, (heads + kv_heads) * hd:], v_before)
    # position 0 is the identity rotation
    close(qkv[0, :heads * hd], q_ref[0], torch.float32)


# --- silu_mul --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,config", [((4, 80), None), ((2, 3, 64), None), ((3, 600), {"BLOCK_F": 128})])
def test_silu_mul_matches_reference(gen, dtype, shape, config):
    x = randn(gen, *shape, dtype=dtype, scale=3.0)
    out = K.silu_mul(x, config=config)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    close(out, R.silu_mul(x), dtype, "silu_mul")


# --- paged KV cache and decode attention -----------------------------------------------------


def make_paged_case(gen, *, seqs, heads, kv_heads, head_dim, block_size, dtype, spare_blocks=3):
    """Random caches (never zeros) and scrambled block tables for `seqs` sequences of random
    lengths, at least one ending in a partially filled block and one in a full block."""
    lens = torch.randint(1, 6 * block_size, (seqs,), generator=gen)
    lens[0] = 3 * block_size                       # a full last block
    lens[1] = 2 * block_size + 1 + int(torch.randint(0, block_size - 1, (1,), generator=gen))  # partial
    blocks_per_seq = [(int(n) + block_size - 1) // block_size for n in lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)   # scrambled physical blocks
    width = max(blocks_per_seq) + 1
    tables = torch.zeros(seqs, width, dtype=torch.int64)
    used = 0
    for b, nb in enumerate(blocks_per_seq):
        tables[b, :nb] = order[used:used + nb]
        used += nb
    tables, lens = tables.to(DEV), lens.to(DEV)
    slots = num_blocks * block_size
    k_cache = randn(gen, slots, kv_heads, head_dim, dtype=dtype)
    v_cache = randn(gen, slots, kv_heads, head_dim, dtype=dtype)
    q = randn(gen, seqs, heads * head_dim, dtype=dtype)
    return q, k_cache, v_cache, tables, lens


def plain_decode_attention(q, k_cache, v_cache, tables, lens, heads, kv_heads, head_dim, block_size, scale):
    """Independent reference: per sequence, gather its tokens slot by slot, softmax in fp64."""
    out = torch.empty(q.shape[0], heads, head_dim, dtype=torch.float64, device=q.device)
    group = heads // kv_heads
    for b in range(q.shape[0]):
        n = int(lens[b])
        slots = tensor([int(tables[b, i // block_size]) * block_size + i % block_size for i in range(n)])
        keys = k_cache[slots].double()             # [n, kv_heads, hd]
        values = v_cache[slots].double()
        qb = q[b].view(heads, head_dim).double()
        for h in range(heads):
            g = h // group
            w = torch.softmax(keys[:, g] @ qb[h] * scale, dim=0)
            out[b, h] = w @ values[:, g]
    return out.view(q.shape[0], heads * head_dim)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 2, 16, 4), (6, 2, 32, 8), (2, 2, 16, 16),
                                                                 (8, 1, 16, 4)])
@pytest.mark.parametrize("config", [None, {"BLOCK_N": 16}])
def test_paged_decode_attention_matches_plain_reference(gen, heads, kv_heads, head_dim, block_size, config):
    q, kc, vc, tables, lens = make_paged_case(gen, seqs=4, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                              block_size=block_size, dtype=torch.float32)
    scale = head_dim ** -0.5
    out = K.paged_decode_attention(q, kc, vc, tables, lens, scale, heads, kv_heads, head_dim, block_size,
                                   config=config)
    expected = plain_decode_attention(q, kc, vc, tables, lens, heads, kv_heads, head_dim, block_size, scale)
    close(out, expected, torch.float32, f"paged decode lens={lens.tolist()}")


def decode_batch(tables, lens, block_size):
    """A decode StepBatch whose new token (the last of each context) sits at its slot."""
    b = lens.shape[0]
    last = lens - 1
    slot_mapping = tables[torch.arange(b, device=DEV), last // block_size] * block_size + last % block_size
    return StepBatch(tokens=torch.zeros(b, dtype=torch.int64, device=DEV), positions=last,
                     query_start=torch.arange(b + 1, device=DEV),
                     context_lens=lens, block_tables=tables, slot_mapping=slot_mapping, is_decode=True,
                     query_lens_host=[1] * b, context_lens_host=lens.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_writes_cache_and_matches_torch_ops(gen, dtype):
    heads, kv_heads, hd, bs = 4, 2, 16, 4
    q, kc, vc, tables, lens = make_paged_case(gen, seqs=5, heads=heads, kv_heads=kv_heads, head_dim=hd,
                                              block_size=bs, dtype=dtype)
    k_new = randn(gen, 5, kv_heads * hd, dtype=dtype)
    v_new = randn(gen, 5, kv_heads * hd, dtype=dtype)
    batch = decode_batch(tables, lens, bs)
    meta = R.attention_metadata(batch, bs)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    expected = R.paged_attention(q, k_new, v_new, kc_ref, vc_ref, meta, heads, kv_heads, hd, hd ** -0.5)
    out = K.paged_attention(q, k_new, v_new, kc, vc, batch.slot_mapping, tables, lens, heads, kv_heads, hd,
                            hd ** -0.5, bs)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)    # the same cache writes
    close(out, expected, dtype, f"paged attention lens={lens.tolist()}")


def test_write_kv_cache_skips_negative_slots(gen):
    kc = randn(gen, 12, 2, 8)
    vc = randn(gen, 12, 2, 8)
    k = randn(gen, 3, 16)
    v = randn(gen, 3, 2, 8)
    slots = tensor([7, -1, 2])
    kc_ref, vc_ref = kc.clone(), vc.clone()
    K.write_kv_cache(k, v, kc, vc, slots)
    kc_ref[7], kc_ref[2] = k[0].view(2, 8), k[2].view(2, 8)
    vc_ref[7], vc_ref[2] = v[0], v[2]
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_empty_context_gives_zeros_not_nan(gen):
    q, kc, vc, tables, lens = make_paged_case(gen, seqs=3, heads=2, kv_heads=1, head_dim=16, block_size=4,
                                              dtype=torch.float32)
    lens[2] = 0
    out = K.paged_decode_attention(q, kc, vc, tables, lens, 0.25, 2, 1, 16, 4)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.isfinite(out).all()


# --- matmul ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_and_linear_form(gen, dtype):
    a = randn(gen, 40, 24, dtype=dtype)
    w = randn(gen, 72, 24, dtype=dtype)            # a linear weight [out, in]
    out = K.matmul(a, w.t(), config={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16})
    expected = a.double() @ w.double().t()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=2e-2)
    torch.testing.assert_close(out.double(), expected, **tol, msg=lambda m: f"VSC_TEST_SEED={SEED}: {m}")


# --- autotuning under the interpreter --------------------------------------------------------


@pytest.mark.skipif(not K.INTERPRETED, reason="interpreter only")
def test_interpreter_never_benchmarks(gen, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the autotuner ran under the interpreter")

    for spec in K.KERNELS.values():
        monkeypatch.setattr(spec.tuned, "run", boom)
    x = randn(gen, 3, 32)
    K.rmsnorm(x, randn(gen, 32), 1e-5)
    K.silu_mul(x)


def test_default_configs_fit_their_arguments():
    # rmsnorm defaults to one block per row (at least 128 lanes)
    assert [K.RMSNORM.default_config({"N": n}).kwargs["BLOCK_N"] for n in (40, 2048, 4096, 5120)] == [
        128, 2048, 4096, 8192]
    assert K.SILU_MUL.default_config({"F": 40}).kwargs["BLOCK_F"] == 128
    big = K.PAGED_DECODE.default_config({"HEAD_DIM": 256})
    assert big.kwargs["BLOCK_N"] * 256 <= 128 * 128
    for spec in K.KERNELS.values():
        assert spec.configs, spec.name
        assert all(set(c.kwargs) == set(spec.meta_names) for c in spec.configs), spec.name


def test_autotune_switch(monkeypatch):
    monkeypatch.setenv(K.AUTOTUNE_ENV, "0")
    assert not K.autotune_enabled()
    monkeypatch.setenv(K.AUTOTUNE_ENV, "1")
    assert K.autotune_enabled()


def test_catalog_names_line_up():
    from vsc.ir.kernels import KERNELS as CATALOG

    triton_entries = {n for n in CATALOG if n.startswith("triton.")}
    implemented = {s.ir_kernel for s in K.KERNELS.values() if s.ir_kernel}
    assert triton_entries == implemented
