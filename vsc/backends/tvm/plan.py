"""The TVM kernel library of a plan: one quantized-linear kernel per (format, N, K) its ops read,
the fused elementwise kernels and the paged-attention kernels its ops name.

`vsc compile` builds it (cached on disk by `vsc.backends.tvm.build`) for the host CPU; the
server folder ships a copy in kernels/ under a name that carries the cache key, so a
changed kernel source or shape set is a different file.
"""
from __future__ import annotations

from pathlib import Path

from vsc.ir.module import ServingModule, walk_ops

def plan_kernel_specs(module: ServingModule) -> tuple[list[tuple[str, int, int]], list[tuple]]:
    """The TVM kernels a plan's ops name: (format, N, K) of every weight a `tvm.quant_linear`
    reads, and the elementwise and attention kernels by kind and baked shape
    (`vsc.backends.tvm.elementwise`, `vsc.backends.tvm.attention`)."""
    quant, elementwise = set(), set()
    for op in walk_ops(module.model.func.body):
        name = op.kernel.name if op.kernel is not None else ""
        if name == "tvm.quant_linear":
            t = module.model.weight(op.operands[1]).type
            quant.add((t.dtype, int(t.shape[0]), int(t.shape[1])))
        elif name == "tvm.rmsnorm":
            elementwise.add((op.kind, int(op.types[0].shape[-1])))
        elif name == "tvm.silu_mul":
            elementwise.add(("silu_mul", int(op.types[0].shape[-1])))
        elif name == "tvm.linear":
            t = module.model.weight(op.operands[1]).type
            elementwise.add(("linear", int(t.shape[0]), int(t.shape[1])))
        elif name == "tvm.paged_attention":
            hq, hk, d = (int(op.attrs[k]) for k in ("heads", "kv_heads", "head_dim"))
            elementwise.add(("kv_write", hk, d))
            elementwise.add(("paged_attention", hq, hk, d, int(module.cache.block_size)))
        elif name == "tvm.rope":
            d = int(op.attrs["head_dim"])
            elementwise.add(("rope", int(op.types[0].shape[-1]) // d, int(op.types[1].shape[-1]) // d, d))
    return sorted(quant), sorted(elementwise)


def needs_tvm_kernels(module: ServingModule) -> bool:
    return any(plan_kernel_specs(module))


def plan_tvm_kernels(module: ServingModule) -> tuple[Path, str]:
    """(the built library, the file name a server folder keeps it under in kernels/)."""
    from vsc.backends.tvm.build import build_quant_kernels

    quant, elementwise = plan_kernel_specs(module)
    built = build_quant_kernels(quant, elementwise=elementwise)
    return built, f"vsc_tvm_{built.parent.name}.so"
