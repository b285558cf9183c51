"""Text already on this machine, used to train the tiny models' tokenizer.

The tiny models are made offline, so their BPE tokenizer must be trained on text that is
present without downloading anything: the licence texts Debian ships under
/usr/share/common-licenses and the running Python's standard library (its licence, the
English help topics in pydoc_data, then its top-level modules).  The list is fixed and
sorted and its size capped, so the same machine always yields the same corpus (and so the
same tokenizer) and training takes seconds.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

from vsc.errors import ModelError

#: Stop collecting text once this many bytes have been read (the last file is cut).
DEFAULT_MAX_BYTES = 3 * 1024 * 1024

LICENSES_DIR = Path("/usr/share/common-licenses")


def corpus_files() -> list[Path]:
    """The candidate files, in the fixed order they are read; missing ones are left out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates: list[Path] = []
    if LICENSES_DIR.is_dir():
        candidates += sorted(LICENSES_DIR.iterdir())
    candidates.append(stdlib / "LICENSE.txt")
    candidates.append(stdlib / "pydoc_data" / "topics.py")
    if stdlib.is_dir():
        candidates += sorted(stdlib.glob("*.py"))
    return _unique_regular_files(candidates)


def _unique_regular_files(paths: list[Path]) -> list[Path]:
    """Keep existing regular files, dropping later links to a file already listed."""
    seen: set[Path] = set()
    kept: list[Path] = []
    for path in paths:
        if not path.is_file():
            continue
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        kept.append(path)
    return kept


def read_corpus(max_bytes: int = DEFAULT_MAX_BYTES) -> list[str]:
    """The corpus as a list of documents, at most `max_bytes` bytes of text in all.

    Raises ModelError when the machine has no usable text at all.
    """
    texts: list[str] = []
    remaining = max_bytes
    for path in corpus_files():
        if remaining <= 0:
            break
        try:
            data = path.read_bytes()[:remaining]
        except OSError:
            continue
        text = data.decode("utf-8", errors="ignore")
        if text.strip():
            texts.append(text)
            remaining -= len(data)
    if not texts:
        raise ModelError(LICENSES_DIR, "no text found on this machine to train a tokenizer on")
    return texts
