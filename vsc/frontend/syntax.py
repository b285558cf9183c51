"""Syntax of the spec language: text -> plain item nodes, with positions.

`vsc/grammar/vs.lark` is small and generic: a file is a list of items, and an item is
`key = value`, `name [arg] { items }`, `name arg`, `metric [pNN] <= value`,
`name(args)` or a bare `name`. Lark parses it (LALR, positions on) and `Builder` turns
the tree into the plain node objects below (numbers and strings decoded). Lark's syntax
errors become SpecErrors through `vsc.frontend.diagnostics`. What the items mean is
`vsc.frontend.semantics`.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedInput

from vsc.errors import SourceLocation, SpecError
from vsc.frontend import units
from vsc.frontend.diagnostics import syntax_error

GRAMMAR_PATH = Path(__file__).resolve().parents[1] / "grammar" / "vs.lark"

# Blocks or calls nested deeper than this are certainly a mistake (the language uses three levels).
MAX_DEPTH = 32
# Numbers beyond this are certainly a mistake, and would overflow conversions.
MAX_MAGNITUDE = 1e30


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(
        GRAMMAR_PATH.read_text(encoding="utf-8"),
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=False,
    )


def parse_items(text: str, file: str) -> list["Item"]:
    """The items of spec `text` (named `file` in locations); a syntax error is a SpecError."""
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise syntax_error(e, text, file) from None
    return Builder(file, text).items(tree.children, depth=0)


@dataclass
class Number:
    value: int | float
    text: str
    loc: SourceLocation


@dataclass
class Quantity:
    value: int | float
    number_text: str
    unit: str
    loc: SourceLocation

    @property
    def text(self) -> str:
        return units.format_quantity(self.number_text, self.unit)


@dataclass
class String:
    value: str
    loc: SourceLocation

    @property
    def text(self) -> str:
        return json.dumps(self.value)


@dataclass
class Ident:
    name: str
    loc: SourceLocation

    @property
    def text(self) -> str:
        return self.name


@dataclass
class KwArg:
    name: str
    value: "Value"
    loc: SourceLocation


@dataclass
class Call:
    name: str
    args: list["Value"]
    kwargs: list[KwArg]
    loc: SourceLocation

    @property
    def text(self) -> str:
        return f"{self.name}(...)"


Value = Number | Quantity | String | Ident | Call


@dataclass
class Assign:
    """`name = value`"""

    name: str
    value: Value
    loc: SourceLocation


@dataclass
class Section:
    """`name [arg] { body }` (body None: the directive `name arg`)."""

    name: str
    arg: String | Ident | None
    body: list["Item"] | None
    loc: SourceLocation


@dataclass
class Compare:
    """`metric [percentile] op value`"""

    name: str
    percentile: Ident | None
    op: str
    op_loc: SourceLocation
    value: Value
    loc: SourceLocation


@dataclass
class CallItem:
    """`name(args)` on its own"""

    call: Call

    @property
    def name(self) -> str:
        return self.call.name

    @property
    def loc(self) -> SourceLocation:
        return self.call.loc


@dataclass
class Flag:
    """a bare `name`"""

    name: str
    loc: SourceLocation


Item = Assign | Section | Compare | CallItem | Flag

# How each item shape is named in messages.
SHAPES = {Assign: "key", Section: "section", Compare: "objective", CallItem: "call", Flag: "name"}


_INT_RE = re.compile(r"[+-]?[0-9]+")
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}


class Builder:
    """Turns lark's tree into `Item`s and `Value`s (numbers and strings decoded)."""

    def __init__(self, file: str, text: str):
        self.file = file
        self.text = text

    def loc(self, node: Tree | Token) -> SourceLocation:
        if isinstance(node, Token):
            return SourceLocation(self.file, node.line, node.column)
        return SourceLocation(self.file, node.meta.line, node.meta.column)

    def error(self, message: str, node: Tree | Token) -> SpecError:
        return SpecError(message, self.loc(node), self.text)

    def items(self, nodes: list, depth: int) -> list[Item]:
        return [self.item(n, depth) for n in nodes]

    def item(self, node: Tree, depth: int) -> Item:
        kind = node.data
        kids = node.children
        name_tok = kids[0]
        loc = self.loc(name_tok)
        if kind == "assign":
            return Assign(str(name_tok), self.value(kids[1], depth), loc)
        if kind in ("section", "directive"):
            arg = None
            body = None
            for kid in kids[1:]:
                if kid.data == "block":
                    if depth >= MAX_DEPTH:
                        raise self.error(f"blocks are nested more than {MAX_DEPTH} deep", kid)
                    body = self.items(kid.children, depth + 1)
                else:
                    arg = self.value(kid, depth)
            return Section(str(name_tok), arg, body, loc)
        if kind == "compare":
            percentile = None
            rest = kids[1:]
            if isinstance(rest[0], Token) and rest[0].type == "NAME":
                percentile = Ident(str(rest[0]), self.loc(rest[0]))
                rest = rest[1:]
            op_tok, value = rest
            return Compare(str(name_tok), percentile, str(op_tok), self.loc(op_tok), self.value(value, depth), loc)
        if kind == "call":
            return CallItem(self.call(node, depth))
        if kind == "flag":
            return Flag(str(name_tok), loc)
        raise AssertionError(f"unknown item {kind}")  # grammar and builder disagree

    def number(self, tok: Token) -> int | float:
        text = str(tok)
        if _INT_RE.fullmatch(text):
            if len(text.lstrip("+-")) > 30:
                raise self.error(f"number '{text}' is out of range", tok)
            return int(text)
        value = float(text)
        if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
            raise self.error(f"number '{text}' is out of range", tok)
        return value

    def string(self, tok: Token) -> str:
        raw = str(tok)[1:-1]
        out = []
        i = 0
        while i < len(raw):
            ch = raw[i]
            if ch == "\\":
                esc = raw[i + 1]
                if esc not in _ESCAPES:
                    loc = SourceLocation(self.file, tok.line, tok.column + 1 + i)
                    raise SpecError(f"unknown escape '\\{esc}' in string (use \\\" \\\\ \\n or \\t)", loc, self.text)
                out.append(_ESCAPES[esc])
                i += 2
            else:
                out.append(ch)
                i += 1
        return "".join(out)

    def value(self, node: Tree, depth: int) -> Value:
        kind = node.data
        kids = node.children
        if kind == "number":
            return Number(self.number(kids[0]), str(kids[0]), self.loc(kids[0]))
        if kind == "quantity":
            return Quantity(self.number(kids[0]), str(kids[0]), str(kids[1]), self.loc(kids[0]))
        if kind == "string":
            return String(self.string(kids[0]), self.loc(kids[0]))
        if kind == "ident":
            return Ident(str(kids[0]), self.loc(kids[0]))
        if kind == "call":
            return self.call(node, depth + 1)
        raise AssertionError(f"unknown value {kind}")

    def call(self, node: Tree, depth: int) -> Call:
        name_tok, *arg_nodes = node.children
        if depth >= MAX_DEPTH:
            raise self.error(f"calls are nested more than {MAX_DEPTH} deep", name_tok)
        args: list[Value] = []
        kwargs: list[KwArg] = []
        for a in arg_nodes:
            if a.data == "kwarg":
                key, val = a.children
                kwargs.append(KwArg(str(key), self.value(val, depth), self.loc(key)))
            else:
                if kwargs:
                    raise self.error("a positional argument cannot follow a keyword argument", a)
                args.append(self.value(a, depth))
        return Call(str(name_tok), args, kwargs, self.loc(name_tok))
