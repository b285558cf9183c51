"""Ahead-of-time compilation of the Triton kernels for sm_90 (and sm_80) without a GPU.

This session imported triton for the interpreter (conftest.py), so compile_kernels runs
the compilation in a `python -m vsc.backends.triton.aot` subprocess — the path a
compiling process would take in-process.
"""
from __future__ import annotations

import ast
import builtins
import hashlib
import json
import re

import pytest

pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402

from vsc.backends.triton.aot import LLAMA3_8B, KernelShapes, compile_kernels, variants  # noqa: E402
from vsc.ir.kernels import KERNELS as CATALOG  # noqa: E402


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels-sm90")
    files = compile_kernels(out, GPUTarget("cuda", 90, 32))
    return out, files, json.loads((out / "kernels.json").read_text())


def entry(index, name, variant):
    return next(e for e in index["kernels"] if e["name"] == name and e["variant"] == variant)


def test_every_variant_has_ptx_for_sm90_and_a_cubin(sm90):
    out, files, index = sm90
    expected = variants(LLAMA3_8B)
    assert len(index["kernels"]) == len(expected) >= 15
    assert files[-1].name == "kernels.json" and all(f.parent == out for f in files)
    for e in index["kernels"]:
        ptx = (out / e["files"]["ptx"]["path"]).read_text()
        assert re.search(r"^\.target sm_90a?\b", ptx, re.M), e["variant"]
        assert f".entry {e['entry']}(" in ptx
        # the entry takes the runtime params, then Triton's two scratch pointers
        body = ptx.split(f".entry {e['entry']}(", 1)[1].split(")", 1)[0]
        assert body.count(".param") == len(e["params"]) + len(e["trailing_params"]), e["variant"]
        cubin = (out / e["files"]["cubin"]["path"]).read_bytes()
        assert cubin[:4] == b"\x7fELF"
        assert e["threads_per_block"] == 32 * e["num_warps"]


def test_index_hashes_match_the_files(sm90):
    out, files, index = sm90
    assert index["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}
    assert set(index["sha256"]) == {f.name for f in files if f.name != "kernels.json"}
    for name, digest in index["sha256"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    for e in index["kernels"]:
        for f in [*e["files"].values(), e["source"]]:
            assert index["sha256"][f["path"]] == f["sha256"]


def test_index_covers_the_catalogs_triton_kernels_with_reference_constexprs(sm90):
    _, _, index = sm90
    triton_entries = {n for n in CATALOG if n.startswith("triton.")}
    assert triton_entries <= {e["ir_kernel"] for e in index["kernels"]}
    for dt in ("fp32", "bf16"):
        attn = entry(index, "paged_decode", dt)
        assert attn["ir_kernel"] == "triton.paged_attention"
        assert {k: attn["constexprs"][k] for k in ("GROUP", "HEAD_DIM", "BLOCK_SIZE")} == {
            "GROUP": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16}
        assert attn["signature"]["KCache"] == f"*{dt}"
        assert entry(index, "rmsnorm", dt + ".residual")["constexprs"]["HAS_RESIDUAL"] is True
        assert entry(index, "rope", dt + ".table")["constexprs"]["HEAD_DIM"] == 128


def test_matmul_uses_wgmma_and_decode_attention_uses_tensor_cores(sm90):
    out, _, index = sm90
    mm = entry(index, "matmul", "bf16.linear")
    assert mm["constexprs"]["BLOCK_M"] >= 64 and mm["constexprs"]["BLOCK_N"] >= 64
    assert "wgmma.mma_async" in (out / mm["files"]["ptx"]["path"]).read_text()
    attn_bf16 = (out / entry(index, "paged_decode", "bf16")["files"]["ptx"]["path"]).read_text()
    assert re.search(r"\bmma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32", attn_bf16)
    attn_fp32 = (out / entry(index, "paged_decode", "fp32")["files"]["ptx"]["path"]).read_text()
    assert ".bf16" not in attn_fp32                 # IEEE fp32 products, no bf16 tensor-core path


def test_sources_are_standalone_kernels(sm90):
    out, _, index = sm90
    for e in index["kernels"]:
        text = (out / e["source"]["path"]).read_text()
        compile(text, e["source"]["path"], "exec")
        assert "@triton.jit\ndef " + e["entry"] + "(" in text
        # every function it calls by a bare name is in the file (a @triton.jit helper) or a builtin
        tree = ast.parse(text)
        defined = {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}
        called = {c.func.id for c in ast.walk(tree) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        assert called - defined - set(dir(builtins)) == set(), e["source"]["path"]
    assert "def _residual_chunk(" in (out / "rmsnorm.py").read_text()      # rmsnorm's helper came along


def test_other_arch_and_model_shapes(tmp_path):
    shapes = KernelShapes.from_model_attrs({"hidden": 128, "heads": 4, "kv_heads": 2, "intermediate": 256},
                                           block_size=8)
    files = compile_kernels(tmp_path, GPUTarget("cuda", 80, 32), shapes, dtypes=("bf16",),
                            kernels=("matmul", "paged_decode"))
    index = json.loads((tmp_path / "kernels.json").read_text())
    assert sorted(e["name"] for e in index["kernels"]) == ["matmul", "paged_decode"]
    assert {f.suffix for f in files} == {".py", ".ptx", ".cubin", ".json"}
    attn = entry(index, "paged_decode", "bf16")
    assert {k: attn["constexprs"][k] for k in ("GROUP", "HEAD_DIM", "BLOCK_SIZE")} == {
        "GROUP": 2, "HEAD_DIM": 32, "BLOCK_SIZE": 8}
    mm_ptx = (tmp_path / entry(index, "matmul", "bf16.linear")["files"]["ptx"]["path"]).read_text()
    assert re.search(r"^\.target sm_80\b", mm_ptx, re.M)
    assert "wgmma" not in mm_ptx and "mma.sync" in mm_ptx     # wgmma is Hopper-only


def test_unknown_kernel_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no variants for kernels"):
        compile_kernels(tmp_path, kernels=("nope",))
