"""`vsc bench`: argument handling, the plan's workload and SLOs, errors as one line, and a
whole run against a fake server standing in for the compiled one."""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from vsc.bench import cli
from vsc.bench.workloads import LengthDist
from vsc.runtime.integrity import seal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))
from http_fakes import FakeEngine, serving  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory) -> Path:
    """A server folder as `vsc compile` leaves it, minus the runner: manifest.json + plan.vsir."""
    from vsc.frontend.lower import lower_spec
    from vsc.frontend.parser import parse_spec_file
    from vsc.ir.printer import print_module
    from vsc.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("bench-cli")
    model = make_tiny(root / "tiny-llama", arch="llama")
    (root / "spec").mkdir()
    spec = root / "spec" / "chat.vs"
    spec.write_text((REPO / "examples" / "chat.vs").read_text().replace('"../models/tiny-llama"', '"../tiny-llama"'))
    module = lower_spec(parse_spec_file(spec), spec.read_text())
    server = root / "server"
    server.mkdir()
    (server / "plan.vsir").write_text(print_module(module))
    (server / "manifest.json").write_text(json.dumps({
        "vsc_version": "0.1.0", "plan": {"file": "plan.vsir"},
        "model": {"path": str(model), "name": "tiny-llama"}, "serve": {"max_context": 2048}}))
    return server


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="vsc")
    cli.add_bench_command(ap.add_subparsers(dest="command", required=True))
    return ap.parse_args(["bench"] + argv)


def test_arguments():
    a = parse(["srv", "--workload", "code-edit", "--rate", "2.5", "--duration", "10", "--seed", "3",
               "--output-tokens", "32", "--json", "out.json"])
    assert (a.server, a.workload, a.rate, a.concurrency, a.duration, a.seed) == ("srv", "code-edit", 2.5, None, 10.0, 3)
    assert a.func is cli.cmd_bench and a.output_tokens == "32"
    for bad in (["srv", "--rate", "2", "--concurrency", "3"], ["srv", "--workload", "poems"], ["srv", "--rate", "0"],
                ["srv", "--concurrency", "-1"]):
        with pytest.raises(SystemExit):
            parse(bad)


def test_the_plan_supplies_arrivals_lengths_and_slos(server_dir):
    manifest, deployment = cli.read_server_folder(server_dir)
    assert [s["metric"] for s in deployment["slos"]] == ["ttft", "tpot", "e2e", "throughput"]
    a = parse([str(server_dir)])
    arrival = cli._arrival(a, deployment)
    assert (arrival.kind, arrival.rate) == ("poisson", 8.0)
    opts = cli.build_options(a, deployment, 2048)
    assert opts["prompt_tokens"] == LengthDist("uniform", (32, 256)) and opts["output_tokens"] == LengthDist("fixed", (64,))
    a = parse([str(server_dir), "--concurrency", "4", "--output-tokens", "lognormal(48, 0.5)", "--workload", "json"])
    assert cli._arrival(a, deployment).concurrency == 4
    opts = cli.build_options(a, deployment, 2048)
    assert "prompt_tokens" not in opts and opts["output_tokens"] == LengthDist("lognormal", (48, 0.5))
    assert cli._request_count(parse(["s", "--rate", "4", "--duration", "10"]), cli._arrival(
        parse(["s", "--rate", "4"]), {})) == 4 * 10 * 1.5 + 16


def test_a_whole_run_against_a_fake_server(server_dir, tmp_path, monkeypatch, capsys):
    engines = []

    @contextlib.contextmanager
    def fake_server(folder, **kw):
        engine = FakeEngine(max_context=4096, delay=0.0005)
        engines.append(engine)
        with serving(engine) as live:
            yield type("Live", (), {"base_url": live.url, "alive": lambda self: True, "log_tail": lambda self: ""})()

    monkeypatch.setattr(cli, "ServerProcess", fake_server)
    out = tmp_path / "s.json"
    rc = cli.main([str(server_dir), "--rate", "100", "--requests", "6", "--output-tokens", "8", "--json", str(out),
                   "--plot", str(tmp_path / "cdf.png")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "completed requests" in captured.out and "goodput (req/s)" in captured.out
    assert "ttft p99 <= 200 ms" in captured.out and "throughput >= 500 tok/s" in captured.out
    s = json.loads(out.read_text())
    assert s["completed"] == 6 and s["failed"] == 0 and s["total_output_tokens"] == 48
    assert s["goodput_slos"] == {"ttft": 0.2, "tpot": 0.025, "e2e": 4.0}
    assert s["arrival"] == "poisson(100 req/s)" and s["workload"] == "chat"
    assert (tmp_path / "cdf.png").read_bytes()[:4] == b"\x89PNG"
    assert all(r.params.ignore_eos and r.params.max_tokens == 8 for r in engines[0].requests.values())


def test_errors_are_one_line(tmp_path, capsys):
    assert cli.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such server folder" in err[0]
    assert cli.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no manifest.json" in err[0]
    (tmp_path / "manifest.json").write_text(json.dumps({"model": {"path": str(tmp_path / "nowhere")}}))
    assert cli.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model folder" in err[0]


def test_a_server_that_dies_at_start(server_dir, tmp_path):
    # a model folder with a tokenizer but no config: `vsc serve` refuses it and exits
    model = tmp_path / "broken-model"
    model.mkdir()
    manifest, _ = cli.read_server_folder(server_dir)
    shutil.copy(Path(manifest["model"]["path"]) / "tokenizer.json", model / "tokenizer.json")
    folder = tmp_path / "server"
    folder.mkdir()
    manifest = seal(folder, {"vsc_version": "0.1.0", "model": {"path": str(model), "name": "broken"},
                             "serve": {"host": "127.0.0.1", "port": 0}})
    (folder / "manifest.json").write_text(json.dumps(manifest))      # its hashes hold: it dies loading the model
    with pytest.raises(cli.BenchError, match="exited with code 2 before it was ready: .*model folder"):
        with cli.ServerProcess(folder, health_timeout=60):
            pass
