"""The torch backend's runner for cuda plans: ops on `triton.*` kernels call the Triton
wrappers of `vsc.runtime.kernels.triton_ops`, with the documented fallbacks; CPU plans are
lowered exactly as before.

There is no GPU here, so the structure of the source is checked directly, and the source
is also run end to end on the CPU through Triton's interpreter (in a subprocess: Triton
fixes interpret-or-compile at its first import) against the transformers reference.

CPU plans must keep generating the source in tests/backends/golden/*.py.golden; a mismatch
fails with a unified diff. After a deliberate codegen change, regenerate the golden files
with `VSC_UPDATE_GOLDEN=1 pytest tests/backends/test_codegen_cuda.py -k cpu_plans` and
review their diff before committing.
"""
from __future__ import annotations

import ast
import difflib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vsc.backends.torch.codegen import LoweringError, generate_runner_source
from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text
from vsc.ir.module import KernelRef, ServingModule, walk_ops
from vsc.ir.verifier import verify
from vsc.models.tiny import make_tiny
from vsc.passes.manager import PassManager

REPO = Path(__file__).resolve().parents[2]
# The optimize line of examples/chat-h100.vs (kept equal by test_the_example_uses_this_pipeline).
CUDA_PIPELINE = ("fuse-qkv,fuse-gate-up,fuse-silu-mul,fuse-add-rmsnorm,fold-rope-tables,paged-kv{block=16},"
                 "continuous-batching{max_batch=64,max_tokens=8192},select-kernels")
# The same without fold-rope-tables: `rope` ops on triton.rope compute their cos/sin rows in the op.
UNFOLDED_CUDA_PIPELINE = CUDA_PIPELINE.replace("fold-rope-tables,", "")
CPU_PIPELINE = "fuse-qkv,fuse-gate-up,fuse-silu-mul,fuse-add-rmsnorm,paged-kv{block=16},select-kernels"

SPEC = """deployment {name} {{
  model "{path}" {{ dtype = {dtype} }}
  target {target}
  workload {{ arrivals = closed(4), prompt_tokens = fixed(32), output_tokens = fixed(16) }}
  serve {{ max_context = 256 }}
}}
"""
CUDA = "cuda { arch = sm_90, gpus = 1, memory = 1 GiB }"
CPU = "cpu { threads = 1, memory = 1 GiB }"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("codegen-cuda-models")
    return {arch: make_tiny(root / f"tiny-{arch}", arch=arch) for arch in ("llama", "qwen2", "mixtral")}


def build(model_dir: Path, pipeline: str, target: str = CUDA, dtype: str = "bf16", name: str = "cuda_plan") -> ServingModule:
    text = SPEC.format(name=name, path=model_dir, dtype=dtype, target=target)
    return PassManager(pipeline).run(lower_spec(parse_spec_text(text, str(model_dir.parent / "test.vs"))))


def step_lines(source: str) -> list[str]:
    body = source.split("    def forward(", 1)[1]
    return [line.strip() for line in body.splitlines()]


def line_assigning(source: str, results: list[str]) -> list[str]:
    target = ", ".join(r.lstrip("%") for r in results) + " = "
    return [line for line in step_lines(source) if line.startswith(target)]


