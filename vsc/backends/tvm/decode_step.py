"""The compiled decode step (`schedule {graph = "relax"}`): a plan's whole decode forward as one
TVM Relax function, run by the Relax VM in one call per step.

`vsc.ir.kernels.decode_step_blockers(module)` says whether (and why not) a plan lowers: every
compute op's kernel must be one this file translates (below); `step_arguments(module)` is the argument layout both this builder
and the generated runner use; `build_decode_step(module)` compiles (cached by content hash like
the kernel library) and returns the shared library a server folder ships in kernels/.

The Relax function `decode(tokens, positions, slots, tables, lens, splits, caches, weights)`:
  tokens / positions / slots / lens  int64 [n]       one new token per sequence (n <= max_batch)
  tables                             int64 [n, w]    block tables
  splits                             Shape [p, chunk] split-K of the attention (see tvm_ops.split_plan)
  caches                             tuple of 2 x layers f32 [slots, kv_heads, head_dim] (K, V per layer)
  weights                            tuple, `step_arguments` order (a block-quantized weight is its
                                     planar parts qs, d, m — d again where the format has no m)
returns the logits f32 [n, vocab]. `decode_wide` (WIDE_FUNCTION; built when the plan's quantized
linears take int8 activations and max_batch >= GEMM_MIN_ROWS) is the same step with those
linears on the GEMM kernel (vsc.backends.tvm.quant_gemm), which the runner calls from
GEMM_MIN_ROWS rows on. Every kernel is the TIR kernel the eager plan calls (one
source: quant_linear.py, elementwise.py, attention.py), called with `call_tir`; the K/V writes
are `call_tir_inplace` on the cache tensors; splits, adds and multiplies are Relax ops legalized to TIR. Intermediates are planned statically for n <= max_batch (one arena, no
per-step allocation besides the returned logits).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vsc.errors import VscError
from vsc.ir.kernels import decode_step_blockers
from vsc.ir.module import Op, ServingModule, is_value, walk_ops
from vsc.ir.types import QUANT_DTYPES
from vsc.runtime.kernels.tvm_ops import GEMM_MIN_ROWS, SPLIT_MAX, WIDE_FUNCTION

LIB_PREFIX = "vsc_step_"
_HERE = Path(__file__).resolve().parent


class DecodeStepError(VscError):
    """The plan cannot run as a compiled decode step, or TVM could not build it."""


def step_weight_types(module: ServingModule) -> list[tuple[str, str, object]]:
    """(name as the runner's load_weights keys it (layer index filled in), part, its IR weight type)
    of every weight the decode forward reads, in first-use order, a block-quantized weight as its
    planar parts "qs", "d", "m" (q8_0 and q4_0 pass "d" where "m" would be), others as part ""."""
    out: list[tuple[str, str, object]] = []
    seen = set()

    def add(operand: str, layer: int | None) -> None:
        name = operand[1:].replace("{i}", str(layer)) if layer is not None else operand[1:]
        if name in seen:
            return
        seen.add(name)
        t = module.model.weight(operand).type
        if t.dtype in QUANT_DTYPES:
            out.extend([(name, "qs", t), (name, "d", t), (name, "m" if t.dtype == "q4_1" else "d", t)])
        else:
            out.append((name, "", t))

    for op in module.model.func.body:
        if op.kind == "repeat":
            for i in range(int(op.attrs["count"])):
                for inner in walk_ops(op.region.ops):
                    for o in inner.operands:
                        if o.startswith("@"):
                            add(o, i)
        else:
            for o in op.operands:
                if o.startswith("@"):
                    add(o, None)
    return out


def step_arguments(module: ServingModule) -> list[tuple[str, str]]:
    """The weights tuple of the Relax function, as (name, part) pairs (see step_weight_types): the
    order the generated runner binds them in (STEP_ARGUMENTS)."""
    return [(name, part) for name, part, _ in step_weight_types(module)]


# -- the Relax module --------------------------------------------------------------------


def make_relax_module(module: ServingModule, vnni: bool):
    """The Relax IRModule of the plan's decode step (TVM imported here only)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr import prim_value

    from vsc.backends.tvm import attention as attn_k
    from vsc.backends.tvm import elementwise as ew
    from vsc.backends.tvm import linear as dense_k
    from vsc.backends.tvm import quant_gemm as qg
    from vsc.backends.tvm import quant_linear as ql

    why = decode_step_blockers(module)
    if why:
        raise DecodeStepError("; ".join(why))
    cfg = module.model.attrs
    layers = int(next(op.attrs["count"] for op in module.model.func.body if op.kind == "repeat"))
    hk, hd = int(cfg["kv_heads"]), int(cfg["head_dim"])
    bs = int(module.cache.block_size)
    i64, f32 = "int64", "float32"
    n = tvm.tirx.Var("n", i64)
    w_ = tvm.tirx.Var("w", i64)
    s_ = tvm.tirx.Var("s", i64)
    p_ = tvm.tirx.Var("p", i64)
    chunk = tvm.tirx.Var("chunk", i64)
    T = relax.TensorType

    typed = step_weight_types(module)
    index = {(name, part): k for k, (name, part, _) in enumerate(typed)}
    weight_types = [_part_type(t, part, T) for _, part, t in typed]
    cache_t = T([s_, hk, hd], f32)
    tokens = relax.Var("tokens", T([n], i64))
    positions = relax.Var("positions", T([n], i64))
    slots = relax.Var("slots", T([n], i64))
    tables = relax.Var("tables", T([n, w_], i64))
    lens = relax.Var("lens", T([n], i64))
    splits = relax.Var("splits", relax.ShapeType([p_, chunk]))
    caches = relax.Var("caches", relax.TupleType([cache_t] * (2 * layers)))
    weights = relax.Var("weights", relax.TupleType(weight_types))
    params = [tokens, positions, slots, tables, lens, splits, caches, weights]
    bound = {"n": int(module.batching.max_batch or 1), "p": SPLIT_MAX}     # static memory plan

    bb = relax.BlockBuilder()
    gvars: dict[str, object] = {}

    def kernel(name: str, make):
        if name not in gvars:
            gvars[name] = bb.add_func(make().with_attr("global_symbol", name), name)
        return gvars[name]

    def dims(t) -> list:
        return [n if isinstance(d, str) else int(d) for d in t.shape]

    def ttype(t) -> object:
        return T(dims(t), {"f32": f32, "i64": i64}[t.dtype])

    def emit(fname: str, wide: bool) -> None:
        with bb.function(fname, params, attrs={"tir_var_upper_bound": bound}):
            with bb.dataflow():
                env: dict[str, object] = {"%tokens": tokens, "%positions": positions}
                wcache: dict[tuple[str, str], object] = {}

                def weight(operand: str, layer: int | None, part: str = ""):
                    name = operand[1:].replace("{i}", str(layer)) if layer is not None else operand[1:]
                    key = (name, part)
                    if key not in wcache:
                        wcache[key] = bb.emit(relax.TupleGetItem(weights, index[key]))
                    return wcache[key]

                def parts(operand: str, layer):
                    w = module.model.weight(operand)
                    if w.type.dtype in QUANT_DTYPES:
                        m = "m" if w.type.dtype == "q4_1" else "d"
                        return w, [weight(operand, layer, "qs"), weight(operand, layer, "d"), weight(operand, layer, m)]
                    return w, [weight(operand, layer)]

                def gather(table, index, k: int):
                    # own TIR gather, not relax's take: its legalized kernel crashed on torch tensors
                    g = kernel(ew.gather_rows_name(k), lambda: ew.make_gather_rows(k))
                    return bb.emit(relax.call_tir(g, [index, table], T([n, k], f32)))

                def lower(op: Op, layer: int | None) -> None:
                    name = op.kernel.name
                    val = lambda o: env[o] if is_value(o) else None  # noqa: E731
                    res = op.results
                    if name in ("torch.sample",):
                        return
                    if name == "torch.last_token":
                        env[res[0]] = val(op.operands[0])      # decode: every row is a last token
                    elif name == "torch.embedding":
                        _, (table,) = parts(op.operands[1], layer)
                        env[res[0]] = gather(table, val(op.operands[0]), int(op.types[0].shape[-1]))
                    elif name == "torch.embedding_quant":
                        w, ps = parts(op.operands[1], layer)
                        fmt, rows, width = w.type.dtype, int(w.type.shape[0]), int(w.type.shape[1])
                        g = kernel(ql.embed_name(fmt, rows, width), lambda: ql.make_embed(fmt, rows, width))
                        env[res[0]] = bb.emit(relax.call_tir(g, [val(op.operands[0]), *ps], T([n, width], f32)))
                    elif name == "torch.rope_lookup":
                        pos = val(op.operands[0])
                        for r, table in zip(res, op.operands[1:3]):
                            _, (t,) = parts(table, layer)
                            env[r] = gather(t, pos, int(op.types[0].shape[-1]))
                    elif name == "torch.split":
                        sizes = [int(s) for s in op.attrs["sizes"]]
                        cuts = [sum(sizes[:k]) for k in range(1, len(sizes))]
                        tup = bb.emit(relax.op.split(val(op.operands[0]), cuts, axis=-1))
                        for k, r in enumerate(res):
                            env[r] = bb.emit(relax.TupleGetItem(tup, k))
                    elif name == "torch.add":
                        env[res[0]] = bb.emit(relax.op.add(val(op.operands[0]), val(op.operands[1])))
                    elif name == "torch.mul":
                        env[res[0]] = bb.emit(relax.op.multiply(val(op.operands[0]), val(op.operands[1])))
                    elif name == "torch.silu":
                        env[res[0]] = bb.emit(relax.op.nn.silu(val(op.operands[0])))
                    elif name == "tvm.rmsnorm":
                        h = int(op.types[0].shape[-1])
                        eps = prim_value(tvm.tirx.FloatImm(f32, float(op.attrs["eps"])))
                        _, (wt,) = parts(op.operands[-1], layer)
                        if op.kind == "rmsnorm":
                            g = kernel(ew.rmsnorm_name(h), lambda: ew.make_rmsnorm(h, fused_add=False))
                            env[res[0]] = bb.emit(relax.call_tir(g, [val(op.operands[0]), wt, eps], ttype(op.types[0])))
                        else:
                            g = kernel(ew.add_rmsnorm_name(h), lambda: ew.make_rmsnorm(h, fused_add=True))
                            tup = bb.emit(relax.call_tir(g, [val(op.operands[0]), val(op.operands[1]), wt, eps],
                                                         [ttype(op.types[0]), ttype(op.types[1])]))
                            for k, r in enumerate(res):
                                env[r] = bb.emit(relax.TupleGetItem(tup, k))
                    elif name == "tvm.silu_mul":
                        f = int(op.types[0].shape[-1])
                        g = kernel(ew.silu_mul_name(f), lambda: ew.make_silu_mul(f))
                        env[res[0]] = bb.emit(relax.call_tir(g, [val(op.operands[0])], ttype(op.types[0])))
                    elif name == "tvm.rope":
                        d = int(op.attrs["head_dim"])
                        hq_, hk_ = int(op.types[0].shape[-1]) // d, int(op.types[1].shape[-1]) // d
                        g = kernel(ew.rope_name(hq_, hk_, d), lambda: ew.make_rope(hq_, hk_, d))
                        tup = bb.emit(relax.call_tir(g, [val(o) for o in op.operands[:4]],
                                                     [ttype(op.types[0]), ttype(op.types[1])]))
                        for k, r in enumerate(res):
                            env[r] = bb.emit(relax.TupleGetItem(tup, k))
                    elif name == "tvm.quant_linear":
                        w, ps = parts(op.operands[1], layer)
                        fmt, rows, width = w.type.dtype, int(w.type.shape[0]), int(w.type.shape[1])
                        x = val(op.operands[0])
                        if vnni and op.kernel.config.get("activations") == "q8_0" and wide and qg.gemm_supported(fmt, rows, width):
                            g = kernel(qg.gemm_kernel_name(fmt, rows, width), lambda: qg.make_quant_gemm_vnni(fmt, rows, width))
                            outs = [T([n, rows], f32), *(T([n, shape[1]], dt) for shape, dt in
                                                         qg.gemm_scratch_shapes(fmt, 1, width).values())]
                            tup = bb.emit(relax.call_tir(g, [x, *ps], outs))
                            env[res[0]] = bb.emit(relax.TupleGetItem(tup, 0))
                        elif vnni and op.kernel.config.get("activations") == "q8_0":
                            g = kernel(ql.vnni_kernel_name(fmt, rows, width), lambda: ql.make_quant_linear_vnni(fmt, rows, width))
                            lanes = 8 if fmt == "q8_0" else 4
                            nl = width // 32 * lanes
                            outs = [T([n, rows], f32), T([n, width], "int8"), T([n, nl], "int32"), T([n, nl], f32),
                                    T([n, nl], f32)]
                            tup = bb.emit(relax.call_tir(g, [x, *ps], outs))
                            env[res[0]] = bb.emit(relax.TupleGetItem(tup, 0))
                        else:
                            g = kernel(ql.kernel_name(fmt, rows, width), lambda: ql.make_quant_linear(fmt, rows, width))
                            env[res[0]] = bb.emit(relax.call_tir(g, [x, *ps], T([n, rows], f32)))
                    elif name == "tvm.linear":
                        _, (wt,) = parts(op.operands[1], layer)
                        rows, width = (int(d) for d in module.model.weight(op.operands[1]).type.shape)
                        g = kernel(dense_k.linear_name(rows, width), lambda: dense_k.make_linear(rows, width))
                        env[res[0]] = bb.emit(relax.call_tir(g, [val(op.operands[0]), wt], T([n, rows], f32)))
                    elif name == "tvm.paged_attention":
                        hq_ = int(op.attrs["heads"])
                        g_w = kernel(attn_k.kv_write_name(hk, hd), lambda: attn_k.make_kv_write(hk, hd))
                        g_a = kernel(attn_k.paged_attention_name(hq_, hk, hd, bs),
                                     lambda: attn_k.make_paged_attention(hq_, hk, hd, bs))
                        kc = bb.emit(relax.TupleGetItem(caches, 2 * layer))
                        vc = bb.emit(relax.TupleGetItem(caches, 2 * layer + 1))
                        written = bb.emit(relax.call_tir_inplace(g_w, [val(op.operands[1]), val(op.operands[2]), slots, kc, vc],
                                                                 [3, 4], [cache_t, cache_t]))
                        kc2 = bb.emit(relax.TupleGetItem(written, 0))
                        vc2 = bb.emit(relax.TupleGetItem(written, 1))
                        scale = prim_value(tvm.tirx.FloatImm(f32, float(op.attrs["scale"])))
                        g_ = hq_ // hk
                        tup = bb.emit(relax.call_tir(
                            g_a, [val(op.operands[0]), kc2, vc2, tables, lens, prim_value(chunk), scale],
                            [T([n, hq_ * hd], f32), T([n, hk, p_, g_, hd], f32), T([n, hk, p_, g_, 2], f32),
                             T([n, hq_], f32)]))
                        env[res[0]] = bb.emit(relax.TupleGetItem(tup, 0))
                    else:
                        raise DecodeStepError(f"{op.kind} via {name} has no compiled form")

                for op in module.model.func.body:
                    if op.kind == "repeat":
                        region = op.region
                        carried = [env[o] for o in op.operands]
                        for i in range(int(op.attrs["count"])):
                            for (arg, _), v in zip(region.args, carried):
                                env[arg] = v
                            for inner in region.ops:
                                lower(inner, i)
                            carried = [env[y] for y in region.yields]
                        for r, v in zip(op.results, carried):
                            env[r] = v
                    else:
                        lower(op, None)
                logits = env[module.model.func.returns[0]]
                out = bb.emit_output(logits)
            bb.emit_func_output(out)

    emit("decode", wide=False)
    if vnni and int(module.batching.max_batch or 1) >= GEMM_MIN_ROWS and any(
            op.kernel is not None and op.kernel.name == "tvm.quant_linear" and op.kernel.config.get("activations") == "q8_0"
            for op in walk_ops(module.model.func.body)):
        emit(WIDE_FUNCTION, wide=True)
    return bb.get()


def _relax_pipeline():
    """tvm.compile's default Relax build pipeline without the passes that pattern-match TIR
    blocks (our kernels are loop nests with their schedule written out, no s_tir blocks) or
    target CUDA graphs: legalize the Relax ops, plan memory statically, lower to the VM."""
    import tvm
    from tvm.relax import transform as rt

    return tvm.transform.Sequential([
        rt.LegalizeOps(), rt.ToNonDataflow(), rt.RemovePurityChecking(), rt.CallTIRRewrite(),
        rt.StaticPlanBlockMemory(), rt.LowerAllocTensor(), rt.KillAfterLastUse(), rt.LowerRuntimeBuiltin(),
        rt.ComputePrimValue(), rt.VMShapeLower(), rt.AttachGlobalSymbol()])


def _part_type(t, part: str, T):
    from vsc.runtime.quant import BLOCK

    if part == "":
        return T([int(d) for d in t.shape], {"f32": "float32", "i64": "int64"}.get(t.dtype, t.dtype))
    rows, width = int(t.shape[0]), int(t.shape[1])
    if part == "qs":
        return T([rows, width if t.dtype == "q8_0" else width // 2], "int8" if t.dtype == "q8_0" else "uint8")
    return T([rows, width // BLOCK], "float16")


# -- build + cache -----------------------------------------------------------------------


def cache_key(module: ServingModule, target: dict, vnni: bool) -> str:
    from vsc.backends.tvm.build import _tvm_version, kernel_sources
    from vsc.ir.printer import print_module

    h = hashlib.sha256()
    for src in kernel_sources():
        h.update(src.read_bytes())
    body = module.clone()
    body.deployment = {}
    h.update(print_module(body).encode())
    h.update(json.dumps({"target": target, "vnni": vnni, "tvm": _tvm_version()}, sort_keys=True).encode())
    return h.hexdigest()[:24]


def build_decode_step(module: ServingModule, target=None) -> tuple[Path, str]:
    """(the built library, the file name a server folder keeps it under in kernels/)."""
    from vsc.backends.tvm.build import cache_root, normalize_target
    from vsc.backends.tvm.quant_linear import target_has_vnni

    tgt = normalize_target(target)
    vnni = target_has_vnni(tgt)
    key = cache_key(module, tgt, vnni)
    out_dir = cache_root() / ("step-" + key)
    path = out_dir / "decode_step.so"
    if not path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".decode_step.{os.getpid()}.tmp.so"
        try:
            import tvm

            mod = make_relax_module(module, vnni)
            ex = tvm.compile(mod, target=tvm.target.Target(tgt), relax_pipeline=_relax_pipeline())
            ex.export_library(str(tmp))
            os.replace(tmp, path)
        except DecodeStepError:
            raise
        except Exception as e:  # TVM raises its own error types
            msg = " ".join(str(e).split())[:300]
            raise DecodeStepError(f"TVM build of the compiled decode step failed: {type(e).__name__}: {msg}") from None
        finally:
            tmp.unlink(missing_ok=True)
    return path, f"{LIB_PREFIX}{key}.so"
