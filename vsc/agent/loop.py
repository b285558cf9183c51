"""The outer loop of `vsc search`: propose, evaluate, keep the incumbent, stop on budget.

Candidate 0 is the spec's own pipeline (the baseline: `optimize auto` means the default
pipeline), measured with one extra repeat so that the noise threshold comes from this
machine and this workload. Every later candidate comes from the proposer, is evaluated
(vsc.agent.evaluate: apply -> verify -> lower -> benchmark) and journaled before the next
one starts; only a measured ("ok") candidate can become the incumbent, and only by beating
it beyond the noise threshold (vsc.agent.objectives). A candidate whose plan has the IR
hash of one already measured is recorded as a duplicate and not measured again.

Stops when the candidate budget is spent, the wall-clock budget or the API-token budget
is exceeded, the proposer has nothing more, or `patience` candidates in a row did not
improve the incumbent (plateau). The incumbent's server folder is copied to `-o`.

References (`--reference PIPELINE`, e.g. a hand-written pipeline from examples/) are
measured right after the baseline, in the same run and with the same requests, and shown
beside the search's result; they are not candidates (outside the budget, never the
incumbent), so the search has to find its plan itself.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vsc.agent.catalog import pass_catalog
from vsc.agent.evaluate import BenchSettings, Outcome, evaluate
from vsc.agent.journal import Journal, replay
from vsc.agent.objectives import (Objective, better, noise_threshold, objectives_for, pareto_front, score,
                                  slos_met)
from vsc.agent.proposal import Proposal, Proposer, SearchContext
from vsc.errors import VscError
from vsc.ir.printer import print_module


class SearchError(VscError):
    """The search cannot start or go on (bad run folder, baseline that does not build)."""


@dataclass
class Budget:
    candidates: int = 24              # the baseline included
    wall_s: float | None = None
    api_tokens: int | None = None
    patience: int | None = None       # stop after this many candidates without improvement

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SearchState:
    run_dir: Path
    spec_path: Path
    objectives: list[Objective]
    records: list[dict[str, Any]] = field(default_factory=list)
    incumbent: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    noise: float = 0.03
    since_improvement: int = 0
    stop_reason: str | None = None
    reference_records: list[dict[str, Any]] = field(default_factory=list)


Report = Callable[[str], None]

#: Ids of reference plans (measured for comparison, outside the budget) start here.
REFERENCE_BASE = 1000


def load_spec(spec_path: Path):
    from vsc.driver import load_input
    return load_input(str(spec_path))


def spec_pipeline_of(module) -> str:
    from vsc.driver import spec_pipeline
    return spec_pipeline(module)


def new_run_dir(runs_root: Path, spec_path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = runs_root / f"{stamp}-{spec_path.stem}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    path.mkdir(parents=True)
    return path


class Search:
    def __init__(self, run_dir: Path, proposer: Proposer, *, spec_path: Path | None = None, budget: Budget | None = None,
                 settings: BenchSettings | None = None, report: Report | None = None, sandbox_limits=None,
                 references: list[str] | None = None, progress: Report | None = None):
        self.run_dir = Path(run_dir)
        self.journal = Journal(self.run_dir)
        self.proposer = proposer
        self.report = report or (lambda line: None)
        self.progress = progress or (lambda step: None)    # what is running now (vsc.progress.Activity.update)
        self.sandbox_limits = sandbox_limits
        self.started = time.monotonic()
        if (self.run_dir / "journal.jsonl").is_file():
            self._resume()
        else:
            if spec_path is None:
                raise SearchError(f"{run_dir}: error: no journal to resume and no spec given")
            self._start(Path(spec_path).resolve(), budget or Budget(), settings or BenchSettings(), references or [])

    # -- setup --------------------------------------------------------------------------
    def _start(self, spec_path: Path, budget: Budget, settings: BenchSettings, references: list[str]) -> None:
        self.module = load_spec(spec_path)
        self.budget, self.settings = budget, settings
        objectives = objectives_for(self.module.deployment)
        self.state = SearchState(self.run_dir, spec_path, objectives)
        self.baseline_pipeline = spec_pipeline_of(self.module)
        self.journal.append({"event": "start", "spec": str(spec_path), "budget": budget.to_json(),
                             "settings": settings.to_json(), "proposer": self.proposer.name,
                             "objectives": [o.to_json() for o in objectives],
                             "baseline_pipeline": self.baseline_pipeline, "references": references,
                             "unix": time.time()})
        self.references = references

    def _resume(self) -> None:
        events = self.journal.read()
        st = replay(events)
        start = st["start"]
        spec_path = Path(start["spec"])
        if not spec_path.is_file():
            raise SearchError(f"{spec_path}: error: the spec this search was started on is gone")
        self.module = load_spec(spec_path)
        self.budget = Budget(**start["budget"])
        self.settings = BenchSettings(**start["settings"])
        self.baseline_pipeline = start["baseline_pipeline"]
        self.references = start.get("references") or []
        objectives = [Objective.from_json(o) for o in start["objectives"]]
        self.state = SearchState(self.run_dir, spec_path, objectives)
        for result in st["results"]:
            if result.get("reference"):
                self.state.reference_records.append(result)
            else:
                self._absorb(result, journal=False)
        self.pending = [Proposal.from_json(p["proposal"]) for p in st["pending"]]
        self.pending_ids = [p["id"] for p in st["pending"]]
        self.pending_parents = [p.get("parent") for p in st["pending"]]
        self.stopped = st["stopped"]
        self.report(f"resuming {self.run_dir}: {len(self.state.records)} candidates done, "
                    f"{len(self.pending)} cut off (evaluated again)")

    # -- bookkeeping --------------------------------------------------------------------
    def _absorb(self, rec: dict[str, Any], journal: bool = True) -> None:
        """Add a result record to the state: baseline, score, incumbent, plateau counter."""
        st = self.state
        st.records.append(rec)
        if rec["id"] == 0 and rec["status"] == "ok":
            st.baseline = rec
            st.noise = noise_threshold(rec["runs"], st.objectives)
        if rec["status"] == "ok" and st.baseline is not None:
            rec["score"] = score(rec["objectives"], st.baseline["objectives"], st.objectives)
            rec["slos_met"] = slos_met(rec["objectives"], st.objectives)
            if better(rec, st.incumbent, st.noise):
                st.incumbent = rec
                st.since_improvement = 0
                if journal:
                    self.journal.append({"event": "incumbent", "id": rec["id"], "score": rec["score"],
                                         "slos_met": rec["slos_met"]})
                return
        if rec["id"] != 0:
            st.since_improvement += 1

    def context(self) -> SearchContext:
        st = self.state
        history = [{"id": r["id"], "pipeline": r["pipeline"], "pass_source": r.get("proposal", {}).get("pass_source"),
                    "status": r["status"], "stage": r.get("stage"), "reason": r.get("reason", ""),
                    "objectives": r.get("objectives"), "score": r.get("score"), "parent": r.get("parent"),
                    "proposal": r.get("proposal", {})} for r in st.records]
        incumbent = None
        if st.incumbent is not None:
            incumbent = next(h for h in history if h["id"] == st.incumbent["id"])
        return SearchContext(spec_path=str(st.spec_path), ir_text=print_module(self.module),
                             pass_catalog=pass_catalog(), objectives=[o.describe() for o in st.objectives],
                             history=history, incumbent=incumbent, profile=self.profile(),
                             remaining=self.budget.candidates - len(st.records))

    def profile(self) -> str:
        """Where the incumbent stands: each objective against its SLO and the baseline, and
        its compile/bench time (a proposer's view of what to attack next)."""
        inc, base = self.state.incumbent, self.state.baseline
        if inc is None:
            return "no measured candidate yet"
        lines = [f"incumbent #{inc['id']}: {inc['pipeline'] or '(no passes)'}; score {inc.get('score', 1):.3f} "
                 f"vs baseline, {inc.get('slos_met', 0)} SLOs met"]
        for o in self.state.objectives:
            v, b = inc["objectives"].get(o.name), (base or inc)["objectives"].get(o.name)
            scale, unit = (1.0, "tok/s") if o.metric == "throughput" else (1000.0, "ms")
            fmt = (lambda x: "n/a" if x is None else f"{x * scale:.1f} {unit}")
            met = o.met(v)
            lines.append(f"  {o.describe()}: {fmt(v)} (baseline {fmt(b)})"
                         + ("" if met is None else ("  met" if met else "  MISSED")))
        return "\n".join(lines)

    def stop_reason(self) -> str | None:
        st, b = self.state, self.budget
        if len(st.records) >= b.candidates:
            return f"candidate budget spent ({b.candidates})"
        if b.wall_s is not None and time.monotonic() - self.started > b.wall_s:
            return f"wall-clock budget spent ({b.wall_s:g} s)"
        used = self.proposer.usage()
        if b.api_tokens is not None and used.get("input_tokens", 0) + used.get("output_tokens", 0) > b.api_tokens:
            return f"API token budget spent ({b.api_tokens})"
        if b.patience is not None and st.since_improvement >= b.patience:
            return f"plateau: {b.patience} candidates without improvement"
        return None

    # -- the loop -----------------------------------------------------------------------
    def _evaluate(self, cid: int, proposal: Proposal, parent: int | None, resumed: bool = False,
                  reference: bool = False) -> dict[str, Any]:
        if not resumed:
            self.journal.append({"event": "proposed", "id": cid, "parent": parent, "proposal": proposal.to_json(),
                                 "reference": reference})
        label = proposal.pipeline or "(no passes)"
        where = f"reference {cid - REFERENCE_BASE}" if reference else f"{cid + 1}/{self.budget.candidates}"
        self.report(f"[{where}] {label}" + (" + new pass code" if proposal.pass_source else ""))
        self.progress(f"candidate {where}: building, verifying and benchmarking")
        outcome: Outcome = evaluate(self.module, proposal, self.run_dir / "candidates" / f"{cid:03d}",
                                    self.state.spec_path, self.state.objectives, self.settings,
                                    repeats=self.settings.repeats + (1 if cid == 0 else 0),
                                    sandbox_limits=self.sandbox_limits)
        rec = {"event": "result", "id": cid, "parent": parent, "proposal": proposal.to_json(), **outcome.to_json()}
        if not rec["pipeline"]:
            rec["pipeline"] = proposal.pipeline
        if reference:      # measured beside the search for comparison: never a candidate, never the incumbent
            rec["reference"] = True
            if rec["status"] == "ok" and self.state.baseline is not None:
                rec["score"] = score(rec["objectives"], self.state.baseline["objectives"], self.state.objectives)
                rec["slos_met"] = slos_met(rec["objectives"], self.state.objectives)
            self.state.reference_records.append(rec)
            self.journal.append(rec)
            self.report(self._describe(rec))
            return rec
        if outcome.status == "ok":
            same = next((r for r in self.state.records if r.get("status") == "ok" and r.get("ir_hash") == outcome.ir_hash),
                        None)
            if same is not None and cid != 0:
                rec["status"], rec["stage"], rec["reason"] = "duplicate", None, f"same plan as #{same['id']}"
        self._absorb(rec)
        self.journal.append(rec)
        self.report(self._describe(rec))
        return rec

    def _describe(self, rec: dict[str, Any]) -> str:
        if rec["status"] == "ok":
            star = " (new incumbent)" if self.state.incumbent is rec else ""
            return f"    ok: score {rec.get('score', 1.0):.3f}, {rec.get('slos_met', 0)} SLOs met{star}"
        if rec["status"] == "duplicate":
            return f"    skipped: {rec['reason']}"
        return f"    rejected at {rec['stage']}: {rec['reason']}"

    def run(self, out_dir: Path | None = None) -> SearchState:
        st = self.state
        for cid, proposal, parent in zip(getattr(self, "pending_ids", []), getattr(self, "pending", []),
                                         getattr(self, "pending_parents", [])):
            self._evaluate(cid, proposal, parent, resumed=True, reference=cid >= REFERENCE_BASE)
        self.pending, self.pending_ids, self.pending_parents = [], [], []
        if not st.records:
            self._evaluate(0, Proposal(self.baseline_pipeline, rationale="the spec's own pipeline"), None)
            if st.baseline is None:
                reason = st.records[0].get("reason")
                self.journal.append({"event": "stop", "reason": f"baseline failed: {reason}"})
                raise SearchError(f"{st.spec_path}: error: the spec's own pipeline fails at "
                                  f"{st.records[0].get('stage')}: {reason}")
        done_refs = {r["proposal"]["pipeline"] for r in st.reference_records}
        for i, pipeline in enumerate(self.references):
            if pipeline not in done_refs:
                self._evaluate(REFERENCE_BASE + i, Proposal(pipeline, rationale="reference"), None, reference=True)
        while (reason := self.stop_reason()) is None:
            self.progress(f"asking the {self.proposer.name} proposer for candidate {len(st.records) + 1}")
            proposals = self.proposer.propose(self.context(), 1)
            if not proposals:
                reason = "the proposer has nothing more to try"
                break
            parent = st.incumbent["id"] if st.incumbent else None
            self._evaluate(len(st.records), proposals[0], parent)
        st.stop_reason = reason
        # the reason is printed once, by the report at the end (vsc.agent.report: `stopped: ...`)
        self.journal.append({"event": "stop", "reason": reason, "front": pareto_front(st.records, st.objectives)})
        if out_dir is not None and st.incumbent is not None:
            out_dir = Path(out_dir)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            shutil.copytree(Path(st.incumbent["server_dir"]), out_dir)
            self.report(f"wrote {out_dir}/ (incumbent #{st.incumbent['id']}: {st.incumbent['pipeline']})")
        return st
