"""The op set of the model graph and each op's typing rule, written down in one place.

`infer(kind, operand_types, attrs)` returns the result types an op must declare, or
raises `TypeRuleError` saying which rule broke. The verifier compares these with the
declared types; passes use them to type the ops they create.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vsc.ir.types import FLOAT_DTYPES, QUANT_DTYPES, TensorType


class TypeRuleError(Exception):
    """An op's operands or attributes break its typing rule."""


@dataclass(frozen=True)
class OpDef:
    kind: str
    operands: str            # pattern: v = SSA value, w = weight, ? = optional weight, * = any weights
    required_attrs: tuple[str, ...]
    infer: Callable[[list[TensorType], dict], list[TensorType]]
    doc: str
    structural: bool = False  # True: no kernel (control structure, e.g. repeat)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise TypeRuleError(msg)


def _same_dtype(types: list[TensorType]) -> None:
    dtypes = {t.dtype for t in types}
    _require(len(dtypes) == 1, f"operand dtypes differ: {', '.join(sorted(dtypes))}")


def _embed(ts, attrs):
    tokens, table = ts
    _require(tokens.dtype in ("i64", "i32"), f"tokens must be integer, got {tokens}")
    _require(table.rank == 2, f"embedding table must be rank 2, got {table}")
    dtype = table.dtype
    if table.dtype in QUANT_DTYPES:    # rows are dequantized to the activation dtype the op names
        dtype = attrs.get("dtype", "f32")
        _require(isinstance(dtype, str) and dtype in FLOAT_DTYPES,
                 f"a {table.dtype} table's rows dequantize to a float dtype, got {dtype!r}")
    return [TensorType(dtype, tokens.shape + (table.shape[1],))]


def _rmsnorm(ts, attrs):
    x, w = ts
    _require(w.rank == 1 and x.shape[-1] == w.shape[0], f"norm weight {w} does not match input {x}")
    _same_dtype([x, w])
    return [x]


def _add_rmsnorm(ts, attrs):
    a, b, w = ts
    _require(a == b, f"operand types differ: {a}, {b}")
    _require(w.rank == 1 and a.shape[-1] == w.shape[0], f"norm weight {w} does not match input {a}")
    _same_dtype([a, w])
    return [a, a]


def _elementwise(ts, attrs):
    _require(all(t == ts[0] for t in ts), f"operand types differ: {', '.join(map(str, ts))}")
    return [ts[0]]


def _unary(ts, attrs):
    (x,) = ts
    _require(x.dtype in FLOAT_DTYPES, f"expected a float tensor, got {x}")
    return [x]


