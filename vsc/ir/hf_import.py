"""Build the model graph of a ServingModule from a Hugging Face config.json.

One builder covers the decoder-only families vsc supports; they differ in small ways:
Qwen2 has q/k/v biases, Mixtral replaces the MLP with a mixture of experts, and some
models tie the LM head to the embedding table.
"""
from __future__ import annotations

import json
from pathlib import Path

from vsc.errors import ModelError
from vsc.ir.gguf_import import is_gguf_path, read_gguf_model
from vsc.ir.kernels import default_kernel
from vsc.ir.module import Function, KernelRef, ModelGraph, Op, Region, Weight, symbol_name
from vsc.ir.ops import infer
from vsc.ir.types import QUANT_DTYPES, Origin, TensorType

# model_type values in config.json that vsc can import, and the family each maps to.
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "mixtral": "mixtral"}

_TORCH_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def read_hf_config(model_dir: Path) -> dict:
    """config.json of a model folder, checked for presence and support."""
    cfg_path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ModelError(model_dir, "model folder does not exist")
    if not cfg_path.is_file():
        raise ModelError(model_dir, "model folder has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(cfg_path, f"config.json is not valid JSON ({e.msg} at line {e.lineno})") from None
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ModelError(cfg_path, f"unsupported model_type {mt!r} (supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})")
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        # The rope op has no scaling parameters yet: importing would silently compute wrong numbers.
        raise ModelError(cfg_path, f"unsupported RoPE scaling {rope_type!r} (only default RoPE is implemented)")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelError(cfg_path, "partial rotary embeddings are not supported")
    return cfg


def config_attrs(cfg: dict) -> dict:
    """The model facts of a config.json: sizes, rope, norms, tying, q/k/v biases, experts.

    The one reader of these keys: the importer keeps them on the model node and
    `vsc.bench.floor` counts parameters and bytes from them. A missing key raises KeyError.
    """
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    arch = SUPPORTED_MODEL_TYPES[cfg["model_type"]]
    attrs = {
        "arch": arch,
        "model_type": cfg["model_type"],
        "vocab": cfg["vocab_size"],
        "hidden": hidden,
        "layers": cfg["num_hidden_layers"],
        "heads": heads,
        "kv_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": cfg.get("head_dim") or hidden // heads,
        "intermediate": cfg["intermediate_size"],
        "rope_theta": float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "max_position": cfg.get("max_position_embeddings", 2048),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        # Qwen2's q/k/v projections always carry biases, whatever its config says
        "attention_bias": arch == "qwen2" or bool(cfg.get("attention_bias", False)),
    }
    if arch == "mixtral":
        attrs["experts"] = cfg["num_local_experts"]
        attrs["experts_per_token"] = cfg["num_experts_per_tok"]
    return attrs


def model_attrs(cfg: dict, model_dir: Path, dtype: str) -> dict:
    """The config facts the IR keeps on the model node, with the model's path and dtype."""
    a = config_attrs(cfg)
    return {"arch": a["arch"], "model_type": a["model_type"], "path": str(Path(model_dir).resolve()), "dtype": dtype,
            **a}


class _GraphBuilder:
    """Appends typed ops (result types inferred from the op rules) with default kernels."""

    def __init__(self, weights: dict[str, Weight], origin: Origin, dtype: str):
        self.weights = weights
        self.dtype = dtype
        self.origin = origin
        self.types: dict[str, TensorType] = {}
        self.ops: list[Op] = []

    def type_of(self, operand: str) -> TensorType:
        return self.weights[operand].type if operand.startswith("@") else self.types[operand]

    def op(self, kind: str, results: list[str], operands: list[str], **attrs) -> list[str]:
        main = self.weights[operands[1]].type.dtype if len(operands) > 1 and operands[1].startswith("@") else None
        if kind == "embed" and main in QUANT_DTYPES:
            attrs["dtype"] = self.dtype          # the rows dequantize to the activation dtype
        types = infer(kind, [self.type_of(o) for o in operands], attrs)
        for r, t in zip(results, types):
            self.types[r] = t
        kernel = default_kernel(kind, weight_dtype=main)
        self.ops.append(Op(kind, results, operands, types, attrs, KernelRef(kernel) if kernel else None, self.origin))
        return results


def build_model_graph(model_path: Path, dtype: str = "f32", origin: Origin | None = None) -> ModelGraph:
    """The model graph of the HF model folder (or GGUF file) at `model_path`, with torch kernels
    as the default schedule. A GGUF's quantized tensors keep their block format as IR type."""
    gguf_model = None
    if is_gguf_path(model_path):
        gguf_model = read_gguf_model(model_path)
        cfg, where = gguf_model.config, Path(model_path)
    else:
        cfg, where = read_hf_config(model_path), Path(model_path) / "config.json"
    try:
        a = model_attrs(cfg, model_path, dtype)
    except KeyError as e:
        raise ModelError(where, f"config lacks {e.args[0]!r}") from None
    if gguf_model is not None and a["arch"] == "mixtral":
        raise ModelError(where, "mixture-of-experts GGUF files are not supported")
    origin = origin or Origin("import", a["arch"])
    H, V, D, F = a["hidden"], a["vocab"], a["head_dim"], a["intermediate"]
    q_out, kv_out = a["heads"] * D, a["kv_heads"] * D
    # llama.cpp stores a llama model's q/k rows permuted for its interleaved RoPE
    unpermute = {"self_attn.q_proj.weight": a["heads"], "self_attn.k_proj.weight": a["kv_heads"],
                 "self_attn.q_proj.bias": a["heads"], "self_attn.k_proj.bias": a["kv_heads"]} \
        if gguf_model is not None and a["arch"] == "llama" else {}

    weights: dict[str, Weight] = {}

    def w(name: str, *shape: int) -> str:
        ref = "@" + name
        if gguf_model is None:
            weights[ref] = Weight(ref, TensorType(dtype, shape), "load", [name], {}, origin)
            return ref
        stored = gguf_model.hf_to_gguf(name)
        heads = next((h for suffix, h in unpermute.items() if name.endswith(suffix)), None)
        weights[ref] = Weight(ref, TensorType(gguf_model.ir_dtype(stored, dtype), shape), "load", [stored],
                              {"unpermute_heads": heads} if heads else {}, origin)
        return ref

    embed_w = w("model.embed_tokens.weight", V, H)
    L = "model.layers.{i}."
    ln1, ln2 = w(L + "input_layernorm.weight", H), w(L + "post_attention_layernorm.weight", H)
    qw, kw, vw = (w(L + f"self_attn.{p}_proj.weight", n, H) for p, n in (("q", q_out), ("k", kv_out), ("v", kv_out)))
    biases = [w(L + f"self_attn.{p}_proj.bias", n) for p, n in (("q", q_out), ("k", kv_out), ("v", kv_out))] if a["attention_bias"] else [None] * 3
    ow = w(L + "self_attn.o_proj.weight", H, q_out)
    if a["arch"] == "mixtral":
        E = a["experts"]
        router_w = w(L + "block_sparse_moe.gate.weight", E, H)
        E_ = L + "block_sparse_moe.experts.{e}."
        w1, w3, w2 = w(E_ + "w1.weight", F, H), w(E_ + "w3.weight", F, H), w(E_ + "w2.weight", H, F)
    else:
        gate_w, up_w, down_w = w(L + "mlp.gate_proj.weight", F, H), w(L + "mlp.up_proj.weight", F, H), w(L + "mlp.down_proj.weight", H, F)
    norm_w = w("model.norm.weight", H)
    head_w = embed_w if a["tie_word_embeddings"] else w("lm_head.weight", V, H)

    params = [("%tokens", TensorType("i64", ("T",))), ("%positions", TensorType("i64", ("T",)))]
    hidden_t = TensorType(dtype, ("T", H))

    # The decoder layer, built once as the region of a `repeat`.
    layer = _GraphBuilder(weights, origin, dtype)
    layer.types.update(dict(params))
    layer.types["%x"] = hidden_t
    layer.op("rmsnorm", ["%xn"], ["%x", ln1], eps=a["rms_norm_eps"])
    for name, wt, b in (("%q", qw, biases[0]), ("%k", kw, biases[1]), ("%v", vw, biases[2])):
        layer.op("linear", [name], ["%xn", wt] + ([b] if b else []))
    layer.op("rope", ["%q_rot", "%k_rot"], ["%q", "%k", "%positions"], theta=a["rope_theta"], head_dim=D)
    layer.op("attention", ["%attn"], ["%q_rot", "%k_rot", "%v"], heads=a["heads"], kv_heads=a["kv_heads"],
             head_dim=D, scale=D ** -0.5)
    layer.op("linear", ["%attn_out"], ["%attn", ow])
    layer.op("add", ["%h_attn"], ["%x", "%attn_out"])
    layer.op("rmsnorm", ["%hn"], ["%h_attn", ln2], eps=a["rms_norm_eps"])
    if a["arch"] == "mixtral":
        layer.op("linear", ["%router"], ["%hn", router_w])
        layer.op("moe", ["%mlp_out"], ["%hn", "%router", w1, w3, w2], experts=a["experts"], top_k=a["experts_per_token"])
    else:
        layer.op("linear", ["%gate"], ["%hn", gate_w])
        layer.op("linear", ["%up"], ["%hn", up_w])
        layer.op("silu", ["%gate_act"], ["%gate"])
        layer.op("mul", ["%mlp_in"], ["%gate_act", "%up"])
        layer.op("linear", ["%mlp_out"], ["%mlp_in", down_w])
    layer.op("add", ["%h_out"], ["%h_attn", "%mlp_out"])
    region = Region([("%x", hidden_t)], layer.ops, ["%h_out"])

    top = _GraphBuilder(weights, origin, dtype)
    top.types.update(dict(params))
    top.op("embed", ["%h0"], ["%tokens", embed_w])
    top.ops.append(Op("repeat", ["%h"], ["%h0"], [hidden_t], {"count": a["layers"]}, None, origin, region))
    top.types["%h"] = hidden_t
    top.op("rmsnorm", ["%h_norm"], ["%h", norm_w], eps=a["rms_norm_eps"])
    top.op("last_token", ["%h_last"], ["%h_norm"])
    top.op("linear", ["%logits"], ["%h_last", head_w])
    top.op("sample", ["%next"], ["%logits"])

    func = Function("step", ["T", "B"], params, top.ops, ["%logits", "%next"])
    name = symbol_name(Path(model_path).resolve().stem if gguf_model is not None else Path(model_path).resolve().name)
    return ModelGraph(name, a, list(weights.values()), func, origin)
