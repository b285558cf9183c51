"""Hypothesis strategies for arbitrary ServingModules, for round-trip and fuzz tests.

The modules need not verify (ops need not type-check, names need not be defined): the
round trip print -> parse -> == is about syntax, so every field gets values of the right
Python type drawn as widely as the textual IR can express them.

Names follow the lexical rules of vsc/grammar/vsir.lark:
  value    %[A-Za-z0-9_.-]+
  symbol   @[A-Za-z0-9_.-]+ followed by any number of `{x}[A-Za-z0-9_.-]*` templates
  ident    [A-Za-z_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?
Identifiers are sometimes grammar keywords on purpose (op kinds, stage names, attribute
keys, dims, ...): the contextual lexer reads a keyword as an IDENT where the keyword itself
cannot appear, and the grammar's `_name` rule accepts keywords as op kinds and edge ends,
where a keyword can be read after a `loc(...)`.

Restrictions (things the textual IR cannot express, so the strategies never draw them):
  - a function returns, and a region yields, at least one value (`return`/`yield` need a list);
  - Origin("unknown") has no detail, Origin("spec") has int line and column;
  - a string argument of a weight init never starts with "@" (that prefix marks a weight);
  - attribute values are lists, not tuples (both print as `[...]`, which reads back as a list);
  - floats are finite; tensor dims are non-negative ints or identifiers;
  - edges only join declared stages (an undeclared one has no Stage to print).
"""
from __future__ import annotations

import functools

from hypothesis import strategies as st

from vsc.ir.module import (
    BatchingPolicy, CacheLayout, Function, KernelRef, ModelGraph, Op, Region, RequestGraph,
    Schedule, ServingModule, Stage, Target, Weight,
)
from vsc.ir.types import DTYPE_BYTES, UNKNOWN, Origin, TensorType

# Every keyword of vsc/grammar/vsir.lark: drawn as identifiers to exercise keyword/IDENT clashes.
KEYWORDS = (
    "module", "deployment", "target", "model", "weight", "func", "return", "yield", "via",
    "loc", "schedule", "cache", "batching", "requests", "stage", "true", "false", "none",
)

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
_NAME_CHARS = _LETTERS + "0123456789.-"        # [A-Za-z0-9_.-]
_IDENT_LAST = _LETTERS + "0123456789"           # [A-Za-z0-9_]

# Characters that stress string escaping: quotes, backslashes, control characters,
# line and paragraph separators, a comment opener, non-ASCII, astral and lone surrogate
# code points.
_ODD_CHARS = '"\\\n\r\t\x00\x1f\x7f\u2028\u2029/é中😀\'{}[]%@\ud800'

_IDENTS = st.one_of(
    st.tuples(
        st.sampled_from(_LETTERS),
        st.one_of(st.just(""), st.tuples(st.text(_NAME_CHARS, max_size=10), st.sampled_from(_IDENT_LAST)).map("".join)),
    ).map("".join),
    st.sampled_from(KEYWORDS),
)
_NAME_BODIES = st.text(_NAME_CHARS, min_size=1, max_size=12)


def identifiers() -> st.SearchStrategy[str]:
    """[A-Za-z_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?, grammar keywords included."""
    return _IDENTS


@functools.cache
def texts(max_size: int = 12) -> st.SearchStrategy[str]:
    """Strings with quotes, backslashes, newlines, control characters and unicode."""
    return st.text(alphabet=st.one_of(st.characters(), st.sampled_from(_ODD_CHARS)), max_size=max_size)


@functools.cache
def value_names() -> st.SearchStrategy[str]:
    return _NAME_BODIES.map(lambda s: "%" + s)


@st.composite
def symbol_bodies(draw) -> str:
    """A symbol without its `@`: a plain part, then maybe `{i}` / `{e}` template parts."""
    name = draw(_NAME_BODIES)
    for _ in range(draw(st.integers(0, 2))):
        letter = draw(st.sampled_from("ieeiz"))
        name += "{" + letter + "}" + draw(st.text(_NAME_CHARS, max_size=8))
    return name


@functools.cache
def symbol_names() -> st.SearchStrategy[str]:
    return symbol_bodies().map(lambda s: "@" + s)


