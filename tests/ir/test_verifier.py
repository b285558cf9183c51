"""The structural verifier catches each invariant it claims, naming the node and its origin."""
from __future__ import annotations

import pytest

from vsc.errors import VerificationError
from vsc.ir.module import KernelRef, Stage
from vsc.ir.types import Origin, TensorType, pass_origin
from vsc.ir.verifier import INVARIANTS, verify, verify_or_raise
from ir_queries import layer_region


def find(ops, kind, nth=0):
    return [op for op in ops if op.kind == kind][nth]


def checks(module):
    return {d.check for d in verify(module)}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_imported_modules_are_valid(make_module, arch):
    assert verify(make_module(arch)) == []


def test_use_before_def(make_module):
    m = make_module()
    region = layer_region(m)
    region.ops.insert(0, region.ops.pop(1))  # q projection now reads %xn before rmsnorm defines it
    diags = verify(m)
    assert any(d.check == "ssa" and "%xn before it is defined" in d.message for d in diags)


def test_value_defined_twice(make_module):
    m = make_module()
    region = layer_region(m)
    find(region.ops, "linear", 1).results = ["%q"]
    assert any(d.check == "ssa" and "%q is defined twice" in d.message for d in verify(m))


def test_return_of_undefined_value(make_module):
    m = make_module()
    m.model.func.returns = ["%nowhere", "%next"]
    assert any(d.check == "ssa" and "%nowhere" in d.message for d in verify(m))


def test_undeclared_weight(make_module):
    m = make_module()
    find(layer_region(m).ops, "linear").operands[1] = "@missing.weight"
    diags = verify(m)
    assert any(d.check == "weights" and "@missing.weight" in d.message for d in diags)


def test_layer_weight_outside_region(make_module):
    m = make_module()
    find(m.model.func.body, "rmsnorm").operands[1] = "@model.layers.{i}.input_layernorm.weight"
    assert any(d.check == "weights" and "outside a repeat region" in d.message for d in verify(m))


def test_concat_weight_shape_mismatch(make_module):
    from vsc.passes.fuse_qkv import FuseQKV
    m = FuseQKV().run(make_module())
    fused = next(w for w in m.model.weights if w.init_fn == "concat")
    fused.type = TensorType("f32", (fused.type.shape[0] - 1, fused.type.shape[1]))
    assert any(d.check == "weights" and "concat" in d.message for d in verify(m))


def test_shape_mismatch_names_node_and_origin(make_module):
    m = make_module()
    op = find(layer_region(m).ops, "linear")
    op.types = [TensorType("f32", ("T", 999))]
    op.origin = pass_origin("my-broken-pass")
    diag = next(d for d in verify(m) if d.check == "types")
    assert "%q = linear" in diag.node and "f32[T, 999]" in diag.message
    assert "pass my-broken-pass" in str(diag)


def test_dtype_disagreement(make_module):
    m = make_module()
    m.model.weight("@model.layers.{i}.self_attn.q_proj.weight").type = TensorType("f16", (32, 32))
    assert any(d.check == "types" and "dtypes differ" in d.message for d in verify(m))


def test_undeclared_symbol(make_module):
    m = make_module()
    m.model.func.symbols = ["T"]  # B is used by last_token and the returns
    assert any(d.check == "types" and "undeclared symbol 'B'" in d.message for d in verify(m))


def test_gqa_head_rule(make_module):
    m = make_module()
    find(layer_region(m).ops, "attention").attrs["kv_heads"] = 3
    assert any(d.check == "types" and "multiple of kv_heads" in d.message for d in verify(m))


def test_missing_kernel(make_module):
    m = make_module()
    find(layer_region(m).ops, "rmsnorm").kernel = None
    assert any(d.check == "kernels" and "has no kernel" in d.message for d in verify(m))


def test_kernel_for_wrong_op(make_module):
    m = make_module()
    find(layer_region(m).ops, "rmsnorm").kernel = KernelRef("torch.linear")
    assert any(d.check == "kernels" and "not rmsnorm" in d.message for d in verify(m))


