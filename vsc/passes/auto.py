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
#: A spec whose accuracy bar is a logits tolerance at least this loose gets bf16 linear weights
#: (pack-linear-weights{dtype=bf16}): SmolLM2-135M fp32, 16 streams, 1.15-1.25x output tok/s and
#: 0.68-0.73x TTFT, max |dlogit| 0.44 against the fp32 reference (bench/RESULTS.md, session 17),
#: so a bar of 1.0 leaves twice the measured error. Under a tighter bar the weights stay f32.
BF16_WEIGHTS_TOLERANCE = 1.0


def auto_pipeline(deployment: dict) -> str:
    """The pipeline `optimize auto` means for a deployment: DEFAULT_PIPELINE, plus what its
    workload pays for (WORKLOAD_PASSES by kind; cascade-attention behind a long shared prefix),
    with bf16 linear weights when its accuracy bar allows them (BF16_WEIGHTS_TOLERANCE)."""
    workload = (deployment or {}).get("workload") or {}
    accuracy = (deployment or {}).get("accuracy") or {}
    extra = [WORKLOAD_PASSES[workload["kind"]]] if workload.get("kind") in WORKLOAD_PASSES else []
    if int((workload.get("shared_prefix") or {}).get("tokens") or 0) >= CASCADE_PREFIX_TOKENS:
        extra.insert(0, "cascade-attention")
    pipeline = DEFAULT_PIPELINE
    if extra:
        anchor = "prefix-cache{policy=radix}"
        pipeline = pipeline.replace(anchor, ",".join([anchor, *extra]), 1)
    if accuracy.get("kind") == "logits_tol" and float(accuracy.get("tolerance") or 0.0) >= BF16_WEIGHTS_TOLERANCE:
        pipeline = pipeline.replace("pack-linear-weights,", "pack-linear-weights{dtype=bf16},", 1)
    return pipeline
