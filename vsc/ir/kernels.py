"""The kernel catalog: which kernels exist, which op kinds each implements, on which targets.

The verifier checks every op's `via` kernel against this table; `select-kernels`-style
passes choose among the entries. Backends own the implementations; this table is the
contract between them and the IR.
"""
from __future__ import annotations

from dataclasses import dataclass

from vsc.ir.sizes import CACHE_DTYPES, FLOAT_CACHE_DTYPES
from vsc.ir.types import FLOAT_DTYPES, QUANT_DTYPES
from vsc.runtime.enums import KV_CACHE_LAYOUTS, TARGET_KINDS

# Element types of an op's main weight (operand 1: a linear's W, an embedding table, a norm's
# scale) a kernel reads unless it says otherwise: float, and int8 (weight-int8's values);
# block-quantized weights (q8_0, q4_0, q4_1) only reach kernels that name them.
PLAIN_WEIGHT_DTYPES = FLOAT_DTYPES | {"i8"}
QUANT_WEIGHT_DTYPES = QUANT_DTYPES


@dataclass(frozen=True)
class KernelInfo:
    """A kernel: the op kinds it implements, where it runs, and the KV caches it can read
    (layouts and element types; only attention kernels touch the cache, the rest take any),
    and the element types of the main weight it reads (operand 1, when that is a weight)."""

    name: str
    ops: frozenset[str]
    targets: frozenset[str]
    cache_layouts: frozenset[str] = frozenset(KV_CACHE_LAYOUTS)
    doc: str = ""
    cache_dtypes: frozenset[str] = CACHE_DTYPES
    weight_dtypes: frozenset[str] = PLAIN_WEIGHT_DTYPES
    dtypes: frozenset[str] = FLOAT_DTYPES       # element types of the float values it computes


def _k(name, ops, targets=TARGET_KINDS, layouts=KV_CACHE_LAYOUTS, doc="", cache_dtypes=CACHE_DTYPES,
       weight_dtypes=PLAIN_WEIGHT_DTYPES, dtypes=FLOAT_DTYPES):
    return KernelInfo(name, frozenset(ops), frozenset(targets), frozenset(layouts), doc, frozenset(cache_dtypes),
                      frozenset(weight_dtypes), frozenset(dtypes))


