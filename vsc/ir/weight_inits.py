"""Typing rules of the derived weight inits that passes introduce, besides `concat`.

A derived weight is materialized once, at load time, from other weights or from
attributes alone (`vsc.runtime.weights` holds the implementations). Each rule here takes
the types of the weight's arguments, its attributes and its declared type, and returns
None when they agree, else what is wrong; the verifier reports that under `weights`.

- `rope_cos() {theta, head_dim}`, `rope_sin() {theta, head_dim}`: the RoPE cos / sin
  table, [max_position, head_dim], row p = cos / sin of p * inv_freq (fold-rope-tables).
- `quantize_int8(@w) {group}`: i8 values of a float [out, in] weight, symmetric per group
  of `group` input columns (0: one group per row); `int8_scales(@w) {group}`: the f32
  [out, in / group] scales that go with them (weight-int8).
- `quantize(@w) {format}`: a float [out, in] weight in a GGUF block format (q8_0, q4_0,
  q4_1), as llama.cpp's reference quantizers make it; declared `<format>[out, in]`
  (quantize-weights).
- `onednn_pack(@w) {batch[, dtype]}`: the f32 or bf16 [out, in] weight reordered into
  oneDNN's blocked layout for `batch`-row inputs (pack-linear-weights); same type, opaque
  memory layout; `dtype = "bf16"` on an f32 weight: stored rounded to bf16 (half the bytes).
"""
from __future__ import annotations

from typing import Callable

from vsc.ir.types import DTYPE_BYTES, FLOAT_DTYPES, QUANT_DTYPES, TensorType

#: What a oneDNN-packed weight may be stored as (f16 inner products have no fast path here).
PACKED_STORAGE = ("f32", "bf16")

WeightRule = Callable[[list[TensorType], dict, TensorType], "str | None"]


def _rope_table(parts: list[TensorType], attrs: dict, declared: TensorType) -> str | None:
    if parts:
        return "takes no weight arguments"
    theta, head_dim = attrs.get("theta"), attrs.get("head_dim")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        return f"theta must be a positive number, got {theta!r}"
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 or head_dim % 2:
        return f"head_dim must be a positive even int, got {head_dim!r}"
    if declared.rank != 2 or declared.dtype not in FLOAT_DTYPES or declared.shape[1] != head_dim:
        return f"a RoPE table must be float [max_position, {head_dim}], declared {declared}"
    return None


def int8_group_size(source: TensorType, attrs: dict) -> tuple[int | None, str | None]:
    """(columns per scale, None) for quantizing `source` with attrs["group"], or (None, problem)."""
    group = attrs.get("group")
    if source.rank != 2 or source.dtype not in FLOAT_DTYPES:
        return None, f"quantizes a float [out, in] weight, got {source}"
    if not isinstance(group, int) or isinstance(group, bool) or group < 0:
        return None, f"group must be a non-negative int (0: one scale per output row), got {group!r}"
    size = group or source.shape[1]
    if source.shape[1] % size:
        return None, f"group {group} does not divide in_features {source.shape[1]} of {source}"
    return size, None


def _quantized(parts: list[TensorType], attrs: dict, declared: TensorType, scales: bool) -> str | None:
    if len(parts) != 1:
        return f"takes one weight argument, got {len(parts)}"
    size, problem = int8_group_size(parts[0], attrs)
    if problem:
        return problem
    out, cols = parts[0].shape
    want = TensorType("f32", (out, cols // size)) if scales else TensorType("i8", (out, cols))
    if declared != want:
        return f"of {parts[0]} with group {attrs['group']} is {want}, declared {declared}"
    return None


def _packed(parts: list[TensorType], attrs: dict, declared: TensorType) -> str | None:
    if len(parts) != 1:
        return f"takes one weight argument, got {len(parts)}"
    if parts[0].rank != 2 or parts[0].dtype not in PACKED_STORAGE:
        return f"packs an f32 or bf16 [out, in] weight, got {parts[0]}"
    stored = attrs.get("dtype", parts[0].dtype)
    if stored not in PACKED_STORAGE or DTYPE_BYTES[stored] > DTYPE_BYTES[parts[0].dtype]:
        return f"dtype must be f32 or bf16 and no wider than the weight's {parts[0].dtype}, got {stored!r}"
    batch = attrs.get("batch")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        return f"batch must be a positive int (the rows the packing is tuned for), got {batch!r}"
    if declared != parts[0]:
        return f"a packed weight keeps its source's type {parts[0]}, declared {declared}"
    return None


def _block_quantized(parts: list[TensorType], attrs: dict, declared: TensorType) -> str | None:
    if len(parts) != 1:
        return f"takes one weight argument, got {len(parts)}"
    fmt = attrs.get("format")
    if not isinstance(fmt, str) or fmt not in QUANT_DTYPES:
        return f"format must be one of {', '.join(sorted(QUANT_DTYPES))}, got {fmt!r}"
    source = parts[0]
    if source.rank != 2 or source.dtype not in FLOAT_DTYPES or source.shape[1] % 32:
        return f"quantizes a float [out, in] weight with in a multiple of 32, got {source}"
    if declared != TensorType(fmt, source.shape):
        return f"of {source} to {fmt} is {TensorType(fmt, source.shape)}, declared {declared}"
    return None


WEIGHT_INIT_RULES: dict[str, WeightRule] = {
    "quantize": _block_quantized,
    "rope_cos": _rope_table,
    "rope_sin": _rope_table,
    "quantize_int8": lambda parts, attrs, t: _quantized(parts, attrs, t, scales=False),
    "int8_scales": lambda parts, attrs, t: _quantized(parts, attrs, t, scales=True),
    "onednn_pack": lambda parts, attrs, t: _packed(parts, attrs, t),
}
