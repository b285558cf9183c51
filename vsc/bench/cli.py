"""`vsc bench SERVER_DIR`: start a compiled server, offer it a workload, print the metrics.

    vsc bench build/server --workload chat --rate 4 --duration 30
    vsc bench build/server --workload shared-prefix --concurrency 8 --requests 64 --json out.json

The server runs as `python -m vsc serve SERVER_DIR --port <free port>` on 127.0.0.1; the
workload is built from the server's own model folder (manifest.json -> model.path) with
the seed given. Without --rate / --concurrency the arrivals are the plan's (the spec's
`workload` block); chat and shared-prefix also take the plan's length distributions unless
--prompt-tokens / --output-tokens say otherwise. Goodput uses the plan's latency SLOs as
per-request thresholds, and each plan SLO is checked at its percentile.

The lead wires it in with `add_bench_command(subparsers)`; the parser sets `func`.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

from vsc.child_process import dies_with_parent, process_tree, reap
from vsc.errors import VscError

HEALTH_TIMEOUT_S = 180.0


class BenchError(VscError):
    """`vsc bench` cannot run: a bad server folder, a server that does not start or dies."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A compiled server folder running in a child process on 127.0.0.1 (a context manager).

    Its output goes to a temporary log file (read back for error messages); on exit it is
    sent SIGTERM, then SIGKILL if it has not stopped within `stop_timeout` seconds. If this
    process dies without exiting (SIGKILL, OOM killer), the kernel kills the server with it.
    """

    def __init__(self, server_dir: str | Path, port: int | None = None, health_timeout: float = HEALTH_TIMEOUT_S,
                 stop_timeout: float = 30.0, serve_args: tuple[str, ...] = ()):
        self.server_dir = Path(server_dir)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.health_timeout, self.stop_timeout = health_timeout, stop_timeout
        self.serve_args = tuple(serve_args)      # more `vsc serve` flags, e.g. ("--overload", "queue")
        self.proc: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> "ServerProcess":
        self._log = tempfile.TemporaryFile(mode="w+b")
        cmd = [sys.executable, "-m", "vsc", "serve", str(self.server_dir), "--host", "127.0.0.1",
               "--port", str(self.port), *self.serve_args]
        # dies_with_parent: a SIGKILLed `vsc bench`/`vsc search` must not leave its server running
        self.proc = subprocess.Popen(dies_with_parent(cmd), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 1) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        text = self._log.read().decode("utf-8", errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) if text else "(no output)"

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.health_timeout
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(f"{self.server_dir}: error: the server exited with code {self.proc.returncode} "
                                     f"before it was ready: {self.log_tail()}")
                try:
                    if client.get(self.base_url + "/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.server_dir}: error: the server did not answer /health within "
                                     f"{self.health_timeout:g} s: {self.log_tail()}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # what the server started (`vsc serve --ray`: a local Ray head, its raylet and workers) is
            # noted now, while it is still the server's: they must go with it, even if it is killed
            tree = process_tree(self.proc.pid)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            reap(tree, timeout=self.stop_timeout)


def read_server_folder(server_dir: Path) -> tuple[dict, dict]:
    """(manifest, the plan's deployment dict or {}) of a compiled server folder."""
    from vsc.runtime.launch import read_manifest

    if not server_dir.is_dir():
        raise BenchError(f"{server_dir}: error: no such server folder; build one with `vsc compile`")
    manifest = read_manifest(server_dir)
    model_dir = Path(manifest.get("model", {}).get("path", ""))
    if not (model_dir / "tokenizer.json").is_file():
        raise BenchError(f"{model_dir}: error: the server's model folder is missing or has no tokenizer.json")
    deployment: dict = {}
    plan = server_dir / manifest.get("plan", {}).get("file", "plan.vsir")
    if plan.is_file():
        from vsc.ir.parser import parse_module_file

        deployment = parse_module_file(plan).deployment or {}
    return manifest, deployment


def _arrival(args, deployment: dict):
    from vsc.bench.workloads import closed, poisson

    if args.rate is not None:
        return poisson(args.rate)
    if args.concurrency is not None:
        return closed(args.concurrency)
    spec = (deployment.get("workload") or {}).get("arrivals") or {}
    if spec.get("kind") == "poisson" and spec.get("rate"):
        return poisson(float(spec["rate"]))
    if spec.get("kind") == "closed" and spec.get("concurrency"):
        return closed(int(spec["concurrency"]))
    return closed(1)


def _request_count(args, arrival) -> int:
    if args.requests is not None:
        return args.requests
    if args.duration is None:
        return 100
    if arrival.kind == "poisson" and not math.isinf(arrival.rate):
        return max(1, min(20000, math.ceil(arrival.rate * args.duration * 1.5) + 16))
    return 1000


def build_options(args, deployment: dict, max_context: int | None) -> dict:
    """Builder options for the chosen workload: lengths from the flags, else from the plan."""
    from vsc.bench.workloads import LengthDist

    wl = deployment.get("workload") or {}
    opts: dict = {"max_context": max_context}
    uses_plan = args.workload in ("chat", "shared-prefix")
    if args.prompt_tokens:
        opts["prompt_tokens"] = LengthDist.parse(args.prompt_tokens)
    elif uses_plan and wl.get("prompt_tokens"):
        opts["prompt_tokens"] = LengthDist.from_ir(wl["prompt_tokens"])
    if args.output_tokens:
        opts["output_tokens"] = LengthDist.parse(args.output_tokens)
    elif uses_plan and wl.get("output_tokens"):
        opts["output_tokens"] = LengthDist.from_ir(wl["output_tokens"])
    if args.workload == "shared-prefix" and wl.get("shared_prefix"):
        opts["prefix_tokens"] = int(wl["shared_prefix"]["tokens"])
        opts["share"] = float(wl["shared_prefix"]["share"])
    return opts


def cmd_bench(args) -> int:
    from vsc.bench.loadgen import run_workload
    from vsc.bench.metrics import format_slos, format_table, goodput_slos_from_plan, summarize
    from vsc.bench.workloads import build_workload

    server_dir = Path(args.server)
    manifest, deployment = read_server_folder(server_dir)
    model_dir = Path(manifest["model"]["path"])
    max_context = (manifest.get("serve") or {}).get("max_context") or (manifest.get("engine") or {}).get("max_context")
    arrival = _arrival(args, deployment)
    n = _request_count(args, arrival)
    workload = build_workload(args.workload, model_dir, n, seed=args.seed, arrival=arrival,
                              **build_options(args, deployment, max_context))
    print(workload.describe(), file=sys.stderr)
    slos = list(deployment.get("slos") or [])
    deadline = args.timeout if args.timeout is not None else (args.duration or 0) + 600.0
    with ServerProcess(server_dir) as server:
        print(f"server {server_dir} on {server.base_url}; benchmarking ...", file=sys.stderr)
        run = asyncio.run(run_workload(workload, server.base_url, engine=args.engine, ignore_eos=not args.no_ignore_eos,
                                       send_extra=not args.no_extra, duration=args.duration, deadline=deadline,
                                       request_timeout=args.request_timeout))
        died = not server.alive()
        tail = server.log_tail() if died else ""
    summary = summarize(run, goodput_slos_from_plan(slos) or None, slos or None)
    if died and summary.completed < len(run.records):
        raise BenchError(f"{server_dir}: error: the server died during the benchmark "
                         f"({summary.failed} of {len(run.records)} requests failed): {tail}")
    print(format_table({args.engine: summary}, reference=args.engine))
    if summary.slo_results:
        print("plan SLOs:")
        for line in format_slos(summary).splitlines():
            print("  " + line)
    for err, count in summary.errors.items():
        print(f"failed x{count}: {err}", file=sys.stderr)
    if run.deadline_hit:
        print(f"note: the {deadline:g} s deadline passed; requests still running were counted as failed",
              file=sys.stderr)
    if args.json:
        Path(args.json).write_text(summary.to_json())
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from vsc.bench.plots import plot_latency_cdfs

        plot_latency_cdfs({args.engine: summary}, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if summary.completed else 1


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


def add_bench_command(subparsers) -> argparse.ArgumentParser:
    """Add `bench` to the `vsc` sub-command parsers; dispatch is `args.func(args)`."""
    from vsc.bench.workloads import WORKLOADS

    p = subparsers.add_parser("bench", help="start a compiled server, offer it a workload, print serving metrics",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("server", help="a compiled server folder (vsc compile -o ...)")
    p.add_argument("--workload", choices=list(WORKLOADS), default="chat")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=_positive_float, help="open loop: Poisson arrivals at R req/s (inf: all at once)")
    load.add_argument("--concurrency", type=_positive_int, help="closed loop: N concurrent users")
    p.add_argument("--duration", type=_positive_float, help="stop sending new requests after S seconds")
    p.add_argument("--requests", type=_positive_int, help="number of requests (default 100, or enough for --duration)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (same seed, same requests)")
    p.add_argument("--prompt-tokens", metavar="DIST", help="prompt length, e.g. 256 or uniform(32, 256)")
    p.add_argument("--output-tokens", metavar="N|DIST", help="output tokens per request, e.g. 64 or lognormal(48, 0.5)")
    p.add_argument("--timeout", type=_positive_float,
                   help="hard wall-clock limit of the run in seconds (default: duration + 600)")
    p.add_argument("--request-timeout", type=_positive_float, default=300.0, help="per-request limit (s)")
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS (default: ignore_eos)")
    p.add_argument("--no-extra", action="store_true",
                   help="do not send the workload's extra request fields (the json workload's response_format)")
    p.add_argument("--engine", default="vsc", help="name of this engine in the table and JSON")
    p.add_argument("--json", metavar="OUT", help="write the summary (with per-request samples) as JSON")
    p.add_argument("--plot", metavar="PNG", help="write latency CDFs (TTFT, TPOT, ITL, E2E) as a PNG")
    p.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m vsc.bench.cli SERVER_DIR ...`: the same command without the `vsc` front end."""
    ap = argparse.ArgumentParser(prog="vsc")
    add_bench_command(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["bench"] + list(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except VscError as e:
        print(e.render(), file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
