# examples/agent-fleet.vs — an agent fleet served by two replicas behind a prefix-affinity router.
#
# Agents send a long shared system prompt (tools, instructions) before a short turn. One box is
# not enough, so the plan runs as two replicas on Ray Serve (`vsc serve build/fleet --ray`, or
# `--ray-address ADDR` to join a cluster). The router hashes each prompt's first KV blocks so that
# requests sharing a prefix land on the replica that has it cached, and falls back to the
# least-loaded replica when the preferred one's queue would miss the TTFT objective.
# `router = round_robin` or `least_loaded` are the alternatives (bench/ray_prefix_affinity.py
# compares them). The tiny model keeps it small enough for a laptop (or CI).

deployment agent_fleet {
  model "../models/tiny-llama" { dtype = f32 }
  target cpu { threads = 1, memory = 512 MiB }

  workload {
    arrivals = closed(8)
    prompt_tokens = normal(48, 12)       # the agent's own turn, after the shared prefix
    output_tokens = fixed(16)
    shared_prefix { tokens = 256, share = 0.9 }
  }

  slo {
    ttft p99 <= 500 ms
  }

  accuracy { greedy_exact(probes = 2) }
  serve { max_context = 512, overload = queue, replicas = 2, router = prefix_affinity }
  optimize "paged-kv{block=16},continuous-batching{max_batch=8,max_tokens=1024},prefix-cache{policy=radix,capacity=96}"
}
