"""TVM kernels for the fused elementwise chains of a decoder layer, per model shape, rows dynamic.

Each replaces a chain of eager torch calls with one compiled call, which is what matters at
small batch on the CPU: a torch op costs a few microseconds of dispatch whatever its size,
and a layer's norms and rotations are ~15 of them.

    rmsnorm_<H>(x, w, y, eps)            y = x * rsqrt(mean(x^2) + eps) * w            (torch: 5 calls)
    add_rmsnorm_<H>(a, b, w, y, s, eps)  s = a + b; y = rmsnorm(s)                      (torch: 6 calls)
    silu_mul_<F>(x, y)                   y = silu(x[:, :F]) * x[:, F:]                   (torch: 3 calls)
    rope_<Hq>_<Hk>_<D>(q, k, cos, sin, qo, ko)
                                         HF rotate-half RoPE of q [T, Hq*D], k [T, Hk*D]
                                         by per-token cos/sin rows [T, D]                (torch: ~12 calls)

All float32, contiguous (any alignment), rows (M / T) dynamic, any size (16-lane vectors where 16
divides a row, narrower otherwise). Reductions accumulate per lane, then sum the lanes, so a norm
may differ from torch's in the last bit (the accuracy check after
select-kernels decides). Names carry the baked shapes; `vsc.runtime.kernels.tvm_ops` calls
them. Loops over rows are serial: at decode sizes a row is < 1 us of work and waking a
second thread costs more.
"""
from __future__ import annotations

import tvm  # noqa: F401  (TVMScript needs tvm initialised)
from tvm.script import tirx as T

from vsc.backends.tvm.vector_ir import vector_width

LANES = 16
ALIGN = 4  # torch tensors (views, row slices) need not be 64-byte aligned: no aligned vector loads


def rmsnorm_name(h: int) -> str:
    return f"rmsnorm_{h}"


def add_rmsnorm_name(h: int) -> str:
    return f"add_rmsnorm_{h}"


def silu_mul_name(f: int) -> str:
    return f"silu_mul_{f}"


def rope_name(hq: int, hk: int, d: int) -> str:
    return f"rope_{hq}_{hk}_{d}"


def _lanes(n: int, what: str) -> int:
    """vector_width(n), for a positive n (`what` names it in the error)."""
    if n <= 0:
        raise ValueError(f"{what} {n} is not positive")
    return vector_width(n)


