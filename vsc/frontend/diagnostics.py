"""The messages of the spec language's syntax errors: lark's exceptions -> one-line SpecErrors.

Lark reports what it expected as terminal names (RBRACE, _NL, $END); this module says it as
a user reads it ("expected '}' but found end of file (a block is not closed)") at the
line:column of the offending token. `suggest` is the "did you mean" of every unknown name.
"""
from __future__ import annotations

import difflib
import re

from lark import Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from vsc.errors import SourceLocation, SpecError


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


def syntax_error(e: UnexpectedInput, text: str, file: str) -> SpecError:
    """The SpecError for lark's syntax error `e` in spec `text` (named `file` in locations)."""
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if 0 <= e.pos_in_stream < len(text) else e.char
        if ch == '"':
            message = "unterminated string (a string ends with '\"' on the same line)"
        elif ch == ":":
            message = "unexpected character ':' (give a key its value with '=')"
        else:
            message = f"unexpected character {_char_label(ch)}"
        return SpecError(message, SourceLocation(file, e.line, e.column), text)
    if isinstance(e, UnexpectedToken):
        accepts = e.accepts or e.expected
        if e.token.type == "$END":
            line, column = _end_location(text)
        else:
            line, column = e.token.line, e.token.column
        start = len(text) if e.token.type == "$END" or e.token.start_pos is None else e.token.start_pos
        message = _syntax_message(e.token, accepts, _open_brackets(text, start))
        return SpecError(message, SourceLocation(file, line, column), text)
    if isinstance(e, UnexpectedEOF):
        line, column = _end_location(text)
        return SpecError("unexpected end of file", SourceLocation(file, line, column), text)
    line = getattr(e, "line", None) or 1  # any other lark syntax error
    column = getattr(e, "column", None) or 1
    return SpecError("syntax error", SourceLocation(file, line, column), text)


def suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
