# examples/json-extract.vs — pull structured records out of text, always as valid JSON.
#
# Every answer is a JSON object matching schemas/person.json (relative to this file):
# `json-mode` masks, at each step, every token the schema's grammar does not allow next,
# so a client can parse each response without retries. The schema is copied into the
# plan and the server's manifest: the built server does not read schemas/ at run time.
# A request may still send its own OpenAI `response_format`; this schema applies to
# requests that send none.

deployment json_extract {
  model "../models/tiny-llama" { dtype = f32 }
  target cpu { threads = 2, memory = 1 GiB }

  workload {
    arrivals = poisson(4 req/s)
    prompt_tokens = uniform(64, 512)     # the text to extract from, plus instructions
    output_tokens = fixed(48)            # one small JSON record
  }

  slo {
    ttft p99 <= 300 ms
    e2e p90 <= 4 s
  }

  accuracy { greedy_exact(probes = 4) }
  serve { host = "127.0.0.1", port = 8002, max_context = 2048, api = openai }
  optimize "fuse-qkv,fuse-gate-up,paged-kv{block=16},continuous-batching{max_batch=16,max_tokens=2048},json-mode{schema=schemas/person.json},intra-op-threads"
}
