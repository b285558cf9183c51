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

Inside one compiled function an op's cost is its kernel alone (no Python dispatch, no result
allocation), so the pass first moves every op whose kernel has no compiled form onto the first
fitting kernel that has one (a TVM kernel: select-kernels may have kept torch's where, called
from Python, it measured faster), then requires every compute op to have a compiled form
(`vsc.ir.kernels.decode_step_blockers`: a cpu target, a paged f32 cache, continuous batching,
no cascade-attention, no weight packed for oneDNN). A moved op may round differently
(may_change_outputs: the accuracy check runs after it); otherwise the same kernels run.
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.kernels import COMPILED_STEP_KERNELS, GRAPH_FORMS, decode_step_blockers, op_fitting_kernels
from vsc.ir.module import KernelRef, ServingModule, walk_ops
from vsc.ir.ops import OPS
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass


@register_pass
class CompileDecodeStep(Pass):
    name = "compile-decode-step"
    summary = "the whole decode forward as one TVM Relax function: one VM call per step (schedule graph = relax)"
    options = (Option("form", str, "relax", "relax: one compiled function; eager: one Python call per op",
                      choices=GRAPH_FORMS),)

    may_change_outputs = True

    def apply(self, module: ServingModule) -> None:
        if self.form == "relax":
            self._move_to_compiled_kernels(module)
            why = decode_step_blockers(module)
            if why:
                raise VscError("the decode step cannot be compiled: " + "; ".join(why))
        module.schedule.attrs = {**module.schedule.attrs, "graph": self.form}
        module.schedule.origin = pass_origin(self.name)

    def _move_to_compiled_kernels(self, module: ServingModule) -> None:
        origin = pass_origin(self.name)
        for op in walk_ops(module.model.func.body):
            if OPS[op.kind].structural or op.kernel is None or op.kernel.name in COMPILED_STEP_KERNELS:
                continue
            fitting = op_fitting_kernels(module, op)
            if fitting is None:
                continue          # a bound kernel stays, and decode_step_blockers says so
            compiled = next((k for k in fitting if k in COMPILED_STEP_KERNELS), None)
            if compiled is not None:
                op.kernel = KernelRef(compiled, {})
                op.origin = origin
