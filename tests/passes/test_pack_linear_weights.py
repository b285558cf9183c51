"""pack-linear-weights: the rewrite, its refusals, the verifier's packed-weight rule, and the
oneDNN kernel against F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vsc.errors import PassFailure
from vsc.ir.module import walk_ops
from vsc.ir.parser import parse_module
from vsc.ir.printer import print_module
from vsc.ir.sizes import weight_bytes
from vsc.ir.verifier import verify
from vsc.models.tiny import make_tiny
from vsc.passes.manager import PassManager
from vsc.runtime.kernels.torch_ops import linear_onednn
from vsc.runtime.weights import DERIVED_INITS
from test_model_graph_passes import lowered, prefill_then_decode, runner


def linears(module):
    return [op for op in walk_ops(module.model.func.body) if op.kind == "linear"]


def test_every_untied_linear_reads_a_packed_weight(make_module):
    m = make_module()
    out = PassManager("fuse-qkv,paged-kv,continuous-batching{max_batch=8},pack-linear-weights").run(m)
    for op in linears(out):
        w = out.model.weight(op.operands[1])
        assert op.kernel.name == "torch.linear_onednn" and w.init_fn == "onednn_pack" and w.init_attrs == {"batch": 8}
        assert w.type == out.model.weight(w.init_args[0]).type
    assert verify(out) == []
    no_head = PassManager("pack-linear-weights{include_head=false}").run(m)
    head = [op for op in linears(no_head) if op.kernel.name != "torch.linear_onednn"]
    assert len(head) == 1 and head[0].operands[1] == "@lm_head.weight"


def test_a_tied_head_is_never_packed(make_module):
    out = PassManager("pack-linear-weights").run(make_module("qwen2"))       # qwen2 here ties its head
    embedded = {op.operands[1] for op in walk_ops(out.model.func.body) if op.kind == "embed"}
    head = [op for op in linears(out) if op.operands[1] in embedded]
    assert head and all(op.kernel.name == "torch.linear" for op in head)


def test_fusing_after_packing_is_caught_by_the_verifier(make_module):
    m = PassManager("pack-linear-weights").run(make_module())
    with pytest.raises(PassFailure, match="packed weight"):
        PassManager("fuse-qkv").run(m)


def test_cuda_plans_are_refused(make_module):
    from vsc.ir.module import Target
    from vsc.ir.types import Origin
    m = make_module()
    m.target = Target("cuda", {"arch": "sm_90", "gpus": 1, "memory": 80 << 30}, Origin("spec", "t.vs", 1, 1))
    with pytest.raises(PassFailure, match="oneDNN on the CPU"):
        PassManager("pack-linear-weights").run(m)


@pytest.mark.parametrize("rows", [1, 16, 300])
def test_onednn_kernel_matches_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 40, generator=g)
    x = torch.randn(rows, 40, generator=g)
    packed = DERIVED_INITS["onednn_pack"]([w], {"batch": 16}, (96, 40))
    torch.testing.assert_close(linear_onednn(x, packed), F.linear(x, w), rtol=1e-5, atol=1e-5)
    bias = torch.randn(96, generator=g)
    torch.testing.assert_close(linear_onednn(x, packed, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


# --- dtype: what the packed copies hold ------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {"llama": make_tiny(tmp_path_factory.mktemp("pack-models") / "tiny-llama", arch="llama")}

PIPE = "fuse-qkv,fuse-gate-up,paged-kv{block=16},continuous-batching{max_batch=4},pack-linear-weights"


def packed_weights(module):
    return [w for w in module.model.weights if w.init_fn == "onednn_pack"]


def test_bf16_storage_keeps_the_type_halves_the_bytes_and_round_trips(models):
    same = PassManager(PIPE).run(lowered(models["llama"]))
    bf16 = PassManager(PIPE + "{dtype=bf16}").run(lowered(models["llama"]))
    packed = packed_weights(bf16)
    assert packed and all(w.init_attrs == {"batch": 4, "dtype": "bf16"} for w in packed)
    # the type is what the linear computes with: f32 in, f32 out (the op typing is unchanged)
    assert all(w.type == bf16.model.weight(w.init_args[0]).type and w.type.dtype == "f32" for w in packed)
    assert verify(bf16) == [] and parse_module(print_module(bf16)) == bf16
    assert 'dtype = "bf16"' in print_module(bf16)
    # the packed copies count at 2 bytes an element; the KV budget gets what they free
    packed_elems = sum(w.type.nbytes() // 4 * (4 if "{i}" in w.name else 1) for w in packed)
    assert weight_bytes(same.model) - weight_bytes(bf16.model) == packed_elems * 2
    assert bf16.cache.budget_bytes == same.cache.budget_bytes + packed_elems * 2


def test_a_bf16_model_is_packed_in_bf16_and_an_f16_one_is_refused(models):
    out = PassManager(PIPE).run(lowered(models["llama"], "bf16"))
    packed = packed_weights(out)
    assert packed and all(w.type.dtype == "bf16" and w.init_attrs == {"batch": 4} for w in packed)
    assert verify(out) == []
    with pytest.raises(PassFailure, match=r"found no f32 or bf16 linear weight to pack \(the linear weights are f16\)"):
        PassManager(PIPE).run(lowered(models["llama"], "f16"))


@pytest.mark.parametrize("stored", ["f16", "f32", 3])
def test_the_verifier_refuses_a_packed_dtype_it_cannot_store(models, stored):
    module = PassManager(PIPE).run(lowered(models["llama"], "bf16"))
    packed_weights(module)[0].init_attrs["dtype"] = stored        # f32 would be wider than the bf16 weight
    assert any("dtype must be f32 or bf16 and no wider than the weight's bf16" in str(d) for d in verify(module))


@pytest.mark.parametrize("rows", [1, 16, 300])
def test_the_bf16_kernel_is_a_bf16_product_with_f32_out(rows):
    g = torch.Generator().manual_seed(rows)
    w, x, bias = torch.randn(96, 40, generator=g), torch.randn(rows, 40, generator=g), torch.randn(96, generator=g)
    packed = DERIVED_INITS["onednn_pack"]([w], {"batch": 16, "dtype": "bf16"}, (96, 40))
    assert packed.dtype == torch.bfloat16
    out = linear_onednn(x, packed, bias)
    assert out.dtype == torch.float32 and out.shape == (rows, 96)
    want = F.linear(x.bfloat16().float(), w.bfloat16().float(), bias.bfloat16().float())   # f32 sums of bf16 products
    torch.testing.assert_close(out, want, rtol=1e-2, atol=2e-2)      # (the output is rounded once to bf16)
    assert (out - F.linear(x, w, bias)).abs().max() > 1e-3            # and it is not the f32 product


def test_a_bf16_packed_runner_stays_near_the_f32_one(models):
    ref = runner(PassManager(PIPE).run(lowered(models["llama"])), "Ref")
    bf16 = runner(PassManager(PIPE + "{dtype=bf16}").run(lowered(models["llama"])), "Bf16")
    assert bf16.lm_head_packed.dtype == torch.bfloat16 and ref.lm_head_packed.dtype == torch.float32
    want, got = prefill_then_decode(ref), prefill_then_decode(bf16)
    assert got.dtype == torch.float32
    diff = (got - want).abs().max().item()
    assert 0 < diff < 0.1, diff
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_optimize_auto_takes_bf16_weights_only_under_a_loose_logits_bar(models):
    from test_model_graph_passes import SPEC

    from vsc.frontend.lower import lower_spec
    from vsc.frontend.parser import parse_spec_text
    from vsc.passes.auto import BF16_WEIGHTS_TOLERANCE, DEFAULT_PIPELINE, auto_pipeline

    def auto_for(bar: str) -> str:
        text = SPEC.format(model=models["llama"], dtype="f32").replace("greedy_exact(probes = 4)", bar)
        return auto_pipeline(lower_spec(parse_spec_text(text, "t.vs")).deployment)
    assert BF16_WEIGHTS_TOLERANCE == 1.0
    assert auto_for("greedy_exact(probes = 4)") == auto_for("logits_tol(0.5, probes = 4)") == DEFAULT_PIPELINE
    loose = auto_for("logits_tol(1.0, probes = 4)")
    assert loose == DEFAULT_PIPELINE.replace("pack-linear-weights,", "pack-linear-weights{dtype=bf16},")
    assert auto_for("logits_tol(3.0, probes = 4)") == loose
    # the workload's passes and the weights' dtype compose
    both = auto_pipeline({"workload": {"kind": "predicted_edit"}, "accuracy": {"kind": "logits_tol", "tolerance": 2.0}})
    assert "speculative{method=prediction,k=16}" in both and "pack-linear-weights{dtype=bf16}" in both
