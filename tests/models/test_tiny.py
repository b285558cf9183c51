"""Tiny model folders: complete, loadable by transformers, and reproducible to the byte."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from vsc.errors import ModelError
from vsc.models import corpus, tiny
from vsc.models.cli import add_models_commands

torch.set_num_threads(1)

ARCHS = ["llama", "qwen2", "mixtral"]
FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny.make_tiny(root / arch, arch=arch, seed=0) for arch in ARCHS}


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("arch", ARCHS)
def test_folder_is_complete(tiny_dirs, arch):
    assert sorted(p.name for p in tiny_dirs[arch].iterdir()) == sorted(FILES)


def test_llama_config_values(tiny_dirs):
    cfg = json.loads((tiny_dirs["llama"] / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["torch_dtype"] == "float32"
    expected = dict(
        vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=384,
        max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    assert {k: cfg[k] for k in expected} == expected


def test_qwen2_and_mixtral_config_values(tiny_dirs):
    qwen = json.loads((tiny_dirs["qwen2"] / "config.json").read_text())
    assert qwen["architectures"] == ["Qwen2ForCausalLM"] and qwen["tie_word_embeddings"] is True
    moe = json.loads((tiny_dirs["mixtral"] / "config.json").read_text())
    assert moe["architectures"] == ["MixtralForCausalLM"]
    assert (moe["num_local_experts"], moe["num_experts_per_tok"], moe["intermediate_size"]) == (4, 2, 192)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_weight_loads_exactly(tiny_dirs, arch):
    model, info = _load(tiny_dirs[arch])
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    params = model.state_dict()
    saved = load_file(tiny_dirs[arch] / "model.safetensors")
    for name, array in saved.items():
        assert torch.equal(params[name], torch.from_numpy(array)), name
    assert all(a.dtype == np.float32 for a in saved.values())
    if arch == "qwen2":
        assert "lm_head.weight" not in saved and "model.layers.0.self_attn.q_proj.bias" in saved
        assert "model.layers.0.self_attn.o_proj.bias" not in saved
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_mixtral_experts_load_into_fused_weights(tiny_dirs):
    """The file uses the Hub's per-expert names; transformers fuses them on load."""
    model, info = _load(tiny_dirs["mixtral"])
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    saved = {k: torch.from_numpy(v) for k, v in load_file(tiny_dirs["mixtral"] / "model.safetensors").items()}
    moe = "model.layers.3.block_sparse_moe."
    mlp = model.model.layers[3].mlp
    assert torch.equal(mlp.gate.weight, saved[moe + "gate.weight"])
    for e in range(4):
        w1, w2, w3 = (saved[f"{moe}experts.{e}.w{i}.weight"] for i in (1, 2, 3))
        assert torch.equal(mlp.experts.gate_up_proj[e], torch.cat([w1, w3])), e
        assert torch.equal(mlp.experts.down_proj[e], w2), e


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_gives_finite_spread_logits(tiny_dirs, arch):
    model, _ = _load(tiny_dirs[arch])
    ids = torch.tensor([[1, 17, 300, 1999, 42, 7, 2]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 7, 2048)
    assert torch.isfinite(logits).all()
    assert logits.std(dim=-1).min() > 0.5  # far from uniform


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_and_greedy_generate(tiny_dirs, arch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs[arch])
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == tok.convert_tokens_to_ids("<|im_start|>") == 1
    model, _ = _load(tiny_dirs[arch])
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 8
    assert len(set(new.tolist())) > 1  # the random model does not just repeat one token


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_tokenizes_like_tokenizer_json(tiny_dirs, arch):
    """transformers rebuilds qwen2's pipeline itself; it must still match tokenizer.json."""
    from transformers import AutoTokenizer

    text = "Hello, World!  def f(x):\n\treturn x**2  # ünïcode 日本語 <|im_end|>\n\n123456"
    tok = AutoTokenizer.from_pretrained(tiny_dirs[arch])
    raw = Tokenizer.from_file(str(tiny_dirs[arch] / "tokenizer.json"))
    ids = tok(text)["input_ids"]
    assert ids == raw.encode(text).ids
    assert tok.decode(ids) == text
    assert len(tok) == 2048


def test_same_seed_same_bytes_other_seed_other_weights(tiny_dirs, tmp_path):
    again = tiny.make_tiny(tmp_path / "again", arch="mixtral", seed=0)
    assert _digest(again) == _digest(tiny_dirs["mixtral"])
    other = _digest(tiny.make_tiny(tmp_path / "other", arch="mixtral", seed=1))
    assert other["model.safetensors"] != _digest(again)["model.safetensors"]
    assert other["tokenizer.json"] == _digest(again)["tokenizer.json"]


def test_tokenizer_training_is_deterministic():
    texts = corpus.read_corpus()
    first = tiny.train_tokenizer(texts)
    assert tiny.train_tokenizer(texts) == first
    vocab = json.loads(first)["model"]["vocab"]
    assert len(vocab) + 3 >= 2048 - 1
    assert [vocab.get(t) for t in tiny.SPECIAL_TOKENS] in ([0, 1, 2], [None, None, None])


def test_corpus_is_capped_and_ordered():
    files = corpus.corpus_files()
    assert files, "no corpus text on this machine"
    small = corpus.read_corpus(max_bytes=5000)
    assert sum(len(t.encode("utf-8")) for t in small) <= 5000
    assert corpus.read_corpus(max_bytes=5000) == small


def test_no_corpus_text_is_a_model_error(monkeypatch):
    monkeypatch.setattr(corpus, "corpus_files", lambda: [])
    with pytest.raises(ModelError, match="no text found"):
        corpus.read_corpus()


def test_unknown_arch_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="unknown tiny architecture 'gpt2'"):
        tiny.make_tiny(tmp_path, arch="gpt2")


def test_cli_make_tiny(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="vsc")
    add_models_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "make-tiny", str(tmp_path / "m"), "--arch", "qwen2", "--seed", "3"])
    assert args.func(args) == 0
    assert "qwen2" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "qwen2"
    with pytest.raises(SystemExit):
        parser.parse_args(["models", "make-tiny", str(tmp_path), "--arch", "gpt2"])
