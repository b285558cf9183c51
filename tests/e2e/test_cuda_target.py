"""`vsc compile` for a cuda target on a machine without a GPU: examples/chat-h100.vs, on a
freshly made tiny llama, becomes a server folder with sm_90 PTX for every Triton kernel the
plan selects, a runner that calls them, and a manifest that says the accuracy check was
skipped rather than passed."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vsc.cli import main as vsc_main
from vsc.ir.parser import parse_module_file
from vsc.ir.module import walk_ops
from vsc.models.tiny import make_tiny
from vsc.passes.base import build_pipeline

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "chat-h100.vs"
HAS_CUDA = torch.cuda.is_available()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(server folder, `vsc compile` stdout): the example copied beside a fresh tiny llama,
    at the relative path it names (../models/tiny-llama)."""
    root = tmp_path_factory.mktemp("cuda-target")
    make_tiny(root / "models" / "tiny-llama", arch="llama")
    (root / "examples").mkdir()
    spec = root / "examples" / "chat-h100.vs"
    shutil.copy(EXAMPLE, spec)
    out = root / "build" / "server"
    capture = subprocess.run([sys.executable, "-m", "vsc", "compile", str(spec), "-o", str(out)], cwd=root,
                             capture_output=True, text=True, timeout=600)
    assert capture.returncode == 0, capture.stderr[-3000:]
    return out, capture.stdout


def plan_triton_kernels(server: Path) -> set[str]:
    plan = parse_module_file(server / "plan.vsir")
    return {op.kernel.name for op in walk_ops(plan.model.func.body)
            if op.kernel is not None and op.kernel.name.startswith("triton.")}


def test_plan_selects_the_triton_kernels(compiled):
    server, _ = compiled
    plan = parse_module_file(server / "plan.vsir")
    assert plan.target.kind == "cuda" and plan.target.attrs["arch"] == "sm_90"
    assert plan_triton_kernels(server) == {"triton.rmsnorm", "triton.rope", "triton.silu_mul",
                                           "triton.paged_attention"}


