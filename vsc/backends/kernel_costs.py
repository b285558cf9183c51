"""Kernel costs measured on the target: what select-kernels chooses by on a cpu plan.

`vsc compile` hands the PassManager a `MeasuredKernelCosts`; select-kernels calls it with an
op and the kernels that fit it (catalog order), and gets back microseconds per call for those
it could run here: each candidate on random inputs of the op's shapes, at one row (batch-1
decode) plus at the plan's max_batch rows (a full decode step), best of 5 rounds. TVM
candidates are built for the host first (the same cached library a server ships). Results
are cached on disk per host CPU, library versions and kernel sources
(~/.cache/vsc/kernel-costs.json, $VSC_KERNEL_COSTS overrides), so a plan compiles to the same
choice again and a warm compile measures nothing.

Measured kinds: rmsnorm, add_rmsnorm, silu_mul, rope_rotate, and linear (on a block-quantized
weight: torch.linear_quant vs tvm.quant_linear; on an f32 one: torch.linear vs tvm.linear). Others
return {} and keep the catalog's preference.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from vsc.ir.module import Op, ServingModule
from vsc.ir.types import QUANT_DTYPES

ROUNDS, CALLS = 5, 20
# The torch kernel each measured op kind is timed with (the TVM side: `_tvm_library`).
_TORCH_MEASURED = {"rmsnorm": "torch.rmsnorm", "add_rmsnorm": "torch.add_rmsnorm", "silu_mul": "torch.silu_mul",
                   "rope_rotate": "torch.rope_rotate", "linear": "torch.linear_quant", "linear_f32": "torch.linear"}
_SOURCES = ("runtime/kernels/torch_ops.py", "runtime/kernels/tvm_ops.py", "backends/tvm/elementwise.py",
            "backends/tvm/quant_linear.py", "backends/tvm/linear.py")


def cache_file() -> Path:
    return Path(os.environ.get("VSC_KERNEL_COSTS") or Path.home() / ".cache" / "vsc" / "kernel-costs.json")


def _environment_key() -> str:
    import torch

    from vsc.backends.tvm.build import _tvm_version, detect_mcpu

    h = hashlib.sha256(f"{detect_mcpu()}|{torch.__version__}|{_tvm_version()}".encode())
    root = Path(__file__).resolve().parents[1]
    for src in _SOURCES:
        h.update((root / src).read_bytes())
    return h.hexdigest()[:16]


class MeasuredKernelCosts:
    """(module, op, kernel names) -> {name: us per call} for the candidates measured here."""

    def __init__(self):
        self.path = cache_file()
        self.env = None
        self.table: dict[str, float] | None = None

    def _load(self) -> dict[str, float]:
        if self.table is None:
            self.env = _environment_key()
            try:
                self.table = json.loads(self.path.read_text()) if self.path.is_file() else {}
            except (OSError, json.JSONDecodeError):
                self.table = {}
        return self.table

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(self.table, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass       # a read-only cache only costs a re-measurement next time

    def __call__(self, module: ServingModule, op: Op, names: list[str]) -> dict[str, float]:
        if module.target.kind != "cpu":
            return {}
        table = self._load()
        rows = (1, max(1, int(module.batching.max_batch or 1)))
        shapes = ", ".join(str(module.model.weight(o).type if o.startswith("@") else t)
                           for o, t in zip(op.operands, _operand_types(module, op)))
        out: dict[str, float] = {}
        for name in names:
            key = f"{self.env}|{name}|{op.kind}|{shapes}|rows={rows}"
            if key not in table:
                call = _candidate(module, op, name, rows)
                if call is None:
                    continue
                table[key] = round(sum(_best_us(c) for c in call), 3)
                self._save()
            out[name] = table[key]
        return out


def _operand_types(module: ServingModule, op: Op) -> list:
    """The type of each operand of `op` (weights from the table, values from their producers)."""
    from vsc.ir.module import walk_ops

    types = {}
    for param, t in module.model.func.params:
        types[param] = t
    for o in walk_ops(module.model.func.body):
        for r, t in zip(o.results, o.types):
            types[r] = t
        if o.region is not None:
            for a, t in o.region.args:
                types[a] = t
    return [module.model.weight(x).type if x.startswith("@") else types.get(x) for x in op.operands]


def _best_us(call) -> float:
    """Best of ROUNDS rounds of up to CALLS calls (fewer for a slow kernel: ~2 ms a round)."""
    call()
    start = time.perf_counter()
    call()
    calls = max(1, min(CALLS, int(2e-3 / max(time.perf_counter() - start, 1e-9))))
    best = float("inf")
    for _ in range(ROUNDS if calls > 1 else 2):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def _candidate(module: ServingModule, op: Op, name: str, rows: tuple[int, ...]):
    """Callables running kernel `name` on `op`'s shapes, one per row count; None if not measurable."""
    import torch

    from vsc.runtime.kernels import torch_ops, tvm_ops
    from vsc.runtime.quant_tensor import QuantTensor

    gen = torch.Generator().manual_seed(0)
    types = _operand_types(module, op)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    def width(i: int) -> int:
        return int(types[i].shape[-1])

    lib = None
    if name.startswith("tvm."):
        lib = _tvm_library(module, op, name)
        if lib is None:
            return None
    else:
        quant = op.kind == "linear" and str(types[1].dtype) in QUANT_DTYPES
        kind = "linear_f32" if op.kind == "linear" and not quant else op.kind
        if _TORCH_MEASURED.get(kind) != name:
            return None
    calls = []
    for m in rows:
        if op.kind in ("rmsnorm", "add_rmsnorm"):
            eps = float(op.attrs["eps"])
            h = width(0)
            x, b, w = rand(m, h), rand(m, h), rand(h)
            if op.kind == "rmsnorm":
                calls.append((lambda x=x: tvm_ops.rmsnorm(lib, x, w, eps)) if lib else
                             (lambda x=x: torch_ops.rmsnorm(x, w, eps)))
            else:
                calls.append((lambda x=x, b=b: tvm_ops.add_rmsnorm(lib, x, b, w, eps)) if lib else
                             (lambda x=x, b=b: torch_ops.add_rmsnorm(x, b, w, eps)))
        elif op.kind == "silu_mul":
            x = rand(m, width(0))
            calls.append((lambda x=x: tvm_ops.silu_mul(lib, x)) if lib else (lambda x=x: torch_ops.silu_mul(x)))
        elif op.kind == "rope_rotate":
            d = int(op.attrs["head_dim"])
            q, k = rand(m, width(0)), rand(m, width(1))
            cos, sin = torch_ops.rope_cos_sin(torch.arange(m), 10000.0, d)
            calls.append((lambda q=q, k=k, c=cos, s=sin: tvm_ops.rope(lib, q, k, c, s)) if lib else
                         (lambda q=q, k=k, c=cos, s=sin: torch_ops.rope(q, k, c, s, d)))
        elif op.kind == "linear" and str(types[1].dtype) in QUANT_DTYPES:
            n, k = (int(d) for d in types[1].shape)
            weight = QuantTensor.quantize(rand(n, k) * 0.05, types[1].dtype)
            x = rand(m, k)
            calls.append((lambda x=x: tvm_ops.linear(lib, x, weight)) if lib else
                         (lambda x=x: torch_ops.linear_quant(x, weight)))
        elif op.kind == "linear" and str(types[1].dtype) == "f32" and len(op.operands) == 2:
            n, k = (int(d) for d in types[1].shape)
            weight = rand(n, k) * 0.05
            x = rand(m, k)
            calls.append((lambda x=x: tvm_ops.dense(lib, x, weight)) if lib else
                         (lambda x=x: torch_ops.linear(x, weight)))
        else:
            return None
    return calls


def _tvm_library(module: ServingModule, op: Op, name: str):
    """The TVM library holding `name`'s kernel for this op (built and cached as a server's)."""
    from vsc.backends.tvm.build import build_quant_kernels
    from vsc.runtime.kernels.tvm_ops import load_tvm_kernels

    types = _operand_types(module, op)
    if name == "tvm.quant_linear":
        quant, elementwise = [(types[1].dtype, int(types[1].shape[0]), int(types[1].shape[1]))], []
    elif name == "tvm.linear":
        quant, elementwise = [], [("linear", int(types[1].shape[0]), int(types[1].shape[1]))]
    elif name == "tvm.rmsnorm":
        quant, elementwise = [], [(op.kind, int(types[0].shape[-1]))]
    elif name == "tvm.silu_mul":
        quant, elementwise = [], [("silu_mul", int(types[0].shape[-1]) // 2)]
    elif name == "tvm.rope":
        d = int(op.attrs["head_dim"])
        quant, elementwise = [], [("rope", int(types[0].shape[-1]) // d, int(types[1].shape[-1]) // d, d)]
    else:
        return None
    return load_tvm_kernels(build_quant_kernels(quant, elementwise=elementwise),
                            int(module.target.attrs.get("threads") or 0))
