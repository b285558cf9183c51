"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed).

- `plot_latency_cdfs(summaries, path)`: one figure, four panels (TTFT, TPOT, ITL, E2E), an
  empirical CDF per engine, latency in ms on a log axis.
- `plot_throughput_vs_rate(sweep, path)`: for a sweep of offered Poisson rates, achieved
  request throughput (solid) and goodput (dashed) against the offered rate with the y = x
  line, and output tok/s against the offered rate.

Both take `BenchSummary`s (their `samples`), keyed by engine name.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vsc.bench.metrics import LATENCIES, BenchSummary

_TITLES = {"ttft": "time to first token", "tpot": "time per output token", "itl": "inter-token latency",
           "e2e": "end-to-end latency"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(summaries: dict[str, BenchSummary], path: str | Path, title: str | None = None) -> Path:
    """Four CDF panels (TTFT, TPOT, ITL, E2E), one line per engine; writes a PNG to `path`."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    for ax, metric in zip(axes.flat, LATENCIES):
        drawn = False
        for name, s in summaries.items():
            values = np.sort(np.asarray(s.samples.get(metric, []), dtype=np.float64)) * 1000.0
            values = values[values > 0]
            if values.size == 0:
                continue
            y = np.arange(1, values.size + 1) / values.size
            p50 = float(np.percentile(values, 50))
            ax.step(values, y, where="post", label=f"{name} (p50 {p50:.3g} ms)")
            drawn = True
        ax.set_title(f"{metric.upper()}: {_TITLES[metric]}")
        ax.set_xlabel("ms (log scale)")
        ax.set_ylabel("fraction of " + ("gaps" if metric == "itl" else "requests"))
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        for q in (0.5, 0.9, 0.99):
            ax.axhline(q, color="grey", lw=0.6, ls=":")
        if drawn:
            _log_ms_axis(ax)
            ax.legend(fontsize=8, loc="lower right")
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
    first = next(iter(summaries.values()), None)
    fig.suptitle(title or (f"latency CDFs: {first.workload}, {first.arrival}" if first else "latency CDFs"))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_ms_axis(ax) -> None:
    """Log x axis with ticks at 1, 2, 5 x 10^k labelled as plain numbers (0.5, 2, 20, ...)."""
    from matplotlib import ticker

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def plot_throughput_vs_rate(sweep: dict[str, list[tuple[float, BenchSummary]]], path: str | Path,
                            title: str | None = None) -> Path:
    """Achieved req/s and goodput, and output tok/s, against the offered rate, one line per engine."""
    plt = _pyplot()
    fig, (ax_req, ax_tok) = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    top = 0.0
    for name, points in sweep.items():
        points = sorted(points, key=lambda p: p[0])
        rates = [p[0] for p in points]
        top = max(top, max(rates, default=0.0))
        line, = ax_req.plot(rates, [p[1].request_throughput for p in points], marker="o", label=f"{name} throughput")
        if any(p[1].goodput is not None for p in points):
            ax_req.plot(rates, [p[1].goodput or 0.0 for p in points], marker="x", ls="--", color=line.get_color(),
                        label=f"{name} goodput")
        ax_tok.plot(rates, [p[1].output_throughput for p in points], marker="o", label=name)
    ax_req.plot([0, top], [0, top], color="grey", lw=0.8, ls=":", label="offered")
    ax_req.set_xlabel("offered rate (req/s)")
    ax_req.set_ylabel("achieved (req/s)")
    ax_req.set_title("request throughput and goodput")
    ax_tok.set_xlabel("offered rate (req/s)")
    ax_tok.set_ylabel("output tokens/s")
    ax_tok.set_title("output token throughput")
    for ax in (ax_req, ax_tok):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
