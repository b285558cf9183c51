"""fold-rope-tables and weight-int8: what each rewrite makes of the IR, the typing rules and
weight inits they rely on, the kernels they lower to, and the errors a user can cause."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vsc.backends.torch.codegen import generate_runner_source, load_runner_class
from vsc.driver import CompileError, compile_to_server
from vsc.errors import PassFailure, PipelineError
from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text
from vsc.ir.module import ServingModule, walk_ops
from vsc.ir.ops import TypeRuleError, infer
from vsc.ir.parser import parse_module
from vsc.ir.printer import print_module
from vsc.ir.sizes import weight_bytes
from vsc.ir.types import TensorType, pass_origin
from vsc.ir.verifier import verify
from vsc.models.tiny import make_tiny
from vsc.passes.base import PASSES, Pass, build_pipeline
from vsc.passes.manager import PassManager
from vsc.runtime.api import StepBatch
from vsc.runtime.kernels import torch_ops
from vsc.runtime.weights import WeightSpec, load_weights, quantize_int8_groups
from ir_queries import layer_region

torch.set_num_threads(1)

SPEC = """deployment graph_passes {{
  model "{model}" {{ dtype = {dtype} }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{ arrivals = closed(4), prompt_tokens = fixed(32), output_tokens = fixed(16) }}
  accuracy {{ greedy_exact(probes = 4) }}
  serve {{ max_context = 256 }}
}}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph-pass-models")
    return {arch: make_tiny(root / f"tiny-{arch}", arch=arch) for arch in ("llama", "qwen2")}


def lowered(model_dir, dtype: str = "f32") -> ServingModule:
    return lower_spec(parse_spec_text(SPEC.format(model=model_dir, dtype=dtype), str(model_dir.parent / "t.vs")))


def run(module: ServingModule, pipeline: str) -> ServingModule:
    return PassManager(pipeline).run(module)


def ops_of(module: ServingModule, kind: str):
    return [op for op in walk_ops(module.model.func.body) if op.kind == kind]


def runner(module: ServingModule, name: str):
    r = load_runner_class(generate_runner_source(module), name)(module.model.attrs["path"])
    r.create_kv_cache(num_blocks=4 if module.cache.layout == "paged" else 1)
    return r


