"""The inner loop for one candidate: apply -> verify -> lower -> benchmark -> record.

Stages, each of which may reject the candidate with a one-line reason (the journal keeps
the stage, so the report and the next proposal know *where* it failed):

    proposal    the proposer's reply was unusable (Proposal.malformed)
    pipeline    the pipeline text does not parse, names an unknown pass, bad options, a pass raised
    sandbox     agent-written pass code hit a limit or crashed in its child process
    structural  a pass produced IR the verifier rejects
    numeric     the outputs no longer match the reference (after a pass, or after lowering)
    lower       code generation or the server folder failed
    bench       the server did not start, died, or failed requests (or the plan has replicas
                and Ray Serve, which serves them, is not installed)

Builtin passes run in this process through `vsc.driver.compile_to_server` (the same path
as `vsc compile`: the structural verifier after every pass, the numeric check after every
pass that may change outputs, the accuracy check after lowering). A candidate carrying
pass source runs its whole pipeline in the sandbox (vsc.agent.sandbox); the IR it returns
is parsed and verified again here, then lowered and checked for accuracy like any plan.
The benchmark replays the spec's workload (its kind, arrivals and lengths; a fixed seed,
so every candidate gets the same requests) against the server in a child process:
a short warm-up, then `repeats` measured runs, run r with request set r (seed + r): every
candidate sees the same sets, and no server sees a prompt twice (a repeated prompt would be a
prefix-cache hit that real traffic does not give, and would flatter the cache).
A plan with a route stage (replicas) is served with `vsc serve --ray` (`serve_args`): its replicas
run on a local Ray cluster that the server starts, and that goes with it when it stops.
"""
from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsc.agent.objectives import Objective, combine, measure
from vsc.agent.proposal import Proposal
from vsc.errors import PassFailure, PipelineError, VscError
from vsc.ir.module import ServingModule
from vsc.ir.printer import print_module
from vsc.ir.route import replicas


#: The warm-up's request set (seed offset): disjoint from the measured runs' sets (offsets 0, 1, ...).
WARMUP_SEED = 1000
#: Requests per measured run when the settings give none: WAVES_PER_RUN times a closed loop's
#: concurrency, so that it runs several waves and not one burst, and never fewer than
#: MIN_RUN_REQUESTS (what an open loop, poisson arrivals, gets).
WAVES_PER_RUN = 4
MIN_RUN_REQUESTS = 16


