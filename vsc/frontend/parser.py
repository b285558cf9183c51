"""Parse a deployment spec (`.vs`) into the checked AST of `vsc.frontend.spec`.

Two steps:

1. Syntax. `grammar/vs.lark` is small and generic: a file is a list of items, and
   an item is `key = value`, `name [arg] { items }`, `name arg`, `metric [pNN] <= value`,
   `name(args)` or a bare `name`. Lark parses it (LALR, positions on) and the tree is
   turned into the plain `_Node` objects below. Lark's syntax errors become SpecErrors
   with a readable message ("expected '}' but found end of file").
2. Meaning. `_Checker` walks the items against a schema per section: which names may
   appear, in which shape, with which values and units. Every mistake is a SpecError
   at the line:column of the offending token; nothing else escapes.

Paths in the spec (the model folder, the dataset) are relative to the spec file's
folder. Locations carry the file name as the user gave it.
"""
from __future__ import annotations

import difflib
import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from vsc.errors import ModelError, SourceLocation, SpecError
from vsc.frontend import units
from vsc.frontend.spec import (
    AccuracySpec,
    ArrivalSpec,
    DeploymentSpec,
    Distribution,
    ModelSpec,
    OptimizeSpec,
    ServeSpec,
    SharedPrefixSpec,
    SLOSpec,
    TargetSpec,
    WorkloadSpec,
)
from vsc.ir.gguf_import import is_gguf_path, read_gguf_model
from vsc.ir.hf_import import SUPPORTED_MODEL_TYPES
from vsc.runtime.enums import OVERLOAD_POLICIES, ROUTER_POLICIES

GRAMMAR_PATH = Path(__file__).resolve().parents[2] / "grammar" / "vs.lark"

# Blocks or calls nested deeper than this are certainly a mistake (the language uses three levels).
_MAX_DEPTH = 32
# Numbers beyond this are certainly a mistake, and would overflow conversions.
_MAX_MAGNITUDE = 1e30


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(
        GRAMMAR_PATH.read_text(encoding="utf-8"),
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=False,
    )


def parse_spec_file(path: str | Path) -> DeploymentSpec:
    """Read and check the spec at `path`."""
    path = Path(path)
    where = SourceLocation(str(path), 1, 1)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("spec file not found", where) from None
    except UnicodeDecodeError as e:
        raise SpecError(f"spec file is not valid UTF-8 text ({e.reason} at byte {e.start})", where) from None
    except OSError as e:
        raise SpecError(f"cannot read spec file: {e.strerror or e}", where) from None
    return parse_spec_text(text, path)


def parse_spec_text(text: str, file: str | Path) -> DeploymentSpec:
    """Parse and check spec `text`; `file` names it in locations and anchors relative paths."""
    file_name = str(file)
    tree = _parse_syntax(text, file_name)
    items = _Builder(file_name, text).items(tree.children, depth=0)
    return _Checker(text, Path(file), items).deployment()


# ----------------------------------------------------------------------------------
# Syntax: lark tree -> plain nodes, lark errors -> SpecError


@dataclass
class _Number:
    value: int | float
    text: str
    loc: SourceLocation


@dataclass
class _Quantity:
    value: int | float
    number_text: str
    unit: str
    loc: SourceLocation

    @property
    def text(self) -> str:
        return units.format_quantity(self.number_text, self.unit)


@dataclass
class _String:
    value: str
    loc: SourceLocation

    @property
    def text(self) -> str:
        return json.dumps(self.value)


@dataclass
class _Ident:
    name: str
    loc: SourceLocation

    @property
    def text(self) -> str:
        return self.name


@dataclass
class _KwArg:
    name: str
    value: "_Value"
    loc: SourceLocation


@dataclass
class _Call:
    name: str
    args: list["_Value"]
    kwargs: list[_KwArg]
    loc: SourceLocation

    @property
    def text(self) -> str:
        return f"{self.name}(...)"


_Value = _Number | _Quantity | _String | _Ident | _Call


@dataclass
class _Assign:
    """`name = value`"""

    name: str
    value: _Value
    loc: SourceLocation


@dataclass
class _Section:
    """`name [arg] { body }` (body None: the directive `name arg`)."""

    name: str
    arg: _String | _Ident | None
    body: list["_Item"] | None
    loc: SourceLocation


@dataclass
class _Compare:
    """`metric [percentile] op value`"""

    name: str
    percentile: _Ident | None
    op: str
    op_loc: SourceLocation
    value: _Value
    loc: SourceLocation


@dataclass
class _CallItem:
    """`name(args)` on its own"""

    call: _Call

    @property
    def name(self) -> str:
        return self.call.name

    @property
    def loc(self) -> SourceLocation:
        return self.call.loc


@dataclass
class _Flag:
    """a bare `name`"""

    name: str
    loc: SourceLocation


_Item = _Assign | _Section | _Compare | _CallItem | _Flag

# How each item shape is named in messages.
_SHAPES = {_Assign: "key", _Section: "section", _Compare: "objective", _CallItem: "call", _Flag: "name"}


def _end_location(text: str) -> tuple[int, int]:
    """Line and column just after the last non-blank character (1:1 for a blank text)."""
    stripped = text.rstrip()
    if not stripped:
        return 1, 1
    line = stripped.count("\n") + 1
    last = stripped.rsplit("\n", 1)[-1]
    return line, len(last) + 1


