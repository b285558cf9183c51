"""TVM kernel for float32 linear layers: y[M, N] = x[M, K] @ W[N, K]^T (W as the checkpoint stores it).

`linear_f32_<N>x<K>(x, w, y)`, M dynamic. The same schedule as the quantized kernels
(quant_linear.py) without the unpacking: rows of W R at a time in a `T.parallel` loop (the last
tile clamps its row index instead of a tail loop), rows of x MT at a time, each W vector load
reused for the MT rows of x and each x load for the R rows of W, 16-lane fp32 FMAs along K,
a shuffle-tree sum per output; one row of x (batch-1 decode) gets its own loop that reads W
strictly in order, a row at a time (GEMV_R rows per task). It exists so that a float plan's decode forward can compile
into one Relax function (compile-decode-step) and so that select-kernels can weigh it against
torch's GEMM on the target (kernel_costs).
"""
from __future__ import annotations

import tvm  # noqa: F401  (TVMScript needs tvm initialised)
from tvm.script import tirx as T

from vsc.backends.tvm.vector_ir import vector_width, zero_row, zero_tile

LANES = 16
ALIGN = 4
DEFAULT_R = 3
DEFAULT_MT = 4
#: Rows of W per parallel task when x has one row (batch-1 decode), read one row after another.
#: SmolLM2's linears, 30 layers + head (538 MB), 2 threads, best of 6, alternating with a torch sum
#: over as many bytes in the same process (the box's bandwidth moves by 2x within minutes):
#: the M > 1 schedule (3 rows interleaved) 18.7 / 15.9 GB/s at sum 32.2 / 29.6; 12 rows interleaved
#: 28.0 / 24.9 / 24.6 at sum 32.2 / 29.6 / 59.1; rows one after another (this) 29.2 / 45.9 at sum
#: 32.3 / 59.1 (R 12 or 48 alike). bench/RESULTS.md.
GEMV_R = 12


def linear_name(n: int, k: int) -> str:
    return f"linear_f32_{n}x{k}"


def make_linear(N: int, K: int, R: int = DEFAULT_R, MT: int = DEFAULT_MT, R1: int = GEMV_R):
    if N <= 0 or K <= 0:
        raise ValueError(f"linear: bad weight shape [{N}, {K}]")
    V = vector_width(K)
    KB = K // V
    R = min(R, N)
    NT = -(-N // R)
    R1 = min(R1, N)
    NT1 = -(-N // R1)
    name = linear_name(N, K)

    @T.macro
    def store_sum(acc, t, r, red, Y, m, n):
        # Y[m, n] = the sum of accumulator (t, r)'s lanes (a shuffle tree at 16 lanes)
        for l in T.vectorized(V):
            red[l] = acc[t, r, l]
        if V == LANES:
            for l in T.vectorized(8):
                red[l] = red[l] + red[l + 8]
            for l in T.vectorized(4):
                red[l] = red[l] + red[l + 4]
            for l in T.vectorized(2):
                red[l] = red[l] + red[l + 2]
            Y[m, n] = red[0] + red[1]
        else:
            for l in range(1, V):
                red[0] = red[0] + red[l]
            Y[m, n] = red[0]

    # The M > 1 schedule's two steps for row m of x, used by its MT-row tiles and by its M % MT
    # tail (one row, no loop over rows)
    @T.macro
    def dot_row(acc, W, X, nt, kb, t, m):
        # acc[t, r] += W's row r of tile nt times x's row m, lanewise, in K block kb (r < R)
        for r in T.unroll(R):
            for l in T.vectorized(V):
                acc[t, r, l] = acc[t, r, l] + W[T.min(nt * R + r, N - 1), kb * V + l] * X[m, kb * V + l]

    @T.macro
    def store_row(acc, red, Y, nt, t, m):
        # Y[m, the R rows of tile nt] = the sums of accumulators (t, 0 .. R - 1)
        for r in T.unroll(R):
            store_sum(acc, t, r, red, Y, m, T.min(nt * R + r, N - 1))

    @T.prim_func(s_tir=True)
    def func(x_h: T.handle, w_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        M = T.int64()
        X = T.match_buffer(x_h, (M, K), "float32", align=ALIGN)
        W = T.match_buffer(w_h, (N, K), "float32", align=ALIGN)
        Y = T.match_buffer(y_h, (M, N), "float32", align=ALIGN)
        if M == 1:
            # batch-1 decode: row after row of a tile of R1 rows (W read strictly in order, which
            # the hardware prefetchers stream best), two accumulators per row (even / odd K blocks)
            for nt in T.parallel(NT1):
                acc1 = T.alloc_buffer((1, 2, LANES), "float32", scope="global")
                red1 = T.alloc_buffer((LANES,), "float32", scope="global")
                for r in range(T.min(R1, N - nt * R1)):
                    for l in T.vectorized(V):
                        acc1[0, 0, l] = T.float32(0)
                        acc1[0, 1, l] = T.float32(0)
                    for kb in range(KB // 2):
                        for l in T.vectorized(V):
                            acc1[0, 0, l] = acc1[0, 0, l] + W[nt * R1 + r, 2 * kb * V + l] * X[0, 2 * kb * V + l]
                            acc1[0, 1, l] = acc1[0, 1, l] + W[nt * R1 + r, (2 * kb + 1) * V + l] * X[0, (2 * kb + 1) * V + l]
                    if KB % 2 == 1:
                        for l in T.vectorized(V):
                            acc1[0, 0, l] = acc1[0, 0, l] + W[nt * R1 + r, (KB - 1) * V + l] * X[0, (KB - 1) * V + l]
                    for l in T.vectorized(V):
                        acc1[0, 0, l] = acc1[0, 0, l] + acc1[0, 1, l]
                    store_sum(acc1, 0, 0, red1, Y, 0, nt * R1 + r)
        for nt in T.parallel(NT if M > 1 else 0):
            acc = T.alloc_buffer((MT, R, LANES), "float32", scope="global")
            red = T.alloc_buffer((LANES,), "float32", scope="global")
            for mo in range(M // MT):
                zero_tile(acc, MT, R, V)
                for kb in range(KB):
                    for t in T.unroll(MT):
                        dot_row(acc, W, X, nt, kb, t, mo * MT + t)
                for t in T.unroll(MT):
                    store_row(acc, red, Y, nt, t, mo * MT + t)
            for mr in range(M % MT):
                zero_row(acc, 0, R, V)
                for kb in range(KB):
                    dot_row(acc, W, X, nt, kb, 0, M // MT * MT + mr)
                store_row(acc, red, Y, nt, 0, M // MT * MT + mr)
    return func


def make_linear_module(specs) -> "tvm.IRModule":
    """IRModule of `linear_f32_<N>x<K>` for each ("linear", N, K) in specs."""
    return tvm.IRModule({linear_name(n, k): make_linear(n, k) for _, n, k in specs})
