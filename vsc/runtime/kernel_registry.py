"""Every kernel vsc knows, declared once: what the IR, the code generator, the server emitter,
the ahead-of-time compiler and the runtime know about a kernel is derived from this table.

A kernel is named `<backend>.<kernel>` (`torch.rmsnorm`, `tvm.quant_linear`, `triton.rope`).
Its declaration says which IR op kinds it implements, on which targets, over which KV caches,
weights and element types; the functions of its backend's runtime module that run it, per op
kind (`BACKEND_MODULES`); the config its `via name{key = value}` reference may carry; and for a
Triton kernel the `triton_ops.KERNELS` entries compiled ahead of time for it (`aot`). Derived
from it:

- `vsc.ir.kernels.KERNELS` (the verifier's and select-kernels' catalog), `COMPILED_STEP_KERNELS`,
  `LAYOUT_BOUND_KERNELS`;
- `vsc.runtime.kernels.TORCH_KERNELS` (kernel -> torch_ops function);
- the code generator's tables (`vsc.backends.torch.codegen`: the op kinds it lowers, the TVM
  and Triton functions a runner calls and imports, their configs and fallbacks);
- the server emitter's `AOT_KERNELS` (`vsc.backends.server.emit`) and the `ir_kernel` of each
  `triton_ops` kernel (the AOT index's).

Adding a kernel: one declaration below, its implementation in its backend's runtime module
(plus, for a TVM kernel, its builder under vsc/backends/tvm/; for an ahead-of-time Triton
kernel, its `variants()` entry in vsc.backends.triton.aot), and its test.
tests/backends/test_kernel_registry.py fails when a declaration and an implementation disagree.

Torch-free and importing nothing of the compiler (a leaf, like `vsc.runtime.enums`): the IR and
the runtime both read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from vsc.runtime.enums import KV_CACHE_LAYOUTS, TARGET_KINDS

#: The runtime module holding each backend's kernel functions (what a generated runner imports).
BACKEND_MODULES = {
    "torch": "vsc.runtime.kernels.torch_ops",
    "tvm": "vsc.runtime.kernels.tvm_ops",
    "triton": "vsc.runtime.kernels.triton_ops",
}

# Named element-type sets a declaration uses instead of listing types; vsc.ir.kernels resolves them
# against the IR's type tables (vsc.ir.types, vsc.ir.sizes), which stay the one place they are listed.
FLOAT = "float"   # the float element types (f32, bf16, f16)
PLAIN = "plain"   # a weight's float types, and int8 (weight-int8's values)
QUANT = "quant"   # the block-quantized weight formats (q8_0, q4_0, q4_1)
ANY = "any"       # every KV cache element type: float, and int8 (kv-int8)


@dataclass(frozen=True)
class Kernel:
    """One kernel's declaration (see the module docstring)."""

    name: str                                  # "<backend>.<kernel>"
    ops: tuple[str, ...]                       # the IR op kinds it implements
    functions: Mapping[str, str] | None        # op kind -> function of BACKEND_MODULES[backend]; None: the engine runs it
    targets: tuple[str, ...] = TARGET_KINDS
    cache_layouts: tuple[str, ...] = KV_CACHE_LAYOUTS
    cache_dtypes: str | tuple[str, ...] = ANY  # KV cache element types it reads (attention kernels)
    weight_dtypes: str | tuple[str, ...] = PLAIN   # element types of its main weight (operand 1)
    dtypes: str | tuple[str, ...] = FLOAT      # element types of the float values it computes
    config: Mapping[str, tuple] = field(default_factory=dict)   # `via name{key = value}`: key -> allowed values
    fallback: str | None = None                # torch_ops function for the steps it does not cover
    aot: tuple[str, ...] = ()                  # triton_ops.KERNELS entries compiled ahead of time for it
    compiled_step: bool = False                # the compiled decode step (vsc.backends.tvm.decode_step) translates it
    layout_bound: bool = False                 # reads its weight only in its own packed layout (made by a pass)
    doc: str = ""

    @property
    def backend(self) -> str:
        return self.name.split(".", 1)[0]


def declare(name: str, ops: tuple[str, ...] | str, functions: str | Mapping[str, str] | None, **kw) -> Kernel:
    """A Kernel; `ops` one op kind or several, `functions` one function name for every op kind or
    a mapping op kind -> function name (None: the engine runs it); the rest as Kernel's fields."""
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    if isinstance(functions, str):
        functions = {op: functions for op in ops}
    return Kernel(name, ops, functions, **kw)


