# examples/code-edit-spec.vs — code edits on a CPU box, with prompt-lookup speculation.
#
# The workload of code-edit.vs (an editor sends a file region plus an instruction and gets
# the rewritten region back: long prompts, long answers that mostly repeat the prompt), with
# a hand-written pipeline instead of `optimize auto` (`kind = code_edit` tells `vsc search`
# and `vsc bench` what the requests are like; `vsc search` measures whether speculating
# pays for this model). prompt-lookup drafts the
# tokens that followed the last 3 output tokens in the prompt; one k+1-token verify per
# step then emits up to 5 tokens where plain decoding emits 1. max_tokens leaves room for
# a 5-token verify for each of the 16 sequences beside the prefills.

deployment code_edit_spec {
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
  serve { port = 8003, max_context = 2048 }
  optimize "fuse-qkv,fuse-gate-up,paged-kv{block=16},continuous-batching{max_batch=16,max_tokens=2048},speculative{method=prompt-lookup,k=4},intra-op-threads"
}
