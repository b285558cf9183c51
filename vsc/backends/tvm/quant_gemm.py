"""TVM kernel for block-quantized linears over many rows (prefill): int8 activations x VNNI,
the weights unpacked once per call into column panels so that every vpdpbusd is a full one.

`quant_gemm_vnni_<fmt>_<N>x<K>(x, qs, d, m, y, xq, xs, xc)`: y ~= x @ dequant(W)^T, with x
quantized per 32-block exactly as the decode kernel (`quant_linear.make_quant_linear_vnni`)
does (dx = amax / 127, xq = round_half_even(x / dx)); only the order of the fp32 sums differs.

Why a second kernel: the decode kernel puts the K dimension in the vector lanes (one weight
row's block against one x row's block, summed across lanes at the end) and re-unpacks every
weight tile for each 3 rows of x; at M = 1024 it ran ~200 GOPS, about what oneDNN's fp32
GEMM does here, a quarter of what VNNI can do. This one is the GEMM form (llama.cpp's
repacked "interleaved" Q4 layouts are the same idea, done here per call so the weights stay
in memory as shipped):

  * the N outputs are cut into panels of 16 columns (`T.parallel` over panels); a panel's
    weights are unpacked once per call into a stack buffer `WP[b, kk, c, j]` (u8: block b,
    dword kk of the block's 32 values, column c, byte j of the dword), their scales into
    `DP[b, c]` / `MP[b, c]` (fp32), so one 64-byte load is a 16-column x 4-value vpdpbusd
    operand (q4 nibbles as 0..15; q8_0 as w + 128, its offset corrected below);
  * rows of x are taken MR at a time: per block, 8 vpdpbusd per row (the row's 4 int8 values
    broadcast to the 16 column lanes) into an int32 accumulator per row, then one fp32 update
    per row: acc += DP[b] * (dx * float(iacc) - off * cx) (+ MP[b] * cx for q4_1), where cx =
    dx * sum(xq of the block) and off is 8 for q4_0 ((q - 8) * xq), 128 for q8_0, 0 for q4_1;
    the M % MR tail rows one at a time;
  * x is quantized first, in its own parallel loop over rows, into `xq` (int32 [M, K / 4]:
    4 int8 per element, the layout the broadcast wants), `xs` (dx) and `xc` (cx) [M, K / 32].

N must be a multiple of 16 (every linear of the models served here is; others keep the
decode kernel). Buffers are declared align=4 (torch views need not be 64-byte aligned).
Measured numbers and the crossover against the decode kernel: bench/RESULTS.md.
"""
from __future__ import annotations

import tvm  # noqa: F401  (TVMScript needs tvm initialised)

from vsc.runtime.kernels.tvm_ops import gemm_kernel_name, gemm_scratch_shapes  # noqa: F401  (names: one place)
from vsc.backends.tvm.vector_ir import ALIGN, dpbusd, i32, lanes, match_quant_linear, shuffle, vstore
from vsc.runtime.quant import BLOCK, get_format

PANEL = 16     # output columns per panel (one zmm of int32 / fp32)
GEMM_MR = 8    # rows of x per register tile (4 / 6 / 8 measured within 5%; 8 best)
_OFFSET = {"q4_0": 8, "q4_1": 0, "q8_0": 128}


def gemm_supported(fmt: str, n: int, k: int) -> bool:
    """Whether make_quant_gemm_vnni builds for this weight shape."""
    return fmt in _OFFSET and n % PANEL == 0 and k % BLOCK == 0 and n > 0 and k > 0


