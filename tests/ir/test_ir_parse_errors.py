"""Malformed IR text: each error is an IRParseError at the right line:col with a clear message.

The fuzz test mutates valid printed modules: every mutant either parses (and then round-trips)
or raises IRParseError, never any other exception.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsc.errors import IRParseError
from vsc.ir.parser import parse_module
from vsc.ir.printer import print_module

from .strategies import serving_modules

VALID = """\
module @m {
  deployment {}
  target cpu {} loc(import "x")
  model @tiny {} {
    weight @w : f32[4, 8] = load("w")
    func @step[T](%x: f32[T, 8]) {
      %y = linear(%x, @w) : f32[T, 4]
      return %y
    }
  }
  schedule {}
  cache {layout = "contiguous", block_size = 1, dtype = "f32", capacity_tokens = 0, budget_bytes = 0, prefix_sharing = "none", eviction = "none"}
  batching {mode = "static", max_batch = 1, max_tokens = 16, chunked_prefill = 0, order = "fcfs", preemption = "recompute"}
  requests {
    stage a {}
    stage b {}
    a -> b
  }
}
"""


def test_valid_base_text_parses():
    module = parse_module(VALID)
    assert [w.name for w in module.model.weights] == ["@w"]
    assert module.requests.edges() == [("a", "b")]


def _edit(old: str, new: str, count: int = 1) -> str:
    assert VALID.count(old) == count, old
    return VALID.replace(old, new, 1)


# (case id, malformed text, line, column, message substring)
CASES = [
    ("unexpected-token", _edit("target cpu", "target 42"), 3, 10, "unexpected '42'; expected one of IDENT"),
    ("unexpected-character", _edit("deployment {}", "deployment {a = #}"), 2, 19, "unexpected character '#'"),
    ("unexpected-eof", VALID[:VALID.index("  requests {") + len("  requests {")], 14, 13, "unexpected end of input"),
    ("unknown-cache-field", _edit('eviction = "none"}', 'eviction = "none", colour = "red"}'), 12, 3,
     "unknown cache field 'colour'"),
    ("missing-batching-field", _edit(', preemption = "recompute"}', "}"), 13, 3,
     "batching is missing field(s) preemption"),
    ("wrong-field-type-str", _edit("block_size = 1", 'block_size = "1"'), 12, 3,
     "cache field 'block_size' must be int, got '1'"),
    ("wrong-field-type-bool", _edit("max_batch = 1", "max_batch = true"), 13, 3,
     "batching field 'max_batch' must be int, got True"),
    ("wrong-field-type-int", _edit('order = "fcfs"', "order = 1"), 13, 3,
     "batching field 'order' must be str, got 1"),
    ("duplicate-weight", _edit('load("w")\n', 'load("w")\n    weight @w : f32[8] = load("w2")\n'), 6, 5,
     "weight @w is declared twice"),
    ("duplicate-stage", _edit("stage b {}", "stage a {}"), 16, 11, "stage 'a' is declared twice"),
    ("edge-to-undeclared-stage", _edit("a -> b", "a -> c"), 17, 10, "edge names undeclared stage 'c'"),
    ("edge-from-undeclared-stage", _edit("a -> b", "z -> b"), 17, 5, "edge names undeclared stage 'z'"),
    ("bad-loc-kind", _edit('loc(import "x")', 'loc(magic "x")'), 3, 21, "bad location 'magic'"),
    ("loc-kind-without-detail", _edit('loc(import "x")', "loc(pass)"), 3, 21, "bad location 'pass'"),
    ("spec-loc-without-position", _edit('loc(import "x")', 'loc(spec "x.vs")'), 3, 21, "bad location 'spec'"),
    ("non-integer-loc-line", _edit('loc(import "x")', 'loc("x.vs":1.5:2)'), 3, 28, "expected an integer, got 1.5"),
    ("negative-dimension", _edit("f32[4, 8] =", "f32[4, -8] ="), 5, 24, "dimension must be a non-negative int"),
    ("fractional-dimension", _edit("f32[T, 4]", "f32[T, 2.5]"), 7, 36, "dimension must be a non-negative int or a symbol, got 2.5"),
    ("duplicate-attribute", _edit("deployment {}", "deployment {a = 1, b = [], a = 2}"), 2, 30, "duplicate attribute 'a'"),
    ("duplicate-quoted-attribute", _edit("deployment {}", 'deployment {a = 1, "a" = 2}'), 2, 22, "duplicate attribute 'a'"),
    ("bad-string-escape", _edit('load("w")', r'load("w\q")'), 5, 34, "bad string literal"),
    ("quoted-weight-reference", _edit('load("w")', 'concat("@w")'), 5, 36, "starts with '@'"),
    ("number-out-of-range", _edit("deployment {}", "deployment {x = 1e999}"), 2, 19, "number 1e999 is out of range"),
    ("missing-return", _edit("      return %y\n", ""), 8, 5, "unexpected '}'"),
]


@pytest.mark.parametrize("text,line,column,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_ir_reports_location_and_message(text, line, column, message):
    with pytest.raises(IRParseError) as info:
        parse_module(text, "bad.vsir")
    err = info.value
    assert (err.location.file, err.location.line, err.location.column) == ("bad.vsir", line, column), err
    assert message in err.message
    assert str(err).startswith(f"bad.vsir:{line}:{column}: error: ")
    # The rendered error quotes the offending line with a caret under the column.
    rendered = err.render().splitlines()
    if line <= len(text.splitlines()):
        assert rendered[1] == "    " + text.splitlines()[line - 1]
        assert rendered[2] == "    " + " " * (column - 1) + "^"


# -- fuzz: mutants of valid text parse or raise IRParseError ------------------------------

_GOLDEN = Path(__file__).parent / "golden" / "llama_tiny.vsir"
# Characters with a meaning in the IR grammar, plus arbitrary ones.
_MUTATION_CHARS = st.one_of(st.sampled_from('{}()[]^<>-,:="\\@%.e+/ \n0123456789Tabx'), st.characters())


@st.composite
def mutants(draw) -> str:
    text = draw(st.one_of(
        st.just(VALID),
        st.just(_GOLDEN.read_text()),
        serving_modules().map(print_module),
    ))
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["delete", "insert", "replace"]))
        if action == "insert" or pos == len(text):
            text = text[:pos] + draw(_MUTATION_CHARS) + text[pos:]
        elif action == "delete":
            text = text[:pos] + text[pos + 1:]
        else:
            text = text[:pos] + draw(_MUTATION_CHARS) + text[pos + 1:]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutants())
def test_mutated_text_parses_or_raises_ir_parse_error(text):
    try:
        module = parse_module(text)
    except IRParseError as err:
        lines = text.split("\n")
        assert 1 <= err.location.line <= len(lines)
        assert err.location.column >= 1
        assert err.message
        return
    # Whatever parses is a module the printer can write and the parser read back unchanged.
    printed = print_module(module)
    assert parse_module(printed) == module
    assert print_module(parse_module(printed)) == printed
