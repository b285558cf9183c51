# examples/shared-prefix.vs — an assistant whose requests share a long system prompt.
#
# 90% of requests start with the same 512-token prefix (system prompt + tool
# definitions), so caching the prefix's KV blocks saves most of the prefill.
# Closed loop: 16 users, each sending the next request when the last one ends.

deployment support_bot {
  model "../models/tiny-llama" { dtype = f32 }
  target cpu { threads = 2; memory = 2 GiB }

  workload {
    arrivals = closed(16)
    prompt_tokens = normal(96, 24)       # the user's own turn, after the shared prefix
    output_tokens = lognormal(48, 0.5)
    shared_prefix { tokens = 512, share = 0.9 }
  }

  slo {
    ttft p95 <= 150 ms
    itl p99 <= 50 ms
    throughput >= 300 tok/s
  }

  accuracy { logits_tol(1e-3, probes = 4) }
  serve { port = 8001 }
  optimize "fuse-qkv,fuse-gate-up,fold-rope-tables,paged-kv{block=16},continuous-batching{max_batch=16,max_tokens=2048},prefix-cache{policy=radix},cascade-attention,pack-linear-weights,intra-op-threads"
}
