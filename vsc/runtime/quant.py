"""GGUF block-quantized weight formats (Q8_0, Q4_0, Q4_1): the one place they are defined.

llama.cpp stores a weight [N out, K in] row by row; each row is K // 32 blocks of 32
consecutive input elements. The GGUF bytes of one block:

    q8_0  (34 B): d f16 | qs int8 x 32                       w = qs * d
    q4_0  (18 B): d f16 | qs u8 x 16 (two 4-bit q per byte)  w = (q - 8) * d
    q4_1  (20 B): d f16 | m f16 | qs u8 x 16                 w = q * d + m

Nibble order (q4_0, q4_1): within a block, byte j (0..15) holds element j in its low
nibble and element j + 16 in its high nibble. vsc keeps that order: 16 bytes unpack to
two 16-lane vectors (low nibbles = elements 0..15, high = 16..31), which is what an
AVX-512 kernel wants.

Planar in-memory layout (made once at load; a lossless rearrangement of the GGUF bytes,
nb = K // 32):

    q8_0: qs int8 [N, K];       d float16 [N, nb]
    q4_0: qs uint8 [N, K // 2]; d float16 [N, nb]
    q4_1: qs uint8 [N, K // 2]; d float16 [N, nb]; m float16 [N, nb]

Row n, block b of q4 `qs` is `qs[n, 16 * b : 16 * b + 16]` (the block's 16 bytes, as in
the file). Parts are contiguous, C-ordered tensors, keyed by `QuantFormat.parts`.

`quantize` reproduces llama.cpp's reference quantizers (quantize_row_*_ref in
ggml-quants.c, which the `gguf` package's numpy code matches bit for bit): scales are
computed in float32, the inverse scale is taken from the float32 scale, and only the
stored scale is rounded to float16.
"""
from __future__ import annotations

import numpy as np
import torch

from vsc.runtime.quant_formats import BLOCK, FORMATS, QuantFormat, check_shape, get_format  # noqa: F401


def nbytes(shape, fmt: str) -> int:
    """Bytes of a [N, K] weight in format `fmt` (the GGUF size; the planar parts take the same)."""
    return get_format(fmt).nbytes(tuple(shape))


