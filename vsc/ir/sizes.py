"""Byte counts derived from the IR: KV cache per token, weights. One definition for all users."""
from __future__ import annotations

from vsc.ir.module import ModelGraph, walk_ops
from vsc.ir.types import DTYPE_BYTES


# Element types a KV cache may hold: the float dtypes, and i8 (kv-int8), which also stores
# one fp32 scale per (token, kv head) beside the values: KV_SCALE_BYTES per head vector.
FLOAT_CACHE_DTYPES = frozenset({"f32", "bf16", "f16"})
CACHE_DTYPES = FLOAT_CACHE_DTYPES | {"i8"}
KV_SCALE_BYTES = {"i8": 4}


_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: int | float) -> str:
    """A byte count in the unit that shows it: the largest binary unit it is at least one of,
    with three significant digits (`1.00 MiB`, `113 MiB`, `2.50 GiB`, `512 B`), so a message
    never says `0.00 GiB` about a megabyte."""
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(_BYTE_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{int(n)} B"
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f} {_BYTE_UNITS[unit]}"


def kv_bytes_per_token(model_attrs: dict, cache_dtype: str) -> int:
    """Bytes one token occupies in the KV cache across all layers (K and V), scales included."""
    per_head = model_attrs["head_dim"] * DTYPE_BYTES[cache_dtype] + KV_SCALE_BYTES.get(cache_dtype, 0)
    return 2 * model_attrs["layers"] * model_attrs["kv_heads"] * per_head


def weight_bytes(model: ModelGraph) -> int:
    """Bytes of the weights a runner holds: those the step's ops read (checkpoint tensors, or
    what passes derived from them: fused concats, RoPE tables, int8 values and their scales;
    a weight only feeding a derivation is dropped after load), counting `{i}`/`{e}`
    templates per layer/expert."""
    read = {o for op in walk_ops(model.func.body) for o in op.operands if o.startswith("@")}
    total = 0
    for w in model.weights:
        if w.name not in read:
            continue
        n = w.type.nbytes()
        stored = w.init_attrs.get("dtype") if w.init_fn == "onednn_pack" else None
        if stored in DTYPE_BYTES:      # a packed copy stored narrower than its type (pack-linear-weights{dtype=bf16})
            n = n // DTYPE_BYTES[w.type.dtype] * DTYPE_BYTES[stored]
        if "{i}" in w.name:
            n *= model.attrs["layers"]
        if "{e}" in w.name:
            n *= model.attrs.get("experts", 1)
        total += n
    return total