_TOKEN_LABELS = {
    "RBRACE": "'}'",
    "RPAR": "')'",
    "EQUAL": "'='",
    "LBRACE": "'{'",
    "LPAR": "'('",
    "CMP": "'<=' or '>='",
    "VALUE": "a value",
    "NAME": "a name",
    "STRING": "a string",
    "NUMBER": "a number",
    "UNIT": "a unit",
    "COMMA": "','",
    "SEMICOLON": "';'",
    "_NL": "a newline",
    "SEPARATOR": "a newline, ',' or ';'",
    "$END": "end of file",
}
_SEPARATORS = {"_NL", "COMMA", "SEMICOLON"}


def _describe_found(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    if token.type == "_NL":
        return "end of line" if "\n" in token.value else "a comment"
    if token.type == "STRING":
        return f"string {token.value}"
    return f"'{token.value}'"


def _join_or(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]


def _syntax_message(token: Token, accepts: set[str], open_brackets: dict[str, int]) -> str:
    found = _describe_found(token)
    accepts = set(accepts)
    if "UNIT" in accepts and len(accepts) > 1:
        accepts.discard("UNIT")  # a unit is optional after a number; it is never the fix
    if "RBRACE" in accepts and token.type == "$END":
        return "expected '}' but found end of file (a block is not closed)"
    if _SEPARATORS <= accepts and token.type in ("NAME", "UNIT", "STRING", "NUMBER"):
        return f"expected a newline, ',' or ';' before {found}"
    if token.type in ("RBRACE", "RPAR") and token.type not in accepts and not open_brackets.get(token.type):
        return f"unexpected {found}: there is no open {'block' if token.type == 'RBRACE' else 'call'} to close"
    if "$END" in accepts and "NAME" in accepts:
        return f"expected 'deployment <name> {{ ... }}' but found {found}"
    if {"NAME", "STRING", "NUMBER"} <= accepts and "EQUAL" not in accepts:
        accepts -= {"NAME", "STRING", "NUMBER"}
        accepts.add("VALUE")
    if _SEPARATORS <= accepts:
        # The token is not one that starts an item, so a missing separator is not the
        # problem: name separators only when nothing else would do.
        accepts -= _SEPARATORS
        if not accepts:
            accepts.add("SEPARATOR")
    order = list(_TOKEN_LABELS)
    labels = [_TOKEN_LABELS[t] for t in sorted(accepts, key=lambda t: order.index(t) if t in order else len(order))
              if t in _TOKEN_LABELS]
    if not labels or len(labels) > 4:
        return f"unexpected {found}"
    return f"expected {_join_or(labels)} but found {found}"


_BRACKET_SCAN = re.compile(r'"(?:[^"\\\n]|\\.)*"?|#[^\n]*|[{}()]')


def _open_brackets(text: str, end: int) -> dict[str, int]:
    """How many blocks and calls are open at offset `end` (strings and comments skipped)."""
    depth = {"RBRACE": 0, "RPAR": 0}
    for m in _BRACKET_SCAN.finditer(text, 0, end):
        tok = m.group()
        if tok in "{}":
            depth["RBRACE"] += 1 if tok == "{" else -1
        elif tok in "()":
            depth["RPAR"] += 1 if tok == "(" else -1
    return depth


def _char_label(ch: str) -> str:
    return f"'{ch}'" if ch.isprintable() else f"U+{ord(ch):04X}"


def _parse_syntax(text: str, file: str) -> Tree:
    try:
        return _lark().parse(text)
    except UnexpectedCharacters as e:
        ch = text[e.pos_in_stream] if 0 <= e.pos_in_stream < len(text) else e.char
        if ch == '"':
            message = "unterminated string (a string ends with '\"' on the same line)"
        elif ch == ":":
            message = "unexpected character ':' (give a key its value with '=')"
        else:
            message = f"unexpected character {_char_label(ch)}"
        raise SpecError(message, SourceLocation(file, e.line, e.column), text) from None
    except UnexpectedToken as e:
        accepts = e.accepts or e.expected
        if e.token.type == "$END":
            line, column = _end_location(text)
        else:
            line, column = e.token.line, e.token.column
        start = len(text) if e.token.type == "$END" or e.token.start_pos is None else e.token.start_pos
        message = _syntax_message(e.token, accepts, _open_brackets(text, start))
        raise SpecError(message, SourceLocation(file, line, column), text) from None
    except UnexpectedEOF:
        line, column = _end_location(text)
        raise SpecError("unexpected end of file", SourceLocation(file, line, column), text) from None
    except UnexpectedInput as e:  # any other lark syntax error
        line = getattr(e, "line", None) or 1
        column = getattr(e, "column", None) or 1
        raise SpecError("syntax error", SourceLocation(file, line, column), text) from None


_INT_RE = re.compile(r"[+-]?[0-9]+")
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}


