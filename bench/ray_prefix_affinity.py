"""Two Ray Serve replicas of one compiled folder: prefix_affinity against round_robin (issue 18).

    PYTHONPATH=. python bench/ray_prefix_affinity.py SERVER_DIR [N=96] [--cpus 2]

SERVER_DIR is a folder compiled with `serve { replicas = 2 }` (examples/agent-fleet.vs). For each
router policy the script deploys the folder's replicas afresh on a local Ray cluster (empty prefix
caches), serves vsc's ingress in this process with that policy (the only thing changed between runs:
`--ray` reads it from the plan), and offers two shared-prefix workloads, each from the spec's lengths:

- one-prefix: the spec's workload, one system prefix shared by its `share` of the requests;
- 8-prefixes: eight different system prefixes (eight agents or tenants), every request carrying one,
  in a seeded random order: more cached prefix than one replica's prefix cache keeps (the plan's
  prefix-cache capacity) but not more than two hold when each keeps only its own.

It prints one JSON object: per policy and workload, the prefix-cache hit rate (hit tokens / looked-up
tokens, summed over the replicas, from the ingress's /metrics), the client's TTFT p50 / p99 and
throughput, and the router's decisions by reason.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

import httpx2 as httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from vsc.bench.cli import read_server_folder
from vsc.bench.loadgen import run_workload
from vsc.bench.metrics import summarize
from vsc.bench.workloads import LengthDist, build_workload, closed
from vsc.runtime import ray_serve
from vsc.runtime.router import RouterConfig
from vsc.runtime.serve import start_in_thread, stop_server

POLICIES = ("prefix_affinity", "round_robin")


def workloads(manifest: dict, deployment: dict, n: int) -> dict:
    model = Path(manifest["model"]["path"])
    wl = deployment["workload"]
    shared = wl["shared_prefix"]
    opts = dict(max_context=manifest["serve"]["max_context"], prompt_tokens=LengthDist.from_ir(wl["prompt_tokens"]),
                output_tokens=LengthDist.from_ir(wl["output_tokens"]), prefix_tokens=shared["tokens"])
    arrival = closed(wl["arrivals"]["concurrency"])
    one = build_workload("shared-prefix", model, n, seed=0, arrival=arrival, share=shared["share"], **opts)
    parts = [build_workload("shared-prefix", model, max(1, n // 8), seed=100 + k, arrival=arrival, share=1.0, **opts)
             for k in range(8)]
    reqs = [r for w in parts for r in w.requests]
    order = np.random.default_rng(7).permutation(len(reqs))
    eight = dataclasses.replace(parts[0], name="shared-prefix-8", requests=[reqs[i] for i in order],
                                description=f"8 prefixes x {len(parts[0].requests)} requests, {parts[0].description}")
    return {"one-prefix": one, "8-prefixes": eight}


def replica_counters(base: str) -> dict[str, dict[str, float]]:
    text = httpx.get(base + "/metrics", timeout=60).text
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("vsc_prefix_cache_hit_tokens", "vsc_prefix_cache_query_tokens", "vsc_router_requests"):
            for s in family.samples:
                if s.name.endswith("_total"):
                    key = family.name + ("/" + s.labels["reason"] if "reason" in s.labels else "")
                    out.setdefault(key, {})[s.labels["replica"]] = s.value
    return out


def one_run(folder: Path, manifest: dict, policy: str, wls: dict) -> dict:
    handles, names = ray_serve.deploy_replicas(folder, manifest, replica_cpus=1)
    try:
        m = dict(manifest, router={**manifest["router"], "policy": policy})
        app, replicas = ray_serve.build_ingress(folder, m, handles)
        assert replicas.router.config == RouterConfig(**m["router"])
        server, thread, port = start_in_thread(app, timeout=30)
        base = f"http://127.0.0.1:{port}"
        out = {}
        try:
            for name, wl in wls.items():
                before = replica_counters(base)
                t0 = time.perf_counter()
                run = asyncio.run(run_workload(wl, base, deadline=900))
                wall = time.perf_counter() - t0
                after = replica_counters(base)
                delta = {k: {r: v - before.get(k, {}).get(r, 0.0) for r, v in per.items()} for k, per in after.items()}
                hits = sum(delta["vsc_prefix_cache_hit_tokens"].values())
                queries = sum(delta["vsc_prefix_cache_query_tokens"].values())
                s = summarize(run)
                out[name] = {
                    "requests": len(wl), "completed": s.completed, "failed": s.failed, "wall_s": round(wall, 2),
                    "prefix_hit_rate": round(hits / queries, 4) if queries else None,
                    "hit_tokens_by_replica": delta["vsc_prefix_cache_hit_tokens"],
                    "ttft_p50_ms": round(1000 * s.ttft.p50, 1), "ttft_p99_ms": round(1000 * s.ttft.p99, 1),
                    "output_tok_s": round(s.output_throughput, 1),
                    "routed": {k.split("/", 1)[1]: v for k, v in delta.items() if k.startswith("vsc_router_requests/")
                               and any(v.values())},
                }
        finally:
            stop_server(server, thread)
            replicas.stop_polling()
        return out
    finally:
        ray_serve.shutdown_replicas(names)


def main(folder: Path, n: int, cpus: int) -> dict:
    manifest, deployment = read_server_folder(folder)
    if (manifest.get("router") or {}).get("replicas", 1) < 2:
        raise SystemExit(f"{folder}: compile a spec with serve {{ replicas = 2 }} (examples/agent-fleet.vs)")
    wls = workloads(manifest, deployment, n)
    ray_serve.connect(num_cpus=cpus)
    try:
        results = {policy: one_run(folder, manifest, policy, wls) for policy in POLICIES}
    finally:
        import ray
        from ray import serve
        serve.shutdown()
        ray.shutdown()
    return {"folder": str(folder), "replicas": manifest["router"]["replicas"], "cpus": cpus,
            "workloads": {k: w.description for k, w in wls.items()}, "results": results}


if __name__ == "__main__":
    args = sys.argv[1:]
    cpus = 2
    if "--cpus" in args:
        i = args.index("--cpus")
        cpus = int(args[i + 1])
        del args[i:i + 2]
    print(json.dumps(main(Path(args[0]), int(args[1]) if len(args) > 1 else 96, cpus), indent=1))