# -- attribute values ----------------------------------------------------------

_EXTREME_FLOATS = (5e-324, 2.2250738585072014e-308, 1e-300, 1.7976931348623157e308, -1e300,
                   1e16, 1e-5, -0.0, 0.1, 123456789.0, 1e22)


@functools.cache
def attr_scalars() -> st.SearchStrategy:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(_EXTREME_FLOATS),
        texts(),
    )


@functools.cache
def attr_keys() -> st.SearchStrategy[str]:
    """Keys printed bare (identifiers, keywords among them) and keys that need quoting."""
    return st.one_of(identifiers(), texts(8))


@functools.cache
def attr_values() -> st.SearchStrategy:
    return st.recursive(
        attr_scalars(),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(attr_keys(), children, max_size=4),
        ),
        max_leaves=12,
    )


@functools.cache
def attr_dicts(max_size: int = 4) -> st.SearchStrategy[dict]:
    return st.dictionaries(attr_keys(), attr_values(), max_size=max_size)


# -- types and origins ---------------------------------------------------------

@functools.cache
def dims() -> st.SearchStrategy:
    return st.one_of(st.integers(min_value=0, max_value=2**40), st.sampled_from(["T", "B"]), identifiers())


@functools.cache
def tensor_types() -> st.SearchStrategy[TensorType]:
    return st.builds(
        TensorType,
        st.sampled_from(sorted(DTYPE_BYTES)),
        st.lists(dims(), max_size=4).map(tuple),
    )


@functools.cache
def origins() -> st.SearchStrategy[Origin]:
    return st.one_of(
        st.just(UNKNOWN),
        st.builds(Origin, st.just("spec"), texts(), st.integers(-3, 10**6), st.integers(-3, 10**6)),
        st.builds(Origin, st.sampled_from(["import", "pass"]), texts()),
    )


# -- model graph -----------------------------------------------------------------

@functools.cache
def init_string_args() -> st.SearchStrategy[str]:
    return texts(16).filter(lambda s: not s.startswith("@"))


@st.composite
def weights(draw) -> Weight:
    name = draw(symbol_names())
    wtype = draw(tensor_types())
    origin = draw(origins())
    if draw(st.booleans()):
        return Weight(name, wtype, "load", [draw(init_string_args())], {}, origin)
    fn = draw(st.one_of(st.just("concat"), identifiers()))
    args = draw(st.lists(st.one_of(symbol_names(), init_string_args()), max_size=3))
    return Weight(name, wtype, fn, args, draw(attr_dicts(2)), origin)


@functools.cache
def kernels() -> st.SearchStrategy[KernelRef | None]:
    return st.one_of(
        st.none(),
        st.builds(KernelRef, identifiers(), st.just({})),
        st.builds(KernelRef, identifiers(), attr_dicts(3)),
    )


@functools.cache
def params() -> st.SearchStrategy[list[tuple[str, TensorType]]]:
    return st.lists(st.tuples(value_names(), tensor_types()), max_size=3)


@functools.cache
def regions(depth: int) -> st.SearchStrategy[Region]:
    return st.builds(
        Region,
        params(),
        op_lists(depth - 1),
        st.lists(value_names(), min_size=1, max_size=3),
    )


@functools.cache
def ops(depth: int) -> st.SearchStrategy[Op]:
    region = st.none() if depth <= 0 else st.one_of(st.none(), regions(depth))
    return st.builds(
        Op,
        kind=identifiers(),
        results=st.lists(value_names(), max_size=3),
        operands=st.lists(st.one_of(value_names(), symbol_names()), max_size=4),
        types=st.lists(tensor_types(), max_size=3),
        attrs=attr_dicts(3),
        kernel=kernels(),
        origin=origins(),
        region=region,
    )


@functools.cache
def op_lists(depth: int = 2) -> st.SearchStrategy[list[Op]]:
    return st.lists(ops(depth), max_size=4)


@functools.cache
def functions() -> st.SearchStrategy[Function]:
    return st.builds(
        Function,
        symbol_bodies(),
        st.lists(identifiers(), max_size=3),
        params(),
        op_lists(2),
        st.lists(value_names(), min_size=1, max_size=3),
    )


