"""Values that a plan's IR attributes and the runtime share, declared once.

Torch-free and importing nothing of vsc, so the compiler (ir, passes; also a sandboxed
agent's pass under its memory limit) can import it as the runtime does."""
from __future__ import annotations

#: Where speculative decoding's drafts come from (the `draft` stage's `method`, EngineConfig's
#: speculative_method; vsc.runtime.speculative implements each).
SPECULATIVE_METHODS = ("ngram", "prompt-lookup", "draft", "prediction")

#: The speculative methods whose drafts come from n-gram matches (the draft stage carries `ngram`,
#: the longest n-gram looked up: EngineConfig.speculative_ngram).
NGRAM_SPECULATIVE_METHODS = ("ngram", "prompt-lookup")

#: The grammar kinds a `constrain` stage can carry (the json-mode pass writes "json_schema": the
#: stage's `schema` is a JSON Schema as JSON text; vsc.runtime.constrain compiles it).
CONSTRAIN_GRAMMARS = ("json_schema",)

#: What a server does with a request it cannot start in time (the spec's `serve { overload = ... }`,
#: the IR's `admit` stage attribute `overload`, EngineConfig's overload): "queue" admits it while
#: the waiting queue has room (EngineConfig.max_waiting); "shed" also answers 429 with Retry-After
#: when the request's predicted time to first token exceeds the TTFT objective (vsc.runtime.admission).
OVERLOAD_POLICIES = ("queue", "shed")

#: How a step's batch is formed (the IR's `batching { mode }`, EngineConfig.mode): "continuous"
#: admits waiting sequences at every step; "static" only when no sequence runs.
BATCHING_MODES = ("continuous", "static")

#: In which order waiting sequences are admitted (the IR's `batching { order }`, EngineConfig.order).
SCHEDULING_ORDERS = ("fcfs", "shortest-first")

#: What the scheduler does when the KV cache runs out (the IR's `batching { preemption }`,
#: EngineConfig.preemption): "recompute" preempts the newest running sequence and recomputes its KV
#: when it is readmitted (vLLM's default). Swapping KV out is not implemented, and a plan cannot
#: ask for no preemption: with a cache too small for the batch, some sequence must give way.
PREEMPTION_POLICIES = ("recompute",)

#: How cached KV blocks of shared prompt prefixes are found (the IR's `cache { prefix_sharing }`,
#: EngineConfig.prefix_cache): "none" shares nothing; "radix" is vsc.runtime.prefix_cache.
PREFIX_CACHE_POLICIES = ("none", "radix")

#: Which cached prefix blocks go when room is needed (the IR's `cache { eviction }`): the prefix
#: cache evicts least recently used blocks.
EVICTION_POLICIES = ("none", "lru")

#: How the KV cache is laid out (the IR's `cache { layout }`, CacheConfig.layout): "contiguous"
#: holds one max_context block per batch slot; "paged" holds block_size-token blocks of a pool.
KV_CACHE_LAYOUTS = ("contiguous", "paged")

#: Where a plan runs (the IR's `target` kind; a ModelRunner's device).
TARGET_KINDS = ("cpu", "cuda")

#: How an ingress picks the replica for a request when a plan runs as several replicas (the spec's
#: `serve { router = ... }`, the IR's `route` stage `policy`, the manifest's router; vsc.runtime.router):
#: "prefix_affinity" sends requests whose prompts share their leading KV blocks to the same replica (where
#: those blocks are cached), falling back to the least-loaded replica when the preferred one's queue would
#: miss the TTFT objective; "round_robin" takes replicas in turn; "least_loaded" the one with the fewest
#: requests in flight.
ROUTER_POLICIES = ("prefix_affinity", "round_robin", "least_loaded")
