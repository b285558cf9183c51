"""Lower a ServingModule's model graph to Python source that implements the ModelRunner protocol.

`generate_runner_source(module)` writes one self-contained module specialized to the plan:
the model's sizes, the cache geometry and the chosen kernels are constants; the weight
table is literal data (`WeightSpec`s, `concat`s included); the step function is straight
line code, one line per IR op, named after the IR's SSA values, calling the kernels of
`vsc.runtime.kernels.torch_ops` directly. The decoder layer (the IR's `repeat` region)
becomes a Python loop over per-layer weight tuples and KV caches.

Loop or unrolled? Measured on the tiny llama (4 layers, hidden 128, vocab 2048; fp32, one
thread, the chat.vs pipeline: fused q/k/v and gate/up, paged cache), one decode step at
context 64, median of 400 steps, best of 3 runs:

    batch 1:  0.401 ms looped, 0.403 ms unrolled
    batch 16: 1.077 ms looped, 1.108 ms unrolled

(contiguous cache, no fusion: 0.399 / 0.400 ms and 1.089 / 1.099 ms). A four-iteration
Python loop costs about a microsecond, noise next to the kernels, so the loop is kept: the
source stays one screen long whatever the depth. `unroll=True` still writes the unrolled
form, for comparison.

Position-only work is hoisted out of the loop where the IR says so: the attention metadata
(cache slots, masks) is built once per step and shared by layers; RoPE follows the plan: a
plain `rope` op computes its cos/sin from the positions inside the op, every layer, while
after `fold-rope-tables` the tables are weights (`rope_cos()` / `rope_sin()` inits) and
one `rope_lookup` before the loop feeds every layer's `rope_rotate`. Derived weights
(`concat`, `rope_cos`, `quantize_int8`, ...) are built by `vsc.runtime.weights` at load.
The `sample` op is not lowered: runners return logits and the engine's sampler picks.

CUDA plans (`target cuda`): ops whose kernel is `triton.*` call the launch wrappers of
`vsc.runtime.kernels.triton_ops`, imported under `triton_` names (`triton_rmsnorm`, ...), as
docs/triton-kernels.md wires them; everything else stays on `torch_ops`, and the runner's
default device is "cuda". Where a Triton kernel does not cover a case, the runner falls back:

- `attention` on `triton.paged_attention` runs the Triton cache-write + paged decode
  kernels in decode steps only; prefill and mixed steps call `torch_ops.paged_attention`.
- `rope` on `triton.rope` computes the cos/sin rows of the step's positions
  (`rope_cos_sin`) and rotates q and k in place; `rope_rotate` on `triton.rope` rotates
  by the rows its operands name (the hoisted `rope_lookup`). In place is safe
  only when nothing else reads q, k or the tensor they are views of, and those buffers
  were made in the same op list (a loop would otherwise rotate them again next
  iteration); otherwise q and k are cloned first.
- `add_rmsnorm` on `triton.rmsnorm` is the out-of-place `add_rmsnorm`, or, when `b` is
  such a dead, owned buffer, `rmsnorm(a, w, eps, residual=b)`, which writes the sum over
  `b` (one allocation fewer, same bytes).

A kernel's config (`via triton.rmsnorm{BLOCK_N = 4096}`) becomes the wrapper's `config=`.
This module never imports triton; the generated file does, through `triton_ops`. CPU plans
generate exactly what they did before the Triton wiring.

`load_runner_class(source, module_name)` execs generated source into a fresh module and
returns its `Runner` (the accuracy check and tests use it; a server imports its file).
"""
from __future__ import annotations

import hashlib
import keyword
import linecache
import re
import sys
import types

from vsc.errors import VscError
from vsc.ir.kernels import KERNELS
from vsc.ir.module import Op, ServingModule, is_value, walk_ops
from vsc.ir.printer import print_module
from vsc.ir.rewrite import users
from vsc.ir.types import QUANT_DTYPES, Origin
from vsc.runtime.enums import KV_CACHE_LAYOUTS
from vsc.runtime.kernel_registry import KERNELS as DECLARED_KERNELS
from vsc.runtime.kernel_registry import backend_kernels
from vsc.runtime.kernels import TORCH_KERNELS
from vsc.runtime.weights import DERIVED_INITS

__all__ = ["LoweringError", "generate_runner_source", "load_runner_class"]


class LoweringError(VscError):
    """The torch backend cannot lower something in the plan (an op, a kernel, a weight init)."""

    def __init__(self, message: str, origin: Origin | None = None):
        where = f" ({origin.describe()})" if origin is not None and origin.kind != "unknown" else ""
        super().__init__(f"lower torch: error: {message}{where}")
        self.message = message
        self.origin = origin


# Op kinds the runner executes (some declared kernel has a function for them), and those it
# leaves to the engine (their kernels have none). The kernel tables below are all derived from
# the declarations of vsc.runtime.kernel_registry.
_LOWERED_OPS = {op for k in DECLARED_KERNELS.values() if k.functions is not None for op in k.ops}
_ENGINE_OPS = {op for k in DECLARED_KERNELS.values() if k.functions is None for op in k.ops}

# Op attributes that become named plan constants when they equal the model's value.
_ATTR_CONSTANTS = {
    ("rmsnorm", "eps"): "RMS_NORM_EPS",
    ("rope", "head_dim"): "HEAD_DIM",
    ("rope", "theta"): "ROPE_THETA",
    ("rope_rotate", "head_dim"): "HEAD_DIM",
    ("attention", "heads"): "HEADS",
    ("attention", "kv_heads"): "KV_HEADS",
    ("attention", "head_dim"): "HEAD_DIM",
    ("attention", "scale"): "ATTN_SCALE",
    ("moe", "experts"): "EXPERTS",
    ("moe", "top_k"): "TOP_K",
}

