"""A server folder is code: a digest of every file it holds and of every model file it loads.

`vsc compile` seals the folder (`seal`): the manifest's "integrity" entry records the digest
of every file in the folder but manifest.json itself (generated source, plan, kernels,
tokenizer files, entry points), of every model file the server loads (by absolute path:
the weights live wherever `manifest["model"]["path"]` says, and are never copied), and of
the manifest itself, computed over a canonical serialisation of everything in it but that
one digest (so the engine and serve settings and the model's path are covered too).

`check` hashes all of that again and lists what differs; `vsc serve` refuses a folder with
any difference before it imports or loads anything (`check_or_raise`), and `vsc verify`
reports every difference. The hashes detect change; they are not signatures: whoever can
write the folder can also rewrite its manifest, so a folder must be guarded like any other
program.

The digest is BLAKE3 (a cryptographic hash, ~2.3x sha256's speed here with SHA-NI, and
multi-threaded over a large file): a server hashes its weights at every start, and
SmolLM2-135M's 540 MB take ~0.45 s with BLAKE3 against ~1.1 s with sha256 on this
2-core host under load. The manifest's descriptive sha256 entries (model.files,
kernels.files, ...) stay as they were.

This module is runtime code (the server runs it at start-up); the compiler imports it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import blake3

from vsc.errors import VscError
from vsc.runtime.quant_formats import is_gguf_path

ALGORITHM = "blake3"
MANIFEST_FILE = "manifest.json"
IGNORED_DIRS = ("__pycache__",)      # Python's bytecode caches: written by the import of __init__/__main__
# The files of an HF model folder a server reads (weights, index, config, tokenizer, template).
MODEL_FILE_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json",
                       "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


class IntegrityError(VscError):
    """A server folder (or a model file it loads) is not what `vsc compile` wrote."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_file(path: Path) -> str:
    """The integrity digest (BLAKE3, all cores) of a file's bytes."""
    if Path(path).stat().st_size == 0:        # mmap cannot map an empty file
        return blake3.blake3().hexdigest()
    return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(str(path)).hexdigest()


def digest_bytes(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def model_file_checksums(model_path: Path) -> dict[str, str]:
    """sha256 of every file of the model folder the server reads (or of the GGUF file), by name."""
    model_path = Path(model_path)
    if is_gguf_path(model_path):
        return {model_path.name: sha256_file(model_path)} if model_path.is_file() else {}
    return {p.name: sha256_file(p) for p in _model_files(model_path)}


def _model_files(model_dir: Path) -> list[Path]:
    return sorted({p for pattern in MODEL_FILE_PATTERNS for p in Path(model_dir).glob(pattern) if p.is_file()})


def folder_files(folder: Path) -> list[str]:
    """Every file under `folder` (relative, '/'-separated, sorted) but manifest.json and bytecode caches."""
    folder = Path(folder)
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part in IGNORED_DIRS for part in rel.parts) or rel.as_posix() == MANIFEST_FILE or p.is_dir():
            continue
        out.append(rel.as_posix())
    return sorted(out)


def manifest_digest(manifest: dict) -> str:
    """Digest of the manifest's canonical JSON (sorted keys, no spaces), its own digest left out."""
    body = dict(manifest)
    integrity = dict(body.get("integrity") or {})
    integrity.pop("manifest_digest", None)
    body["integrity"] = integrity
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return digest_bytes(text.encode())


def model_paths(manifest: dict) -> list[Path]:
    """The model files the manifest names (served model and any draft model), as paths."""
    return [model_path if is_gguf_path(model_path) else model_path / name
            for model_path, files in model_sets(manifest) for name in sorted(files)]


def seal(folder: Path, manifest: dict) -> dict:
    """Record the digest of every file in `folder`, of every model file it names and of the
    manifest itself (in place; returned)."""
    manifest["integrity"] = {
        "algorithm": ALGORITHM,
        "files": {rel: digest_file(Path(folder) / rel) for rel in folder_files(folder)},
        "model_files": {str(p): digest_file(p) for p in model_paths(manifest)},
    }
    manifest["integrity"]["manifest_digest"] = manifest_digest(manifest)
    return manifest