def make_rmsnorm(H: int, fused_add: bool):
    V = _lanes(H, "hidden size")
    name = add_rmsnorm_name(H) if fused_add else rmsnorm_name(H)
    inv_h = 1.0 / H

    @T.macro
    def body(X, W, Y, eps, M, acc, red):
        for m in range(M):
            for l in T.vectorized(V):
                acc[l] = T.float32(0)
            for c in range(H // V):
                for l in T.vectorized(V):
                    acc[l] = acc[l] + X[m, c * V + l] * X[m, c * V + l]
            red[0] = T.float32(0)
            for l in range(V):
                red[0] = red[0] + acc[l]
            red[1] = T.rsqrt(red[0] * T.float32(inv_h) + eps)
            for c in range(H // V):
                for l in T.vectorized(V):
                    Y[m, c * V + l] = X[m, c * V + l] * red[1] * W[c * V + l]

    if fused_add:
        @T.prim_func(s_tir=True)
        def func(a_h: T.handle, b_h: T.handle, w_h: T.handle, eps: T.float32, y_h: T.handle, s_h: T.handle):
            T.func_attr({"global_symbol": name, "tirx.noalias": True})
            M = T.int64()
            A = T.match_buffer(a_h, (M, H), "float32", align=ALIGN)
            B = T.match_buffer(b_h, (M, H), "float32", align=ALIGN)
            W = T.match_buffer(w_h, (H,), "float32", align=ALIGN)
            Y = T.match_buffer(y_h, (M, H), "float32", align=ALIGN)
            S = T.match_buffer(s_h, (M, H), "float32", align=ALIGN)
            acc = T.alloc_buffer((LANES,), "float32", scope="global")
            red = T.alloc_buffer((LANES,), "float32", scope="global")
            for m in range(M):
                for c in range(H // V):
                    for l in T.vectorized(V):
                        S[m, c * V + l] = A[m, c * V + l] + B[m, c * V + l]
            body(S, W, Y, eps, M, acc, red)
        return func

    @T.prim_func(s_tir=True)
    def func(x_h: T.handle, w_h: T.handle, eps: T.float32, y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        M = T.int64()
        X = T.match_buffer(x_h, (M, H), "float32", align=ALIGN)
        W = T.match_buffer(w_h, (H,), "float32", align=ALIGN)
        Y = T.match_buffer(y_h, (M, H), "float32", align=ALIGN)
        acc = T.alloc_buffer((LANES,), "float32", scope="global")
        red = T.alloc_buffer((LANES,), "float32", scope="global")
        body(X, W, Y, eps, M, acc, red)
    return func


def make_silu_mul(F: int):
    V = _lanes(F, "intermediate size")
    name = silu_mul_name(F)

    @T.prim_func(s_tir=True)
    def func(x_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        M = T.int64()
        X = T.match_buffer(x_h, (M, 2 * F), "float32", align=ALIGN)
        Y = T.match_buffer(y_h, (M, F), "float32", align=ALIGN)
        for m in range(M):
            for c in range(F // V):
                for l in T.vectorized(V):
                    Y[m, c * V + l] = X[m, c * V + l] / (T.float32(1) + T.exp(T.float32(0) - X[m, c * V + l])) \
                        * X[m, F + c * V + l]
    return func


def make_rope(HQ: int, HK: int, D: int):
    if D <= 0 or D % 2:
        raise ValueError(f"head_dim {D} must be even")
    name = rope_name(HQ, HK, D)
    half = D // 2
    lanes = _lanes(half, "half head_dim")

    @T.macro
    def rotate(X, XO, heads, m, C, S):
        for h in range(heads):
            for c in range(half // lanes):
                for l in T.vectorized(lanes):
                    XO[m, h * D + c * lanes + l] = X[m, h * D + c * lanes + l] * C[m, c * lanes + l] \
                        - X[m, h * D + half + c * lanes + l] * S[m, c * lanes + l]
                    XO[m, h * D + half + c * lanes + l] = X[m, h * D + half + c * lanes + l] * C[m, half + c * lanes + l] \
                        + X[m, h * D + c * lanes + l] * S[m, half + c * lanes + l]

    @T.prim_func(s_tir=True)
    def func(q_h: T.handle, k_h: T.handle, c_h: T.handle, s_h: T.handle, qo_h: T.handle, ko_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        M = T.int64()
        Q = T.match_buffer(q_h, (M, HQ * D), "float32", align=ALIGN)
        K = T.match_buffer(k_h, (M, HK * D), "float32", align=ALIGN)
        C = T.match_buffer(c_h, (M, D), "float32", align=ALIGN)
        S = T.match_buffer(s_h, (M, D), "float32", align=ALIGN)
        QO = T.match_buffer(qo_h, (M, HQ * D), "float32", align=ALIGN)
        KO = T.match_buffer(ko_h, (M, HK * D), "float32", align=ALIGN)
        for m in range(M):
            rotate(Q, QO, HQ, m, C, S)
            rotate(K, KO, HK, m, C, S)
    return func


def gather_rows_name(k: int) -> str:
    return f"gather_rows_{k}"


def make_gather_rows(K: int):
    """`gather_rows_<K>(index, table, y)`: y[m, :] = table[index[m], :] (an embedding or a folded
    RoPE table looked up by position; index int64 [M], table f32 [N, K], M and N dynamic).
    An index outside the table is clamped to it (the compiled step trusts no input to be in range)."""
    V = _lanes(K, "row width")
    name = gather_rows_name(K)

    @T.prim_func(s_tir=True)
    def func(i_h: T.handle, t_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        M = T.int64()
        N = T.int64()
        IDX = T.match_buffer(i_h, (M,), "int64", align=8)
        TAB = T.match_buffer(t_h, (N, K), "float32", align=ALIGN)
        Y = T.match_buffer(y_h, (M, K), "float32", align=ALIGN)
        for m in range(M):
            for c in range(K // V):
                for l in T.vectorized(V):
                    Y[m, c * V + l] = TAB[T.max(T.min(IDX[m], N - 1), T.int64(0)), c * V + l]
    return func


def make_elementwise_module(specs):
    """IRModule of the elementwise kernels named by `specs`: ("rmsnorm", H), ("add_rmsnorm", H),
    ("silu_mul", F), ("rope", Hq, Hk, D)."""
    funcs = {}
    for spec in specs:
        kind, *dims = spec
        if kind == "rmsnorm":
            funcs[rmsnorm_name(*dims)] = make_rmsnorm(*dims, fused_add=False)
        elif kind == "add_rmsnorm":
            funcs[add_rmsnorm_name(*dims)] = make_rmsnorm(*dims, fused_add=True)
        elif kind == "silu_mul":
            funcs[silu_mul_name(*dims)] = make_silu_mul(*dims)
        elif kind == "rope":
            funcs[rope_name(*dims)] = make_rope(*dims)
        else:
            raise ValueError(f"unknown elementwise kernel {kind!r}")
    return tvm.IRModule(funcs)
