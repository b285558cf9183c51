"""Build the native CPU kernels ahead of time, once per source version, cached on disk.

`vsc compile` of a plan that selects a native kernel (the native-attention pass) builds
`paged_attention.cpp` with torch's C++ extension tooling into
~/.cache/vsc/native/<name>/<name>.so (VSC_NATIVE_CACHE overrides the folder), where the name
carries a hash of the source, the flags and the torch version: a change rebuilds, anything
else reuses (the first build takes ~30-60 s on two cores; later compiles ~0). The server
folder gets a copy in kernels/, and its runner loads that copy: a server never compiles.

Flags: -O3 with OpenMP SIMD pragmas for the dot products; on x86-64 -mavx2 -mfma (every
x86-64 server CPU of the last decade; not -march=native, so a folder moved to another such
machine still runs). No compiler here -> NativeBuildError, one line.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import tempfile
from pathlib import Path

from vsc.errors import VscError

SOURCE = Path(__file__).with_name("paged_attention.cpp")
CFLAGS = ["-O3", "-fopenmp-simd"] + (["-mavx2", "-mfma"] if platform.machine() in ("x86_64", "AMD64") else [])


class NativeBuildError(VscError):
    """The native kernels could not be built (no C++ compiler, or a build error)."""


def cache_dir() -> Path:
    return Path(os.environ.get("VSC_NATIVE_CACHE") or Path.home() / ".cache" / "vsc" / "native")


def kernel_name() -> str:
    import torch

    h = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + torch.__version__.encode())
    return f"vsc_native_{h.hexdigest()[:12]}"


def build_native_kernels() -> Path:
    """The built extension (.so), from the cache or built now."""
    name = kernel_name()
    target = cache_dir() / name / f"{name}.so"
    if target.is_file():
        return target
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise NativeBuildError("native kernels: error: no C++ compiler (c++) on this machine; "
                               "install g++ or drop the native-attention pass")
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent.parent))
    try:
        from torch.utils.cpp_extension import load

        try:
            load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, build_directory=str(work),
                 is_python_module=True, verbose=False)
        except Exception as e:  # noqa: BLE001 - a compiler error: one line, the rest is in the build folder
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise NativeBuildError(f"native kernels: error: building {SOURCE.name} failed: {last}") from None
        built = work / f"{name}.so"
        if not built.is_file():
            raise NativeBuildError(f"native kernels: error: the build produced no {built.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(built, target)          # atomic: concurrent builders end with one good file
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