@dataclass(frozen=True)
class Problem:
    """One difference between a folder and its manifest: `what` is "changed", "missing", "unexpected" or
    "edited" (the manifest's own settings)."""

    path: str
    what: str

    def __str__(self) -> str:
        return {"changed": f"{self.path} changed since compile",
                "missing": f"{self.path} is missing",
                "unexpected": f"{self.path} was not written by vsc compile",
                "edited": f"{self.path} edited since compile (its settings differ from the digest it records)"}[self.what]


def model_sets(manifest: dict) -> list[tuple[Path, dict]]:
    """(model path, {name: sha256}) for the served model and any draft model."""
    sets = []
    model = manifest.get("model") or {}
    if "path" in model:
        sets.append((Path(model["path"]), dict(model.get("files") or {})))
    draft = (manifest.get("draft_runner") or {}).get("model") or {}
    if "path" in draft:
        sets.append((Path(draft["path"]), dict(draft.get("files") or {})))
    return sets


def check(folder: Path, manifest: dict, unexpected: bool = True) -> list[Problem]:
    """Every difference between `folder` (and the model files it loads) and what its manifest records.

    The manifest's own digest comes first (an edited setting); then each file of the folder,
    then each model file. `unexpected`: also list files in the folder, or weight files in a
    model folder, that the manifest does not name (a loader that globs *.safetensors would
    read them). Raises IntegrityError when the manifest has no integrity record at all.
    """
    folder = Path(folder)
    integrity = manifest.get("integrity")
    if not isinstance(integrity, dict) or not all(isinstance(integrity.get(k), dict) for k in ("files", "model_files")):
        raise IntegrityError(f"{folder / MANIFEST_FILE}: error: the manifest records no file hashes (written by "
                             "an older vsc); recompile the server with `vsc compile`")
    if integrity.get("algorithm") != ALGORITHM:
        raise IntegrityError(f"{folder / MANIFEST_FILE}: error: unknown integrity algorithm "
                             f"{integrity.get('algorithm')!r} (this vsc checks {ALGORITHM})")
    problems = []
    if integrity.get("manifest_digest") != manifest_digest(manifest):
        problems.append(Problem(str(folder / MANIFEST_FILE), "edited"))
    recorded = integrity["files"]
    for rel, digest in sorted(recorded.items()):
        problems += _compare(folder / rel, digest)
    if unexpected:
        problems += [Problem(str(folder / rel), "unexpected") for rel in folder_files(folder) if rel not in recorded]
    model_files = integrity.get("model_files") or {}
    for path, digest in sorted(model_files.items()):
        problems += _compare(Path(path), digest)
    if unexpected:       # a shard the loader would read (it globs *.safetensors) that nobody hashed
        for model_path, _ in model_sets(manifest):
            if model_path.is_dir():
                problems += [Problem(str(p), "unexpected") for p in sorted(model_path.glob("*.safetensors"))
                             if str(p) not in model_files]
    return problems


def _compare(path: Path, digest: str) -> list[Problem]:
    if not path.is_file():
        return [Problem(str(path), "missing")]
    return [] if digest_file(path) == digest else [Problem(str(path), "changed")]


def check_or_raise(folder: Path, manifest: dict) -> None:
    """IntegrityError naming the first difference (and how many more) if there is any."""
    problems = check(folder, manifest)
    if problems:
        more = f" (and {len(problems) - 1} more; `vsc verify` lists them)" if len(problems) > 1 else ""
        raise IntegrityError(f"{problems[0].path}: error: {_why(problems[0])}{more}; refusing to serve a changed "
                             "folder (recompile it, or pass --no-integrity-check to serve it as it is)")


def _why(p: Problem) -> str:
    return {"changed": "changed since compile (its digest differs from the manifest's)",
            "missing": "missing (the manifest records its digest)",
            "unexpected": "not written by vsc compile (the manifest does not name it)",
            "edited": "edited since compile (its settings differ from the digest it records)"}[p.what]
