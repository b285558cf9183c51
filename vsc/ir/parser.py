"""Read `.vsir` text back into a ServingModule. Errors are IRParseError with line:col."""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import fields
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from vsc.errors import IRParseError, SourceLocation
from vsc.ir.module import (
    BatchingPolicy, CacheLayout, Function, KernelRef, ModelGraph, Op, Region, RequestGraph,
    Schedule, ServingModule, Stage, Target, Weight,
)
from vsc.ir.types import UNKNOWN, Origin, TensorType

GRAMMAR_PATH = Path(__file__).resolve().parents[1] / "grammar" / "vsir.lark"


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(GRAMMAR_PATH.read_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


def parse_module_file(path: str | Path) -> ServingModule:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise IRParseError(f"cannot read IR file: {e.strerror}", SourceLocation(str(path), 1, 1)) from None
    return parse_module(text, str(path))


def parse_module(text: str, filename: str = "<ir>") -> ServingModule:
    """Parse `.vsir` text; raises IRParseError pointing at the offending token."""
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, filename) from None
    return _Builder(text, filename).module(tree.children[0])


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "end of input"
    return repr(str(tok))


def _syntax_error(e: UnexpectedInput, text: str, filename: str) -> IRParseError:
    line, col = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
    if isinstance(e, UnexpectedCharacters):
        msg = f"unexpected character {text[e.pos_in_stream]!r}"
    elif isinstance(e, UnexpectedEOF):
        msg = "unexpected end of input"
        lines = text.splitlines() or [""]
        line, col = len(lines), len(lines[-1]) + 1
    elif isinstance(e, UnexpectedToken):
        expected = sorted(e.expected)[:6]
        msg = f"unexpected {_describe_token(e.token)}; expected one of {', '.join(expected)}"
        if e.token.type == "$END":
            lines = text.splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
    else:
        msg = "syntax error"
    return IRParseError(msg, SourceLocation(filename, line, col), text)


