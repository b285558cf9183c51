"""A block-quantized weight as a runner holds it: its format, its [out, in] shape, its planar parts.

The parts (`vsc.runtime.quant` defines them per format: int8 / packed 4-bit values and
float16 scales, all with `out` rows) are what the kernels read. Everything a plan does to a
weight before its kernels see it is a row operation, so it is done on every part alike:
undoing llama.cpp's q/k row permutation, concatenating q/k/v or gate/up (fuse passes),
gathering embedding rows. Nothing here dequantizes a whole matrix except `dequantize()`,
which the reference paths and the torch fallback kernel use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vsc.runtime import quant


@dataclass
class QuantTensor:
    fmt: str
    shape: tuple[int, int]
    parts: tuple[torch.Tensor, ...]      # in the order quant.FORMATS[fmt].parts names them

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], fmt: str) -> "QuantTensor":
        return cls(fmt, quant.weight_shape(parts, fmt), quant.parts_tuple(parts, fmt))

    @classmethod
    def quantize(cls, weight: torch.Tensor, fmt: str) -> "QuantTensor":
        return cls.from_parts(quant.quantize(weight.to(torch.float32), fmt), fmt)

    @property
    def part_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(quant.FORMATS[self.fmt].parts, self.parts))

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] matrix (reference and fallback paths only)."""
        return quant.dequantize(self.part_dict, self.fmt)

    def rows(self, index: torch.Tensor) -> "QuantTensor":
        """The rows `index` names, in that order (a permutation, or the tokens of an embedding)."""
        return QuantTensor(self.fmt, (int(index.numel()), self.shape[1]),
                           tuple(p.index_select(0, index).contiguous() for p in self.parts))

    def to(self, device: torch.device | str) -> "QuantTensor":
        return QuantTensor(self.fmt, self.shape, tuple(p.to(device) for p in self.parts))

    @staticmethod
    def concat(pieces: list["QuantTensor"]) -> "QuantTensor":
        """Rows of every piece, one after another (all in one format and of one width)."""
        fmts = {p.fmt for p in pieces}
        widths = {p.shape[1] for p in pieces}
        if len(fmts) != 1 or len(widths) != 1:
            raise ValueError(f"cannot concatenate quantized weights of formats {sorted(fmts)} and widths {sorted(widths)}")
        parts = tuple(torch.cat(group, dim=0) for group in zip(*(p.parts for p in pieces)))
        return QuantTensor(pieces[0].fmt, (sum(p.shape[0] for p in pieces), pieces[0].shape[1]), parts)


def unpermute_rope_rows(rows: int, heads: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's q/k permutation for `heads` heads.

    llama.cpp's converter stores each head's rows with the two rotary halves interleaved
    (row 2j = half-0 row j, row 2j+1 = half-1 row j) for its interleaved RoPE; HF models
    keep the halves apart. Row r of the result is the stored row that HF row r came from.
    """
    if rows % heads or (rows // heads) % 2:
        raise ValueError(f"{rows} rows do not split into {heads} heads of an even size")
    half = rows // heads // 2
    idx = torch.arange(rows).reshape(heads, half, 2)        # stored row of (head, j, half)
    return idx.transpose(1, 2).reshape(rows)                # HF order: (head, half, j)
