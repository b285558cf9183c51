"""fuse-add-rmsnorm: fold each residual add into the RMSNorm that reads it.

Pays on bandwidth-bound targets (GPU decode): `s = a + b; n = rmsnorm(s)` reads and writes
the residual stream twice; one fused kernel reads a and b once and writes s and n
(vLLM's fused_add_rms_norm). On CPU it saves one pass over the hidden states. Exact:
the same arithmetic in the same order.

Matches `%s = add(%a, %b)` followed (in the same op list) by `%n = rmsnorm(%s, @w)` and
emits `%n, %s = add_rmsnorm(%a, %b, @w) {eps}` where the add was; both names survive, so
later users of the residual sum are untouched.
"""
from __future__ import annotations

from vsc.ir.kernels import default_kernel
from vsc.ir.module import KernelRef, Op, ServingModule
from vsc.ir.rewrite import op_lists, times_run
from vsc.ir.types import pass_origin
from vsc.passes.base import Pass, register_pass


@register_pass
class FuseAddRMSNorm(Pass):
    name = "fuse-add-rmsnorm"
    summary = "fuse each residual add with the RMSNorm that consumes it"

    def apply(self, module: ServingModule) -> None:
        origin = pass_origin(self.name)
        times = times_run(module)
        for ops, _ in list(op_lists(module)):
            for add in [op for op in ops if op.kind == "add"]:
                norm = next((op for op in ops[ops.index(add) + 1:]
                             if op.kind == "rmsnorm" and op.operands[0] == add.results[0]), None)
                if norm is None:
                    continue
                kernel = KernelRef(default_kernel("add_rmsnorm"))
                if norm.kernel is not None and norm.kernel.name.startswith("triton."):
                    kernel = KernelRef("triton.rmsnorm", dict(norm.kernel.config))
                fused = Op("add_rmsnorm", [norm.results[0], add.results[0]], [*add.operands, norm.operands[1]],
                           [norm.types[0], add.types[0]], {"eps": norm.attrs["eps"]}, kernel, origin)
                ops[ops.index(add)] = fused
                ops.remove(norm)
                self.stat("fused", times[id(add)], "add+rmsnorm")
