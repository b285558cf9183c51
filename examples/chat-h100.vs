# examples/chat-h100.vs — the chat assistant of chat.vs on one H100 (sm_90), in bf16.
#
# The same traffic and goals as chat.vs, with more headroom: a GPU step is cheap, so the
# batch is 64 sequences and 8192 tokens. `select-kernels` (last, after the fusions and
# paged-kv it depends on) moves RMSNorm (+ residual add), RoPE, SiLU-and-mul and decode
# attention onto the Triton kernels; `vsc compile` writes their sm_90 PTX and cubins into
# server/kernels/. Compiling needs no GPU: without one the accuracy check is recorded as
# skipped in manifest.json, to be run with `vsc verify server/` on the GPU host.

deployment chat_h100 {
  model "../models/tiny-llama" { dtype = bf16 }
  target cuda { arch = sm_90, gpus = 1, memory = 80 GiB }

  workload {
    arrivals = poisson(8 req/s)
    prompt_tokens = uniform(32, 256)
    output_tokens = fixed(64)
  }

  slo {
    ttft p99 <= 200 ms
    tpot p50 <= 25 ms
    e2e p90 <= 4 s
    throughput >= 500 tok/s
  }

  accuracy { greedy_exact(probes = 8) }
  serve { host = "127.0.0.1", port = 8000, max_context = 2048, api = openai }
  optimize "fuse-qkv,fuse-gate-up,fuse-silu-mul,fuse-add-rmsnorm,fold-rope-tables,paged-kv{block=16},continuous-batching{max_batch=64,max_tokens=8192},select-kernels"
}
