"""A request burst against a compiled server: TTFT of the served requests, 429s, /metrics.

    python bench/overload_burst.py SERVER_DIR [N=300] [vsc serve flags, e.g. --overload queue]

Starts the folder with `vsc serve` (bench's ServerProcess), warms it up with 16 requests of the
spec's workload at concurrency 4 (the engine measures its steps: before that, overload = shed
admits everything), then sends N requests of the spec's chat workload at once (poisson(inf)) and
prints one JSON object: client-side TTFT percentiles of the served requests, HTTP status counts,
the burst's refusals by reason and the server's own TTFT histogram (cumulative buckets) from
/metrics, both diffed over the burst. Issue 15 item 10's figures (bench/RESULTS.md) come from it.
"""
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx2 as httpx

from vsc.bench.cli import ServerProcess, read_server_folder
from vsc.bench.loadgen import run_workload
from vsc.bench.workloads import LengthDist, build_workload, closed, poisson


BUCKETS = ("0.1", "0.2", "0.3", "0.5", "1.0", "2.5", "5.0", "10.0", "20.0", "+Inf")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def samples(text: str, prefix: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def main(folder: Path, n: int, serve_args: tuple[str, ...]) -> dict:
    manifest, deployment = read_server_folder(folder)
    model = Path(manifest["model"]["path"])
    wl = deployment["workload"]
    opts = dict(max_context=manifest["serve"]["max_context"], prompt_tokens=LengthDist.from_ir(wl["prompt_tokens"]),
                output_tokens=LengthDist.from_ir(wl["output_tokens"]))
    warm = build_workload("chat", model, 16, seed=1, arrival=closed(4), **opts)
    burst = build_workload("chat", model, n, seed=0, arrival=poisson(float("inf")), **opts)
    with ServerProcess(folder, serve_args=serve_args) as server:
        asyncio.run(run_workload(warm, server.base_url))            # the engine measures its steps
        before = httpx.get(server.base_url + "/metrics").text
        t0 = time.perf_counter()
        run = asyncio.run(run_workload(burst, server.base_url, deadline=600))
        wall = time.perf_counter() - t0
        after = httpx.get(server.base_url + "/metrics").text
    served = [r for r in run.records if r.success and r.chunk_times]
    ttft = [r.chunk_times[0] - r.send_time for r in served]
    statuses: dict[str, int] = {}
    for r in run.records:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    b0, b1 = (samples(t, "vsc_time_to_first_token_seconds_bucket") for t in (before, after))
    r0, r1 = (samples(t, "vsc_requests_rejected_total") for t in (before, after))
    server_ttft = {k.split('le="')[1].rstrip('"}'): b1[k] - b0.get(k, 0) for k in b1}
    return {"server": str(folder), "overload": manifest["engine"].get("overload"), "serve_args": serve_args,
            "requests": n, "served": len(served), "status_counts": statuses,
            **{f"client_ttft_p{q}_ms": round(percentile(ttft, q) * 1000, 1) for q in (50, 90, 99)},
            "burst_wall_s": round(wall, 2),
            "rejected_in_metrics": {k: r1[k] - r0.get(k, 0) for k in r1},
            "server_ttft_cumulative_buckets_s": {k: v for k, v in server_ttft.items() if k in BUCKETS}}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 300, tuple(sys.argv[3:])),
                     indent=1))
