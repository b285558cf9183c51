"""What `vsc search` optimizes: the spec's SLOs, each with its direction, plus throughput.

Each SLO becomes an objective measured at its percentile (`ttft p90 <= 500 ms` ->
"ttft_p90", seconds, lower is better; `throughput >= 300 tok/s` -> "throughput", higher is
better). Output throughput is always an objective (a plan that meets every SLO should
still serve more). Candidates are ranked by

1. how many SLOs they meet (more first), then
2. a score: the geometric mean over objectives of the candidate's value relative to the
   baseline's, oriented so that > 1 is better (a latency halved counts as 2x, like a
   throughput doubled).

A candidate replaces the incumbent only if it meets at least as many SLOs and its score
beats the incumbent's by more than the noise threshold (`noise_threshold`: the spread of
the score across the baseline's repeated runs, halved, at least MIN_NOISE). With several objectives
the Pareto front (no other candidate at least as good on all and better on one) is
reported too, since a scalar score hides trade-offs.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

#: The smallest improvement that counts, whatever the repeats say: 3% (two cores are noisy).
MIN_NOISE = 0.03


@dataclass(frozen=True)
class Objective:
    name: str                       # "ttft_p90", "throughput", "output_tok_s"
    metric: str                     # ttft | tpot | itl | e2e | throughput
    percentile: float | None
    higher_is_better: bool
    target: float | None = None     # the SLO's bound (seconds, or tok/s), None for output_tok_s

    def describe(self) -> str:
        unit = "tok/s" if self.metric == "throughput" else "ms"
        scale = 1.0 if self.metric == "throughput" else 1000.0
        bound = "" if self.target is None else f" {'>=' if self.higher_is_better else '<='} {self.target * scale:g} {unit}"
        return f"{self.name}{bound}: {'higher' if self.higher_is_better else 'lower'} is better"

    def met(self, value: float | None) -> bool | None:
        if self.target is None:
            return None
        if value is None:
            return False
        return value >= self.target if self.higher_is_better else value <= self.target

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "percentile": self.percentile,
                "higher_is_better": self.higher_is_better, "target": self.target}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Objective":
        return Objective(d["name"], d["metric"], d.get("percentile"), bool(d["higher_is_better"]), d.get("target"))


def objectives_for(deployment: dict[str, Any]) -> list[Objective]:
    """The spec's SLOs as objectives, then output throughput (unless a throughput SLO is there)."""
    out: list[Objective] = []
    for slo in deployment.get("slos") or []:
        metric, pct, op = slo["metric"], slo.get("percentile"), slo.get("op", "<=")
        name = metric if pct is None else f"{metric}_p{float(pct):g}"
        out.append(Objective(name, metric, None if pct is None else float(pct), op == ">=", float(slo["value"])))
    if not any(o.metric == "throughput" for o in out):
        out.append(Objective("output_tok_s", "throughput", None, True))
    return out


def measure(summary, objectives: list[Objective]) -> dict[str, float | None]:
    """Each objective's value in one benchmark run (a vsc.bench.metrics.BenchSummary)."""
    from vsc.bench.metrics import percentile

    values: dict[str, float | None] = {}
    for o in objectives:
        if o.metric == "throughput":
            values[o.name] = summary.output_throughput if summary.completed else None
        else:
            values[o.name] = percentile(summary.samples.get(o.metric, []), 50.0 if o.percentile is None else o.percentile)
    return values


def combine(runs: list[dict[str, float | None]]) -> dict[str, float | None]:
    """The median of each objective over repeated runs (None if any run lacks it)."""
    out: dict[str, float | None] = {}
    for name in runs[0] if runs else []:
        vals = [r.get(name) for r in runs]
        out[name] = None if any(v is None for v in vals) else statistics.median(vals)
    return out


def slos_met(values: dict[str, float | None], objectives: list[Objective]) -> int:
    return sum(bool(o.met(values.get(o.name))) for o in objectives if o.target is not None)


def score(values: dict[str, float | None], baseline: dict[str, float | None], objectives: list[Objective]) -> float:
    """Geometric mean of oriented ratios to the baseline (> 1: better than the baseline)."""
    logs = []
    for o in objectives:
        v, b = values.get(o.name), baseline.get(o.name)
        if v is None or b is None or v <= 0 or b <= 0:
            if v is None or (v is not None and v <= 0 and o.higher_is_better):
                return 0.0      # unmeasured: the worst possible
            continue
        ratio = v / b if o.higher_is_better else b / v
        logs.append(math.log(ratio))
    return math.exp(sum(logs) / len(logs)) if logs else 1.0


def noise_threshold(runs: list[dict[str, float | None]], objectives: list[Objective]) -> float:
    """Half the relative spread of the score over repeated runs of one plan ((max/min - 1) / 2:
    how far one run strays from the middle), at least MIN_NOISE."""
    if len(runs) < 2:
        return MIN_NOISE
    ref = combine(runs)
    scores = [score(r, ref, objectives) for r in runs]
    scores = [s for s in scores if s > 0]
    if len(scores) < 2:
        return MIN_NOISE
    return max(MIN_NOISE, (max(scores) / min(scores) - 1.0) / 2)


def better(candidate: dict[str, Any], incumbent: dict[str, Any] | None, noise: float) -> bool:
    """Whether a measured candidate record should replace the incumbent record."""
    if incumbent is None:
        return True
    if candidate["slos_met"] != incumbent["slos_met"]:
        return candidate["slos_met"] > incumbent["slos_met"]
    return candidate["score"] > incumbent["score"] * (1.0 + noise)


def pareto_front(records: list[dict[str, Any]], objectives: list[Objective]) -> list[str]:
    """Ids of the measured records no other measured record dominates."""
    measured = [r for r in records if r.get("status") == "ok" and r.get("objectives")]

    def at_least(a, b, o):
        va, vb = a["objectives"].get(o.name), b["objectives"].get(o.name)
        if va is None or vb is None:
            return va is not None
        return va >= vb if o.higher_is_better else va <= vb

    front = []
    for r in measured:
        dominated = any(all(at_least(s, r, o) for o in objectives)
                        and any(not at_least(r, s, o) for o in objectives) for s in measured if s is not r)
        if not dominated:
            front.append(r["id"])
    return front