def make_quant_gemm_vnni(fmt: str, N: int, K: int, MR: int = GEMM_MR):
    """PrimFunc `quant_gemm_vnni_<fmt>_<N>x<K>(x, qs, d, m, y, xq, xs, xc)` (see above).

    Needs an LLVM target with AVX-512 VNNI and VL. M dynamic; q8_0 / q4_0 ignore `m` (pass d)."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as B

    get_format(fmt)
    if not gemm_supported(fmt, N, K):
        raise ValueError(f"quant_gemm {fmt}: weight shape [{N}, {K}] needs N % {PANEL} == 0 and K % {BLOCK} == 0")
    NB = K // BLOCK
    NP = N // PANEL
    q8 = fmt == "q8_0"
    OFF = _OFFSET[fmt]

    def f32(v):
        return tirx.const(v, "float32")

    def bc(v, n):
        return tirx.Broadcast(v, n)

    def reduce(v, op):
        n = lanes(v)
        while n > 1:
            h = n // 2
            v = B.bind(op(shuffle(v, range(h)), shuffle(v, range(h, n))))
            n = h
        return v

    with IRBuilder() as ib:
        with B.prim_func(s_tir=True):
            B.func_name(gemm_kernel_name(fmt, N, K))
            B.func_attr({"tirx.noalias": True})
            handles = [B.arg(a, B.handle()) for a in ("x", "qs", "d", "m", "y", "xq", "xs", "xc")]
            M = B.int64()
            X, QS, D, MN, Y = match_quant_linear(handles, fmt, M, N, K)
            XQ = B.match_buffer(handles[5], (M, K // 4), "int32", align=ALIGN)
            XS = B.match_buffer(handles[6], (M, NB), "float32", align=ALIGN)
            XC = B.match_buffer(handles[7], (M, NB), "float32", align=ALIGN)

            # -- x quantized per 32-block, rows in parallel ----------------------------------
            with B.parallel(0, M) as mm:
                with B.serial(0, NB) as b:
                    x0 = B.bind(X.vload([mm, b * 32], "float32x16"))
                    x1 = B.bind(X.vload([mm, b * 32 + 16], "float32x16"))
                    amax = reduce(tirx.Max(B.abs(x0), B.abs(x1)), tirx.Max)
                    dx = B.bind(amax / f32(127.0))
                    inv = B.bind(tirx.Select(dx > f32(0.0), f32(1.0) / dx, f32(0.0)))
                    r0 = B.bind(B.nearbyint(x0 * bc(inv, 16)))
                    r1 = B.bind(B.nearbyint(x1 * bc(inv, 16)))
                    vstore(XQ, (mm, b * 8), B.reinterpret("int32x4", tirx.Cast("int8x16", r0)))
                    vstore(XQ, (mm, b * 8 + 4), B.reinterpret("int32x4", tirx.Cast("int8x16", r1)))
                    B.buffer_store(XS, dx, [mm, b])
                    B.buffer_store(XC, dx * reduce(r0 + r1, lambda a, c: a + c), [mm, b])

            # -- per panel of 16 output columns ----------------------------------------------
            with B.parallel(0, NP) as p:
                WP = B.alloc_buffer((NB * 512,), "uint8", scope="global")
                DP = B.alloc_buffer((NB * PANEL,), "float32", scope="global")
                MP = B.alloc_buffer((NB * PANEL,), "float32", scope="global") if fmt == "q4_1" else None
                accs = [B.alloc_buffer((PANEL,), "float32", scope="global") for _ in range(MR)]
                with B.serial(0, PANEL) as c:
                    n = p * PANEL + c
                    with B.serial(0, NB) as b:
                        B.buffer_store(DP, tirx.Cast("float32", D[n, b]), [b * PANEL + c])
                        if MP is not None:
                            B.buffer_store(MP, tirx.Cast("float32", MN[n, b]), [b * PANEL + c])
                        if q8:
                            w = QS.vload([n, b * 32], "int8x32")
                            vals = B.bind(B.reinterpret("uint8x32", tirx.bitwise_xor(w, bc(tirx.const(-128, "int8"), 32))))
                            halves = [(vals, range(8))]
                        else:
                            w = QS.vload([n, b * 16], "uint8x16")
                            lo = B.bind(tirx.bitwise_and(w, bc(tirx.const(15, "uint8"), 16)))
                            hi = B.bind(tirx.shift_right(w, bc(tirx.const(4, "uint8"), 16)))
                            halves = [(lo, range(4)), (hi, range(4, 8))]
                        for vec, kks in halves:
                            for i, kk in enumerate(kks):
                                vstore(WP, (b * 512 + kk * 64 + c * 4,), shuffle(vec, range(4 * i, 4 * i + 4)))

                def tile(rows):
                    for t in range(len(rows)):
                        vstore(accs[t], (0,), bc(f32(0.0), PANEL))
                    with B.serial(0, NB) as b:
                        ws = [B.bind(WP.vload([b * 512 + kk * 64], "uint8x64")) for kk in range(8)]
                        dpv = B.bind(DP.vload([b * PANEL], "float32x16"))
                        mpv = B.bind(MP.vload([b * PANEL], "float32x16")) if MP is not None else None
                        for t, mm in enumerate(rows):
                            acc = bc(i32(0), 16)
                            for kk in range(8):
                                xv = B.reinterpret("int8x64", bc(XQ[mm, b * 8 + kk], 16))
                                acc = dpbusd(acc, ws[kk], xv)
                            g = tirx.Cast("float32x16", acc) * bc(XS[mm, b], 16)
                            if OFF:
                                g = g - bc(XC[mm, b] * f32(float(OFF)), 16)
                            upd = dpv * g
                            if mpv is not None:
                                upd = upd + mpv * bc(XC[mm, b], 16)
                            vstore(accs[t], (0,), accs[t].vload([0], "float32x16") + upd)
                    for t, mm in enumerate(rows):
                        vstore(Y, (mm, p * PANEL), accs[t].vload([0], "float32x16"))

                with B.serial(0, M // MR) as mo:
                    tile([mo * MR + t for t in range(MR)])
                with B.serial(0, M % MR) as mr:
                    tile([M // MR * MR + mr])
    return ib.get()
