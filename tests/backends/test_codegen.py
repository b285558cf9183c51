"""The torch backend's code generator and the weight loader it relies on."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vsc.backends.torch.codegen import LoweringError, generate_runner_source, load_runner_class
from vsc.errors import ModelError, VscError
from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text
from vsc.ir.module import KernelRef, Op, ServingModule, walk_ops
from vsc.ir.printer import print_module
from vsc.ir.types import TensorType
from vsc.models.tiny import make_tiny
from vsc.passes.manager import PassManager
from vsc.runtime.api import StepBatch
from vsc.runtime.weights import WeightSpec, load_weights

torch.set_num_threads(1)

CHAT_PIPELINE = "fuse-qkv,fuse-gate-up,paged-kv{block=16}"
MAX_CONTEXT = 256

SPEC = """deployment codegen_test {{
  model "{path}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 1 GiB }}
  workload {{ arrivals = closed(4), prompt_tokens = fixed(32), output_tokens = fixed(16) }}
  serve {{ max_context = {max_context} }}
}}
"""


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("codegen-models")
    return {arch: make_tiny(root / f"tiny-{arch}", arch=arch) for arch in ("llama", "qwen2", "mixtral")}


def build(model_dir: Path, pipeline: str = "") -> ServingModule:
    text = SPEC.format(path=model_dir, max_context=MAX_CONTEXT)
    module = lower_spec(parse_spec_text(text, str(model_dir.parent / "test.vs")))
    return PassManager(pipeline).run(module) if pipeline else module


def runner_for(module: ServingModule, name: str, **kw):
    cls = load_runner_class(generate_runner_source(module, **kw), name)
    runner = cls(module.model.attrs["path"])
    runner.create_kv_cache(num_blocks=8 if module.cache.layout == "paged" else 2)
    return runner


def two_steps(runner, prompt_len: int = 21) -> torch.Tensor:
    """Prefill one prompt, decode one token; both logits rows."""
    bs = runner.cache_config.block_size
    blocks = [1, 0] if bs < 2 * prompt_len else [1]
    table = torch.tensor([blocks])
    pos = torch.arange(prompt_len)
    slots = table[0, pos // bs] * bs + pos % bs
    tokens = torch.randint(3, 2000, (prompt_len,), generator=torch.Generator().manual_seed(7))
    first = runner.prefill(StepBatch(tokens, pos, torch.tensor([0, prompt_len]), torch.tensor([prompt_len]), table, slots,
                                     query_lens_host=[prompt_len], context_lens_host=[prompt_len]))
    p = torch.tensor([prompt_len])
    second = runner.decode(StepBatch(first.argmax(-1), p, torch.tensor([0, 1]), p + 1, table, table[0, p // bs] * bs + p % bs,
                                     is_decode=True, query_lens_host=[1], context_lens_host=[prompt_len + 1]))
    return torch.cat([first, second])


# --- the source itself ----------------------------------------------------------------------


def test_chat_pipeline_source_reads_like_the_plan(tiny_dirs):
    module = build(tiny_dirs["llama"], CHAT_PIPELINE)
    source = generate_runner_source(module, pipeline=CHAT_PIPELINE)
    compile(source, "runner.py", "exec")
    lines = source.splitlines()
    assert lines[1] == f"# pipeline: {CHAT_PIPELINE}"
    assert lines[2] == f"# plan sha256: {hashlib.sha256(print_module(module).encode()).hexdigest()}"
    for expected in [
        "BLOCK_SIZE = 16",
        f"NUM_BLOCKS = {module.cache.capacity_tokens // 16}",
        "LAYERS = 4", "HEADS = 4", "KV_HEADS = 2", "HEAD_DIM = 32", "RMS_NORM_EPS = 1e-05", "ROPE_THETA = 10000.0",
        "for layer_weights, (k_cache, v_cache) in zip(self.layers, self.kv_cache):",
        "qkv = linear(xn, qkv_proj)",
        "q, k, v = split(qkv, (128, 64, 64))",
        "q_rot, k_rot = rope_positions(q, k, positions, ROPE_THETA, HEAD_DIM)",   # unfolded: cos/sin in the op
        "attn = paged_attention(q_rot, k_rot, v, k_cache, v_cache, meta, HEADS, KV_HEADS, HEAD_DIM, ATTN_SCALE)",
        "gate, up = split(gate_up, (384, 384))",
        "logits = linear(h_last, self.lm_head)",
    ]:
        assert any(line.strip() == expected for line in lines), expected
    # one assignment per SSA result of the plan, named after it
    for op in walk_ops(module.model.func.body):
        if op.kind in ("repeat", "sample"):
            continue
        targets = ", ".join(r.lstrip("%") for r in op.results)
        assert sum(line.strip().startswith(targets + " = ") for line in lines) == 1, targets
    # the q/k/v weights only feed the fused one: loaded, concatenated, not kept
    assert "'model.layers.{i}.self_attn.q_proj.weight', 'f32', (128, 128), args=" in source
    assert re.search(r"q_proj\.weight',\), keep=False\)", source)
    assert "vsc.ir" not in source and "vsc.passes" not in source


def test_source_is_deterministic_and_its_hash_follows_the_plan(tiny_dirs):
    module = build(tiny_dirs["llama"], CHAT_PIPELINE)
    assert generate_runner_source(module) == generate_runner_source(module.clone())
    changed = module.clone()
    next(op for op in walk_ops(changed.model.func.body) if op.kind == "rmsnorm").attrs["eps"] = 1e-6
    a, b = generate_runner_source(module), generate_runner_source(changed)
    assert a.splitlines()[2] != b.splitlines()[2]
    assert "xn = rmsnorm(x, input_layernorm, 1e-06)" in b       # off the model constant: a literal


def test_contiguous_cache_uses_one_max_context_block_per_sequence(tiny_dirs):
    module = build(tiny_dirs["llama"])
    assert module.cache.layout == "contiguous"
    source = generate_runner_source(module)
    assert f"BLOCK_SIZE = {MAX_CONTEXT}" in source
    assert f"NUM_BLOCKS = {module.cache.capacity_tokens // MAX_CONTEXT}" in source
    assert "attn = sdpa(q_rot, k_rot, v, k_cache, v_cache, meta," in source
    runner = load_runner_class(source, "contiguous_geometry")(module.model.attrs["path"])
    cfg = runner.cache_config
    assert (cfg.layout, cfg.block_size, cfg.num_blocks, cfg.layers, cfg.kv_heads, cfg.head_dim) == \
        ("contiguous", MAX_CONTEXT, module.cache.capacity_tokens // MAX_CONTEXT, 4, 2, 32)
    assert runner.vocab_size == 2048


def test_paged_runner_protocol(tiny_dirs):
    module = build(tiny_dirs["qwen2"], CHAT_PIPELINE)
    runner = load_runner_class(generate_runner_source(module), "paged_protocol")(module.model.attrs["path"])
    assert runner.cache_config.block_size == 16 and runner.cache_config.layout == "paged"
    assert runner.cache_config.num_blocks == module.cache.capacity_tokens // 16
    with pytest.raises(RuntimeError, match="create_kv_cache"):
        two_steps(runner)
    cache = runner.create_kv_cache(num_blocks=3)
    assert len(cache) == 4 and cache[0][0].shape == (48, 2, 32)
    assert two_steps(runner).shape == (2, 2048)


def test_qwen2_fused_biases_and_tied_head(tiny_dirs):
    source = generate_runner_source(build(tiny_dirs["qwen2"], "fuse-qkv"))
    assert "qkv = linear(xn, qkv_proj, qkv_proj_bias)" in source
    assert "logits = linear(h_last, self.embed_tokens)" in source
    assert "lm_head" not in source


def test_mixtral_experts_are_stacked_per_layer(tiny_dirs):
    module = build(tiny_dirs["mixtral"])
    source = generate_runner_source(module)
    assert "mlp_out = moe(hn, router, experts_w1, experts_w3, experts_w2, EXPERTS, TOP_K)" in source
    runner = load_runner_class(source, "mixtral_stacked")(module.model.attrs["path"])
    order = sys.modules["mixtral_stacked"].LAYER_WEIGHTS
    w1 = runner.layers[2][order.index("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight")]
    assert w1.shape == (4, 192, 128)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_loop_and_unrolled_runners_agree_exactly(tiny_dirs, arch):
    module = build(tiny_dirs[arch], CHAT_PIPELINE)
    unrolled = generate_runner_source(module, unroll=True)
    assert "# layer 3" in unrolled and "for layer_weights" not in unrolled
    assert torch.equal(two_steps(runner_for(module, f"loop_{arch}")),
                       two_steps(runner_for(module, f"unrolled_{arch}", unroll=True)))


def _rename(module: ServingModule, old: str, new: str) -> None:
    def fix(names):
        return [new if n == old else n for n in names]
    func = module.model.func
    for op in walk_ops(func.body):
        op.operands, op.results = fix(op.operands), fix(op.results)
        if op.region is not None:
            op.region.args = [(new if n == old else n, t) for n, t in op.region.args]
            op.region.yields = fix(op.region.yields)
    func.returns = fix(func.returns)


def test_ssa_names_that_clash_with_generated_names_are_renamed(tiny_dirs):
    module = build(tiny_dirs["llama"], CHAT_PIPELINE)
    clashing = module.clone()
    for old, new in [("%attn", "%linear"), ("%x", "%self"), ("%h_out", "%meta"), ("%q", "%k_cache"), ("%gate", "%class")]:
        _rename(clashing, old, new)
    source = generate_runner_source(clashing)
    assert "linear_ = paged_attention(" in source and "class_, up = split(gate_up" in source
    assert torch.equal(two_steps(runner_for(module, "names_plain")), two_steps(runner_for(clashing, "names_clash")))


def test_generated_runner_imports_only_the_runtime(tiny_dirs, tmp_path):
    module = build(tiny_dirs["llama"], CHAT_PIPELINE)
    (tmp_path / "model.py").write_text(generate_runner_source(module))
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import model; "
            f"r = model.Runner({module.model.attrs['path']!r}); "
            "bad = [m for m in sys.modules if m.split('.')[:2] in (['vsc','ir'], ['vsc','passes'], ['vsc','frontend'], ['vsc','backends'])]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tracebacks_through_generated_code_show_its_lines(tiny_dirs):
    module = build(tiny_dirs["llama"], CHAT_PIPELINE)
    runner = load_runner_class(generate_runner_source(module), "traceback_lines")(module.model.attrs["path"])
    runner.create_kv_cache(num_blocks=1)
    import traceback
    with pytest.raises(Exception) as info:        # a 21-token prompt does not fit one 16-token block
        two_steps(runner)
    text = "".join(traceback.format_exception(info.value))
    assert "<vsc-generated traceback_lines>" in text and "attn = paged_attention(" in text


# --- what the backend refuses ---------------------------------------------------------------


def _first(module: ServingModule, kind: str) -> Op:
    return next(op for op in walk_ops(module.model.func.body) if op.kind == kind)


def test_lowering_error_for_a_kernel_without_torch_implementation(tiny_dirs):
    module = build(tiny_dirs["llama"], CHAT_PIPELINE)
    _first(module, "rmsnorm").kernel = KernelRef("triton.rmsnorm")
    with pytest.raises(LoweringError, match=r"kernel 'triton.rmsnorm' for '%xn = rmsnorm' has no torch implementation") as info:
        generate_runner_source(module)
    assert isinstance(info.value, VscError)


def test_lowering_error_for_an_unknown_kernel_and_op(tiny_dirs):
    module = build(tiny_dirs["llama"])
    _first(module, "linear").kernel = KernelRef("torch.mystery_gemm")
    with pytest.raises(LoweringError, match="kernel 'torch.mystery_gemm' does not implement 'linear'"):
        generate_runner_source(module)
    module = build(tiny_dirs["llama"])
    region = _first(module, "repeat").region
    t = TensorType("f32", ("T", 128))
    region.ops.insert(1, Op("softcap", ["%capped"], ["%xn"], [t], {}, KernelRef("torch.softcap")))
    with pytest.raises(LoweringError, match="op 'softcap' .* has no torch lowering"):
        generate_runner_source(module)


def test_lowering_error_for_kernel_config_and_weight_init(tiny_dirs):
    module = build(tiny_dirs["llama"])
    _first(module, "linear").kernel = KernelRef("torch.linear", {"tile": 64})
    with pytest.raises(LoweringError, match="takes no config"):
        generate_runner_source(module)
    module = build(tiny_dirs["llama"])
    w = module.model.weight("@model.norm.weight")
    w.init_fn, w.init_args = "awq_unpack", ["@model.norm.weight"]
    with pytest.raises(LoweringError, match="cannot materialize 'awq_unpack'"):
        generate_runner_source(module)


def test_lowering_error_for_attention_outside_the_layer(tiny_dirs):
    module = build(tiny_dirs["llama"])
    body = module.model.func.body
    attn = _first(module, "attention")
    t = TensorType("f32", ("T", 128))
    body.insert(1, Op("attention", ["%stray"], ["%h0", "%h0", "%h0"], [t], dict(attn.attrs), KernelRef("torch.sdpa")))
    with pytest.raises(LoweringError, match="outside the layer region"):
        generate_runner_source(module)


# --- weights ----------------------------------------------------------------------------------


def _checkpoint(tmp_path: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(tmp_path / "model.safetensors"))
        return tmp_path
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(tmp_path / file))
        weight_map.update({n: file for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path


def test_load_weights_expands_concats_stacks_and_casts(tmp_path):
    gen = torch.Generator().manual_seed(11)
    tensors = {}
    for i in range(2):
        tensors[f"l.{i}.a"] = torch.randn(3, 4, generator=gen).bfloat16()
        tensors[f"l.{i}.b"] = torch.randn(2, 4, generator=gen).bfloat16()
        for e in range(3):
            tensors[f"l.{i}.ex.{e}.w"] = torch.randn(5, 4, generator=gen)
    tensors["norm"] = torch.randn(4, generator=gen)
    tensors["unused"] = torch.randn(100, generator=gen)
    model_dir = _checkpoint(tmp_path, tensors, shards=3)
    specs = (
        WeightSpec("l.{i}.a", "f32", (3, 4), args=("l.{i}.a",), keep=False),
        WeightSpec("l.{i}.b", "f32", (2, 4), args=("l.{i}.b",), keep=False),
        WeightSpec("l.{i}.ab", "f32", (5, 4), init="concat", args=("l.{i}.a", "l.{i}.b"), attrs={"axis": 0}),
        WeightSpec("l.{i}.ex.{e}.w", "f32", (5, 4), args=("l.{i}.ex.{e}.w",)),
        WeightSpec("norm", "bf16", (4,), args=("norm",)),
    )
    w = load_weights(model_dir, specs, layers=2, experts=3)
    assert set(w) == {"l.0.ab", "l.1.ab", "l.0.ex.{e}.w", "l.1.ex.{e}.w", "norm"}
    assert w["l.1.ab"].dtype == torch.float32
    assert torch.equal(w["l.1.ab"], torch.cat([tensors["l.1.a"], tensors["l.1.b"]]).float())
    assert torch.equal(w["l.0.ex.{e}.w"], torch.stack([tensors[f"l.0.ex.{e}.w"] for e in range(3)]))
    assert w["norm"].dtype == torch.bfloat16 and torch.equal(w["norm"], tensors["norm"].bfloat16())


def test_load_weights_reports_missing_and_misshapen_tensors(tmp_path):
    model_dir = _checkpoint(tmp_path, {"a": torch.ones(2, 3)})
    with pytest.raises(ModelError, match="checkpoint has no tensor 'b'"):
        load_weights(model_dir, (WeightSpec("b", "f32", (2, 3), args=("b",)),), layers=1)
    with pytest.raises(ModelError, match=r"tensor 'a' has shape \[2, 3\], the plan expects \[3, 2\]"):
        load_weights(model_dir, (WeightSpec("a", "f32", (3, 2), args=("a",)),), layers=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no \*\.safetensors"):
        load_weights(tmp_path / "empty", (), layers=1)


def test_runner_from_f32_plan_on_a_bf16_checkpoint(tiny_dirs, tmp_path):
    """The checkpoint dtype is the checkpoint's business: the plan's dtype wins."""
    from safetensors.torch import load_file
    src = tiny_dirs["llama"]
    bf16_dir = tmp_path / "tiny-llama-bf16"
    bf16_dir.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (bf16_dir / f.name).write_bytes(f.read_bytes())
    save_file({k: v.bfloat16() for k, v in load_file(str(src / "model.safetensors")).items()},
              str(bf16_dir / "model.safetensors"))
    module = build(bf16_dir, CHAT_PIPELINE)
    runner = runner_for(module, "bf16_checkpoint")
    assert runner.lm_head.dtype == torch.float32
    assert torch.isfinite(two_steps(runner)).all()
