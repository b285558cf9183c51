# examples/predicted-edit.vs — code edits whose requests carry the file as it was.
#
# An editor sends the instruction and the file, and puts the file in OpenAI's
# `prediction` field too ({"type": "content", "content": "<the file>"}): most of the
# answer is that text. `kind = predicted_edit` makes `optimize auto` draft each answer
# from its prediction (speculative{method=prediction}), re-synchronised after every
# edit the model makes; the output is exactly plain decoding's, and the usage block
# reports accepted / rejected prediction tokens.

deployment predicted_edit {
  model "../models/tiny-llama" { dtype = f32 }
  target cpu { threads = 2, memory = 2 GiB }

  workload {
    kind = predicted_edit
    arrivals = closed(4)
    prompt_tokens = uniform(512, 1536)
    output_tokens = uniform(256, 512)
  }

  accuracy { greedy_exact(probes = 8) }
  serve { port = 8003, max_context = 2048 }
  optimize auto
}
