"""Call TVM-compiled quantized-linear kernels (built by `vsc.backends.tvm.build`) on torch tensors.

Only the TVM runtime is used here: `libtvm_runtime.so` (for the thread pool and the
workspace hooks the compiled code calls) loaded with ctypes from the installed `tvm`
package's lib/ folder without importing `tvm` itself, and `tvm_ffi` to load the library and
call its functions. tvm_ffi takes torch CPU tensors directly (DLPack, no copies).

Kernel names: `quant_linear_<fmt>_<N>x<K>(x, qs, d, m, y)` and
`dequantize_<fmt>_<N>x<K>(qs, d, m, w)`; formats without an `m` part get `d` twice. Libraries
built for an AVX-512 VNNI target also hold `quant_linear_vnni_<fmt>_<N>x<K>(x, qs, d, m, y, xq,
xb, xs, xm)` (int8 activations, llama.cpp-style; the last four are scratch, see
`vnni_scratch`): `linear()` uses it when present and the host CPU has avx512_vnni + avx512vl
(VSC_TVM_VNNI=0 turns that off), `quant_linear(..., vnni=True)` calls it explicitly. They
also hold the GEMM form of it, `quant_gemm_vnni_<fmt>_<N>x<K>(x, qs, d, m, y, xq, xs, xc)`
(`gemm_kernel_name`; weights unpacked into 16-column panels once per call, see
vsc.backends.tvm.quant_gemm), which `linear()` runs from GEMM_MIN_ROWS rows on (prefill chunks,
wide decode steps): same activation rounding, only the fp32 summation order differs.
"""
from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import torch

from vsc.runtime import kernel_registry
from vsc.runtime.kernels import torch_ops
from vsc.runtime.quant import BLOCK, get_format, parts_tuple, weight_shape

_RUNTIME = None
_LOADED: dict[str, "TvmKernels"] = {}
_HOST_VNNI: bool | None = None


def host_has_vnni() -> bool:
    """Whether this CPU runs the VNNI kernels (avx512_vnni and avx512vl in /proc/cpuinfo)."""
    global _HOST_VNNI
    if _HOST_VNNI is None:
        try:
            flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                          if ln.startswith("flags")), [])
        except OSError:
            flags = []
        _HOST_VNNI = "avx512_vnni" in flags and "avx512vl" in flags
    return _HOST_VNNI


def _use_vnni() -> bool:
    return os.environ.get("VSC_TVM_VNNI", "1") != "0" and host_has_vnni()


def _load_runtime():
    global _RUNTIME
    import tvm_ffi  # loads libtvm_ffi.so, which libtvm_runtime.so links against

    if _RUNTIME is None and "tvm" in sys.modules:
        # the compiler is loaded in this process (vsc compile checking accuracy): its libtvm.so
        # holds the runtime already, and a second copy would split TVM's global registry (the
        # Relax VM then crashes calling into the other copy's allocator)
        _RUNTIME = sys.modules["tvm"]
    if _RUNTIME is None:
        spec = importlib.util.find_spec("tvm")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the TVM runtime (package apache-tvm) is not installed")
        lib = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libtvm_runtime.so"
        _RUNTIME = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return tvm_ffi


#: From this many rows on, tvm.quant_linear's int8-activation path runs the GEMM kernel (weights
#: unpacked into panels once per call) instead of the decode kernel (re-unpacked per 3 rows).
#: SmolLM2's four layer shapes, Q4_1, 2 threads, best of 5: 8 rows 294 vs 316 us, 16 rows 366
#: vs 529, 32 rows 548 vs 1005, 1024 rows ~600 GOPS vs ~200; 5 rows 1.5-2x slower (bench/RESULTS.md).
GEMM_MIN_ROWS = 8


#: The compiled decode step's function for GEMM_MIN_ROWS rows and more (vsc.backends.tvm.decode_step).
WIDE_FUNCTION = "decode_wide"


