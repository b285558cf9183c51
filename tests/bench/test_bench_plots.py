"""Plots: each writes a PNG that decodes, with the panels' content drawn."""
from __future__ import annotations

import copy

from PIL import Image

from vsc.bench.loadgen import RequestRecord, RunResult
from vsc.bench.metrics import summarize
from vsc.bench.plots import plot_latency_cdfs, plot_throughput_vs_rate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def summary(scale: float = 1.0, engine: str = "vsc"):
    records = [RequestRecord(i, 10, 8, 0.1 * i, [0.1 * i + scale * (0.02 + 0.001 * i + 0.01 * k) for k in range(8)],
                             "x" * 8, 0.1 * i + scale * (0.1 + 0.001 * i), 8, "length", True, None, 200)
               for i in range(20)]
    return summarize(RunResult(engine, "http://127.0.0.1:1", "m", "chat", "poisson(4 req/s)", records, 2.5),
                     {"ttft": 0.05})


def check_png(path, min_size):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        assert len(im.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20   # not a blank canvas


def test_latency_cdfs_png(tmp_path):
    out = plot_latency_cdfs({"vsc": summary(), "peer": summary(1.8, "peer")}, tmp_path / "cdf.png")
    check_png(out, (1000, 700))


def test_latency_cdfs_with_an_empty_engine(tmp_path):
    empty = copy.deepcopy(summary())
    empty.samples = {}
    check_png(plot_latency_cdfs({"vsc": summary(), "dead": empty}, tmp_path / "cdf.png"), (1000, 700))


def test_throughput_vs_rate_png(tmp_path):
    points = []
    for rate in (1.0, 2.0, 4.0):
        s = summary()
        s.request_throughput, s.goodput, s.output_throughput = rate * 0.9, rate * 0.8, rate * 60
        points.append((rate, s))
    out = plot_throughput_vs_rate({"vsc": points, "peer": points[:2]}, tmp_path / "sweep.png", title="sweep")
    check_png(out, (1000, 400))
