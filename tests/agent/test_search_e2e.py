"""vsc search end to end on the tiny model: the loop, rejection with a reason, report, resume after kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vsc.agent.evaluate import BenchSettings
from vsc.agent.journal import Journal, replay
from vsc.agent.loop import Budget, Search
from vsc.agent.proposal import Proposal
from vsc.cli import main
from vsc.models.tiny import make_tiny

SPEC = """
deployment tiny_search {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 512 MiB }}
  workload {{
    arrivals = closed(4)
    prompt_tokens = uniform(16, 48)
    output_tokens = fixed(16)
  }}
  slo {{
    ttft p90 <= 2 s
    throughput >= 10 tok/s
  }}
  accuracy {{ {accuracy} }}
  serve {{ max_context = 256 }}
  optimize "paged-kv{{block=16}},continuous-batching{{max_batch=4,max_tokens=512}}"
}}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("search-model") / "tiny-llama", arch="llama")


def write_spec(folder: Path, model: Path, accuracy: str = "greedy_exact(probes = 2)") -> Path:
    spec = folder / "search.vs"
    spec.write_text(SPEC.format(model=model, accuracy=accuracy))
    return spec


class Scripted:
    """A proposer that returns the given proposals in order (then nothing)."""

    name = "scripted"

    def __init__(self, proposals):
        self.proposals = list(proposals)

    def propose(self, ctx, n):
        out, self.proposals = self.proposals[:n], self.proposals[n:]
        return out

    def usage(self):
        return {"input_tokens": 0, "output_tokens": 0}


def test_search_finds_measures_reports_and_writes_the_best_plan(tiny, tmp_path, capsys):
    spec = write_spec(tmp_path, tiny)
    out = tmp_path / "best"
    code = main(["search", str(spec), "--budget", "3", "--requests", "8", "--repeats", "1",
                 "--runs", str(tmp_path / "runs"), "-o", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    state = replay(Journal(run_dir).read())
    results = state["results"]
    assert [r["id"] for r in results] == [0, 1, 2] and state["stopped"] == "candidate budget spent (3)"
    assert results[0]["pipeline"] == "paged-kv{block=16},continuous-batching{max_batch=4,max_tokens=512}"
    for r in results:
        if r["status"] == "ok":
            assert set(r["objectives"]) == {"ttft_p90", "throughput"} and r["objectives"]["throughput"] > 0
            assert len(r["runs"]) == (2 if r["id"] == 0 else 1) and r["ir_hash"]
    # the best plan is a working server folder
    manifest = json.loads((out / "manifest.json").read_text())
    best = next(r for r in results if r["id"] == state["incumbent"])
    assert manifest["pipeline"] == best["pipeline"]
    assert "search of" in stdout and "incumbent: #" in stdout and "ttft_p90 (ms)" in stdout
    png = run_dir / "trajectory.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # `vsc search report` recomputes the same table from the journal
    assert main(["search", "report", str(run_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[1:4] == stdout.splitlines()[1:4]


def test_a_candidate_that_changes_outputs_is_rejected_with_the_probe(tiny, tmp_path):
    spec = write_spec(tmp_path, tiny, accuracy="logits_tol(1e-5, probes = 2)")
    lines: list[str] = []
    search = Search(tmp_path / "run", Scripted([Proposal("weight-int8{group=0}"), Proposal("no-such-pass"),
                                                Proposal("", malformed="the reply had no tool call")]),
                    spec_path=spec, budget=Budget(candidates=5), settings=BenchSettings(requests=4, repeats=1),
                    report=lines.append)
    state = search.run()
    by_id = {r["id"]: r for r in state.records}
    assert by_id[1]["status"] == "rejected" and by_id[1]["stage"] == "numeric"
    assert "probe" in by_id[1]["reason"] and "weight-int8" in by_id[1]["reason"]
    assert "exceeds tolerance 1.0e-05" in by_id[1]["reason"]      # which probe diverged, and by how much
    assert by_id[2]["stage"] == "pipeline" and "unknown pass 'no-such-pass'" in by_id[2]["reason"]
    assert by_id[3]["stage"] == "proposal" and by_id[3]["reason"] == "the reply had no tool call"
    assert state.incumbent["id"] == 0 and state.stop_reason == "the proposer has nothing more to try"
    assert any("rejected at numeric" in line for line in lines)


def test_resume_continues_exactly_where_kill_9_left_it(tiny, tmp_path):
    spec = write_spec(tmp_path, tiny)
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "vsc", "search", str(spec), "--budget", "4", "--requests", "8", "--repeats", "1",
           "--runs", str(runs)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            journals = list(runs.glob("*/journal.jsonl"))
            if journals and journals[0].read_text().count('"event": "result"') >= 2:
                break
            assert proc.poll() is None, "the search ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the search did not record two results in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)     # the search and its server child, mid-candidate
        proc.wait()
    run_dir = journals[0].parent
    before = replay(Journal(run_dir).read())
    done = [r["id"] for r in before["results"]]
    assert done[:2] == [0, 1] and before["stopped"] is None
    assert main(["search", "--resume", str(run_dir)]) == 0
    after = replay(Journal(run_dir).read())
    assert [r["id"] for r in after["results"]] == [0, 1, 2, 3]          # each once, none redone
    assert [r["proposal"] for r in after["results"][:len(done)]] == [r["proposal"] for r in before["results"]]
    assert after["stopped"] == "candidate budget spent (4)"