def test_every_triton_kernel_of_the_plan_has_sm90_ptx(compiled):
    server, _ = compiled
    kernels = server / "kernels"
    index = json.loads((kernels / "kernels.json").read_text())
    assert index["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}
    assert index["dtypes"] == ["bf16"]                    # the plan's dtype only
    # constexprs from the tiny model and the plan's KV block, not the Llama-3-8B defaults
    assert index["shapes"]["hidden"] == 128 and index["shapes"]["head_dim"] == 32
    assert index["shapes"]["heads"] == 4 and index["shapes"]["kv_heads"] == 2
    assert index["shapes"]["intermediate"] == 384 and index["shapes"]["block_size"] == 16
    for ir_kernel in plan_triton_kernels(server):
        entries = [e for e in index["kernels"] if e["ir_kernel"] == ir_kernel]
        assert entries, f"no compiled kernel for {ir_kernel}"
        for e in entries:
            ptx = (kernels / e["files"]["ptx"]["path"]).read_text()
            assert re.search(r"^\.target sm_90a?\b", ptx, re.M), e["variant"]
            assert f".entry {e['entry']}(" in ptx
            assert (kernels / e["files"]["cubin"]["path"]).read_bytes()[:4] == b"\x7fELF"
    # triton.paged_attention = the cache write, then paged decode attention
    names = {e["name"] for e in index["kernels"]}
    assert names == {"rmsnorm", "rope", "silu_mul", "kv_write", "paged_decode"}    # nothing the plan does not use
    ptx_files = sorted(kernels.glob("*.ptx"))
    assert ptx_files and all(re.search(r"^\.target sm_90a?\b", p.read_text(), re.M) for p in ptx_files)


def test_kernel_index_and_manifest_hash_the_files(compiled):
    server, _ = compiled
    kernels = server / "kernels"
    index = json.loads((kernels / "kernels.json").read_text())
    listed = {f["path"] for e in index["kernels"] for f in (*e["files"].values(), e["source"])}
    assert listed == {p.name for p in kernels.iterdir()} - {"kernels.json"}
    for name, digest in index["sha256"].items():
        assert sha256(kernels / name) == digest, name
    for e in index["kernels"]:
        for f in (*e["files"].values(), e["source"]):
            assert sha256(kernels / f["path"]) == f["sha256"]
    manifest = json.loads((server / "manifest.json").read_text())
    entry = manifest["kernels"]
    assert entry["dir"] == "kernels" and entry["arch"] == "sm_90" and entry["dtype"] == "bf16"
    assert set(entry["ir_kernels"]) == plan_triton_kernels(server)
    assert set(entry["files"]) == {p.name for p in kernels.iterdir()}
    for name, digest in entry["files"].items():
        assert sha256(kernels / name) == digest, name


@pytest.mark.skipif(HAS_CUDA, reason="with a CUDA device the accuracy check runs")
def test_manifest_records_the_accuracy_check_as_skipped(compiled):
    server, stdout = compiled
    assert ("accuracy: skipped: no CUDA device on the compiling machine; run `vsc verify server/` on the GPU host"
            in stdout.splitlines())
    assert "kernels" in stdout.splitlines()[-1]          # the time line counts the kernel compilation
    manifest = json.loads((server / "manifest.json").read_text())
    checks = manifest["verification"]
    accuracy = [v for v in checks if v["check"] == "accuracy"]
    # after select-kernels (may change outputs) and after lowering: neither claims a pass
    assert [v["after"] for v in accuracy] == ["select-kernels", "lowering"]
    for v in accuracy:
        assert v["ok"] is None and v["skipped"] is True
        assert v["summary"].startswith("skipped: no CUDA device on the compiling machine")
        assert "probes" not in v and "max_logit_error" not in v
    # the structural verifier still ran on the input and after every pass
    structural = [v["after"] for v in checks if v["check"] == "structural"]
    assert structural == ["input", *(str(p.spec) for p in build_pipeline(manifest["pipeline"]))]
    assert all(v["ok"] is True for v in checks if v["check"] == "structural")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_manifest_records_the_accuracy_check_on_the_gpu(compiled):
    server, _ = compiled
    manifest = json.loads((server / "manifest.json").read_text())
    final = [v for v in manifest["verification"] if v["check"] == "accuracy"][-1]
    assert final["after"] == "lowering" and final["ok"] is True and "probes" in final


def test_runner_calls_the_triton_wrappers(compiled):
    server, _ = compiled
    source = (server / "model.py").read_text()
    assert "from vsc.runtime.kernels.triton_ops import (" in source
    for call in ("triton_rmsnorm(", "triton_rope(", "triton_silu_mul(", "triton_paged_attention("):
        assert call in source, call
    assert "if meta.is_decode:" in source and "attn = paged_attention(" in source     # prefill fallback
    assert "vsc.ir" not in source and "vsc.passes" not in source and "vsc.backends" not in source
    manifest = json.loads((server / "manifest.json").read_text())
    assert manifest["runner"]["sha256"] == sha256(server / "model.py")


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU host vsc verify runs the check")
def test_verify_does_not_pass_a_cuda_server_it_could_not_run(compiled, tmp_path, capsys):
    server, _ = compiled
    copy = tmp_path / "server"
    shutil.copytree(server, copy)
    assert vsc_main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "structural: ok" in out and re.search(r"integrity: ok \(\d+ files, \d+ model files", out)
    assert "runner: model.py regenerated from plan.vsir, byte for byte the same" in out
    assert "accuracy: not run: the plan targets cuda and this machine has no CUDA device" in out
    # a changed kernel file is reported as such
    ptx = next((copy / "kernels").glob("rmsnorm*.ptx"))
    ptx.write_text(ptx.read_text() + "\n// edited\n")
    assert vsc_main(["verify", str(copy)]) == 1
    assert f"integrity: {ptx} changed since compile" in capsys.readouterr().out


def test_cpu_compile_never_loads_the_triton_backend(tmp_path):
    """The same driver on a CPU plan: no Triton kernels in kernels/, no "kernels" manifest entry, and
    none of vsc's Triton modules loaded. (`triton` itself may still be imported: torch 2.13
    imports it from `torch._native.ops` while the HF reference model runs.)"""
    model = make_tiny(tmp_path / "tiny-llama", arch="llama")
    spec = tmp_path / "cpu.vs"
    spec.write_text(textwrap.dedent(f"""\
        deployment cpu_only {{
          model "{model}" {{ dtype = f32 }}
          target cpu {{ threads = 1, memory = 256 MiB }}
          workload {{ arrivals = closed(2), prompt_tokens = fixed(16), output_tokens = fixed(8) }}
          accuracy {{ greedy_exact(probes = 2) }}
          serve {{ max_context = 128 }}
          optimize "fuse-qkv,fuse-silu-mul,paged-kv{{block=16}},select-kernels"
        }}
        """))
    out = tmp_path / "server"
    script = ("import sys\nfrom vsc.cli import main\n"
              f"assert main(['compile', {str(spec)!r}, '-o', {str(out)!r}]) == 0\n"
              "loaded = sorted(m for m in sys.modules if m.startswith(('vsc.backends.triton.', "
              "'vsc.runtime.kernels.triton_ops')))\n"
              "assert not loaded, f'a CPU compile loaded {loaded}'\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "kernels" not in manifest        # no Triton kernels; kernels/ holds the TVM library select-kernels chose
    assert sorted(p.name for p in (out / "kernels").iterdir()) == sorted(manifest["tvm_kernels"]["files"])
    assert manifest["verification"][-1]["ok"] is True