def imported_modules(source: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.fixture(scope="module")
def llama_cuda(tiny_dirs) -> ServingModule:
    return build(tiny_dirs["llama"], CUDA_PIPELINE)


def test_the_example_uses_this_pipeline():
    text = (REPO / "examples" / "chat-h100.vs").read_text()
    assert f'optimize "{CUDA_PIPELINE}"' in text
    assert "target cuda { arch = sm_90" in text and "dtype = bf16" in text


# --- which call each op becomes -------------------------------------------------------------


def test_every_triton_op_calls_its_wrapper(llama_cuda):
    source = generate_runner_source(llama_cuda)
    compile(source, "runner.py", "exec")
    triton_ops = [op for op in walk_ops(llama_cuda.model.func.body)
                  if op.kernel is not None and op.kernel.name.startswith("triton.")]
    assert {op.kernel.name for op in triton_ops} == {"triton.rmsnorm", "triton.rope", "triton.silu_mul",
                                                     "triton.paged_attention"}
    expected_call = {"rmsnorm": "triton_rmsnorm(", "add_rmsnorm": "triton_rmsnorm(", "rope_rotate": "triton_rope(",
                     "silu_mul": "triton_silu_mul(", "attention": "triton_paged_attention("}
    for op in triton_ops:
        lines = line_assigning(source, op.results)
        assert lines and expected_call[op.kind] in lines[0], (op.kind, lines)
    # the exact lines of the layer, as docs/triton-kernels.md wires them
    lines = step_lines(source)
    for expected in [
        "xn = triton_rmsnorm(x, input_layernorm, RMS_NORM_EPS)",
        "q_rot, k_rot = triton_rope(q, k, rope_cos, rope_sin, HEAD_DIM)  # in place",
        "hn, h_attn = triton_rmsnorm(x, post_attention_layernorm, RMS_NORM_EPS, residual=attn_out), attn_out"
        "  # the sum overwrites attn_out, unread from here on",
        "mlp_in = triton_silu_mul(gate_up)",
        "h_norm = triton_rmsnorm(h, self.norm, RMS_NORM_EPS)",
    ]:
        assert expected in lines, expected
    # the ops that have no Triton kernel stay on torch_ops
    for expected in ["qkv = linear(xn, qkv_proj)", "q, k, v = split(qkv, (128, 64, 64))", "h_out = add(h_attn, mlp_out)",
                     "h_last = last_token(h_norm, meta)", "logits = linear(h_last, self.lm_head)"]:
        assert expected in lines, expected
    # fold-rope-tables: the rows of the step's positions are looked up once, before the layer loop
    lookup = "rope_cos, rope_sin = rope_lookup(positions, self.cos, self.sin)"
    assert lines.count(lookup) == 1 and lines.index(lookup) < lines.index("xn = triton_rmsnorm(x, input_layernorm, RMS_NORM_EPS)")
    assert 'def __init__(self, model_dir: str, device: str | torch.device = "cuda"):' in source


def test_unfolded_rope_on_triton_computes_its_rows_in_the_op(tiny_dirs):
    """Without fold-rope-tables a `rope` op on triton.rope gets the cos/sin rows of the step's
    positions from `rope_cos_sin`, per layer; nothing is hoisted and no table is a weight."""
    module = build(tiny_dirs["llama"], UNFOLDED_CUDA_PIPELINE)
    assert {op.kernel.name for op in walk_ops(module.model.func.body) if op.kind == "rope"} == {"triton.rope"}
    source = generate_runner_source(module)
    compile(source, "runner.py", "exec")
    lines = step_lines(source)
    assert ("q_rot, k_rot = triton_rope(q, k, *rope_cos_sin(positions, ROPE_THETA, HEAD_DIM, q.dtype), HEAD_DIM)"
            "  # in place") in lines
    assert "rope_lookup" not in source and "rope_cos_sin" in source.split("class Runner", 1)[0]   # imported


def test_attention_uses_triton_in_decode_steps_and_torch_in_prefill(llama_cuda):
    lines = step_lines(generate_runner_source(llama_cuda))
    i = lines.index("if meta.is_decode:")
    assert lines[i + 1] == ("attn = triton_paged_attention(q_rot, k_rot, v, k_cache, v_cache, batch.slot_mapping, "
                            "batch.block_tables, batch.context_lens, HEADS, KV_HEADS, HEAD_DIM, ATTN_SCALE, BLOCK_SIZE)")
    assert lines[i + 2].startswith("else:")
    assert lines[i + 3] == "attn = paged_attention(q_rot, k_rot, v, k_cache, v_cache, meta, HEADS, KV_HEADS, HEAD_DIM, ATTN_SCALE)"
    assert sum(line.startswith("attn = ") for line in lines) == 2


def test_cuda_runner_imports_only_the_runtime(llama_cuda):
    source = generate_runner_source(llama_cuda)
    assert "vsc.ir" not in source and "vsc.passes" not in source and "vsc.backends" not in source
    modules = imported_modules(source)
    assert modules == {"__future__", "torch", "vsc.runtime.api", "vsc.runtime.kernels.torch_ops",
                       "vsc.runtime.kernels.triton_ops", "vsc.runtime.weights"}
    tree = ast.parse(source)
    triton_import = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                         and n.module == "vsc.runtime.kernels.triton_ops")
    assert sorted((a.name, a.asname) for a in triton_import.names) == [
        ("paged_attention", "triton_paged_attention"), ("rmsnorm", "triton_rmsnorm"), ("rope", "triton_rope"),
        ("silu_mul", "triton_silu_mul")]
    torch_import = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                        and n.module == "vsc.runtime.kernels.torch_ops")
    # paged_attention stays imported from torch_ops: the prefill fallback
    assert "paged_attention" in {a.name for a in torch_import.names}
    assert "rmsnorm" not in {a.name for a in torch_import.names}


