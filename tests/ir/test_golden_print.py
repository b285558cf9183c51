"""The printed initial module of a fixed tiny llama, compared with a checked-in golden file.

A change to the printer, the importer or the node types shows up here as a text diff.
Regenerate after an intended change with `VSC_UPDATE_GOLDEN=1 pytest tests/ir/test_golden_print.py`
and review the diff of tests/ir/golden/llama_tiny.vsir.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

from vsc.ir.hf_import import build_model_graph
from vsc.ir.parser import parse_module
from vsc.ir.printer import print_module

from .strategies import serving_module_around

GOLDEN = Path(__file__).parent / "golden" / "llama_tiny.vsir"
PIPELINE = "initial"

LLAMA_TINY = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
    "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def tiny_llama_module(tmp_path: Path):
    model_dir = tmp_path / "llama-tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA_TINY))
    model = build_model_graph(model_dir)
    assert model.attrs["path"] == str(model_dir.resolve())
    model.attrs["path"] = "models/llama-tiny"  # no absolute tmp path in the golden text
    return serving_module_around(model, name="llama_tiny")


def test_printed_module_matches_golden(tmp_path):
    module = tiny_llama_module(tmp_path)
    text = print_module(module, pipeline=PIPELINE)
    if os.environ.get("VSC_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    expected = GOLDEN.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), text.splitlines(keepends=True),
            fromfile=str(GOLDEN), tofile="printed",
        ))
        raise AssertionError(f"printed module differs from the golden file "
                             f"(set VSC_UPDATE_GOLDEN=1 to regenerate):\n{diff}")
    assert "/tmp" not in text and str(tmp_path) not in text


def test_golden_parses_back_to_the_module(tmp_path):
    assert parse_module(GOLDEN.read_text(), str(GOLDEN)) == tiny_llama_module(tmp_path)