def gemm_kernel_name(fmt: str, n: int, k: int) -> str:
    """The GEMM kernel's function name (vsc.backends.tvm.quant_gemm builds it)."""
    return f"quant_gemm_vnni_{fmt}_{n}x{k}"


def gemm_scratch_shapes(fmt: str, m: int, k: int) -> dict:
    """Shapes and torch dtype names of the GEMM kernel's scratch for an [m, k] x: the int8
    activations four to an int32, their per-block scale dx and dx * sum."""
    nb = k // BLOCK
    return {"xq": ((m, k // 4), "int32"), "xs": ((m, nb), "float32"), "xc": ((m, nb), "float32")}


class TvmKernels:
    """A loaded kernel library; looks functions up once and keeps the handles."""

    def __init__(self, path: str | os.PathLike):
        tvm_ffi = _load_runtime()
        self.path = str(path)
        self.module = tvm_ffi.load_module(self.path)
        self._funcs: dict[str, object] = {}
        self._scratch: dict[tuple, tuple] = {}

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

    def vnni_fn(self, fmt: str, n: int, k: int):
        """The int8-activation (VNNI) kernel, or None where the library has none."""
        try:
            return self.get(f"quant_linear_vnni_{fmt}_{n}x{k}")
        except KeyError:
            return None

    def _attention_fn(self, kind: str, heads: int, kv_heads: int, head_dim: int, block_size: int):
        """The attention kernel `<kind>_<heads>_<kv_heads>_<head_dim>_b<block>`, or None where the
        library (built before that kernel existed) has none; looked up once."""
        key = (kind, heads, kv_heads, head_dim, block_size)
        if key not in self._funcs:
            try:
                self._funcs[key] = self.get(f"{kind}_{heads}_{kv_heads}_{head_dim}_b{block_size}")
            except KeyError:
                self._funcs[key] = None
        return self._funcs[key]

    def prefill_fn(self, heads: int, kv_heads: int, head_dim: int, block_size: int):
        """The prefill attention kernel for these dimensions, or None."""
        return self._attention_fn("prefill_attention", heads, kv_heads, head_dim, block_size)

    def short_fn(self, heads: int, kv_heads: int, head_dim: int, block_size: int):
        """The short-span prefill kernel (GQA heads x rows in the lanes), or None."""
        return self._attention_fn("short_attention", heads, kv_heads, head_dim, block_size)

    def cascade_fn(self, heads: int, kv_heads: int, head_dim: int, block_size: int):
        """The cascade decode attention kernel, or None."""
        return self._attention_fn("cascade_attention", heads, kv_heads, head_dim, block_size)

    def gemm_fn(self, fmt: str, n: int, k: int):
        """The GEMM form of the VNNI kernel, or None where the library has none."""
        try:
            return self.get(gemm_kernel_name(fmt, n, k))
        except KeyError:
            return None

    def gemm_scratch(self, fmt: str, m: int, k: int) -> tuple:
        """(xq, xs, xc) scratch for the GEMM kernel, kept per (m, k) like vnni_scratch."""
        key = ("gemm", m, k)
        sc = self._scratch.get(key)
        if sc is None:
            sc = self._scratch[key] = tuple(torch.empty(shape, dtype=getattr(torch, dt))
                                            for shape, dt in gemm_scratch_shapes(fmt, m, k).values())
        return sc

    def vnni_scratch(self, fmt: str, m: int, k: int) -> tuple:
        """(xq, xb, xs, xm) scratch for the VNNI kernel and an [m, k] x, kept per (lanes, m, k)
        and reused (calls on one library from several threads at once would share it)."""
        lanes = 8 if fmt == "q8_0" else 4
        key = (lanes, m, k)
        sc = self._scratch.get(key)
        if sc is None:
            nl = k // BLOCK * lanes
            sc = self._scratch[key] = (torch.empty(m, k, dtype=torch.int8), torch.empty(m, nl, dtype=torch.int32),
                                       torch.empty(m, nl, dtype=torch.float32), torch.empty(m, nl, dtype=torch.float32))
        return sc


#: How long TVM's pool workers spin for the next parallel loop before they sleep (the runtime's
#: default, 300000 iterations, kept them spinning through the torch ops between kernels and
#: took the cores oneDNN needed). Measured on 2 cores: SmolLM2 GGUF decode step at one
#: sequence 10.2 ms (default) / 13.1 (0: a futex wake per loop) / 8.4-8.5 (2000-30000); SmolLM2
#: fp32 at 16 sequences (oneDNN linears between the kernels) 79.9 (default) / 75.2 (0) ms, and
#: with its head packed too 54.3 (0) / 54.8 (10000) ms (bench/RESULTS.md).
SPIN_COUNT = 10000


def _configure_pool(threads: int) -> None:
    """TVM's pool size and spin, before the pool starts, unless the environment already says."""
    os.environ.setdefault("TVM_NUM_THREADS", str(threads or os.cpu_count() or 1))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(SPIN_COUNT))


def load_tvm_kernels(path: str | os.PathLike, threads: int = 0) -> TvmKernels:
    """The kernel library at `path` (loaded once per process). `threads` (0: every core) sizes
    TVM's pool for the kernels' parallel loops, as TVM_NUM_THREADS before the pool starts
    unless the environment already says: left to its own default the pool measured 18.2 ms
    per SmolLM2 decode step against 10.3 with 2 threads on this 2-core box, and kept a core
    busy while idle; `runtime.config_threadpool` after start-up (15.8 ms) does not match it
    either (bench/RESULTS.md). The workers' spin before sleeping is SPIN_COUNT unless
    TVM_THREAD_POOL_SPIN_COUNT says."""
    _configure_pool(threads)
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
                 fn=None, vnni: bool = False) -> torch.Tensor:
    """y[..., N] = x[..., K] @ dequant(W)^T with the compiled kernel (x float32, contiguous).

    `vnni`: the int8-activation kernel (x quantized per 32-block to int8, as llama.cpp does:
    results differ from the exact kernel by that rounding); KeyError if the library lacks it.
    `fn`: the kernel handle (`lib.quant_linear_fn(fmt, N, K)` / `lib.vnni_fn(...)`) when the
    caller keeps it; `out`: a contiguous float32 [..., N] tensor to write into (no allocation)."""
    n, k = weight_shape(parts, fmt)
    x2 = x.reshape(-1, k)
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    if x2.shape[0] == 0:
        return out
    if fn is None:
        fn = lib.vnni_fn(fmt, n, k) if vnni else lib.quant_linear_fn(fmt, n, k)
        if fn is None:
            raise KeyError(f"TVM kernel library {lib.path} has no function quant_linear_vnni_{fmt}_{n}x{k}")
    scratch = lib.vnni_scratch(fmt, x2.shape[0], k) if vnni else ()
    fn(x2, *_args(parts, fmt), out.view(-1, n), *scratch)
    return out


def quant_gemm(lib: TvmKernels, x: torch.Tensor, parts, fmt: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """y[..., N] = x[..., K] @ dequant(W)^T with the GEMM kernel (int8 activations as
    `quant_linear(..., vnni=True)`); KeyError if the library lacks it."""
    n, k = weight_shape(parts, fmt)
    x2 = x.reshape(-1, k)
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    fn = lib.gemm_fn(fmt, n, k)
    if fn is None:
        raise KeyError(f"TVM kernel library {lib.path} has no function {gemm_kernel_name(fmt, n, k)}")
    if x2.shape[0]:
        fn(x2, *_args(parts, fmt), out.view(-1, n), *lib.gemm_scratch(fmt, x2.shape[0], k))
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


def load_plan_kernels(module_file: str, filename: str, built: str, threads: int = 0) -> TvmKernels:
    """The plan's kernel library: the server folder's kernels/ copy (beside `module_file`, the
    generated model.py), else the build `vsc compile` used (while it checks accuracy).

    `threads`: the plan's cores (0: all), see `load_tvm_kernels`."""
    return load_tvm_kernels(_plan_file(module_file, filename, built, "TVM kernel library"), threads)


def _plan_file(module_file: str, filename: str, built: str, what: str) -> Path:
    """A file the plan ships in the server folder's kernels/ (beside `module_file`), else the
    build `vsc compile` made; RuntimeError naming `what` when neither exists."""
    candidates = [Path(module_file).parent / KERNELS_DIR / filename, Path(built)]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise RuntimeError(f"{what} {filename} is missing from {candidates[0].parent}; recompile the "
                           "server with `vsc compile`")
    return path


# tvm.quant_linear{activations}: x as is, or quantized per 32-block (VNNI); declared in the registry.
ACTIVATIONS = kernel_registry.KERNELS["tvm.quant_linear"].config["activations"]


def linear(lib: TvmKernels, x: torch.Tensor, weight, bias: torch.Tensor | None = None,
           activations: str = "f32") -> torch.Tensor:
    """tvm.quant_linear: x @ dequant(weight)^T (+ bias) for a QuantTensor weight.

    activations "f32": the exact kernel (fp32 activations, fp32 accumulation). "q8_0": the
    activations are quantized per 32-block to int8 and the dot products run on VNNI, as
    llama.cpp does (lossy; the plan says so and its accuracy check measured it); a library or
    host without VNNI runs the exact kernel instead. Kernel handles are kept on the weight."""
    cached = getattr(weight, "tvm_fns", None)
    if cached is None:
        cached = weight.tvm_fns = {}
    entry = cached.get(activations)
    if entry is None:
        vfn = lib.vnni_fn(weight.fmt, *weight.shape) if activations == "q8_0" and _use_vnni() else None
        gfn = lib.gemm_fn(weight.fmt, *weight.shape) if vfn is not None else None
        entry = cached[activations] = (vfn, True, gfn) if vfn is not None else \
            (lib.quant_linear_fn(weight.fmt, *weight.shape), False, None)
    fn, vnni, gemm = entry
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous() or x2.dtype != torch.float32:
        x2 = x2.contiguous().to(torch.float32)
    rows = x2.shape[0]
    out = torch.empty(rows, n, dtype=torch.float32)
    if rows:
        p = weight.parts
        w = (p[0], p[1], p[2] if len(p) == 3 else p[1])
        if gemm is not None and rows >= GEMM_MIN_ROWS:
            gemm(x2, *w, out, *lib.gemm_scratch(weight.fmt, rows, k))
        elif vnni:
            fn(x2, *w, out, *lib.vnni_scratch(weight.fmt, rows, k))
        else:
            fn(x2, *w, out)
    out = out.view(*x.shape[:-1], n)
    return out if bias is None else out.add_(bias)


#: tvm.linear's kernel is register-blocked for decode-sized inputs; past this many rows (a
#: prefill chunk) the call goes to torch's GEMM, which blocks for caches.
DENSE_MAX_ROWS = 32


def dense(lib: TvmKernels, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """tvm.linear: x @ weight^T (+ bias) for an f32 weight [N, K] (linear_f32_<N>x<K>); inputs of
    more than DENSE_MAX_ROWS rows run torch's F.linear."""
    n, k = weight.shape
    if x.numel() > DENSE_MAX_ROWS * k:
        return torch.nn.functional.linear(x, weight, bias)
    x2 = _rows(x)
    out = torch.empty(x2.shape[0], n, dtype=torch.float32)
    if x2.shape[0]:
        lib.get(f"linear_f32_{n}x{k}")(x2, weight, out)
    out = out.view(*x.shape[:-1], n)
    return out if bias is None else out.add_(bias)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous float32 [rows, last] matrix (a view when it already is one)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() and x2.dtype == torch.float32 else x2.contiguous().to(torch.float32)


def rmsnorm(lib: TvmKernels, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """tvm.rmsnorm: x * rsqrt(mean(x^2) + eps) * weight in one pass."""
    h = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.float32)
    lib.get(f"rmsnorm_{h}")(_rows(x), weight, eps, out.view(-1, h))
    return out


def add_rmsnorm(lib: TvmKernels, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """tvm.rmsnorm on add_rmsnorm: (rmsnorm(a + b), a + b) in one pass."""
    h = a.shape[-1]
    out, total = torch.empty(a.shape, dtype=torch.float32), torch.empty(a.shape, dtype=torch.float32)
    lib.get(f"add_rmsnorm_{h}")(_rows(a), _rows(b), weight, eps, out.view(-1, h), total.view(-1, h))
    return out, total


def silu_mul(lib: TvmKernels, x: torch.Tensor) -> torch.Tensor:
    """tvm.silu_mul: silu(x[..., :n]) * x[..., n:] in one pass."""
    n = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    lib.get(f"silu_mul_{n}")(_rows(x), out.view(-1, n))
    return out


def rope(lib: TvmKernels, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tvm.rope on rope_rotate: q [T, Hq*D] and k [T, Hk*D] rotated by cos/sin rows [T, D]."""
    d = cos.shape[-1]
    q2, k2 = _rows(q), _rows(k)
    qo, ko = torch.empty(q2.shape, dtype=torch.float32), torch.empty(k2.shape, dtype=torch.float32)
    lib.get(f"rope_{q2.shape[1] // d}_{k2.shape[1] // d}_{d}")(q2, k2, _rows(cos), _rows(sin), qo, ko)
    return qo.view(q.shape), ko.view(k.shape)


#: Splitting a context over several tasks (flash-decoding) pays when rows x kv heads leave
#: cores idle; each split keeps at least SPLIT_MIN_BLOCKS blocks, and there are at most
#: SPLIT_MAX (the compiled decode step plans its scratch for that many).
SPLIT_MIN_BLOCKS = 4
SPLIT_MAX = 32


def _pool_threads() -> int:
    return int(os.environ.get("TVM_NUM_THREADS") or os.cpu_count() or 1)


def split_plan(rows: int, kv_heads: int, longest: int, block_size: int) -> tuple[int, int]:
    """(splits, blocks per split) of the paged attention kernel for `rows` one-query sequences
    whose longest context is `longest` tokens: about 4 tasks per pool thread, for balance."""
    blocks = -(-max(1, longest) // block_size)
    want = -(-4 * _pool_threads() // max(1, rows * kv_heads))
    splits = max(1, min(want, blocks // SPLIT_MIN_BLOCKS, SPLIT_MAX))
    return splits, -(-blocks // splits)


#: Query rows per tile of the prefill attention kernel (its vector lanes).
PREFILL_ROWS = 16
#: Lanes of the short-span kernel: a span of up to SHORT_LANES // (heads per kv head) rows goes there.
SHORT_LANES = 16


def prefill_tiles(spans) -> torch.Tensor:
    """The prefill attention kernel's tiles for `spans` (a step's SequenceSpans): int64 [NT, 4]
    rows (block-table row, first q row, rows, position of the first row), up to PREFILL_ROWS
    rows each. Ordered largest, smallest, second largest, ... by context read, so that the
    kernel's parallel loop, which hands each thread a contiguous share, splits the causal work
    evenly (a prompt's last tiles read far more blocks than its first)."""
    tiles = []
    for span in spans:
        n = span.end - span.start
        past = span.context_len - n
        for r0 in range(0, n, PREFILL_ROWS):
            tiles.append((span.row, span.start + r0, min(PREFILL_ROWS, n - r0), past + r0))
    tiles.sort(key=lambda x: -(x[3] + x[2]))
    order = [tiles[i // 2] if i % 2 == 0 else tiles[-1 - i // 2] for i in range(len(tiles))]
    return torch.tensor(order, dtype=torch.int64).reshape(-1, 4)


def decode_attention(lib: TvmKernels, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     tables: torch.Tensor, lens: torch.Tensor, longest: int, block_size: int,
                     scale: float, lse: torch.Tensor | None = None) -> torch.Tensor:
    """One query row per entry of `lens` [R] (int64) over its context, read in place from the
    paged caches [slots, kv_heads, hd] through `tables` [R, W] (int64 block ids): q [R, heads*hd]
    -> [R, heads*hd]. `longest` = max(lens) (host int) sizes the split-K. `lse` [R, heads], when
    given, receives each row's log softmax denominator (for the cascade merge)."""
    r, width = q.shape
    kv_heads, hd = k_cache.shape[1], k_cache.shape[2]
    heads = width // hd
    q2 = q if q.stride(-1) == 1 and q.dtype == torch.float32 else q.contiguous().to(torch.float32)
    out = torch.empty(r, width, dtype=torch.float32)
    if r == 0:
        return out
    splits, chunk = split_plan(r, kv_heads, longest, block_size)
    g = heads // kv_heads
    part_o = torch.empty(r, kv_heads, splits, g, hd, dtype=torch.float32)
    part_ml = torch.empty(r, kv_heads, splits, g, 2, dtype=torch.float32)
    lse = torch.empty(r, heads, dtype=torch.float32) if lse is None else lse
    tables = tables if tables.is_contiguous() else tables.contiguous()
    lib.get(f"paged_attention_{heads}_{kv_heads}_{hd}_b{block_size}")(
        q2, k_cache, v_cache, tables, lens, chunk, scale, out, part_o, part_ml, lse)
    return out


def cascade_decode_attention(lib: TvmKernels, fn, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             meta, scale: float) -> torch.Tensor:
    """Decode attention of one-query rows q [R, heads*hd] laid out as a cascade (meta.cascade:
    the members share the prefix blocks): every row over the rest of its context (the decode
    kernel, with its log-sum-exp), then the cascade kernel `fn` reads the prefix once for all
    members and merges it into their rows."""
    c = meta.cascade
    r, width = q.shape
    hd = k_cache.shape[2]
    heads, kv_heads = width // hd, k_cache.shape[1]
    q2 = q if q.stride(-1) == 1 and q.dtype == torch.float32 else q.contiguous().to(torch.float32)
    lse = torch.empty(r, heads, dtype=torch.float32)
    out = decode_attention(lib, q2, k_cache, v_cache, meta.gather_blocks, c.rest_lens, c.rest_longest,
                           meta.block_size, scale, lse=lse)
    m = c.members.shape[0]
    tiles = -(-m // PREFILL_ROWS)
    splits, chunk = split_plan(tiles, kv_heads, c.prefix_len, meta.block_size)
    g = heads // kv_heads
    part_o = torch.empty(m, kv_heads, splits, g, hd, dtype=torch.float32)
    part_ml = torch.empty(m, kv_heads, splits, g, 2, dtype=torch.float32)
    fn(q2, k_cache, v_cache, c.blocks, c.members, chunk, scale, out, lse, part_o, part_ml)
    return out


def _decode_rows(lib: TvmKernels, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta,
                 scale: float) -> torch.Tensor | None:
    """Decode attention of the one-query rows q [R, heads*hd] that meta's gather layout describes:
    the cascade kernel where meta has a cascade (None where the library lacks it), else the decode kernel."""
    if meta.cascade is not None:
        hd = k_cache.shape[2]
        fn = lib.cascade_fn(q.shape[1] // hd, k_cache.shape[1], hd, meta.block_size)
        if fn is None or isinstance(k_cache, torch_ops.QuantizedKV):
            return None
        return cascade_decode_attention(lib, fn, q, k_cache, v_cache, meta, scale)
    return decode_attention(lib, q, k_cache, v_cache, meta.gather_tables, meta.gather_lens, meta.gather_longest,
                            meta.block_size, scale)


def paged_attention(lib: TvmKernels, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta, heads: int, kv_heads: int, head_dim: int,
                    scale: float) -> torch.Tensor:
    """tvm.paged_attention: k, v [T, kv_heads*hd] written to their slots (kv_write), then each
    one-query sequence attends in place through its block table (the TVM decode kernel, no
    gather). The multi-token spans of a prefill step run the TVM prefill kernel (causal, over
    their cached context too, read in place: vsc.backends.tvm.prefill_attention) where the
    library has it; a cascade layout (cascade-attention) runs the decode kernel over each row's own
    part and the cascade kernel over the shared prefix (cascade_decode_attention); libraries built
    before those kernels existed take the torch paths of torch.paged_attention."""
    t = q.shape[0]
    k2 = k if k.stride(-1) == 1 and k.dtype == torch.float32 else k.contiguous().to(torch.float32)
    v2 = v if v.stride(-1) == 1 and v.dtype == torch.float32 else v.contiguous().to(torch.float32)
    lib.get(f"kv_write_{kv_heads}_{head_dim}")(k2.view(t, -1), v2.view(t, -1), meta.slot_mapping, k_cache, v_cache)
    gqa = heads != kv_heads
    fn = lib.prefill_fn(heads, kv_heads, head_dim, meta.block_size)
    if meta.cascade is not None and (lib.cascade_fn(heads, kv_heads, head_dim, meta.block_size) is None
                                     or (not meta.is_decode and (fn is None or meta.block_tables is None))):
        # a library built before the cascade kernel existed: the torch cascade
        qh = q.reshape(t, heads, head_dim)
        if meta.is_decode:
            return torch_ops._cascade_attention(qh, k_cache, v_cache, meta, scale)
        return torch_ops._prefill_attention(qh, k.reshape(t, kv_heads, head_dim), v.reshape(t, kv_heads, head_dim),
                                            k_cache, v_cache, meta, scale, gqa, contiguous=False)
    if meta.is_decode:
        return _decode_rows(lib, q.reshape(t, -1), k_cache, v_cache, meta, scale)
    if fn is not None and meta.block_tables is not None:
        out = torch.empty(t, heads * head_dim, dtype=torch.float32)
        short_fn = lib.short_fn(heads, kv_heads, head_dim, meta.block_size)
        if meta.prefill_tiles is None:
            # spans of few rows (a verify's drafts, jump-forward tokens) go to the short kernel,
            # whose lanes hold the GQA group's heads x rows
            most = SHORT_LANES // (heads // kv_heads) if short_fn is not None else 0
            meta.prefill_tiles = (prefill_tiles([sp for sp in meta.spans if sp.end - sp.start > most]),
                                  prefill_tiles([sp for sp in meta.spans if sp.end - sp.start <= most]))
        long_tiles, short_tiles = meta.prefill_tiles
        if long_tiles.shape[0] or short_tiles.shape[0]:
            q2 = q.reshape(t, -1)
            q2 = q2 if q2.stride(-1) == 1 and q2.dtype == torch.float32 else q2.contiguous().to(torch.float32)
            tables = meta.block_tables if meta.block_tables.is_contiguous() else meta.block_tables.contiguous()
            if long_tiles.shape[0]:
                fn(q2, k_cache, v_cache, tables, long_tiles, scale, out)
            if short_tiles.shape[0]:
                short_fn(q2, k_cache, v_cache, tables, short_tiles, scale, out)
    else:
        spans = dataclasses.replace(meta, single_rows=None)
        out = torch_ops._prefill_attention(q.reshape(t, heads, head_dim), k.reshape(t, kv_heads, head_dim),
                                           v.reshape(t, kv_heads, head_dim), k_cache, v_cache, spans, scale, gqa,
                                           contiguous=False)
    if meta.single_rows is not None:
        out[meta.single_rows] = _decode_rows(lib, q.reshape(t, -1)[meta.single_rows], k_cache, v_cache, meta, scale)
    return out


# --- the compiled decode step (schedule {graph = "relax"}) ------------------------------------

_KDL_CPU, _POOLED_ALLOCATOR = 1, 2


class CompiledDecodeStep:
    """A plan's decode forward as one Relax VM function (built by vsc.backends.tvm.decode_step):
    `bind` hands it the weights (in the plan's STEP_ARGUMENTS order) and the KV caches once, then
    each call runs a whole decode step: batch -> logits [B, vocab]. Only the TVM runtime is used
    (the VM lives in libtvm_runtime; tvm_ffi loads the library)."""

    def __init__(self, path: str | os.PathLike):
        tvm_ffi = _load_runtime()
        self.path = str(path)
        self._ffi = tvm_ffi
        self.vm = tvm_ffi.load_module(self.path)["vm_load_executable"]()
        self.vm["vm_initialization"](_KDL_CPU, 0, _POOLED_ALLOCATOR)
        self.fn = self.vm["decode"]
        try:
            self.wide = self.vm[WIDE_FUNCTION]
        except Exception:   # a step without quantized linears on VNNI has no wide form
            self.wide = None
        self._weights = self._caches = None
        self._kept: dict[str, list] = {}     # the VM holds DLPack views: their storage stays alive here

    def _array(self, what: str, tensors: list[torch.Tensor]):
        self._kept[what] = tensors
        return self._ffi.convert([self._ffi.from_dlpack(t) for t in tensors])

    def bind_weights(self, tensors: list[torch.Tensor]) -> None:
        self._weights = self._array("weights", tensors)

    def bind_caches(self, caches) -> None:
        self._caches = self._array("caches", [t for pair in caches for t in pair])

    def __call__(self, batch, block_size: int, kv_heads: int) -> torch.Tensor:
        if self._weights is None or self._caches is None:
            raise RuntimeError("the compiled decode step needs bind_weights() and bind_caches() first")
        rows = int(batch.context_lens.shape[0])
        longest = max(batch.context_lens_host) if batch.context_lens_host else int(batch.context_lens.max())
        splits, chunk = split_plan(rows, kv_heads, longest, block_size)
        fn = self.wide if self.wide is not None and rows >= GEMM_MIN_ROWS else self.fn
        out = fn(batch.tokens, batch.positions, batch.slot_mapping, batch.block_tables, batch.context_lens,
                      self._ffi.Shape((splits, chunk)), self._caches, self._weights)
        return torch.from_dlpack(out)


def step_weight_tensors(weights: dict, arguments) -> list[torch.Tensor]:
    """The tensors of `arguments` ((name, part) pairs, the plan's STEP_ARGUMENTS) from a runner's
    loaded weights: a plain tensor for part "", else the named planar part of a QuantTensor,
    passed as they are (many are views at any offset into a file's mapping or a fused buffer:
    122 of 184 for SmolLM2 fp32, which the TVM kernels have read as such since they were written;
    an aligned copy would double the weights' memory)."""
    out, seen = [], {}
    for name, part in arguments:
        w = weights[name]
        if part:
            p = w.parts
            w = {"qs": p[0], "d": p[1], "m": p[2] if len(p) == 3 else p[1]}[part]
        key = (w.data_ptr(), tuple(w.shape), w.dtype)      # a tied weight read twice: one copy
        if key not in seen:
            seen[key] = w.contiguous()
        out.append(seen[key])
    return out


def load_decode_step(module_file: str, filename: str, built: str, threads: int = 0) -> CompiledDecodeStep:
    """The plan's compiled decode step: the server folder's kernels/ copy, else the build."""
    _configure_pool(threads)
    return CompiledDecodeStep(_plan_file(module_file, filename, built, "compiled decode step"))
