"""Explicit-vector helpers for the TVM kernels written with TIR's IRBuilder (quant_linear's VNNI
kernel, quant_gemm): shuffles, vector stores, VNNI dot products, and the block-quantized linear's
argument buffers. Call them inside an `IRBuilder` prim_func."""
from __future__ import annotations

import tvm
from tvm import tirx
from tvm.tirx.script.builder import ir as B

ALIGN = 4  # torch tensors (views, parts sliced from a file) need not be 64-byte aligned


def lanes(e) -> int:
    return tvm.DataType(str(e.ty)).lanes


def i32(v):
    return tirx.const(v, "int32")


def shuffle(v, idx):
    """Shuffle of one vector; TIR wants the inputs to have at least as many lanes as the output."""
    idx = list(idx)
    return tirx.Shuffle([v] * -(-len(idx) // lanes(v)), [i32(i) for i in idx])


def vstore(buf, idx, value):
    """buf[idx[:-1], idx[-1] : idx[-1] + lanes(value)] = value."""
    idx = list(idx)
    B.buffer_store(buf, value, idx[:-1] + [tirx.Ramp(idx[-1], 1, lanes(value))])


def dpbusd(acc, u8, s8):
    """AVX-512 VNNI: acc (int32 lanes) += dot of each 4 u8 x 4 s8 (LLVM wants i8 vector operands)."""
    n = lanes(acc)
    return B.call_llvm_pure_intrin(f"int32x{n}", f"llvm.x86.avx512.vpdpbusd.{n * 32}", acc, u8, s8)


def match_quant_linear(handles, fmt: str, M, N: int, K: int):
    """(X [M, K] f32, QS, D, MN [N, K/32] f16, Y [M, N] f32): a block-quantized linear's first five
    arguments, its weight as planar parts (vsc.runtime.quant)."""
    q8 = fmt == "q8_0"
    X = B.match_buffer(handles[0], (M, K), "float32", align=ALIGN)
    QS = B.match_buffer(handles[1], (N, K if q8 else K // 2), "int8" if q8 else "uint8", align=ALIGN)
    D = B.match_buffer(handles[2], (N, K // 32), "float16", align=ALIGN)
    MN = B.match_buffer(handles[3], (N, K // 32), "float16", align=ALIGN)
    Y = B.match_buffer(handles[4], (M, N), "float32", align=ALIGN)
    return X, QS, D, MN, Y
