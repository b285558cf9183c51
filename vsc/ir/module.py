"""The serving IR: one `ServingModule` holds the four concerns of a deployment.

- model graph: `ModelGraph` — weights plus one SSA function `step` (one forward step
  over a batch of tokens); the decoder layer is a `repeat` op whose region runs N times,
  with `{i}` in weight names standing for the layer index.
- kernel schedule: each `Op.kernel` names the kernel that implements it on the target;
  `Schedule` holds module-wide decisions (graph capture / compile, fusion groups).
- cache layout: `CacheLayout`.
- batching policy + request graph: `BatchingPolicy`, `RequestGraph` (a networkx DiGraph).

Attribute values everywhere are plain data (int, float, str, bool, None, list, dict) so
that the printer and parser can round-trip them exactly. Nodes are plain dataclasses:
`==` is structural equality, `copy.deepcopy` (`ServingModule.clone`) is a safe copy.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator

import networkx as nx

from vsc.ir.types import UNKNOWN, Origin, TensorType

Attrs = dict[str, Any]


def symbol_name(text: str) -> str:
    """`text` made fit for an `@name` in IR text (letters, digits, `_`, `.`, `-`)."""
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "_.-") else "_" for c in text)
    return cleaned or "_"


def is_value(operand: str) -> bool:
    """Operands are strings: `%name` is an SSA value, `@name` a weight."""
    return operand.startswith("%")


def is_weight(operand: str) -> bool:
    return operand.startswith("@")


@dataclass
class KernelRef:
    """`torch.linear` or `triton.rmsnorm{BLOCK = 128}`: which kernel runs an op, and its config."""

    name: str
    config: Attrs = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return self.name.split(".", 1)[0]


@dataclass
class Region:
    """The body of a `repeat` op: block arguments, ops, and the values it yields."""

    args: list[tuple[str, TensorType]]
    ops: list["Op"]
    yields: list[str]


@dataclass
class Op:
    """One SSA operation: `%r1, %r2 = kind(operands) {attrs} : types via kernel loc(...)`."""

    kind: str
    results: list[str]
    operands: list[str]
    types: list[TensorType]
    attrs: Attrs = field(default_factory=dict)
    kernel: KernelRef | None = None
    origin: Origin = UNKNOWN
    region: Region | None = None


@dataclass
class Weight:
    """A named parameter tensor and how to materialize it.

    `init` is `load("<tensor name in the safetensors files>")` for checkpoint tensors, or a
    derivation from other weights that a pass introduced (`concat(@a, @b) {axis = 0}`).
    Names may contain `{i}` (layer index) and `{e}` (expert index).
    """

    name: str
    type: TensorType
    init_fn: str
    init_args: list[str]
    init_attrs: Attrs = field(default_factory=dict)
    origin: Origin = UNKNOWN


@dataclass
class Function:
    """`func @step[T, B](%tokens: i64[T], %positions: i64[T]) { ... return %logits, %next }`."""

    name: str
    symbols: list[str]
    params: list[tuple[str, TensorType]]
    body: list[Op]
    returns: list[str]


@dataclass
class ModelGraph:
    """The model: its config attributes (arch, path, sizes), weights and the step function."""

    name: str
    attrs: Attrs
    weights: list[Weight]
    func: Function
    origin: Origin = UNKNOWN

    def weight(self, name: str) -> Weight | None:
        for w in self.weights:
            if w.name == name:
                return w
        return None


@dataclass
class Target:
    """The hardware: `cpu {threads = 2}` or `cuda {arch = "sm_90", gpus = 1}`, plus memory."""

    kind: str
    attrs: Attrs = field(default_factory=dict)
    origin: Origin = UNKNOWN


@dataclass
class Schedule:
    """Module-wide kernel decisions: graph mode (eager / compiled / captured), fusion groups."""

    attrs: Attrs = field(default_factory=lambda: {"graph": "eager"})
    origin: Origin = UNKNOWN


@dataclass
class CacheLayout:
    """How the KV cache is laid out and how big it is.

    layout: "contiguous" (one max_context slab per batch slot) or "paged" (fixed-size blocks).
    dtype: f32 / bf16 / f16, or i8 (kv-int8: int8 values plus one fp32 scale per token and
    kv head). capacity_tokens * bytes per token (`vsc.ir.sizes.kv_bytes_per_token`: 2 *
    layers * kv_heads * (head_dim * dtype size + scale bytes)) must fit in budget_bytes.
    """

    layout: str = "contiguous"
    block_size: int = 1
    dtype: str = "f32"
    capacity_tokens: int = 0
    budget_bytes: int = 0
    prefix_sharing: str = "none"      # vsc.runtime.enums.PREFIX_CACHE_POLICIES
    eviction: str = "none"            # vsc.runtime.enums.EVICTION_POLICIES
    origin: Origin = UNKNOWN


@dataclass
class BatchingPolicy:
    """How requests share forward steps.

    mode "static": a batch runs to completion before the next is admitted;
    "continuous": admission and retirement every step (iteration-level batching).
    max_tokens is the token budget of one step; chunked_prefill (0 = off) caps the
    prompt tokens one sequence may prefill per step.
    """

    mode: str = "static"
    max_batch: int = 1
    max_tokens: int = 2048
    chunked_prefill: int = 0
    order: str = "fcfs"               # fcfs | shortest-first
    preemption: str = "recompute"     # vsc.runtime.enums.PREEMPTION_POLICIES
    origin: Origin = UNKNOWN


@dataclass
class Stage:
    """One stage a request passes through (tokenize, admit, prefill, decode, ...)."""

    name: str
    attrs: Attrs = field(default_factory=dict)
    origin: Origin = UNKNOWN


#: The request graph a spec lowers to (and a draft model's plan starts from): one chain of stages.
REQUEST_STAGES = ("ingress", "tokenize", "admit", "prefill", "decode", "sample", "detokenize", "stream")


class RequestGraph:
    """The stages of a request as a networkx DiGraph; nodes keep insertion order."""

    def __init__(self) -> None:
        self.graph = nx.DiGraph()

    def add_stage(self, stage: Stage) -> None:
        self.graph.add_node(stage.name, stage=stage)

    def add_edge(self, src: str, dst: str) -> None:
        self.graph.add_edge(src, dst)

    def stages(self) -> list[Stage]:
        return [data["stage"] for _, data in self.graph.nodes(data=True)]

    def stage(self, name: str) -> Stage | None:
        data = self.graph.nodes.get(name)
        return data["stage"] if data else None

    def edges(self) -> list[tuple[str, str]]:
        return list(self.graph.edges())

    def insert_between(self, stage: Stage, before: str, after: str) -> None:
        """Splice `stage` onto the edge before -> after."""
        self.graph.remove_edge(before, after)
        self.add_stage(stage)
        self.add_edge(before, stage.name)
        self.add_edge(stage.name, after)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RequestGraph):
            return NotImplemented
        return self.stages() == other.stages() and sorted(self.edges()) == sorted(other.edges())

    def __repr__(self) -> str:
        return f"RequestGraph(stages={[s.name for s in self.stages()]}, edges={self.edges()})"


@dataclass
class ServingModule:
    """A whole deployment plan: everything `vsc` needs to lower a server."""

    name: str
    deployment: Attrs
    target: Target
    model: ModelGraph
    schedule: Schedule
    cache: CacheLayout
    batching: BatchingPolicy
    requests: RequestGraph
    origin: Origin = UNKNOWN

    def clone(self) -> "ServingModule":
        return copy.deepcopy(self)


def walk_ops(ops: list[Op]) -> Iterator[Op]:
    """Every op in `ops`, descending into regions (pre-order)."""
    for op in ops:
        yield op
        if op.region is not None:
            yield from walk_ops(op.region.ops)


def layer_op_ids(func: Function) -> set[int]:
    """id() of every op inside the regions of `func`'s body (the decoder layers); the ops outside
    them are the embedding and the head."""
    return {id(op) for top in func.body if top.region is not None for op in walk_ops(top.region.ops)}


class NameAllocator:
    """Fresh SSA names that do not clash with any name already in a function."""

    def __init__(self, func: Function):
        self.used: set[str] = {name for name, _ in func.params}
        for op in walk_ops(func.body):
            self.used.update(op.results)
            if op.region is not None:
                self.used.update(name for name, _ in op.region.args)

    def fresh(self, hint: str) -> str:
        base = hint if hint.startswith("%") else "%" + hint
        if base not in self.used:
            self.used.add(base)
            return base
        for n in itertools.count(1):
            name = f"{base}{n}"
            if name not in self.used:
                self.used.add(name)
                return name
        raise AssertionError("unreachable")
