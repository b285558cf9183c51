"""Pass pipelines as text: `fuse-qkv,paged-kv{block=16},continuous-batching{max_batch=32}`.

The syntax is `vsc/grammar/pipeline.lark`; lark parses it (LALR, contextual lexer) and its
syntax errors become PipelineErrors naming the 1-based column of the problem.
`parse_pipeline` and `format_pipeline` are exact inverses on canonical text (no spaces,
options in the order written), so a pipeline string can head every IR dump and be
pasted back into `vsc opt --passes`. Which passes and options exist is checked by
`vsc.passes.base.build_pipeline`; what `optimize auto` runs is `vsc.passes.auto`.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from vsc.errors import PipelineError

GRAMMAR_PATH = Path(__file__).resolve().parents[1] / "grammar" / "pipeline.lark"

_BARE_VALUE = re.compile(r"[A-Za-z0-9_.+\-/]+")  # the grammar's BARE: values written without quotes
_ESCAPE = re.compile(r"\\(.)")


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(GRAMMAR_PATH.read_text(encoding="utf-8"), parser="lalr", lexer="contextual")


@dataclass
class PassSpec:
    """One pipeline element: a pass name and the options written for it (as text values)."""

    name: str
    options: dict[str, str] = field(default_factory=dict)
    column: int = 1

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={_format_value(v)}" for k, v in self.options.items()) + "}"


def _format_value(v: str) -> str:
    if _BARE_VALUE.fullmatch(v):
        return v
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_pipeline(specs: list[PassSpec]) -> str:
    return ",".join(str(s) for s in specs)


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse pipeline text; errors carry the 1-based column of the problem."""
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(text, e) from None
    return [_pass_spec(text, node) for node in tree.children]


def _pass_spec(text: str, node: Tree) -> PassSpec:
    name_tok, *rest = node.children
    spec = PassSpec(str(name_tok), {}, name_tok.start_pos + 1)
    for option in rest[0].children if rest else ():
        key, value = option.children
        if str(key) in spec.options:
            raise PipelineError(f"option '{key}' given twice for {spec.name}", text, key.start_pos + 1)
        raw = str(value)
        spec.options[str(key)] = _ESCAPE.sub(r"\1", raw[1:-1]) if value.type == "QUOTED" else raw
    return spec


def _syntax_error(text: str, e: UnexpectedInput) -> PipelineError:
    """A lark syntax error as a PipelineError: what was expected there, and at which column."""
    if isinstance(e, UnexpectedToken):
        pos = len(text) if e.token.type == "$END" or e.token.start_pos is None else e.token.start_pos
        accepts = set(e.accepts or e.expected)
    elif isinstance(e, UnexpectedCharacters):
        pos = e.pos_in_stream
        accepts = set(e.allowed or ())
    else:  # no other lark error is raised by an LALR parse; kept so that none escapes untyped
        return PipelineError("syntax error", text, (getattr(e, "pos_in_stream", None) or 0) + 1)
    parser = getattr(e, "interactive_parser", None)
    stack = [t for t in (parser.parser_state.value_stack if parser else ()) if isinstance(t, Token)]
    found = f", found {text[pos]!r}" if pos < len(text) else ""
    in_options = any(t.type == "LBRACE" for t in stack)
    if "NAME" in accepts and in_options:
        message = "expected an option name"
    elif "NAME" in accepts:
        message = f"expected a pass name{found}" if found else "expected a pass name after ','"
    elif "EQUAL" in accepts:
        message = f"expected '=' after option '{_last(stack, 'NAME')}'"
    elif "BARE" in accepts or "QUOTED" in accepts:
        names = [t for t in stack if t.type == "NAME"]
        message = f"expected a value for option '{names[-1] if names else ''}'"
    elif "RBRACE" in accepts:
        braces = [i for i, t in enumerate(stack) if t.type == "LBRACE"]
        name = stack[braces[-1] - 1] if braces and braces[-1] > 0 else ""
        message = f"expected ',' or '}}' in the options of {name}"
    else:
        message = f"expected ',' between passes{found}"
    return PipelineError(message, text, pos + 1)


def _last(tokens: list[Token], kind: str) -> str:
    return next((str(t) for t in reversed(tokens) if t.type == kind), "")
