"""`vsc search` chooses scale-out: a tiny model whose spec asks for more throughput than one replica
gives. The baseline is measured as one server; the builtin proposer then adds
replicate{n=2,router=prefix_affinity} (this box gives each of two 1-thread replicas a core), and the
evaluator verifies that plan, serves it with `vsc serve --ray` (a local Ray cluster that the server
starts and stops), measures it and journals it. Every process the search started, Ray's included,
is gone when it returns.

Marked `ray` (`make test` runs it in its Ray step). Skips where the machine has fewer than two cores."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from vsc.agent.evaluate import BenchSettings
from vsc.agent.journal import Journal, replay
from vsc.agent.loop import Budget, Search
from vsc.agent.catalog import machine_cores
from vsc.agent.proposers.builtin import BuiltinProposer
from vsc.child_process import process_tree
from vsc.models.tiny import make_tiny

pytestmark = pytest.mark.ray

SPEC = """
deployment fleet_search {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{
    arrivals = closed(2)
    prompt_tokens = fixed(16)
    output_tokens = fixed(4)
    shared_prefix {{ tokens = 64, share = 0.5 }}
  }}
  slo {{ throughput >= 100000 tok/s }}
  accuracy {{ greedy_exact(probes = 1) }}
  serve {{ max_context = 256 }}
  optimize "paged-kv{{block=16}},continuous-batching{{max_batch=2,max_tokens=256}}"
}}
"""


class Descendants:
    """Every process below this one seen while the search runs ({pid: start time}, and `names`:
    {pid: comm}), sampled every 0.2 s: a Ray worker re-parented after its server died is still in here."""

    def __init__(self) -> None:
        import os
        self.pid, self.seen, self.names = os.getpid(), {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for pid, start in process_tree(self.pid).items():
                if pid not in self.seen:
                    self.seen[pid], self.names[pid] = start, _comm(pid)

    def __enter__(self) -> "Descendants":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def alive(seen: dict[int, int]) -> list[int]:
    from vsc.child_process import _stat
    return [p for p, start in seen.items() if (st := _stat(p)) is not None and st[1] == start]


def test_search_measures_a_replicated_plan_over_ray_and_journals_it(tmp_path, missing_input):
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        missing_input("ray[serve] is not installed (`make install` installs the ray extra)")
    if machine_cores() < 2:
        pytest.skip("two replicas of one thread each need two cores")
    spec = tmp_path / "fleet.vs"
    spec.write_text(SPEC.format(model=make_tiny(tmp_path / "tiny-llama", arch="llama")))
    search = Search(tmp_path / "run", BuiltinProposer(cores=2), spec_path=spec, budget=Budget(candidates=2),
                    settings=BenchSettings(requests=4, repeats=1, warmup=2))
    with Descendants() as procs:
        search.run()
    results = replay(Journal(tmp_path / "run").read())["results"]
    base, fleet = results
    assert base["status"] == "ok" and "replicate" not in base["pipeline"]
    assert fleet["pipeline"] == base["pipeline"] + ",replicate{n=2,router=prefix_affinity}"
    assert "is missed by one replica" in fleet["proposal"]["rationale"]
    assert fleet["status"] == "ok", fleet["reason"]
    assert fleet["objectives"]["throughput"] > 0 and fleet["runs"]
    server = Path(fleet["server_dir"])
    assert '"replicas": 2' in (server / "manifest.json").read_text()
    assert "stage route" in (server / "plan.vsir").read_text()
    # the plan was served over Ray: its server started a raylet (and Ray is gone with it)
    assert "raylet" in procs.names.values(), sorted(set(filter(None, procs.names.values())))
    assert alive(procs.seen) == [], {p: procs.names[p] for p in alive(procs.seen)}


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
