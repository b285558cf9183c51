"""Kernel implementations that generated runners call.

`TORCH_KERNELS` maps each `torch.*` kernel of `vsc.runtime.kernel_registry` that a runner
executes to its function in `torch_ops`, derived from the declarations. (`torch.sample` is
absent on purpose: runners return logits and the engine's sampler picks tokens.)
"""
from __future__ import annotations

from vsc.runtime.kernel_registry import backend_kernels
from vsc.runtime.kernels import torch_ops


def _one_function(kernel) -> str:
    (fn,) = set(kernel.functions.values())     # a torch kernel runs every op kind it implements with one function
    return fn


TORCH_KERNELS = {k.name: getattr(torch_ops, _one_function(k)) for k in backend_kernels("torch") if k.functions}

__all__ = ["TORCH_KERNELS", "torch_ops"]
