"""Load the native CPU kernels a plan selected (built by `vsc compile`, shipped in kernels/).

The runtime never compiles: it imports the .so the server folder carries (or, while
`vsc compile` checks accuracy before the folder exists, the build in the compiler's cache).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

KERNELS_DIR = "kernels"
_LOADED: dict[str, object] = {}


def load_native_kernels(module_file: str, filename: str, built: str):
    """The extension module `filename`: from the server folder's kernels/ (beside
    `module_file`, the generated model.py), else the build path `vsc compile` used."""
    candidates = [Path(module_file).parent / KERNELS_DIR / filename, Path(built)]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise RuntimeError(f"native kernel {filename} is missing from {candidates[0].parent}; recompile the server "
                           f"with `vsc compile`")
    name = path.stem
    if name in _LOADED:
        return _LOADED[name]
    import torch  # noqa: F401 - the extension links against torch's libraries: load them first

    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[name] = module
    _LOADED[name] = module
    return module