def test_in_place_kernels_only_overwrite_dead_buffers(llama_cuda):
    """rope rotates q/k in place and the fused norm writes the sum over b only when nothing
    reads them afterwards; here o_proj reads %q (after rope) and the residual add reads
    %attn_out (after the norm), so both must leave their inputs intact."""
    module = llama_cuda.clone()
    layer = next(op for op in module.model.func.body if op.kind == "repeat").region
    o_proj = next(op for op in layer.ops if op.kind == "linear" and op.results == ["%attn_out"])
    o_proj.operands[0] = "%q"
    last_add = next(op for op in layer.ops if op.results == ["%h_out"])
    last_add.operands[0] = "%attn_out"
    assert not verify(module)
    lines = step_lines(generate_runner_source(module))
    assert ("q_rot, k_rot = triton_rope(q.clone(), k.clone(), rope_cos, rope_sin, HEAD_DIM)"
            "  # on copies: q or k is read elsewhere") in lines
    assert "hn, h_attn = triton_add_rmsnorm(x, attn_out, post_attention_layernorm, RMS_NORM_EPS)" in lines


def test_the_loop_carried_residual_is_never_overwritten(llama_cuda):
    """%x is the layer's input, carried around the loop: a norm fused onto it as `b` must
    not write into it, even when this op is its last reader."""
    module = llama_cuda.clone()
    layer = next(op for op in module.model.func.body if op.kind == "repeat").region
    fused = next(op for op in layer.ops if op.kind == "add_rmsnorm")
    fused.operands[0], fused.operands[1] = fused.operands[1], fused.operands[0]     # add(attn_out, x)
    lines = step_lines(generate_runner_source(module))
    assert "hn, h_attn = triton_add_rmsnorm(attn_out, x, post_attention_layernorm, RMS_NORM_EPS)" in lines


def test_kernel_configs_become_wrapper_configs(llama_cuda):
    module = llama_cuda.clone()
    norm = next(op for op in walk_ops(module.model.func.body) if op.kind == "rmsnorm")
    norm.kernel = KernelRef("triton.rmsnorm", {"BLOCK_N": 128, "num_warps": 4})
    attn = next(op for op in walk_ops(module.model.func.body) if op.kind == "attention")
    attn.kernel = KernelRef("triton.paged_attention", {"BLOCK_N": 32})
    lines = step_lines(generate_runner_source(module))
    assert "xn = triton_rmsnorm(x, input_layernorm, RMS_NORM_EPS, config={'BLOCK_N': 128, 'num_warps': 4})" in lines
    fast = next(line for line in lines if line.startswith("attn = triton_paged_attention("))
    assert fast.endswith("BLOCK_SIZE, config={'BLOCK_N': 32})")
    slow = next(line for line in lines if line.startswith("attn = paged_attention("))
    assert "config" not in slow


def test_qwen2_and_mixtral_cuda_plans_lower(tiny_dirs):
    for arch in ("qwen2", "mixtral"):
        module = build(tiny_dirs[arch], CUDA_PIPELINE)
        source = generate_runner_source(module)
        compile(source, f"{arch}.py", "exec")
        assert "triton_rope(" in source and "triton_paged_attention(" in source
        if arch == "mixtral":
            assert "moe(" in source and "triton_silu_mul" not in source   # the experts' MLP stays in torch.moe


def test_triton_kernels_on_a_cpu_plan_are_refused(tiny_dirs):
    module = build(tiny_dirs["llama"], CPU_PIPELINE, target=CPU)
    norm = next(op for op in walk_ops(module.model.func.body) if op.kind == "rmsnorm")
    norm.kernel = KernelRef("triton.rmsnorm")
    with pytest.raises(LoweringError, match="has no torch implementation .*; triton.* kernels run on cuda targets only"):
        generate_runner_source(module)


def test_codegen_never_imports_triton(tiny_dirs):
    script = textwrap.dedent(f"""
        import sys
        from vsc.backends.torch.codegen import generate_runner_source
        from vsc.frontend.lower import lower_spec
        from vsc.frontend.parser import parse_spec_text
        from vsc.passes.manager import PassManager
        text = {SPEC.format(name="p", path=tiny_dirs["llama"], dtype="bf16", target=CUDA)!r}
        module = PassManager({CUDA_PIPELINE!r}).run(lower_spec(parse_spec_text(text, "x.vs")))
        assert "triton_rmsnorm(" in generate_runner_source(module)
        assert "triton" not in sys.modules, "codegen imported triton"
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)


# --- CPU plans: exactly the source they had before the Triton wiring -------------------------

# The generated source of CPU_PIPELINE (less select-kernels) on each tiny model, minus its
# `# plan sha256:` line (which hashes the printed plan, tmp paths included), is kept in
# tests/backends/golden/runner_cpu_<arch>_<dtype>.py.golden. A deliberate change to CPU
# codegen regenerates them with VSC_UPDATE_GOLDEN=1 (review the diff before committing).
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
CPU_GOLDEN = [(arch, dtype) for arch in ("llama", "mixtral", "qwen2") for dtype in ("bf16", "f32")]


def golden_path(arch: str, dtype: str) -> Path:
    return GOLDEN_DIR / f"runner_cpu_{arch}_{dtype}.py.golden"


def check_golden(path: Path, actual: str) -> None:
    """`actual` equals the golden file's text (a unified diff when not); VSC_UPDATE_GOLDEN=1 rewrites it."""
    if os.environ.get("VSC_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
    assert path.is_file(), f"no golden file {path} (set VSC_UPDATE_GOLDEN=1 to create it)"
    expected = path.read_text()
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                                            fromfile=str(path.relative_to(REPO)), tofile="generated"))
        pytest.fail(f"generated source differs from {path.name} (set VSC_UPDATE_GOLDEN=1 to regenerate):\n{diff}")


