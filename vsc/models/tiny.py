"""Small random Hugging Face model folders, made offline and byte-for-byte reproducibly.

Tests and examples need real model folders (config, safetensors weights, tokenizer, chat
template) that transformers can load, but must not download anything.  `make_tiny` writes
one for a llama, qwen2 or mixtral architecture: weights are drawn from a seeded numpy
Generator, the byte-level BPE tokenizer is trained on text found on this machine (see
`vsc.models.corpus`), and every file is written in a fixed order and format, so the same
seed on the same machine always gives identical bytes.

The weights are random, but spread wide enough that logits are far from uniform, so most
greedy steps have a clear winner rather than a near-tie that rounding could flip, and
greedy output does not collapse into one repeated token.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from vsc.errors import ModelError
from vsc.models.corpus import read_corpus

ARCHS = ("llama", "qwen2", "mixtral")

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
#: Special tokens take ids 0, 1, 2 in this order.
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

#: ChatML, as SmolLM2-Instruct and Qwen2-Instruct use it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Split before byte-level encoding, as Qwen2 (and Llama 3) tokenizers do.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

VOCAB_SIZE = 2048
HIDDEN = 128
LAYERS = 4
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 32
INTERMEDIATE = 384
MOE_INTERMEDIATE = 192
EXPERTS = 4
EXPERTS_PER_TOKEN = 2
MAX_POSITIONS = 2048

# Standard deviations of the random weights (norm weights are 1 + NORM_NOISE * N(0, 1)).
# Logits come out with a standard deviation of about 2 (llama, mixtral) or 1 (qwen2), so
# greedy decoding has clear winners; the router's logits are spread likewise.
EMBED_STD = 1.0
LM_HEAD_STD = 0.2
LINEAR_STD = 0.05
BIAS_STD = 0.05
ROUTER_STD = 0.2
NORM_NOISE_STD = 0.05
# With tied embeddings (qwen2) the embedding is also the output head.  A large one makes
# each token predict itself, so it is kept small; then context-averaging attention would
# dominate the residual stream and greedy output would loop on one token, so attention's
# output projection is scaled down and the token-wise MLP's output up.
TIED_EMBED_STD = 0.1
TIED_O_PROJ_STD = 0.01
TIED_DOWN_PROJ_STD = 0.15


def make_tiny(out_dir: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a complete tiny HF model folder for `arch` into `out_dir`; returns `out_dir`."""
    if arch not in ARCHS:
        raise ModelError(out_dir, f"unknown tiny architecture '{arch}' (known: {', '.join(ARCHS)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model_config(arch)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", generation_config())
    save_file(random_weights(config, seed), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "tokenizer.json").write_text(cached_tokenizer_json(), encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config())
    return out_dir


# --- config files -------------------------------------------------------------------------


def model_config(arch: str) -> dict[str, Any]:
    """config.json contents for `arch`, in the form the Hugging Face Hub uses."""
    config: dict[str, Any] = {
        "architectures": [_ARCH_CLASS[arch]],
        "model_type": arch,
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    elif arch == "qwen2":
        config.update(tie_word_embeddings=True, use_sliding_window=False, sliding_window=None)
    elif arch == "mixtral":
        config.update(
            intermediate_size=MOE_INTERMEDIATE,
            num_local_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_PER_TOKEN,
            sliding_window=None,
            router_aux_loss_coef=0.02,
            output_router_logits=False,
        )
    return config


_ARCH_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


def generation_config() -> dict[str, Any]:
    """generation_config.json: greedy by default, stop at <|im_end|>."""
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False}


def tokenizer_config() -> dict[str, Any]:
    """tokenizer_config.json: special tokens, ChatML template, load tokenizer.json as is."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": IM_START,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "added_tokens_decoder": {
            str(i): {
                "content": tok,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, tok in enumerate(SPECIAL_TOKENS)
        },
        "chat_template": CHAT_TEMPLATE,
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --- weights ------------------------------------------------------------------------------


def weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, named as on the Hub, in a fixed order."""
    h, v = config["hidden_size"], config["vocab_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, h)
        if config["model_type"] == "qwen2":
            shapes[p + "self_attn.q_proj.bias"] = (q_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_dim)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes.update(_mlp_shapes(config, p))
    shapes["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _mlp_shapes(config: dict[str, Any], prefix: str) -> dict[str, tuple[int, ...]]:
    h, inter = config["hidden_size"], config["intermediate_size"]
    if config["model_type"] != "mixtral":
        return {
            prefix + "mlp.gate_proj.weight": (inter, h),
            prefix + "mlp.up_proj.weight": (inter, h),
            prefix + "mlp.down_proj.weight": (h, inter),
        }
    moe = prefix + "block_sparse_moe."
    shapes = {moe + "gate.weight": (config["num_local_experts"], h)}
    for e in range(config["num_local_experts"]):
        shapes[f"{moe}experts.{e}.w1.weight"] = (inter, h)
        shapes[f"{moe}experts.{e}.w2.weight"] = (h, inter)
        shapes[f"{moe}experts.{e}.w3.weight"] = (inter, h)
    return shapes


def random_weights(config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Float32 weights drawn in `weight_shapes` order from one seeded Generator."""
    rng = np.random.Generator(np.random.PCG64(seed))
    tied = config["tie_word_embeddings"]
    weights = {}
    for name, shape in weight_shapes(config).items():
        noise = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("norm.weight"):
            weights[name] = np.float32(1.0) + np.float32(NORM_NOISE_STD) * noise
        else:
            weights[name] = np.float32(_init_std(name, tied)) * noise
    return weights


def _init_std(name: str, tied: bool) -> float:
    if name == "model.embed_tokens.weight":
        return TIED_EMBED_STD if tied else EMBED_STD
    if name == "lm_head.weight":
        return LM_HEAD_STD
    if name.endswith(".bias"):
        return BIAS_STD
    if name.endswith("block_sparse_moe.gate.weight"):
        return ROUTER_STD
    if tied and name.endswith("o_proj.weight"):
        return TIED_O_PROJ_STD
    if tied and name.endswith("down_proj.weight"):
        return TIED_DOWN_PROJ_STD
    return LINEAR_STD


# --- tokenizer ----------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> str:
    """Train a byte-level BPE on `texts`; returns the tokenizer.json text.

    The normalizer and pre-tokenizer are Qwen2's (NFC, a split regex, then byte-level):
    for model_type qwen2 transformers ignores tokenizer.json's pipeline and rebuilds
    Qwen2's from the vocab and merges, so only this choice tokenizes the same in every
    arch.  BPE training in `tokenizers` breaks ties deterministically, so equal input
    gives an equal tokenizer.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str(pretty=True)


@functools.lru_cache(maxsize=1)
def cached_tokenizer_json() -> str:
    """The machine's tiny tokenizer, trained once per process (it does not depend on arch or seed)."""
    return train_tokenizer(read_corpus())