_BATCH_FIELDS = {"%tokens": "batch.tokens", "%positions": "batch.positions"}

_TORCH_DTYPES = {"f32": "torch.float32", "bf16": "torch.bfloat16", "f16": "torch.float16"}
# Weight element types the runner loads: the float dtypes, int8 (weight-int8's values), and
# the block-quantized formats (QuantTensors: GGUF blocks as shipped, or quantize-weights').
_WEIGHT_DTYPES = {**_TORCH_DTYPES, "i8": "torch.int8", **{q: "QuantTensor" for q in QUANT_DTYPES}}

# TVM kernels of the catalog a cpu runner calls: (IR kernel, op kind) -> function of
# vsc.runtime.kernels.tvm_ops (imported as tvm_<name>); the library is built by vsc compile.
_TVM_FUNCTIONS = {(k.name, op): fn for k in backend_kernels("tvm") for op, fn in k.functions.items()}
_TVM_KERNELS = frozenset(name for name, _ in _TVM_FUNCTIONS)
# The config each takes (`via tvm.quant_linear{activations = "q8_0"}`): key -> allowed values.
_TVM_CONFIG = {k.name: dict(k.config) for k in backend_kernels("tvm") if k.config}

# Names the generated module defines or uses itself; SSA locals and weights avoid them.
_RESERVED = set(keyword.kwlist) | {
    "torch", "self", "batch", "meta", "layer", "layer_weights", "k_cache", "v_cache", "w", "i", "name",
    "rope_cos_sin", "tuple", "range", "zip", "len", "list", "int", "str", "float", "print",
    "Runner", "WEIGHTS", "LAYER_WEIGHTS", "StepBatch", "CacheConfig", "WeightSpec", "load_weights",
    "AttentionMetadata", "RotaryTable", "attention_metadata", "allocate_kv_cache",
    "load_plan_kernels", "TVM_KERNELS",
} | {"tvm_" + fn for fn in _TVM_FUNCTIONS.values()} | {fn.__name__ for fn in TORCH_KERNELS.values()}

# Triton kernels of the catalog a cuda runner calls: (IR kernel, op kind) -> wrapper of
# vsc.runtime.kernels.triton_ops. Named here, not imported: codegen never imports triton.
_TRITON_WRAPPERS = {(k.name, op): fn for k in backend_kernels("triton") for op, fn in k.functions.items()}
# The torch_ops function a Triton kernel falls back to (steps the kernel does not cover).
_TRITON_FALLBACKS = {k.name: k.fallback for k in backend_kernels("triton") if k.fallback}
# Names the wrappers are imported under in a cuda runner (`triton_rmsnorm`, ...).
_TRITON_NAMES = {"triton_" + fn for fn in _TRITON_WRAPPERS.values()}
# Op kinds whose torch and Triton implementations return a fresh tensor that the step owns
# alone (no view of an operand or a weight): what an in-place kernel may overwrite.
_FRESH_RESULTS = {"embed", "linear", "add", "mul", "silu", "silu_mul", "moe"}

# Attributes of Runner that top-level weights must not shadow.
_RUNNER_ATTRS = {"device", "cache_config", "vocab_size", "kv_cache", "layers", "rope", "prefill", "decode",
                 "create_kv_cache", "forward"}

# KV cache element types the runner allocates: the float dtypes, and int8 (kv-int8), which
# allocate_kv_cache turns into QuantizedKV pairs (int8 values + fp32 per-token-head scales).
_CACHE_TORCH_DTYPES = {**_TORCH_DTYPES, "i8": "torch.int8"}


def _identifier(text: str) -> str:
    name = re.sub(r"\W", "_", text.lstrip("%@"), flags=re.ASCII)
    if not name or name[0].isdigit():
        name = "v_" + name
    return name


def _plan_hash(module: ServingModule) -> str:
    return hashlib.sha256(print_module(module).encode()).hexdigest()


def _describe(op: Op) -> str:
    results = ", ".join(op.results)
    return f"{results} = {op.kind}" if results else op.kind


