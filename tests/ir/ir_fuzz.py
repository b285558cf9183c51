"""Mutation fuzzing of the IR text reader and the structural verifier (issue 15, item 9).

Seeds are real modules: the golden IR of the tiny llama and every golden pass test's input
and expected output (fuse-qkv, weight-int8, json-mode, speculative decoding, cuda, ...).
A mutant is a seed with a few token-level edits: a number, dtype, dimension, identifier or
string replaced (by another of the module's tokens, or by a hostile value: 0, -1, a huge
int, a string where a number goes, a symbolic dimension where a static one goes, ...), an
attribute given a value of another kind (a string, a list, none, ...), or a line deleted,
duplicated or swapped with the next one.

The property: `parse_module` then `verify_or_raise` either succeed or raise a VscError (an
IRParseError or a VerificationError, one line with a location); anything else escaping
is a bug in vsc. tests/ir/test_ir_fuzz.py runs a small seeded sample; `make fuzz-ir`
(bench/ir_fuzz.py) runs 20k+.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from hypothesis import strategies as st

from vsc.errors import VscError
from vsc.ir.parser import parse_module
from vsc.ir.verifier import verify_or_raise

HERE = Path(__file__).resolve().parent

# One lexical token of .vsir text: a string, a number, a %value / @symbol / identifier, or
# any other single non-space character. Whitespace between tokens is kept as it is.
_TOKEN = re.compile(r'"(?:\\.|[^"\\\n])*"'
                    r'|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?'
                    r'|[%@^]?[A-Za-z_][A-Za-z0-9_.\-]*(?:\{[a-z]\}[A-Za-z0-9_.\-]*)*'
                    r'|\S')

DTYPES = ("f32", "f16", "bf16", "i64", "i32", "i8", "q4_0", "q4_1", "q8_0", "u8", "bool", "f64", "x")
# Values a careless check trips on: zero, negative, huge, fractional, a string or a symbol
# where a number goes, none, booleans, empty containers.
HOSTILE = ("0", "-1", "1", "2", "3", "7", "32", "-0.5", "1.5", "1e308", "-1e308", "9223372036854775808",
           "340282366920938463463374607431768211456", '"x"', '""', '"0"', "T", "B", "none", "true", "false",
           "[]", "{}", "[1, 2]", "{a = 1}", "nan", "inf")
DIMS = ("T", "B", "0", "-1", "1", "3", "128", "x", "i")
# Attribute values that always parse: what an attribute edit puts after `key = `.
ATTR_VALUES = ("0", "-1", "1", "2", "-2.5", "1e308", "9223372036854775808", '"x"', '""', '"f32"', '"paged"', "none",
               "true", "false", "[]", "{}", '[1, "a"]', "[0]", "{a = 1}", "[[1]]")
_ATTR = re.compile(r"([A-Za-z_][A-Za-z0-9_]*) = ("
                   r'"(?:\\.|[^"\\\n])*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|none|true|false|\[[^\[\]{}]*\])')


def _seed_texts() -> list[str]:
    texts = [(HERE / "golden" / "llama_tiny.vsir").read_text()]
    for path in sorted((HERE / "golden_passes").glob("*.vsir")):
        raw = path.read_text()
        if "// EXPECTED:" not in raw:
            continue
        before, after = raw.split("// EXPECTED:", 1)
        for part in (before, after):
            lines = [line for line in part.splitlines() if not line.startswith("// RUN")]
            texts.append("\n".join(lines) + "\n")
    return texts


@functools.lru_cache(maxsize=1)
def seeds() -> tuple[str, ...]:
    """The seed modules' texts (each one parses and verifies: checked by the tests)."""
    return tuple(_seed_texts())


def _tokens(line: str) -> list[re.Match]:
    return list(_TOKEN.finditer(line))


def _replacements(tok: str, module_tokens: list[str]):
    """A strategy of what to put in place of `tok`: mostly a token of the same kind (so the
    mutant still parses and reaches the verifier), sometimes any of the module's tokens or a
    hostile value."""
    same: list[str] = []
    if tok in DTYPES:
        same += DTYPES
    if re.fullmatch(r"-?\d+(\.\d+)?([eE][+-]?\d+)?", tok):
        same += DIMS + ("0", "-1", "1.5", "1e308", "9223372036854775808", '"x"', "none", "true")
    if tok.startswith('"'):
        same += ('""', '"x"', '"f32"', '"paged"', '"contiguous"', '"i8"', '"{}"', '"[1]"', "0", "-1", "none")
    if tok.startswith("%"):
        same += ("%undefined", "%x", "%h", "%logits", "%next", "%tokens", "%positions")
    if tok.startswith("@"):
        same += ("@nowhere", "@model.layers.{i}.x", "@model.experts.{e}.w", "@lm_head.weight", "@model.norm.weight")
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", tok):
        same += ("T", "B", "x", "none", "true", "cpu", "cuda", "paged", "linear", "attention", "repeat", "f32", "i8")
    options = [st.sampled_from(HOSTILE), st.sampled_from(module_tokens)]
    if same:
        options = [st.sampled_from(sorted(set(same)))] * 2 + options
    if re.fullmatch(r"-?\d+", tok):
        options.append(st.integers(-3, 1 << 20).map(str))
    return st.one_of(*options)


@st.composite
def mutants(draw) -> str:
    """A seed module's text with 1-4 token- or line-level edits."""
    text = draw(st.sampled_from(seeds()))
    lines = text.split("\n")
    module_tokens = sorted({m.group() for line in lines for m in _tokens(line)})
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        edit = draw(st.sampled_from(["token"] * 5 + ["attr"] * 3 + ["delete", "duplicate", "swap"]))
        attrs = list(_ATTR.finditer(lines[i])) if edit == "attr" else []
        if attrs:
            m = attrs[draw(st.integers(0, len(attrs) - 1))]
            lines[i] = lines[i][:m.start(2)] + draw(st.sampled_from(ATTR_VALUES)) + lines[i][m.end(2):]
        elif edit == "delete" and len(lines) > 1:
            del lines[i]
        elif edit == "duplicate":
            lines.insert(i, lines[i])
        elif edit == "swap" and i + 1 < len(lines):
            lines[i], lines[i + 1] = lines[i + 1], lines[i]
        else:
            toks = [m for m in _tokens(lines[i]) if len(m.group()) > 1 or m.group().isalnum()]  # not punctuation
            if not toks:
                continue
            m = toks[draw(st.integers(0, len(toks) - 1))]
            new = draw(_replacements(m.group(), module_tokens))
            lines[i] = lines[i][:m.start()] + new + lines[i][m.end():]
    return "\n".join(lines)


def check(text: str) -> str:
    """Parse and verify `text`: "ok", or the VscError subclass's name; anything else raises."""
    try:
        verify_or_raise(parse_module(text, "<fuzz>"))
    except VscError as e:
        str(e)              # the message itself must not fail either
        return type(e).__name__
    return "ok"
