"""Call TVM-compiled quantized-linear kernels (built by `vsc.backends.tvm.build`) on torch tensors.

Only the TVM runtime is used here: `libtvm_runtime.so` (for the thread pool and the
workspace hooks the compiled code calls) loaded with ctypes from the installed `tvm`
package's lib/ folder without importing `tvm` itself, and `tvm_ffi` to load the library and
call its functions. tvm_ffi takes torch CPU tensors directly (DLPack, no copies).

Kernel names: `quant_linear_<fmt>_<N>x<K>(x, qs, d, m, y)` and
`dequantize_<fmt>_<N>x<K>(qs, d, m, w)`; formats without an `m` part get `d` twice.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import torch

from vsc.runtime.quant import get_format, parts_tuple, weight_shape

_RUNTIME = None
_LOADED: dict[str, "TvmKernels"] = {}


def _load_runtime():
    global _RUNTIME
    import tvm_ffi  # loads libtvm_ffi.so, which libtvm_runtime.so links against

    if _RUNTIME is None:
        spec = importlib.util.find_spec("tvm")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the TVM runtime (package apache-tvm) is not installed")
        lib = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libtvm_runtime.so"
        _RUNTIME = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return tvm_ffi


class TvmKernels:
    """A loaded kernel library; looks functions up once and keeps the handles."""

    def __init__(self, path: str | os.PathLike):
        tvm_ffi = _load_runtime()
        self.path = str(path)
        self.module = tvm_ffi.load_module(self.path)
        self._funcs: dict[str, object] = {}

    def get(self, name: str):
        f = self._funcs.get(name)
        if f is None:
            try:
                f = self.module[name]
            except Exception:
                raise KeyError(f"TVM kernel library {self.path} has no function {name}") from None
            self._funcs[name] = f
        return f

    def quant_linear_fn(self, fmt: str, n: int, k: int):
        return self.get(f"quant_linear_{fmt}_{n}x{k}")

    def dequantize_fn(self, fmt: str, n: int, k: int):
        return self.get(f"dequantize_{fmt}_{n}x{k}")


def load_tvm_kernels(path: str | os.PathLike) -> TvmKernels:
    """The kernel library at `path` (loaded once per process)."""
    key = str(Path(path).resolve())
    lib = _LOADED.get(key)
    if lib is None:
        lib = _LOADED[key] = TvmKernels(key)
    return lib


def _args(parts, fmt: str) -> tuple:
    f = get_format(fmt)
    p = parts_tuple(parts, f.name)
    return p if len(p) == 3 else (p[0], p[1], p[1])


def quant_linear(lib: TvmKernels, x: torch.Tensor, parts, fmt: str, out: torch.Tensor | None = None,
                 fn=None) -> torch.Tensor:
    """y[..., N] = x[..., K] @ dequant(W)^T with the compiled kernel (x float32, contiguous).

    `fn`: the kernel handle (`lib.quant_linear_fn(fmt, N, K)`) when the caller keeps it;
    `out`: a contiguous float32 [..., N] tensor to write into (no allocation)."""
    n, k = weight_shape(parts, fmt)
    x2 = x.reshape(-1, k)
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    if x2.shape[0] == 0:
        return out
    if fn is None:
        fn = lib.quant_linear_fn(fmt, n, k)
    fn(x2, *_args(parts, fmt), out.view(-1, n))
    return out


def dequantize(lib: TvmKernels, parts, fmt: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [N, K] weight from its planar parts, with the compiled kernel."""
    n, k = weight_shape(parts, fmt)
    if out is None:
        out = torch.empty(n, k, dtype=torch.float32)
    lib.dequantize_fn(fmt, n, k)(*_args(parts, fmt), out)
    return out


def set_num_threads(n: int) -> None:
    """Threads of TVM's runtime thread pool (the compiled kernels' `parallel` loops); the
    default is TVM_NUM_THREADS, else the machine's cores. (TVM's `runtime.NumThreads`
    does not report this value, so there is no getter.)"""
    tvm_ffi = _load_runtime()
    tvm_ffi.get_global_func("runtime.config_threadpool")(1, int(n))


# --- what generated runners call ------------------------------------------------------------

KERNELS_DIR = "kernels"


def load_plan_kernels(module_file: str, filename: str, built: str) -> TvmKernels:
    """The plan's kernel library: the server folder's kernels/ copy (beside `module_file`, the
    generated model.py), else the build `vsc compile` used (while it checks accuracy)."""
    candidates = [Path(module_file).parent / KERNELS_DIR / filename, Path(built)]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise RuntimeError(f"TVM kernel library {filename} is missing from {candidates[0].parent}; recompile the "
                           "server with `vsc compile`")
    return load_tvm_kernels(path)


def linear(lib: TvmKernels, x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """tvm.quant_linear: x @ dequant(weight)^T (+ bias) for a QuantTensor weight. The kernel
    handle is looked up once per weight and kept on it."""
    fn = getattr(weight, "tvm_fn", None)
    if fn is None:
        fn = weight.tvm_fn = lib.quant_linear_fn(weight.fmt, *weight.shape)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous() or x2.dtype != torch.float32:
        x2 = x2.contiguous().to(torch.float32)
    out = torch.empty(x2.shape[0], n, dtype=torch.float32)
    if x2.shape[0]:
        p = weight.parts
        fn(x2, p[0], p[1], p[2] if len(p) == 3 else p[1], out)
    out = out.view(*x.shape[:-1], n)
    return out if bias is None else out.add_(bias)
