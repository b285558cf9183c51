"""Golden tests: tests/ir/golden_passes/*.vsir hold `// RUN: <pipeline>`, the input IR, and
after `// EXPECTED:` the IR the pipeline must produce. VSC_UPDATE_GOLDEN=1 rewrites the
expected half from the current passes (review the diff before committing)."""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import pytest

from vsc.ir.parser import parse_module
from vsc.ir.printer import print_module
from vsc.ir.verifier import verify
from vsc.passes.manager import PassManager

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "ir" / "golden_passes"
SEPARATOR = "// EXPECTED:\n"


def split_golden(text: str) -> tuple[str, str, str]:
    run = re.match(r"// RUN: (.*)\n", text)
    assert run, "golden file must start with '// RUN: <pipeline>'"
    body, expected = text[run.end():].split(SEPARATOR)
    return run.group(1).strip(), body, expected


GOLDEN_FILES = sorted(GOLDEN_DIR.glob("*.vsir"))


def test_every_builtin_pass_has_a_golden_file():
    from vsc.passes.base import PASSES, load_builtin_passes
    from vsc.passes.pipeline import parse_pipeline
    load_builtin_passes()
    covered = {spec.name for p in GOLDEN_FILES for spec in parse_pipeline(split_golden(p.read_text())[0])}
    builtin = {name for name, cls in PASSES.items() if cls.__module__.startswith("vsc.passes.")}
    assert builtin <= covered, f"passes without a golden file: {sorted(builtin - covered)}"


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_golden(path):
    pipeline, body, expected = split_golden(path.read_text())
    module = parse_module(body, str(path))
    assert verify(module) == [], "golden input must be valid IR"
    manager = PassManager(pipeline)
    actual = print_module(manager.run(module), pipeline=manager.pipeline_text)
    if os.environ.get("VSC_UPDATE_GOLDEN"):
        path.write_text(f"// RUN: {pipeline}\n{body}{SEPARATOR}{actual}")
        return
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True), "expected", "actual"))
        pytest.fail(f"{path.name}: output differs from golden\n{diff}")
    # the expected text is itself valid, parseable IR
    assert verify(parse_module(expected)) == []