@dataclass
class BenchSettings:
    requests: int | None = None  # requests per measured run (None: request_count's WAVES_PER_RUN x the
    #                              closed-loop concurrency, at least MIN_RUN_REQUESTS)
    repeats: int = 2            # measured runs per candidate (the baseline gets one more)
    warmup: int = 4             # requests before measuring (compiles torch kernels, fills caches)
    seed: int = 0
    deadline_s: float = 300.0   # per run

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Outcome:
    status: str                                  # "ok" | "rejected"
    stage: str | None = None
    reason: str = ""
    ir_hash: str | None = None
    pipeline: str = ""                           # as the pass manager normalized it
    runs: list[dict[str, float | None]] | None = None
    objectives: dict[str, float | None] | None = None
    seconds: dict[str, float] | None = None
    server_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def ir_hash(module: ServingModule) -> str:
    """sha256 of the printed plan without its pipeline header: two pipelines that produce the
    same plan have the same hash (the loop measures such a plan once)."""
    text = "\n".join(line for line in print_module(module).splitlines() if not line.startswith("// pipeline:"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def classify_pass_failure(error: PassFailure) -> str:
    text = str(error)
    if "produced invalid IR" in text:
        return "structural"
    if "changed the model's outputs" in text:
        return "numeric"
    return "pipeline"


def one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def build_plan(module: ServingModule, proposal: Proposal, work_dir: Path, spec_path: Path | None,
               sandbox_limits=None) -> tuple[Outcome | None, Any]:
    """Apply, verify, lower and check one candidate into work_dir/server.

    Returns (rejection, None) or (None, CompileResult)."""
    from vsc.driver import CompileError, compile_to_server

    if proposal.malformed:
        return Outcome("rejected", "proposal", one_line(proposal.malformed)), None
    server_dir = work_dir / "server"
    try:
        if proposal.pass_source:
            from vsc.agent.sandbox import SandboxError, SandboxLimits, sandboxed_module

            try:
                optimized = sandboxed_module(print_module(module), proposal.pipeline, proposal.pass_source,
                                             work_dir / "sandbox", sandbox_limits or SandboxLimits())
            except SandboxError as e:
                stage = "structural" if getattr(e, "kind", "") == "invalid" else "sandbox"
                return Outcome("rejected", stage, one_line(f"{getattr(e, 'kind', 'error')}: {e}")), None
            result = compile_to_server(optimized, "", server_dir, spec_path, reproducer_dir=work_dir / "repro")
            result.pipeline = proposal.pipeline
        else:
            result = compile_to_server(module, proposal.pipeline, server_dir, spec_path,
                                       reproducer_dir=work_dir / "repro")
    except PipelineError as e:
        return Outcome("rejected", "pipeline", one_line(e)), None
    except PassFailure as e:
        return Outcome("rejected", classify_pass_failure(e), one_line(e)), None
    except CompileError as e:
        return Outcome("rejected", "numeric", one_line(e)), None
    except VscError as e:
        return Outcome("rejected", "lower", one_line(e)), None
    except Exception as e:  # noqa: BLE001 - a bug below must reject the candidate, not end the search
        return Outcome("rejected", "lower", one_line(f"{type(e).__name__}: {e}")), None
    return None, result


def search_workload(deployment: dict[str, Any], model_dir: Path, n: int, seed: int, max_context: int | None):
    """The spec's workload as a bench request set: its kind, arrivals and lengths."""
    from vsc.bench.workloads import LengthDist, build_workload, closed, poisson

    wl = deployment.get("workload") or {}
    kind = (wl.get("kind") or ("shared_prefix" if wl.get("shared_prefix") else "chat")).replace("_", "-")
    arr = wl.get("arrivals") or {}
    if arr.get("kind") == "poisson" and arr.get("rate"):
        arrival = poisson(float(arr["rate"]))
    else:
        arrival = closed(int(arr.get("concurrency") or 1))
    opts: dict[str, Any] = {"max_context": max_context}
    if wl.get("prompt_tokens"):
        opts["prompt_tokens"] = LengthDist.from_ir(wl["prompt_tokens"])
    if wl.get("output_tokens"):
        opts["output_tokens"] = LengthDist.from_ir(wl["output_tokens"])
    if kind == "shared-prefix" and wl.get("shared_prefix"):
        opts["prefix_tokens"] = int(wl["shared_prefix"]["tokens"])
        opts["share"] = float(wl["shared_prefix"]["share"])
    return build_workload(kind, model_dir, n, seed=seed, arrival=arrival, **opts)


def request_count(deployment: dict[str, Any], settings: BenchSettings) -> int:
    """Requests per measured run: enough that a closed loop runs several waves, not one burst."""
    if settings.requests:
        return settings.requests
    arr = (deployment.get("workload") or {}).get("arrivals") or {}
    return max(MIN_RUN_REQUESTS, WAVES_PER_RUN * int(arr.get("concurrency") or 0))


def serve_args(module: ServingModule) -> tuple[str, ...]:
    """The `vsc serve` flags the benchmark server of a plan gets. overload = queue: a search measures
    what a plan sustains; shedding would turn a slow candidate's late requests into failures instead
    of measured latencies. A plan with a route stage (replicate, or `serve { replicas }`) is served the
    way its users will run it, `vsc serve --ray`: its replicas on a local Ray cluster behind the
    ingress, which the server starts and stops (vsc.runtime.ray_serve)."""
    from vsc.ir.route import STAGE

    args: tuple[str, ...] = ("--overload", "queue")
    if module.requests.stage(STAGE) is not None:
        args += ("--ray",)
    return args


def benchmark(server_dir: Path, deployment: dict[str, Any], objectives: list[Objective], settings: BenchSettings,
              repeats: int, serve_args: tuple[str, ...] = ("--overload", "queue")) -> list[dict[str, float | None]]:
    """Objective values of `repeats` runs of the spec's workload against the server folder
    (served by `vsc serve` with `serve_args`)."""
    import json

    from vsc.bench.cli import ServerProcess
    from vsc.bench.loadgen import run_workload
    from vsc.bench.metrics import goodput_slos_from_plan, summarize
    from vsc.bench.workloads import closed

    manifest = json.loads((server_dir / "manifest.json").read_text())
    model_dir = Path(manifest["model"]["path"])
    max_context = (manifest.get("serve") or {}).get("max_context")
    n = request_count(deployment, settings)
    slos = list(deployment.get("slos") or [])
    runs = []
    with ServerProcess(server_dir, serve_args=serve_args) as server:
        if settings.warmup:
            warm = search_workload(deployment, model_dir, settings.warmup, settings.seed + WARMUP_SEED, max_context)
            warm.arrival = closed(settings.warmup)
            warm.arrival_times = None
            asyncio.run(run_workload(warm, server.base_url, deadline=settings.deadline_s))
        for r in range(repeats):
            # run r gets request set r: the same sets for every candidate, but never one request
            # twice in a server (a repeated prompt is a prefix-cache hit no real traffic would give)
            workload = search_workload(deployment, model_dir, n, settings.seed + r, max_context)
            run = asyncio.run(run_workload(workload, server.base_url, deadline=settings.deadline_s))
            summary = summarize(run, goodput_slos_from_plan(slos) or None, slos or None)
            if summary.failed or not server.alive():
                detail = next(iter(summary.errors), "") or server.log_tail()
                raise VscError(f"{summary.failed} of {len(run.records)} requests failed: {detail}")
            runs.append(measure(summary, objectives))
    return runs


def evaluate(module: ServingModule, proposal: Proposal, work_dir: Path, spec_path: Path | None,
             objectives: list[Objective], settings: BenchSettings, repeats: int | None = None,
             sandbox_limits=None, keep_server: bool = False) -> Outcome:
    """One candidate through every stage; never raises for a bad candidate."""
    work_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    rejected, result = build_plan(module, proposal, work_dir, spec_path, sandbox_limits)
    seconds["build"] = round(time.perf_counter() - t0, 3)
    if rejected is not None:
        rejected.seconds = seconds
        rejected.pipeline = proposal.pipeline
        return rejected
    outcome = Outcome("ok", pipeline=result.pipeline, ir_hash=ir_hash(result.module), seconds=seconds,
                      server_dir=str(result.out_dir))
    args = serve_args(result.module)
    if "--ray" in args:
        from vsc.runtime import ray_serve
        if not ray_serve.installed():
            outcome.status, outcome.stage = "rejected", "bench"
            outcome.reason = f"the plan has {replicas(result.module)} replicas (a route stage): {ray_serve.NOT_INSTALLED}"
            return outcome
    t1 = time.perf_counter()
    try:
        runs = benchmark(result.out_dir, module.deployment, objectives, settings, repeats or settings.repeats, args)
    except VscError as e:
        outcome.status, outcome.stage, outcome.reason = "rejected", "bench", one_line(e)
        return outcome
    except Exception as e:  # noqa: BLE001 - see build_plan
        outcome.status, outcome.stage, outcome.reason = "rejected", "bench", one_line(f"{type(e).__name__}: {e}")
        return outcome
    finally:
        seconds["bench"] = round(time.perf_counter() - t1, 3)
    # objectives over request sets 0..settings.repeats-1 only, the sets every candidate runs: the
    # baseline's extra run (set `repeats`) feeds the noise threshold, not the comparison
    outcome.runs, outcome.objectives = runs, combine(runs[:settings.repeats])
    if not keep_server:
        # keep what explains the plan (plan, manifest, generated code: a few KB), not the sandbox
        shutil.rmtree(work_dir / "sandbox", ignore_errors=True)
    return outcome
