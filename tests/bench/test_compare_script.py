"""bench/compare.py end to end with the vsc engine only (peers need installs; see tests/bench_peers)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

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


def test_batch1_mode_reports_tpot_median_and_what_was_served(tmp_path, monkeypatch, capsys):
    """--concurrency 1 is the batch-1 latency mode: one stream, TPOT median printed as ms/token."""
    monkeypatch.setenv("VSC_BENCH_CACHE", str(tmp_path / "cache"))
    model = make_tiny(tmp_path / "tiny-llama", arch="llama")
    compare = load_compare()
    assert compare.main(["--model", str(model), "--workload", "chat", "--engines", "vsc,llamacpp-gguf",
                         "--requests", "2", "--concurrency", "1", "--output-tokens", "fixed(4)",
                         "--out", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "closed(1)" in out and "TPOT median (ms)" in out
    (b1,) = [ln for ln in out.splitlines() if ln.startswith("batch-1 ms/token (TPOT median): ")]
    assert float(b1.rsplit("vsc ", 1)[1]) > 0
    assert "llamacpp-gguf: unavailable: llamacpp-gguf: no GGUF file given" in out
    assert f"  vsc: {model.resolve()} [f32]" in out
    (run_dir,) = (tmp_path / "results").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["engines"]["vsc"]["served"] == f"{model.resolve()} [f32]"
    assert report["engines"]["vsc"]["describe"]["options"]["max_batch"] == 1


def test_a_peer_runs_every_option_set_it_lists_for_a_workload_and_keeps_the_best(tmp_path, monkeypatch, capsys):
    from bench.peers.vsc_peer import VscPeer
    monkeypatch.setenv("VSC_BENCH_CACHE", str(tmp_path / "cache"))
    model = make_tiny(tmp_path / "tiny-llama", arch="llama")
    monkeypatch.setattr(VscPeer, "VARIANTS", {"default": [], "again": []})
    monkeypatch.setattr(VscPeer, "WORKLOAD_VARIANTS", {"chat": ("default", "again")})
    started = []
    real_start = VscPeer.start
    monkeypatch.setattr(VscPeer, "start", lambda self, *a, **kw: started.append(self.variant) or real_start(self, *a, **kw))
    compare = load_compare()
    assert compare.main(["--model", str(model), "--workload", "chat", "--workload", "shared-prefix", "--engines", "vsc",
                         "--requests", "2", "--concurrency", "2", "--output-tokens", "fixed(4)",
                         "--out", str(tmp_path / "results")]) == 0
    assert started == ["default", "again"]                 # the second only for the workload that lists it
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("vsc: best of its options (default, again): ")]
    (run_dir,) = (tmp_path / "results").iterdir()
    variants = json.loads((run_dir / "report.json").read_text())["engines"]["vsc"]["variants"]
    assert variants["shared-prefix"] == "default" and variants["chat"] in ("default", "again")
    assert line.endswith(variants["chat"])


def test_served_and_score_helpers():
    compare = load_compare()
    assert compare.served({"peer": "llamacpp-gguf", "dtype": "Q4_1", "gguf": "/m/x.gguf"}) == "/m/x.gguf [Q4_1]"
    assert compare.served({"peer": "llamacpp", "dtype": "f32", "gguf": "/c/x-f32.gguf"}) == \
        "/c/x-f32.gguf [f32] (converted from the HF folder)"
    assert compare.served({"peer": "vllm", "dtype": "float32", "options": {"model_dir": "/m/toy"}}) == \
        "/m/toy [float32]"

    class S:
        def __init__(self, tput, tpot):
            self.output_throughput = tput
            self.tpot = type("L", (), {"median": tpot})()
    fast_b1, slow_b1 = {"chat": S(10.0, 0.020)}, {"chat": S(11.0, 0.030)}
    assert compare.engine_score(fast_b1, 1) > compare.engine_score(slow_b1, 1)     # batch 1: by TPOT median
    assert compare.engine_score(fast_b1, 16) < compare.engine_score(slow_b1, 16)   # else: by throughput


def test_gguf_option_rejects_unknown_file(tmp_path):
    compare = load_compare()
    with pytest.raises(SystemExit):
        compare.main(["--model", str(tmp_path), "--gguf", str(tmp_path / "nope.gguf")])