KERNELS: dict[str, Kernel] = {k.name: k for k in [
    declare("torch.embedding", "embed", "embedding", compiled_step=True, doc="torch.nn.functional.embedding"),
    declare("torch.rmsnorm", "rmsnorm", "rmsnorm", doc="x.pow(2).mean(-1) in fp32, rsqrt, scale"),
    declare("torch.add", "add", "add", compiled_step=True),
    declare("torch.add_rmsnorm", "add_rmsnorm", "add_rmsnorm", doc="residual add + RMSNorm in one call"),
    declare("torch.mul", "mul", "mul", compiled_step=True),
    declare("torch.silu", "silu", "silu", compiled_step=True),
    declare("torch.silu_mul", "silu_mul", "silu_mul"),
    declare("torch.linear", "linear", "linear", doc="torch.nn.functional.linear"),
    declare("torch.linear_int8", "linear_int8", "linear_int8",
       doc="int8 weights dequantized into a reused scratch matrix, then F.linear (group 0: convert, then scale the "
           "output rows)"),
    declare("torch.linear_onednn", "linear", "linear_onednn", targets=("cpu",), layout_bound=True,
       doc="oneDNN inner product over a weight packed once at load (pack-linear-weights)"),
    declare("torch.linear_quant", "linear", "linear_quant", weight_dtypes=QUANT,
       doc="block-quantized weight (q8_0/q4_0/q4_1) dequantized whole every call, then F.linear (portable fallback)"),
    declare("tvm.quant_linear", "linear", "linear", targets=("cpu",), weight_dtypes=QUANT, dtypes=("f32",),
       config={"activations": ("f32", "q8_0")}, compiled_step=True,
       doc="TVM kernel compiled by vsc compile for the host CPU: block-quantized weights unpacked in registers"),
    declare("tvm.linear", "linear", "dense", targets=("cpu",), weight_dtypes=("f32",), dtypes=("f32",), compiled_step=True,
       doc="TVM kernel for an f32 weight as the checkpoint stores it (R rows x MT inputs per tile, 16-lane FMAs) "
           "at decode sizes, torch's GEMM past 32 rows (prefill); what lets a float plan's decode step compile"),
    declare("tvm.rmsnorm", ("rmsnorm", "add_rmsnorm"), {"rmsnorm": "rmsnorm", "add_rmsnorm": "add_rmsnorm"},
       targets=("cpu",), dtypes=("f32",), compiled_step=True,
       doc="TVM kernel: one pass, the residual add fused when given (add_rmsnorm)"),
    declare("tvm.silu_mul", "silu_mul", "silu_mul", targets=("cpu",), dtypes=("f32",), compiled_step=True,
       doc="TVM kernel: silu(gate) * up in one pass"),
    declare("tvm.rope", "rope_rotate", "rope", targets=("cpu",), dtypes=("f32",), compiled_step=True,
       doc="TVM kernel: q and k rotated by the step's cos/sin rows in one call"),
    declare("tvm.paged_attention", "attention", "paged_attention", targets=("cpu",), cache_layouts=("paged",),
       cache_dtypes=("f32",), dtypes=("f32",), compiled_step=True,
       doc="TVM kernels: K/V written to their slots, decode attention read in place through the block table "
           "(GQA groups share each K/V row, split-K for few long contexts), prompt spans causal over the cache in place, "
           "a cascade's shared prefix read once for the group (cascade-attention)"),
    declare("torch.embedding_quant", "embed", "embedding_quant", weight_dtypes=QUANT, compiled_step=True,
       doc="gather rows of a block-quantized table, dequantize them"),
    declare("torch.split", "split", "split", compiled_step=True, doc="views, no copy"),
    declare("torch.rope", "rope", "rope_positions", doc="cos/sin computed from positions inside the op, every call"),
    declare("torch.rope_lookup", "rope_lookup", "rope_lookup", compiled_step=True,
       doc="index the folded cos/sin tables by position"),
    declare("torch.rope_rotate", "rope_rotate", "rope", doc="rotate by given cos/sin rows"),
    declare("torch.sdpa", "attention", "sdpa", cache_layouts=("contiguous",), cache_dtypes=FLOAT,
       doc="scaled_dot_product_attention over a contiguous cache slab"),
    declare("torch.paged_attention", "attention", "paged_attention", cache_layouts=("paged",), cache_dtypes=FLOAT,
       doc="gather blocks by block table, then attention"),
    declare("torch.paged_attention_int8", "attention", "paged_attention_int8", cache_layouts=("paged",),
       cache_dtypes=("i8",),
       doc="kv-int8: quantize K/V per (token, kv head) on write, dequantize the gathered blocks on read"),
    declare("torch.moe", "moe", "moe", doc="loop over experts with index_add"),
    declare("torch.last_token", "last_token", "last_token", compiled_step=True),
    # Runners return logits; the engine's sampler (vsc.runtime.sampler) picks the tokens.
    declare("torch.sample", "sample", None, compiled_step=True, doc="greedy / temperature / top-k / top-p on tensors"),
    declare("triton.rmsnorm", ("rmsnorm", "add_rmsnorm"), {"rmsnorm": "rmsnorm", "add_rmsnorm": "add_rmsnorm"},
       targets=("cuda",), aot=("rmsnorm",), doc="one pass; fused residual add when given"),
    declare("triton.rope", ("rope", "rope_rotate"), "rope", targets=("cuda",), aot=("rope",),
       doc="in place; rope: cos/sin rows computed first"),
    declare("triton.silu_mul", "silu_mul", "silu_mul", targets=("cuda",), aot=("silu_mul",)),
    # Decode steps only: the cache write, then paged decode attention; prefill and mixed steps fall back.
    declare("triton.paged_attention", "attention", "paged_attention", targets=("cuda",), cache_layouts=("paged",),
       cache_dtypes=FLOAT, fallback="paged_attention", aot=("kv_write", "paged_decode")),
]}


def backend_kernels(backend: str) -> list[Kernel]:
    """The declared kernels of one backend, in declaration order."""
    return [k for k in KERNELS.values() if k.backend == backend]


def aot_ir_kernel(triton_kernel: str) -> str | None:
    """The IR kernel whose ahead-of-time variants include `triton_kernel` (a triton_ops.KERNELS
    name), or None when no IR kernel uses it (yet)."""
    return next((k.name for k in KERNELS.values() if triton_kernel in k.aot), None)
