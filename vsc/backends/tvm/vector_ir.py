"""Explicit-vector helpers for the TVM kernels written with TIR's IRBuilder (quant_linear's VNNI
kernel, quant_gemm): shuffles, vector stores, VNNI dot products, and the argument buffers several
kernels share (the block-quantized linear's, attention's query and KV cache). Call them inside a
prim_func (an `IRBuilder` one, or a TVMScript one: the parser runs them as it meets them)."""
from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T
from tvm.tirx.script.builder import ir as B

ALIGN = 4  # torch tensors (views, parts sliced from a file) need not be 64-byte aligned


def lanes(e) -> int:
    return tvm.DataType(str(e.ty)).lanes


def vector_width(n: int) -> int:
    """The float vector width for rows of n: 16 (AVX-512) when it divides n, else the largest
    power of two that does."""
    return next(width for width in (16, 8, 4, 2, 1) if n % width == 0)


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


@T.macro
def zero_row(acc, t, R, V):
    # acc[t, r, :V] = 0 for the R accumulators of x row t of a GEMM tile (linear, quant_linear)
    for r in T.unroll(R):
        for l in T.vectorized(V):
            acc[t, r, l] = T.float32(0)


@T.macro
def zero_tile(acc, MT, R, V):
    # acc[t, r, :V] = 0 for the MT x R accumulators of a GEMM tile
    for t in T.unroll(MT):
        zero_row(acc, t, R, V)


def match_quant_weight(qs_h, d_h, m_h, fmt: str, N: int, K: int, align: int = -1):
    """(QS, D, MN [N, K/32] f16): a block-quantized [N, K] weight as its planar parts
    (vsc.runtime.quant): QS int8 [N, K] for q8_0, else uint8 [N, K/2] (two 4-bit values a byte).
    align -1: TVM's default (64 bytes)."""
    q8 = fmt == "q8_0"
    QS = B.match_buffer(qs_h, (N, K if q8 else K // 2), "int8" if q8 else "uint8", align=align)
    D = B.match_buffer(d_h, (N, K // 32), "float16", align=align)
    MN = B.match_buffer(m_h, (N, K // 32), "float16", align=align)
    return QS, D, MN


def match_quant_linear(handles, fmt: str, M, N: int, K: int):
    """(X [M, K] f32, QS, D, MN [N, K/32] f16, Y [M, N] f32): a block-quantized linear's first five
    arguments, its weight as planar parts (vsc.runtime.quant)."""
    X = B.match_buffer(handles[0], (M, K), "float32", align=ALIGN)
    QS, D, MN = match_quant_weight(handles[1], handles[2], handles[3], fmt, N, K, align=ALIGN)
    Y = B.match_buffer(handles[4], (M, N), "float32", align=ALIGN)
    return X, QS, D, MN, Y


def match_attention_inputs(q_h, kc_h, vc_h, rows, HQ: int, HK: int, D: int):
    """(Q [rows, Hq*D] f32 whose rows may be strided, K and V caches [slots, Hk, D] f32): the
    query and KV cache arguments of the attention kernels."""
    slots, q_stride = B.int64(), B.int64()
    Q = B.match_buffer(q_h, (rows, HQ * D), "float32", strides=(q_stride, 1), align=ALIGN)
    KC = B.match_buffer(kc_h, (slots, HK, D), "float32", align=ALIGN)
    VC = B.match_buffer(vc_h, (slots, HK, D), "float32", align=ALIGN)
    return Q, KC, VC
