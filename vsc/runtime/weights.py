"""Materialize a plan's weight table from a Hugging Face model folder's safetensors.

A generated runner carries its plan's weights as a tuple of `WeightSpec`s: each is
either `load`ed from a checkpoint tensor, or derived once, at load time, from other
entries or from its attributes (`DERIVED_INITS`: `concat` from the fusion passes,
`rope_cos`/`rope_sin` from fold-rope-tables, `quantize_int8`/`int8_scales` from
weight-int8). Names may contain `{i}` (layer index) and
`{e}` (expert index). `load_weights` returns the entries the step's ops read (`keep`),
with `{i}` expanded (one tensor per layer) and `{e}` stacked (one [experts, ...] tensor
per layer, under the name that still says `{e}`); entries only feeding a derived weight
are dropped once used. Checkpoint tensors are cast to the plan's dtype.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from vsc.errors import ModelError
from vsc.runtime import quant
from vsc.runtime.kernels.torch_ops import rope_cos_sin
from vsc.runtime.quant_formats import is_gguf_path
from vsc.runtime.quant_tensor import QuantTensor, unpermute_rope_rows

TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "i8": torch.int8}

LAYER, EXPERT = "{i}", "{e}"


@dataclass(frozen=True)
class WeightSpec:
    """One entry of a plan's weight table (a `weight` line of the IR, without the `@`).

    init "load": args = (checkpoint tensor name,); init "concat": args = names of other
    entries, joined along attrs["axis"]; the other `DERIVED_INITS` likewise take other
    entries (or none: `rope_cos`) and attrs. keep: an op of the step reads it.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    init: str = "load"
    args: tuple[str, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)
    keep: bool = True


def expand(name: str, layer: int | None = None, expert: int | None = None) -> str:
    """`name` with `{i}` / `{e}` replaced by the given indices (left alone when None)."""
    if layer is not None:
        name = name.replace(LAYER, str(layer))
    if expert is not None:
        name = name.replace(EXPERT, str(expert))
    return name


