# examples/smollm2-gguf.vs — SmolLM2-135M-Instruct served from its GGUF file, as shipped:
# the Q4_1 / Q8_0 blocks stay quantized in memory (no fp32 copy) and the linears run TVM
# kernels that `vsc compile` builds for this CPU (cached on disk, shipped in kernels/); the
# whole decode forward is one compiled TVM Relax function (compile-decode-step).
#
# `vsc models get smollm2-135m models/smollm2-135m` keeps the GGUF beside the HF files.
# The accuracy check compares against the same model with its blocks dequantized.

deployment smollm2_gguf {
  model "../models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
  target cpu { threads = 2, memory = 1 GiB }

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
  optimize "fuse-qkv,fuse-gate-up,fold-rope-tables,paged-kv{block=16},continuous-batching{max_batch=16,max_tokens=2048},select-kernels,compile-decode-step"
}
