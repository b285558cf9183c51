"""What `vsc search` says: its stop reason once, why the incumbent beat the rest of the Pareto
front, a Ctrl-C that names `--resume`, and progress that stays off a pipe. The benchmark is
replaced by scripted outcomes (tests/agent/test_search_e2e.py measures for real)."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from rich.console import Console

from vsc.agent import loop
from vsc.agent.evaluate import Outcome
from vsc.agent.objectives import Objective
from vsc.agent.report import format_report
from vsc.cli import main
from vsc.models.tiny import make_tiny
from vsc.passes.manager import PassManager
from vsc.progress import Activity, PassProgress

SPEC = """
deployment messages {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 512 MiB }}
  workload {{ arrivals = closed(4), prompt_tokens = fixed(16), output_tokens = fixed(8) }}
  slo {{
    ttft p90 <= 2 s
    throughput >= 10 tok/s
  }}
  serve {{ max_context = 256 }}
  optimize "paged-kv{{block=16}}"
}}
"""


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search-messages")
    model = make_tiny(root / "tiny-llama", arch="llama")
    path = root / "messages.vs"
    path.write_text(SPEC.format(model=model))
    return path


def scripted_evaluate(interrupt_at: int | None = None):
    """A stand-in for vsc.agent.evaluate.evaluate: candidate n measures 100 + 10 n tok/s; the
    `interrupt_at`-th call raises KeyboardInterrupt, as Ctrl-C in the middle of a benchmark."""
    calls = []

    def evaluate(module, proposal, work_dir, spec_path, objectives, settings, repeats=None, sandbox_limits=None):
        calls.append(proposal.pipeline)
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        values = {"ttft_p90": 0.5, "throughput": 100.0 + 10 * len(calls)}
        return Outcome("ok", pipeline=proposal.pipeline, ir_hash=hashlib.sha256(proposal.pipeline.encode()).hexdigest()[:16],
                       runs=[dict(values)] * (repeats or settings.repeats), objectives=values, seconds={},
                       server_dir=str(work_dir))
    return evaluate, calls


def search_argv(spec: Path, runs: Path, budget: int = 2) -> list[str]:
    return ["search", str(spec), "--budget", str(budget), "--runs", str(runs), "--repeats", "1"]


def test_the_stop_reason_is_printed_once_and_progress_stays_off_a_pipe(spec, tmp_path, capsys, monkeypatch):
    evaluate, calls = scripted_evaluate()
    monkeypatch.setattr(loop, "evaluate", evaluate)
    code = main(search_argv(spec, tmp_path / "runs"))
    out, err = capsys.readouterr()
    assert code == 0 and len(calls) == 2
    assert (out + err).count("stopped: candidate budget spent (2)") == 1
    assert "stopped: candidate budget spent (2)" in out              # in the report, with the table
    # stderr is not a terminal here: the progress lines, and no spinner or escape codes
    assert "\x1b" not in err and "\r" not in err
    assert err.splitlines()[0].startswith("run folder ") and "[1/2] paged-kv{block=16}" in err


def test_ctrl_c_names_the_resume_command_and_that_command_finishes_the_search(spec, tmp_path, capsys, monkeypatch):
    evaluate, calls = scripted_evaluate(interrupt_at=2)
    monkeypatch.setattr(loop, "evaluate", evaluate)
    code = main(search_argv(spec, tmp_path / "runs", budget=3))
    _, err = capsys.readouterr()
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert code == 130
    assert err.splitlines()[-1] == f"vsc search: interrupted; continue with: vsc search --resume {run_dir}"
    evaluate, calls = scripted_evaluate()
    monkeypatch.setattr(loop, "evaluate", evaluate)
    assert main(["search", "--resume", str(run_dir)]) == 0
    out, _ = capsys.readouterr()
    assert len(calls) == 2 and "stopped: candidate budget spent (3)" in out     # the cut-off one, then one more


def test_ctrl_c_before_the_search_started_says_there_is_nothing_to_resume(spec, tmp_path, capsys, monkeypatch):
    def interrupted(path):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "load_spec", interrupted)
    assert main(search_argv(spec, tmp_path / "runs")) == 130
    err = capsys.readouterr().err
    assert "interrupted before the search started" in err and "--resume" not in err


def report_data(front: list[int]) -> dict:
    objectives = [Objective("ttft_p90", "ttft", 90.0, False, 2.0), Objective("throughput", "throughput", None, True, 10.0)]

    def rec(i, ttft, tput, slos, sc, best=False):
        return {"id": i, "status": "ok", "change": f"plan {i}", "pipeline": f"plan-{i}", "objectives":
                {"ttft_p90": ttft, "throughput": tput}, "slos_met": slos, "score": sc, "became_incumbent": best}
    records = [rec(0, 0.5, 100.0, 2, 1.0, True), rec(1, 0.3, 150.0, 2, 1.30, True),
               rec(2, 0.1, 120.0, 2, 1.32), rec(3, 2.5, 400.0, 1, 1.6), rec(4, 0.2, 110.0, 2, 1.20)]
    return {"start": {"spec": "x.vs", "proposer": "builtin"}, "objectives": objectives, "records": records,
            "references": [], "incumbent": records[1], "noise": 0.03, "trajectory": [], "stopped": "done",
            "front": front}


def test_the_report_explains_why_the_incumbent_beat_the_rest_of_the_front():
    lines = format_report(report_data([1, 2, 3, 4])).splitlines()
    at = lines.index("Pareto front: #1, #2, #3, #4")
    assert lines[at + 1:at + 5] == [
        "the incumbent #1 is kept:",
        "  #2 is better on ttft_p90, but its score 1.320 beats the incumbent's 1.300 by less than the 3.0% noise "
        "threshold",
        "  #3 is better on throughput, but meets 1 SLOs, the incumbent 2",
        "  #4 is better on ttft_p90, but its score 1.200 is below the incumbent's 1.300",
    ]
    assert "is kept" not in format_report(report_data([1]))          # the front is the incumbent: nothing to explain


class Steps:
    def __init__(self):
        self.seen = []

    def update(self, step):
        self.seen.append(step)


def test_compile_progress_names_each_pass_and_the_accuracy_check(make_module):
    steps = Steps()
    manager = PassManager("fuse-qkv,pack-linear-weights", [])
    manager.instruments.append(PassProgress(steps, len(manager.passes)))
    manager.run(make_module())
    assert steps.seen == ["pass 1/2 fuse-qkv", "pass 2/2 pack-linear-weights (then the accuracy check)"]


def test_progress_shows_on_a_terminal_only():
    quiet = io.StringIO()
    with Activity("compiling", console=Console(file=quiet)) as activity:
        activity.update("pass 1/2 fuse-qkv")
    assert not activity.enabled and quiet.getvalue() == ""
    shown = io.StringIO()
    with Activity("compiling", console=Console(file=shown, force_terminal=True, width=120)) as activity:
        activity.update("pass 1/2 fuse-qkv")
    assert activity.enabled and "compiling: pass 1/2 fuse-qkv" in shown.getvalue()
