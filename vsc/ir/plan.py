"""Queries over a plan that the passes and the backends share.

A pass writes its decision into the IR (a request-graph stage's attributes, a cache field);
the backends read it back from the IR as the runtime's engine settings, or derive a plan from
it (the draft model's). Each reader lives here, below both stages, so a backend never imports
a pass module to read what the pass wrote (the import-linter contracts in pyproject.toml
keep it so).
"""
from __future__ import annotations

from pathlib import Path

from vsc.ir.kernels import default_kernel
from vsc.ir.module import (REQUEST_STAGES, CacheLayout, KernelRef, RequestGraph, Schedule, ServingModule, Stage,
                           symbol_name, walk_ops)
from vsc.ir.sizes import kv_bytes_per_token
from vsc.ir.types import pass_origin
from vsc.runtime.policy import queue_bound

#: The request-graph stage the prefix-cache pass adds.
PREFIX_LOOKUP_STAGE = "prefix_lookup"


def plan_prefix_cache(module: ServingModule) -> dict:
    """The runtime EngineConfig fields of a plan's prefix cache: {} without one."""
    if module.cache.prefix_sharing == "none":
        return {}
    stage = module.requests.stage(PREFIX_LOOKUP_STAGE)
    capacity = int(stage.attrs.get("capacity", 0)) if stage is not None else 0
    return {"prefix_cache": module.cache.prefix_sharing, "prefix_cache_capacity": capacity}


def chunked_prefill_engine_config(module: ServingModule) -> dict:
    """The engine's prefill_tpot_ms when the plan's prefill stage carries a TPOT objective
    (chunked-prefill{slo=true}), else {}."""
    prefill = module.requests.stage("prefill")
    target = prefill.attrs.get("tpot_slo_ms") if prefill is not None else None
    return {"prefill_tpot_ms": float(target)} if target else {}


def plan_json_schema(module: ServingModule) -> str | None:
    """The schema text of the plan's `constrain` stage (None: the plan is unconstrained)."""
    stage = module.requests.stage("constrain")
    if stage is None:
        return None
    return stage.attrs.get("schema")


def plan_speculation(module: ServingModule) -> dict | None:
    """The `draft` stage's attributes (method, k, ngram or model), or None without speculation."""
    stage = module.requests.stage("draft")
    return None if stage is None else dict(stage.attrs)


def speculative_engine_config(module: ServingModule) -> dict:
    """The runtime EngineConfig fields of the plan's speculation ({} without any)."""
    spec = plan_speculation(module)
    if spec is None:
        return {}
    out = {"speculative_method": spec["method"], "speculative_k": spec["k"]}
    if "ngram" in spec:
        out["speculative_ngram"] = spec["ngram"]
    if spec["method"] == "draft":
        out["draft_model"] = spec["model"]
    return out


def draft_plan(module: ServingModule) -> ServingModule | None:
    """The draft model's own plan (its default IR on the target's paged cache geometry), for
    the backend to lower into the draft runner; None unless the plan drafts with a model."""
    from vsc.ir.hf_import import build_model_graph     # the importer, only for plans that draft with a model

    spec = plan_speculation(module)
    if spec is None or spec.get("method") != "draft":
        return None
    origin = pass_origin("speculative")
    dtype = module.model.attrs.get("dtype", "f32")
    graph = build_model_graph(Path(spec["model"]), dtype, origin)
    for op in walk_ops(graph.func.body):
        if op.kind == "attention":
            op.kernel = KernelRef(default_kernel("attention", "paged", dtype))
    c = module.cache
    cache = CacheLayout(layout="paged", block_size=c.block_size, dtype=dtype, capacity_tokens=c.capacity_tokens,
                        budget_bytes=c.capacity_tokens * kv_bytes_per_token(graph.attrs, dtype), origin=origin)
    requests = RequestGraph()
    for name in REQUEST_STAGES:
        requests.add_stage(Stage(name, {}, origin))
    for src, dst in zip(REQUEST_STAGES, REQUEST_STAGES[1:]):
        requests.add_edge(src, dst)
    return ServingModule(symbol_name(f"{module.name}_draft"), dict(module.deployment), module.target,
                         graph, Schedule({"graph": "eager"}, origin), cache, module.batching, requests, origin)


def engine_config(module: ServingModule) -> dict:
    """The runtime EngineConfig fields for a plan (the manifest's "engine" entry); the
    accuracy check builds its engine from the same dict, so it runs what the server runs."""
    return {
        "max_context": module.deployment["max_context"],
        "mode": module.batching.mode,
        "max_batch": module.batching.max_batch,
        "max_tokens": module.batching.max_tokens,
        "chunked_prefill": module.batching.chunked_prefill,
        "order": module.batching.order,
        "preemption": module.batching.preemption,
        "max_waiting": queue_bound(module.batching.max_batch),   # the admission policy's (vsc.runtime.policy)
        **plan_prefix_cache(module),     # prefix_cache, prefix_cache_capacity (prefix-cache pass); {} if none
        **speculative_engine_config(module),   # speculative_* and draft_model (speculative pass); {} if none
        **chunked_prefill_engine_config(module),   # prefill_tpot_ms (chunked-prefill{slo=true}); {} if none
    }


def admission_engine_config(module: ServingModule) -> dict:
    """The admit stage's overload policy as EngineConfig fields: {"overload": "queue"}, or "shed"
    with its TTFT objective; {} for a plan from before the stage carried one (the engine queues).
    Kept out of `engine_config`: the accuracy check's engine run must serve every probe."""
    admit = module.requests.stage("admit")
    policy = admit.attrs.get("overload") if admit is not None else None
    if policy is None:
        return {}
    if policy == "shed":
        return {"overload": policy, "ttft_slo_ms": float(admit.attrs["ttft_slo_ms"])}
    return {"overload": policy}


def json_mode_config(module: ServingModule) -> dict:
    """The manifest engine entry's json mode: {"json_schema": text} when the plan has a
    constrain stage (the json-mode pass), else {}. Kept out of `engine_config`, whose
    unconstrained engine run the accuracy check compares with the unmasked reference;
    vsc.backends.torch.constrained_check runs the constrained one."""
    schema = plan_json_schema(module)
    return {} if schema is None else {"json_schema": schema}
