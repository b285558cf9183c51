"""Ahead-of-time compilation of the Triton kernels for a CUDA target, without a GPU.

`compile_kernels(out_dir)` compiles every kernel of `vsc.runtime.kernels.triton_ops` for a
fixed set of signatures — fp32 and bf16 where meaningful, constexprs from a model's
shapes (`KernelShapes`; Llama-3-8B by default) — to PTX and cubin (Triton's wheel ships
`ptxas`), and writes into `out_dir`:

    <kernel>.py                 the kernel's source (standalone: imports + @triton.jit def)
    <kernel>.<variant>.ptx      PTX for the target (`.target sm_90a` for sm_90)
    <kernel>.<variant>.cubin    the assembled binary
    kernels.json                the index: per variant its IR kernel, signature, constexprs,
                                runtime parameter order, num_warps/num_stages, shared memory,
                                the entry name, the launch grid, the alignment assumptions,
                                and the sha256 of every file

`vsc compile` for a cuda target calls this to fill `server/kernels/`. A launcher for a
cubin passes the `params` of its entry, in order, followed by the two scratch pointers
Triton appends to every entry (`global_scratch`, `profile_scratch`; null when their sizes
are 0). A variant assumes what its `assumes` field says (16-divisible pointers and
strides, unit strides baked in as constants); a runtime whose tensors break an
assumption launches through the JIT wrappers instead.

Triton decides at import whether a process interprets or compiles kernels (see
`kernels.INTERPRETED`); a process that imported it for the interpreter (the test suite)
runs this compilation in a fresh `python -m vsc.backends.triton.aot` subprocess.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from triton.backends.compiler import GPUTarget

__all__ = ["DEFAULT_TARGET", "LLAMA3_8B", "KernelShapes", "Variant", "compile_kernels", "variants"]

DEFAULT_TARGET = GPUTarget("cuda", 90, 32)
INDEX_FORMAT = "vsc-triton-kernels 1"


@dataclass(frozen=True)
class KernelShapes:
    """The model dimensions that become constexprs (or pick default configs)."""

    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    block_size: int = 16          # KV cache block (the plan's paged-kv block)
    batch: int = 64               # representative decode batch (picks default configs only)

    @classmethod
    def from_model_attrs(cls, attrs: dict, block_size: int, batch: int = 64) -> "KernelShapes":
        """From an IR model's attrs (hidden, heads, kv_heads, head_dim, intermediate)."""
        heads = int(attrs["heads"])
        hidden = int(attrs["hidden"])
        return cls(hidden=hidden, heads=heads, kv_heads=int(attrs.get("kv_heads", heads)),
                   head_dim=int(attrs.get("head_dim", hidden // heads)), intermediate=int(attrs["intermediate"]),
                   block_size=int(block_size), batch=int(batch))


LLAMA3_8B = KernelShapes()


@dataclass
class Variant:
    """One compiled specialization of one kernel."""

    kernel: str                      # key of kernels.KERNELS
    label: str                       # e.g. "bf16.residual" -> rmsnorm.bf16.residual.ptx
    signature: dict[str, str]        # every parameter: "*bf16", "i32", "fp32" or "constexpr"
    constexprs: dict[str, Any]       # values of the "constexpr" entries
    num_warps: int
    num_stages: int
    grid: str                        # how a launcher sizes the grid
    divisible_16: list[str] = field(default_factory=list)   # parameters assumed multiples of 16 (bytes for pointers)
    notes: str = ""

    @property
    def params(self) -> list[str]:
        """Runtime parameters of the compiled entry, in order (constexprs are folded away)."""
        return [k for k, v in self.signature.items() if v != "constexpr"]


_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


def _variant(kernel: str, label: str, dt: str, fixed: dict[str, Any], rep: dict[str, int],
             grid: str, notes: str = "", divisible: tuple[str, ...] = ()) -> Variant:
    """Build a Variant: the kernel's declared signature (`KernelSpec.signature`, data pointers
    to `dt`) for runtime parameters, `fixed` for constexprs (incl. unit strides baked in), the
    kernel's default config (for representative values `rep`) for the tuned meta-parameters.
    Pointers and the `divisible` ints whose representative value is a multiple of 16 get the
    16-divisibility hint."""
    from vsc.runtime.kernels.triton_ops import KERNELS

    spec = KERNELS[kernel]
    types = {name: t.format(dt=dt) for name, t in spec.signature.items()}
    cfg = spec.default_config({**rep, **fixed})
    constexprs = {**fixed, **cfg.kwargs}
    signature = {}
    for name in spec.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        else:
            raise KeyError(f"{kernel}: no type for parameter {name!r}")
    div = [n for n in spec.arg_names if signature[n].startswith("*")]
    div += [n for n in divisible if n in rep and signature[n] != "constexpr" and rep[n] % 16 == 0]
    return Variant(kernel, label, signature, constexprs, cfg.num_warps, cfg.num_stages, grid, div, notes)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def variants(shapes: KernelShapes = LLAMA3_8B, dtypes: tuple[str, ...] = ("fp32", "bf16")) -> list[Variant]:
    """The fixed set of specializations compiled for `shapes`."""
    s = shapes
    out: list[Variant] = []
    kv_row = s.kv_heads * s.head_dim
    qkv_row = (s.heads + 2 * s.kv_heads) * s.head_dim
    group = s.heads // s.kv_heads
    for dt in dtypes:
        # rmsnorm: plain and fused with the residual add.
        for residual in (False, True):
            out.append(_variant(
                "rmsnorm", dt + (".residual" if residual else ""), dt, {"HAS_RESIDUAL": residual},
                {"N": s.hidden, "stride_x": s.hidden, "stride_out": s.hidden, "stride_res": s.hidden,
                 "stride_res_out": s.hidden},
                "(rows,)", divisible=("stride_x", "stride_out", "stride_res", "stride_res_out", "N"),
                notes="with HAS_RESIDUAL, ResOut = x + Res (ResOut may be Res: in place)"))
        # rope: cos/sin rows per token, or whole tables indexed by positions (int64).
        for table in (False, True):
            out.append(_variant(
                "rope", dt + (".table" if table else ".rows"), dt,
                {"HAS_POSITIONS": table, "HEAD_DIM": s.head_dim, "HALF_PAD": _pow2(s.head_dim // 2)},
                {"num_q_heads": s.heads, "num_k_heads": s.kv_heads, "stride_qt": qkv_row, "stride_kt": qkv_row,
                 "stride_ct": s.head_dim},
                "(T, cdiv(num_q_heads + num_k_heads, BLOCK_H))", divisible=("stride_qt", "stride_kt", "stride_ct"),
                notes="in place on Q and K; strides shown for q/k as views of a fused qkv output"))
        out.append(_variant(
            "silu_mul", dt, dt, {},
            {"F": s.intermediate, "stride_x": 2 * s.intermediate, "stride_out": s.intermediate},
            "(rows, cdiv(F, BLOCK_F))", divisible=("stride_x", "stride_out", "F")))
        out.append(_variant(
            "kv_write", dt, dt, {"ROW": kv_row},
            {"ROW": kv_row, "stride_kt": qkv_row, "stride_vt": qkv_row, "stride_kc": kv_row, "stride_vc": kv_row},
            "(T, cdiv(ROW, BLOCK))", divisible=("stride_kt", "stride_vt", "stride_kc", "stride_vc"),
            notes="negative slots are skipped"))
        out.append(_variant(
            "paged_decode", dt, dt,
            {"GROUP": group, "GROUP_PAD": max(16, _pow2(group)), "HEAD_DIM": s.head_dim,
             "BLOCK_D": max(16, _pow2(s.head_dim)), "BLOCK_SIZE": s.block_size, "UPCAST": dt == "fp32"},
            {"HEAD_DIM": s.head_dim, "stride_qb": s.heads * s.head_dim, "stride_qh": s.head_dim, "stride_kc": kv_row,
             "stride_kh": s.head_dim, "stride_vc": kv_row, "stride_vh": s.head_dim, "stride_ob": s.heads * s.head_dim,
             "stride_oh": s.head_dim},
            "(B, kv_heads)",
            divisible=("stride_qb", "stride_qh", "stride_kc", "stride_kh", "stride_vc", "stride_vh", "stride_ob",
                       "stride_oh"),
            notes="fp32 variant multiplies in IEEE fp32 (UPCAST); bf16 uses bf16 tensor-core dots"))
    if "bf16" in dtypes:
        # linear: x [M, K] @ w[N, K]^T, row-major x, w and y: unit strides baked in.
        out.append(_variant(
            "matmul", "bf16.linear", "bf16",
            {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1, "UPCAST": False},
            {"M": s.batch, "N": s.hidden, "K": s.hidden, "stride_am": s.hidden, "stride_bn": s.hidden,
             "stride_cm": s.hidden},
            "(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)", divisible=("N", "K", "stride_am", "stride_bn", "stride_cm"),
            notes="y = x @ w.T for w [N, K]; on sm_90 the product is a wgmma"))
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jit_callees(fn) -> list:
    """The @triton.jit functions of its module that `fn` (a JITFunction) calls, theirs first."""
    from triton.runtime.jit import JITFunction

    out = []
    for name, value in fn.fn.__globals__.items():
        if isinstance(value, JITFunction) and value.fn is not fn.fn and re.search(rf"\b{name}\(", fn.src):
            out += [f for f in (*_jit_callees(value), value) if f not in out]
    return out


def _source_file(kernel: str) -> str:
    """The kernel as a standalone module: the @triton.jit functions it calls, then the kernel."""
    from vsc.runtime.kernels.triton_ops import KERNELS

    fn = KERNELS[kernel].jit_function()
    body = "\n\n\n".join(f"@triton.jit\n{f.src.rstrip()}" for f in (*_jit_callees(fn), fn))
    return ("# Generated by vsc.backends.triton.aot from vsc/runtime/kernels/triton_ops.py "
            f"(kernel {kernel!r}).\nimport triton\nimport triton.language as tl\n\n\n{body}\n")


def _compile_variant(v: Variant, target: GPUTarget):
    import triton
    from triton.compiler import ASTSource

    from vsc.runtime.kernels.triton_ops import KERNELS

    spec = KERNELS[v.kernel]
    fn = spec.jit_function()
    names = spec.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in v.divisible_16}
    src = ASTSource(fn, v.signature, constexprs=v.constexprs, attrs=attrs)
    options = {"num_warps": v.num_warps, "num_stages": v.num_stages, "enable_fp_fusion": True}
    return triton.compile(src, target=target, options=options)


def _run_in_subprocess(out_dir: Path, target: GPUTarget, shapes: KernelShapes, dtypes, kernels) -> list[Path]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "vsc.backends.triton.aot", str(out_dir), "--backend", target.backend,
           "--arch", str(target.arch), "--warp-size", str(target.warp_size),
           "--shapes", json.dumps(dataclasses.asdict(shapes)), "--dtypes", ",".join(dtypes)]
    if kernels:
        cmd += ["--kernels", ",".join(kernels)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"AOT compilation subprocess failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return [Path(line) for line in done.stdout.splitlines() if line.strip()]


def compile_kernels(out_dir: str | os.PathLike, target: GPUTarget = DEFAULT_TARGET,
                    shapes: KernelShapes = LLAMA3_8B, dtypes: tuple[str, ...] = ("fp32", "bf16"),
                    kernels: tuple[str, ...] | None = None) -> list[Path]:
    """Compile the kernels' variants for `target` into `out_dir`; returns the files written
    (sources, .ptx, .cubin, and kernels.json last). `kernels` restricts to some kernel names."""
    out = Path(out_dir)
    import triton

    from vsc.runtime.kernels.triton_ops import INTERPRETED, KERNELS

    unknown_dtypes = set(dtypes) - set(_TORCH_NAMES)
    if unknown_dtypes:
        raise ValueError(f"unsupported dtypes {sorted(unknown_dtypes)}; expected some of {sorted(_TORCH_NAMES)}")
    every = variants(shapes, tuple(dtypes))
    chosen = [v for v in every if kernels is None or v.kernel in kernels]
    unknown = set(kernels or ()) - {v.kernel for v in every}
    if unknown:
        raise ValueError(f"no variants for kernels {sorted(unknown)}; known: {sorted({v.kernel for v in every})}")
    if INTERPRETED:
        return _run_in_subprocess(out, target, shapes, tuple(dtypes), kernels)
    out.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    sources: dict[str, dict] = {}
    entries = []
    for v in chosen:
        if v.kernel not in sources:
            path = out / f"{v.kernel}.py"
            path.write_text(_source_file(v.kernel))
            written.append(path)
            sources[v.kernel] = {"path": path.name, "sha256": _sha256(path)}
        compiled = _compile_variant(v, target)
        files = {}
        for ext in ("ptx", "cubin"):
            if ext not in compiled.asm:
                continue
            path = out / f"{v.kernel}.{v.label}.{ext}"
            data = compiled.asm[ext]
            if isinstance(data, str):
                path.write_text(data)
            else:
                path.write_bytes(data)
            written.append(path)
            files[ext] = {"path": path.name, "sha256": _sha256(path)}
        md = compiled.metadata
        entries.append({
            "name": v.kernel, "variant": v.label, "ir_kernel": KERNELS[v.kernel].ir_kernel,
            "entry": md.name, "signature": v.signature, "constexprs": v.constexprs, "params": v.params,
            "trailing_params": ["global_scratch", "profile_scratch"],
            "num_warps": md.num_warps, "num_stages": md.num_stages, "num_ctas": md.num_ctas,
            "threads_per_block": md.num_warps * target.warp_size, "shared_bytes": md.shared,
            "global_scratch_size": md.global_scratch_size, "profile_scratch_size": md.profile_scratch_size,
            "grid": v.grid, "assumes": {"divisible_by_16": v.divisible_16,
                                        "unit_strides": [k for k, x in v.constexprs.items()
                                                         if k.startswith("stride_") and x == 1]},
            "in_place": list(KERNELS[v.kernel].in_place), "notes": v.notes, "source": sources[v.kernel],
            "files": files,
        })
    index = {
        "format": INDEX_FORMAT, "triton_version": triton.__version__,
        "target": {"backend": target.backend, "arch": target.arch, "warp_size": target.warp_size},
        "shapes": dataclasses.asdict(shapes), "dtypes": list(dtypes), "kernels": entries,
        "sha256": {p.name: _sha256(p) for p in written},
    }
    index_path = out / "kernels.json"
    index_path.write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
    written.append(index_path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vsc.backends.triton.aot",
                                 description="Compile vsc's Triton kernels ahead of time (no GPU needed).")
    ap.add_argument("out_dir")
    ap.add_argument("--backend", default=DEFAULT_TARGET.backend)
    ap.add_argument("--arch", default=str(DEFAULT_TARGET.arch))
    ap.add_argument("--warp-size", type=int, default=DEFAULT_TARGET.warp_size)
    ap.add_argument("--shapes", default=None, help="JSON object of KernelShapes fields")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--kernels", default=None, help="comma-separated kernel names (default: all)")
    args = ap.parse_args(argv)
    arch: int | str = int(args.arch) if args.arch.isdigit() else args.arch
    shapes = KernelShapes(**json.loads(args.shapes)) if args.shapes else LLAMA3_8B
    kernels = tuple(args.kernels.split(",")) if args.kernels else None
    files = compile_kernels(args.out_dir, GPUTarget(args.backend, arch, args.warp_size), shapes,
                            tuple(args.dtypes.split(",")), kernels)
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