def _silu_mul(ts, attrs):
    (x,) = ts
    last = x.shape[-1]
    _require(isinstance(last, int) and last % 2 == 0, f"silu_mul needs an even last dim, got {x}")
    return [x.with_last(last // 2)]


def _linear(ts, attrs):
    x, w, *bias = ts
    _require(w.rank == 2, f"linear weight must be rank 2 [out, in], got {w}")
    _require(x.shape[-1] == w.shape[1], f"linear input {x} does not match weight {w} (in = {w.shape[1]})")
    if w.dtype in QUANT_DTYPES:       # a block-quantized weight: float activations in and out
        _require(x.dtype in FLOAT_DTYPES, f"linear input must be float, got {x}")
    else:
        _same_dtype([x, w])
    if bias:
        _require(bias[0].shape == (w.shape[0],) and bias[0].dtype == x.dtype, f"bias {bias[0]} does not match weight {w}")
    return [x.with_last(w.shape[0])]


def _split(ts, attrs):
    (x,) = ts
    sizes = attrs["sizes"]
    _require(isinstance(sizes, list) and sizes and all(isinstance(s, int) and s > 0 for s in sizes),
             f"sizes must be a list of positive ints, got {sizes!r}")
    _require(sum(sizes) == x.shape[-1], f"sizes {sizes} sum to {sum(sizes)}, input last dim is {x.shape[-1]}")
    return [x.with_last(s) for s in sizes]


def _rope(ts, attrs):
    q, k, pos = ts
    hd = attrs["head_dim"]
    _require(isinstance(hd, int) and hd > 0 and hd % 2 == 0, f"head_dim must be a positive even int, got {hd!r}")
    for t in (q, k):
        _require(isinstance(t.shape[-1], int) and t.shape[-1] % hd == 0, f"{t} is not a whole number of heads of {hd}")
    _require(pos.dtype in ("i64", "i32") and pos.shape == q.shape[:-1], f"positions {pos} do not match {q}")
    _require(attrs["theta"] > 0, "theta must be positive")
    return [q, k]


def _rope_lookup(ts, attrs):
    pos, cos, sin = ts
    _require(pos.dtype in ("i64", "i32") and pos.rank == 1, f"positions must be an integer vector, got {pos}")
    _require(cos.rank == 2 and cos == sin, f"cos/sin tables must be one rank-2 type [max_position, head_dim], got {cos}, {sin}")
    _require(cos.dtype in FLOAT_DTYPES, f"cos/sin tables must be float, got {cos}")
    row = TensorType(cos.dtype, pos.shape + (cos.shape[1],))
    return [row, row]


def _rope_rotate(ts, attrs):
    q, k, cos, sin = ts
    hd = attrs["head_dim"]
    _require(isinstance(hd, int) and hd > 0 and hd % 2 == 0, f"head_dim must be a positive even int, got {hd!r}")
    for t in (q, k):
        _require(isinstance(t.shape[-1], int) and t.shape[-1] % hd == 0, f"{t} is not a whole number of heads of {hd}")
    want = TensorType(q.dtype, q.shape[:-1] + (hd,))
    _require(cos == want and sin == want, f"cos/sin rows {cos}, {sin} must be {want} (one row per token of {q})")
    _same_dtype([q, k])
    return [q, k]


def _linear_int8(ts, attrs):
    x, w, scales, *bias = ts
    group = attrs["group"]
    _require(w.dtype == "i8" and w.rank == 2, f"linear_int8 weight must be i8 [out, in], got {w}")
    _require(x.dtype in FLOAT_DTYPES, f"linear_int8 input must be float, got {x}")
    _require(x.shape[-1] == w.shape[1], f"linear input {x} does not match weight {w} (in = {w.shape[1]})")
    _require(isinstance(group, int) and not isinstance(group, bool) and group >= 0,
             f"group must be a non-negative int (0: one scale per output row), got {group!r}")
    size = group or w.shape[1]
    _require(w.shape[1] % size == 0, f"group {group} does not divide in_features {w.shape[1]}")
    want = TensorType("f32", (w.shape[0], w.shape[1] // size))
    _require(scales == want, f"scales {scales} must be {want} for group {group}")
    if bias:
        _require(bias[0].shape == (w.shape[0],) and bias[0].dtype == x.dtype, f"bias {bias[0]} does not match weight {w} / input {x}")
    return [x.with_last(w.shape[0])]


def _attention(ts, attrs):
    q, k, v = ts
    heads, kv_heads, hd = attrs["heads"], attrs["kv_heads"], attrs["head_dim"]
    _require(all(isinstance(a, int) and a > 0 for a in (heads, kv_heads, hd)), "heads, kv_heads, head_dim must be positive ints")
    _require(heads % kv_heads == 0, f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    _require(q.shape[-1] == heads * hd, f"q {q} is not heads*head_dim = {heads * hd}")
    _require(k.shape[-1] == kv_heads * hd and v.shape[-1] == kv_heads * hd,
             f"k {k} / v {v} are not kv_heads*head_dim = {kv_heads * hd}")
    _require(q.shape[:-1] == k.shape[:-1] == v.shape[:-1], "q, k, v token dims differ")
    _same_dtype([q, k, v])
    _require(attrs["scale"] > 0, "scale must be positive")
    return [q]


def _moe(ts, attrs):
    x, router, w1, w3, w2 = ts
    e, top_k = attrs["experts"], attrs["top_k"]
    _require(isinstance(e, int) and isinstance(top_k, int) and 0 < top_k <= e, f"need 0 < top_k <= experts, got {top_k}, {e}")
    _require(router.shape == x.shape[:-1] + (e,), f"router logits {router} must be [..., {e}]")
    _require(w1.rank == 2 and w1.shape[1] == x.shape[-1] and w3 == w1, f"expert w1 {w1} / w3 {w3} do not match input {x}")
    _require(w2.shape == (x.shape[-1], w1.shape[0]), f"expert w2 {w2} must be [{x.shape[-1]}, {w1.shape[0]}]")
    return [x]


def _last_token(ts, attrs):
    (h,) = ts
    _require(h.rank == 2, f"last_token takes [T, H], got {h}")
    return [TensorType(h.dtype, ("B", h.shape[1]))]


def _sample(ts, attrs):
    (logits,) = ts
    _require(logits.rank == 2 and logits.dtype in FLOAT_DTYPES, f"sample takes float [B, V] logits, got {logits}")
    return [TensorType("i64", (logits.shape[0],))]


def _repeat(ts, attrs):
    _require(isinstance(attrs["count"], int) and attrs["count"] >= 1, "count must be a positive int")
    return list(ts)


OPS: dict[str, OpDef] = {d.kind: d for d in [
    OpDef("embed", "vw", (), _embed, "token ids -> embedding rows (a quantized table's rows dequantize to attr dtype)"),
    OpDef("rmsnorm", "vw", ("eps",), _rmsnorm, "x * rsqrt(mean(x^2) + eps) * w"),
    OpDef("add", "vv", (), _elementwise, "elementwise sum (residual)"),
    OpDef("add_rmsnorm", "vvw", ("eps",), _add_rmsnorm,
          "s = a + b; results (rmsnorm(s) * w, s): the residual add fused into the next norm"),
    OpDef("mul", "vv", (), _elementwise, "elementwise product"),
    OpDef("silu", "v", (), _unary, "x * sigmoid(x)"),
    OpDef("silu_mul", "v", (), _silu_mul, "silu(x[..., :n]) * x[..., n:] (fused gated MLP activation)"),
    OpDef("linear", "vw?", (), _linear, "x @ W^T (+ b); W is [out, in], float or block-quantized (q8_0, q4_0, q4_1)"),
    OpDef("linear_int8", "vww?", ("group",), _linear_int8,
          "x @ (Wq * scales)^T (+ b): Wq i8 [out, in], scales f32 [out, in / group] (group 0: one per row) (weight-int8)"),
    OpDef("split", "v", ("sizes",), _split, "split the last dim into pieces of the given sizes"),
    OpDef("rope", "vvv", ("theta", "head_dim"), _rope,
          "rotary position embedding of q and k at positions (cos/sin computed from the positions by the op)"),
    OpDef("rope_lookup", "vww", (), _rope_lookup,
          "cos, sin rows [T, head_dim] of folded RoPE tables for the step's positions (fold-rope-tables)"),
    OpDef("rope_rotate", "vvvv", ("head_dim",), _rope_rotate,
          "rotate q and k by given cos/sin rows: x * cos + rotate_half(x) * sin (fold-rope-tables)"),
    OpDef("attention", "vvv", ("heads", "kv_heads", "head_dim", "scale"), _attention,
          "causal attention of q over the KV cache after appending k, v (GQA when kv_heads < heads)"),
    OpDef("moe", "vvwww", ("experts", "top_k"), _moe,
          "mixture of experts: route by top_k of softmax(router), expert = w2(silu(w1 x) * w3 x)"),
    OpDef("last_token", "v", (), _last_token, "the hidden state of each sequence's last token in the step"),
    OpDef("sample", "v", (), _sample, "next token id per sequence from logits (policy from the request)"),
    OpDef("repeat", "v*", ("count",), _repeat, "run the region `count` times, {i} = iteration", structural=True),
]}


def infer(kind: str, operand_types: list[TensorType], attrs: dict) -> list[TensorType]:
    """Result types of `kind` applied to operands of these types; raises TypeRuleError."""
    d = OPS.get(kind)
    if d is None:
        raise TypeRuleError(f"unknown op '{kind}'")
    missing = [a for a in d.required_attrs if a not in attrs]
    if missing:
        raise TypeRuleError(f"missing attribute(s) {', '.join(missing)}")
    try:
        return d.infer(operand_types, attrs)
    except (ValueError, TypeError) as e:  # wrong operand count, wrong attr types
        raise TypeRuleError(f"bad operands or attributes: {e}") from e


def operand_arity_ok(kind: str, operands: list[str]) -> str | None:
    """None if the operand kinds (value/weight) match the op's pattern, else a message."""
    pattern = OPS[kind].operands
    kinds = ["v" if o.startswith("%") else "w" for o in operands]
    if kind == "repeat":
        ok = len(kinds) >= 1 and all(k == "v" for k in kinds)
    else:
        required = pattern.replace("?", "")
        ok = (kinds == list(required)) or ("?" in pattern and kinds == list(required) + ["w"])
    if ok:
        return None
    return f"'{kind}' takes operands ({pattern}: v = value, w = weight, ? = optional weight), got ({''.join(kinds)})"
