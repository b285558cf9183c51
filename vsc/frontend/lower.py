"""Lower a checked DeploymentSpec to the initial ServingModule (before any pass).

The initial plan is deliberately plain: torch kernels, a contiguous KV cache sized from
the memory budget, static batching. Passes make it fast; this makes it correct.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from vsc.errors import ModelError, SpecError
from vsc.frontend.spec import DeploymentSpec
from vsc.ir.hf_import import build_model_graph
from vsc.ir.kernels import best_kernel
from vsc.ir.module import (REQUEST_STAGES, BatchingPolicy, CacheLayout, KernelRef, RequestGraph, Schedule, ServingModule,
                           Stage, Target, symbol_name, walk_ops)
from vsc.ir.route import add_route
from vsc.ir.sizes import format_bytes, kv_bytes_per_token, weight_bytes
from vsc.ir.types import FLOAT_DTYPES, QUANT_DTYPES, spec_origin

DEFAULT_CPU_MEMORY = 2 << 30          # what a CPU deployment may use when the spec does not say
ACTIVATION_RESERVE = 0.10             # share of the memory budget kept for activations and the runtime
DEFAULT_MAX_BATCH = 8


def _plain(obj):
    """Spec dataclasses as plain IR attribute data (paths as strings, no locations)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "loc"}
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def lower_spec(spec: DeploymentSpec, source_text: str | None = None) -> ServingModule:
    """The initial ServingModule for `spec`; errors point at the spec line that caused them."""
    def fail(msg, loc):
        raise SpecError(msg, loc, source_text)

    try:
        model = build_model_graph(spec.model.path, spec.model.dtype, spec_origin(spec.model.loc))
    except ModelError as e:
        fail(e.message, spec.model.loc)
    attrs = model.attrs

    max_context = spec.serve.max_context or attrs["max_position"]
    if max_context > attrs["max_position"]:
        fail(f"max_context {max_context} exceeds the model's max_position_embeddings ({attrs['max_position']})",
             spec.serve.loc or spec.loc)

    t = spec.target
    memory = t.memory_bytes or DEFAULT_CPU_MEMORY
    target_attrs: dict = {"memory": memory}
    if t.kind == "cpu":
        target_attrs["threads"] = t.threads or 0      # 0: all cores
    else:
        target_attrs.update(arch=t.arch, gpus=t.gpus)
    target = Target(t.kind, target_attrs, spec_origin(t.loc))

    cache_dtype = spec.model.dtype
    _quantized_kernels_for_target(model, t.kind, cache_dtype)
    per_token = kv_bytes_per_token(attrs, cache_dtype)
    weights = weight_bytes(model)
    budget = int(memory * (1 - ACTIVATION_RESERVE)) - weights
    if budget < per_token * max_context:
        fail(f"memory {format_bytes(memory)} cannot hold the weights ({format_bytes(weights)}) "
             f"plus one {max_context}-token sequence of KV cache", t.loc or spec.loc)

    arrivals = spec.workload.arrivals
    wanted_batch = arrivals.concurrency if arrivals.kind == "closed" and arrivals.concurrency else DEFAULT_MAX_BATCH
    max_batch = max(1, min(wanted_batch, budget // (per_token * max_context)))
    cache = CacheLayout(layout="contiguous", block_size=max_context, dtype=cache_dtype,
                        capacity_tokens=max_batch * max_context, budget_bytes=budget,
                        prefix_sharing="none", eviction="none", origin=spec_origin(spec.model.loc))
    batching = BatchingPolicy(mode="static", max_batch=max_batch, max_tokens=max(2048, max_context),
                              chunked_prefill=0, order="fcfs", preemption="recompute",
                              origin=spec_origin(arrivals.loc or spec.workload.loc))

    requests = RequestGraph()
    serve_origin = spec_origin(spec.serve.loc or spec.loc)
    for name in REQUEST_STAGES:
        requests.add_stage(Stage(name, admission_attrs(spec) if name == "admit" else {}, serve_origin))
    for src, dst in zip(REQUEST_STAGES, REQUEST_STAGES[1:]):
        requests.add_edge(src, dst)

    deployment = {
        "spec": str(spec.file),
        "max_context": max_context,
        "workload": _plain(spec.workload),
        "slos": _plain(spec.slos),
        "accuracy": _plain(spec.accuracy),
        # overload is on the admit stage; replicas and router on the deployment and the route stage
        "serve": {k: v for k, v in _plain(spec.serve).items() if k not in ("overload", "replicas", "router")},
        "optimize": _plain(spec.optimize),
    }
    module = ServingModule(symbol_name(spec.name), deployment, target, model,
                           Schedule({"graph": "eager"}, spec_origin(spec.loc)), cache, batching, requests,
                           spec_origin(spec.loc))
    if spec.serve.replicas > 1:
        add_route(module, spec.serve.replicas, spec.serve.router or "prefix_affinity", serve_origin,
                  ttft_objective_ms(spec.slos))
    return module


def ttft_objective_ms(slos) -> float | None:
    """The tightest `ttft <=` bound of the spec's slo block, in ms (None without one)."""
    bounds = [s.value * 1000.0 for s in slos if s.metric == "ttft" and s.op in ("<=", "<")]
    return round(min(bounds), 3) if bounds else None


def admission_attrs(spec: DeploymentSpec) -> dict:
    """The `admit` stage's overload policy: the spec's `serve { overload = ... }`, by default "shed"
    when the slo block bounds TTFT (a deployment that states a TTFT objective wants a fast 429 over
    a reply that comes too late) and "queue" otherwise; "shed" carries the bound as ttft_slo_ms."""
    target = ttft_objective_ms(spec.slos)
    policy = spec.serve.overload or ("shed" if target is not None else "queue")
    return {"overload": policy, "ttft_slo_ms": target} if policy == "shed" else {"overload": policy}


def _quantized_kernels_for_target(model, target: str, cache_dtype: str) -> None:
    """Ops reading a block-quantized weight (a GGUF's) start on the target's best kernel for its
    format: on cpu the TVM kernel, since the portable torch one dequantizes the whole matrix
    every call (the LM head of SmolLM2: 113 MB per step) and would make every numeric check slow."""
    for op in walk_ops(model.func.body):
        main = op.operands[1] if len(op.operands) > 1 and op.operands[1].startswith("@") else None
        weight = model.weight(main) if main else None
        if weight is None or weight.type.dtype not in QUANT_DTYPES:
            continue
        dtype = next((t.dtype for t in op.types if t.dtype in FLOAT_DTYPES), None)
        kernel = best_kernel(op.kind, target, "contiguous", cache_dtype, weight.type.dtype, dtype)
        if kernel is not None:
            op.kernel = KernelRef(kernel)
