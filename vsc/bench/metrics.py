"""Serving metrics of a run, defined as `vllm bench serve` defines them.

Per successful request (times from the load client's records):

    TTFT  = time of the first chunk carrying text - send time
    E2E   = time the stream ended ([DONE]) - send time   (vLLM: its last chunk with choices;
            the vsc server sends the final chunk, the usage chunk and [DONE] in one write)
    TPOT  = (E2E - TTFT) / (output_tokens - 1)          (only requests with > 1 output token)
    ITL   = every gap between consecutive text chunks   (pooled over all requests)

Output tokens: usage.completion_tokens when the server sent it, else the number of text
chunks (`BenchSummary.output_token_source` says which: "usage", "chunks" or "mixed").

Over the run (duration = start of the benchmark -> the last request ended):

    request throughput      = completed / duration
    output token throughput = sum(output tokens of completed requests) / duration
    total token throughput  = (sum(prompt tokens) + sum(output tokens)) / duration, completed only
    goodput                 = completed requests meeting every per-request SLO / duration

Goodput SLOs are per-request thresholds in seconds, like vLLM's --goodput:
{"ttft": 0.2, "tpot": 0.025, "e2e": 4.0} (a request with one output token has no TPOT and
meets a TPOT SLO, as in vLLM). A plan's SLOs ({metric, percentile, op, value}) are checked
separately by `check_slos`: the run's percentile of the metric against the value.

Statistics of each latency: mean, std, median (= p50), p90, p95, p99, min, max (numpy's
linear-interpolation percentiles, as vLLM). Times are kept in seconds; tables show ms.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from vsc.bench.loadgen import RequestRecord, RunResult

LATENCIES = ("ttft", "tpot", "itl", "e2e")
GOODPUT_METRICS = ("ttft", "tpot", "e2e")
PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestMetrics:
    """The latencies of one successful request (seconds)."""

    ttft: float
    e2e: float
    tpot: float | None          # None when the request produced at most one token
    itls: list[float]
    output_tokens: int
    tokens_from_usage: bool


def request_metrics(rec: RequestRecord) -> RequestMetrics | None:
    """Metrics of one record; None for a failed request."""
    if not rec.success or not rec.chunk_times or rec.end_time is None:
        return None
    ttft = rec.chunk_times[0] - rec.send_time
    e2e = rec.end_time - rec.send_time
    from_usage = rec.completion_tokens is not None
    n = rec.completion_tokens if from_usage else len(rec.chunk_times)
    tpot = (e2e - ttft) / (n - 1) if n > 1 else None
    itls = [b - a for a, b in zip(rec.chunk_times, rec.chunk_times[1:])]
    return RequestMetrics(ttft, e2e, tpot, itls, n, from_usage)


@dataclass
class LatencyStats:
    """Statistics of one latency over the run (seconds); None where there were no samples."""

    n: int = 0
    mean: float | None = None
    std: float | None = None
    median: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    min: float | None = None
    max: float | None = None

    @staticmethod
    def of(values: list[float]) -> "LatencyStats":
        if not values:
            return LatencyStats()
        a = np.asarray(values, dtype=np.float64)
        p50, p90, p95, p99 = (float(x) for x in np.percentile(a, PERCENTILES))
        return LatencyStats(len(values), float(a.mean()), float(a.std()), p50, p50, p90, p95, p99,
                            float(a.min()), float(a.max()))


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


@dataclass
class SLOResult:
    """One plan SLO checked against a run: `metric pNN op value`, measured, met."""

    metric: str
    percentile: float | None
    op: str
    value: float
    measured: float | None
    met: bool

    def describe(self) -> str:
        unit = "tok/s" if self.metric == "throughput" else "ms"
        scale = 1.0 if self.metric == "throughput" else 1000.0
        pct = f" p{self.percentile:g}" if self.percentile is not None else ""
        got = "n/a" if self.measured is None else f"{self.measured * scale:.1f} {unit}"
        return f"{self.metric}{pct} {self.op} {self.value * scale:g} {unit}: {got}  {'met' if self.met else 'MISSED'}"


@dataclass
class BenchSummary:
    engine: str
    workload: str
    arrival: str
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    output_token_source: str            # "usage" | "chunks" | "mixed" | "none"
    request_throughput: float           # req/s
    output_throughput: float            # tok/s
    total_token_throughput: float       # tok/s
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    goodput: float | None = None        # req/s meeting every goodput SLO (None: no SLOs given)
    goodput_slos: dict[str, float] = field(default_factory=dict)
    good_requests: int | None = None
    slo_results: list[SLOResult] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)   # error text (first 80 chars) -> count
    offered: int = 0
    deadline_hit: bool = False
    model: str = ""
    workload_fingerprint: str = ""
    workload_description: str = ""
    #: per-request samples in seconds, for plots: ttft, tpot, e2e (one per request), itl (pooled)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not samples:
            d.pop("samples")
        return d

    def to_json(self, samples: bool = True, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(samples), indent=indent)

    @staticmethod
    def from_dict(d: dict) -> "BenchSummary":
        """From `to_dict()` output; keys this version does not know are ignored."""
        known = {f.name for f in fields(BenchSummary)}
        d = {k: v for k, v in d.items() if k in known}
        for k in LATENCIES:
            d[k] = LatencyStats(**d[k])
        d["slo_results"] = [SLOResult(**s) for s in d.get("slo_results", [])]
        return BenchSummary(**d)

    @staticmethod
    def from_json(text: str) -> "BenchSummary":
        return BenchSummary.from_dict(json.loads(text))


def goodput_slos_from_plan(slos: list[dict]) -> dict[str, float]:
    """Per-request thresholds from a plan's SLO list: each latency SLO's value (ttft, tpot, e2e).

    An `itl` SLO has no per-request form in vLLM's goodput and is left to `check_slos`.
    With two SLOs on one metric the tighter value wins.
    """
    out: dict[str, float] = {}
    for s in slos:
        m = s.get("metric")
        if m in GOODPUT_METRICS and s.get("op", "<=") == "<=":
            out[m] = min(out.get(m, math.inf), float(s["value"]))
    return out


def _meets(m: RequestMetrics, slos: dict[str, float]) -> bool:
    for k, v in slos.items():
        if k == "ttft" and m.ttft > v:
            return False
        if k == "e2e" and m.e2e > v:
            return False
        if k == "tpot" and m.tpot is not None and m.tpot > v:
            return False
    return True


def summarize(run: RunResult, goodput_slos: dict[str, float] | None = None,
              plan_slos: list[dict] | None = None) -> BenchSummary:
    """The metrics of one run; goodput under `goodput_slos`, and `plan_slos` checked."""
    if goodput_slos:
        unknown = set(goodput_slos) - set(GOODPUT_METRICS)
        if unknown:
            raise ValueError(f"goodput SLOs on {sorted(unknown)}: only {', '.join(GOODPUT_METRICS)} are per-request")
    per = [(rec, request_metrics(rec)) for rec in run.records]
    ok = [(rec, m) for rec, m in per if m is not None]
    failed = len(per) - len(ok)
    errors: dict[str, int] = {}
    for rec, m in per:
        if m is None:
            key = (rec.error or "failed")[:80]
            errors[key] = errors.get(key, 0) + 1
    dur = run.duration if run.duration > 0 else math.nan
    out_tokens = sum(m.output_tokens for _, m in ok)
    in_tokens = sum(rec.prompt_tokens for rec, _ in ok)
    sources = {m.tokens_from_usage for _, m in ok}
    source = "none" if not sources else "mixed" if len(sources) == 2 else "usage" if True in sources else "chunks"
    ttfts = [m.ttft for _, m in ok]
    tpots = [m.tpot for _, m in ok if m.tpot is not None]
    itls = [x for _, m in ok for x in m.itls]
    e2es = [m.e2e for _, m in ok]
    good = None
    goodput = None
    if goodput_slos:
        good = sum(1 for _, m in ok if _meets(m, goodput_slos))
        goodput = _rate(good, dur)
    s = BenchSummary(
        engine=run.engine, workload=run.workload, arrival=run.arrival, completed=len(ok), failed=failed,
        duration_s=run.duration, total_input_tokens=in_tokens, total_output_tokens=out_tokens,
        output_token_source=source, request_throughput=_rate(len(ok), dur),
        output_throughput=_rate(out_tokens, dur), total_token_throughput=_rate(in_tokens + out_tokens, dur),
        ttft=LatencyStats.of(ttfts), tpot=LatencyStats.of(tpots), itl=LatencyStats.of(itls),
        e2e=LatencyStats.of(e2es), goodput=goodput, goodput_slos=dict(goodput_slos or {}), good_requests=good,
        errors=errors, offered=run.offered, deadline_hit=run.deadline_hit, model=run.model,
        workload_fingerprint=run.workload_fingerprint, workload_description=run.workload_description,
        samples={"ttft": ttfts, "tpot": tpots, "itl": itls, "e2e": e2es})
    if plan_slos:
        s.slo_results = check_slos(s, plan_slos)
    return s


def _rate(count: float, duration: float) -> float:
    return 0.0 if not duration > 0 else count / duration


def check_slos(summary: BenchSummary, slos: list[dict]) -> list[SLOResult]:
    """Each plan SLO against the run: latency `metric pNN <= value` (s), `throughput >= value` (output tok/s)."""
    out = []
    for s in slos:
        metric, pct, op, value = s["metric"], s.get("percentile"), s.get("op", "<="), float(s["value"])
        if metric == "throughput":
            measured = summary.output_throughput if summary.completed else None
        else:
            measured = percentile(summary.samples.get(metric, []), 50.0 if pct is None else float(pct))
        met = measured is not None and (measured <= value if op == "<=" else measured >= value)
        out.append(SLOResult(metric, None if pct is None else float(pct), op, value, measured, met))
    return out


# --------------------------------------------------------------------------- the side-by-side table

# (label, getter, kind): kind "ms" scales seconds to milliseconds, "f" plain float, "d" integer
_ROWS: list[tuple[str, Any, str]] = [
    ("completed requests", lambda s: s.completed, "d"),
    ("failed requests", lambda s: s.failed, "d"),
    ("duration (s)", lambda s: s.duration_s, "f"),
    ("input tokens", lambda s: s.total_input_tokens, "d"),
    ("output tokens", lambda s: s.total_output_tokens, "d"),
    ("request throughput (req/s)", lambda s: s.request_throughput, "f"),
    ("output throughput (tok/s)", lambda s: s.output_throughput, "f"),
    ("total throughput (tok/s)", lambda s: s.total_token_throughput, "f"),
    ("goodput (req/s)", lambda s: s.goodput, "f"),
]
for _name in LATENCIES:
    for _stat in ("mean", "median", "p90", "p99"):
        _ROWS.append((f"{_name.upper()} {_stat} (ms)", (lambda n, st: lambda s: getattr(getattr(s, n), st))(_name, _stat),
                      "ms"))


def _fmt(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if kind == "d":
        return str(int(v))
    if kind == "ms":
        v = v * 1000.0
    return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"


def format_table(summaries: dict[str, BenchSummary], reference: str = "vsc") -> str:
    """One text table: a column per engine, and for each other engine its ratio to `reference`.

    ratio = engine's value / reference's value (for latencies < 1 means the engine is faster,
    for throughputs > 1 means it serves more). No reference column when it is absent.
    """
    names = list(summaries)
    ref = summaries.get(reference)
    header = ["metric"] + names + ([f"{n}/{reference}" for n in names if n != reference] if ref else [])
    rows = [header]
    for label, get, kind in _ROWS:
        vals = [get(summaries[n]) for n in names]
        row = [label] + [_fmt(v, kind) for v in vals]
        if ref is not None:
            rv = get(ref)
            for n, v in zip(names, vals):
                if n == reference:
                    continue
                row.append(f"{v / rv:.2f}x" if v is not None and rv not in (None, 0) and not math.isnan(rv)
                           else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    first = next(iter(summaries.values()), None)
    if first is not None:
        lines.insert(0, f"workload {first.workload}, {first.arrival}"
                        + (f", goodput SLOs {_slo_text(first.goodput_slos)}" if first.goodput_slos else ""))
        srcs = {n: s.output_token_source for n, s in summaries.items() if s.output_token_source != "usage"}
        if srcs:
            lines.append("output tokens counted from stream chunks (no usage) for: "
                         + ", ".join(f"{n} ({v})" for n, v in srcs.items()))
    return "\n".join(lines)


def _slo_text(slos: dict[str, float]) -> str:
    return ", ".join(f"{k} <= {v * 1000:g} ms" for k, v in slos.items())


def format_slos(summary: BenchSummary) -> str:
    """One line per checked plan SLO."""
    return "\n".join(r.describe() for r in summary.slo_results)
