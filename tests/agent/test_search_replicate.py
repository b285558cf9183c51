"""vsc search and scale-out: the builtin proposer adds replicate{n,router=prefix_affinity} only when
one replica misses the spec's throughput SLO and the machine gives each replica its own cores; the
evaluator serves a plan with a route stage with `vsc serve --ray` (and rejects it in one line where
Ray is missing). Measurements are scripted; tests/scaleout/test_search_replicate_e2e.py measures over Ray."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from vsc.agent import loop
from vsc.agent.catalog import machine_cores, pass_catalog
from vsc.agent.evaluate import BenchSettings, Outcome, evaluate, serve_args
from vsc.agent.journal import Journal, replay
from vsc.agent.objectives import objectives_for
from vsc.agent.proposal import Proposal, SearchContext
from vsc.agent.proposers.anthropic import _static_context
from vsc.agent.proposers.builtin import BuiltinProposer, Features, moves
from vsc.ir.printer import print_module
from vsc.models.tiny import make_tiny
from vsc.passes.base import build_pipeline

START = "paged-kv{block=16},continuous-batching{max_batch=16}"
SLO = {"metric": "throughput", "percentile": None, "op": ">=", "value": 300.0}


def fleet_module(make_module, threads: int = 1, slos=(SLO,), target: str = "cpu"):
    m = make_module()
    m.deployment["workload"] = {"arrivals": {"kind": "closed", "concurrency": 16},
                                "prompt_tokens": {"kind": "fixed", "params": [64.0]},
                                "output_tokens": {"kind": "fixed", "params": [32.0]}}
    m.deployment["slos"] = [dict(s) for s in slos]
    m.target.kind = target
    m.target.attrs["threads"] = threads
    return m


def measured(pipeline: str, tok_s: float, cid: int = 0) -> dict:
    return {"id": cid, "parent": None, "pipeline": pipeline, "status": "ok", "score": 1.0,
            "objectives": {"throughput": tok_s}}


def top(module, history, cores: int = 2, ray: bool = True, n: int = 1) -> list[Proposal]:
    ctx = SearchContext(spec_path="x.vs", ir_text=print_module(module), pass_catalog=[], objectives=[],
                        history=history, incumbent=history[-1] if history else None)
    return BuiltinProposer(cores=cores, ray=ray).propose(ctx, n)


def replicate_moves(module, history, cores: int = 2, ray: bool = True, pipeline: str = START) -> list[tuple]:
    ctx = SearchContext(spec_path="x.vs", ir_text=print_module(module), pass_catalog=[], objectives=[])
    return [m for m in moves(pipeline, Features.of(ctx, cores), history=history, ray=ray) if m[2].startswith("add replicate")]


def test_replicate_comes_first_when_one_replica_misses_the_throughput_slo(make_module):
    m = fleet_module(make_module)
    (p,) = top(m, [measured(START, 100.0)])
    assert p.pipeline == START + ",replicate{n=2,router=prefix_affinity}"
    assert "throughput >= 300 tok/s is missed by one replica" in p.rationale
    assert "#0, measured 100.0 tok/s" in p.rationale and "2 replicas x 1 thread(s)" in p.rationale
    assert "short of the SLO" in p.rationale          # 2 x 100 < 300: said, and still the best move here
    build_pipeline(p.pipeline)                        # a valid pipeline (options, order)
    # more cores: the fewest replicas that would meet it if throughput scaled linearly (300 / 100 = 3)
    (p,) = top(m, [measured(START, 100.0)], cores=8)
    assert "replicate{n=3," in p.pipeline and "short of" not in p.rationale
    # the best single-replica candidate counts, not the last one
    (p,) = top(m, [measured(START, 100.0), measured(START + ",fuse-qkv", 160.0, 1)], cores=8)
    assert "replicate{n=2," in p.pipeline and "#1, measured 160.0" in p.rationale


def test_replicate_is_not_proposed_when_the_slo_is_met_or_the_machine_cannot_give_cores(make_module):
    m = fleet_module(make_module)
    assert replicate_moves(m, [measured(START, 100.0)])                             # the positive case
    assert not replicate_moves(m, [measured(START, 320.0)])                         # one replica meets it
    assert not replicate_moves(m, [])                                               # nothing measured yet
    assert not replicate_moves(m, [measured(START, 100.0)], cores=1)                # no core for a second
    assert not replicate_moves(fleet_module(make_module, threads=2), [measured(START, 100.0)], cores=3)
    assert replicate_moves(fleet_module(make_module, threads=2), [measured(START, 100.0)], cores=4)
    # threads = 0 (all cores): one replica takes the machine; intra-op-threads{threads=1} frees it
    assert not replicate_moves(fleet_module(make_module, threads=0), [measured(START, 100.0)])
    assert replicate_moves(fleet_module(make_module, threads=0), [measured(START, 100.0)],
                           pipeline=START + ",intra-op-threads{threads=1}")
    assert not replicate_moves(m, [measured(START, 100.0)], ray=False)              # nothing to measure it on
    assert not replicate_moves(fleet_module(make_module, slos=()), [measured(START, 100.0)])   # no throughput SLO
    latency_only = ({"metric": "ttft", "percentile": 90.0, "op": "<=", "value": 0.5},)
    assert not replicate_moves(fleet_module(make_module, slos=latency_only), [{**measured(START, 1.0),
                                                                              "objectives": {"output_tok_s": 1.0}}])
    # measured over replicas already: they do not count as one replica's throughput
    assert not replicate_moves(m, [measured(START + ",replicate{n=2}", 100.0)])
    # a pipeline that already replicates is not replicated again
    assert not replicate_moves(m, [measured(START, 100.0)], pipeline=START + ",replicate{n=2}")


def test_the_catalog_offers_replicate_to_a_model_proposer():
    entry = next(p for p in pass_catalog() if p["name"] == "replicate")
    assert {o["name"] for o in entry["options"]} == {"n", "router", "prefix_blocks"}
    assert "throughput objective beyond what one replica measures" in " ".join(entry["doc"].split())
    assert f"it has {machine_cores()} cores" in entry["note"]            # how many replicas fit here
    ctx = SearchContext(spec_path="x.vs", ir_text="", pass_catalog=pass_catalog(), objectives=[])
    assert "## replicate: " in _static_context(ctx) and f"note: {entry['note']}" in _static_context(ctx)


def test_a_plan_with_a_route_stage_is_served_with_ray(make_module):
    m = fleet_module(make_module)
    assert serve_args(m) == ("--overload", "queue")
    (replicate,) = build_pipeline("replicate{n=2}")
    assert serve_args(replicate.run(m)) == ("--overload", "queue", "--ray")


SPEC = """
deployment fleet {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{ arrivals = closed(2), prompt_tokens = fixed(16), output_tokens = fixed(4) }}
  slo {{ throughput >= 100000 tok/s }}
  accuracy {{ greedy_exact(probes = 1) }}
  serve {{ max_context = 128 }}
  optimize "paged-kv{{block=16}},continuous-batching{{max_batch=2,max_tokens=256}}"
}}
"""


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search-replicate")
    path = root / "fleet.vs"
    path.write_text(SPEC.format(model=make_tiny(root / "tiny-llama", arch="llama")))
    return path


def test_the_evaluator_starts_vsc_serve_with_ray_for_a_replicated_plan(spec, tmp_path, monkeypatch):
    """The command the benchmark server gets (Popen stopped before a server starts)."""
    from vsc.bench import cli as bench_cli

    commands = []

    def no_server(cmd, **kwargs):
        commands.append(cmd)
        raise OSError("no server in this test")

    monkeypatch.setattr(bench_cli.subprocess, "Popen", no_server)
    module = loop.load_spec(spec)
    base = loop.spec_pipeline_of(module)
    settings = BenchSettings(requests=2, repeats=1, warmup=0)
    objectives = objectives_for(module.deployment)
    one = evaluate(module, Proposal(base), tmp_path / "one", spec, objectives, settings)
    two = evaluate(module, Proposal(base + ",replicate{n=2,router=prefix_affinity}"), tmp_path / "two", spec,
                   objectives, settings)
    assert one.status == two.status == "rejected" and one.stage == two.stage == "bench"
    assert "no server in this test" in two.reason
    (single, fleet) = commands
    serve = single.index("serve")
    assert single[serve + 1] == str(tmp_path / "one" / "server") and "--ray" not in single
    assert fleet[fleet.index("serve") + 1] == str(tmp_path / "two" / "server")
    assert fleet[-3:] == ["--overload", "queue", "--ray"]


def test_without_ray_a_replicated_candidate_is_rejected_in_one_line(spec, tmp_path, monkeypatch):
    from vsc.bench import cli as bench_cli
    from vsc.runtime import ray_serve

    monkeypatch.setattr(ray_serve, "installed", lambda: False)
    monkeypatch.setattr(bench_cli.subprocess, "Popen", lambda *a, **k: pytest.fail("no server may start"))
    module = loop.load_spec(spec)
    pipeline = loop.spec_pipeline_of(module) + ",replicate{n=2,router=prefix_affinity}"
    out = evaluate(module, Proposal(pipeline), tmp_path / "c", spec, objectives_for(module.deployment),
                   BenchSettings(requests=2, repeats=1, warmup=0))
    assert (out.status, out.stage) == ("rejected", "bench") and "\n" not in out.reason
    assert out.reason == ("the plan has 2 replicas (a route stage): --ray needs Ray Serve: pip install 'vsc[ray]' "
                          "(ray[serve] is not installed)")


def test_a_search_proposes_replicate_after_a_missed_slo_and_keeps_it_when_it_pays(spec, tmp_path, monkeypatch):
    """The loop with the builtin proposer and scripted measurements: one replica measures 100 tok/s,
    two measure 190: the replicated candidate is proposed second, with its reason, and wins."""
    calls = []

    def scripted(module, proposal, work_dir, spec_path, objectives, settings, repeats=None, sandbox_limits=None):
        calls.append(proposal.pipeline)
        values = {"throughput": 190.0 if "replicate" in proposal.pipeline else 100.0}
        return Outcome("ok", pipeline=proposal.pipeline, ir_hash=hashlib.sha256(proposal.pipeline.encode()).hexdigest()[:16],
                       runs=[dict(values)] * (repeats or settings.repeats), objectives=values, seconds={},
                       server_dir=str(work_dir))

    monkeypatch.setattr(loop, "evaluate", scripted)
    search = loop.Search(tmp_path / "run", BuiltinProposer(cores=2, ray=True), spec_path=spec,
                         budget=loop.Budget(candidates=2), settings=BenchSettings(requests=2, repeats=1))
    state = search.run()
    assert calls[1] == calls[0] + ",replicate{n=2,router=prefix_affinity}"
    results = replay(Journal(tmp_path / "run").read())["results"]
    assert "is missed by one replica" in results[1]["proposal"]["rationale"]
    assert state.incumbent["id"] == 1
