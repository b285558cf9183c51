"""The TVM kernel library of a plan: one quantized-linear kernel per (format, N, K) its ops read.

`vsc compile` builds it (cached on disk by `vsc.backends.tvm.build`) for the host CPU; the
server folder ships a copy in kernels/ under a name that carries the cache key, so a
changed kernel source or shape set is a different file.
"""
from __future__ import annotations

from pathlib import Path

from vsc.ir.module import ServingModule, walk_ops

TVM_KERNEL_NAMES = frozenset({"tvm.quant_linear"})


def plan_kernel_specs(module: ServingModule) -> list[tuple[str, int, int]]:
    """(format, N, K) of every weight a `tvm.quant_linear` op of the plan reads."""
    specs = set()
    for op in walk_ops(module.model.func.body):
        if op.kernel is not None and op.kernel.name in TVM_KERNEL_NAMES:
            t = module.model.weight(op.operands[1]).type
            specs.add((t.dtype, int(t.shape[0]), int(t.shape[1])))
    return sorted(specs)


def needs_tvm_kernels(module: ServingModule) -> bool:
    return bool(plan_kernel_specs(module))


def plan_tvm_kernels(module: ServingModule) -> tuple[Path, str]:
    """(the built library, the file name a server folder keeps it under in kernels/)."""
    from vsc.backends.tvm.build import build_quant_kernels

    built = build_quant_kernels(plan_kernel_specs(module))
    return built, f"vsc_tvm_{built.parent.name}.so"
