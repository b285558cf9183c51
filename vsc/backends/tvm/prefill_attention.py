"""TVM kernel for the prompt side of attention: causal attention of a prefill step's new tokens
over their whole context, read in place from the paged KV cache through the block table.

`prefill_attention_<Hq>_<Hk>_<D>_b<BS>(q, k_cache, v_cache, tables, tiles, scale, out)`:
  q / out   [T, Hq*D] f32 (q's rows may be strided)   the step's query rows
  k/v_cache [slots, Hk, D] f32                          new K/V already written (kv_write)
  tables    [S, W] int64                                block tables of the step's sequences
  tiles     [NT, 4] int64                               (table row, first q row, rows <= 16,
                                                        position of the first row)
Row i of a tile sits at position pos0 + i of its sequence and attends to positions 0..pos0+i:
a prompt without cached context (pos0 = 0 for its first tile), the rest of a prompt behind a
prefix-cache hit, a chunk of a chunked prefill: all the same to the kernel, no gather, no
mask tensor. The host (vsc.runtime.kernels.tvm_ops.prefill_tiles) cuts every span into tiles
of up to 16 rows and orders them so that any contiguous share of the parallel loop holds
about as much work as another (causal tiles late in a prompt read more blocks).

Schedule, per (tile, kv head) task of a `T.parallel` loop (flash attention, rows in lanes):
  * the tile's queries for the G = Hq/Hk heads of the group, pre-scaled, transposed into
    Qt[h, d, 16 rows] once: one vector FMA then serves 16 query rows of one key;
  * per 16-token block of the context: scores four keys at a time (12 accumulators for
    G = 3, each key's D values broadcast from the cache row), causal mask by lane compare,
    online softmax per row in lanes (exp as a Cody-Waite range reduction and a degree-6
    polynomial: LLVM would scalarize a vector exp into libm calls), then P @ V with the
    output rows [16, D] kept in a stack buffer, 8 rows x 16 lanes of D per pass;
  * at the end out = O / l for the tile's real rows.
FMAs are explicit (llvm.fma), buffers align=4 (torch views), locals are stack allocas.
Measured against torch SDPA (gather + mask) in bench/RESULTS.md.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, NamedTuple

import tvm  # noqa: F401  (TVMScript needs tvm initialised)

from vsc.backends.tvm.vector_ir import ALIGN, match_attention_inputs

QROWS = 16       # query rows per tile (the vector lanes)
KEYS = 4         # keys scored together (8: within noise)
ROWS_PV = 8      # output rows per P @ V pass
NEG = -3.0e38


def prefill_attention_name(hq: int, hk: int, d: int, bs: int) -> str:
    return f"prefill_attention_{hq}_{hk}_{d}_b{bs}"


def short_attention_name(hq: int, hk: int, d: int, bs: int) -> str:
    return f"short_attention_{hq}_{hk}_{d}_b{bs}"


def short_rows(hq: int, hk: int) -> int:
    """Most rows of a span the short kernel takes: its G = hq/hk heads x rows fill the 16 lanes."""
    return QROWS // (hq // hk)


def prefill_supported(hq: int, hk: int, d: int, bs: int) -> bool:
    """Whether make_prefill_attention builds for these dimensions."""
    return hq > 0 and hk > 0 and hq % hk == 0 and d > 0 and d % 16 == 0 and bs > 0 and bs % KEYS == 0


class Vec16:
    """The 16-lane float helpers the flash tiles are written with (IRBuilder; call inside a prim_func)."""

    def __init__(self):
        from tvm import tirx
        from tvm.tirx.script.builder import ir as B
        self.tirx, self.B = tirx, B
        self.f32v = f"float32x{QROWS}"

    def f32(self, v):
        return self.tirx.const(v, "float32")

    def i64(self, v):
        return self.tirx.const(v, "int64")

    def bc(self, v, lanes=QROWS):
        return self.tirx.Broadcast(v, lanes)

    def fma(self, a, b, c):
        return self.B.call_llvm_pure_intrin(self.f32v, "llvm.fma.v16f32", a, b, c)

    def loop(self, n):
        """A serial loop with an int64 variable (the buffers' indices are int64)."""
        return self.B.serial(self.i64(0), n if not isinstance(n, int) else self.i64(n))

    def vstore(self, buf, idx, value):
        self.B.buffer_store(buf, value, [self.tirx.Ramp(idx, 1, QROWS)])

    def vexp(self, x):
        """exp of a float32x16 (x <= ~0 here): 2^n * p(r), r = x - n ln2, |r| <= ln2 / 2."""
        tirx, B, bc, f32, fma = self.tirx, self.B, self.bc, self.f32, self.fma
        x = B.bind(tirx.Max(x, bc(f32(-87.0))))
        n = B.bind(B.nearbyint(x * bc(f32(1.4426950408889634))))
        r = fma(n, bc(f32(-0.693359375)), x)
        r = B.bind(fma(n, bc(f32(2.12194440e-4)), r))
        p = bc(f32(1.0 / 720))
        for c in (1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
            p = fma(p, r, bc(f32(c)))
        e = B.reinterpret(self.f32v, tirx.shift_left(tirx.Cast(f"int32x{QROWS}", n) + bc(tirx.const(127, "int32")),
                                                      bc(tirx.const(23, "int32"))))
        return p * e


def flash_tile(v: "Vec16", G: int, D: int, BS: int, j, query, nblocks, block_id, KC, VC, visible=None):
    """One task of a flash-attention kernel with query rows in the 16 vector lanes: the G heads of
    kv head `j`, rows `query(head, d, lane)` (pre-scaled), over `nblocks` cache blocks whose ids
    `block_id(blk)` gives, every key visible unless `visible(key position)` gives a lane mask.
    Returns the stack buffers (Ob [G*16*D] unnormalised output rows, Mv [G*16] row max, Lv [G*16]
    row sum of exp) for the caller's epilogue."""
    tirx, B = v.tirx, v.B
    f32, bc, fma, loop, vstore, f32v, L = v.f32, v.bc, v.fma, v.loop, v.vstore, v.f32v, QROWS
    DC = D // 16
    Qt = B.alloc_buffer((G * D * L,), "float32", scope="global")
    Ob = B.alloc_buffer((G * L * D,), "float32", scope="global")
    Pb = B.alloc_buffer((G * BS * L,), "float32", scope="global")
    Mv = B.alloc_buffer((G * L,), "float32", scope="global")
    Lv = B.alloc_buffer((G * L,), "float32", scope="global")
    Cv = B.alloc_buffer((G * L,), "float32", scope="global")
    Sacc = B.alloc_buffer((G * KEYS * L,), "float32", scope="global")
    Oacc = B.alloc_buffer((ROWS_PV * 2 * L,), "float32", scope="global")
    # queries of the group, rows into lanes
    with loop(G * D) as hd:
        with loop(L) as i:
            B.buffer_store(Qt, query(hd // D, hd % D, i), [hd * L + i])
    with loop(G * L * DC) as z:
        vstore(Ob, z * L, bc(f32(0.0)))
    for h in range(G):
        vstore(Mv, h * L, bc(f32(NEG)))
        vstore(Lv, h * L, bc(f32(0.0)))
    with loop(nblocks) as blk:
        base = B.bind(block_id(blk) * BS)
        # scores, KEYS keys at a time; lanes = query rows. The accumulators live in stack buffers
        # carried through a d loop (LLVM keeps them in registers); fully unrolled chains let LLVM
        # reload Q for every key instead.
        with loop(BS // KEYS) as kg:
            for h in range(G):
                for t in range(KEYS):
                    vstore(Sacc, (h * KEYS + t) * L, bc(f32(0.0)))
            with loop(D) as d:
                qv = [B.bind(Qt.vload([(h * D + d) * L], f32v)) for h in range(G)]
                for t in range(KEYS):
                    kb = B.bind(bc(KC[base + kg * KEYS + t, j, d]))
                    for h in range(G):
                        at = (h * KEYS + t) * L
                        vstore(Sacc, at, fma(qv[h], kb, Sacc.vload([at], f32v)))
            for t in range(KEYS):
                mask = None if visible is None else visible(blk * BS + kg * KEYS + t)
                for h in range(G):
                    s = Sacc.vload([(h * KEYS + t) * L], f32v)
                    vstore(Pb, (h * BS + kg * KEYS + t) * L, s if mask is None else tirx.Select(mask, s, bc(f32(NEG))))
        # online softmax, per row (lane)
        for h in range(G):
            mx = Pb.vload([h * BS * L], f32v)
            for t in range(1, BS):
                mx = tirx.Max(mx, Pb.vload([(h * BS + t) * L], f32v))
            mold = B.bind(Mv.vload([h * L], f32v))
            mnew = B.bind(tirx.Max(mold, mx))
            corr = B.bind(v.vexp(mold - mnew))
            vstore(Cv, h * L, corr)
            total = None
            for t in range(BS):
                p = B.bind(v.vexp(Pb.vload([(h * BS + t) * L], f32v) - mnew))
                vstore(Pb, (h * BS + t) * L, p)
                total = p if total is None else total + p
            vstore(Lv, h * L, Lv.vload([h * L], f32v) * corr + total)
            vstore(Mv, h * L, mnew)
        # O = O * corr + P @ V: ROWS_PV rows x 2 x 16 lanes of D per pass, over a key loop
        for h in range(G):
            with loop(L // ROWS_PV) as rg:
                for c0 in range(0, DC, 2):
                    cs = [c for c in (c0, c0 + 1) if c < DC]
                    for r in range(ROWS_PV):
                        row = rg * ROWS_PV + r
                        for ci, c in enumerate(cs):
                            vstore(Oacc, (r * 2 + ci) * L,
                                   Ob.vload([(h * L + row) * D + c * 16], f32v) * bc(Cv[h * L + row]))
                    with loop(BS) as t:
                        vs = [B.bind(VC.vload([base + t, j, c * 16], f32v)) for c in cs]
                        for r in range(ROWS_PV):
                            pr = B.bind(bc(Pb[(h * BS + t) * L + rg * ROWS_PV + r]))
                            for ci in range(len(cs)):
                                at = (r * 2 + ci) * L
                                vstore(Oacc, at, fma(pr, vs[ci], Oacc.vload([at], f32v)))
                    for r in range(ROWS_PV):
                        for ci, c in enumerate(cs):
                            B.buffer_store(Ob, Oacc.vload([(r * 2 + ci) * L], f32v),
                                           [tirx.Ramp((h * L + rg * ROWS_PV + r) * D + c * 16, 1, L)])
    return Ob, Mv, Lv


def group_dims(kind: str, HQ: int, HK: int, D: int, BS: int) -> tuple[int, int]:
    """(G, DC): the query heads per kv head and the 16-lane chunks of head_dim of a kernel built on
    flash_tile; ValueError (naming the `kind` of attention) where prefill_supported says no."""
    if not prefill_supported(HQ, HK, D, BS):
        raise ValueError(f"{kind} attention: heads {HQ} / kv heads {HK} / head_dim {D} / block {BS} "
                         f"need heads % kv_heads == 0, head_dim % 16 == 0 and block % {KEYS} == 0")
    return HQ // HK, D // 16


class TileTask(NamedTuple):
    """One task of a kernel over a tile list: kv head `j` of a tile, whose rows row0 .. row0 + nrows
    - 1 of q / out sit at positions pos0 .. pos0 + nrows - 1 of the sequence in table row `srow`."""
    Q: Any
    KC: Any
    VC: Any
    BT: Any
    O: Any
    scale: Any
    j: Any
    srow: Any
    row0: Any
    nrows: Any
    pos0: Any

    def flash(self, v: "Vec16", G: int, D: int, BS: int, query, visible):
        """flash_tile over the blocks of the tile's context (positions 0 .. pos0 + nrows - 1)."""
        return flash_tile(v, G, D, BS, self.j, query, (self.pos0 + self.nrows + BS - 1) // BS,
                          lambda blk: self.BT[self.srow, blk], self.KC, self.VC, visible=visible)


@contextmanager
def tile_tasks(name: str, HQ: int, HK: int, D: int, v: "Vec16"):
    """The frame of the kernels that take a tile list (prefill, short): a prim_func `name(q,
    k_cache, v_cache, tables, tiles, scale, out)` and a `T.parallel` loop over (tile, kv head)
    tasks. Yields (the IRBuilder, the loop body's TileTask); take the PrimFunc with ib.get() after
    the `with`."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as B

    with IRBuilder() as ib:
        with B.prim_func(s_tir=True):
            B.func_name(name)
            B.func_attr({"tirx.noalias": True})
            q_h, kc_h, vc_h, bt_h, tl_h = (B.arg(a, B.handle()) for a in ("q", "k_cache", "v_cache", "tables", "tiles"))
            scale = B.arg("scale", tirx.Var("scale", "float32"))
            o_h = B.arg("out", B.handle())
            T_, NS, W, NT = (B.int64() for _ in range(4))
            Q, KC, VC = match_attention_inputs(q_h, kc_h, vc_h, T_, HQ, HK, D)
            BT = B.match_buffer(bt_h, (NS, W), "int64", align=8)
            TL = B.match_buffer(tl_h, (NT, 4), "int64", align=8)
            O = B.match_buffer(o_h, (T_, HQ * D), "float32", align=ALIGN)
            with B.parallel(v.i64(0), NT * HK) as task:
                tile = task // HK
                yield ib, TileTask(Q, KC, VC, BT, O, scale, task % HK, TL[tile, 0], TL[tile, 1], TL[tile, 2],
                                   TL[tile, 3])


def make_prefill_attention(HQ: int, HK: int, D: int, BS: int):
    from tvm import tirx
    from tvm.tirx.script.builder import ir as B

    G, DC = group_dims("prefill", HQ, HK, D, BS)
    L = QROWS
    v = Vec16()
    with tile_tasks(prefill_attention_name(HQ, HK, D, BS), HQ, HK, D, v) as (ib, t):
        Q, O, j, row0, nrows, pos0 = t.Q, t.O, t.j, t.row0, t.nrows, t.pos0
        lanes = tirx.Ramp(tirx.const(0, "int64"), tirx.const(1, "int64"), L)
        # rows past the tile repeat its last; key position kp is visible to row i iff pos0 + i >= kp
        Ob, Mv, Lv = t.flash(v, G, D, BS, lambda h, d, i: Q[row0 + tirx.Min(i, nrows - 1), (j * G + h) * D + d] * t.scale,
                             visible=lambda kp: lanes >= v.bc(kp - pos0))
        with v.loop(nrows) as i:
            for h in range(G):
                inv = B.bind(v.f32(1.0) / Lv[h * L + i])
                for c in range(DC):
                    B.buffer_store(O, Ob.vload([(h * L + i) * D + c * 16], v.f32v) * v.bc(inv),
                                   [row0 + i, tirx.Ramp((j * G + h) * D + c * 16, 1, L)])
    return ib.get()


def make_short_attention(HQ: int, HK: int, D: int, BS: int):
    """`short_attention_<Hq>_<Hk>_<D>_b<BS>(q, k_cache, v_cache, tables, tiles, scale, out)`: the
    prefill kernel for spans of at most short_rows(Hq, Hk) rows (a speculative verify's last token
    and drafts, jump-forward tokens, a short chunk). Their rows would fill few of the prefill
    kernel's 16 lanes, each head group paying for all 16; here the lanes hold (head, row) pairs of
    the whole GQA group, so one flash tile serves the group: G times less work per span. Same
    tile list as the prefill kernel (rows <= short_rows)."""
    from tvm import tirx
    from tvm.tirx.script.builder import ir as B

    G, DC = group_dims("short", HQ, HK, D, BS)
    L = QROWS
    v = Vec16()
    with tile_tasks(short_attention_name(HQ, HK, D, BS), HQ, HK, D, v) as (ib, t):
        Q, O, j, row0, nrows, pos0 = t.Q, t.O, t.j, t.row0, t.nrows, t.pos0
        lpos = B.alloc_buffer((L,), "int64", scope="global")
        # lane = head * nrows + row; lanes past G * nrows repeat the last pair
        with v.loop(L) as i:
            B.buffer_store(lpos, pos0 + tirx.Min(i, G * nrows - 1) % nrows, [i])
        Ob, Mv, Lv = t.flash(v, 1, D, BS,
                             lambda h, d, i: Q[row0 + tirx.Min(i, G * nrows - 1) % nrows,
                                               (j * G + tirx.Min(i, G * nrows - 1) // nrows) * D + d] * t.scale,
                             visible=lambda kp: lpos.vload([v.i64(0)], "int64x16") >= v.bc(kp))
        with v.loop(G * nrows) as i:
            inv = B.bind(v.f32(1.0) / Lv[i])
            for c in range(DC):
                B.buffer_store(O, Ob.vload([i * D + c * 16], v.f32v) * v.bc(inv),
                               [row0 + i % nrows, tirx.Ramp((j * G + i // nrows) * D + c * 16, 1, L)])
    return ib.get()