KERNELS: dict[str, KernelInfo] = {k.name: k for k in [
    _k("torch.embedding", {"embed"}, doc="torch.nn.functional.embedding"),
    _k("torch.rmsnorm", {"rmsnorm"}, doc="x.pow(2).mean(-1) in fp32, rsqrt, scale"),
    _k("torch.add", {"add"}),
    _k("torch.add_rmsnorm", {"add_rmsnorm"}, doc="residual add + RMSNorm in one call"),
    _k("torch.mul", {"mul"}),
    _k("torch.silu", {"silu"}),
    _k("torch.silu_mul", {"silu_mul"}),
    _k("torch.linear", {"linear"}, doc="torch.nn.functional.linear"),
    _k("torch.linear_int8", {"linear_int8"}, doc="int8 weights dequantized into a reused scratch matrix, then "
                                                 "F.linear (group 0: convert, then scale the output rows)"),
    _k("torch.linear_onednn", {"linear"}, targets=("cpu",),
       doc="oneDNN inner product over a weight packed once at load (pack-linear-weights)"),
    _k("torch.linear_quant", {"linear"}, weight_dtypes=QUANT_WEIGHT_DTYPES,
       doc="block-quantized weight (q8_0/q4_0/q4_1) dequantized whole every call, then F.linear (portable fallback)"),
    _k("tvm.quant_linear", {"linear"}, targets=("cpu",), weight_dtypes=QUANT_WEIGHT_DTYPES, dtypes=("f32",),
       doc="TVM kernel compiled by vsc compile for the host CPU: block-quantized weights unpacked in registers"),
    _k("tvm.linear", {"linear"}, targets=("cpu",), weight_dtypes=("f32",), dtypes=("f32",),
       doc="TVM kernel for an f32 weight as the checkpoint stores it (R rows x MT inputs per tile, 16-lane FMAs) "
           "at decode sizes, torch's GEMM past 32 rows (prefill); what lets a float plan's decode step compile"),
    _k("tvm.rmsnorm", {"rmsnorm", "add_rmsnorm"}, targets=("cpu",), dtypes=("f32",),
       doc="TVM kernel: one pass, the residual add fused when given (add_rmsnorm)"),
    _k("tvm.silu_mul", {"silu_mul"}, targets=("cpu",), dtypes=("f32",), doc="TVM kernel: silu(gate) * up in one pass"),
    _k("tvm.rope", {"rope_rotate"}, targets=("cpu",), dtypes=("f32",),
       doc="TVM kernel: q and k rotated by the step's cos/sin rows in one call"),
    _k("tvm.paged_attention", {"attention"}, targets=("cpu",), layouts=("paged",), cache_dtypes=("f32",), dtypes=("f32",),
       doc="TVM kernels: K/V written to their slots, decode attention read in place through the block table "
           "(GQA groups share each K/V row, split-K for few long contexts), prompt spans causal over the cache in place, "
           "a cascade's shared prefix read once for the group (cascade-attention)"),
    _k("torch.embedding_quant", {"embed"}, weight_dtypes=QUANT_WEIGHT_DTYPES,
       doc="gather rows of a block-quantized table, dequantize them"),
    _k("torch.split", {"split"}, doc="views, no copy"),
    _k("torch.rope", {"rope"}, doc="cos/sin computed from positions inside the op, every call"),
    _k("torch.rope_lookup", {"rope_lookup"}, doc="index the folded cos/sin tables by position"),
    _k("torch.rope_rotate", {"rope_rotate"}, doc="rotate by given cos/sin rows"),
    _k("torch.sdpa", {"attention"}, layouts=("contiguous",), doc="scaled_dot_product_attention over a contiguous cache slab",
       cache_dtypes=FLOAT_CACHE_DTYPES),
    _k("torch.paged_attention", {"attention"}, layouts=("paged",), doc="gather blocks by block table, then attention",
       cache_dtypes=FLOAT_CACHE_DTYPES),
    _k("torch.paged_attention_int8", {"attention"}, layouts=("paged",), cache_dtypes=("i8",),
       doc="kv-int8: quantize K/V per (token, kv head) on write, dequantize the gathered blocks on read"),
    _k("torch.moe", {"moe"}, doc="loop over experts with index_add"),
    _k("torch.last_token", {"last_token"}),
    _k("torch.sample", {"sample"}, doc="greedy / temperature / top-k / top-p on tensors"),
    _k("triton.rmsnorm", {"rmsnorm", "add_rmsnorm"}, targets=("cuda",), doc="one pass; fused residual add when given"),
    _k("triton.rope", {"rope", "rope_rotate"}, targets=("cuda",), doc="in place; rope: cos/sin rows computed first"),
    _k("triton.silu_mul", {"silu_mul"}, targets=("cuda",)),
    _k("triton.paged_attention", {"attention"}, targets=("cuda",), layouts=("paged",), cache_dtypes=FLOAT_CACHE_DTYPES),
]}

# The kernel each op kind gets when nothing better was chosen, by cache layout where it matters.
DEFAULT_KERNELS: dict[str, str] = {
    "embed": "torch.embedding", "rmsnorm": "torch.rmsnorm", "add": "torch.add", "add_rmsnorm": "torch.add_rmsnorm", "mul": "torch.mul",
    "silu": "torch.silu", "silu_mul": "torch.silu_mul", "linear": "torch.linear", "split": "torch.split",
    "rope": "torch.rope", "rope_lookup": "torch.rope_lookup", "rope_rotate": "torch.rope_rotate",
    "linear_int8": "torch.linear_int8", "attention": "torch.sdpa", "moe": "torch.moe", "last_token": "torch.last_token",
    "sample": "torch.sample",
}
PAGED_ATTENTION_KERNEL = "torch.paged_attention"
PAGED_ATTENTION_INT8_KERNEL = "torch.paged_attention_int8"


# The kernel an op gets when it reads a block-quantized weight (the portable torch one;
# select-kernels may choose a compiled one for the target).
QUANT_DEFAULT_KERNELS = {"linear": "torch.linear_quant", "embed": "torch.embedding_quant"}


def default_kernel(op_kind: str, cache_layout: str = "contiguous", cache_dtype: str = "f32",
                   weight_dtype: str | None = None) -> str | None:
    if weight_dtype in QUANT_DTYPES:
        return QUANT_DEFAULT_KERNELS.get(op_kind)
    if op_kind == "attention" and cache_layout == "paged":
        return PAGED_ATTENTION_INT8_KERNEL if cache_dtype == "i8" else PAGED_ATTENTION_KERNEL
    return DEFAULT_KERNELS.get(op_kind)


# Kernels that read a weight only in their own private layout (made by a pass: pack-linear-weights'
# onednn_pack): never a choice for an op whose weight is not in it, and an op whose weight is
# in it (LAYOUT_BOUND_INITS) keeps its kernel.
LAYOUT_BOUND_KERNELS = frozenset({"torch.linear_onednn"})
LAYOUT_BOUND_INITS = frozenset({"onednn_pack"})

# On each target, which backends' kernels to prefer when several implement an op.
BACKEND_PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("tvm", "torch")}