@pytest.mark.parametrize("arch,dtype", CPU_GOLDEN)
def test_cpu_plans_generate_the_same_source_as_before(tiny_dirs, arch, dtype):
    plain = build(tiny_dirs[arch], CPU_PIPELINE.replace(",select-kernels", ""), target=CPU, dtype=dtype, name="cpu_plan")
    source = generate_runner_source(plain)
    without_hash = "".join(line for line in source.splitlines(keepends=True) if not line.startswith("# plan sha256: "))
    check_golden(golden_path(arch, dtype), without_hash)
    assert "triton" not in source and "tvm" not in source
    # select-kernels on cpu: TVM kernels for the f32 norms (the TVM kernels are f32 only); bf16 keeps torch's
    selected = generate_runner_source(build(tiny_dirs[arch], CPU_PIPELINE, target=CPU, dtype=dtype, name="cpu_plan"))
    if dtype == "f32":
        assert "= tvm_add_rmsnorm(TVM_KERNELS, " in selected and "TVM_KERNELS = load_plan_kernels(" in selected
    else:
        assert selected.split("\n", 2)[2] == source.split("\n", 2)[2]


# --- the cuda runner, run through Triton's interpreter on the CPU ----------------------------

INTERPRETED_RUN = """
import json, sys
import torch
torch.set_num_threads(1)
from vsc.backends.torch.accuracy import check_accuracy
from vsc.backends.torch.codegen import generate_runner_source, load_runner_class
from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text
from vsc.passes.manager import PassManager
from vsc.runtime.kernels import triton_ops
assert triton_ops.INTERPRETED

calls = {}
for name in ("rmsnorm", "rope", "silu_mul", "paged_attention", "add_rmsnorm"):
    def counted(*args, _fn=getattr(triton_ops, name), _name=name, **kw):
        calls[_name] = calls.get(_name, 0) + 1
        return _fn(*args, **kw)
    setattr(triton_ops, name, counted)      # the generated module imports these names when loaded

text, pipeline = sys.argv[1], sys.argv[2]
module = PassManager(pipeline).run(lower_spec(parse_spec_text(text, "interp.vs")))
runner = load_runner_class(generate_runner_source(module), "interpreted_cuda_runner")(module.model.attrs["path"],
                                                                                        device="cpu")
report = check_accuracy(module, runner, probes=2, tolerance=None, max_new_tokens=4)
print(json.dumps({"ok": report.ok, "summary": report.summary(), "max_err": report.max_logit_error, "calls": calls}))
"""


@pytest.mark.parametrize("pipeline", [CUDA_PIPELINE, UNFOLDED_CUDA_PIPELINE], ids=["folded-rope", "rope-in-op"])
def test_cuda_runner_matches_the_reference_under_the_triton_interpreter(tiny_dirs, pipeline):
    """The generated cuda runner, its Triton calls interpreted on CPU tensors (f32, so the
    interpreter's bf16 rounding quirks stay out of it): batched prefill + decode, then a
    chunked prefill beside a decoding sequence, against transformers. With and without
    fold-rope-tables (triton.rope on hoisted rows, or on rows computed in the op)."""
    pytest.importorskip("triton")
    text = SPEC.format(name="interp", path=tiny_dirs["llama"], dtype="f32", target=CUDA)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED_RUN, text, pipeline], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"], result["summary"]
    assert result["max_err"] < 1e-4, result["summary"]
    layers = 4
    # prefill and decode steps both run the norms, rope and silu_mul on Triton; attention
    # only in decode steps (there are fewer of them than steps)
    assert result["calls"]["rmsnorm"] > 2 * layers
    assert result["calls"]["rope"] > layers and result["calls"]["silu_mul"] > layers
    assert result["calls"]["paged_attention"] >= layers
    assert result["calls"]["paged_attention"] < result["calls"]["rope"]
