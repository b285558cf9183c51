"""Read what the IR needs from a GGUF file's header: the model config and each tensor's name and type.

`model "x.gguf"` in a spec serves the file's tensors as shipped. The header (read through
`gguf.GGUFReader`'s memory map; no tensor data is touched) gives the architecture's sizes,
which become the same HF-style config the folder importer reads from config.json, and the
storage type of every tensor, which becomes the weight's IR type: `q4_1[576, 1536]` for a
Q4_1 tensor, the plan's float dtype for F32/F16/BF16 ones (norm scales).

Names: the IR keeps Hugging Face weight names (the passes and dumps read the same either
way) and loads each from its GGUF name (`load("blk.{i}.attn_q.weight")`), mapped by the
`gguf` package's own table. llama.cpp's converter permutes the rows of a llama model's q and
k weights for its interleaved RoPE; those weights carry `{unpermute_heads = H}` and the
loader puts the rows back (a row permutation: exact on quantized blocks too).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vsc.errors import ModelError
from vsc.ir.types import QUANT_DTYPES
from vsc.runtime.quant_formats import is_gguf_path  # noqa: F401 - the one rule, re-exported for the compiler

GGUF_MAGIC = b"GGUF"

# general.architecture values vsc imports -> HF model_type (the graph builder's families).
GGUF_ARCHES = {"llama": "llama", "qwen2": "qwen2"}
# Storage types -> IR dtype ("float": the plan's float dtype, the tensor converted at load).
_STORAGE = {"F32": "float", "F16": "float", "BF16": "float", **{d.upper(): d for d in QUANT_DTYPES}}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    storage: str          # "F32", "Q4_1", ...
    shape: tuple[int, ...]  # [out, in] (PyTorch order; GGUF lists dims innermost first)


@dataclass(frozen=True)
class GGUFModel:
    path: Path
    config: dict                       # HF-style config.json content
    tensors: dict[str, GGUFTensor]

    def hf_to_gguf(self, hf_name: str) -> str:
        """The GGUF tensor name of an HF weight name (`{i}` templates kept)."""
        import gguf

        arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[self.config["_gguf_arch"]]
        table = gguf.get_tensor_name_map(arch, max(1, self.config["num_hidden_layers"]))
        concrete = hf_name.replace("{i}", "0")
        name = table.get_name(concrete, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(self.path, f"no GGUF tensor name for {hf_name}")
        return name.replace("blk.0.", "blk.{i}.") if "{i}" in hf_name else name

    def ir_dtype(self, gguf_name: str, float_dtype: str) -> str:
        t = self.tensors.get(gguf_name.replace("{i}", "0"))
        if t is None:
            raise ModelError(self.path, f"GGUF lacks tensor '{gguf_name.replace('{i}', '0')}'")
        kind = _STORAGE.get(t.storage)
        if kind is None:
            raise ModelError(self.path, f"tensor '{t.name}' is stored as {t.storage}, which vsc cannot serve "
                                        f"(it serves F32, F16, BF16, {', '.join(d.upper() for d in sorted(QUANT_DTYPES))})")
        return float_dtype if kind == "float" else kind


def check_gguf_magic(path: Path) -> None:
    if not path.is_file():
        raise ModelError(path, "GGUF file not found")
    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as err:
        raise ModelError(path, f"cannot read GGUF file: {err.strerror}") from err
    if magic != GGUF_MAGIC:
        raise ModelError(path, "not a GGUF file (bad magic bytes)")


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def read_gguf_model(path: str | Path) -> GGUFModel:
    """The config and tensor table of a GGUF file; ModelError for anything vsc cannot serve."""
    path = Path(path)
    check_gguf_magic(path)
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways inside gguf
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(path, f"cannot read the GGUF: {first}") from None
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHES:
        raise ModelError(path, f"unsupported GGUF architecture {arch!r} (supported: {', '.join(sorted(GGUF_ARCHES))})")
    tensors = {t.name: GGUFTensor(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())))
               for t in reader.tensors}

    def need(key: str):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ModelError(path, f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = hidden // heads
    rope_dims = _field(reader, f"{arch}.rope.dimension_count", head_dim)
    if int(rope_dims) != head_dim:
        raise ModelError(path, "partial rotary embeddings are not supported")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ModelError(path, f"unsupported RoPE scaling {scaling!r} (only default RoPE is implemented)")
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise ModelError(path, "GGUF lacks tensor 'token_embd.weight'")
    eps = float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6))
    config = {
        "model_type": GGUF_ARCHES[arch],
        "_gguf_arch": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(f"{eps:.7g}"),             # stored as float32: 1e-5 reads 9.9999997e-06
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "vocab_size": embed.shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    return GGUFModel(path, config, tensors)
