"""bench/compare.py end to end with the vsc engine only (peers need installs; see tests/bench_peers)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from vsc.models.tiny import make_tiny

REPO = Path(__file__).resolve().parents[2]


def load_compare():
    spec = importlib.util.spec_from_file_location("bench_compare", REPO / "bench" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_writes_table_report_and_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VSC_BENCH_CACHE", str(tmp_path / "cache"))
    model = make_tiny(tmp_path / "tiny-llama", arch="llama")
    compare = load_compare()
    assert compare.main(["--model", str(model), "--workload", "chat", "--engines", "vsc,nosuch-engine-xyz",
                         "--requests", "4", "--concurrency", "2", "--output-tokens", "fixed(4)",
                         "--out", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "== workload chat ==" in out and "output throughput (tok/s)" in out
    assert "nosuch-engine-xyz: unavailable: unknown peer" in out
    assert "physical floor:" in out
    (run_dir,) = (tmp_path / "results").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    chat = report["engines"]["vsc"]["workloads"]["chat"]
    assert chat["completed"] == 4 and chat["failed"] == 0
    assert (run_dir / "chat-latency-cdf.png").stat().st_size > 10_000
