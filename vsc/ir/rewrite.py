"""Small use-def helpers that rewrite passes share (matching and replacing ops in place)."""
from __future__ import annotations

from typing import Iterator

from vsc.errors import VscError
from vsc.ir.module import ModelGraph, Op, ServingModule, Weight
from vsc.ir.sizes import format_bytes, kv_bytes_per_token, weight_bytes
from vsc.ir.types import TensorType


def op_lists(module: ServingModule) -> Iterator[tuple[list[Op], str]]:
    """Every list of ops in the step function: the body, then each region (with a label)."""
    def walk(ops: list[Op], where: str):
        yield ops, where
        for op in ops:
            if op.region is not None:
                yield from walk(op.region.ops, f"region of {', '.join(op.results)}")
    yield from walk(module.model.func.body, "step")


def times_run(module: ServingModule) -> dict[int, int]:
    """id(op) -> how many times one step runs it (a region's ops: its `repeat` count, nested
    counts multiplied): what a pass's statistics count (`fused 30 qkv` for 30 layers)."""
    out: dict[int, int] = {}

    def walk(ops: list[Op], times: int):
        for op in ops:
            out[id(op)] = times
            if op.region is not None:
                walk(op.region.ops, times * int(op.attrs.get("count", 1)))
    walk(module.model.func.body, 1)
    return out


def producers(ops: list[Op]) -> dict[str, Op]:
    """Result name -> the op in `ops` that defines it."""
    return {r: op for op in ops for r in op.results}


def users(ops: list[Op], extra_uses: list[str] = ()) -> dict[str, list[Op | None]]:
    """Value name -> ops in `ops` (including nested regions) that read it; None marks a use
    by a yield/return listed in `extra_uses`."""
    out: dict[str, list[Op | None]] = {}

    def visit(op_list: list[Op]):
        for op in op_list:
            for o in op.operands:
                out.setdefault(o, []).append(op)
            if op.region is not None:
                visit(op.region.ops)
                for y in op.region.yields:
                    out.setdefault(y, []).append(None)
    visit(ops)
    for name in extra_uses:
        out.setdefault(name, []).append(None)
    return out


def unique_weight_name(model: ModelGraph, wanted: str) -> str:
    names = {w.name for w in model.weights}
    if wanted not in names:
        return wanted
    n = 1
    while f"{wanted}{n}" in names:
        n += 1
    return f"{wanted}{n}"


def add_concat_weight(model: ModelGraph, wanted_name: str, parts: list[str], origin) -> str:
    """Declare `wanted_name = concat(parts) {axis = 0}` after its last part; returns the name used."""
    part_weights = [model.weight(p) for p in parts]
    first = part_weights[0].type
    rows = sum(w.type.shape[0] for w in part_weights)
    name = unique_weight_name(model, wanted_name)
    new = Weight(name, TensorType(first.dtype, (rows,) + first.shape[1:]), "concat", list(parts), {"axis": 0}, origin)
    last = max(model.weights.index(w) for w in part_weights)
    model.weights.insert(last + 1, new)
    return name


def variant_weight_name(weight: str, tag: str, part: str = "weight") -> str:
    """The name of a weight made from another (packed, quantized): `@x.q_proj.weight` ->
    `@x.q_proj_<tag>.<part>`."""
    return f"{weight.removesuffix('.weight')}_{tag}.{part}"


def derived_name(weight: str, old: str, new: str, fallback_suffix: str) -> str:
    """`@...q_proj.weight` -> `@...qkv_proj.weight`; names without `old` get a suffix."""
    if old in weight:
        return weight.replace(old, new, 1)
    return weight + fallback_suffix


def paged_kv_capacity(module: ServingModule, dtype: str, block: int, tokens: int, kind: str = "") -> int:
    """Tokens a paged KV cache of `dtype` elements in `block`-token blocks holds: `tokens` (0: as
    many as the cache's budget holds), rounded down to whole blocks. VscError when `tokens` needs
    more than the budget or the budget holds no block; `kind` names the cache there ("int8")."""
    budget = module.cache.budget_bytes
    per_token = kv_bytes_per_token(module.model.attrs, dtype)
    affordable = budget // per_token
    wanted = tokens or affordable
    what = f"{kind} " if kind else ""
    if wanted > affordable:
        raise VscError(f"tokens={wanted} needs {format_bytes(wanted * per_token)} of {what}KV cache, "
                       f"the budget is {format_bytes(budget)}")
    capacity = wanted // block * block
    if capacity == 0:
        raise VscError(f"the KV budget ({format_bytes(budget)}) holds no {block}-token {what}block")
    return capacity


def credit_freed_weight_bytes(module: ServingModule, before: int, origin) -> None:
    """Give the bytes a weight rewrite freed (`before` = weight_bytes ahead of it) to the KV
    cache budget, or take what it added (a packed or quantized copy of a tied head): when the
    cache no longer fits, a paged cache shrinks to the whole blocks the budget still holds;
    VscError when that is less than one max_context sequence (or the cache is contiguous)."""
    saved = before - weight_bytes(module.model)
    if not saved:
        return
    cache = module.cache
    cache.budget_bytes += saved
    cache.origin = origin
    per_token = kv_bytes_per_token(module.model.attrs, cache.dtype)
    if cache.capacity_tokens * per_token <= cache.budget_bytes:
        return
    block = max(1, int(cache.block_size or 1))
    fits = max(0, cache.budget_bytes) // per_token // block * block
    longest = int(module.deployment.get("max_context") or 0)
    if cache.layout != "paged" or fits < max(block, longest):
        raise VscError(f"the rewritten weights need {format_bytes(-saved)} more than before, and the KV cache "
                       f"({format_bytes(cache.capacity_tokens * per_token)}) no longer fits its budget "
                       f"({format_bytes(cache.budget_bytes)})")
    cache.capacity_tokens = fits
