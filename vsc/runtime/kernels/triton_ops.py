"""Triton kernels for the IR's `triton.*` catalog entries, with thin launch wrappers.

Each kernel is a `@triton.jit` function wrapped in `triton.autotune` (a small space of
block sizes, `num_warps` and `num_stages`, keyed on the dimensions that change the best
choice). The wrappers take and return torch tensors in the layouts of
`vsc.runtime.kernels.torch_ops` (the reference implementations):

| wrapper | IR kernel | reference |
|---|---|---|
| `rmsnorm(x, w, eps, residual=None)` | `triton.rmsnorm` (op `rmsnorm`) | `torch_ops.rmsnorm` (+ `torch_ops.add` when fused) |
| `add_rmsnorm(a, b, w, eps)` | `triton.rmsnorm` (op `add_rmsnorm`) | `torch_ops.add_rmsnorm` |
| `rope(q, k, cos, sin, head_dim, positions=None)` | `triton.rope` | `torch_ops.rope` (in place) |
| `silu_mul(x)` | `triton.silu_mul` | `torch_ops.silu_mul` |
| `paged_attention(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, ...)` | `triton.paged_attention` | `torch_ops.paged_attention` in a decode step |
| `paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, ...)` | (its attention half) | |
| `write_kv_cache(k, v, k_cache, v_cache, slot_mapping)` | (its cache-write half) | |
| `matmul(a, b)` | none yet (a `linear` candidate) | `a @ b` |

Where the kernels run:

- CUDA tensors: compiled by Triton's JIT. The autotuner benchmarks the configs once per
  key; `VSC_TRITON_AUTOTUNE=0` skips that and takes each kernel's default (first
  surviving) config.
- `TRITON_INTERPRET=1` set before triton is first imported: Triton's interpreter
  (numpy; CPU or CUDA tensors), always with the default config and no benchmarking —
  this is how the tests run on a machine without a GPU. Triton fixes the mode at import
  (`INTERPRETED`), so a process interprets or compiles, never both; CPU tensors in a
  compiling process are an error. The interpreter computes a bf16 `tl.dot` wrongly, so the kernels that use
  `tl.dot` take an `UPCAST` constexpr (fp32 operands, IEEE precision) which the wrappers
  set under the interpreter and for fp32 data.

Every wrapper also takes `config=` (a dict of the kernel's meta-parameters plus optional
`num_warps`/`num_stages`), which pins one config and skips autotuning — the form an IR
kernel reference such as `triton.rmsnorm{BLOCK_N = 4096, num_warps = 8}` carries.

`KERNELS` lists every kernel (`KernelSpec`): its name, IR kernel (derived from the
declarations' `aot` in vsc.runtime.kernel_registry), autotune space, the pruning rule, the
type of each runtime parameter, and the raw Python function that `vsc.backends.triton.aot`
compiles ahead of time.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from vsc.runtime.kernel_registry import aot_ir_kernel

__all__ = [
    "INTERPRETED", "KERNELS", "KernelSpec", "add_rmsnorm", "autotune_enabled", "matmul", "paged_attention", "paged_decode_attention",
    "rmsnorm", "rope", "silu_mul", "use_interpreter", "write_kv_cache",
]

AUTOTUNE_ENV = "VSC_TRITON_AUTOTUNE"


def autotune_enabled() -> bool:
    """False when VSC_TRITON_AUTOTUNE=0 (take each kernel's default config, no benchmarking)."""
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _imported_for_interpreter() -> bool:
    """Whether `triton.language` was set up for the interpreter (TRITON_INTERPRET=1 when
    triton was first imported). Triton decides this once, at import: its library functions
    (`tl.sum`, `tl.zeros`, ...) are either interpreter or compiler objects, never both, so
    one process either interprets kernels or compiles them."""
    from triton.language import standard
    return isinstance(standard.sigmoid, InterpretedFunction)


INTERPRETED = _imported_for_interpreter()


def use_interpreter(*tensors: torch.Tensor) -> bool:
    """Run under Triton's interpreter: triton was imported with TRITON_INTERPRET=1.

    CPU tensors need that mode (there is no CPU compiler); a process that imported triton
    without it can only launch on CUDA tensors.
    """
    if INTERPRETED:
        return True
    if any(t.device.type == "cpu" for t in tensors):
        raise RuntimeError("Triton kernels on CPU tensors run only under the interpreter: set "
                           "TRITON_INTERPRET=1 before the process first imports triton")
    return False


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# --- kernel registry ------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: its autotuned Triton function and how to choose among its configs.

    `prune(configs, nargs)` drops configs that do not fit the arguments (e.g. a block
    wider than the row) and must keep at least one; the first survivor is the default.
    """

    name: str
    ir_kernel: str | None                        # the IR kernel it is compiled ahead of time for (its declaration's `aot`)
    tuned: Any                                   # triton.runtime.autotuner.Autotuner
    prune: Callable[[list, dict], list]
    doc: str = ""
    in_place: tuple[str, ...] = field(default=())  # arguments the kernel updates in place
    # The type of every parameter not annotated tl.constexpr, as vsc.backends.triton.aot compiles it:
    # "*{dt}" a pointer to the variant's element type, "*i64" an index pointer, "i32", "fp32".
    signature: dict[str, str] = field(default_factory=dict)

    @property
    def configs(self) -> list[triton.Config]:
        return list(self.tuned.configs)

    @property
    def arg_names(self) -> list[str]:
        return list(self.tuned.arg_names)

    @property
    def meta_names(self) -> list[str]:
        """The constexprs the autotuner chooses (the caller never passes them)."""
        return list(self.tuned.configs[0].kwargs)

    def jit_function(self) -> JITFunction:
        """A JITFunction of the kernel, even when this module was imported under TRITON_INTERPRET=1."""
        return _jit_function(self.name)

    def interpreted(self) -> InterpretedFunction:
        return _interpreted(self.name)

    def default_config(self, nargs: dict) -> triton.Config:
        return self.prune(self.configs, nargs)[0]

    def resolve_config(self, nargs: dict, config: dict | None) -> triton.Config:
        """`config` (meta-parameters, num_warps, num_stages) over the default for these arguments."""
        base = self.default_config(nargs)
        if not config:
            return base
        unknown = set(config) - set(base.kwargs) - {"num_warps", "num_stages"}
        if unknown:
            raise ValueError(f"unknown config keys for triton.{self.name}: {sorted(unknown)}; "
                             f"expected some of {sorted(base.kwargs)} + num_warps, num_stages")
        kwargs = {k: config.get(k, v) for k, v in base.kwargs.items()}
        return triton.Config(kwargs, num_warps=config.get("num_warps", base.num_warps),
                             num_stages=config.get("num_stages", base.num_stages))


KERNELS: dict[str, KernelSpec] = {}


@functools.cache
def _jit_function(name: str) -> JITFunction:
    fn = KERNELS[name].tuned.fn
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


@functools.cache
def _interpreted(name: str) -> InterpretedFunction:
    fn = KERNELS[name].tuned.fn
    return fn if isinstance(fn, InterpretedFunction) else InterpretedFunction(fn.fn)


# A pointer to the element type of the data (the `{dt}` of an ahead-of-time variant: fp32, bf16).
_DATA = "*{dt}"


def _register(name: str, tuned, prune, doc: str, signature: dict[str, str], in_place: tuple[str, ...] = ()) -> KernelSpec:
    spec = KernelSpec(name, aot_ir_kernel(name), tuned, prune, doc, in_place, signature)
    KERNELS[name] = spec
    return spec


def _launch(spec: KernelSpec, grid, args: tuple, config: dict | None, interpret: bool) -> None:
    """Run `spec` over `grid` with positional `args` (every parameter but the tuned constexprs)."""
    nargs = dict(zip(spec.arg_names, args))
    if interpret:
        cfg = spec.resolve_config(nargs, config)
        spec.interpreted()[grid](*args, **cfg.kwargs)
        return
    if config is None and autotune_enabled() and isinstance(spec.tuned.fn, JITFunction):
        spec.tuned[grid](*args)
        return
    cfg = spec.resolve_config(nargs, config)
    spec.jit_function()[grid](*args, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _early_prune(rule: Callable[[triton.Config, dict], bool]):
    """An autotune `early_config_prune` keeping configs that satisfy `rule` (never none)."""
    def prune(configs, nargs, **_):
        kept = [c for c in configs if rule(c, nargs)]
        return kept or [configs[0]]
    return prune


# --- RMSNorm (optionally fused with the residual add) ---------------------------------------

RMSNORM_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=1)
    for bn, w in [(4096, 8), (1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 16), (8192, 8), (8192, 16),
                  (16384, 16), (512, 2), (256, 1), (128, 1)]
]


def _rmsnorm_prune(configs, nargs, **_):
    """Blocks no wider than the row (rounded up to a power of two, at least 128), so small
    rows do not pay for masked lanes; one-pass blocks (the whole row) first, so they are
    the default. Rows wider than 16384 loop over chunks."""
    width = min(16384, max(128, _pow2(nargs["N"])))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= width]
    kept.sort(key=lambda c: c.kwargs["BLOCK_N"] != width)
    return kept or [configs[0]]


@triton.jit
def _residual_chunk(x_row, r_row, offs, mask, Res, HAS_RESIDUAL: tl.constexpr):
    """Columns `offs` of the row: x, or with HAS_RESIDUAL x + res rounded to the residual
    stream's dtype (as the unfused add would round it); masked-off lanes are 0."""
    x = tl.load(x_row + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(r_row + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(Res.dtype.element_ty)
    return x


@triton.autotune(configs=RMSNORM_CONFIGS, key=["N", "HAS_RESIDUAL"],
                 prune_configs_by={"early_config_prune": _rmsnorm_prune}, restore_value=["Res"])
@triton.jit
def rmsnorm_kernel(X, W, Out, Res, ResOut, stride_x, stride_out, stride_res, stride_res_out, N, eps,
                   HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per row: out = (r * rsqrt(mean(r^2) + eps)).to(dtype) * w, r = x (+ res).

    With HAS_RESIDUAL the sum r = x + res is rounded to the activation dtype (as the
    unfused add would be), stored to ResOut (which may be Res itself: the in-place
    update of the residual stream), and normalized. Statistics in fp32. Two passes over
    the row: sum of squares, then normalize; the second pass re-reads x and res (from
    cache) rather than ResOut, so writing ResOut over Res or X is safe.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    o_row = Out + row * stride_out
    r_row = Res + row * stride_res
    ro_row = ResOut + row * stride_res_out
    cols = tl.arange(0, BLOCK_N)
    sum_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs = start + cols
        x = _residual_chunk(x_row, r_row, offs, offs < N, Res, HAS_RESIDUAL).to(tl.float32)
        sum_sq += x * x
    rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / N + eps)
    for start in range(0, N, BLOCK_N):
        offs = start + cols
        mask = offs < N
        r = _residual_chunk(x_row, r_row, offs, mask, Res, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(ro_row + offs, r, mask=mask)
        x = r.to(tl.float32)
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x * rstd).to(Out.dtype.element_ty).to(tl.float32) * w
        tl.store(o_row + offs, y.to(Out.dtype.element_ty), mask=mask)


RMSNORM = _register("rmsnorm", rmsnorm_kernel, _rmsnorm_prune,
                    "RMSNorm over the last dim, optionally fused with the residual add",
                    {"X": _DATA, "W": _DATA, "Out": _DATA, "Res": _DATA, "ResOut": _DATA, "stride_x": "i32",
                     "stride_out": "i32", "stride_res": "i32", "stride_res_out": "i32", "N": "i32", "eps": "fp32"},
                    in_place=("ResOut",))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, n] without copying when its last dim is contiguous and rows are evenly strided."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
            *, residual_out: torch.Tensor | None = None, out: torch.Tensor | None = None,
            config: dict | None = None) -> torch.Tensor:
    """RMSNorm of x [..., N] by w [N]; returns a new tensor shaped like x.

    With `residual` (same shape and dtype as x): r = x + residual is stored into
    `residual_out`, by default `residual` itself (IN PLACE: it becomes the new residual
    stream), and norm(r) is returned — the fused add+RMSNorm of a decoder layer. Matches
    `torch_ops.add` then `torch_ops.rmsnorm`. `add_rmsnorm` is the out-of-place form.
    """
    n = x.shape[-1]
    if w.shape != (n,):
        raise ValueError(f"rmsnorm weight shape {tuple(w.shape)} does not match hidden size {n}")
    x2 = _rows(x)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o2 = out.view(-1, n)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        r2 = _rows(residual)
        target = residual if residual_out is None else residual_out
        if target.shape != x.shape:
            raise ValueError(f"residual_out shape {tuple(target.shape)} != x shape {tuple(x.shape)}")
        try:
            ro2 = target.view(-1, n)      # must be a view: the kernel writes the new residual into it
        except RuntimeError:
            ro2 = None
        if ro2 is None or ro2.stride(-1) != 1:
            raise ValueError("the residual written in place needs a contiguous last dim and evenly strided rows")
    else:
        if residual_out is not None:
            raise ValueError("residual_out without residual")
        r2 = ro2 = x2                     # unused (HAS_RESIDUAL=False); any valid pointer
    rows = x2.shape[0]
    if rows == 0:
        return out
    args = (x2, w, o2, r2, ro2, x2.stride(0), o2.stride(0), r2.stride(0), ro2.stride(0), n, float(eps),
            residual is not None)
    _launch(RMSNORM, (rows,), args, config, use_interpreter(x))
    return out


def add_rmsnorm(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float, *,
                config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The IR's `add_rmsnorm` on `triton.rmsnorm`: (rmsnorm(a + b), a + b), both new tensors,
    inputs untouched — as `torch_ops.add_rmsnorm`. Same traffic as the in-place form."""
    s = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    return rmsnorm(a, w, eps, residual=b, residual_out=s, config=config), s


# --- rotary position embedding (HF Llama: rotate_half, non-interleaved) ---------------------

ROPE_CONFIGS = [
    triton.Config({"BLOCK_H": bh}, num_warps=w, num_stages=1)
    for bh, w in [(4, 4), (1, 1), (2, 1), (2, 2), (4, 2), (8, 4), (8, 8), (16, 4), (16, 8)]
]


def _rope_fits(c: triton.Config, nargs: dict) -> bool:
    return c.kwargs["BLOCK_H"] <= _pow2(nargs["num_q_heads"] + nargs["num_k_heads"])


@triton.autotune(configs=ROPE_CONFIGS, key=["num_q_heads", "num_k_heads", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": _early_prune(_rope_fits)}, restore_value=["Q", "K"])
@triton.jit
def rope_kernel(Q, K, Cos, Sin, Positions, stride_qt, stride_kt, stride_ct, num_q_heads, num_k_heads,
                HAS_POSITIONS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
                BLOCK_H: tl.constexpr):
    """Program (token t, block of BLOCK_H heads across q then k): rotate in place.

    out[:h] = x[:h] * cos[:h] - x[h:] * sin[:h];  out[h:] = x[h:] * cos[h:] + x[:h] * sin[h:]
    (h = HEAD_DIM / 2), i.e. x * cos + rotate_half(x) * sin, computed in fp32. cos/sin
    rows come from row t of Cos/Sin, or row Positions[t] of full tables (HAS_POSITIONS).
    """
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    half: tl.constexpr = HEAD_DIM // 2
    if HAS_POSITIONS:
        row = tl.load(Positions + t).to(tl.int64)
    else:
        row = t
    d = tl.arange(0, HALF_PAD)
    dmask = d < half
    cos1 = tl.load(Cos + row * stride_ct + d, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(Cos + row * stride_ct + half + d, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(Sin + row * stride_ct + d, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(Sin + row * stride_ct + half + d, mask=dmask, other=0.0).to(tl.float32)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    is_q = h < num_q_heads
    hmask = h < num_q_heads + num_k_heads
    q_base = Q + t * stride_qt + h.to(tl.int64) * HEAD_DIM
    k_base = K + t * stride_kt + (h - num_q_heads).to(tl.int64) * HEAD_DIM
    base = tl.where(is_q, q_base, k_base)
    ptr1 = base[:, None] + d[None, :]
    mask = hmask[:, None] & dmask[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + half, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos1[None, :] - x2 * sin1[None, :]
    o2 = x2 * cos2[None, :] + x1 * sin2[None, :]
    tl.store(ptr1, o1.to(Q.dtype.element_ty), mask=mask)
    tl.store(ptr1 + half, o2.to(Q.dtype.element_ty), mask=mask)


ROPE = _register("rope", rope_kernel, _early_prune(_rope_fits),
                 "rotate q and k in place by cos/sin rows (HF rotate_half convention)",
                 {"Q": _DATA, "K": _DATA, "Cos": _DATA, "Sin": _DATA, "Positions": "*i64", "stride_qt": "i32",
                  "stride_kt": "i32", "stride_ct": "i32", "num_q_heads": "i32", "num_k_heads": "i32"},
                 in_place=("Q", "K"))


def _token_rows(x: torch.Tensor, head_dim: int, what: str) -> torch.Tensor:
    """x [T, heads*hd] or [T, heads, hd] as a [T, heads*hd] view (heads packed, rows strided)."""
    t = x.shape[0]
    width = math.prod(x.shape[1:])
    if width % head_dim:
        raise ValueError(f"rope: {what} row width {width} is not a multiple of head_dim {head_dim}")
    packed = (x.dim() == 2 and x.stride(1) == 1) or (x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == head_dim)
    if not packed:
        raise ValueError(f"rope rotates {what} in place, so it needs packed heads (last dims contiguous)")
    return x.as_strided((t, width), (x.stride(0), 1))


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
         positions: torch.Tensor | None = None, *, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, heads*hd] and k [T, kv_heads*hd] IN PLACE; returns (q, k) (the same tensors).

    `cos`, `sin`: either per-token rows ([T, hd] or `RotaryTable.lookup`'s [T, 1, hd]), as
    `torch_ops.rope` takes them, or — with `positions` [T] — the whole tables
    [max_position, hd] (`RotaryTable.cos/.sin`), indexed inside the kernel. q and k may be
    row-strided views (e.g. splits of a fused qkv output) as long as each row's heads are
    packed.
    """
    if head_dim % 2:
        raise ValueError(f"rope needs an even head_dim, got {head_dim}")
    t = q.shape[0]
    q2, k2 = _token_rows(q, head_dim, "q"), _token_rows(k, head_dim, "k")
    cos2 = cos.reshape(cos.shape[0], -1)
    sin2 = sin.reshape(sin.shape[0], -1)
    if cos2.shape[1] != head_dim or sin2.shape != cos2.shape or cos2.stride(1) != 1 or sin2.stride() != cos2.stride():
        raise ValueError(f"rope: cos/sin must be [rows, {head_dim}] with equal, row-major strides")
    if q.dtype != k.dtype:
        raise ValueError("rope: q and k must share a dtype")
    if positions is None and cos2.shape[0] != t:
        raise ValueError(f"rope: {cos2.shape[0]} cos/sin rows for {t} tokens (pass positions= to index a table)")
    if t == 0:
        return q, k
    qh, kh = q2.shape[1] // head_dim, k2.shape[1] // head_dim
    pos = positions if positions is not None else q2   # unused pointer when HAS_POSITIONS is False
    args = (q2, k2, cos2, sin2, pos, q2.stride(0), k2.stride(0), cos2.stride(0), qh, kh,
            positions is not None, head_dim, _pow2(head_dim // 2))
    grid = lambda meta: (t, triton.cdiv(qh + kh, meta["BLOCK_H"]))  # noqa: E731
    _launch(ROPE, grid, args, config, use_interpreter(q))
    return q, k


# --- SiLU(gate) * up ------------------------------------------------------------------------

SILU_MUL_CONFIGS = [
    triton.Config({"BLOCK_F": bf}, num_warps=w, num_stages=1)
    for bf, w in [(1024, 4), (256, 1), (512, 2), (512, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (128, 1)]
]


def _silu_mul_fits(c: triton.Config, nargs: dict) -> bool:
    return c.kwargs["BLOCK_F"] <= max(128, _pow2(nargs["F"]))


@triton.autotune(configs=SILU_MUL_CONFIGS, key=["F"],
                 prune_configs_by={"early_config_prune": _early_prune(_silu_mul_fits)})
@triton.jit
def silu_mul_kernel(X, Out, stride_x, stride_out, F, BLOCK_F: tl.constexpr):
    """Program (row, block of BLOCK_F columns): out = silu(x[:F]) * x[F:].

    silu in fp32, rounded to the output dtype before the product (as torch's separate
    silu then mul would round).
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + F + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_out + cols, (s * u).to(Out.dtype.element_ty), mask=mask)


SILU_MUL = _register("silu_mul", silu_mul_kernel, _early_prune(_silu_mul_fits),
                     "silu(x[..., :F]) * x[..., F:] of a fused gate/up output",
                     {"X": _DATA, "Out": _DATA, "stride_x": "i32", "stride_out": "i32", "F": "i32"})


def silu_mul(x: torch.Tensor, *, out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [..., 2F] -> silu(x[..., :F]) * x[..., F:] as a new [..., F] tensor."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_mul needs an even last dim, got {x.shape[-1]}")
    f = x.shape[-1] // 2
    x2 = _rows(x)
    if out is None:
        out = torch.empty(*x.shape[:-1], f, dtype=x.dtype, device=x.device)
    o2 = out.view(-1, f)
    rows = x2.shape[0]
    if rows == 0 or f == 0:
        return out
    args = (x2, o2, x2.stride(0), o2.stride(0), f)
    grid = lambda meta: (rows, triton.cdiv(f, meta["BLOCK_F"]))  # noqa: E731
    _launch(SILU_MUL, grid, args, config, use_interpreter(x))
    return out


# --- paged KV cache: write new K/V, then decode attention -----------------------------------

KV_WRITE_CONFIGS = [
    triton.Config({"BLOCK": b}, num_warps=w, num_stages=1)
    for b, w in [(1024, 4), (256, 1), (512, 2), (2048, 4), (2048, 8), (4096, 8)]
]


def _kv_write_fits(c: triton.Config, nargs: dict) -> bool:
    return c.kwargs["BLOCK"] <= max(256, _pow2(nargs["ROW"]))


@triton.autotune(configs=KV_WRITE_CONFIGS, key=["ROW"],
                 prune_configs_by={"early_config_prune": _early_prune(_kv_write_fits)})
@triton.jit
def kv_write_kernel(K, V, KCache, VCache, Slots, stride_kt, stride_vt, stride_kc, stride_vc,
                    ROW: tl.constexpr, BLOCK: tl.constexpr):
    """Program (token t, block of BLOCK values): KCache[Slots[t]] = K[t], VCache[Slots[t]] = V[t].

    A row is one token's kv_heads*head_dim values (packed in both K and the cache).
    Tokens with a negative slot (padding) are skipped. Idempotent, so the autotuner's
    repeated trials need no restore_value (which would clone the whole cache).
    """
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot >= 0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < ROW
        k = tl.load(K + t * stride_kt + cols, mask=mask)
        v = tl.load(V + t * stride_vt + cols, mask=mask)
        tl.store(KCache + slot * stride_kc + cols, k.to(KCache.dtype.element_ty), mask=mask)
        tl.store(VCache + slot * stride_vc + cols, v.to(VCache.dtype.element_ty), mask=mask)


KV_WRITE = _register("kv_write", kv_write_kernel, _early_prune(_kv_write_fits),
                     "scatter one step's new K/V rows into their cache slots",
                     {"K": _DATA, "V": _DATA, "KCache": _DATA, "VCache": _DATA, "Slots": "*i64", "stride_kt": "i32",
                      "stride_vt": "i32", "stride_kc": "i32", "stride_vc": "i32"},
                     in_place=("KCache", "VCache"))


def _check_cache(cache: torch.Tensor, kv_heads: int, head_dim: int, what: str) -> None:
    if cache.dim() != 3 or cache.shape[1:] != (kv_heads, head_dim):
        raise ValueError(f"{what} must be [slots, {kv_heads}, {head_dim}], got {tuple(cache.shape)}")
    if cache.stride(2) != 1 or cache.stride(1) != head_dim:
        raise ValueError(f"{what} needs each slot's heads packed (strides [*, {head_dim}, 1])")


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, *, config: dict | None = None) -> None:
    """Store k, v [T, kv_heads*hd] (or [T, kv_heads, hd]) at cache rows slot_mapping [T] (in place)."""
    t = k.shape[0]
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    _check_cache(k_cache, kv_heads, head_dim, "k_cache")
    _check_cache(v_cache, kv_heads, head_dim, "v_cache")
    row = kv_heads * head_dim
    k2, v2 = _rows(k.reshape(t, row)), _rows(v.reshape(t, row))
    if t == 0:
        return
    args = (k2, v2, k_cache, v_cache, slot_mapping, k2.stride(0), v2.stride(0), k_cache.stride(0),
            v_cache.stride(0), row)
    grid = lambda meta: (t, triton.cdiv(row, meta["BLOCK"]))  # noqa: E731
    _launch(KV_WRITE, grid, args, config, use_interpreter(k, k_cache))


PAGED_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(64, 4, 2), (16, 4, 1), (32, 4, 2), (64, 4, 3), (64, 8, 2), (128, 4, 2), (128, 8, 3),
                     (32, 2, 2), (16, 2, 2)]
]


def _paged_decode_fits(c: triton.Config, nargs: dict) -> bool:
    # The [GROUP_PAD, BLOCK_N] fp32 score tile and [BLOCK_N, HEAD_DIM] K/V tiles must stay
    # in registers: skip 128-token tiles for head_dim > 128.
    return c.kwargs["BLOCK_N"] * nargs["HEAD_DIM"] <= 128 * 128


@triton.autotune(configs=PAGED_DECODE_CONFIGS, key=["GROUP", "HEAD_DIM", "BLOCK_SIZE", "UPCAST"],
                 prune_configs_by={"early_config_prune": _early_prune(_paged_decode_fits)})
@triton.jit
def paged_decode_kernel(Q, KCache, VCache, Out, BlockTables, ContextLens, scale,
                        stride_qb, stride_qh, stride_kc, stride_kh, stride_vc, stride_vh,
                        stride_ob, stride_oh, stride_bt,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Program (sequence b, kv head g): the GROUP query heads sharing kv head g attend to
    the sequence's context_lens[b] cached tokens, read BLOCK_N at a time through its block
    table (token i lives in slot block_tables[b, i // BLOCK_SIZE] * BLOCK_SIZE + i % BLOCK_SIZE).

    Online softmax in the exp2 domain with fp32 running max, denominator and accumulator;
    K and V are read once per kv head for the whole query group (the GQA saving). The
    group is padded to GROUP_PAD >= 16 rows so both products are tensor-core `tl.dot`s.
    """
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    ctx = tl.load(ContextLens + b).to(tl.int32)
    rows = tl.arange(0, GROUP_PAD)
    row_mask = rows < GROUP
    heads = g * GROUP + rows
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + heads[:, None].to(tl.int64) * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = scale * 1.4426950408889634          # log2(e): softmax via exp2
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = BlockTables + b * stride_bt
    for start in range(0, ctx, BLOCK_N):
        tok = start + offs_n
        tmask = tok < ctx
        block = tl.load(table + tok // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        slot = block * BLOCK_SIZE + (tok % BLOCK_SIZE)
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(KCache + slot[:, None] * stride_kc + g * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(VCache + slot[:, None] * stride_vc + g * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
        s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if UPCAST:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)             # an empty context yields zeros, not NaN
    out = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + heads[:, None].to(tl.int64) * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_mask[:, None] & dmask[None, :])


PAGED_DECODE = _register("paged_decode", paged_decode_kernel,
                         _early_prune(_paged_decode_fits),
                         "one query token per sequence over its paged KV context, online softmax",
                         {"Q": _DATA, "KCache": _DATA, "VCache": _DATA, "Out": _DATA, "BlockTables": "*i64",
                          "ContextLens": "*i64", "scale": "fp32", "stride_qb": "i32", "stride_qh": "i32",
                          "stride_kc": "i32", "stride_kh": "i32", "stride_vc": "i32", "stride_vh": "i32",
                          "stride_ob": "i32", "stride_oh": "i32", "stride_bt": "i32"})


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           heads: int, kv_heads: int, head_dim: int, block_size: int, *,
                           out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """Decode attention: q [B, heads*hd] (or [B, heads, hd]), one new token per sequence,
    over caches [num_blocks*block_size, kv_heads, hd] through block_tables [B, max_blocks]
    (int32/int64) for context_lens [B] tokens each. Returns a new tensor shaped like q.

    Reads the cache only; the step's own K/V must already be in it (`write_kv_cache`).
    """
    if heads % kv_heads:
        raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv_heads}")
    _check_cache(k_cache, kv_heads, head_dim, "k_cache")
    _check_cache(v_cache, kv_heads, head_dim, "v_cache")
    b = q.shape[0]
    q3 = q.reshape(b, heads, head_dim)
    if q3.stride(2) != 1:
        q3 = q3.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    o3 = out.view(b, heads, head_dim)
    if block_tables.dim() != 2 or block_tables.shape[0] != b or context_lens.shape != (b,):
        raise ValueError(f"block_tables [B, max_blocks] and context_lens [B] must match q's batch {b}")
    if b == 0:
        return out
    group = heads // kv_heads
    interpret = use_interpreter(q, k_cache)
    upcast = interpret or k_cache.dtype == torch.float32 or q.dtype == torch.float32
    args = (q3, k_cache, v_cache, o3, block_tables, context_lens, float(scale),
            q3.stride(0), q3.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            o3.stride(0), o3.stride(1), block_tables.stride(0),
            group, max(16, _pow2(group)), head_dim, max(16, _pow2(head_dim)), block_size, upcast)
    _launch(PAGED_DECODE, (b, kv_heads), args, config, interpret)
    return out


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, heads: int, kv_heads: int, head_dim: int, scale: float,
                    block_size: int, *, config: dict | None = None) -> torch.Tensor:
    """The IR's `triton.paged_attention` for a decode step: write k, v [B, kv_heads*hd] to
    their slots, then attend q [B, heads*hd] over each sequence's cached context.
    Same result as `torch_ops.paged_attention` when every sequence has one new token.
    `config` applies to the attention kernel."""
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, heads, kv_heads,
                                  head_dim, block_size, config=config)


# --- matmul (tensor-core tiles; a candidate for `linear`, and the wgmma witness) ------------

MATMUL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (64, 64, 32, 4, 2), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                             (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 256, 64, 8, 3), (64, 64, 64, 4, 3)]
]


def _matmul_fits(c: triton.Config, nargs: dict) -> bool:
    m, n = nargs["M"], nargs["N"]
    # No tile more than twice the problem in a dimension (decode's M = batch is small).
    return c.kwargs["BLOCK_M"] <= max(64, 2 * m) and c.kwargs["BLOCK_N"] <= max(64, 2 * n)


@triton.autotune(configs=MATMUL_CONFIGS, key=["M", "N", "K", "UPCAST"],
                 prune_configs_by={"early_config_prune": _early_prune(_matmul_fits)})
@triton.jit
def matmul_kernel(A, B, C, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """C = A @ B, one BLOCK_M x BLOCK_N tile per program, fp32 accumulation; tiles grouped
    GROUP_M rows of tiles at a time so neighbouring programs share A and B in L2. On
    sm_90 with 16-bit operands and a 64-multiple BLOCK_M the product lowers to wgmma."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & (rn[None, :] < N), other=0.0)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = C + rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


MATMUL = _register("matmul", matmul_kernel, _early_prune(_matmul_fits),
                   "C = A @ B with fp32 accumulation (tensor-core tiles)",
                   {"A": _DATA, "B": _DATA, "C": _DATA, "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32",
                    "stride_ak": "i32", "stride_bk": "i32", "stride_bn": "i32", "stride_cm": "i32", "stride_cn": "i32"})


def matmul(a: torch.Tensor, b: torch.Tensor, *, out_dtype: torch.dtype | None = None,
           config: dict | None = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] -> [M, N] (fp32 accumulation, output in a's dtype unless out_dtype).
    `linear(x, w)` is `matmul(x, w.t())`: any strides work."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul shapes {tuple(a.shape)} @ {tuple(b.shape)} do not chain")
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty(m, n, dtype=out_dtype or a.dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    interpret = use_interpreter(a, b)
    upcast = interpret or a.dtype == torch.float32 or b.dtype == torch.float32
    args = (a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), upcast)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _launch(MATMUL, grid, args, config, interpret)
    return c


def describe() -> list[dict]:
    """Every kernel's name, IR kernel and autotune space (for docs and `vsc` listings)."""
    return [{"name": s.name, "ir_kernel": s.ir_kernel, "doc": s.doc, "meta": s.meta_names, "in_place": list(s.in_place),
             "configs": [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in s.configs]}
            for s in KERNELS.values()]