def _safe_open(path: Path):
    """safetensors' reader of `path`; a file it cannot parse is a ModelError naming it."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - SafetensorError and OSError alike: the file is damaged
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(path, f"cannot read the safetensors file: {first}") from None


class Checkpoint:
    """The safetensors files of a model folder: one `model.safetensors`, or shards listed in
    `model.safetensors.index.json` (or, lacking an index, every `*.safetensors` file)."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ModelError(self.model_dir, "model folder does not exist")
        self.files: dict[str, Path] = {}      # tensor name -> file holding it
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ModelError(index, f"not a safetensors index ({e})") from None
            self.files = {name: self.model_dir / file for name, file in weight_map.items()}
        else:
            paths = sorted(self.model_dir.glob("*.safetensors"))
            if not paths:
                raise ModelError(self.model_dir, "model folder has no *.safetensors weights")
            for path in paths:
                with _safe_open(path) as f:
                    for name in f.keys():
                        self.files[name] = path
        self._open: dict[Path, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        path = self.files.get(name)
        if path is None:
            raise ModelError(self.model_dir, f"checkpoint has no tensor '{name}'")
        handle = self._open.get(path)
        if handle is None:
            if not path.is_file():
                raise ModelError(path, f"weight shard is missing (it should hold '{name}')")
            handle = self._open[path] = _safe_open(path)
        return handle.get_tensor(name)

    def get_as(self, name: str, dtype: str) -> torch.Tensor:
        if dtype in quant.FORMATS:
            raise ModelError(self.model_dir, f"tensor '{name}' is a float safetensors tensor, the plan loads it as "
                                             f"{dtype} (quantized weights come from a GGUF file or quantize-weights)")
        return self.get(name)

    def close(self) -> None:
        self._open.clear()


class GGUFCheckpoint:
    """The tensors of a GGUF file, read through a memory map (`gguf.GGUFReader`).

    A tensor the plan declares in a block-quantized dtype (q8_0, q4_0, q4_1) must be stored
    in that format, and comes back as a `QuantTensor` holding the same blocks (rearranged
    into the planar parts the kernels read; nothing is re-quantized). A float declaration
    takes an F32/F16/BF16 tensor as it is, or dequantizes a quantized one (an explicit fp32
    plan of a GGUF). Anything else (K-quants, ...) is refused, naming the tensor.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(self.path, "GGUF file not found")
        from gguf import GGUFReader

        try:
            self.reader = GGUFReader(str(self.path))
        except Exception as e:  # noqa: BLE001 - gguf fails on a bad file in many ways; each is a bad file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelError(self.path, f"cannot read the GGUF: {first}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get_as(self, name: str, dtype: str):
        t = self.tensors.get(name)
        if t is None:
            raise ModelError(self.path, f"GGUF has no tensor '{name}'")
        stored = t.tensor_type.name.lower()
        if dtype in quant.FORMATS:
            if stored != dtype:
                raise ModelError(self.path, f"tensor '{name}' is stored as {t.tensor_type.name}; the plan reads it "
                                            f"as {dtype} (vsc serves blocks as shipped and never re-quantizes them)")
            return QuantTensor.from_parts(quant.from_gguf_blocks(np.asarray(t.data), dtype), dtype)
        if stored in quant.FORMATS:
            raw = quant.from_gguf_blocks(np.asarray(t.data), stored)
            return quant.dequantize(raw, stored)
        if stored not in ("f32", "f16", "bf16"):
            raise ModelError(self.path, f"tensor '{name}' is stored as {t.tensor_type.name}, which vsc cannot read "
                                        f"(it serves F32, F16, BF16, {', '.join(f.upper() for f in quant.FORMATS)})")
        data = np.asarray(t.data)
        if stored == "bf16":
            return torch.from_numpy(data.copy().view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(data.copy())

    def close(self) -> None:
        self.tensors.clear()
        self.reader = None


def open_checkpoint(model_path: str | Path):
    """The checkpoint behind a plan's model path: a GGUF file, or an HF folder's safetensors."""
    return GGUFCheckpoint(model_path) if is_gguf_path(model_path) else Checkpoint(model_path)


def quantize_int8_groups(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of a [out, in] weight per group of `group` input columns (0: a whole
    row): (int8 values [out, in], fp32 scales [out, in / group]) with scale = amax|w| / 127
    and values = round(w / scale), so |w - values * scale| <= scale / 2. An all-zero group
    gets scale 0 and values 0."""
    out_features, in_features = weight.shape
    size = group or in_features
    w = weight.to(torch.float32).reshape(out_features, in_features // size, size)
    scales = w.abs().amax(dim=-1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(w / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return values.reshape(out_features, in_features), scales


def _rope_table(index: int):
    def make(parts: list[torch.Tensor], attrs: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
        return rope_cos_sin(torch.arange(shape[0]), float(attrs["theta"]), int(attrs["head_dim"]))[index]
    return make


def _quantized(index: int):
    def make(parts: list[torch.Tensor], attrs: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
        return quantize_int8_groups(parts[0], int(attrs.get("group", 0)))[index]
    return make


def _concat(parts: list, attrs: dict[str, Any], shape: tuple[int, ...]):
    if any(isinstance(p, QuantTensor) for p in parts):
        if attrs.get("axis", 0) != 0:
            raise ValueError("block-quantized weights concatenate along rows (axis 0) only")
        return QuantTensor.concat(parts)
    return torch.cat(parts, dim=attrs.get("axis", 0))


# Derived inits: (argument tensors, attrs, declared shape) -> the tensor (cast to the
# entry's dtype afterwards). Typing rules: vsc/ir/weight_inits.py.
DERIVED_INITS: dict[str, Any] = {
    "concat": _concat,
    # quantize-weights: llama.cpp's block formats made from a float weight
    "quantize": lambda parts, attrs, shape: QuantTensor.quantize(parts[0], str(attrs["format"])),
    "rope_cos": _rope_table(0),
    "rope_sin": _rope_table(1),
    "quantize_int8": _quantized(0),
    "int8_scales": _quantized(1),
    # pack-linear-weights: oneDNN's blocked layout (an opaque mkldnn tensor of the same shape)
    # (stored in the weight's own dtype, or the narrower `dtype` attr: bf16 of an f32 weight)
    "onednn_pack": lambda parts, attrs, shape: torch.ops.mkldnn._reorder_linear_weight(
        parts[0].to(TORCH_DTYPES[attrs.get("dtype", _float_name(parts[0].dtype))]).contiguous(), int(attrs["batch"])),
}


def _float_name(dtype: torch.dtype) -> str:
    return next(name for name, t in TORCH_DTYPES.items() if t == dtype)


def _rows(tensor, index: torch.Tensor):
    return tensor.rows(index) if isinstance(tensor, QuantTensor) else tensor.index_select(0, index).contiguous()


def load_weights(model_dir: str | Path, specs: tuple[WeightSpec, ...] | list[WeightSpec], layers: int,
                 experts: int = 0, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The kept weights of `specs`, by expanded name, cast to each spec's dtype, on `device`."""
    by_name = {s.name: s for s in specs}
    checkpoint = open_checkpoint(model_dir)
    made: dict[str, torch.Tensor] = {}         # fully expanded name -> tensor (sources cached too)

    def materialize(spec: WeightSpec, layer: int | None, expert: int | None) -> torch.Tensor:
        key = expand(spec.name, layer, expert)
        if key in made:
            return made[key]
        if spec.init == "load":
            tensor = checkpoint.get_as(expand(spec.args[0], layer, expert), spec.dtype)
            heads = spec.attrs.get("unpermute_heads")
            if heads:      # a GGUF's q/k rows, back in HF order
                tensor = _rows(tensor, unpermute_rope_rows(tensor.shape[0], int(heads)))
        elif spec.init in DERIVED_INITS:
            parts = []
            for arg in spec.args:
                source = by_name.get(arg)
                if source is None:
                    raise ModelError(model_dir, f"weight '{spec.name}' is derived from '{arg}', which the table lacks")
                parts.append(materialize(source, layer, expert))
            tensor = DERIVED_INITS[spec.init](parts, spec.attrs, spec.shape)
        else:
            raise ModelError(model_dir, f"weight '{spec.name}': unknown init '{spec.init}'")
        if isinstance(tensor, QuantTensor):
            if tensor.fmt != spec.dtype:
                raise ModelError(model_dir, f"tensor '{key}' is {tensor.fmt}, the plan expects {spec.dtype}")
            tensor = tensor.to(device)
        elif not tensor.is_mkldnn:     # (a oneDNN-packed weight keeps the dtype it was packed in)
            tensor = tensor.to(dtype=TORCH_DTYPES[spec.dtype], device=device)
        if tuple(tensor.shape) != tuple(spec.shape):
            raise ModelError(model_dir, f"tensor '{key}' has shape {list(tensor.shape)}, the plan expects {list(spec.shape)}")
        made[key] = tensor
        return tensor

    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        if not spec.keep:
            continue
        layer_range = range(layers) if LAYER in spec.name else [None]
        for layer in layer_range:
            key = expand(spec.name, layer)
            if EXPERT in spec.name:
                out[key] = torch.stack([materialize(spec, layer, e) for e in range(experts)])
                for e in range(experts):                  # the stack holds them now
                    made.pop(expand(key, expert=e), None)
            else:
                out[key] = materialize(spec, layer, None)
    checkpoint.close()
    return out
