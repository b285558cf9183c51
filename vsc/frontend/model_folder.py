"""What the spec's `model "..."` points at: a GGUF file, or a Hugging Face folder with a config.json.

`read_model_config` reads the model's config (the checker needs `max_position_embeddings`)
and refuses what vsc cannot serve with a ModelError whose message names the model as the
spec wrote it; the checker turns it into a SpecError at the model line.
"""
from __future__ import annotations

import json
from pathlib import Path

from vsc.errors import ModelError
from vsc.ir.gguf_import import is_gguf_path, read_gguf_model
from vsc.ir.hf_import import SUPPORTED_MODEL_TYPES


def read_model_config(path: Path, rel: str) -> dict:
    """The config of the model at `path` (written `rel` in the spec). OSError, ValueError or
    RuntimeError from the file system mean the path itself is not usable."""
    exists = path.exists()
    is_dir = path.is_dir()
    if is_gguf_path(path) and exists:      # a GGUF file, served as shipped
        try:
            return read_gguf_model(path).config
        except ModelError as e:
            raise ModelError(path, f"model file '{rel}': {e.message}") from None
    if not exists:
        raise ModelError(path, f"model folder '{rel}' not found (looked for {path})")
    if not is_dir:
        raise ModelError(path, f"model path '{rel}' is neither a folder nor a .gguf file")
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(path, f"model folder '{rel}' has no config.json")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(path, f"config.json in '{rel}' is not valid JSON "
                               f"({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise ModelError(path, f"config.json in '{rel}' is not valid JSON (not UTF-8 text)") from None
    except OSError as e:
        raise ModelError(path, f"cannot read config.json in '{rel}': {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ModelError(path, f"config.json in '{rel}' is not a JSON object")
    model_type = data.get("model_type")
    if model_type is None:
        raise ModelError(path, f"config.json in '{rel}' has no \"model_type\"")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise ModelError(path, f"unsupported model_type '{model_type}' in '{rel}' (vsc supports {supported})")
    return data
