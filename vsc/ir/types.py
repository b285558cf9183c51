"""Tensor types with symbolic shapes, and source origins: the leaves of the IR."""
from __future__ import annotations

import json
from dataclasses import dataclass

from vsc.runtime.quant_formats import FORMATS as QUANT_FORMATS

# Element types the IR knows, with their size in bytes.
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "i8": 1, "u8": 1, "bool": 1}
FLOAT_DTYPES = frozenset({"f32", "bf16", "f16"})
# Block-quantized weight types (GGUF's Q8_0, Q4_0, Q4_1: `q4_1[out, in]` is an [out, in]
# weight stored as blocks of 32 consecutive input elements with their scales). Only
# weights have them; `vsc.runtime.quant` defines the block layouts, once.
QUANT_DTYPES = frozenset(QUANT_FORMATS)
KNOWN_DTYPES = frozenset(DTYPE_BYTES) | QUANT_DTYPES


# Symbolic dimensions of one forward step: T = tokens in the step (all sequences
# together), B = sequences in the step. Anything else must be a positive int.
STEP_SYMBOLS = ("T", "B")

Dim = int | str


@dataclass(frozen=True)
class TensorType:
    """`f32[T, 128]`: an element type and a shape whose dims are ints or symbols."""

    dtype: str
    shape: tuple[Dim, ...]

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_last(self, dim: Dim) -> "TensorType":
        """The same type with the innermost dim replaced (what a linear layer does)."""
        return TensorType(self.dtype, self.shape[:-1] + (dim,))

    def num_elements(self) -> int:
        """Element count; only defined for fully static shapes."""
        n = 1
        for d in self.shape:
            if not isinstance(d, int):
                raise ValueError(f"shape {self} is symbolic")
            n *= d
        return n

    def nbytes(self) -> int:
        if self.dtype in QUANT_DTYPES:
            return QUANT_FORMATS[self.dtype].nbytes(self.shape)
        return self.num_elements() * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Origin:
    """Where an IR node came from: a spec line, an importer, a pass, or a parsed .vsir file.

    Printed as `loc("examples/chat.vs":3:3)`, `loc(import "llama")`, `loc(pass "fuse-qkv")`.
    """

    kind: str                  # "spec" | "import" | "pass" | "unknown"
    detail: str = ""
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        """The .vsir form, the detail as a JSON string literal (control characters and newlines in
        a file or pass name escaped, as the parser's JSON string reader wants them)."""
        if self.kind == "spec":
            return f"loc({json.dumps(self.detail)}:{self.line}:{self.column})"
        if self.kind == "unknown":
            return "loc(unknown)"
        return f"loc({self.kind} {json.dumps(self.detail)})"

    def describe(self) -> str:
        """Human wording for diagnostics: 'spec examples/chat.vs:3:3', 'pass fuse-qkv'."""
        if self.kind == "spec":
            return f"spec {self.detail}:{self.line}:{self.column}"
        if self.kind == "unknown":
            return "unknown origin"
        return f"{self.kind} {self.detail}"


UNKNOWN = Origin("unknown")


def spec_origin(loc) -> Origin:
    """An Origin for a `vsc.errors.SourceLocation` (or UNKNOWN when there is none)."""
    if loc is None:
        return UNKNOWN
    return Origin("spec", str(loc.file), loc.line, loc.column)


def pass_origin(pass_name: str) -> Origin:
    return Origin("pass", pass_name)


