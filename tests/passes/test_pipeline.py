"""Pipeline text parses and prints back identically; bad pipelines fail with a column."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from vsc.errors import PipelineError
from vsc.passes.base import build_pipeline
from vsc.passes.pipeline import PassSpec, format_pipeline, parse_pipeline


@pytest.mark.parametrize("text", [
    "",
    "fuse-qkv",
    "fuse-qkv,fuse-gate-up",
    "paged-kv{block=16}",
    "fuse-qkv,paged-kv{block=16,tokens=4096},continuous-batching{max_batch=32,max_tokens=2048}",
    'my-pass{path="a b,c",ratio=0.5,flag=true}',
])
def test_round_trip(text):
    assert format_pipeline(parse_pipeline(text)) == text


def test_whitespace_is_canonicalised():
    assert format_pipeline(parse_pipeline(" fuse-qkv , paged-kv{ block = 16 } ")) == "fuse-qkv,paged-kv{block=16}"


names = st.from_regex(r"[a-z][a-z0-9\-]{0,10}", fullmatch=True)
values = st.one_of(st.integers(-10**6, 10**6).map(str), st.from_regex(r"[A-Za-z0-9_.]{1,8}", fullmatch=True),
                   st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8))


@given(st.lists(st.tuples(names, st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True), values, max_size=3)), max_size=5))
def test_round_trip_property(items):
    specs = [PassSpec(n, dict(opts)) for n, opts in items]
    text = format_pipeline(specs)
    again = parse_pipeline(text)
    assert [(s.name, s.options) for s in again] == [(s.name, s.options) for s in specs]
    assert format_pipeline(again) == text


@pytest.mark.parametrize("text,column,needle", [
    ("fuse-qkv,,paged-kv", 10, "expected a pass name"),
    ("paged-kv{block}", 15, "expected '='"),
    ("paged-kv{block=16", 18, "expected ',' or '}'"),
    ("paged-kv{block=16,block=32}", 19, "given twice"),
    ("fuse-qkv paged-kv", 10, "expected ',' between passes"),
    ("fuse-qkv,", 10, "expected a pass name after ','"),
    ("{block=16}", 1, "expected a pass name, found '{'"),
    ("paged-kv{=16}", 10, "expected an option name"),
    ("paged-kv{block=}", 16, "expected a value for option 'block'"),
    ("paged-kv{block=@}", 16, "expected a value for option 'block'"),
    ('my-pass{path="a b}', 14, "expected a value for option 'path'"),
    ("paged-kv{block=16 @", 19, "expected ',' or '}' in the options of paged-kv"),
    ("paged-kv{block=16}}", 19, "expected ',' between passes, found '}'"),
])
def test_syntax_errors_have_columns(text, column, needle):
    with pytest.raises(PipelineError) as e:
        parse_pipeline(text)
    assert e.value.column == column and needle in str(e.value)
    assert e.value.render().splitlines()[2].index("^") - 4 == column - 1


@pytest.mark.parametrize("text,needle", [
    ("fuse-qvk", "unknown pass 'fuse-qvk' (did you mean 'fuse-qkv'?)"),
    ("paged-kv{blok=16}", "unknown option 'blok' for pass paged-kv"),
    ("paged-kv{block=sixteen}", "must be int, got 'sixteen'"),
    ("paged-kv{block=0}", "must be >= 1"),
])
def test_semantic_errors(text, needle):
    with pytest.raises(PipelineError) as e:
        build_pipeline(text)
    assert needle in str(e.value)


def test_options_are_typed():
    (p,) = build_pipeline("paged-kv{block=32}")
    assert p.block == 32 and p.tokens == 0 and str(p.spec) == "paged-kv{block=32}"


@given(st.text(st.sampled_from('ab-_1.{}=,"\\ @/\n'), max_size=16))
def test_malformed_text_is_a_pipeline_error_with_a_column(text):
    """Any text parses or fails with a PipelineError whose column lies within the text (or just after it)."""
    try:
        specs = parse_pipeline(text)
    except PipelineError as e:
        assert e.column is not None and 1 <= e.column <= len(text) + 1
    else:
        canonical = format_pipeline(specs)
        assert format_pipeline(parse_pipeline(canonical)) == canonical


def test_columns_count_from_the_start_of_the_text():
    """A pipeline written over several lines: the column is the offset in the whole text."""
    text = "fuse-qkv,\n  paged-kv{block 16}"
    with pytest.raises(PipelineError) as e:
        parse_pipeline(text)
    assert e.value.column == text.index("16") + 1 and "expected '=' after option 'block'" in str(e.value)
    assert [s.column for s in parse_pipeline("fuse-qkv,\n  paged-kv")] == [1, 13]
