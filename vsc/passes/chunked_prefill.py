"""chunked-prefill{tokens}: split long prompts into chunks that share steps with decodes.

Pays when long prompts arrive while other requests decode: an unchunked prefill of a
2k-token prompt stalls every running sequence for the whole prefill (a TPOT/ITL spike);
chunks of `tokens` bound that stall and let decodes ride along in the same step (the
Sarathi-Serve schedule). Exact: attention over the cached earlier chunks gives the same
numbers as one pass. Needs continuous batching (a static batch has no decodes to mix in).

`slo=true` sizes the stall by the spec's TPOT objective instead of a fixed number alone: the
prefill stage carries `tpot_slo_ms` (the tightest `tpot <=` bound of the spec's slo block) and
the engine's scheduler caps the prompt tokens of every step that has decodes running so that,
by the step costs it has measured so far (an EWMA of decode-only steps and of the extra time per
prompt token), the step stays within it. A prompt still advances at least one block per step
when even a decode-only step exceeds the objective (a TTFT of forever is not an option), and
prompt-only steps are not capped. `tokens` still bounds one sequence's chunk.
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
    options = (Option("tokens", int, 256, "most prompt tokens one sequence prefills per step", minimum=1),
               Option("slo", bool, False, "also cap a step's prompt tokens by the spec's tpot SLO (measured step costs)"))
    requires = ("continuous-batching",)

    def apply(self, module: ServingModule) -> None:
        b = module.batching
        if self.tokens > b.max_tokens:
            raise VscError(f"tokens={self.tokens} exceeds the step budget max_tokens={b.max_tokens}")
        b.chunked_prefill = self.tokens
        b.origin = pass_origin(self.name)
        target = tpot_objective_ms(module) if self.slo else None
        if self.slo and target is None:
            raise VscError("chunked-prefill{slo=true} needs a `tpot p.. <= ...` objective in the spec's slo block")
        prefill = module.requests.stage("prefill")
        if prefill is None and self.slo:
            raise VscError("chunked-prefill{slo=true}: the plan's request graph has no prefill stage to carry the objective")
        if prefill is not None:
            prefill.attrs["chunk"] = self.tokens
            if target is not None:
                prefill.attrs["tpot_slo_ms"] = target
            prefill.origin = pass_origin(self.name)


def tpot_objective_ms(module: ServingModule) -> float | None:
    """The tightest `tpot <=` objective of the deployment's SLOs, in ms (None without one)."""
    bounds = [float(s["value"]) * 1000.0 for s in module.deployment.get("slos") or []
              if s.get("metric") == "tpot" and s.get("op", "<=") == "<="]
    return round(min(bounds), 3) if bounds else None