class _RunnerWriter:
    """Builds the runner source for one module; every check happens before any text is written."""

    def __init__(self, module: ServingModule, pipeline: str | None, unroll: bool):
        self.module = module
        self.cuda = module.target.kind == "cuda"
        self.reserved = _RESERVED | _TRITON_NAMES if self.cuda else _RESERVED
        self.model = module.model
        self.attrs = module.model.attrs
        self.unroll = unroll
        self.pipeline = pipeline if pipeline is not None else (module.deployment.get("optimize") or {}).get("pipeline", "")
        self.body = module.model.func.body
        self.repeat = self._find_repeat()
        self.attention = self._find_attention()
        self._check_ops()
        self.weights = {w.name: w for w in self.model.weights}
        self._check_weights()
        self.locals = self._name_values()
        self.layer_weights, self.top_weights = self._name_weights()
        self.constants = self._constants()
        self.uses = users(self.body, self.model.func.returns)
        self.producers = self._producers()
        self.triton_calls: set[str] = set()      # triton_ops wrappers the step calls (noted while writing it)

    # --- checks --------------------------------------------------------------------------

    def _find_repeat(self) -> Op | None:
        repeats = [op for op in self.body if op.kind == "repeat"]
        if len(repeats) > 1:
            raise LoweringError("the step has more than one repeat region; the torch backend lowers one decoder stack",
                                repeats[1].origin)
        nested = [op for op in walk_ops(self.body) if op.kind == "repeat" and op not in repeats]
        if nested:
            raise LoweringError("nested repeat regions are not supported", nested[0].origin)
        return repeats[0] if repeats else None

    def _find_attention(self) -> Op | None:
        top = [op for op in self.body if op.kind == "attention"]
        if top:
            raise LoweringError(f"'{_describe(top[0])}' sits outside the layer region; the torch backend keeps one "
                                "KV cache per layer and needs attention inside the repeat", top[0].origin)
        if self.repeat is None:
            return None
        found = [op for op in self.repeat.region.ops if op.kind == "attention"]
        if len(found) > 1:
            raise LoweringError("a layer with more than one attention op is not supported (one KV cache per layer)",
                                found[1].origin)
        return found[0] if found else None

    def _check_ops(self) -> None:
        for op in walk_ops(self.body):
            if op.kind == "repeat":
                continue
            if op.kind not in _LOWERED_OPS | _ENGINE_OPS:
                raise LoweringError(f"op '{op.kind}' ({_describe(op)}) has no torch lowering", op.origin)
            if op.kernel is None:
                raise LoweringError(f"'{_describe(op)}' names no kernel", op.origin)
            name = op.kernel.name
            info = KERNELS.get(name)
            if info is None or op.kind not in info.ops:
                raise LoweringError(f"kernel '{name}' does not implement '{op.kind}' ({_describe(op)})", op.origin)
            if op.kind in _ENGINE_OPS:
                continue
            if name.startswith("triton.") and self.cuda:
                self._check_triton(op)
                continue
            if name in _TVM_KERNELS:
                if self.module.target.kind != "cpu":
                    raise LoweringError(f"kernel '{name}' runs on cpu targets only", op.origin)
                allowed = _TVM_CONFIG.get(name, {})
                for key, value in op.kernel.config.items():
                    if key not in allowed or value not in allowed[key]:
                        raise LoweringError(f"kernel '{name}' does not take {key} = {value!r} "
                                            f"(it takes: {allowed or 'no config'})", op.origin)
                continue
            if name not in TORCH_KERNELS:
                known = ", ".join(sorted(TORCH_KERNELS))
                hint = "; triton.* kernels run on cuda targets only" if name.startswith("triton.") else ""
                raise LoweringError(f"kernel '{name}' for '{_describe(op)}' has no torch implementation "
                                    f"(the torch backend runs: {known}){hint}", op.origin)
            if op.kernel.config:
                raise LoweringError(f"kernel '{name}' takes no config, got {op.kernel.config!r}", op.origin)
            if op.kind == "rope" and op.operands[2] != "%positions":
                raise LoweringError(f"'{_describe(op)}' rotates by {op.operands[2]}; the torch backend rotates by "
                                    "the step's %positions only", op.origin)
        for param, _ in self.model.func.params:
            if param not in _BATCH_FIELDS:
                raise LoweringError(f"step parameter {param} has no StepBatch field (known: {', '.join(_BATCH_FIELDS)})",
                                    self.model.origin)
        sampled = {r for op in walk_ops(self.body) if op.kind in _ENGINE_OPS for r in op.results}
        for op in walk_ops(self.body):
            used = sampled.intersection(op.operands)
            if used and op.kind not in _ENGINE_OPS:
                raise LoweringError(f"'{_describe(op)}' reads the sampled token {used.pop()}; sampling happens in the "
                                    "engine, after the step", op.origin)
        returns = self.model.func.returns
        if not returns or returns[0] in sampled:
            raise LoweringError("the step must return logits first")

    def _check_triton(self, op: Op) -> None:
        name = op.kernel.name
        if (name, op.kind) not in _TRITON_WRAPPERS:
            known = ", ".join(sorted({k for k, _ in _TRITON_WRAPPERS}))
            raise LoweringError(f"kernel '{name}' for '{_describe(op)}' has no Triton wrapper in the runtime "
                                f"(known: {known})", op.origin)
        if op.kind == "rope" and op.operands[2] != "%positions":
            raise LoweringError(f"'{_describe(op)}' rotates by {op.operands[2]}; the runner rotates by "
                                "the step's %positions only", op.origin)
        if op.kind == "attention" and self.module.cache.layout != "paged":
            raise LoweringError(f"kernel '{name}' reads a paged KV cache; this plan's cache is "
                                f"{self.module.cache.layout}", op.origin)

    def _check_weights(self) -> None:
        for w in self.model.weights:
            if w.init_fn == "load":
                if len(w.init_args) != 1:
                    raise LoweringError(f"weight {w.name}: load takes one checkpoint name", w.origin)
            elif w.init_fn in DERIVED_INITS:
                missing = [a for a in w.init_args if a not in self.weights]
                if missing:
                    raise LoweringError(f"weight {w.name} is derived from undeclared {missing[0]}", w.origin)
            else:
                raise LoweringError(f"weight {w.name}: the torch backend cannot materialize '{w.init_fn}' "
                                    f"(it knows load, {', '.join(sorted(DERIVED_INITS))})", w.origin)
            if w.type.dtype not in _WEIGHT_DTYPES:
                raise LoweringError(f"weight {w.name} has dtype {w.type.dtype}, which the torch runner does not load",
                                    w.origin)

    # --- naming --------------------------------------------------------------------------

    def _name_values(self) -> dict[str, str]:
        """SSA value -> Python local, the same name minus `%` wherever that is a free identifier."""
        taken = set(self.reserved)
        out: dict[str, str] = {}

        def give(value: str) -> None:
            if value in out:
                return
            base = _identifier(value)
            if base in self.reserved:
                base += "_"
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base}{n}"
            taken.add(name)
            out[value] = name

        for param, _ in self.model.func.params:
            give(param)
        for op in walk_ops(self.body):
            if op.region is not None:
                for arg, _ in op.region.args:
                    give(arg)
            for r in op.results:
                give(r)
        return out

    def _name_weights(self) -> tuple[list[tuple[str, str]], dict[str, str]]:
        """(layer weight, local name) in loop order, and top-level weight -> Runner attribute."""
        read_in_layer: list[str] = []
        if self.repeat is not None:
            for op in walk_ops(self.repeat.region.ops):
                for o in op.operands:
                    if o.startswith("@") and "{i}" in o and o not in read_in_layer:
                        read_in_layer.append(o)
        read_top = []
        for op in walk_ops(self.body):
            for o in op.operands:
                if o.startswith("@") and "{i}" not in o and o not in read_top:
                    read_top.append(o)
        for o in read_in_layer + read_top:
            if o not in self.weights:
                raise LoweringError(f"weight {o} is read but not declared")
        layer_names = self._short_names(read_in_layer, set(self.locals.values()) | self.reserved)
        top_names = self._short_names(read_top, _RUNNER_ATTRS)
        return [(w, layer_names[w]) for w in read_in_layer], top_names

    @staticmethod
    def _short_names(weights: list[str], avoid: set[str]) -> dict[str, str]:
        """`@model.layers.{i}.self_attn.qkv_proj.weight` -> `qkv_proj`; more of the name when needed."""
        def parts_of(name: str) -> tuple[list[str], int]:
            parts = name.lstrip("@").split(".")
            expert = "{e}" in parts
            suffix = []
            if parts and parts[-1] in ("bias", "scales"):
                suffix = [parts[-1]]
            parts = [p for p in parts[:-1 if parts[-1] in ("weight", "bias", "scales") else None]
                     if p not in ("{i}", "{e}", "model", "layers")]
            return parts + suffix, (3 if suffix else 2) if expert else (2 if suffix else 1)

        out: dict[str, str] = {}
        taken = set(avoid)
        for w in weights:
            parts, k = parts_of(w)
            name = None
            while k <= len(parts):
                candidate = _identifier("_".join(parts[-k:]))
                if candidate not in taken and not keyword.iskeyword(candidate):
                    name = candidate
                    break
                k += 1
            if name is None:
                name = _identifier(w)
                while name in taken:
                    name += "_"
            taken.add(name)
            out[w] = name
        return out

    # --- plan constants ------------------------------------------------------------------

    def _constants(self) -> dict[str, object]:
        a, cache = self.attrs, self.module.cache
        max_context = int(self.module.deployment.get("max_context") or a.get("max_position", 2048))
        if cache.layout in KV_CACHE_LAYOUTS:
            block_size = cache.block_size  # contiguous: max_context, one block per batch slot
        else:
            raise LoweringError(f"cache layout '{cache.layout}' has no torch lowering", cache.origin)
        if cache.dtype not in _CACHE_TORCH_DTYPES:
            raise LoweringError(f"cache dtype '{cache.dtype}' has no torch lowering", cache.origin)
        num_blocks = cache.capacity_tokens // block_size
        if num_blocks < 1:
            raise LoweringError(f"a cache of {cache.capacity_tokens} tokens holds no {block_size}-token block", cache.origin)
        c: dict[str, object] = {
            "LAYERS": self.repeat.attrs["count"] if self.repeat is not None else 0,
            "VOCAB": a["vocab"],
            "HIDDEN": a["hidden"],
            "HEADS": a["heads"],
            "KV_HEADS": a["kv_heads"],
            "HEAD_DIM": a["head_dim"],
        }
        if "experts" in a:
            c["EXPERTS"] = a["experts"]
            c["TOP_K"] = a["experts_per_token"]
        c["RMS_NORM_EPS"] = float(a["rms_norm_eps"])
        c["ROPE_THETA"] = float(a["rope_theta"])
        if self.attention is not None:
            c["ATTN_SCALE"] = float(self.attention.attrs["scale"])
        c["MAX_POSITION"] = max(int(a.get("max_position", 0)), max_context)
        c["MAX_CONTEXT"] = max_context
        c["BLOCK_SIZE"] = block_size
        c["NUM_BLOCKS"] = num_blocks
        if self.attention is not None and self.attention.attrs.get("cascade_min_tokens"):
            c["CASCADE_MIN_TOKENS"] = int(self.attention.attrs["cascade_min_tokens"])
        if any(op.kernel is not None and op.kernel.name in _TVM_KERNELS for op in walk_ops(self.body)):
            from vsc.backends.tvm.plan import plan_tvm_kernels
            built, filename = plan_tvm_kernels(self.module)   # cached on disk; the emitter ships a copy
            c["TVM_KERNELS_FILE"] = filename
            c["TVM_KERNELS_BUILD"] = str(built)
            c["TVM_THREADS"] = int(self.module.target.attrs.get("threads") or 0)    # 0: every core
        if self.module.schedule.attrs.get("graph") == "relax":
            from vsc.backends.tvm.decode_step import build_decode_step
            built, filename = build_decode_step(self.module)   # cached on disk; the emitter ships a copy
            c["DECODE_STEP_FILE"] = filename
            c["DECODE_STEP_BUILD"] = str(built)
            c["STEP_MAX_BATCH"] = int(self.module.batching.max_batch or 1)   # its memory is planned for this many rows
        return c

    def _attr(self, op: Op, key: str) -> str:
        value = op.attrs[key]
        const = _ATTR_CONSTANTS.get((op.kind, key))
        if const is not None and const in self.constants and self.constants[const] == value:
            return const
        return repr(value)

    # --- ops -----------------------------------------------------------------------------

    @staticmethod
    def _is_triton(op: Op) -> bool:
        return op.kernel is not None and op.kernel.name.startswith("triton.")

    def _producers(self) -> dict[str, tuple[Op, list[Op]]]:
        """SSA value -> (the op that defines it, the op list that op sits in)."""
        out: dict[str, tuple[Op, list[Op]]] = {}

        def visit(ops: list[Op]) -> None:
            for op in ops:
                for r in op.results:
                    out[r] = (op, ops)
                if op.region is not None:
                    visit(op.region.ops)
        visit(self.body)
        return out

    def _owned(self, value: str, op: Op, ops: list[Op]) -> bool:
        """May `op` (in `ops`) overwrite `value`'s memory? Only when `op` is its one reader
        (no other op, yield or return reads it), it was made in the same op list (so a loop
        does not overwrite it again on a later iteration), and its memory is nobody else's:
        the fresh result of an op, or a split piece of such a result that only the split reads."""
        readers = self.uses.get(value, [])
        if not is_value(value) or len(readers) != 1 or readers[0] is not op:
            return False
        made = self.producers.get(value)
        if made is None or made[1] is not ops:
            return False
        producer = made[0]
        if producer.kind in _FRESH_RESULTS:
            return True
        if producer.kind == "split":
            return self._owned(producer.operands[0], producer, ops)
        return False

    def _op_lines(self, op: Op, in_layer: bool, ops: list[Op]) -> list[str]:
        """The lines that run `op` (indented relative to the step), none for engine ops."""
        if not self._is_triton(op):
            line = self._op_line(op, in_layer)
            return [] if line is None else [line]
        lines = self._triton_lines(op, in_layer, ops)
        for line in lines:
            self.triton_calls.update(re.findall(r"\btriton_(\w+)\(", line))
        return lines

    def _triton_lines(self, op: Op, in_layer: bool, ops: list[Op]) -> list[str]:
        wrapper = "triton_" + _TRITON_WRAPPERS[(op.kernel.name, op.kind)]
        args = [self._operand(o, in_layer) for o in op.operands]
        results = [self.locals[r] for r in op.results]
        config = [f"config={dict(op.kernel.config)!r}"] if op.kernel.config else []
        if op.kind in ("rmsnorm", "add_rmsnorm"):
            eps = "RMS_NORM_EPS" if op.attrs["eps"] == self.constants["RMS_NORM_EPS"] else repr(op.attrs["eps"])
        if op.kind == "rmsnorm":
            call = [*args, eps, *config]
            return [f"{results[0]} = {wrapper}({', '.join(call)})"]
        if op.kind == "add_rmsnorm":
            a, b, w = args
            if op.operands[0] != op.operands[1] and self._owned(op.operands[1], op, ops):
                call = [a, w, eps, f"residual={b}", *config]
                return [f"{results[0]}, {results[1]} = triton_rmsnorm({', '.join(call)}), {b}"
                        f"  # the sum overwrites {b}, unread from here on"]
            call = [a, b, w, eps, *config]
            return [f"{', '.join(results)} = {wrapper}({', '.join(call)})"]
        if op.kind == "silu_mul":
            return [f"{results[0]} = {wrapper}({', '.join([*args, *config])})"]
        if op.kind in ("rope", "rope_rotate"):
            q, k = args[:2]
            if op.kind == "rope":   # cos/sin rows of the step's positions, computed here (no folded table)
                rows = [f"*rope_cos_sin({args[2]}, {self._attr(op, 'theta')}, {self._attr(op, 'head_dim')}, {q}.dtype)"]
            else:
                rows = args[2:]
            in_place = op.operands[0] != op.operands[1] and all(self._owned(v, op, ops) for v in op.operands[:2])
            if not in_place:
                q, k = f"{q}.clone()", f"{k}.clone()"
            call = [q, k, *rows, self._attr(op, "head_dim"), *config]
            note = "in place" if in_place else "on copies: q or k is read elsewhere"
            return [f"{', '.join(results)} = {wrapper}({', '.join(call)})  # {note}"]
        if op.kind == "attention":
            shape = [self._attr(op, key) for key in ("heads", "kv_heads", "head_dim", "scale")]
            fast = [*args, "k_cache", "v_cache", "batch.slot_mapping", "batch.block_tables", "batch.context_lens",
                    *shape, "BLOCK_SIZE", *config]
            slow = [*args, "k_cache", "v_cache", "meta", *shape]
            return [
                "if meta.is_decode:",
                f"    {results[0]} = {wrapper}({', '.join(fast)})",
                "else:  # prefill / mixed step: no Triton kernel yet",
                f"    {results[0]} = {_TRITON_FALLBACKS[op.kernel.name]}({', '.join(slow)})",
            ]
        raise LoweringError(f"no Triton lowering for '{_describe(op)}'", op.origin)

    def _operand(self, operand: str, in_layer: bool) -> str:
        if is_value(operand):
            return self.locals[operand]
        if in_layer and "{i}" in operand:
            return dict(self.layer_weights)[operand]
        return "self." + self.top_weights[operand]

    def _attention_args(self, op: Op) -> list[str]:
        """What an attention kernel takes after q, k, v: the layer's caches, the step's metadata, its shape."""
        return ["k_cache", "v_cache", "meta"] + [self._attr(op, k) for k in ("heads", "kv_heads", "head_dim", "scale")]

    def _op_line(self, op: Op, in_layer: bool) -> str | None:
        if op.kind in _ENGINE_OPS:
            return None
        args = [self._operand(o, in_layer) for o in op.operands]
        if op.kernel.name in _TVM_KERNELS:
            results = ", ".join(self.locals[r] for r in op.results)
            fn = _TVM_FUNCTIONS[op.kernel.name, op.kind]
            if op.kind in ("rmsnorm", "add_rmsnorm"):
                args.append(self._attr(op, "eps"))
            elif op.kind == "attention":
                args += self._attention_args(op)
            args += [f"{key}={value!r}" for key, value in sorted(op.kernel.config.items())]
            return f"{results} = tvm_{fn}(TVM_KERNELS, {', '.join(args)})"
        fn = TORCH_KERNELS[op.kernel.name].__name__
        results = ", ".join(self.locals[r] for r in op.results)
        if op.kind in ("rmsnorm", "add_rmsnorm"):
            args.append(self._attr(op, "eps"))
        elif op.kind == "split":
            args.append("(" + ", ".join(str(s) for s in op.attrs["sizes"]) + ("," if len(op.attrs["sizes"]) == 1 else "") + ")")
        elif op.kind == "rope":
            args += [self._attr(op, "theta"), self._attr(op, "head_dim")]
        elif op.kind == "rope_rotate":
            args.append(self._attr(op, "head_dim"))
        elif op.kind == "attention":
            args += self._attention_args(op)
        elif op.kind == "moe":
            args += [self._attr(op, "experts"), self._attr(op, "top_k")]
        elif op.kind == "embed" and "dtype" in op.attrs:
            args.append(_TORCH_DTYPES[op.attrs["dtype"]])
        elif op.kind == "last_token":
            args.append("meta")       # meta.last_index: each sequence's last row, or batch.logits_rows
        return f"{results} = {fn}({', '.join(args)})"

    # --- source --------------------------------------------------------------------------

    def source(self) -> str:
        runner = self._runner_class()        # first: writing the step notes the Triton wrappers to import
        out: list[str] = []
        out += self._header()
        out += self._constant_lines()
        out += self._weight_table()
        out += runner
        return "\n".join(out) + "\n"

    def _header(self) -> list[str]:
        a, m = self.attrs, self.module
        kernels = sorted({op.kernel.name for op in walk_ops(self.body) if op.kernel is not None and op.kind not in _ENGINE_OPS})
        functions = sorted({TORCH_KERNELS[k].__name__ for k in kernels if k in TORCH_KERNELS and k not in _TVM_KERNELS}
                           | {_TRITON_FALLBACKS[k] for k in kernels if k in _TRITON_FALLBACKS}
                           | ({"rope_cos_sin"} if any(op.kind == "rope" and self._is_triton(op)
                                                      for op in walk_ops(self.body)) else set()))
        cache = m.cache
        blocks = f"{self.constants['NUM_BLOCKS']} x {self.constants['BLOCK_SIZE']}-token blocks"
        return [
            f"# Generated by vsc (torch backend) from plan @{m.name}. Do not edit: recompile the plan instead.",
            f"# pipeline: {self.pipeline or '(none)'}",
            f"# plan sha256: {_plan_hash(m)}",
            f"# model: {self.model.name} ({a.get('arch', '?')}, {a.get('dtype', '?')}); cache: {cache.layout}, {blocks} "
            f"({cache.dtype})",
            f"# kernels: {', '.join(kernels)}",
            f'"""ModelRunner for plan @{m.name}: {self.model.name}, {self.constants["LAYERS"]} layers, {cache.layout} KV cache."""',
            "from __future__ import annotations",
            "",
            "import torch",
            "",
            "from vsc.runtime.api import CacheConfig, StepBatch",
            "from vsc.runtime.kernels.torch_ops import (",
            "    AttentionMetadata, allocate_kv_cache, attention_metadata,",
            *(["    QuantizedKV,"] if cache.dtype == "i8" else []),
            "    " + ", ".join(functions) + ",",
            ")",
            *self._triton_imports(),
            *(["from vsc.runtime.kernels.tvm_ops import load_plan_kernels, "
               + ", ".join(f"{fn} as tvm_{fn}" for fn in self._tvm_functions())]
              if "TVM_KERNELS_FILE" in self.constants else []),
            *(["from vsc.runtime.kernels.tvm_ops import load_decode_step, step_weight_tensors"]
              if "DECODE_STEP_FILE" in self.constants else []),
            "from vsc.runtime.weights import WeightSpec, load_weights",
            "",
        ]

    def _tvm_functions(self) -> list[str]:
        """The tvm_ops wrappers the step calls."""
        return sorted({_TVM_FUNCTIONS[op.kernel.name, op.kind]
                       for op in walk_ops(self.body) if op.kernel is not None and op.kernel.name in _TVM_KERNELS})

    def _triton_imports(self) -> list[str]:
        if not self.triton_calls:
            return []
        names = [f"{name} as triton_{name}" for name in sorted(self.triton_calls)]
        return ["from vsc.runtime.kernels.triton_ops import (  # imports triton",
                "    " + ", ".join(names) + ",",
                ")"]

    def _constant_lines(self) -> list[str]:
        lines = ["# Plan constants: model sizes, numerics and cache geometry."]
        lines += [f"{k} = {v!r}" for k, v in self.constants.items()]
        lines.append(f"DTYPE = {_TORCH_DTYPES[self.attrs.get('dtype', 'f32')]}")
        lines.append(f"CACHE_DTYPE = {_CACHE_TORCH_DTYPES[self.module.cache.dtype]}")
        lines.append(f"CACHE_LAYOUT = {self.module.cache.layout!r}")
        if "TVM_KERNELS_FILE" in self.constants:        # TVM kernels: the server folder's kernels/ copy
            lines.append("TVM_KERNELS = load_plan_kernels(__file__, TVM_KERNELS_FILE, TVM_KERNELS_BUILD, TVM_THREADS)")
        return lines + [""]

    def _weight_table(self) -> list[str]:
        read = {w for w, _ in self.layer_weights} | set(self.top_weights)
        needed: list[str] = []

        def need(name: str) -> None:
            if name in needed:
                return
            w = self.weights[name]
            if w.init_fn != "load":
                for src in w.init_args:
                    need(src)
            needed.append(name)

        for w in self.model.weights:          # declaration order, sources before what they feed
            if w.name in read:
                need(w.name)
        lines = ["# The plan's weight table: checkpoint tensors, and tensors derived from them at load time.",
                 "WEIGHTS = ("]
        for name in needed:
            w = self.weights[name]
            if w.init_fn == "load":
                args = (w.init_args[0],)
            else:
                args = tuple(a.lstrip("@") for a in w.init_args)
            parts = [repr(name.lstrip("@")), repr(w.type.dtype), repr(tuple(w.type.shape))]
            if w.init_fn != "load":
                parts.append(f"init={w.init_fn!r}")
            parts.append(f"args={args!r}")
            if w.init_attrs:
                parts.append(f"attrs={w.init_attrs!r}")
            if name not in read:
                parts.append("keep=False")
            lines.append(f"    WeightSpec({', '.join(parts)}),")
        lines.append(")")
        if self.layer_weights:
            lines.append("# What each layer's loop iteration unpacks, in order ({i} = layer index).")
            lines.append("LAYER_WEIGHTS = (")
            lines += [f"    {w.lstrip('@')!r}," for w, _ in self.layer_weights]
            lines.append(")")
        if "DECODE_STEP_FILE" in self.constants:
            from vsc.backends.tvm.decode_step import step_arguments
            lines.append("# The compiled decode step's weights tuple, in order: (weight, planar part of a quantized one).")
            lines.append("STEP_ARGUMENTS = (")
            lines += [f"    {arg!r}," for arg in step_arguments(self.module)]
            lines.append(")")
        return lines + ["", ""]

    def _runner_class(self) -> list[str]:
        c = self.constants
        kv_layers = "LAYERS" if self.attention is not None else "0"
        int8 = self.module.cache.dtype == "i8"
        kv = "QuantizedKV" if int8 else "torch.Tensor"
        scales = " in int8, with fp32 scales [.., KV_HEADS]" if int8 else ""
        cascade = ", CASCADE_MIN_TOKENS" if "CASCADE_MIN_TOKENS" in c else ""
        lines = [
            "class Runner:",
            f'    """Runs plan @{self.module.name} step by step (the ModelRunner protocol of vsc.runtime.api)."""',
            "",
            f"    def __init__(self, model_dir: str, device: str | torch.device = \"{'cuda' if self.cuda else 'cpu'}\"):",
            "        self.device = torch.device(device)",
            f"        w = load_weights(model_dir, WEIGHTS, layers=LAYERS, experts={'EXPERTS' if 'EXPERTS' in c else 0}, device=self.device)",
        ]
        for weight, attr in self.top_weights.items():
            lines.append(f"        self.{attr} = w[{weight.lstrip('@')!r}]")
        if "DECODE_STEP_FILE" in c:      # schedule {graph = "relax"}: the whole decode forward in one VM call
            lines.append("        self.step = load_decode_step(__file__, DECODE_STEP_FILE, DECODE_STEP_BUILD, TVM_THREADS)")
            lines.append("        self.step.bind_weights(step_weight_tensors(w, STEP_ARGUMENTS))")
        if self.layer_weights:
            lines.append("        self.layers = [tuple(w[name.replace(\"{i}\", str(i))] for name in LAYER_WEIGHTS) "
                         "for i in range(LAYERS)]")
        lines += [
            f"        self.cache_config = CacheConfig(layers={kv_layers}, kv_heads=KV_HEADS, head_dim=HEAD_DIM, block_size=BLOCK_SIZE,",
            "                                        num_blocks=NUM_BLOCKS, dtype=CACHE_DTYPE, layout=CACHE_LAYOUT)",
            "        self.vocab_size = VOCAB",
            f"        self.kv_cache: list[tuple[{kv}, {kv}]] | None = None",
            "",
            f"    def create_kv_cache(self, num_blocks: int | None = None) -> list[tuple[{kv}, {kv}]]:",
            f'        """(K, V) per layer, [num_blocks * BLOCK_SIZE, KV_HEADS, HEAD_DIM] each{scales}; num_blocks overrides the plan\'s."""',
            "        blocks = NUM_BLOCKS if num_blocks is None else num_blocks",
            f"        self.kv_cache = allocate_kv_cache({kv_layers}, blocks * BLOCK_SIZE, KV_HEADS, HEAD_DIM, CACHE_DTYPE, self.device)",
            *(["        self.step.bind_caches(self.kv_cache)"] if "DECODE_STEP_FILE" in c else []),
            "        return self.kv_cache",
            "",
            "    @torch.inference_mode()",
            "    def prefill(self, batch: StepBatch) -> torch.Tensor:",
            '        """New tokens (whole prompts or chunks, any number per sequence) -> logits [B, VOCAB] of each last one,',
            '        or [R, VOCAB] of the rows batch.logits_rows names (speculative decoding verifies every draft)."""',
            f"        meta = attention_metadata(batch, BLOCK_SIZE{cascade})",
            "        if batch.logits_rows is not None:",
            "            meta.last_index = batch.logits_rows",
            "        return self.forward(batch, meta)",
            "",
            "    @torch.inference_mode()",
            "    def decode(self, batch: StepBatch) -> torch.Tensor:",
            '        """One new token per sequence -> logits [B, VOCAB]."""',
            *(["        if batch.logits_rows is None and batch.num_seqs <= STEP_MAX_BATCH:   # the compiled decode step: one call",
               "            return self.step(batch, BLOCK_SIZE, KV_HEADS)"] if "DECODE_STEP_FILE" in c else []),
            f"        meta = attention_metadata(batch, BLOCK_SIZE{cascade})",
            "        return self.forward(batch, meta)",
            "",
            "    def forward(self, batch: StepBatch, meta: AttentionMetadata) -> torch.Tensor:",
            "        if self.kv_cache is None:",
            '            raise RuntimeError("create_kv_cache() must run before the first step")',
        ]
        lines += self._step_body()
        return lines

    def _step_body(self) -> list[str]:
        ind = " " * 8
        lines = []
        params = [(self.locals[p], _BATCH_FIELDS[p]) for p, _ in self.model.func.params]
        lines.append(ind + ", ".join(n for n, _ in params) + " = " + ", ".join(f for _, f in params))
        for op in self.body:
            if op.kind == "repeat":
                lines += self._layer_lines(op, ind)
                continue
            lines += [ind + line for line in self._op_lines(op, False, self.body)]
        logits = self.locals[self.model.func.returns[0]]
        engine = [op for op in self.body if op.kind in _ENGINE_OPS]
        note = f"  # {engine[0].kind} ({', '.join(engine[0].results)}) runs in the engine's sampler" if engine else ""
        lines.append(f"{ind}return {logits}{note}")
        return lines

    def _layer_lines(self, op: Op, ind: str) -> list[str]:
        region = op.region
        carried = [self.locals[a] for a, _ in region.args]
        inputs = [self.locals[o] for o in op.operands]
        yields = [self.locals[y] for y in region.yields]
        results = [self.locals[r] for r in op.results]
        unpack = ", ".join(name for _, name in self.layer_weights)
        lines = [f"{ind}{', '.join(carried)} = {', '.join(inputs)}"]

        def body(indent: str) -> list[str]:
            out = []
            if unpack:
                out.append(f"{indent}{unpack}{',' if len(self.layer_weights) == 1 else ''} = layer_weights")
            for inner in region.ops:
                out += [indent + line for line in self._op_lines(inner, True, region.ops)]
            out.append(f"{indent}{', '.join(carried)} = {', '.join(yields)}")
            return out

        has_cache = self.attention is not None
        if not self.unroll:
            target = "layer_weights, (k_cache, v_cache)" if has_cache else "layer_weights"
            source = "zip(self.layers, self.kv_cache)" if has_cache else "self.layers"
            if not self.layer_weights:
                target, source = ("(k_cache, v_cache)", "self.kv_cache") if has_cache else ("_", "range(LAYERS)")
            lines.append(f"{ind}for {target} in {source}:")
            lines += body(ind + "    ")
        else:
            for i in range(op.attrs["count"]):
                lines.append(f"{ind}# layer {i}")
                if self.layer_weights:
                    lines.append(f"{ind}layer_weights = self.layers[{i}]")
                if has_cache:
                    lines.append(f"{ind}k_cache, v_cache = self.kv_cache[{i}]")
                lines += body(ind)
        lines.append(f"{ind}{', '.join(results)} = {', '.join(carried)}")
        return lines


def generate_runner_source(module: ServingModule, pipeline: str | None = None, unroll: bool = False) -> str:
    """Python source of a `Runner` class specialized to `module` (see the module docstring).

    `pipeline` is recorded in the header (default: the spec's optimize line); `unroll`
    writes the layer region once per layer instead of as a loop. Raises LoweringError for
    anything the torch backend cannot lower.
    """
    return _RunnerWriter(module, pipeline, unroll).source()


def load_runner_class(source: str, module_name: str) -> type:
    """Exec generated runner source into a fresh module named `module_name`; return its Runner.

    The source is registered with linecache, so tracebacks through generated code show
    its lines.
    """
    filename = f"<vsc-generated {module_name}>"
    mod = types.ModuleType(module_name)
    mod.__file__ = filename
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    code = compile(source, filename, "exec")
    sys.modules[module_name] = mod
    try:
        exec(code, mod.__dict__)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    runner = mod.__dict__.get("Runner")
    if not isinstance(runner, type):
        raise LoweringError(f"generated module {module_name} defines no Runner class")
    return runner
