"""The direction of imports between vsc's stages, as import-linter contracts (pyproject.toml's
[tool.importlinter], also run by `make test` as `lint-imports`).

The contracts must hold for the tree, cover every module of vsc, and break on the wrong
imports they exist to stop: each case below writes one such import into a copy of the
package and runs the linter on the copy.
"""
from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import vsc

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the vsc package and pyproject.toml under `root`."""
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "300", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache", "--no-logo", "--config", str(root / "pyproject.toml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_every_import_contract_holds():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_layers_contract_places_every_module_of_vsc():
    (layers,) = [c for c in contracts() if c["type"] == "layers"]
    assert layers["containers"] == ["vsc"] and layers["exhaustive"] is True   # a new module must be placed
    placed = {name.strip() for layer in layers["layers"] for name in layer.split("|")}
    assert placed == {m.name for m in pkgutil.iter_modules(vsc.__path__)}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A clean copy of the vsc package and its pyproject.toml; each case edits it and restores it."""
    root = tmp_path_factory.mktemp("layers")
    shutil.copytree(ROOT / "vsc", root / "vsc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize("module,line,broken", [
    # the example: the runtime's engine importing the compiler
    ("runtime/engine.py", "import vsc.passes", "vsc.runtime is not allowed to import vsc.passes"),
    ("runtime/kernels/torch_ops.py", "from vsc.ir.module import walk_ops", "vsc.runtime is not allowed to import vsc.ir"),
    # a backend reading what a pass wrote through the pass module instead of vsc.ir.plan
    ("backends/server/emit.py", "from vsc.passes.prefix_cache import PrefixCache",
     "vsc.backends is not allowed to import vsc.passes"),
    # a pass using the runtime's machinery (not one of its declaration modules)
    ("passes/json_mode.py", "from vsc.runtime.constrain import check_schema",
     "vsc.passes is not allowed to import vsc.runtime"),
    ("ir/kernels.py", "import vsc.runtime.engine", "vsc.ir is not allowed to import vsc.runtime"),
    # ... nor through a declaration module that grew an import of the machinery
    ("runtime/enums.py", "import vsc.runtime.scheduler", "vsc.runtime.enums is not allowed to import vsc.runtime.scheduler"),
    # stages importing sideways or upwards
    ("passes/speculative.py", "from vsc.frontend.lower import lower_spec", "vsc.passes is not allowed to import vsc.frontend"),
    ("agent/loop.py", "from vsc.cli import main", "vsc.agent is not allowed to import vsc.cli"),
    ("ir/module.py", "import vsc.passes.base", "vsc.ir is not allowed to import vsc.passes"),
    ("bench/metrics.py", "import vsc.driver", "vsc.bench is not allowed to import vsc.driver"),
    # a new top-level module that no layer names
    ("newstage.py", "import vsc.errors", "vsc.newstage"),
])
def test_a_wrong_import_breaks_a_contract(tree, module, line, broken):
    path = tree / "vsc" / module
    original = path.read_text() if path.exists() else None
    path.write_text((original or "") + f"\n{line}\n")
    try:
        result = lint_imports(tree)
    finally:
        if original is None:
            path.unlink()
        else:
            path.write_text(original)
    assert result.returncode != 0
    assert broken in result.stdout + result.stderr, result.stdout + result.stderr


def test_the_grammars_ship_inside_the_package():
    """A wheel carries vsc/ only: every grammar a module loads lies in vsc/grammar/, which
    pyproject's package-data ships (it was a top-level grammar/ folder, missing from wheels)."""
    from vsc.frontend import syntax
    from vsc.ir import parser
    from vsc.passes import pipeline

    package = Path(syntax.__file__).resolve().parents[1]
    shipped = tomllib.loads((package.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["vsc"]
    for path in (syntax.GRAMMAR_PATH, parser.GRAMMAR_PATH, pipeline.GRAMMAR_PATH):
        assert path.is_file() and path.is_relative_to(package)
        assert any(path.relative_to(package).match(glob) for glob in shipped)
