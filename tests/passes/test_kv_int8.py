"""kv-int8: the rewrite, its options and requirement, the sizes it counts, the verifier's
cache-dtype checks, and kernel choice on cuda."""
from __future__ import annotations

import pytest

from vsc.errors import PassFailure, PipelineError
from vsc.ir.kernels import KERNELS, best_kernel
from vsc.ir.module import KernelRef, Target, walk_ops
from vsc.ir.sizes import kv_bytes_per_token
from vsc.ir.types import Origin
from vsc.ir.verifier import verify
from vsc.passes.base import build_pipeline
from vsc.passes.manager import PassManager


def attention_ops(module):
    return [op for op in walk_ops(module.model.func.body) if op.kind == "attention"]


def as_cuda(module):
    module.target = Target("cuda", {"arch": "sm_90", "gpus": 1, "memory": 80 << 30}, Origin("spec", "test.vs", 3, 3))
    return module


def test_cache_becomes_int8_and_capacity_grows_to_the_budget(make_module):
    m = make_module()
    paged = PassManager("paged-kv{block=16}").run(m)
    out = PassManager("paged-kv{block=16},kv-int8").run(m)
    a = out.model.attrs
    per_token = 2 * a["layers"] * a["kv_heads"] * (a["head_dim"] + 4)      # int8 values + an fp32 scale per head
    assert out.cache.dtype == "i8" and out.cache.layout == "paged" and out.cache.block_size == 16
    assert out.cache.capacity_tokens == out.cache.budget_bytes // per_token // 16 * 16
    assert out.cache.capacity_tokens * per_token <= out.cache.budget_bytes
    ratio = out.cache.capacity_tokens / paged.cache.capacity_tokens
    assert ratio == pytest.approx(4 * a["head_dim"] / (a["head_dim"] + 4), rel=0.01)   # 2.67x at head_dim 8
    assert out.cache.origin.detail == "kv-int8"
    for op in attention_ops(out):
        assert op.kernel.name == "torch.paged_attention_int8" and op.origin.detail == "kv-int8"
    assert verify(out) == []
    assert m.cache.dtype == "f32"      # the input is untouched


def test_kv_bytes_per_token_counts_the_scales(make_module):
    a = make_module().model.attrs
    assert kv_bytes_per_token(a, "i8") == 2 * a["layers"] * a["kv_heads"] * (a["head_dim"] * 1 + 4)
    assert kv_bytes_per_token(a, "f32") == 2 * a["layers"] * a["kv_heads"] * a["head_dim"] * 4
    assert kv_bytes_per_token(a, "bf16") == 2 * a["layers"] * a["kv_heads"] * a["head_dim"] * 2


def test_needs_paged_kv_earlier():
    with pytest.raises(PipelineError, match="kv-int8 requires paged-kv earlier"):
        build_pipeline("kv-int8")
    with pytest.raises(PipelineError, match="kv-int8 requires paged-kv earlier"):
        build_pipeline("kv-int8,paged-kv")


def test_granularity_is_per_token_head_only():
    assert build_pipeline("paged-kv,kv-int8")[1].granularity == "token-head"
    with pytest.raises(PipelineError, match="granularity.*one of token-head"):
        build_pipeline("paged-kv,kv-int8{granularity=tensor}")


def test_tokens_option_rounds_to_blocks_and_must_fit(make_module):
    m = make_module()
    out = PassManager("paged-kv{block=16},kv-int8{tokens=1000}").run(m)
    assert out.cache.capacity_tokens == 992
    with pytest.raises(PassFailure, match="tokens=100000000 needs .* of int8 KV cache, the budget is"):
        PassManager("paged-kv{block=16},kv-int8{tokens=100000000}").run(m)


def test_refuses_a_contiguous_cache_given_directly(make_module):
    from vsc.errors import VscError
    from vsc.passes.kv_int8 import KVInt8
    with pytest.raises(VscError, match="needs a paged KV cache, the plan's is contiguous"):
        KVInt8().run(make_module())


# --- the verifier ---------------------------------------------------------------------------


def test_verifier_refuses_an_int8_cache_with_a_float_attention_kernel(make_module):
    m = PassManager("paged-kv{block=16},kv-int8").run(make_module())
    attention_ops(m)[0].kernel = KernelRef("torch.paged_attention")
    diags = [d for d in verify(m) if d.check == "kernels"]
    assert diags and "torch.paged_attention reads a bf16/f16/f32 KV cache, the plan's is i8" in diags[0].message


def test_verifier_refuses_a_float_cache_with_the_int8_kernel(make_module):
    m = PassManager("paged-kv{block=16}").run(make_module())
    attention_ops(m)[0].kernel = KernelRef("torch.paged_attention_int8")
    diags = [d for d in verify(m) if d.check == "kernels"]
    assert diags and "torch.paged_attention_int8 reads a i8 KV cache, the plan's is f32" in diags[0].message


def test_verifier_counts_scales_against_the_budget(make_module):
    m = PassManager("paged-kv{block=16},kv-int8").run(make_module())
    a = m.model.attrs
    values_only = 2 * a["layers"] * a["kv_heads"] * a["head_dim"]
    m.cache.capacity_tokens = m.cache.budget_bytes // values_only // 16 * 16     # fits without the scales only
    assert any(d.check == "cache" and "exceeds the budget" in d.message for d in verify(m))


@pytest.mark.parametrize("dtype", ["i64", "bool", "u8"])
def test_verifier_knows_the_cache_dtypes(make_module, dtype):
    m = make_module()
    m.cache.dtype = dtype
    diags = [d for d in verify(m) if d.check == "cache"]
    assert diags and f"unknown cache dtype '{dtype}' (known: bf16, f16, f32, i8)" in diags[0].message


# --- kernels on cuda ------------------------------------------------------------------------


def test_best_kernel_follows_the_cache_dtype():
    assert best_kernel("attention", "cuda", "paged", "f32") == "triton.paged_attention"
    assert best_kernel("attention", "cuda", "paged", "i8") == "torch.paged_attention_int8"
    assert best_kernel("attention", "cpu", "paged", "i8") == "torch.paged_attention_int8"
    assert best_kernel("attention", "cpu", "contiguous", "i8") is None
    assert best_kernel("rmsnorm", "cuda", "paged", "i8") == "triton.rmsnorm"     # other ops do not care
    assert "i8" not in KERNELS["triton.paged_attention"].cache_dtypes


def test_on_cuda_attention_leaves_triton_and_select_kernels_keeps_it_there(make_module):
    m = as_cuda(make_module())
    after_select = PassManager("paged-kv{block=16},select-kernels,kv-int8").run(m)
    before_select = PassManager("paged-kv{block=16},kv-int8,select-kernels").run(m)
    for out in (after_select, before_select):
        assert [op.kernel.name for op in attention_ops(out)] == ["torch.paged_attention_int8"]
        assert any(op.kernel is not None and op.kernel.name == "triton.rope" for op in walk_ops(out.model.func.body))
        assert verify(out) == []
