# examples/chat.vs — a chat assistant on CPU.
#
# Open-loop traffic: requests arrive at random (Poisson) at 8 per second, with
# prompts of 32..256 tokens and 64-token answers. The server must keep the 99th
# percentile time-to-first-token under 200 ms while sustaining 500 tokens/s.

deployment chat {
  model "../models/tiny-llama" { dtype = f32 }
  target cpu { threads = 2, memory = 1 GiB }

  workload {
    arrivals = poisson(8 req/s)          # or: closed(16)   (fixed concurrency)
    prompt_tokens = uniform(32, 256)     # fixed(n) | uniform(lo, hi) | normal(mean, std) | lognormal(mean, sigma)
    output_tokens = fixed(64)
    # dataset = "prompts.jsonl"          # optional: real prompts, relative to this file
  }

  slo {
    ttft p99 <= 200 ms
    tpot p50 <= 25 ms
    e2e p90 <= 4 s
    throughput >= 500 tok/s
  }

  accuracy { greedy_exact(probes = 8) }   # or: logits_tol(1e-3, probes = 4)
  serve { host = "127.0.0.1", port = 8000, max_context = 2048, api = openai }
  optimize "fuse-qkv,fuse-gate-up,fold-rope-tables,paged-kv{block=16},continuous-batching{max_batch=16,max_tokens=2048},pack-linear-weights,intra-op-threads"
}