class _Builder:
    """Turns lark's tree into `_Item`s and `_Value`s (numbers and strings decoded)."""

    def __init__(self, file: str, text: str):
        self.file = file
        self.text = text

    def loc(self, node: Tree | Token) -> SourceLocation:
        if isinstance(node, Token):
            return SourceLocation(self.file, node.line, node.column)
        return SourceLocation(self.file, node.meta.line, node.meta.column)

    def error(self, message: str, node: Tree | Token) -> SpecError:
        return SpecError(message, self.loc(node), self.text)

    def items(self, nodes: list, depth: int) -> list[_Item]:
        return [self.item(n, depth) for n in nodes]

    def item(self, node: Tree, depth: int) -> _Item:
        kind = node.data
        kids = node.children
        name_tok = kids[0]
        loc = self.loc(name_tok)
        if kind == "assign":
            return _Assign(str(name_tok), self.value(kids[1], depth), loc)
        if kind in ("section", "directive"):
            arg = None
            body = None
            for kid in kids[1:]:
                if kid.data == "block":
                    if depth >= _MAX_DEPTH:
                        raise self.error(f"blocks are nested more than {_MAX_DEPTH} deep", kid)
                    body = self.items(kid.children, depth + 1)
                else:
                    arg = self.value(kid, depth)
            return _Section(str(name_tok), arg, body, loc)
        if kind == "compare":
            percentile = None
            rest = kids[1:]
            if isinstance(rest[0], Token) and rest[0].type == "NAME":
                percentile = _Ident(str(rest[0]), self.loc(rest[0]))
                rest = rest[1:]
            op_tok, value = rest
            return _Compare(str(name_tok), percentile, str(op_tok), self.loc(op_tok), self.value(value, depth), loc)
        if kind == "call":
            return _CallItem(self.call(node, depth))
        if kind == "flag":
            return _Flag(str(name_tok), loc)
        raise AssertionError(f"unknown item {kind}")  # grammar and builder disagree

    def number(self, tok: Token) -> int | float:
        text = str(tok)
        if _INT_RE.fullmatch(text):
            if len(text.lstrip("+-")) > 30:
                raise self.error(f"number '{text}' is out of range", tok)
            return int(text)
        value = float(text)
        if not math.isfinite(value) or abs(value) > _MAX_MAGNITUDE:
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

    def value(self, node: Tree, depth: int) -> _Value:
        kind = node.data
        kids = node.children
        if kind == "number":
            return _Number(self.number(kids[0]), str(kids[0]), self.loc(kids[0]))
        if kind == "quantity":
            return _Quantity(self.number(kids[0]), str(kids[0]), str(kids[1]), self.loc(kids[0]))
        if kind == "string":
            return _String(self.string(kids[0]), self.loc(kids[0]))
        if kind == "ident":
            return _Ident(str(kids[0]), self.loc(kids[0]))
        if kind == "call":
            return self.call(node, depth + 1)
        raise AssertionError(f"unknown value {kind}")

    def call(self, node: Tree, depth: int) -> _Call:
        name_tok, *arg_nodes = node.children
        if depth >= _MAX_DEPTH:
            raise self.error(f"calls are nested more than {_MAX_DEPTH} deep", name_tok)
        args: list[_Value] = []
        kwargs: list[_KwArg] = []
        for a in arg_nodes:
            if a.data == "kwarg":
                key, val = a.children
                kwargs.append(_KwArg(str(key), self.value(val, depth), self.loc(key)))
            else:
                if kwargs:
                    raise self.error("a positional argument cannot follow a keyword argument", a)
                args.append(self.value(a, depth))
        return _Call(str(name_tok), args, kwargs, self.loc(name_tok))


# ----------------------------------------------------------------------------------
# Meaning: items -> DeploymentSpec


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _describe_value(v: _Value) -> str:
    if isinstance(v, _Number):
        return f"'{v.text}'"
    if isinstance(v, _Quantity):
        return f"'{v.text}'"
    if isinstance(v, _String):
        return f"string {v.text}"
    if isinstance(v, _Ident):
        return f"'{v.name}'"
    return f"call '{v.name}(...)'"


@dataclass
class _Field:
    """What a name in a block must look like: its item shape and how to write it."""

    shape: type
    usage: str


_QUANTITY_EXAMPLES = {units.TIME: "200 ms", units.SIZE: "8 GiB", units.RATE: "8 req/s",
                      units.THROUGHPUT: "500 tok/s"}

_DEPLOYMENT_SECTIONS = {
    "model": _Field(_Section, 'model "path/to/model" { dtype = f32 }  (an HF folder, or a .gguf file)'),
    "target": _Field(_Section, "target cpu { threads = 4, memory = 8 GiB }"),
    "workload": _Field(_Section, "workload { ... }"),
    "slo": _Field(_Section, "slo { ttft p99 <= 200 ms }"),
    "accuracy": _Field(_Section, "accuracy { greedy_exact(probes = 8) }"),
    "serve": _Field(_Section, 'serve { host = "127.0.0.1", port = 8000 }'),
    "optimize": _Field(_Section, 'optimize "fuse-qkv,paged-kv{block=16}"'),
}
_REQUIRED_SECTIONS = ("model", "target", "workload")

_MODEL_KEYS = {"dtype": _Field(_Assign, "dtype = f32")}
_DTYPES = {
    "f32": "f32", "float32": "f32", "fp32": "f32",
    "bf16": "bf16", "bfloat16": "bf16",
    "f16": "f16", "float16": "f16", "fp16": "f16",
}
_DEFAULT_DTYPE = {"cpu": "f32", "cuda": "bf16"}

