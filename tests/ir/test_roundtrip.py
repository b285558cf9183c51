"""print -> parse -> structurally equal, and printing again gives the same text.

Generated modules cover the syntax (names, keywords used as names, attribute values,
origins, nested regions); modules built from real HF configs cover what the importer
actually produces for each family.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from vsc.ir.hf_import import build_model_graph
from vsc.ir.module import Op, Region, RequestGraph, Stage, walk_ops
from vsc.ir.parser import parse_module, parse_module_file
from vsc.ir.printer import print_module
from vsc.ir.types import Origin, TensorType
from ir_queries import read_pipeline_header

from .strategies import KEYWORDS, serving_module_around, serving_modules


def assert_roundtrip(module) -> str:
    text = print_module(module)
    parsed = parse_module(text)
    assert parsed == module
    assert print_module(parsed) == text
    return text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(serving_modules())
def test_generated_modules_roundtrip(module):
    text = assert_roundtrip(module)
    # Escapes keep the text plain ASCII lines: it survives files, editors and diffs.
    assert text.isascii() and "\r" not in text


# -- real configs of each family --------------------------------------------------------

_LLAMA_GQA = {
    "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 8,
    "num_key_value_heads": 2, "intermediate_size": 160, "max_position_embeddings": 1024,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
CONFIGS = {
    "llama-gqa": {"model_type": "llama", **_LLAMA_GQA},
    "qwen2-tied": {
        "model_type": "qwen2", "vocab_size": 300, "hidden_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 96,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "mixtral-moe": {
        "model_type": "mixtral", "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 64,
        "max_position_embeddings": 4096, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "num_local_experts": 4, "num_experts_per_tok": 2,
    },
}


def build_model_graph_from(config: dict, folder: str, root: Path):
    model_dir = root / folder
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(config))
    return build_model_graph(model_dir)


# -- hand-picked syntax corners (regressions) ------------------------------------------

def _corner_module(root: Path):
    """A real-looking module whose names and origins hit the corners of the syntax."""
    module = serving_module_around(build_model_graph_from(CONFIGS["llama-gqa"], "corner", root))
    t = TensorType("f32", ("T", 8))
    # Op kinds that are grammar keywords, with and without results, in a func body and a region.
    region = Region([("%x", t)], [
        Op("yield", [], ["%x"], [], {}, None, Origin("pass", "p")),
        Op("cache", ["%c"], ["%x"], [t]),
    ], ["%c"])
    module.model.func.body[-1:-1] = [
        Op("return", [], [], []),
        Op("model", [], ["%h"], [], {"true": True, "loc": None}),
        Op("stage", ["%s"], ["%h"], [t], {}, None, Origin("pass", "x"), region),
        Op("requests", [], [], []),
        Op("via", [], [], []),
        Op("loc", [], [], []),
    ]
    graph = RequestGraph()
    for name in ("stage", "model", "cache", "requests", "loc", "via", "none"):
        graph.add_stage(Stage(name, {}, Origin("spec", "a\nb\r\"c\"\\d\x00é.vs", 1, 2)))
    for src, dst in (("stage", "stage"), ("model", "cache"), ("loc", "via"), ("none", "stage"), ("cache", "loc")):
        graph.add_edge(src, dst)
    module.requests = graph
    module.model.func.body.insert(0, Op("return", ["%r"], [], []))
    module.model.func.body.insert(0, Op("return", [], ["%tokens"], []))
    module.target.origin = Origin("pass", "line\nbreak\ttab\u2028sep")
    return module


def test_keyword_names_and_escaped_origins_roundtrip(tmp_path):
    text = assert_roundtrip(_corner_module(tmp_path))
    assert "  stage -> stage\n" in text
    assert "    yield(%x)" in text


def test_strategies_know_every_grammar_keyword():
    """Generated identifiers include every keyword, so a new keyword gets exercised too."""
    grammar = (Path(__file__).resolve().parents[2] / "vsc" / "grammar" / "vsir.lark").read_text()
    words = set(re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)"', grammar))
    assert words == set(KEYWORDS)


def test_roundtrip_through_a_file_with_pipeline_header(tmp_path):
    module = _corner_module(tmp_path)
    path = tmp_path / "dump.vsir"
    path.write_text(print_module(module, pipeline="fuse-qkv,paged-kv{block=16}"))
    assert read_pipeline_header(path.read_text()) == "fuse-qkv,paged-kv{block=16}"
    assert parse_module_file(path) == module


@pytest.mark.parametrize("folder", sorted(CONFIGS))
def test_real_config_modules_roundtrip(folder, tmp_path):
    model = build_model_graph_from(CONFIGS[folder], folder, tmp_path)
    module = serving_module_around(model)
    text = assert_roundtrip(module)
    path = tmp_path / "plan.vsir"
    path.write_text(text)
    assert parse_module_file(path) == module

    # The module really is the family it claims to be (so the round trip covered its features).
    weights = {w.name for w in model.weights}
    kinds = [op.kind for op in walk_ops(model.func.body)]
    attention = next(op for op in walk_ops(model.func.body) if op.kind == "attention")
    cfg = CONFIGS[folder]
    assert attention.attrs["kv_heads"] == cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert model.attrs["path"] == str((tmp_path / folder).resolve())
    if folder == "qwen2-tied":
        assert "@model.layers.{i}.self_attn.q_proj.bias" in weights
        assert "@lm_head.weight" not in weights
        assert "linear(%h_last, @model.embed_tokens.weight)" in text
    if folder == "mixtral-moe":
        assert "moe" in kinds
        assert "@model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight" in weights
    if folder == "llama-gqa":
        assert "@lm_head.weight" in weights
        assert not any(name.endswith(".bias") for name in weights)
