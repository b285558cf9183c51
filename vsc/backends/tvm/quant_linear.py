"""TVM kernels for GGUF block-quantized linear layers: y[M, N] = x[M, K] @ dequant(W)^T.

Written as TIR (TVMScript) with the schedule spelled out in the loop nest (the kernels
are small; explicit loops kept the codegen predictable where the TE schedule route did
not); formats and planar layout are those of `vsc.runtime.quant`.

Schedule (per weight shape (N, K), M dynamic):
  * rows of W are processed R at a time (`T.parallel` over row tiles; the last tile
    clamps its row index to N - 1, recomputing a row instead of needing a tail loop);
  * rows of x are processed MT at a time, the M % MT leftover rows one at a time;
  * per 32-element block, each of the R rows is dequantized once into two 16-lane f32
    vectors (low / high nibbles, or bytes 0..15 / 16..31 for q8_0: the AVX-512 width)
    that stay in registers, and reused for the MT rows of x: acc[t, r] += w_lo * x_lo +
    w_hi * x_hi with fp32 FMAs;
  * the 16 lanes of each accumulator are summed with a shuffle tree at the end.
Small local buffers use storage scope "global" so that TVM lowers them to stack allocas
(scope "local" inside a parallel loop became TVMBackendAllocWorkspace calls per
iteration, 2x slower). Let-bound values inside vectorized loops miscompiled (wrong
results) in TVM 0.27, so expressions are written inline.

Measured (bench/tvm_quant_linear_ab.py --quick, 1 thread, znver4, on a box whose 2 cores
were shared with other jobs at load 4-6, so absolute numbers are pessimistic by up to 2x):
  576x576 M=1 hot: q8_0 93 us, q4_0 97 us, q4_1 93 us; torch fp32 F.linear 56 us
  (an earlier quiet run: q4_0 39 us vs torch fp32 28 us). cold: q4_0 81 us vs fp32 234 us.
  49152x576 (LM head) M=1: q8_0 9.1 ms hot (3.3 GB/s), q4_0 3.9 ms (4.0 GB/s); fp32 20 ms.
  M=16: roughly on par with torch fp32 (576x576 q4_1 361 us vs 313 us).
This is compute bound (about 10 cycles per 32-element block and row for M=1: unpack,
convert, 2 FMA for the dequant, 2 for the dot), far from the ~75 GB/s DRAM roofline.
Next step (not done): llama.cpp-style int8 activations and VNNI vpdpbusd.
Tried: R (rows per tile) in {1, 2, 3, 4}, MT in {3, 4, 7}: within noise for M=1;
R=3, MT=4 best for M=16.
"""
from __future__ import annotations

import tvm  # noqa: F401  (TVMScript needs tvm initialised)
from tvm.script import tirx as T

from vsc.runtime.quant import BLOCK, get_format

LANES = 16
DEFAULT_R = 3  # rows of W per tile
DEFAULT_MT = 4  # rows of x per tile


def _check(fmt: str, n: int, k: int) -> None:
    get_format(fmt)
    if k % BLOCK or k <= 0 or n <= 0:
        raise ValueError(f"quant_linear {fmt}: bad weight shape [{n}, {k}] (K must be a multiple of {BLOCK})")


def kernel_name(fmt: str, n: int, k: int) -> str:
    return f"quant_linear_{fmt}_{n}x{k}"


def dequant_name(fmt: str, n: int, k: int) -> str:
    return f"dequantize_{fmt}_{n}x{k}"


def _lo(fmt, QS, D, MN, n, b, l):
    d = T.Cast("float32", D[n, b])
    if fmt == "q8_0":
        return T.Cast("float32", QS[n, b * 32 + l]) * d
    q = T.Cast("float32", QS[n, b * 16 + l] & T.uint8(15))
    if fmt == "q4_0":
        return q * d - d * T.float32(8)
    return q * d + T.Cast("float32", MN[n, b])


def _hi(fmt, QS, D, MN, n, b, l):
    d = T.Cast("float32", D[n, b])
    if fmt == "q8_0":
        return T.Cast("float32", QS[n, b * 32 + 16 + l]) * d
    q = T.Cast("float32", QS[n, b * 16 + l] >> T.uint8(4))
    if fmt == "q4_0":
        return q * d - d * T.float32(8)
    return q * d + T.Cast("float32", MN[n, b])


