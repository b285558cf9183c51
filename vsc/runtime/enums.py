"""Values that a plan's IR attributes and the runtime share, declared once.

Torch-free and importing nothing of vsc, so the compiler (ir, passes; also a sandboxed
agent's pass under its memory limit) can import it as the runtime does."""
from __future__ import annotations

#: Where speculative decoding's drafts come from (the `draft` stage's `method`, EngineConfig's
#: speculative_method; vsc.runtime.speculative implements each).
SPECULATIVE_METHODS = ("ngram", "prompt-lookup", "draft", "prediction")

#: What a server does with a request it cannot start in time (the spec's `serve { overload = ... }`,
#: the IR's `admit` stage attribute `overload`, EngineConfig's overload): "queue" admits it while
#: the waiting queue has room (EngineConfig.max_waiting); "shed" also answers 429 with Retry-After
#: when the request's predicted time to first token exceeds the TTFT objective (vsc.runtime.admission).
OVERLOAD_POLICIES = ("queue", "shed")