class _Builder:
    """Walks the lark tree and builds IR nodes, reporting semantic errors with locations."""

    def __init__(self, text: str, filename: str):
        self.text = text
        self.filename = filename

    def error(self, node, message: str) -> IRParseError:
        line = getattr(node, "line", None) or getattr(getattr(node, "meta", None), "line", 1) or 1
        col = getattr(node, "column", None) or getattr(getattr(node, "meta", None), "column", 1) or 1
        return IRParseError(message, SourceLocation(self.filename, line, col), self.text)

    # -- leaves ---------------------------------------------------------------
    def string(self, tok: Token) -> str:
        try:
            return json.loads(str(tok))
        except json.JSONDecodeError:
            raise self.error(tok, f"bad string literal {tok}") from None

    def number(self, tok: Token):
        s = str(tok)
        if re.fullmatch(r"-?\d+", s):
            try:
                return int(s)
            except ValueError:  # more digits than int() accepts
                raise self.error(tok, f"integer literal with {len(s)} characters is too long") from None
        f = float(s)
        if not math.isfinite(f):  # the printer cannot write inf back
            raise self.error(tok, f"number {s} is out of range")
        return f

    def integer(self, tok: Token) -> int:
        n = self.number(tok)
        if not isinstance(n, int):
            raise self.error(tok, f"expected an integer, got {tok}")
        return n

    def value(self, node):
        if isinstance(node, Tree):
            kind = node.data
            if kind == "number":
                return self.number(node.children[0])
            if kind == "string":
                return self.string(node.children[0])
            if kind == "true":
                return True
            if kind == "false":
                return False
            if kind == "none":
                return None
            if kind == "list":
                return [self.value(c) for c in node.children if c is not None]
            if kind == "attr_dict":
                return self.attr_dict(node)
        raise self.error(node, "bad attribute value")

    def attr_dict(self, node: Tree | None) -> dict:
        out: dict = {}
        if node is None:
            return out
        for attr in node.children:
            if attr is None:
                continue
            key_tok, val = attr.children
            key = self.string(key_tok) if key_tok.type == "STRING" else str(key_tok)
            if key in out:
                raise self.error(key_tok, f"duplicate attribute '{key}'")
            out[key] = self.value(val)
        return out

    def loc(self, node: Tree | None) -> Origin:
        if node is None:
            return UNKNOWN
        inner = node.children[0]
        if inner.data == "spec_loc":
            file_tok, line_tok, col_tok = inner.children
            return Origin("spec", self.string(file_tok), self.integer(line_tok), self.integer(col_tok))
        kind_tok, detail_tok = inner.children
        kind = str(kind_tok)
        if kind == "unknown" and detail_tok is None:
            return UNKNOWN
        # A spec origin needs its line and column: `loc("file":L:C)`, never `loc(spec "file")`.
        if kind not in ("import", "pass") or detail_tok is None:
            raise self.error(kind_tok, f"bad location '{kind}' (expected loc(\"file\":L:C), loc(import \"..\"), loc(pass \"..\") or loc(unknown))")
        return Origin(kind, self.string(detail_tok))

    def type(self, node: Tree) -> TensorType:
        dtype_tok, *dims = node.children
        shape = []
        for d in dims:
            if d is None:
                continue
            tok = d.children[0]
            if tok.type == "NUMBER":
                n = self.number(tok)
                if not isinstance(n, int) or n < 0:
                    raise self.error(tok, f"dimension must be a non-negative int or a symbol, got {tok}")
                shape.append(n)
            else:
                shape.append(str(tok))
        return TensorType(str(dtype_tok), tuple(shape))

    def params(self, nodes) -> list[tuple[str, TensorType]]:
        return [(str(p.children[0]), self.type(p.children[1])) for p in nodes if p is not None]

    # -- structure ------------------------------------------------------------
    def module(self, node: Tree) -> ServingModule:
        name_tok, loc, dep, target, model, schedule, cache, batching, requests = node.children
        return ServingModule(
            name=str(name_tok)[1:],
            deployment=self.attr_dict(dep.children[0]),
            target=self.target(target),
            model=self.model(model),
            schedule=Schedule(self.attr_dict(schedule.children[0]), self.loc(schedule.children[1])),
            cache=self.policy(cache, CacheLayout),
            batching=self.policy(batching, BatchingPolicy),
            requests=self.requests(requests),
            origin=self.loc(loc),
        )

    def target(self, node: Tree) -> Target:
        kind, attrs, loc = node.children
        return Target(str(kind), self.attr_dict(attrs), self.loc(loc))

    def policy(self, node: Tree, cls):
        attrs = self.attr_dict(node.children[0])
        names = [f.name for f in fields(cls) if f.name != "origin"]
        unknown = [k for k in attrs if k not in names]
        if unknown:
            raise self.error(node, f"unknown {node.data} field '{unknown[0]}' (fields: {', '.join(names)})")
        missing = [k for k in names if k not in attrs]
        if missing:
            raise self.error(node, f"{node.data} is missing field(s) {', '.join(missing)}")
        for f in fields(cls):
            if f.name in attrs:
                want = {"int": int, "str": str}.get(str(f.type))
                got = attrs[f.name]
                if want is not None and (type(got) is not want):
                    raise self.error(node, f"{node.data} field '{f.name}' must be {f.type}, got {got!r}")
        return cls(**attrs, origin=self.loc(node.children[1]))

    def model(self, node: Tree) -> ModelGraph:
        name_tok, attrs, loc, *rest = node.children
        *weights, func = rest
        seen = set()
        built = []
        for w in weights:
            weight = self.weight(w)
            if weight.name in seen:
                raise self.error(w, f"weight {weight.name} is declared twice")
            seen.add(weight.name)
            built.append(weight)
        return ModelGraph(str(name_tok)[1:], self.attr_dict(attrs), built, self.func(func), self.loc(loc))

    def weight(self, node: Tree) -> Weight:
        name_tok, type_node, fn_tok, *rest = node.children
        *args, init_attrs, loc = rest
        init_args = []
        for a in args:
            if a is None:
                continue
            if a.type == "SYMBOL":
                init_args.append(str(a))
                continue
            arg = self.string(a)
            if arg.startswith("@"):  # init_args marks weight references by the "@" prefix
                raise self.error(a, f"string argument {a} starts with '@' (a weight reference is written unquoted)")
            init_args.append(arg)
        return Weight(str(name_tok), self.type(type_node), str(fn_tok), init_args,
                      self.attr_dict(init_attrs), self.loc(loc))

    def func(self, node: Tree) -> Function:
        children = list(node.children)
        name_tok = children.pop(0)
        symbols, params, ops = [], [], []
        returns: list[str] = []
        for c in children:
            if c is None:
                continue
            if isinstance(c, Token) and c.type == "IDENT":
                symbols.append(str(c))
            elif isinstance(c, Tree) and c.data == "param":
                params.extend(self.params([c]))
            elif isinstance(c, Tree) and c.data == "op":
                ops.append(self.op(c))
            elif isinstance(c, Tree) and c.data == "value_list":
                returns = [str(t) for t in c.children]
        return Function(str(name_tok)[1:], symbols, params, ops, returns)

    def op(self, node: Tree) -> Op:
        results, kind_tok, *rest = node.children
        attrs_node, types_node, kernel_node, loc_node, region_node = rest[-5:]
        operands = [str(o) for o in rest[:-5] if o is not None]
        result_names = [str(t) for t in results.children[0].children] if results is not None else []
        types = [self.type(t) for t in types_node.children] if types_node is not None else []
        kernel = None
        if kernel_node is not None:
            kname, kcfg = kernel_node.children
            kernel = KernelRef(str(kname), self.attr_dict(kcfg))
        region = None
        if region_node is not None:
            ps, ops, yields = [], [], []
            for c in region_node.children:
                if c is None:
                    continue
                if c.data == "param":
                    ps.extend(self.params([c]))
                elif c.data == "op":
                    ops.append(self.op(c))
                elif c.data == "value_list":
                    yields = [str(t) for t in c.children]
            region = Region(ps, ops, yields)
        return Op(str(kind_tok), result_names, operands, types, self.attr_dict(attrs_node), kernel,
                  self.loc(loc_node), region)

    def requests(self, node: Tree) -> RequestGraph:
        graph = RequestGraph()
        for c in node.children:
            if c.data == "stage":
                name_tok, attrs, loc = c.children
                if graph.stage(str(name_tok)) is not None:
                    raise self.error(name_tok, f"stage '{name_tok}' is declared twice")
                graph.add_stage(Stage(str(name_tok), self.attr_dict(attrs), self.loc(loc)))
            else:
                src, dst = c.children
                for tok in (src, dst):
                    if graph.stage(str(tok)) is None:
                        raise self.error(tok, f"edge names undeclared stage '{tok}'")
                graph.add_edge(str(src), str(dst))
        return graph
