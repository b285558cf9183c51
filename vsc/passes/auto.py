"""The pipelines vsc chooses itself: what `optimize auto` runs for a deployment.

Policy, not syntax: the pass lists and thresholds below are measured choices
(bench/RESULTS.md); `vsc.passes.pipeline` only reads and prints pipeline text.
"""
from __future__ import annotations

# What `optimize auto` runs until `vsc search` chooses per deployment: the exact rewrites
# every plan benefits from (prefix-cache costs a lookup per admission when nothing is shared).
# select-kernels gives a cpu plan TVM's paged attention (reads the cache in place), which beats
# cascade-attention's torch path even behind a shared prefix (SmolLM2, 16 sequences, 768-token
# prefix: decode step 103 -> 80 ms, bench/RESULTS.md), so cascade-attention is no longer here.
# silu-mul and add-rmsnorm fused: one pass over a prompt's activations instead of three (SmolLM2
# code-edit, 16 concurrent: 4-7% less wall time, bench/RESULTS.md).
DEFAULT_PIPELINE = ("fuse-qkv,fuse-gate-up,fold-rope-tables,paged-kv{block=16},continuous-batching{max_batch=16,max_tokens=2048},"
                    "prefix-cache{policy=radix},pack-linear-weights,intra-op-threads,fuse-silu-mul,fuse-add-rmsnorm,"
                    "select-kernels")

#: What `optimize auto` adds for a workload kind (the spec's `workload { kind = ... }`), after
#: prefix-cache: the mechanisms that pay only when requests are like that. predicted_edit:
#: requests carry their expected answer (OpenAI `prediction`), drafted from in runs of up to 16.
WORKLOAD_PASSES = {"predicted_edit": "speculative{method=prediction,k=16}"}
#: A shared prefix at least this long (`workload { shared_prefix { tokens = N } }`) gets cascade
#: attention: SmolLM2 fp32, 16 sequences behind 4096 shared tokens, decode step 131-137 -> 93-100 ms
#: (bench/RESULTS.md); behind 768 tokens it measured within noise, so shorter prefixes go without.
CASCADE_PREFIX_TOKENS = 2048


def auto_pipeline(deployment: dict) -> str:
    """The pipeline `optimize auto` means for a deployment: DEFAULT_PIPELINE, plus what its
    workload pays for (WORKLOAD_PASSES by kind; cascade-attention behind a long shared prefix)."""
    workload = (deployment or {}).get("workload") or {}
    extra = [WORKLOAD_PASSES[workload["kind"]]] if workload.get("kind") in WORKLOAD_PASSES else []
    if int((workload.get("shared_prefix") or {}).get("tokens") or 0) >= CASCADE_PREFIX_TOKENS:
        extra.insert(0, "cascade-attention")
    if not extra:
        return DEFAULT_PIPELINE
    anchor = "prefix-cache{policy=radix}"
    return DEFAULT_PIPELINE.replace(anchor, ",".join([anchor, *extra]), 1)
