"""What `vsc` says when a spec asks for something it cannot do: where, in which unit, and the fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vsc.cli import main
from ir_queries import read_pipeline_header
from vsc.ir.sizes import format_bytes

REPO = Path(__file__).resolve().parents[1]


def spec_variant(examples_workspace: Path, name: str, *edits: tuple[str, str]) -> Path:
    text = (examples_workspace / "examples" / "chat.vs").read_text()
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    path = examples_workspace / "examples" / f"{name}.vs"
    path.write_text(text)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("n,text", [(0, "0 B"), (512, "512 B"), (1536, "1.50 KiB"), (1 << 20, "1.00 MiB"),
                                    (113 * (1 << 20), "113 MiB"), (5 * (1 << 20) + 1, "5.00 MiB"),
                                    (int(2.5 * (1 << 30)), "2.50 GiB"), (3 << 40, "3.00 TiB"), (-(1 << 20), "-1.00 MiB")])
def test_format_bytes_uses_the_unit_that_shows_the_size(n, text):
    assert format_bytes(n) == text


def test_a_small_memory_is_reported_in_a_unit_that_shows_it(examples_workspace, capsys):
    spec = spec_variant(examples_workspace, "tiny-memory", ("memory = 1 GiB", "memory = 1 MiB"))
    code, out, err = run(capsys, "parse", spec)
    assert code == 2 and out == ""
    assert "error: memory 1.00 MiB cannot hold the weights (" in err and "0.00 GiB" not in err
    weights = err.split("cannot hold the weights (", 1)[1].split(")", 1)[0]
    assert weights.endswith(" MiB") and float(weights.split()[0]) > 1


def test_a_pass_the_spec_cannot_take_points_at_the_optimize_line_and_says_the_fix(examples_workspace, capsys):
    spec = spec_variant(examples_workspace, "f16", ("dtype = f32", "dtype = f16"))
    code, out, err = run(capsys, "opt", spec)
    assert code == 2 and out == ""
    lines = err.splitlines()
    line_no = next(i for i, line in enumerate(spec.read_text().splitlines(), 1) if line.strip().startswith("optimize"))
    assert lines[0].startswith(f"{spec}:{line_no}:")
    col = int(lines[0].split(": error: ", 1)[0].rsplit(":", 1)[1])
    assert "pass pack-linear-weights: found no f32 or bf16 linear weight to pack (the linear weights are f16" in lines[0]
    assert "--disable-pass pack-linear-weights" in lines[0] and "`dtype = f32`" in lines[0]
    assert lines[1].strip().startswith("optimize \"")
    assert lines[1][4 + col - 1:].startswith("pack-linear-weights") and lines[2].index("^") == 4 + col - 1
    # the fix it names works
    code, out, err = run(capsys, "opt", spec, "--disable-pass", "pack-linear-weights")
    assert code == 0, err
    assert "pack-linear-weights" not in read_pipeline_header(out)


def test_under_optimize_auto_the_caret_is_under_auto(examples_workspace, capsys):
    spec = spec_variant(examples_workspace, "f16-auto", ("dtype = f32", "dtype = f16"))
    text = spec.read_text()
    start = text.index("optimize \"")
    spec.write_text(text[:start] + "optimize auto" + text[text.index("\n", start):])
    code, _, err = run(capsys, "opt", spec, "-q")
    assert code == 2
    lines = err.splitlines()
    assert "pass pack-linear-weights: found no f32 or bf16 linear weight" in lines[0]
    assert lines[1].strip() == "optimize auto" and lines[1][lines[2].index("^"):] == "auto"


def test_a_pipeline_given_with_passes_is_not_pinned_on_the_spec(examples_workspace, capsys):
    spec = spec_variant(examples_workspace, "f16-cli", ("dtype = f32", "dtype = f16"))
    code, _, err = run(capsys, "opt", spec, "--passes", "pack-linear-weights")
    assert code == 2 and err.startswith("pass pack-linear-weights: error: found no f32 or bf16 linear weight")


def test_compile_takes_the_pass_flags_and_keeps_a_pipe_free_of_progress(examples_workspace, capsys, tmp_path):
    spec = examples_workspace / "examples" / "chat.vs"
    code, out, err = run(capsys, "compile", spec, "-o", tmp_path / "srv", "--pass-statistics",
                         "--disable-pass", "pack-linear-weights")
    assert code == 0, err
    manifest = json.loads((tmp_path / "srv" / "manifest.json").read_text())
    assert "pack-linear-weights" not in manifest["pipeline"] and "fuse-qkv" in manifest["pipeline"]
    assert err.startswith("pass statistics:\n  fuse-qkv\n    fused 4 qkv\n")
    assert "\x1b" not in err and "\r" not in err           # stderr is no terminal: no spinner
    assert out.startswith(f"wrote {tmp_path / 'srv'}/")