_TARGET_KEYS = {
    "cpu": {
        "threads": _Field(_Assign, "threads = 4"),
        "memory": _Field(_Assign, "memory = 8 GiB"),
    },
    "cuda": {
        "arch": _Field(_Assign, "arch = sm_90"),
        "gpus": _Field(_Assign, "gpus = 1"),
        "memory": _Field(_Assign, "memory = 80 GiB"),
    },
}
_TARGET_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "cuda": "cuda", "x86": "cpu", "arm": "cpu", "cpu": "cpu"}
_ARCH_RE = re.compile(r"sm_[0-9]{2,3}[a-z]?")

_WORKLOAD_KEYS = {
    "arrivals": _Field(_Assign, "arrivals = poisson(8 req/s)"),
    "prompt_tokens": _Field(_Assign, "prompt_tokens = uniform(32, 256)"),
    "output_tokens": _Field(_Assign, "output_tokens = fixed(64)"),
    "shared_prefix": _Field(_Section, "shared_prefix { tokens = 512, share = 0.9 }"),
    "dataset": _Field(_Assign, 'dataset = "prompts.jsonl"'),
    "kind": _Field(_Assign, "kind = code_edit"),
}
# What the requests are like, beyond their lengths: `vsc search` and `vsc bench` build
# that kind of request set, and `optimize auto` picks passes that pay on it (predicted_edit:
# requests carry their expected answer as OpenAI's `prediction`, so speculation drafts from
# it; vsc.passes.pipeline.auto_pipeline).
WORKLOAD_KINDS = ("chat", "shared_prefix", "code_edit", "json", "predicted_edit")
_REQUIRED_WORKLOAD = ("arrivals", "prompt_tokens", "output_tokens")
_SHARED_PREFIX_KEYS = {
    "tokens": _Field(_Assign, "tokens = 512"),
    "share": _Field(_Assign, "share = 0.9"),
}
# distribution name -> parameter names
_DISTRIBUTIONS = {
    "fixed": ("n",),
    "uniform": ("lo", "hi"),
    "normal": ("mean", "std"),
    "lognormal": ("mean", "sigma"),
}
_ARRIVALS = {"poisson": ("rate",), "closed": ("concurrency",)}

_LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
_SLO_METRICS = _LATENCY_METRICS + ("throughput",)
_PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99.9": 99.9}

# accuracy check -> (parameter names, how many are required)
_ACCURACY_CHECKS = {
    "greedy_exact": (("probes", "tolerance"), 0),
    "logits_tol": (("tolerance", "probes"), 1),
}

_SERVE_KEYS = {
    "host": _Field(_Assign, 'host = "127.0.0.1"'),
    "port": _Field(_Assign, "port = 8000"),
    "max_context": _Field(_Assign, "max_context = 2048"),
    "api": _Field(_Assign, "api = openai"),
    "overload": _Field(_Assign, "overload = shed"),
    "replicas": _Field(_Assign, "replicas = 2"),
    "router": _Field(_Assign, "router = prefix_affinity"),
}
_APIS = ("openai",)


