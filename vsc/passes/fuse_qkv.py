"""fuse-qkv: one matmul for the q, k and v projections of each attention.

Pays when the step is dispatch- or bandwidth-bound (small batches, small models): three
GEMMs reading the same activations become one wider GEMM plus free views. The rewrite
is exact (concatenating weight rows does not change any dot product).

Matches `attention(rope(linear(x, Wq), linear(x, Wk), p), ..., linear(x, Wv))` (or
`rope_rotate(..., cos, sin)` after fold-rope-tables) — the
three linears must share their input, agree on bias presence, and feed only the
attention path — and emits `%qkv = linear(x, concat(Wq, Wk, Wv))` plus
`%q, %k, %v = split(%qkv)`, keeping the original value names.
"""
from __future__ import annotations

from vsc.ir.kernels import default_kernel
from vsc.ir.module import KernelRef, NameAllocator, Op, ServingModule
from vsc.ir.rewrite import add_concat_weight, derived_name, op_lists, producers, times_run
from vsc.ir.types import pass_origin
from vsc.passes.base import Pass, register_pass


def _qkv_linears(attn: Op, prod: dict[str, Op]) -> list[Op] | None:
    q, k, v = attn.operands
    rope = prod.get(q)
    if rope is None or rope.kind not in ("rope", "rope_rotate") or rope.results != [q, k]:
        return None
    linears = [prod.get(rope.operands[0]), prod.get(rope.operands[1]), prod.get(v)]
    if any(l is None or l.kind != "linear" for l in linears):
        return None
    if len({l.operands[0] for l in linears}) != 1 or len({len(l.operands) for l in linears}) != 1:
        return None
    return linears


@register_pass
class FuseQKV(Pass):
    name = "fuse-qkv"
    summary = "merge the q/k/v projections of each attention into one linear + split"

    def apply(self, module: ServingModule) -> None:
        origin = pass_origin(self.name)
        names = NameAllocator(module.model.func)
        model = module.model
        times = times_run(module)
        for ops, _ in list(op_lists(module)):
            prod = producers(ops)
            for attn in [op for op in ops if op.kind == "attention"]:
                linears = _qkv_linears(attn, prod)
                if linears is None or len({model.weight(l.operands[1]).type.dtype for l in linears}) != 1:
                    continue      # weights stored in different formats (a mixed GGUF) stay apart
                x = linears[0].operands[0]
                weight = add_concat_weight(model, derived_name(linears[0].operands[1], "q_proj", "qkv_proj", ".qkv"),
                                           [l.operands[1] for l in linears], origin)
                operands = [x, weight]
                if len(linears[0].operands) == 3:
                    operands.append(add_concat_weight(model, derived_name(linears[0].operands[2], "q_proj", "qkv_proj", ".qkv"),
                                                      [l.operands[2] for l in linears], origin))
                fused = names.fresh("%qkv")
                sizes = [l.types[0].shape[-1] for l in linears]
                fused_type = linears[0].types[0].with_last(sum(sizes))
                kernel = linears[0].kernel
                new_ops = [
                    Op("linear", [fused], operands, [fused_type], {}, kernel, origin),
                    Op("split", [l.results[0] for l in linears], [fused], [l.types[0] for l in linears],
                       {"sizes": sizes}, KernelRef(default_kernel("split")), origin),
                ]
                first = min(ops.index(l) for l in linears)
                for l in linears:
                    ops.remove(l)
                ops[first:first] = new_ops
                prod = producers(ops)
                self.stat("fused", times[id(attn)], "qkv")