def part_shapes(shape, fmt: str) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
    """The planar parts' shapes and dtypes for a [N, K] weight."""
    f = get_format(fmt)
    n, k = check_shape(shape, f.name)
    nb = k // BLOCK
    out = {"qs": ((n, k), torch.int8) if f.bits == 8 else ((n, k // 2), torch.uint8), "d": ((n, nb), torch.float16)}
    if "m" in f.parts:
        out["m"] = ((n, nb), torch.float16)
    return out


def parts_tuple(parts, fmt: str) -> tuple[torch.Tensor, ...]:
    """The parts in `QuantFormat.parts` order (accepts a dict or an already ordered sequence)."""
    f = get_format(fmt)
    if isinstance(parts, dict):
        return tuple(parts[p] for p in f.parts)
    parts = tuple(parts)
    if len(parts) != len(f.parts):
        raise ValueError(f"{f.name} needs {len(f.parts)} parts {f.parts}, got {len(parts)}")
    return parts


def weight_shape(parts, fmt: str) -> tuple[int, int]:
    """(N, K) of a weight given its planar parts."""
    f = get_format(fmt)
    qs = parts_tuple(parts, f.name)[0]
    n, c = qs.shape
    return n, c if f.bits == 8 else 2 * c


# -- GGUF bytes <-> planar ------------------------------------------------------------


def from_gguf_blocks(raw: np.ndarray, fmt: str) -> dict[str, torch.Tensor]:
    """Planar parts from a weight's GGUF bytes (uint8 [N, nb * bytes_per_block]); lossless."""
    f = get_format(fmt)
    raw = np.ascontiguousarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError(f"{f.name}: raw blocks must be a 2-D uint8 array, got {raw.dtype} {raw.shape}")
    n, row = raw.shape
    if row % f.bytes_per_block != 0:
        raise ValueError(f"{f.name}: row of {row} bytes is not a whole number of {f.bytes_per_block}-byte blocks")
    nb = row // f.bytes_per_block
    b = raw.reshape(n, nb, f.bytes_per_block)
    d = np.ascontiguousarray(b[:, :, 0:2]).view(np.float16).reshape(n, nb)
    out = {}
    if f.name == "q8_0":
        out["qs"] = torch.from_numpy(np.ascontiguousarray(b[:, :, 2:]).view(np.int8).reshape(n, nb * BLOCK))
    elif f.name == "q4_0":
        out["qs"] = torch.from_numpy(np.ascontiguousarray(b[:, :, 2:]).reshape(n, nb * BLOCK // 2))
    else:
        out["qs"] = torch.from_numpy(np.ascontiguousarray(b[:, :, 4:]).reshape(n, nb * BLOCK // 2))
        out["m"] = torch.from_numpy(np.ascontiguousarray(b[:, :, 2:4]).view(np.float16).reshape(n, nb))
    out["d"] = torch.from_numpy(d.copy())
    return {p: out[p] for p in f.parts}


def to_gguf_blocks(parts, fmt: str) -> np.ndarray:
    """GGUF bytes (uint8 [N, nb * bytes_per_block]) from planar parts; inverse of `from_gguf_blocks`."""
    f = get_format(fmt)
    t = dict(zip(f.parts, parts_tuple(parts, f.name)))
    n, k = weight_shape(t, f.name)
    nb = k // BLOCK
    qs = t["qs"].contiguous().cpu().numpy().view(np.uint8).reshape(n, nb, -1)
    pieces = [t["d"].contiguous().cpu().numpy().astype(np.float16, copy=False).view(np.uint8).reshape(n, nb, 2)]
    if "m" in t:
        pieces.append(t["m"].contiguous().cpu().numpy().astype(np.float16, copy=False).view(np.uint8).reshape(n, nb, 2))
    pieces.append(qs)
    return np.concatenate(pieces, axis=2).reshape(n, nb * f.bytes_per_block)


# -- reference quantize / dequantize --------------------------------------------------


def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), exact for every float32."""
    a = np.abs(x)
    fl = np.floor(a)
    return np.sign(x) * (fl + np.floor(2 * (a - fl)))


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 q [N, nb, 32] (values 0..15) -> bytes [N, nb * 16] in GGUF nibble order."""
    n, nb, _ = q.shape
    return (q[:, :, :16] | (q[:, :, 16:] << np.uint8(4))).reshape(n, nb * 16)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """bytes [N, nb * 16] -> uint8 q [N, nb, 32] (GGUF nibble order)."""
    n = qs.shape[0]
    b = qs.reshape(n, -1, 16)
    return torch.cat([b & 0x0F, b >> 4], dim=2)


def quantize(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Planar parts of `w` (float [N, K]) quantized like llama.cpp's quantize_row_*_ref."""
    f = get_format(fmt)
    n, k = check_shape(tuple(w.shape), f.name)
    nb = k // BLOCK
    x = w.detach().to(torch.float32).cpu().numpy().reshape(n, nb, BLOCK)
    with np.errstate(divide="ignore", invalid="ignore"):
        if f.name == "q8_0":
            d = np.abs(x).max(axis=2, keepdims=True) / np.float32(127)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
            q = _roundf(x * inv).astype(np.int8)
            return {"qs": torch.from_numpy(q.reshape(n, k)), "d": torch.from_numpy(d.reshape(n, nb).astype(np.float16))}
        if f.name == "q4_0":
            imax = np.abs(x).argmax(axis=2)[..., None]
            mx = np.take_along_axis(x, imax, axis=2)
            d = mx / np.float32(-8)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
            q = np.minimum(np.trunc(x * inv + np.float32(8.5)).astype(np.int8), 15).astype(np.uint8)
            return {"qs": torch.from_numpy(_pack_nibbles(q)), "d": torch.from_numpy(d.reshape(n, nb).astype(np.float16))}
        # q4_1
        mn = x.min(axis=2, keepdims=True)
        mx = x.max(axis=2, keepdims=True)
        d = (mx - mn) / np.float32(15)
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        q = np.minimum(np.trunc((x - mn) * inv + np.float32(0.5)).astype(np.int8), 15).astype(np.uint8)
        return {"qs": torch.from_numpy(_pack_nibbles(q)), "d": torch.from_numpy(d.reshape(n, nb).astype(np.float16)),
                "m": torch.from_numpy(mn.reshape(n, nb).astype(np.float16))}


def unpack(parts, fmt: str) -> torch.Tensor:
    """The quantized integers as int32 [N, K] in element order (q8_0: -128..127; q4: 0..15)."""
    f = get_format(fmt)
    t = dict(zip(f.parts, parts_tuple(parts, f.name)))
    n, k = weight_shape(t, f.name)
    if f.bits == 8:
        return t["qs"].to(torch.int32)
    return _unpack_nibbles(t["qs"]).reshape(n, k).to(torch.int32)


def dequantize(parts, fmt: str) -> torch.Tensor:
    """The float32 [N, K] weight the parts stand for (the reference every kernel is checked against)."""
    f = get_format(fmt)
    t = dict(zip(f.parts, parts_tuple(parts, f.name)))
    n, k = weight_shape(t, f.name)
    nb = k // BLOCK
    q = unpack(t, f.name).to(torch.float32).reshape(n, nb, BLOCK)
    d = t["d"].to(torch.float32).reshape(n, nb, 1)
    if f.name == "q8_0":
        w = q * d
    elif f.name == "q4_0":
        w = (q - 8) * d
    else:
        w = q * d + t["m"].to(torch.float32).reshape(n, nb, 1)
    return w.reshape(n, k)
