"""TVM kernels for attention over the paged KV cache, read in place through the block table.

`kv_write_<Hk>_<D>(k, v, slots, k_cache, v_cache)`: rows of k / v [T, Hk*D] stored at their
cache slots (caches [slots, Hk, D] float32; v may be a column slice of a wider matrix).

`paged_attention_<Hq>_<Hk>_<D>_b<BS>(q, k_cache, v_cache, tables, lens, chunk, scale, out, part_o,
part_ml, lse)`: one query row per entry of `lens`; row r attends to the first lens[r] positions
of its context, whose blocks tables[r, :] lists (BS-token blocks). out [R, Hq*D]; lse [R, Hq]
the log of each row's softmax denominator (max + log sum), which the cascade kernel
(cascade_attention.py) merges a shared prefix's part with. This is
decode attention (one new token per sequence) and also the short spans of a prefill step
(speculative verify, jump-forward): each of their rows is a query over its own prefix.

Schedule (flash-decoding on the CPU):
  * one task per (row, kv head, split) in a `T.parallel` loop: the Hq/Hk query heads of a GQA
    group share each K and V row load (read once per group, not once per query head);
  * a task walks its blocks a block (BS tokens) at a time: the group's scores for the
    tile (dot products vectorized over head_dim, 16 lanes, a shuffle-tree sum), then the
    online-softmax rescale once per tile, then the V rows accumulated into [G, D];
  * split-K: when rows x kv heads are too few to keep every core busy (one long sequence),
    the context is cut into `P` = part_o.shape[2] chunks of `chunk` blocks, each task writes
    its unnormalised output and (max, sum) to part_o / part_ml, and a second parallel loop
    merges them; with P = 1 the first loop writes `out` directly.
Local buffers use scope "global" (stack allocas inside the parallel loop, see quant_linear).
"""
from __future__ import annotations

import tvm  # noqa: F401  (TVMScript needs tvm initialised)
from tvm.script import tirx as T

from vsc.backends.tvm.vector_ir import ALIGN, match_attention_inputs, vector_width

LANES = 16
KINDS = ("kv_write", "paged_attention")


def kv_write_name(hk: int, d: int) -> str:
    return f"kv_write_{hk}_{d}"


def paged_attention_name(hq: int, hk: int, d: int, bs: int) -> str:
    return f"paged_attention_{hq}_{hk}_{d}_b{bs}"


def _check(hq: int, hk: int, d: int, bs: int = 1) -> None:
    if min(hq, hk, d, bs) <= 0 or hq % hk:
        raise ValueError(f"paged attention: heads {hq} must be a positive multiple of kv_heads {hk}")