@functools.cache
def model_graphs() -> st.SearchStrategy[ModelGraph]:
    return st.builds(
        ModelGraph,
        symbol_bodies(),
        attr_dicts(),
        st.lists(weights(), max_size=4, unique_by=lambda w: w.name),
        functions(),
        origins(),
    )


# -- module-wide sections ------------------------------------------------------------

@functools.cache
def cache_layouts() -> st.SearchStrategy[CacheLayout]:
    return st.builds(
        CacheLayout,
        layout=st.one_of(st.sampled_from(["contiguous", "paged"]), texts()),
        block_size=st.integers(),
        dtype=st.one_of(st.sampled_from(sorted(DTYPE_BYTES)), texts()),
        capacity_tokens=st.integers(),
        budget_bytes=st.integers(),
        prefix_sharing=st.one_of(st.sampled_from(["none", "hash", "radix"]), texts()),
        eviction=st.one_of(st.sampled_from(["none", "lru"]), texts()),
        origin=origins(),
    )


@functools.cache
def batching_policies() -> st.SearchStrategy[BatchingPolicy]:
    return st.builds(
        BatchingPolicy,
        mode=st.one_of(st.sampled_from(["static", "continuous"]), texts()),
        max_batch=st.integers(),
        max_tokens=st.integers(),
        chunked_prefill=st.integers(),
        order=st.one_of(st.sampled_from(["fcfs", "shortest-first"]), texts()),
        preemption=st.one_of(st.sampled_from(["recompute"]), texts()),
        origin=origins(),
    )


@st.composite
def request_graphs(draw) -> RequestGraph:
    names = draw(st.lists(identifiers(), max_size=6, unique=True))
    graph = RequestGraph()
    for name in names:
        graph.add_stage(Stage(name, draw(attr_dicts(2)), draw(origins())))
    if names:
        pairs = st.tuples(st.sampled_from(names), st.sampled_from(names))
        for src, dst in draw(st.lists(pairs, max_size=8)):
            graph.add_edge(src, dst)
    return graph


@functools.cache
def serving_modules() -> st.SearchStrategy[ServingModule]:
    return st.builds(
        ServingModule,
        name=symbol_bodies(),
        deployment=attr_dicts(),
        target=st.builds(Target, identifiers(), attr_dicts(3), origins()),
        model=model_graphs(),
        schedule=st.builds(Schedule, attr_dicts(3), origins()),
        cache=cache_layouts(),
        batching=batching_policies(),
        requests=request_graphs(),
        origin=origins(),
    )


# -- fixed modules around a real model graph -------------------------------------------

REQUEST_STAGES = ("ingress", "tokenize", "admit", "prefill", "decode", "sample", "detokenize", "stream")


def serving_module_around(model: ModelGraph, name: str = "deploy") -> ServingModule:
    """A complete, fixed ServingModule around `model` (used by the real-config and golden tests)."""
    spec = lambda line: Origin("spec", "examples/tiny.vs", line, 3)  # noqa: E731
    requests = RequestGraph()
    for line, stage in enumerate(REQUEST_STAGES, start=20):
        attrs = {"policy": "greedy"} if stage == "sample" else {}
        requests.add_stage(Stage(stage, attrs, spec(line)))
    for src, dst in zip(REQUEST_STAGES, REQUEST_STAGES[1:]):
        requests.add_edge(src, dst)
    return ServingModule(
        name=name,
        deployment={"slo": {"ttft_ms": 200, "tpot_ms": 50.0}, "accuracy": {"max_kl": 0.01}},
        target=Target("cpu", {"threads": 2, "memory_bytes": 8 * 2**30}, spec(4)),
        model=model,
        schedule=Schedule({"graph": "eager", "fusion_groups": []}, Origin("pass", "default-schedule")),
        cache=CacheLayout("contiguous", 2048, model.attrs.get("dtype", "f32"), 4096, 2**28, "none", "none", spec(8)),
        batching=BatchingPolicy("continuous", 8, 2048, 0, "fcfs", "recompute", spec(12)),
        requests=requests,
        origin=spec(1),
    )
