"""chunked-prefill{tokens}: split long prompts into chunks that share steps with decodes.

Pays when long prompts arrive while other requests decode: an unchunked prefill of a
2k-token prompt stalls every running sequence for the whole prefill (a TPOT/ITL spike);
chunks of `tokens` bound that stall and let decodes ride along in the same step (the
Sarathi-Serve schedule). Exact: attention over the cached earlier chunks gives the same
numbers as one pass. Needs continuous batching (a static batch has no decodes to mix in).
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.module import ServingModule
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass


@register_pass
class ChunkedPrefill(Pass):
    name = "chunked-prefill"
    summary = "prefill long prompts in chunks of at most `tokens`, mixed with decodes"
    options = (Option("tokens", int, 256, "most prompt tokens one sequence prefills per step", minimum=1),)
    requires = ("continuous-batching",)

    def apply(self, module: ServingModule) -> None:
        b = module.batching
        if self.tokens > b.max_tokens:
            raise VscError(f"tokens={self.tokens} exceeds the step budget max_tokens={b.max_tokens}")
        b.chunked_prefill = self.tokens
        b.origin = pass_origin(self.name)
        prefill = module.requests.stage("prefill")
        if prefill is not None:
            prefill.attrs["chunk"] = self.tokens
            prefill.origin = pass_origin(self.name)