def make_kv_write(HK: int, D: int):
    _check(HK, HK, D)
    name = kv_write_name(HK, D)
    NV = vector_width(D)

    @T.prim_func(s_tir=True)
    def func(k_h: T.handle, v_h: T.handle, s_h: T.handle, kc_h: T.handle, vc_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        N = T.int64()
        S = T.int64()
        ks = T.int64()
        vs = T.int64()
        K = T.match_buffer(k_h, (N, HK * D), "float32", strides=(ks, 1), align=ALIGN)
        V = T.match_buffer(v_h, (N, HK * D), "float32", strides=(vs, 1), align=ALIGN)
        SL = T.match_buffer(s_h, (N,), "int64", align=8)
        KC = T.match_buffer(kc_h, (S, HK, D), "float32", align=ALIGN)
        VC = T.match_buffer(vc_h, (S, HK, D), "float32", align=ALIGN)
        for t in range(N):
            for j in range(HK):
                for c in range(D // NV):
                    for l in T.vectorized(NV):
                        KC[SL[t], j, c * NV + l] = K[t, j * D + c * NV + l]
                        VC[SL[t], j, c * NV + l] = V[t, j * D + c * NV + l]
    return func


def make_paged_attention(HQ: int, HK: int, D: int, BS: int):
    _check(HQ, HK, D, BS)
    G = HQ // HK
    NV = vector_width(D)
    DC = D // NV
    name = paged_attention_name(HQ, HK, D, BS)
    NEG = -3.0e38

    @T.prim_func(s_tir=True)
    def func(q_h: T.handle, kc_h: T.handle, vc_h: T.handle, bt_h: T.handle, len_h: T.handle, chunk: T.int64,
             scale: T.float32, o_h: T.handle, po_h: T.handle, pm_h: T.handle, lse_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        R = T.int64()
        W = T.int64()
        P = T.int64()
        Q, KC, VC = match_attention_inputs(q_h, kc_h, vc_h, R, HQ, HK, D)
        BT = T.match_buffer(bt_h, (R, W), "int64", align=8)
        L = T.match_buffer(len_h, (R,), "int64", align=8)
        O = T.match_buffer(o_h, (R, HQ * D), "float32", align=ALIGN)
        PO = T.match_buffer(po_h, (R, HK, P, G, D), "float32", align=ALIGN)
        PM = T.match_buffer(pm_h, (R, HK, P, G, 2), "float32", align=ALIGN)
        LSE = T.match_buffer(lse_h, (R, HQ), "float32", align=ALIGN)
        for task in T.parallel(R * HK * P):
            qv = T.alloc_buffer((G, D), "float32", scope="global")
            acc = T.alloc_buffer((G, D), "float32", scope="global")
            sc = T.alloc_buffer((G, BS), "float32", scope="global")
            st = T.alloc_buffer((G, 2), "float32", scope="global")     # running max, running sum
            red = T.alloc_buffer((G, LANES), "float32", scope="global")
            tmax = T.alloc_buffer((1,), "float32", scope="global")
            for h in range(G):
                st[h, 0] = T.float32(NEG)
                st[h, 1] = T.float32(0)
                for c in range(DC):
                    for l in T.vectorized(NV):
                        qv[h, c * NV + l] = Q[task // (HK * P), (task // P % HK * G + h) * D + c * NV + l] * scale
                        acc[h, c * NV + l] = T.float32(0)
            for blk in range(T.max(T.int64(0), T.min(task % P * chunk + chunk, (L[task // (HK * P)] + BS - 1) // BS)
                                   - task % P * chunk)):
                # the tile's scores, one K row load per token for the whole GQA group
                for t in range(T.min(T.int64(BS), L[task // (HK * P)] - (task % P * chunk + blk) * BS)):
                    for h in range(G):
                        for l in T.vectorized(NV):
                            red[h, l] = qv[h, l] * KC[BT[task // (HK * P), task % P * chunk + blk] * BS + t,
                                                     task // P % HK, l]
                        for c in range(1, DC):
                            for l in T.vectorized(NV):
                                red[h, l] = red[h, l] + qv[h, c * NV + l] * KC[
                                    BT[task // (HK * P), task % P * chunk + blk] * BS + t, task // P % HK, c * NV + l]
                        if NV == LANES:
                            for l in T.vectorized(8):
                                red[h, l] = red[h, l] + red[h, l + 8]
                            for l in T.vectorized(4):
                                red[h, l] = red[h, l] + red[h, l + 4]
                            for l in T.vectorized(2):
                                red[h, l] = red[h, l] + red[h, l + 2]
                            sc[h, t] = red[h, 0] + red[h, 1]
                        else:
                            sc[h, t] = T.float32(0)
                            for l in range(NV):
                                sc[h, t] = sc[h, t] + red[h, l]
                # online softmax: rescale once per tile
                for h in range(G):
                    tmax[0] = st[h, 0]
                    for t in range(T.min(T.int64(BS), L[task // (HK * P)] - (task % P * chunk + blk) * BS)):
                        tmax[0] = T.max(tmax[0], sc[h, t])
                    st[h, 1] = st[h, 1] * T.exp(st[h, 0] - tmax[0])
                    for c in range(DC):
                        for l in T.vectorized(NV):
                            acc[h, c * NV + l] = acc[h, c * NV + l] * T.exp(st[h, 0] - tmax[0])
                    st[h, 0] = tmax[0]
                    for t in range(T.min(T.int64(BS), L[task // (HK * P)] - (task % P * chunk + blk) * BS)):
                        sc[h, t] = T.exp(sc[h, t] - tmax[0])
                        st[h, 1] = st[h, 1] + sc[h, t]
                for t in range(T.min(T.int64(BS), L[task // (HK * P)] - (task % P * chunk + blk) * BS)):
                    for h in range(G):
                        for c in range(DC):
                            for l in T.vectorized(NV):
                                acc[h, c * NV + l] = acc[h, c * NV + l] + sc[h, t] * VC[
                                    BT[task // (HK * P), task % P * chunk + blk] * BS + t, task // P % HK, c * NV + l]
            if P == 1:
                for h in range(G):
                    LSE[task // (HK * P), task // P % HK * G + h] = st[h, 0] + T.log(st[h, 1])
                    for c in range(DC):
                        for l in T.vectorized(NV):
                            O[task // (HK * P), (task // P % HK * G + h) * D + c * NV + l] = \
                                acc[h, c * NV + l] / st[h, 1]
            else:
                for h in range(G):
                    PM[task // (HK * P), task // P % HK, task % P, h, 0] = st[h, 0]
                    PM[task // (HK * P), task // P % HK, task % P, h, 1] = st[h, 1]
                    for c in range(DC):
                        for l in T.vectorized(NV):
                            PO[task // (HK * P), task // P % HK, task % P, h, c * NV + l] = acc[h, c * NV + l]
        if P > 1:
            for rg in T.parallel(R * HK):
                mm = T.alloc_buffer((3,), "float32", scope="global")   # max, sum, weight
                out = T.alloc_buffer((D,), "float32", scope="global")
                for h in range(G):
                    mm[0] = T.float32(NEG)
                    mm[1] = T.float32(0)
                    for p in range(P):
                        mm[0] = T.max(mm[0], PM[rg // HK, rg % HK, p, h, 0])
                    for c in range(DC):
                        for l in T.vectorized(NV):
                            out[c * NV + l] = T.float32(0)
                    for p in range(P):
                        mm[2] = T.exp(PM[rg // HK, rg % HK, p, h, 0] - mm[0])
                        mm[1] = mm[1] + PM[rg // HK, rg % HK, p, h, 1] * mm[2]
                        for c in range(DC):
                            for l in T.vectorized(NV):
                                out[c * NV + l] = out[c * NV + l] + PO[rg // HK, rg % HK, p, h, c * NV + l] * mm[2]
                    LSE[rg // HK, rg % HK * G + h] = mm[0] + T.log(mm[1])
                    for c in range(DC):
                        for l in T.vectorized(NV):
                            O[rg // HK, (rg % HK * G + h) * D + c * NV + l] = out[c * NV + l] / mm[1]
    return func


def make_attention_module(specs) -> "tvm.IRModule":
    """IRModule of the attention kernels `specs` names: ("kv_write", Hk, D) and
    ("paged_attention", Hq, Hk, D, BS) (with the prefill and cascade kernels of the same dimensions)."""
    from vsc.backends.tvm.prefill_attention import (
        make_prefill_attention, make_short_attention, prefill_attention_name, prefill_supported, short_attention_name)
    from vsc.backends.tvm.cascade_attention import cascade_attention_name, make_cascade_attention

    funcs = {}
    for kind, *dims in specs:
        if kind == "kv_write":
            funcs[kv_write_name(*dims)] = make_kv_write(*dims)
        elif kind == "paged_attention":
            funcs[paged_attention_name(*dims)] = make_paged_attention(*dims)
            if prefill_supported(*dims):      # the prompt side of the same op (prefill_attention.py)
                funcs[prefill_attention_name(*dims)] = make_prefill_attention(*dims)
                funcs[short_attention_name(*dims)] = make_short_attention(*dims)
                funcs[cascade_attention_name(*dims)] = make_cascade_attention(*dims)
        else:
            raise ValueError(f"unknown attention kernel {kind!r}")
    return tvm.IRModule(funcs)