def make_quant_linear(fmt: str, N: int, K: int, R: int = DEFAULT_R, MT: int = DEFAULT_MT):
    """PrimFunc `quant_linear_<fmt>_<N>x<K>(x, qs, d, m, y)`: y = x @ dequant(W)^T, M dynamic.

    Every format takes the same five arguments; q8_0 / q4_0 have no `m` part and ignore
    it (callers pass `d` again). x [M, K] f32, y [M, N] f32, both contiguous.
    """
    _check(fmt, N, K)
    if MT * R * LANES * 4 >= 1024:
        raise ValueError("accumulator tile must stay under TVM's 1 KiB stack-alloca limit (MT * R < 16)")
    NB = K // BLOCK
    NT = (N + R - 1) // R
    QW = K if fmt == "q8_0" else K // 2
    QDT = "int8" if fmt == "q8_0" else "uint8"
    name = kernel_name(fmt, N, K)

    @T.prim_func(s_tir=True)
    def func(x_h: T.handle, qs_h: T.handle, d_h: T.handle, m_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        M = T.int64()
        X = T.match_buffer(x_h, (M, K), "float32")
        QS = T.match_buffer(qs_h, (N, QW), QDT)
        D = T.match_buffer(d_h, (N, NB), "float16")
        MN = T.match_buffer(m_h, (N, NB), "float16")
        Y = T.match_buffer(y_h, (M, N), "float32")
        for nt in T.parallel(NT):
            W = T.alloc_buffer((R, 32), "float32", scope="global")
            acc = T.alloc_buffer((MT, R, LANES), "float32", scope="global")
            red = T.alloc_buffer((8,), "float32", scope="global")
            for mo in range(M // MT):
                for t in T.unroll(MT):
                    for r in T.unroll(R):
                        for l in T.vectorized(LANES):
                            acc[t, r, l] = T.float32(0)
                for b in range(NB):
                    for r in T.unroll(R):
                        for l in T.vectorized(LANES):
                            W[r, l] = _lo(fmt, QS, D, MN, T.min(nt * R + r, N - 1), b, l)
                            W[r, 16 + l] = _hi(fmt, QS, D, MN, T.min(nt * R + r, N - 1), b, l)
                    for t in T.unroll(MT):
                        for r in T.unroll(R):
                            for l in T.vectorized(LANES):
                                acc[t, r, l] = acc[t, r, l] + W[r, l] * X[mo * MT + t, b * 32 + l] + W[r, 16 + l] * X[mo * MT + t, b * 32 + 16 + l]
                for t in T.unroll(MT):
                    for r in T.unroll(R):
                        for l in T.vectorized(8):
                            red[l] = acc[t, r, l] + acc[t, r, l + 8]
                        for l in T.vectorized(4):
                            red[l] = red[l] + red[l + 4]
                        for l in T.vectorized(2):
                            red[l] = red[l] + red[l + 2]
                        Y[mo * MT + t, T.min(nt * R + r, N - 1)] = red[0] + red[1]
            for mr in range(M % MT):
                for r in T.unroll(R):
                    for l in T.vectorized(LANES):
                        acc[0, r, l] = T.float32(0)
                for b in range(NB):
                    for r in T.unroll(R):
                        for l in T.vectorized(LANES):
                            acc[0, r, l] = acc[0, r, l] + _lo(fmt, QS, D, MN, T.min(nt * R + r, N - 1), b, l) * X[M // MT * MT + mr, b * 32 + l] + _hi(fmt, QS, D, MN, T.min(nt * R + r, N - 1), b, l) * X[M // MT * MT + mr, b * 32 + 16 + l]
                for r in T.unroll(R):
                    for l in T.vectorized(8):
                        red[l] = acc[0, r, l] + acc[0, r, l + 8]
                    for l in T.vectorized(4):
                        red[l] = red[l] + red[l + 4]
                    for l in T.vectorized(2):
                        red[l] = red[l] + red[l + 2]
                    Y[M // MT * MT + mr, T.min(nt * R + r, N - 1)] = red[0] + red[1]

    return func


def make_dequantize(fmt: str, N: int, K: int):
    """PrimFunc `dequantize_<fmt>_<N>x<K>(qs, d, m, w)`: w [N, K] f32 = dequant(parts)."""
    _check(fmt, N, K)
    NB = K // BLOCK
    QW = K if fmt == "q8_0" else K // 2
    QDT = "int8" if fmt == "q8_0" else "uint8"
    name = dequant_name(fmt, N, K)

    @T.prim_func(s_tir=True)
    def func(qs_h: T.handle, d_h: T.handle, m_h: T.handle, w_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        QS = T.match_buffer(qs_h, (N, QW), QDT)
        D = T.match_buffer(d_h, (N, NB), "float16")
        MN = T.match_buffer(m_h, (N, NB), "float16")
        W = T.match_buffer(w_h, (N, K), "float32")
        for n in T.parallel(N):
            for b in range(NB):
                for l in T.vectorized(LANES):
                    W[n, b * 32 + l] = _lo(fmt, QS, D, MN, n, b, l)
                    W[n, b * 32 + 16 + l] = _hi(fmt, QS, D, MN, n, b, l)

    return func


def make_module(specs, dequant: bool = True):
    """IRModule with a quant_linear (and a dequantize) function per (fmt, N, K) in specs."""

    funcs = {}
    for fmt, n, k in specs:
        funcs[kernel_name(fmt, n, k)] = make_quant_linear(fmt, n, k)
        if dequant:
            funcs[dequant_name(fmt, n, k)] = make_dequantize(fmt, n, k)
    return tvm.IRModule(funcs)
