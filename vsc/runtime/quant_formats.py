"""The GGUF block formats vsc serves (Q8_0, Q4_0, Q4_1): their names, block size, planar parts
and bytes per block, declared once. No torch or numpy here: the IR's types read these facts
(`vsc.ir.types.QUANT_DTYPES`) and must stay importable in a small sandbox; the layouts and
(de)quantizers are `vsc.runtime.quant`.
"""
from __future__ import annotations

from dataclasses import dataclass

BLOCK = 32


@dataclass(frozen=True)
class QuantFormat:
    """One GGUF block format: its planar parts and its size on disk."""

    name: str
    block: int
    parts: tuple[str, ...]
    bytes_per_block: int
    ggml_type: str  # gguf.GGMLQuantizationType member name
    bits: int  # bits per quantized value

    def nbytes(self, shape: tuple[int, int]) -> int:
        n, k = check_shape(shape, self.name)
        return n * (k // self.block) * self.bytes_per_block


FORMATS: dict[str, QuantFormat] = {
    "q8_0": QuantFormat("q8_0", BLOCK, ("qs", "d"), 34, "Q8_0", 8),
    "q4_0": QuantFormat("q4_0", BLOCK, ("qs", "d"), 18, "Q4_0", 4),
    "q4_1": QuantFormat("q4_1", BLOCK, ("qs", "d", "m"), 20, "Q4_1", 4),
}


def get_format(fmt: str | QuantFormat) -> QuantFormat:
    if isinstance(fmt, QuantFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown quantization format {fmt!r} (known: {', '.join(FORMATS)})") from None


def check_shape(shape, fmt: str = "") -> tuple[int, int]:
    """(N, K) of a 2-D weight shape; K must be a multiple of the 32-element block."""
    if len(shape) != 2:
        raise ValueError(f"{fmt or 'quantized'} weight must be 2-D [N, K], got shape {tuple(shape)}")
    n, k = int(shape[0]), int(shape[1])
    if k % BLOCK != 0 or k == 0:
        raise ValueError(f"{fmt or 'quantized'} weight: input dim K={k} is not a positive multiple of {BLOCK}")
    return n, k


GGUF_SUFFIX = ".gguf"


def is_gguf_path(path) -> bool:
    """Whether a model path names a GGUF file (rather than an HF folder)."""
    from pathlib import Path

    p = Path(path)
    return p.suffix.lower() == GGUF_SUFFIX and not p.is_dir()