def prefill_then_decode(r, prompt_len: int = 19) -> torch.Tensor:
    """Logits of a prompt's last token, then of one decode step (blocks 0.. in order)."""
    bs = r.cache_config.block_size
    table = torch.tensor([list(range(r.cache_config.num_blocks))])
    pos = torch.arange(prompt_len)
    tokens = torch.randint(3, 2000, (prompt_len,), generator=torch.Generator().manual_seed(3))
    first = r.prefill(StepBatch(tokens, pos, torch.tensor([0, prompt_len]), torch.tensor([prompt_len]), table,
                                table[0, pos // bs] * bs + pos % bs, query_lens_host=[prompt_len],
                                context_lens_host=[prompt_len]))
    p = torch.tensor([prompt_len])
    second = r.decode(StepBatch(first.argmax(-1), p, torch.tensor([0, 1]), p + 1, table, table[0, p // bs] * bs + p % bs,
                                is_decode=True, query_lens_host=[1], context_lens_host=[prompt_len + 1]))
    return torch.cat([first, second])


# --- fold-rope-tables -------------------------------------------------------------------------


def test_fold_hoists_one_lookup_and_rotates_every_layer_by_it(models):
    module = run(lowered(models["llama"]), "fold-rope-tables")
    assert not ops_of(module, "rope")
    body = module.model.func.body
    (lookup,) = [op for op in body if op.kind == "rope_lookup"]
    repeat = next(op for op in body if op.kind == "repeat")
    assert body.index(lookup) < body.index(repeat)
    assert lookup.operands == ["%positions", "@rope.cos", "@rope.sin"] and lookup.kernel.name == "torch.rope_lookup"
    (rotate,) = [op for op in layer_region(module).ops if op.kind == "rope_rotate"]
    assert rotate.operands[2:] == lookup.results and rotate.results == ["%q_rot", "%k_rot"]
    assert rotate.attrs == {"head_dim": 32} and rotate.origin == pass_origin("fold-rope-tables")
    cos = module.model.weight("@rope.cos")
    # rows: the larger of max_position (2048 for the tiny model) and max_context (256)
    assert (cos.init_fn, cos.init_args, cos.type) == ("rope_cos", [], TensorType("f32", (2048, 32)))
    assert cos.init_attrs == {"theta": 10000.0, "head_dim": 32}
    assert verify(module) == []
    assert parse_module(print_module(module)) == module


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_folded_runner_is_bit_identical_to_the_rope_in_op(models, dtype):
    base = lowered(models["llama"], dtype)
    plain = run(base, "fuse-qkv,paged-kv{block=16}")
    folded = run(base, "fuse-qkv,fold-rope-tables,paged-kv{block=16}")
    assert "rope_positions(" in generate_runner_source(plain) and "rope_lookup(" in generate_runner_source(folded)
    assert torch.equal(prefill_then_decode(runner(plain, f"plain_{dtype}")),
                       prefill_then_decode(runner(folded, f"folded_{dtype}")))


def test_fold_before_fuse_qkv_still_fuses(models):
    module = run(lowered(models["llama"]), "fold-rope-tables,fuse-qkv")
    region = layer_region(module)
    assert [op.kind for op in region.ops[:4]] == ["rmsnorm", "linear", "split", "rope_rotate"]
    assert region.ops[1].results == ["%qkv"]


def test_fold_max_position_option(models):
    module = run(lowered(models["llama"]), "fold-rope-tables{max_position=512}")
    assert module.model.weight("@rope.sin").type.shape == (512, 32)
    with pytest.raises(PassFailure, match="max_position=128 is below max_context 256"):
        run(lowered(models["llama"]), "fold-rope-tables{max_position=128}")


def test_a_wrong_table_is_caught_by_the_accuracy_check(models, tmp_path):
    """fold-rope-tables claims to be exact, so a bug in it (here: the table built with the wrong
    theta) is not excused by a numeric check after the pass; the check after lowering refuses it."""
    class WrongTable(Pass):
        name = "test-wrong-rope-table"

        def apply(self, m):
            m.model.weight("@rope.cos").init_attrs["theta"] = 500.0
            m.model.weight("@rope.sin").init_attrs["theta"] = 500.0

    PASSES[WrongTable.name] = WrongTable
    try:
        with pytest.raises(CompileError, match="accuracy check failed.*probe "):
            compile_to_server(lowered(models["llama"]), "fold-rope-tables,test-wrong-rope-table", tmp_path / "server",
                              None, reproducer_dir=tmp_path)
    finally:
        PASSES.pop(WrongTable.name)
    assert not (tmp_path / "server").exists()


def test_rope_cos_sin_equals_the_table_rows_bit_for_bit():
    for theta, head_dim in ((10000.0, 32), (500000.0, 64), (1e6, 128)):
        table = torch_ops.RotaryTable(theta, head_dim, 1024)
        positions = torch.randint(0, 1024, (37,), generator=torch.Generator().manual_seed(head_dim))
        cos, sin = torch_ops.rope_cos_sin(positions, theta, head_dim)
        assert torch.equal(cos, table.cos[positions]) and torch.equal(sin, table.sin[positions])
        q, k = torch.randn(37, 4 * head_dim), torch.randn(37, 2 * head_dim)
        in_op = torch_ops.rope_positions(q, k, positions, theta, head_dim)
        rows = torch_ops.rope(q, k, *torch_ops.rope_lookup(positions, table.cos, table.sin), head_dim)
        assert all(torch.equal(a, b) for a, b in zip(in_op, rows))


def test_rope_tables_are_derived_weights(models):
    specs = (WeightSpec("rope.cos", "bf16", (300, 16), init="rope_cos", attrs={"theta": 500.0, "head_dim": 16}),
             WeightSpec("rope.sin", "bf16", (300, 16), init="rope_sin", attrs={"theta": 500.0, "head_dim": 16}))
    w = load_weights(models["llama"], specs, layers=4)
    table = torch_ops.RotaryTable(500.0, 16, 300, torch.bfloat16)
    assert torch.equal(w["rope.cos"], table.cos) and torch.equal(w["rope.sin"], table.sin)


def test_rope_typing_rules():
    t, f32 = "T", "f32"
    rows = TensorType(f32, (t, 8))
    q, k = TensorType(f32, (t, 32)), TensorType(f32, (t, 16))
    assert infer("rope_rotate", [q, k, rows, rows], {"head_dim": 8}) == [q, k]
    with pytest.raises(TypeRuleError, match=r"cos/sin rows f32\[T, 4\].* must be f32\[T, 8\]"):
        infer("rope_rotate", [q, k, TensorType(f32, (t, 4)), TensorType(f32, (t, 4))], {"head_dim": 8})
    table = TensorType(f32, (256, 8))
    assert infer("rope_lookup", [TensorType("i64", (t,)), table, table], {}) == [rows, rows]
    with pytest.raises(TypeRuleError, match="cos/sin tables must be one rank-2 type"):
        infer("rope_lookup", [TensorType("i64", (t,)), table, TensorType(f32, (128, 8))], {})


def test_verifier_checks_the_table_weights(models):
    module = run(lowered(models["llama"]), "fold-rope-tables")
    module.model.weight("@rope.cos").init_attrs["head_dim"] = 16
    diags = [str(d) for d in verify(module)]
    assert any("[weights.derived-type] weight @rope.cos: rope_cos(): a RoPE table must be float [max_position, 16]" in d for d in diags)


# --- weight-int8 ------------------------------------------------------------------------------


def test_int8_quantizes_the_layer_linears_and_keeps_the_head(models):
    before = run(lowered(models["llama"]), "fuse-qkv")
    module = run(before, "weight-int8")
    region = layer_region(module)
    assert not [op for op in region.ops if op.kind == "linear"]
    qkv = next(op for op in region.ops if op.results == ["%qkv"])
    assert qkv.kind == "linear_int8" and qkv.kernel.name == "torch.linear_int8" and qkv.attrs == {"group": 64}
    values, scales = (module.model.weight(w) for w in qkv.operands[1:])
    assert values.name == "@model.layers.{i}.self_attn.qkv_proj_i8.weight"
    assert (values.init_fn, values.init_args, values.type) == (
        "quantize_int8", ["@model.layers.{i}.self_attn.qkv_proj.weight"], TensorType("i8", (256, 128)))
    assert (scales.init_fn, scales.type) == ("int8_scales", TensorType("f32", (256, 2)))
    head = ops_of(module, "linear")
    assert [op.results for op in head] == [["%logits"]]            # the LM head stays float
    assert verify(module) == []
    assert parse_module(print_module(module)) == module
    # weight bytes: the fp32 layer matrices became int8 + one f32 scale per 64 columns, and
    # the KV budget grew by exactly what was freed
    saved = weight_bytes(before.model) - weight_bytes(module.model)
    layers = 4
    matrices = (256 * 128 + 128 * 128 + 2 * 384 * 128 + 128 * 384) * layers
    scale_count = (256 * 2 + 128 * 2 + 2 * 384 * 2 + 128 * 6) * layers
    assert saved == matrices * 4 - (matrices + scale_count * 4)
    assert module.cache.budget_bytes == before.cache.budget_bytes + saved


def test_include_head_and_tied_embeddings(models):
    qwen = lowered(models["qwen2"])         # the tiny qwen2 ties its LM head to the embedding table
    tied = run(qwen, "weight-int8")
    assert [op.results for op in ops_of(tied, "linear")] == [["%logits"]]
    both = run(qwen, "weight-int8{include_head=true}")
    assert not ops_of(both, "linear")
    head = next(op for op in ops_of(both, "linear_int8") if op.results == ["%logits"])
    assert head.operands[1] == "@model.embed_tokens_i8.weight"
    # the embedding still reads the float table, so its bytes stay (and the int8 copy adds)
    assert ops_of(both, "embed")[0].operands[1] == "@model.embed_tokens.weight"
    assert verify(both) == []


def test_group_must_divide_in_features(models):
    with pytest.raises(PassFailure) as err:
        run(lowered(models["llama"]), "weight-int8{group=48}")
    assert ("group=48 does not divide in_features 128 of @model.layers.{i}.self_attn.q_proj.weight "
            "(choose a divisor of 128, or group=0 for one scale per output row)") in str(err.value)
    with pytest.raises(PipelineError, match="option 'group' of weight-int8 must be >= 0"):
        build_pipeline("weight-int8{group=-1}")
    per_row = run(lowered(models["llama"]), "weight-int8{group=0}")
    down = next(op for op in layer_region(per_row).ops if op.results == ["%mlp_out"])
    assert per_row.model.weight(down.operands[2]).type == TensorType("f32", (128, 1)) and down.attrs == {"group": 0}


def test_linear_int8_typing_rule():
    x, w, s = TensorType("f32", ("T", 64)), TensorType("i8", (32, 64)), TensorType("f32", (32, 4))
    assert infer("linear_int8", [x, w, s], {"group": 16}) == [TensorType("f32", ("T", 32))]
    with pytest.raises(TypeRuleError, match=r"scales f32\[32, 4\] must be f32\[32, 2\] for group 32"):
        infer("linear_int8", [x, w, s], {"group": 32})
    with pytest.raises(TypeRuleError, match="weight must be i8"):
        infer("linear_int8", [x, TensorType("f32", (32, 64)), s], {"group": 16})
    with pytest.raises(TypeRuleError, match="group 24 does not divide in_features 64"):
        infer("linear_int8", [x, w, TensorType("f32", (32, 2))], {"group": 24})


def test_verifier_checks_the_quantized_weights(models):
    module = run(lowered(models["llama"]), "weight-int8{group=32}")
    scales = next(w for w in module.model.weights if w.init_fn == "int8_scales")
    scales.init_attrs["group"] = 64        # the op and the scales' shape still say 32
    diags = [str(d) for d in verify(module)]
    assert any(f"weight {scales.name}: int8_scales(): of f32[128, 128] with group 64 is f32[128, 2], declared "
               "f32[128, 4]" in d for d in diags), diags


def test_quantize_int8_groups_error_bound_and_zero_rows():
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0
    for group in (0, 16, 32):
        values, scales = quantize_int8_groups(w, group)
        size = group or 96
        assert values.dtype == torch.int8 and scales.shape == (8, 96 // size)
        back = values.view(8, -1, size).float() * scales[..., None]
        assert ((back.view(8, 96) - w).abs() <= scales.repeat_interleave(size, dim=1) / 2 + 1e-7).all()
        assert values.abs().max() == 127 and torch.equal(values[3], torch.zeros(96, dtype=torch.int8))


@pytest.mark.parametrize("group", [0, 16])
def test_linear_int8_kernel_is_the_dequantized_matmul(group):
    g = torch.Generator().manual_seed(group)
    w, x, bias = torch.randn(24, 64, generator=g), torch.randn(5, 64, generator=g), torch.randn(24, generator=g)
    values, scales = quantize_int8_groups(w, group)
    dequantized = (values.view(24, -1, group or 64).float() * scales[..., None]).view(24, 64)
    torch.testing.assert_close(torch_ops.linear_int8(x, values, scales, bias), F.linear(x, dequantized, bias))
    # each weight is off by at most half its scale, so each output by at most |x| . scale / 2
    bound = x.abs() @ (scales.repeat_interleave(group or 64, dim=1) / 2).T
    assert ((torch_ops.linear_int8(x, values, scales) - F.linear(x, w)).abs() <= bound + 1e-5).all()


def test_the_runner_holds_int8_and_the_byte_count_says_so(models):
    module = run(lowered(models["llama"]), "fuse-qkv,fuse-gate-up,fold-rope-tables,weight-int8,paged-kv{block=16}")
    r = runner(module, "int8_runner")
    held = [t for layer in r.layers for t in layer] + [v for v in vars(r).values() if isinstance(v, torch.Tensor)]
    assert sum(t.dtype == torch.int8 for t in held) == 4 * 4        # qkv, o, gate_up, down in each layer
    assert sum(t.numel() * t.element_size() for t in held) == weight_bytes(module.model)
    logits = prefill_then_decode(r)
    reference = prefill_then_decode(runner(run(lowered(models["llama"]), "fuse-qkv,paged-kv{block=16}"), "f32_runner"))
    assert 0 < (logits - reference).abs().max() < 0.2