def test_kernel_not_for_target(make_module):
    m = make_module()
    find(layer_region(m).ops, "rmsnorm").kernel = KernelRef("triton.rmsnorm")
    assert any(d.check == "kernels" and "does not run on target cpu" in d.message for d in verify(m))


def test_kernel_needs_other_cache_layout(make_module):
    m = make_module()
    find(layer_region(m).ops, "attention").kernel = KernelRef("torch.paged_attention")
    assert any(d.check == "kernels" and "needs a paged cache" in d.message for d in verify(m))


def test_repeat_count_must_match_layers(make_module):
    m = make_module()
    find(m.model.func.body, "repeat").attrs["count"] = 3
    assert any(d.check == "model" and "3 times but the model has 2 layers" in d.message for d in verify(m))


def test_step_returns(make_module):
    m = make_module()
    m.model.func.returns = ["%next", "%logits"]
    assert any(d.check == "model" for d in verify(m))


def test_target_arch(make_module):
    m = make_module()
    m.target.kind = "cuda"
    m.target.attrs["arch"] = "hopper"
    assert any(d.check == "target" and "sm_NN" in d.message for d in verify(m))


def test_cache_exceeds_budget(make_module):
    m = make_module()
    m.cache.capacity_tokens *= 1000
    diag = next(d for d in verify(m) if d.check == "cache")
    assert "exceeds the budget" in diag.message and "spec test.vs:2:3" in str(diag)


def test_cache_too_small_for_batch(make_module):
    m = make_module()
    m.cache.capacity_tokens = 100
    assert any(d.check == "cache" and "cannot hold" in d.message for d in verify(m))


def test_prefix_sharing_needs_paged(make_module):
    m = make_module()
    m.cache.prefix_sharing = "radix"
    assert any(d.check == "cache" and "needs a paged cache" in d.message for d in verify(m))


def test_paged_block_must_divide_capacity(make_module):
    m = make_module()
    m.cache.layout, m.cache.block_size = "paged", 16
    m.cache.capacity_tokens = 1000
    find(layer_region(m).ops, "attention").kernel = KernelRef("torch.paged_attention")
    assert any(d.check == "cache" and "whole number of 16-token blocks" in d.message for d in verify(m))


@pytest.mark.parametrize("field,value,needle", [
    ("max_batch", 0, "max_batch must be >= 1"),
    ("mode", "eager", "mode must be one of"),
    ("max_tokens", 100, "cannot prefill a 256-token prompt"),
    ("chunked_prefill", 64, "needs continuous batching"),
])
def test_batching_ranges(make_module, field, value, needle):
    m = make_module()
    setattr(m.batching, field, value)
    assert any(d.check == "batching" and needle in d.message for d in verify(m))


def test_request_graph_cycle(make_module):
    m = make_module()
    m.requests.add_edge("decode", "admit")
    assert any(d.check == "requests" and "cycle" in d.message for d in verify(m))


def test_request_graph_disconnected(make_module):
    m = make_module()
    m.requests.add_stage(Stage("constrain", {}, Origin("pass", "json-mode")))
    diags = [d for d in verify(m) if d.check == "requests"]
    assert any("not connected" in d.message for d in diags)


def test_unknown_stage_kind(make_module):
    m = make_module()
    m.requests.insert_between(Stage("teleport", {}, pass_origin("bad")), "decode", "sample")
    diag = next(d for d in verify(m) if d.check == "requests")
    assert "stage teleport" in diag.node and "pass bad" in str(diag)


def test_verify_or_raise_carries_every_diagnostic(make_module):
    m = make_module()
    m.batching.max_batch = 0
    m.requests.add_edge("stream", "ingress")
    with pytest.raises(VerificationError) as e:
        verify_or_raise(m)
    assert len(e.value.diagnostics) >= 2
    assert e.value.render().count("verify: error:") == len(e.value.diagnostics)


def test_every_invariant_group_is_exercised():
    """Each documented invariant group has at least one test in this file naming it."""
    source = open(__file__).read()
    for name in INVARIANTS:
        assert f'd.check == "{name}"' in source, name
