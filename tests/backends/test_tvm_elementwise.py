"""The TVM elementwise kernels (rmsnorm, add_rmsnorm, silu_mul, rope) against the torch kernels
they replace: several row counts, unaligned row views, shapes of two model families."""
from __future__ import annotations

import pytest
import torch

from vsc.backends.tvm.build import build_quant_kernels
from vsc.runtime.kernels import torch_ops
from vsc.runtime.kernels import tvm_ops

SPECS = [("rmsnorm", 576), ("add_rmsnorm", 576), ("rmsnorm", 32), ("rmsnorm", 100), ("rmsnorm", 37),
         ("silu_mul", 1536), ("silu_mul", 64), ("silu_mul", 50), ("rope", 9, 3, 64), ("rope", 4, 2, 8), ("rope", 3, 1, 12)]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    import os
    old = os.environ.get("VSC_TVM_CACHE")
    os.environ["VSC_TVM_CACHE"] = str(tmp_path_factory.mktemp("tvm-cache"))
    try:
        path = build_quant_kernels([], target={"kind": "llvm"}, elementwise=SPECS)
    finally:
        if old is None:
            os.environ.pop("VSC_TVM_CACHE")
        else:
            os.environ["VSC_TVM_CACHE"] = old
    return tvm_ops.load_tvm_kernels(path)


def _unaligned(rows: int, cols: int) -> torch.Tensor:
    """A [rows, cols] view starting one float into its storage (not 64-byte aligned)."""
    return torch.randn(rows * cols + 1)[1:].view(rows, cols)


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_rmsnorm_and_add_rmsnorm(lib, rows):
    torch.manual_seed(rows)
    for h in (576, 32, 100, 37):            # 16-lane rows, and narrower vectors where 16 does not divide
        x, w = _unaligned(rows, h), torch.randn(h)
        assert torch.allclose(tvm_ops.rmsnorm(lib, x, w, 1e-5), torch_ops.rmsnorm(x, w, 1e-5), atol=1e-5, rtol=1e-5)
    a, b, w = _unaligned(rows, 576), torch.randn(rows, 576), torch.randn(576)
    y, s = tvm_ops.add_rmsnorm(lib, a, b, w, 1e-6)
    ry, rs = torch_ops.add_rmsnorm(a, b, w, 1e-6)
    assert torch.equal(s, rs) and torch.allclose(y, ry, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 5])
def test_silu_mul(lib, rows):
    for n in (1536, 64, 50):
        x = _unaligned(rows, 2 * n) * 4
        assert torch.allclose(tvm_ops.silu_mul(lib, x), torch_ops.silu_mul(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 4])
def test_rope_matches_rotate_half(lib, rows):
    for hq, hk, d in ((9, 3, 64), (4, 2, 8), (3, 1, 12)):
        qkv = torch.randn(rows, (hq + 2 * hk) * d)
        q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)     # views of a fused projection, as in a plan
        cos, sin = torch_ops.rope_cos_sin(torch.arange(rows) + 11, 10000.0, d)
        got_q, got_k = tvm_ops.rope(lib, q, k, cos, sin)
        want_q, want_k = torch_ops.rope(q, k, cos, sin, d)
        assert torch.allclose(got_q, want_q, atol=1e-5) and torch.allclose(got_k, want_k, atol=1e-5)