def fitting_kernels(op_kind: str, target: str, cache_layout: str, cache_dtype: str = "f32",
                    weight_dtype: str | None = None, dtype: str | None = None) -> list[str]:
    """Every kernel that implements an op kind on a target, cache layout and cache dtype, reads
    `weight_dtype` (the op's main weight, if it has one) and computes in `dtype` (its float
    results' element type), in the target's backend preference order."""
    fitting = [k for k in KERNELS.values()
               if op_kind in k.ops and target in k.targets and cache_layout in k.cache_layouts
               and cache_dtype in k.cache_dtypes and (weight_dtype is None or weight_dtype in k.weight_dtypes)
               and (dtype is None or dtype in k.dtypes)]
    quant = weight_dtype if weight_dtype in QUANT_DTYPES else None
    default = default_kernel(op_kind, cache_layout, cache_dtype, quant)
    out: list[str] = []
    for backend in BACKEND_PREFERENCE.get(target, ("torch",)):
        names = sorted((k.name for k in fitting if k.name.startswith(backend + ".")), key=lambda n: (n != default, n))
        out += names
    return out


def op_fitting_kernels(module, op, target: str | None = None) -> list[str] | None:
    """The kernels a kernel-choosing pass may give `op` (fitting_kernels for its weight's element
    type and its float dtype, never a layout-bound one), or None when its kernel is bound: its
    weight is in a kernel's private layout (pack-linear-weights)."""
    from vsc.ir.types import FLOAT_DTYPES

    main = op.operands[1] if len(op.operands) > 1 and op.operands[1].startswith("@") else None
    weight = module.model.weight(main) if main else None
    if weight is not None and weight.init_fn in LAYOUT_BOUND_INITS:
        return None
    dtype = next((t.dtype for t in op.types if t.dtype in FLOAT_DTYPES), None)
    return [k for k in fitting_kernels(op.kind, target or module.target.kind, module.cache.layout, module.cache.dtype,
                                       weight.type.dtype if weight is not None else None, dtype)
            if k not in LAYOUT_BOUND_KERNELS]


def best_kernel(op_kind: str, target: str, cache_layout: str, cache_dtype: str = "f32",
                weight_dtype: str | None = None, dtype: str | None = None) -> str | None:
    """The preferred fitting kernel (`fitting_kernels`' first), or None if none fits."""
    fitting = fitting_kernels(op_kind, target, cache_layout, cache_dtype, weight_dtype, dtype)
    return fitting[0] if fitting else None


# -- the compiled decode step (schedule {graph = "relax"}) ------------------------------------

#: Graph forms a plan's decode step can take: eager (the generated Python calls each kernel)
#: or relax (the whole decode forward as one TVM Relax function, one VM call per step).
GRAPH_FORMS = ("eager", "relax")

#: Kernels the compiled decode step has a translation for (vsc.backends.tvm.decode_step): the
#: TVM kernels, and the torch ops it expresses as Relax ops (take, split, add, ...).
COMPILED_STEP_KERNELS = frozenset({
    "tvm.quant_linear", "tvm.linear", "tvm.rmsnorm", "tvm.rope", "tvm.silu_mul", "tvm.paged_attention",
    "torch.embedding", "torch.embedding_quant", "torch.rope_lookup", "torch.split", "torch.add", "torch.mul",
    "torch.silu", "torch.last_token", "torch.sample"})


def decode_step_blockers(module) -> list[str]:
    """Why `module`'s decode forward cannot be one compiled (Relax) function; empty: it can."""
    from vsc.ir.module import walk_ops

    why = []
    if module.target.kind != "cpu":
        why.append(f"the compiled decode step is built for cpu targets, not {module.target.kind}")
    if module.cache.layout != "paged" or module.cache.dtype != "f32":
        why.append(f"it reads a paged f32 KV cache, the plan's is {module.cache.layout} {module.cache.dtype}")
    if module.batching.mode != "continuous":
        why.append("it runs the decode steps of continuous batching (run continuous-batching first)")
    for op in walk_ops(module.model.func.body):
        if op.kind == "repeat":
            continue
        name = op.kernel.name if op.kernel is not None else None
        if op.kind == "attention" and op.attrs.get("cascade_min_tokens"):
            why.append("attention with cascade-attention runs eagerly")
        elif name == "torch.rope":
            why.append("rope via torch.rope computes cos/sin inside the op: run fold-rope-tables first")
        elif name not in COMPILED_STEP_KERNELS:
            why.append(f"{op.kind} via {name} has no compiled form (select-kernels gives TVM kernels where they exist)")
        elif op.kind == "linear" and len(op.operands) > 2:
            why.append("a linear with a bias has no compiled form yet")
    return sorted(set(why))
