"""Kernel implementations that generated runners call.

`TORCH_KERNELS` maps each `torch.*` kernel name of the IR's kernel catalog that a runner
executes to its function in `torch_ops`. (`torch.sample` is absent on purpose: runners
return logits and the engine's sampler picks tokens.)
"""
from __future__ import annotations

from vsc.runtime.kernels import torch_ops

TORCH_KERNELS = {
    "torch.embedding": torch_ops.embedding,
    "torch.rmsnorm": torch_ops.rmsnorm,
    "torch.add": torch_ops.add,
    "torch.add_rmsnorm": torch_ops.add_rmsnorm,
    "torch.mul": torch_ops.mul,
    "torch.silu": torch_ops.silu,
    "torch.silu_mul": torch_ops.silu_mul,
    "torch.linear": torch_ops.linear,
    "torch.linear_int8": torch_ops.linear_int8,
    "torch.linear_onednn": torch_ops.linear_onednn,
    "torch.linear_quant": torch_ops.linear_quant,
    "torch.embedding_quant": torch_ops.embedding_quant,
    "torch.split": torch_ops.split,
    "torch.rope": torch_ops.rope_positions,
    "torch.rope_lookup": torch_ops.rope_lookup,
    "torch.rope_rotate": torch_ops.rope,
    "torch.sdpa": torch_ops.sdpa,
    "torch.paged_attention": torch_ops.paged_attention,
    "torch.paged_attention_int8": torch_ops.paged_attention_int8,
    "torch.moe": torch_ops.moe,
    "torch.last_token": torch_ops.last_token,
}

__all__ = ["TORCH_KERNELS", "torch_ops"]
