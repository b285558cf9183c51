"""fuse-silu-mul: one activation kernel for the gated MLP after fuse-gate-up.

Pays everywhere the MLP's elementwise tail is memory-bound: `split` + `silu` + `mul`
read the [T, 2F] gate/up activations and write two [T, F] temporaries; `silu_mul`
reads them once and writes the product once (vLLM's SiluAndMul). Exact.

Matches `%g, %u = split(%gu) {sizes = [F, F]}; %a = silu(%g); %m = mul(%a, %u)` where %g,
%u and %a have no other users, and emits `%m = silu_mul(%gu)`.
"""
from __future__ import annotations

from vsc.ir.kernels import default_kernel
from vsc.ir.module import KernelRef, Op, ServingModule
from vsc.ir.rewrite import op_lists, producers, times_run, users
from vsc.ir.types import pass_origin
from vsc.passes.base import Pass, register_pass


@register_pass
class FuseSiluMul(Pass):
    name = "fuse-silu-mul"
    summary = "replace split + silu + mul of a fused gate/up projection by one silu_mul"

    def apply(self, module: ServingModule) -> None:
        origin = pass_origin(self.name)
        func = module.model.func
        times = times_run(module)
        for ops, _ in list(op_lists(module)):
            for mul in [op for op in ops if op.kind == "mul"]:
                prod = producers(ops)
                uses = users(func.body, func.returns)
                act, up_src = prod.get(mul.operands[0]), prod.get(mul.operands[1])
                if act is None or act.kind != "silu" or up_src is None or up_src.kind != "split":
                    continue
                split = up_src
                if prod.get(act.operands[0]) is not split or split.results != [act.operands[0], mul.operands[1]]:
                    continue
                sizes = split.attrs["sizes"]
                if len(sizes) != 2 or sizes[0] != sizes[1]:
                    continue
                gate, up = split.results
                if uses.get(gate) != [act] or uses.get(up) != [mul] or uses.get(act.results[0]) != [mul]:
                    continue
                fused = Op("silu_mul", list(mul.results), list(split.operands), list(mul.types), {},
                           KernelRef(default_kernel("silu_mul")), origin)
                ops[ops.index(mul)] = fused
                ops.remove(split)
                ops.remove(act)
                self.stat("fused", times[id(mul)], "silu+mul")
