"""TVM quantized-linear kernels (vsc.backends.tvm) against the reference dequantize + matmul."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("tvm")

from vsc.backends.tvm import build as tvm_build  # noqa: E402
from vsc.runtime import quant  # noqa: E402
from vsc.runtime.kernels import tvm_ops  # noqa: E402

FMTS = ["q8_0", "q4_0", "q4_1"]
SHAPES = [(37, 32), (192, 96), (37, 576), (5, 1536)]


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[0, :32] = 0.0  # an all-zero block
    w[n - 1, k - 32:] *= 300.0  # a large-scale block in the last row / block
    if n > 2:
        w[1, :] *= 1e-4  # tiny scales
        w[2, :32] = -5.0  # constant block
    return w


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tvm_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("VSC_TVM_CACHE", str(cache))
    specs = [(f, n, k) for f in FMTS for n, k in SHAPES]
    path = tvm_build.build_quant_kernels(specs, {"kind": "llvm"})
    mp.undo()
    tvm_ops.set_num_threads(2)
    return tvm_ops.load_tvm_kernels(path)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quant_linear_matches_reference(lib, fmt, shape):
    n, k = shape
    parts = quant.quantize(_weights(n, k, n + k), fmt)
    w = quant.dequantize(parts, fmt).double()
    g = torch.Generator().manual_seed(k)
    for m in (1, 3, 16, 33):
        x = torch.randn(m, k, generator=g)
        ref = x.double() @ w.T
        y = tvm_ops.quant_linear(lib, x, parts, fmt)
        assert y.shape == (m, n) and y.dtype == torch.float32
        # fp32 accumulation over K terms: bound by K * eps * sum |x| |w|
        bound = (x.double().abs() @ w.abs().T) * (k * 2 ** -23) + 1e-30
        assert torch.all((y.double() - ref).abs() <= bound), (fmt, shape, m)


@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_kernel_exact(lib, fmt):
    n, k = 37, 576
    parts = quant.quantize(_weights(n, k, 7), fmt)
    assert torch.equal(tvm_ops.dequantize(lib, parts, fmt), quant.dequantize(parts, fmt))


def test_out_batched_and_tuple_parts(lib):
    n, k = 192, 96
    parts = quant.quantize(_weights(n, k, 3), "q4_1")
    x = torch.randn(2, 5, k)
    out = torch.empty(2, 5, n)
    fn = lib.quant_linear_fn("q4_1", n, k)
    y = tvm_ops.quant_linear(lib, x, tuple(parts.values()), "q4_1", out=out, fn=fn)
    assert y is out
    torch.testing.assert_close(y, x @ quant.dequantize(parts, "q4_1").T, rtol=1e-5, atol=1e-4)
    assert tvm_ops.quant_linear(lib, torch.empty(0, k), parts, "q4_1").shape == (0, n)
    with pytest.raises(KeyError, match="no function"):
        lib.quant_linear_fn("q4_1", 7, 64)


def test_build_cache_hit(tmp_path, monkeypatch):
    monkeypatch.setenv("VSC_TVM_CACHE", str(tmp_path))
    calls = []
    real = tvm_build._compile_library

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(tvm_build, "_compile_library", counting)
    specs = [("q8_0", 8, 64)]
    p1 = tvm_build.build_quant_kernels(specs, '{"kind": "llvm"}')
    p2 = tvm_build.build_quant_kernels(list(specs), {"kind": "llvm"})
    assert p1 == p2 and p1.is_file() and p1.parent.parent == tmp_path
    assert len(calls) == 1
    p3 = tvm_build.build_quant_kernels(specs + [("q4_0", 8, 64)], {"kind": "llvm"})
    assert p3 != p1 and len(calls) == 2
    assert not [f for f in p1.parent.iterdir() if f.name.endswith(".tmp.so")]


def test_build_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("VSC_TVM_CACHE", str(tmp_path))
    with pytest.raises(tvm_build.TvmBuildError, match="multiple of 32"):
        tvm_build.build_quant_kernels([("q4_0", 8, 40)])
    with pytest.raises(tvm_build.TvmBuildError, match="unknown quantization format"):
        tvm_build.build_quant_kernels([("q5_k", 8, 64)])
    with pytest.raises(tvm_build.TvmBuildError, match="JSON"):
        tvm_build.build_quant_kernels([("q4_0", 8, 64)], "llvm -mcpu=foo")

    def boom(*args):
        raise RuntimeError("codegen exploded\nsecond line")

    monkeypatch.setattr(tvm_build, "_compile_library", boom)
    with pytest.raises(tvm_build.TvmBuildError) as e:
        tvm_build.build_quant_kernels([("q4_0", 8, 64)], {"kind": "llvm"})
    assert "\n" not in str(e.value) and "codegen exploded" in str(e.value)


def test_host_target():
    t = tvm_build.host_target()
    assert t["kind"] == "llvm"
    assert isinstance(tvm_build.detect_mcpu(), str)


# -- int8 activations x VNNI ----------------------------------------------------------

VNNI_TARGET = {"kind": "llvm", "mcpu": "znver4"}
GEMM_SHAPES = [(16, 32), (48, 576), (32, 1536)]   # + (192, 96) from SHAPES: N a multiple of 16


@pytest.fixture(scope="module")
def vlib(tmp_path_factory):
    if not tvm_ops.host_has_vnni():
        pytest.skip("host CPU has no AVX-512 VNNI")
    cache = tmp_path_factory.mktemp("tvm_cache_vnni")
    mp = pytest.MonkeyPatch()
    mp.setenv("VSC_TVM_CACHE", str(cache))
    specs = [(f, n, k) for f in FMTS for n, k in SHAPES + [(7, 224)] + GEMM_SHAPES]
    path = tvm_build.build_quant_kernels(specs, VNNI_TARGET)
    mp.undo()
    tvm_ops.set_num_threads(2)
    return tvm_ops.load_tvm_kernels(path)


def _emulate_vnni(x: torch.Tensor, parts: dict, fmt: str):
    """float64 value of what the VNNI kernel computes exactly (x quantized per 32-block to int8:
    dx = amax / 127, xq = round_half_even(x / dx); integer block dots; d_w * dx scaling; q4_1's
    m_w * dx * sum(xq)), and the magnitude sum(|terms|) that bounds its fp32 rounding."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    dx = xb.abs().amax(-1) / 127.0
    inv = torch.where(dx > 0, 1.0 / dx, torch.zeros_like(dx))
    xq = torch.round(xb * inv[..., None]).double()
    qs = parts["qs"]
    if fmt == "q8_0":
        w = qs.double().reshape(qs.shape[0], -1, 32)
    else:
        q = qs.to(torch.int64).reshape(qs.shape[0], -1, 16)
        w = torch.cat([q & 15, q >> 4], -1).double() - (8 if fmt == "q4_0" else 0)
    s = parts["d"].double()[None] * dx.double()[:, None, :]
    y = (s * torch.einsum("mbe,nbe->mnb", xq, w)).sum(-1)
    mag = (s.abs() * torch.einsum("mbe,nbe->mnb", xq.abs(), w.abs())).sum(-1)
    if fmt == "q4_1":
        mw = parts["m"].double()[None]
        y = y + (mw * (dx.double() * xq.sum(-1))[:, None, :]).sum(-1)
        mag = mag + (mw.abs() * (dx.double() * xq.abs().sum(-1))[:, None, :]).sum(-1)
    return y, mag, xq, dx


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", SHAPES + [(7, 224)])
def test_vnni_matches_emulation_and_reference(vlib, fmt, shape):
    n, k = shape
    parts = quant.quantize(_weights(n, k, n + k), fmt)
    w = quant.dequantize(parts, fmt).double()
    g = torch.Generator().manual_seed(k + 1)
    for m in (1, 3, 16, 33):
        x = torch.randn(m, k, generator=g)
        x[0, :32] = 0.0  # an all-zero activation block
        if m > 1:
            x[1] *= 1e3
        y = tvm_ops.quant_linear(vlib, x, parts, fmt, vnni=True)
        assert y.shape == (m, n) and y.dtype == torch.float32
        ref, mag, xq, dx = _emulate_vnni(x, parts, fmt)
        # exact integer dots; fp32 scaling and summation of at most 2 * K / 4 + 16 terms
        assert torch.all((y.double() - ref).abs() <= mag * (k * 2 ** -23) + 1e-30), (fmt, shape, m)
        xq_k, _, xs_k, _ = vlib.vnni_scratch(fmt, m, k)
        assert torch.equal(xs_k.view(m, k // 32, -1)[..., 0], dx)
        assert torch.equal(xq_k.double().sum(-1), xq.sum((-1, -2)))
        # vs the exact product: |x - xq * dx| <= dx / 2 elementwise (plus the rounding above)
        full = x.double() @ w.T
        wabs = w.abs().reshape(n, k // 32, 32).sum(-1)
        qbound = (dx.double() / 2 * (1 + 2 ** -20)) @ wabs.T
        assert torch.all((y.double() - full).abs() <= qbound + mag * (k * 2 ** -23) + 1e-30), (fmt, shape, m)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", GEMM_SHAPES + [(192, 96)])
def test_gemm_matches_emulation_and_the_decode_kernel(vlib, fmt, shape):
    """The GEMM form computes what the decode VNNI kernel computes (same activation rounding,
    exact integer dots; only fp32 summation order differs), over register-tile edges (8 rows)."""
    n, k = shape
    parts = quant.quantize(_weights(n, k, n * k), fmt)
    g = torch.Generator().manual_seed(k + 7)
    for m in (1, 7, 8, 9, 17, 64):
        x = torch.randn(m, k, generator=g)
        x[0, :32] = 0.0
        if m > 1:
            x[m - 1] *= 1e3
        y = tvm_ops.quant_gemm(vlib, x, parts, fmt)
        assert y.shape == (m, n) and y.dtype == torch.float32
        ref, mag, _, _ = _emulate_vnni(x, parts, fmt)
        assert torch.all((y.double() - ref).abs() <= mag * (k * 2 ** -23) + 1e-30), (fmt, shape, m)
        v = tvm_ops.quant_linear(vlib, x, parts, fmt, vnni=True)
        assert torch.all((y.double() - v.double()).abs() <= 2 * mag * (k * 2 ** -23) + 1e-30), (fmt, shape, m)


def test_linear_takes_the_gemm_kernel_from_gemm_min_rows(vlib, monkeypatch):
    from vsc.runtime.quant_tensor import QuantTensor

    n, k = 48, 576
    wt = QuantTensor.quantize(_weights(n, k, 3), "q4_0")
    calls = []
    real = vlib.gemm_fn("q4_0", n, k)
    assert real is not None and vlib.gemm_fn("q4_1", 37, 576) is None      # N % 16 != 0: none built
    monkeypatch.setitem(vlib._funcs, tvm_ops.gemm_kernel_name("q4_0", n, k),
                        lambda *a: (calls.append(a[0].shape[0]), real(*a)))
    for m in (tvm_ops.GEMM_MIN_ROWS - 1, tvm_ops.GEMM_MIN_ROWS, 100):
        x = torch.randn(m, k)
        y = tvm_ops.linear(vlib, x, wt, activations="q8_0")
        torch.testing.assert_close(y, tvm_ops.quant_linear(vlib, x, wt.part_dict, "q4_0", vnni=True),
                                   rtol=1e-5, atol=1e-4)
    assert calls == [tvm_ops.GEMM_MIN_ROWS, 100]


def test_vnni_linear_and_generic_target(vlib, lib):
    from vsc.runtime.quant_tensor import QuantTensor

    n, k = 192, 96
    wt = QuantTensor.quantize(_weights(n, k, 5), "q4_1")
    x = torch.randn(2, 3, k)
    bias = torch.randn(n)
    y = tvm_ops.linear(vlib, x, wt, bias, activations="q8_0")
    assert wt.tvm_fns["q8_0"][1] and y.shape == (2, 3, n)          # the VNNI kernel ran
    torch.testing.assert_close(y, tvm_ops.quant_linear(vlib, x, wt.part_dict, "q4_1", vnni=True) + bias)
    full = x @ wt.dequantize().T + bias
    assert ((y - full).norm() / full.norm()).item() < 0.03
    exact = tvm_ops.linear(vlib, x, wt, bias)                       # activations f32 (the default): exact
    assert not wt.tvm_fns["f32"][1]
    torch.testing.assert_close(exact, full, rtol=1e-5, atol=1e-4)
    # a generic llvm target builds no VNNI kernels; q8_0 activations fall back to the exact kernel
    assert lib.vnni_fn("q4_1", n, k) is None
    wt2 = QuantTensor.quantize(_weights(n, k, 5), "q4_1")
    y2 = tvm_ops.linear(lib, x, wt2, activations="q8_0")
    assert not wt2.tvm_fns["q8_0"][1]
    torch.testing.assert_close(y2, x @ wt2.dequantize().T, rtol=1e-5, atol=1e-4)
    assert vlib.vnni_fn("q4_1", 7, 64) is None


def test_target_has_vnni():
    from vsc.backends.tvm.quant_linear import target_has_vnni

    assert target_has_vnni({"kind": "llvm", "mcpu": "znver4"})
    assert not target_has_vnni({"kind": "llvm"})
    assert not target_has_vnni({"kind": "llvm", "mcpu": "znver3"})
    assert target_has_vnni({"kind": "llvm", "mattr": ["+avx512vnni", "+avx512vl"]})


def test_plan_kernels_come_from_the_server_folder_and_set_the_thread_count(lib, tmp_path, monkeypatch):
    import shutil

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    server = tmp_path / "server"
    (server / "kernels").mkdir(parents=True)
    shutil.copy2(lib.path, server / "kernels" / "vsc_tvm_x.so")
    loaded = tvm_ops.load_plan_kernels(str(server / "model.py"), "vsc_tvm_x.so", "/nonexistent/build.so", 3)
    assert loaded.path == str((server / "kernels" / "vsc_tvm_x.so").resolve())
    assert os.environ["TVM_NUM_THREADS"] == "3"             # the plan's cores, before TVM's pool starts
    monkeypatch.setenv("TVM_NUM_THREADS", "1")               # what the environment says wins
    tvm_ops.load_plan_kernels(str(server / "model.py"), "vsc_tvm_x.so", "/nonexistent/build.so", 2)
    assert os.environ["TVM_NUM_THREADS"] == "1"
    with pytest.raises(RuntimeError, match="missing from"):
        tvm_ops.load_plan_kernels(str(tmp_path / "other" / "model.py"), "vsc_tvm_x.so", "/nonexistent/build.so")
