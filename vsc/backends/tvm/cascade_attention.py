"""TVM kernel for cascade decode attention: a prefix that several decoding sequences hold in the
same physical blocks (the prefix cache gives them that) is read once for all of them.

`cascade_attention_<Hq>_<Hk>_<D>_b<BS>(q, k_cache, v_cache, blocks, members, chunk, scale, out,
lse, part_o, part_ml)`:
  q         [R, Hq*D] f32 (rows may be strided)   the step's one-token queries
  k/v_cache [slots, Hk, D] f32
  blocks    [NB] int64                             the shared prefix's blocks (NB*BS tokens)
  members   [M] int64                              the rows of q / out whose contexts start with them
  chunk     int64                                  prefix blocks per split (P = part_o.shape[2] splits)
  out, lse  [R, Hq*D], [R, Hq] f32                 on entry: every row's attention over the rest of
                                                   its own context and its log softmax denominator
                                                   (paged_attention with its `lse`); on exit the
                                                   members' rows hold attention over prefix + rest
  part_o    [M, Hk, P, G, D], part_ml [M, Hk, P, G, 2] f32 scratch

Schedule: one task per (16 members, kv head, split) of a `T.parallel` loop runs the prefill
kernel's flash tile (prefill_attention.flash_tile) with the members in the vector lanes and no
mask: each K/V row of the prefix is loaded once for 16 sequences x G heads (a [16 x G, prefix]
GEMM per kv head, where decode attention reads the prefix once per sequence); a second parallel
loop merges each member's splits and its own part by their softmax statistics (FlashInfer's
cascade / shared-prefix attention). Exact up to the summation order.
"""
from __future__ import annotations

import tvm  # noqa: F401  (TVMScript needs tvm initialised)

from vsc.backends.tvm.prefill_attention import QROWS, Vec16, flash_tile, group_dims
from vsc.backends.tvm.vector_ir import ALIGN, match_attention_inputs


def cascade_attention_name(hq: int, hk: int, d: int, bs: int) -> str:
    return f"cascade_attention_{hq}_{hk}_{d}_b{bs}"


def make_cascade_attention(HQ: int, HK: int, D: int, BS: int):
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as B

    G, DC = group_dims("cascade", HQ, HK, D, BS)
    L = QROWS
    v = Vec16()

    with IRBuilder() as ib:
        with B.prim_func(s_tir=True):
            B.func_name(cascade_attention_name(HQ, HK, D, BS))
            B.func_attr({"tirx.noalias": True})
            q_h, kc_h, vc_h, bl_h, mb_h = (B.arg(a, B.handle()) for a in ("q", "k_cache", "v_cache", "blocks", "members"))
            chunk = B.arg("chunk", tirx.Var("chunk", "int64"))
            scale = B.arg("scale", tirx.Var("scale", "float32"))
            o_h, lse_h, po_h, pm_h = (B.arg(a, B.handle()) for a in ("out", "lse", "part_o", "part_ml"))
            R, NB, M, P = (B.int64() for _ in range(4))
            Q, KC, VC = match_attention_inputs(q_h, kc_h, vc_h, R, HQ, HK, D)
            BL = B.match_buffer(bl_h, (NB,), "int64", align=8)
            MB = B.match_buffer(mb_h, (M,), "int64", align=8)
            O = B.match_buffer(o_h, (R, HQ * D), "float32", align=ALIGN)
            LSE = B.match_buffer(lse_h, (R, HQ), "float32", align=ALIGN)
            PO = B.match_buffer(po_h, (M, HK, P, G, D), "float32", align=ALIGN)
            PM = B.match_buffer(pm_h, (M, HK, P, G, 2), "float32", align=ALIGN)

            ntiles = (M + L - 1) // L
            with B.parallel(v.i64(0), ntiles * HK * P) as task:
                p = task % P
                j = task // P % HK
                m0 = task // (P * HK) * L
                nrows = tirx.Min(v.i64(L), M - m0)
                first = p * chunk
                Ob, Mv, Lv = flash_tile(
                    v, G, D, BS, j,
                    lambda h, d, i: Q[MB[m0 + tirx.Min(i, nrows - 1)], (j * G + h) * D + d] * scale,
                    tirx.Max(v.i64(0), tirx.Min(NB, first + chunk) - first), lambda blk: BL[first + blk], KC, VC)
                with v.loop(nrows) as i:
                    for h in range(G):
                        B.buffer_store(PM, Mv[h * L + i], [m0 + i, j, p, h, 0])
                        B.buffer_store(PM, Lv[h * L + i], [m0 + i, j, p, h, 1])
                        for c in range(DC):
                            B.buffer_store(PO, Ob.vload([(h * L + i) * D + c * 16], v.f32v),
                                           [m0 + i, j, p, h, tirx.Ramp(c * 16, 1, L)])
            # merge: each member's splits of the prefix and its own part (out, lse on entry)
            with B.parallel(v.i64(0), M * HK) as mg:
                acc = B.alloc_buffer((D,), "float32", scope="global")
                st = B.alloc_buffer((3,), "float32", scope="global")     # max, sum, weight
                m = mg // HK
                j = mg % HK
                row = MB[m]
                for h in range(G):
                    hq = j * G + h
                    B.buffer_store(st, LSE[row, hq], [0])
                    with v.loop(P) as p:
                        B.buffer_store(st, tirx.Max(st[0], PM[m, j, p, h, 0]), [0])
                    B.buffer_store(st, tirx.exp(LSE[row, hq] - st[0]), [2])
                    B.buffer_store(st, st[2], [1])
                    for c in range(DC):
                        B.buffer_store(acc, O.vload([row, hq * D + c * 16], v.f32v) * v.bc(st[2]),
                                       [tirx.Ramp(c * 16, 1, L)])
                    with v.loop(P) as p:
                        B.buffer_store(st, tirx.exp(PM[m, j, p, h, 0] - st[0]), [2])
                        B.buffer_store(st, st[1] + PM[m, j, p, h, 1] * st[2], [1])
                        for c in range(DC):
                            B.buffer_store(acc, v.fma(PO.vload([m, j, p, h, c * 16], v.f32v), v.bc(st[2]),
                                                      acc.vload([c * 16], v.f32v)), [tirx.Ramp(c * 16, 1, L)])
                    for c in range(DC):
                        B.buffer_store(O, acc.vload([c * 16], v.f32v) / v.bc(st[1]),
                                       [row, tirx.Ramp(hq * D + c * 16, 1, L)])
    return ib.get()

