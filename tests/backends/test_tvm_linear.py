"""tvm.linear: the TVM f32 linear kernel against torch (odd shapes, tile tails, K not a multiple of
16), the wrapper's hand-off to torch for prefill-sized inputs, and select-kernels' measured choice."""
from __future__ import annotations

import pytest
import torch

from vsc.backends.tvm.build import build_quant_kernels
from vsc.ir.module import walk_ops
from vsc.passes.manager import PassManager
from vsc.runtime.kernels import tvm_ops
from vsc.runtime.kernels.tvm_ops import DENSE_MAX_ROWS, load_tvm_kernels

SHAPES = [(96, 64), (100, 40), (7, 24), (1, 16), (960, 576)]


@pytest.fixture(scope="module")
def lib():
    return load_tvm_kernels(build_quant_kernels([], elementwise=[("linear", n, k) for n, k in SHAPES]), 1)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 4, 5, 16, 19])
def test_matches_torch(lib, n, k, m):
    gen = torch.Generator().manual_seed(n * 1000 + k + m)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(m, k, generator=gen)
    torch.testing.assert_close(tvm_ops.dense(lib, x, w), x @ w.t(), rtol=1e-4, atol=1e-4)


def test_bias_leading_dims_and_prefill_sized_inputs(lib, monkeypatch):
    w, b = torch.randn(96, 64), torch.randn(96)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(tvm_ops.dense(lib, x, w, b), x @ w.t() + b, rtol=1e-4, atol=1e-4)
    big = torch.randn(DENSE_MAX_ROWS + 1, 64)
    monkeypatch.setattr(lib, "get", lambda name: pytest.fail("a prefill-sized input must not reach the TVM kernel"))
    torch.testing.assert_close(tvm_ops.dense(lib, big, w), big @ w.t(), rtol=1e-4, atol=1e-4)


def test_select_kernels_chooses_by_measured_cost(make_module):
    seen = []

    def costs(module, op, names):
        seen.append((op.kind, tuple(names)))
        return {name: (1.0 if name == "torch.linear" else 2.0) for name in names} if op.kind == "linear" else {}

    m = PassManager("paged-kv{block=16},select-kernels", kernel_costs=costs).run(make_module())
    assert ("linear", ("tvm.linear", "torch.linear")) in seen      # never torch.linear_onednn on a plain weight
    assert {op.kernel.name for op in walk_ops(m.model.func.body) if op.kind == "linear"} == {"torch.linear"}
    plain = PassManager("paged-kv{block=16},select-kernels").run(make_module())      # no costs: the catalog's order
    assert {op.kernel.name for op in walk_ops(plain.model.func.body) if op.kind == "linear"} == {"tvm.linear"}
