# examples/code-edit.vs — code edits on a CPU box.
#
# An editor sends a file region plus an instruction and gets the rewritten region
# back: long prompts, long answers that mostly repeat the prompt (what
# prompt-lookup speculation exploits). Latency per token matters more than time
# to first token. `optimize auto` lets vsc choose the pipeline.

deployment code_edit {
  model "../models/tiny-llama" { dtype = f32 }
  target cpu { threads = 2, memory = 2 GiB }

  workload {
    kind = code_edit
    arrivals = poisson(2 req/s)
    prompt_tokens = uniform(512, 1536)
    output_tokens = uniform(256, 512)
  }

  slo {
    ttft p90 <= 500 ms
    tpot p99 <= 15 ms
    e2e p99 <= 10 s
  }

  accuracy { greedy_exact(probes = 16) }
  serve { port = 8002, max_context = 2048 }
  optimize auto
}
