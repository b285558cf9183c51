"""The `vsc` commands a user runs, end to end, on the shipped examples and a real tiny model."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vsc.cli import main
from vsc.ir.parser import parse_module
from ir_queries import read_pipeline_header

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("example", ["chat", "shared-prefix", "code-edit", "code-edit-spec", "chat-h100"])
def test_parse_prints_valid_ir_for_each_example(examples_workspace, capsys, example):
    code, out, err = run(capsys, "parse", examples_workspace / "examples" / f"{example}.vs")
    assert code == 0, err
    module = parse_module(out)
    assert module.model.attrs["arch"] == "llama" and module.model.attrs["layers"] == 4
    assert module.origin.kind == "spec" and module.origin.detail.endswith(f"{example}.vs")


def test_opt_runs_the_spec_pipeline_and_prints_changes(examples_workspace, capsys, tmp_path):
    spec = examples_workspace / "examples" / "chat.vs"
    code, out, err = run(capsys, "opt", spec, "--print-ir-after-change", "--dump-dir", tmp_path / "d", "--time-passes")
    assert code == 0, err
    final = parse_module(out)
    assert final.cache.layout == "paged" and final.batching.mode == "continuous"
    assert err.count("// ----- IR after") == 7 and "total" in err
    assert final.schedule.attrs["intra_op_threads"] == 1      # tiny GEMMs: one thread (intra-op-threads)
    dumps = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert dumps == ["000_input.vsir", "001_fuse-qkv.vsir", "002_fuse-gate-up.vsir", "003_fold-rope-tables.vsir",
                     "004_paged-kv.vsir", "005_continuous-batching.vsir", "006_pack-linear-weights.vsir",
                     "007_intra-op-threads.vsir"]
    assert read_pipeline_header(out) == read_pipeline_header((tmp_path / "d" / dumps[-1]).read_text())


def test_opt_on_vsir_input_and_output_file(examples_workspace, capsys, tmp_path):
    code, out, _ = run(capsys, "parse", examples_workspace / "examples" / "chat.vs")
    src = tmp_path / "module.vsir"
    src.write_text(out)
    code, out, err = run(capsys, "opt", src, "--passes", "fuse-qkv,paged-kv{block=32}", "-o", tmp_path / "out.vsir")
    assert code == 0 and out == "", err
    result = parse_module((tmp_path / "out.vsir").read_text())
    assert result.cache.block_size == 32
    code, out, err = run(capsys, "verify", tmp_path / "out.vsir")
    assert code == 0 and "ok" in out


@pytest.mark.parametrize("flag", ["--print-ir-before-all", "--print-ir-after-all", "--print-ir-after-change"])
def test_print_ir_flags_add_to_stderr_and_the_final_ir_always_goes_to_stdout(examples_workspace, capsys, flag):
    code, out, err = run(capsys, "opt", examples_workspace / "examples" / "chat.vs", "--passes", "fuse-qkv,fuse-qkv", flag)
    assert code == 0, err
    assert read_pipeline_header(out) == "fuse-qkv,fuse-qkv" and parse_module(out).model.func.body
    if flag == "--print-ir-after-all":
        assert "IR after fuse-qkv (#1)" in err and "IR after fuse-qkv (#2) (no change)" in err
    elif flag == "--print-ir-before-all":
        assert err.count("IR before fuse-qkv") == 2
    else:
        assert "IR after fuse-qkv (#1)" in err and "(#2)" not in err


def test_pass_statistics_and_disable_pass(examples_workspace, capsys):
    spec = examples_workspace / "examples" / "chat.vs"
    code, out, err = run(capsys, "opt", spec, "-q", "--pass-statistics", "--disable-pass", "fuse-gate-up")
    assert code == 0 and out == "", err
    lines = err.splitlines()
    assert lines[0] == "pass statistics:" and "  fuse-qkv" in lines and "    fused 4 qkv" in lines
    assert "  fuse-gate-up" not in lines
    code, out, err = run(capsys, "opt", spec, "--disable-pass", "fuse-gate-up")
    assert code == 0 and "fuse-gate-up" not in read_pipeline_header(out)
    code, out, err = run(capsys, "opt", spec, "--disable-pass", "fuse-gateup")
    assert code == 2 and out == ""
    assert err == "--disable-pass fuse-gateup: error: no pass is named 'fuse-gateup' (did you mean 'fuse-gate-up'?)\n"


def test_verify_reports_violations_with_exit_1(examples_workspace, capsys, tmp_path):
    _, out, _ = run(capsys, "parse", examples_workspace / "examples" / "chat.vs")
    bad = tmp_path / "bad.vsir"
    bad.write_text(out.replace("max_batch = 8", "max_batch = 0"))
    code, out, err = run(capsys, "verify", bad)
    assert code == 1
    assert err.startswith("verify: error: [batching.max-batch] batching: max_batch must be >= 1")
    assert "spec" in err  # the diagnostic names where the node came from


def test_verify_list(capsys):
    code, out, _ = run(capsys, "verify", "--list")
    assert code == 0 and {line.split()[0] for line in out.splitlines()} >= {"ssa", "types", "kernels", "cache", "requests"}


def test_passes_lists_every_pass_with_options(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == 0
    for name in ("fuse-qkv", "fuse-gate-up", "paged-kv", "continuous-batching"):
        assert name in out
    assert "block: int = 16" in out and "max_batch: int = 32" in out


def test_passes_with_user_pass(capsys):
    code, out, _ = run(capsys, "passes", "--load-pass", REPO / "examples" / "passes" / "shortest_first.py")
    assert code == 0 and "shortest-first" in out


def test_bad_pipeline_is_one_line_with_caret(examples_workspace, capsys):
    code, out, err = run(capsys, "opt", examples_workspace / "examples" / "chat.vs", "--passes", "fuse-qkv,paged-kv{blok=1}")
    assert code == 2
    lines = err.splitlines()
    assert lines[0] == "pipeline:10: error: unknown option 'blok' for pass paged-kv (options: block, tokens)"
    assert lines[2].strip() == "^"


def test_pass_failure_is_one_line_with_reproducer(examples_workspace, capsys, tmp_path):
    # continuous batching with a contiguous cache cannot reserve 1000 slots of 2048 tokens in 2 GiB
    code, out, err = run(capsys, "opt", examples_workspace / "examples" / "chat.vs", "--passes",
                         "continuous-batching{max_batch=1000}", "--dump-dir", tmp_path)
    assert code == 2
    assert err.startswith("pass continuous-batching{max_batch=1000}: error: max_batch=1000 needs")
    assert (tmp_path / "reproducer_continuous-batching.vsir").is_file()


def test_spec_error_from_a_real_process_is_one_line_and_a_caret(examples_workspace, tmp_path):
    spec = tmp_path / "bad.vs"
    spec.write_text((examples_workspace / "examples" / "chat.vs").read_text()
                    .replace("../models/tiny-llama", str(examples_workspace / "models" / "tiny-llama"))
                    .replace("threads = 2", "thread = 2"))
    proc = subprocess.run([sys.executable, "-m", "vsc", "parse", str(spec)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"{spec}:9:")
    assert "unknown key 'thread' in target cpu (did you mean 'threads'?)" in lines[0]
    assert "thread = 2" in lines[1] and lines[2].strip() == "^"
    assert "Traceback" not in proc.stderr


def test_unknown_input_kind(capsys, tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    code, _, err = run(capsys, "parse", f)
    assert code == 2 and "expected a deployment spec (.vs) or an IR file (.vsir)" in err


def test_ir_parse_error_from_cli(capsys, tmp_path):
    f = tmp_path / "broken.vsir"
    f.write_text("// vsc-ir 1\nmodule @x {\n  deployment {a = }\n")
    code, _, err = run(capsys, "verify", f)
    assert code == 2 and err.startswith(f"{f}:3:")