class _Checker:
    """Checks the items of one spec against the schema and builds the AST."""

    def __init__(self, text: str, file: Path, items: list[_Item]):
        self.text = text
        self.file_name = str(file)
        self.file = file.resolve()
        self.base = self.file.parent
        self.items = items
        self.model_config: dict = {}

    # -- helpers ---------------------------------------------------------------

    def error(self, message: str, loc: SourceLocation) -> SpecError:
        return SpecError(message, loc, self.text)

    def fields(self, items: list[_Item], where: str, schema: dict[str, _Field],
               other: dict[str, str] | None = None) -> dict[str, _Item]:
        """Index `items` by name; unknown names, wrong shapes and duplicates are errors.

        `other` maps names that are valid elsewhere to why they are not valid here.
        """
        seen: dict[str, _Item] = {}
        for item in items:
            name = item.name
            shape = _SHAPES[type(item)]
            if name not in schema:
                if other and name in other:
                    raise self.error(other[name], item.loc)
                word = "section" if shape == "section" else "key"
                raise self.error(f"unknown {word} '{name}' in {where}{_suggest(name, schema)}", item.loc)
            expected = schema[name]
            if not isinstance(item, expected.shape):
                raise self.error(f"'{name}' is written '{expected.usage}'", item.loc)
            if name in seen:
                word = "section" if shape == "section" else "key"
                first = seen[name].loc.line
                raise self.error(f"duplicate {word} '{name}' in {where} (first given on line {first})", item.loc)
            seen[name] = item
        return seen

    def block_only(self, sec: _Section, usage: str) -> list[_Item]:
        """The body of a section that takes no argument."""
        if sec.arg is not None:
            raise self.error(f"'{sec.name}' takes no argument: write '{usage}'", sec.arg.loc)
        if sec.body is None:
            raise self.error(f"'{sec.name}' needs a block: write '{usage}'", sec.loc)
        return sec.body

    def number(self, v: _Value, what: str) -> int | float:
        if isinstance(v, _Quantity):
            raise self.error(f"{what} is a plain number, without a unit (got '{v.text}')", v.loc)
        if not isinstance(v, _Number):
            raise self.error(f"{what} must be a number, got {_describe_value(v)}", v.loc)
        return v.value

    def whole(self, v: _Value, what: str) -> int:
        """A positive whole number (`4`, or `4.0` / `1e2` when they are whole)."""
        n = self.number(v, what)
        if isinstance(n, float):
            if not n.is_integer():
                raise self.error(f"{what} must be a whole number, got '{v.text}'", v.loc)
            n = int(n)
        if n < 1:
            raise self.error(f"{what} must be a positive whole number, got '{v.text}'", v.loc)
        return n

    def positive(self, v: _Value, what: str, allow_zero: bool = False) -> float:
        n = self.number(v, what)
        if n < 0 or (n == 0 and not allow_zero):
            need = "zero or more" if allow_zero else "positive"
            raise self.error(f"{what} must be {need}, got '{v.text}'", v.loc)
        return float(n)

    def quantity(self, v: _Value, what: str, kind: str) -> int | float:
        if isinstance(v, _Number):
            raise self.error(
                f"{what} needs a unit: '{v.text}' is not {units.KIND_NOUNS[kind]} "
                f"(use {units.describe_units(kind)})", v.loc)
        if not isinstance(v, _Quantity):
            raise self.error(f"{what} must be {units.KIND_NOUNS[kind]} such as '{_QUANTITY_EXAMPLES[kind]}', "
                             f"got {_describe_value(v)}", v.loc)
        try:
            value = units.convert(v.value, v.unit, kind, v.number_text)
        except units.UnitError as e:
            raise self.error(str(e), v.loc) from None
        if value <= 0:
            raise self.error(f"{what} must be positive, got '{v.text}'", v.loc)
        return value

    def word(self, v: _Value, what: str) -> str:
        """A name written bare or in quotes (`f32` or `"f32"`)."""
        if isinstance(v, _Ident):
            return v.name
        if isinstance(v, _String):
            return v.value
        raise self.error(f"{what} must be a name, got {_describe_value(v)}", v.loc)

    def string(self, v: _Value, what: str) -> str:
        if not isinstance(v, _String):
            raise self.error(f"{what} must be a string in double quotes, got {_describe_value(v)}", v.loc)
        return v.value

    def bind(self, call: _Call, params: tuple[str, ...], required: int) -> dict[str, _Value]:
        """Match a call's arguments to parameter names (positional or `name = value`)."""
        sig = f"{call.name}({', '.join(params)})"
        if len(call.args) > len(params):
            extra = call.args[len(params)]
            raise self.error(f"too many arguments to {call.name}: expected {sig}", extra.loc)
        bound: dict[str, _Value] = dict(zip(params, call.args))
        for kw in call.kwargs:
            if kw.name not in params:
                raise self.error(f"unknown argument '{kw.name}' to {call.name}{_suggest(kw.name, params)}"
                                 f": expected {sig}", kw.loc)
            if kw.name in bound:
                raise self.error(f"argument '{kw.name}' given twice to {call.name}", kw.loc)
            bound[kw.name] = kw.value
        for p in params[:required]:
            if p not in bound:
                raise self.error(f"{call.name} is missing '{p}': expected {sig}", call.loc)
        return bound

    def call(self, v: _Value, what: str, known: dict, example: str) -> _Call:
        if not isinstance(v, _Call):
            raise self.error(f"{what} must be one of {', '.join(f'{k}(...)' for k in known)} "
                             f"(e.g. {example}), got {_describe_value(v)}", v.loc)
        if v.name not in known:
            raise self.error(f"unknown {what} '{v.name}'{_suggest(v.name, known)}; "
                             f"use {', '.join(known)}", v.loc)
        return v

    def local_path(self, s: _String) -> Path:
        p = Path(s.value).expanduser() if s.value.startswith("~") else Path(s.value)
        return (p if p.is_absolute() else self.base / p).resolve()

    # -- deployment ------------------------------------------------------------

    def deployment(self) -> DeploymentSpec:
        if not self.items:
            loc = SourceLocation(self.file_name, 1, 1)
            raise self.error("empty spec: expected 'deployment <name> { ... }'", loc)
        first = self.items[0]
        if not isinstance(first, _Section) or first.name != "deployment":
            raise self.error(f"expected 'deployment <name> {{ ... }}' but found '{first.name}'"
                             f"{_suggest(first.name, ['deployment'])}", first.loc)
        if len(self.items) > 1:
            raise self.error("only one deployment per file; this spec already has one "
                             f"(line {first.loc.line})", self.items[1].loc)
        dep = first
        if dep.arg is None:
            raise self.error("the deployment needs a name: 'deployment <name> { ... }'", dep.loc)
        name = self.word(dep.arg, "the deployment name")
        if dep.body is None:
            raise self.error(f"deployment '{name}' needs a block: 'deployment {name} {{ ... }}'", dep.loc)
        sections = self.fields(dep.body, "deployment", _DEPLOYMENT_SECTIONS)
        for req in _REQUIRED_SECTIONS:
            if req not in sections:
                raise self.error(f"deployment '{name}' is missing the '{req}' section "
                                 f"(e.g. '{_DEPLOYMENT_SECTIONS[req].usage}')", dep.loc)

        target = self.target(sections["target"])
        model = self.model(sections["model"], target)
        workload = self.workload(sections["workload"])
        spec = DeploymentSpec(
            name=name,
            file=self.file,
            model=model,
            target=target,
            workload=workload,
            loc=dep.loc,
        )
        if "slo" in sections:
            spec.slos = self.slos(sections["slo"])
        if "accuracy" in sections:
            spec.accuracy = self.accuracy(sections["accuracy"])
        if "serve" in sections:
            spec.serve = self.serve(sections["serve"], spec.slos)
        if "optimize" in sections:
            spec.optimize = self.optimize(sections["optimize"])
        return spec

    # -- model -----------------------------------------------------------------

    def model(self, sec: _Section, target: TargetSpec) -> ModelSpec:
        usage = _DEPLOYMENT_SECTIONS["model"].usage
        if sec.arg is None:
            raise self.error(f"model needs the path of a model folder: write '{usage}'", sec.loc)
        if not isinstance(sec.arg, _String):
            raise self.error(f"the model path must be a string in double quotes, e.g. '{usage}'", sec.arg.loc)
        path = self.check_model_folder(sec.arg)
        keys = self.fields(sec.body or [], "model", _MODEL_KEYS)
        dtype = _DEFAULT_DTYPE[target.kind]
        if "dtype" in keys:
            v = keys["dtype"].value
            word = self.word(v, "dtype")
            if word not in _DTYPES:
                raise self.error(f"unknown dtype '{word}' (use f32, bf16 or f16)", v.loc)
            dtype = _DTYPES[word]
        return ModelSpec(path=path, dtype=dtype, loc=sec.loc)

    def check_model_folder(self, arg: _String) -> Path:
        rel = arg.value
        try:
            path = self.local_path(arg)
            exists = path.exists()
            is_dir = path.is_dir()
        except (OSError, ValueError, RuntimeError):
            raise self.error(f"model path '{rel}' is not a usable path", arg.loc) from None
        if is_gguf_path(path) and exists:      # a GGUF file, served as shipped
            try:
                self.model_config = read_gguf_model(path).config
            except ModelError as e:
                raise self.error(f"model file '{rel}': {e.message}", arg.loc) from None
            return path
        if not exists:
            raise self.error(f"model folder '{rel}' not found (looked for {path})", arg.loc)
        if not is_dir:
            raise self.error(f"model path '{rel}' is neither a folder nor a .gguf file", arg.loc)
        config = path / "config.json"
        if not config.is_file():
            raise self.error(f"model folder '{rel}' has no config.json", arg.loc)
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise self.error(f"config.json in '{rel}' is not valid JSON "
                             f"({e.msg} at line {e.lineno} column {e.colno})", arg.loc) from None
        except UnicodeDecodeError:
            raise self.error(f"config.json in '{rel}' is not valid JSON (not UTF-8 text)", arg.loc) from None
        except OSError as e:
            raise self.error(f"cannot read config.json in '{rel}': {e.strerror or e}", arg.loc) from None
        if not isinstance(data, dict):
            raise self.error(f"config.json in '{rel}' is not a JSON object", arg.loc)
        model_type = data.get("model_type")
        if model_type is None:
            raise self.error(f"config.json in '{rel}' has no \"model_type\"", arg.loc)
        if model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
            raise self.error(f"unsupported model_type '{model_type}' in '{rel}' "
                             f"(vsc supports {supported})", arg.loc)
        self.model_config = data
        return path

    # -- target ----------------------------------------------------------------

    def target(self, sec: _Section) -> TargetSpec:
        if sec.arg is None:
            raise self.error("target needs a kind: 'target cpu { ... }' or 'target cuda { ... }'", sec.loc)
        kind = self.word(sec.arg, "the target kind")
        if kind not in _TARGET_KEYS:
            guess = _TARGET_ALIASES.get(kind.lower())
            hint = f"did you mean '{guess}'?" if guess else "use cpu or cuda"
            raise self.error(f"unknown target '{kind}' ({hint})", sec.arg.loc)
        schema = _TARGET_KEYS[kind]
        other = {k: f"'{k}' is not valid for target {kind} (only for target {other_kind})"
                 for other_kind, keys in _TARGET_KEYS.items() if other_kind != kind
                 for k in keys if k not in schema}
        keys = self.fields(sec.body or [], f"target {kind}", schema, other)
        spec = TargetSpec(kind=kind, loc=sec.loc)
        if "threads" in keys:
            spec.threads = self.whole(keys["threads"].value, "threads")
        if "gpus" in keys:
            spec.gpus = self.whole(keys["gpus"].value, "gpus")
        if "arch" in keys:
            v = keys["arch"].value
            arch = self.word(v, "arch")
            if not _ARCH_RE.fullmatch(arch):
                raise self.error(f"arch must look like sm_NN (e.g. sm_80, sm_90), got '{arch}'", v.loc)
            spec.arch = arch
        if "memory" in keys:
            spec.memory_bytes = self.quantity(keys["memory"].value, "memory", units.SIZE)
        return spec

    # -- workload --------------------------------------------------------------

    def workload(self, sec: _Section) -> WorkloadSpec:
        body = self.block_only(sec, _DEPLOYMENT_SECTIONS["workload"].usage)
        keys = self.fields(body, "workload", _WORKLOAD_KEYS)
        for req in _REQUIRED_WORKLOAD:
            if req not in keys:
                raise self.error(f"workload is missing '{req}' (e.g. '{_WORKLOAD_KEYS[req].usage}')", sec.loc)
        spec = WorkloadSpec(
            arrivals=self.arrivals(keys["arrivals"].value),
            prompt_tokens=self.distribution(keys["prompt_tokens"].value, "prompt_tokens"),
            output_tokens=self.distribution(keys["output_tokens"].value, "output_tokens"),
            loc=sec.loc,
        )
        if "shared_prefix" in keys:
            spec.shared_prefix = self.shared_prefix(keys["shared_prefix"])
        if "dataset" in keys:
            spec.dataset = self.dataset(keys["dataset"].value)
        if "kind" in keys:
            v = keys["kind"].value
            word = self.word(v, "workload kind")
            if word not in WORKLOAD_KINDS:
                raise self.error(f"unknown workload kind '{word}' (use {', '.join(WORKLOAD_KINDS)})", v.loc)
            spec.kind = word
        return spec

    def arrivals(self, v: _Value) -> ArrivalSpec:
        call = self.call(v, "arrival process", _ARRIVALS, "poisson(8 req/s) or closed(16)")
        bound = self.bind(call, _ARRIVALS[call.name], 1)
        if call.name == "poisson":
            rate = self.quantity(bound["rate"], "the poisson rate", units.RATE)
            return ArrivalSpec(kind="poisson", rate=rate, loc=call.loc)
        concurrency = self.whole(bound["concurrency"], "the closed-loop concurrency")
        return ArrivalSpec(kind="closed", concurrency=concurrency, loc=call.loc)

    def distribution(self, v: _Value, what: str) -> Distribution:
        call = self.call(v, f"{what} distribution", _DISTRIBUTIONS, "fixed(64) or uniform(32, 256)")
        params = _DISTRIBUTIONS[call.name]
        bound = self.bind(call, params, len(params))
        if call.name == "fixed":
            values = (float(self.whole(bound["n"], f"{what} fixed(n)")),)
        elif call.name == "uniform":
            lo = self.whole(bound["lo"], f"{what} uniform lo")
            hi = self.whole(bound["hi"], f"{what} uniform hi")
            if hi < lo:
                raise self.error(f"{what} uniform(lo, hi) needs lo <= hi, got uniform({lo}, {hi})", call.loc)
            values = (float(lo), float(hi))
        else:
            spread = params[1]
            mean = self.positive(bound["mean"], f"{what} {call.name} mean")
            width = self.positive(bound[spread], f"{what} {call.name} {spread}", allow_zero=True)
            values = (mean, width)
        return Distribution(kind=call.name, params=values, loc=call.loc)

    def shared_prefix(self, sec: _Section) -> SharedPrefixSpec:
        body = self.block_only(sec, _WORKLOAD_KEYS["shared_prefix"].usage)
        keys = self.fields(body, "shared_prefix", _SHARED_PREFIX_KEYS)
        for req in ("tokens", "share"):
            if req not in keys:
                raise self.error(f"shared_prefix is missing '{req}' "
                                 f"(e.g. '{_SHARED_PREFIX_KEYS[req].usage}')", sec.loc)
        tokens = self.whole(keys["tokens"].value, "shared_prefix tokens")
        v = keys["share"].value
        share = float(self.number(v, "share"))
        if not 0.0 <= share <= 1.0:
            raise self.error(f"share must be between 0 and 1, got '{v.text}'", v.loc)
        return SharedPrefixSpec(tokens=tokens, share=share, loc=sec.loc)

    def dataset(self, v: _Value) -> Path:
        rel = self.string(v, "dataset")
        try:
            path = self.local_path(v)
            is_file = path.is_file()
        except (OSError, ValueError, RuntimeError):
            raise self.error(f"dataset path '{rel}' is not a usable path", v.loc) from None
        if not is_file:
            raise self.error(f"dataset file '{rel}' not found (looked for {path})", v.loc)
        return path

    # -- slo -------------------------------------------------------------------

    def slos(self, sec: _Section) -> list[SLOSpec]:
        body = self.block_only(sec, _DEPLOYMENT_SECTIONS["slo"].usage)
        out: list[SLOSpec] = []
        seen: dict[tuple, _Compare] = {}
        for item in body:
            if item.name not in _SLO_METRICS:
                raise self.error(f"unknown metric '{item.name}' in slo{_suggest(item.name, _SLO_METRICS)}; "
                                 f"use {', '.join(_SLO_METRICS)}", item.loc)
            if not isinstance(item, _Compare):
                example = "throughput >= 500 tok/s" if item.name == "throughput" else f"{item.name} p99 <= 200 ms"
                raise self.error(f"an objective is written '{example}'", item.loc)
            slo = self.objective(item)
            key = (slo.metric, slo.percentile)
            if key in seen:
                label = item.name + (f" {item.percentile.name}" if item.percentile else "")
                raise self.error(f"duplicate objective '{label}' (first given on line {seen[key].loc.line})",
                                 item.loc)
            seen[key] = item
            out.append(slo)
        return out

    def objective(self, item: _Compare) -> SLOSpec:
        if item.name == "throughput":
            if item.percentile is not None:
                raise self.error("throughput takes no percentile: write 'throughput >= 500 tok/s'",
                                 item.percentile.loc)
            if item.op != ">=":
                raise self.error(f"throughput is a lower bound: use '>=', not '{item.op}'", item.op_loc)
            value = self.quantity(item.value, "throughput", units.THROUGHPUT)
            return SLOSpec(metric="throughput", percentile=None, op=">=", value=value, loc=item.loc)
        if item.percentile is None:
            raise self.error(f"{item.name} needs a percentile: write '{item.name} p99 <= ...'", item.op_loc)
        pname = item.percentile.name
        if pname not in _PERCENTILES:
            raise self.error(f"unknown percentile '{pname}' (use p50, p90, p95, p99 or p99.9)",
                             item.percentile.loc)
        if item.op != "<=":
            raise self.error(f"{item.name} is an upper bound: use '<=', not '{item.op}'", item.op_loc)
        value = self.quantity(item.value, item.name, units.TIME)
        return SLOSpec(metric=item.name, percentile=_PERCENTILES[pname], op="<=", value=value, loc=item.loc)

    # -- accuracy --------------------------------------------------------------

    def accuracy(self, sec: _Section) -> AccuracySpec:
        usage = _DEPLOYMENT_SECTIONS["accuracy"].usage
        body = self.block_only(sec, usage)
        if not body:
            raise self.error(f"accuracy needs one check: write '{usage}' "
                             "or 'accuracy { logits_tol(1e-3, probes = 4) }'", sec.loc)
        if len(body) > 1:
            raise self.error(f"accuracy takes one check, found {len(body)} "
                             f"(the first is on line {body[0].loc.line})", body[1].loc)
        item = body[0]
        if item.name not in _ACCURACY_CHECKS:
            raise self.error(f"unknown accuracy check '{item.name}'{_suggest(item.name, _ACCURACY_CHECKS)}; "
                             f"use {' or '.join(_ACCURACY_CHECKS)}", item.loc)
        if isinstance(item, _Flag):
            call = _Call(item.name, [], [], item.loc)
        elif isinstance(item, _CallItem):
            call = item.call
        else:
            raise self.error(f"an accuracy check is written '{item.name}(...)', e.g. '{usage}'", item.loc)
        params, required = _ACCURACY_CHECKS[call.name]
        bound = self.bind(call, params, required)
        spec = AccuracySpec(kind=call.name, loc=call.loc)
        if "probes" in bound:
            spec.probes = self.whole(bound["probes"], "probes")
        if "tolerance" in bound:
            spec.tolerance = self.positive(bound["tolerance"], "tolerance")
        return spec

    # -- serve -----------------------------------------------------------------

    def serve(self, sec: _Section, slos: list[SLOSpec]) -> ServeSpec:
        body = self.block_only(sec, _DEPLOYMENT_SECTIONS["serve"].usage)
        keys = self.fields(body, "serve", _SERVE_KEYS)
        spec = ServeSpec(loc=sec.loc)
        if "host" in keys:
            v = keys["host"].value
            host = self.string(v, "host")
            if not host.strip() or any(c.isspace() for c in host):
                raise self.error(f"host must be a host name or address, got {_describe_value(v)}", v.loc)
            spec.host = host
        if "port" in keys:
            v = keys["port"].value
            port = self.whole(v, "port")
            if port > 65535:
                raise self.error(f"port must be between 1 and 65535, got '{v.text}'", v.loc)
            spec.port = port
        if "max_context" in keys:
            v = keys["max_context"].value
            spec.max_context = self.whole(v, "max_context")
            limit = self.model_config.get("max_position_embeddings")
            if isinstance(limit, int) and not isinstance(limit, bool) and spec.max_context > limit:
                raise self.error(f"max_context {spec.max_context} is longer than the model's "
                                 f"max_position_embeddings ({limit})", v.loc)
        if "api" in keys:
            v = keys["api"].value
            api = self.word(v, "api")
            if api not in _APIS:
                raise self.error(f"unknown api '{api}' (vsc serves: {', '.join(_APIS)})", v.loc)
            spec.api = api
        if "overload" in keys:
            v = keys["overload"].value
            policy = self.word(v, "overload")
            if policy not in OVERLOAD_POLICIES:
                raise self.error(f"unknown overload policy '{policy}' (one of: {', '.join(OVERLOAD_POLICIES)})", v.loc)
            if policy == "shed" and not any(s.metric == "ttft" and s.op in ("<=", "<") for s in slos):
                raise self.error("overload = shed sheds requests that would miss the TTFT objective; the slo block "
                                 "has none (add e.g. 'ttft p99 <= 200 ms')", v.loc)
            spec.overload = policy
        if "replicas" in keys:
            spec.replicas = self.whole(keys["replicas"].value, "replicas")
        if "router" in keys:
            v = keys["router"].value
            router = self.word(v, "router")
            if router not in ROUTER_POLICIES:
                raise self.error(f"unknown router '{router}' (one of: {', '.join(ROUTER_POLICIES)})", v.loc)
            if spec.replicas < 2:
                raise self.error(f"router = {router} routes among replicas; the serve block has one "
                                 "(add e.g. 'replicas = 2')", v.loc)
            spec.router = router
        return spec

    # -- optimize --------------------------------------------------------------

    def optimize(self, sec: _Section) -> OptimizeSpec:
        usage = "optimize \"fuse-qkv,paged-kv{block=16}\" or optimize auto"
        arg = sec.arg
        if sec.body is not None or arg is None:
            raise self.error(f"optimize takes a pipeline string or 'auto', not a block: write '{usage}'", sec.loc)
        if isinstance(arg, _Ident):
            if arg.name != "auto":
                raise self.error(f"optimize takes a pipeline string in double quotes or 'auto', "
                                 f"got '{arg.name}'", arg.loc)
            return OptimizeSpec(pipeline=None, auto=True, loc=arg.loc)
        pipeline = arg.value.strip()
        return OptimizeSpec(pipeline=pipeline or None, auto=False, loc=arg.loc)
