"""Build the TVM quantized-linear kernels into one shared library, cached on disk.

`build_quant_kernels(specs, target)` returns the path of a .so holding, per
(fmt, N, K) in specs, `quant_linear_<fmt>_<N>x<K>` and `dequantize_<fmt>_<N>x<K>`
(see `vsc.backends.tvm.quant_linear`), and where the target has AVX-512 VNNI (+VL) (by its
-mcpu, e.g. the host's znver4, or -mattr) also `quant_linear_vnni_<fmt>_<N>x<K>` (int8
activations; a generic {"kind": "llvm"} target gets none). The library lives in
`$VSC_TVM_CACHE/<hash>/kernels.so` (default `~/.cache/vsc/tvm`), the hash taken over
the kernel source text, this file's source, the target, the shapes and the TVM version.
A cached library is returned without importing TVM; a new one is compiled, linked into
a temporary file next to it and moved into place with os.replace (atomic).
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from vsc.errors import VscError

LIB_NAME = "kernels.so"
_HERE = Path(__file__).resolve().parent


class TvmBuildError(VscError):
    """TVM could not build (or link) the kernel library."""


# -- target -------------------------------------------------------------------------


@lru_cache(maxsize=1)
def detect_mcpu() -> str:
    """LLVM -mcpu for this host, from /proc/cpuinfo (no TVM import); VSC_TVM_MCPU overrides.

    Falls back to "x86-64-v3" (AVX2) / "x86-64" where the CPU is not recognised."""
    env = os.environ.get("VSC_TVM_MCPU")
    if env:
        return env
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    fields: dict[str, str] = {}
    for line in info.splitlines():
        if not line.strip():
            break
        key, _, val = line.partition(":")
        fields[key.strip()] = val.strip()
    flags = set(fields.get("flags", "").split())
    vendor = fields.get("vendor_id", "")
    family = int(fields.get("cpu family", "0") or 0)
    avx512 = "avx512f" in flags
    if vendor == "AuthenticAMD":
        if family >= 26:
            return "znver5"
        if family == 25:
            return "znver4" if avx512 else "znver3"
        if family == 23:
            return "znver2" if "clwb" in flags else "znver1"
    if vendor == "GenuineIntel":
        if "amx_tile" in flags:
            return "sapphirerapids"
        if "avx512_vnni" in flags and "avx512vbmi" in flags:
            return "icelake-server"
        if "avx512_vnni" in flags:
            return "cascadelake"
        if avx512:
            return "skylake-avx512"
    if "avx2" in flags and "fma" in flags:
        return "x86-64-v3"
    return "x86-64"


def host_target() -> dict:
    """The TVM target (as a JSON-able dict) for this machine's CPU."""
    mcpu = detect_mcpu()
    return {"kind": "llvm", "mcpu": mcpu} if mcpu else {"kind": "llvm"}


def normalize_target(target) -> dict:
    """A target given as None (host), a dict, or a JSON string -> dict."""
    if target is None:
        return host_target()
    if isinstance(target, str):
        try:
            target = json.loads(target)
        except json.JSONDecodeError:
            raise TvmBuildError(f"TVM target {target!r} is not a JSON object like "
                                '{"kind": "llvm", "mcpu": "znver4"}') from None
    if not isinstance(target, dict) or "kind" not in target:
        raise TvmBuildError(f"TVM target must be a dict with a 'kind', got {target!r}")
    return dict(target)


# -- cache --------------------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("VSC_TVM_CACHE") or Path.home() / ".cache" / "vsc" / "tvm")


def _tvm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("apache-tvm")
    except PackageNotFoundError:
        return "unknown"


def _normalize_specs(specs) -> list[tuple[str, int, int]]:
    from vsc.runtime.quant import check_shape, get_format

    out = set()
    for fmt, n, k in specs:
        try:
            get_format(fmt)
            check_shape((n, k), fmt)
        except ValueError as e:
            raise TvmBuildError(str(e)) from None
        out.add((str(fmt), int(n), int(k)))
    return sorted(out)


def kernel_sources() -> list[Path]:
    """Every module of this package, in a fixed order: the kernels' source, which a cache key
    covers (a new kernel module is covered without being listed anywhere)."""
    return sorted(_HERE.glob("*.py"))


def cache_key(specs, target: dict, dequant: bool = True, elementwise=()) -> str:
    h = hashlib.sha256()
    for src in kernel_sources():
        h.update(src.read_bytes())
    h.update(json.dumps({"target": target, "specs": specs, "dequant": dequant, "tvm": _tvm_version(),
                         **({"elementwise": [list(e) for e in elementwise]} if elementwise else {})},
                        sort_keys=True).encode())
    return h.hexdigest()[:24]


def build_quant_kernels(specs, target=None, *, dequant: bool = True, elementwise=()) -> Path:
    """Path of a shared library with the kernels for `specs` = [(fmt, N, K), ...], and the
    fused elementwise kernels `elementwise` names (`vsc.backends.tvm.elementwise`)."""
    norm = _normalize_specs(specs)
    elementwise = sorted({tuple(e) for e in elementwise})
    if not norm and not elementwise:
        raise TvmBuildError("no kernels to build")
    tgt = normalize_target(target)
    out_dir = cache_root() / cache_key(norm, tgt, dequant, elementwise)
    path = out_dir / LIB_NAME
    if path.is_file():
        return path
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TvmBuildError(f"cannot create TVM kernel cache dir {out_dir}: {e}") from None
    tmp = out_dir / f".{LIB_NAME}.{os.getpid()}.tmp.so"
    try:
        _compile_library(norm, tgt, dequant, tmp, elementwise)
        os.replace(tmp, path)
    except TvmBuildError:
        raise
    except Exception as e:  # TVM raises its own error types (tvm_ffi errors, RuntimeError, ...)
        msg = " ".join(str(e).split())[:300]
        raise TvmBuildError(f"TVM build of {len(norm)} quantized kernel shape(s) for {tgt} failed: "
                            f"{type(e).__name__}: {msg}") from None
    finally:
        tmp.unlink(missing_ok=True)
    (out_dir / "spec.json").write_text(json.dumps({"target": tgt, "specs": norm, "dequant": dequant}))
    return path


def _compile_library(specs, target: dict, dequant: bool, out: Path, elementwise=()) -> None:
    """Compile and link (the slow part: imports the TVM compiler)."""
    import tvm

    from vsc.backends.tvm.quant_linear import make_module, target_has_vnni

    mod = make_module(specs, dequant=dequant, vnni=target_has_vnni(target))
    if elementwise:
        from vsc.backends.tvm.attention import KINDS, make_attention_module
        from vsc.backends.tvm.elementwise import make_elementwise_module
        from vsc.backends.tvm.linear import make_linear_module
        fused = [e for e in elementwise if e[0] not in KINDS and e[0] != "linear"]
        attention = [e for e in elementwise if e[0] in KINDS]
        dense = [e for e in elementwise if e[0] == "linear"]
        if fused:
            mod.update(make_elementwise_module(fused))
        if attention:
            mod.update(make_attention_module(attention))
        if dense:
            mod.update(make_linear_module(dense))
    lib = tvm.compile(mod, target=tvm.target.Target(target))
    lib.export_library(str(out))
