"""Values that a plan's IR attributes and the runtime share, declared once.

Torch-free and importing nothing of vsc, so the compiler (ir, passes; also a sandboxed
agent's pass under its memory limit) can import it as the runtime does."""
from __future__ import annotations

#: Where speculative decoding's drafts come from (the `draft` stage's `method`, EngineConfig's
#: speculative_method; vsc.runtime.speculative implements each).
SPECULATIVE_METHODS = ("ngram", "prompt-lookup", "draft", "prediction")
