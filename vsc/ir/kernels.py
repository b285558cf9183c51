"""The kernel catalog: which kernels exist, which op kinds each implements, on which targets.

The verifier checks every op's `via` kernel against this table; `select-kernels`-style
passes choose among the entries. Backends own the implementations; this table is the
contract between them and the IR. The kernels themselves are declared once, in
`vsc.runtime.kernel_registry` (which the runtime reads too); this module derives the IR's
view of them (element types resolved against the IR's type tables) and adds the IR-only
choices: the default kernel of each op kind and the backend preference per target.
"""
from __future__ import annotations

from dataclasses import dataclass

from vsc.ir.sizes import CACHE_DTYPES, FLOAT_CACHE_DTYPES
from vsc.ir.types import FLOAT_DTYPES, QUANT_DTYPES
from vsc.runtime.enums import KV_CACHE_LAYOUTS
from vsc.runtime.kernel_registry import ANY, FLOAT, PLAIN, QUANT, Kernel
from vsc.runtime.kernel_registry import KERNELS as DECLARED_KERNELS

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


_DTYPE_SETS = {
    "cache": {ANY: CACHE_DTYPES, FLOAT: FLOAT_CACHE_DTYPES},
    "weight": {PLAIN: PLAIN_WEIGHT_DTYPES, QUANT: QUANT_WEIGHT_DTYPES},
    "value": {FLOAT: FLOAT_DTYPES},
}


def _dtypes(declared, sets: str) -> frozenset[str]:
    """A declaration's element types: a named set (vsc.runtime.kernel_registry's FLOAT, ...) or a tuple."""
    return frozenset(_DTYPE_SETS[sets][declared]) if isinstance(declared, str) else frozenset(declared)


def _info(k: Kernel) -> KernelInfo:
    return KernelInfo(k.name, frozenset(k.ops), frozenset(k.targets), frozenset(k.cache_layouts), k.doc,
                      _dtypes(k.cache_dtypes, "cache"), _dtypes(k.weight_dtypes, "weight"), _dtypes(k.dtypes, "value"))


# Derived from the declarations in vsc.runtime.kernel_registry (the one place a kernel is declared).
KERNELS: dict[str, KernelInfo] = {k.name: _info(k) for k in DECLARED_KERNELS.values()}

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
LAYOUT_BOUND_KERNELS = frozenset(k.name for k in DECLARED_KERNELS.values() if k.layout_bound)
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
COMPILED_STEP_KERNELS = frozenset(k.name for k in DECLARED_KERNELS.values() if k.compiled_step)


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
