"""Byte counts derived from the IR: KV cache per token, weights. One definition for all users."""
from __future__ import annotations

from vsc.ir.module import ModelGraph
from vsc.ir.types import DTYPE_BYTES


def kv_bytes_per_token(model_attrs: dict, cache_dtype: str) -> int:
    """Bytes one token occupies in the KV cache across all layers (K and V)."""
    return 2 * model_attrs["layers"] * model_attrs["kv_heads"] * model_attrs["head_dim"] * DTYPE_BYTES[cache_dtype]


def weight_bytes(model: ModelGraph) -> int:
    """Bytes of the checkpoint weights (`load`ed), counting `{i}`/`{e}` templates per layer/expert."""
    total = 0
    for w in model.weights:
        if w.init_fn != "load":
            continue
        n = w.type.nbytes()
        if "{i}" in w.name:
            n *= model.attrs["layers"]
        if "{e}" in w.name:
            n *= model.attrs.get("experts", 1)
        total += n
    return total
