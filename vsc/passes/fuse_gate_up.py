"""fuse-gate-up: one matmul for the gate and up projections of each gated MLP.

Pays for the same reason as fuse-qkv: the two largest GEMMs of the MLP read the same
input, so one GEMM of twice the width halves the launches and the activation reads.
Exact. Matches `mul(silu(linear(x, Wg)), linear(x, Wu))` and emits
`%gate_up = linear(x, concat(Wg, Wu))` plus `%gate, %up = split(%gate_up)`.
"""
from __future__ import annotations

from vsc.ir.kernels import default_kernel
from vsc.ir.module import KernelRef, NameAllocator, Op, ServingModule
from vsc.ir.rewrite import add_concat_weight, derived_name, op_lists, producers, times_run
from vsc.ir.types import pass_origin
from vsc.passes.base import Pass, register_pass


@register_pass
class FuseGateUp(Pass):
    name = "fuse-gate-up"
    summary = "merge the gate/up projections of each gated MLP into one linear + split"

    def apply(self, module: ServingModule) -> None:
        origin = pass_origin(self.name)
        names = NameAllocator(module.model.func)
        times = times_run(module)
        for ops, _ in list(op_lists(module)):
            for mul in [op for op in ops if op.kind == "mul"]:
                prod = producers(ops)
                act = prod.get(mul.operands[0])
                if act is None or act.kind != "silu":
                    continue
                gate, up = prod.get(act.operands[0]), prod.get(mul.operands[1])
                if gate is None or up is None or gate.kind != "linear" or up.kind != "linear":
                    continue
                if gate.operands[0] != up.operands[0] or len(gate.operands) != len(up.operands):
                    continue
                if module.model.weight(gate.operands[1]).type.dtype != module.model.weight(up.operands[1]).type.dtype:
                    continue      # weights stored in different formats (a mixed GGUF) stay apart
                weight = add_concat_weight(module.model, derived_name(gate.operands[1], "gate_proj", "gate_up_proj", ".gate_up"),
                                           [gate.operands[1], up.operands[1]], origin)
                operands = [gate.operands[0], weight]
                if len(gate.operands) == 3:
                    operands.append(add_concat_weight(module.model, derived_name(gate.operands[2], "gate_proj", "gate_up_proj", ".gate_up"),
                                                      [gate.operands[2], up.operands[2]], origin))
                fused = names.fresh("%gate_up")
                sizes = [gate.types[0].shape[-1], up.types[0].shape[-1]]
                new_ops = [
                    Op("linear", [fused], operands, [gate.types[0].with_last(sum(sizes))], {}, gate.kernel, origin),
                    Op("split", [gate.results[0], up.results[0]], [fused], [gate.types[0], up.types[0]],
                       {"sizes": sizes}, KernelRef(default_kernel("split")), origin),
                ]
                first = min(ops.index(gate), ops.index(up))
                ops.remove(gate)
                ops.remove(up)
                ops[first:first] = new_ops
                self.stat("fused", times[id(mul)], "gate/up")
