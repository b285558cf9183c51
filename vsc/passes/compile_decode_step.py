"""compile-decode-step{form}: the whole decode forward as one compiled function (`schedule {graph = relax}`).

What it changes: the schedule's `graph` attribute, `eager` -> `relax`. Lowering then builds the
plan's decode forward as one TVM Relax function (vsc.backends.tvm.decode_step): every op's TIR
kernel (the same ones the eager step calls) in one module, the K/V writes in place on the cache
tensors, intermediates planned statically for max_batch rows. The server folder ships the VM
executable in kernels/; the runner binds the weights and the KV cache to it once, and each decode
step is one call (prefill and speculative verify stay eager).

Why: on the CPU a decode step at small batch is dominated by per-op cost, not by the kernels:
the eager step makes ~10 Python -> torch/TVM calls per layer, each allocating its result
(tiny Llama at one sequence: 0.50 ms per step eager, 0.18 compiled; SmolLM2 on its GGUF, see
bench/RESULTS.md). `form=eager` sets the plan back, for `vsc search` to compare both.

Needs every compute op to have a compiled form (`vsc.ir.kernels.decode_step_blockers`: a cpu
target, a paged f32 cache, continuous batching, TVM kernels for linears and attention — run
select-kernels first; no cascade- or native-attention). Exact: the same kernels in the same
order, so outputs do not change.
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.kernels import decode_step_blockers
from vsc.ir.module import ServingModule
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass


@register_pass
class CompileDecodeStep(Pass):
    name = "compile-decode-step"
    summary = "the whole decode forward as one TVM Relax function: one VM call per step (schedule graph = relax)"
    options = (Option("form", str, "relax", "relax: one compiled function; eager: one Python call per op",
                      choices=("relax", "eager")),)

    def apply(self, module: ServingModule) -> None:
        if self.form == "relax":
            why = decode_step_blockers(module)
            if why:
                raise VscError("the decode step cannot be compiled: " + "; ".join(why))
        module.schedule.attrs = {**module.schedule.attrs, "graph": self.form}
        module.schedule.origin = pass_origin(self.name)
