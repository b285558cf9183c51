"""The scale-out part of a plan: how many replicas serve it and the `route` stage that picks one.

A plan served by several replicas (`vsc serve --ray`) has `replicas` (an int > 1) among its
deployment attributes and a `route` stage between `tokenize` and `admit` in its request graph:

    stage route {policy = "prefix_affinity", prefix_blocks = 4, ttft_slo_ms = 500.0}

`policy` is one of vsc.runtime.enums.ROUTER_POLICIES. prefix_affinity hashes the prompt's first
`prefix_blocks` KV blocks (of the cache's block size) to choose the replica that holds them, and
falls back to the least-loaded replica when the preferred one's queue would miss `ttft_slo_ms`
(absent: the spec has no TTFT objective; then when its batch is full and another's is not).
A plan without the stage runs as one replica (`replicas` absent or 1). The verifier's
`requests.replicas` / `requests.route-*` rules hold these facts; vsc.runtime.router runs them.
"""
from __future__ import annotations

from vsc.ir.module import ServingModule, Stage
from vsc.ir.types import Origin

STAGE = "route"
#: Leading KV blocks of a prompt that prefix_affinity hashes (a system prompt of 4 x 16 tokens and more).
DEFAULT_PREFIX_BLOCKS = 4
#: Tokens per hashed chunk when the plan's cache is contiguous (no KV blocks to align to).
CONTIGUOUS_CHUNK_TOKENS = 16
#: Where the stage sits: it needs the prompt's tokens and decides before admission.
BEFORE, AFTER = "tokenize", "admit"


def replicas(module: ServingModule) -> int:
    """How many replicas serve the plan (1 without the attribute)."""
    n = module.deployment.get("replicas", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) else 1


def add_route(module: ServingModule, n: int, policy: str, origin: Origin, ttft_slo_ms: float | None = None,
              prefix_blocks: int = DEFAULT_PREFIX_BLOCKS) -> Stage:
    """Set the plan's replica count to `n` and splice its route stage onto tokenize -> admit.
    ValueError when the plan already has one or lacks that edge."""
    requests = module.requests
    if requests.stage(STAGE) is not None:
        raise ValueError("the plan already has a route stage (replicate given twice, or a spec with replicas > 1?)")
    if (BEFORE, AFTER) not in requests.edges():
        raise ValueError(f"a route stage goes on the request graph's {BEFORE} -> {AFTER} edge, which it lacks")
    attrs: dict = {"policy": policy}
    if policy == "prefix_affinity":
        attrs["prefix_blocks"] = prefix_blocks
    if ttft_slo_ms is not None:
        attrs["ttft_slo_ms"] = float(ttft_slo_ms)
    stage = Stage(STAGE, attrs, origin)
    requests.insert_between(stage, BEFORE, AFTER)
    module.deployment["replicas"] = n
    return stage


def ttft_objective_ms(deployment: dict) -> float | None:
    """The tightest `ttft <=` bound of the deployment's slos (plain data, as lowering writes them), in ms."""
    bounds = [s.get("value") * 1000.0 for s in deployment.get("slos") or []
              if isinstance(s, dict) and s.get("metric") == "ttft" and s.get("op") in ("<=", "<")
              and isinstance(s.get("value"), (int, float))]
    return round(min(bounds), 3) if bounds else None


def router_config(module: ServingModule) -> dict:
    """The manifest's "router" entry (what the ingress of `vsc serve --ray` reads): {} for one replica."""
    stage = module.requests.stage(STAGE)
    if stage is None:
        return {}
    a = stage.attrs
    block = module.cache.block_size if module.cache.layout == "paged" else CONTIGUOUS_CHUNK_TOKENS
    out = {"replicas": replicas(module), "policy": a["policy"], "block_tokens": block,
           "prefix_blocks": a.get("prefix_blocks", DEFAULT_PREFIX_BLOCKS), "max_batch": module.batching.max_batch}
    if a.get("ttft_slo_ms") is not None:
        out["ttft_slo_ms"] = float(a["ttft_slo_ms"])
    return out
