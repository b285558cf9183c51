"""The IR reader and the structural verifier raise nothing but their typed errors (issue 15, item 9).

Three one-line edits of real modules used to crash the verifier with a TypeError; a seeded
Hypothesis fuzz of mutated golden modules (tests/ir/ir_fuzz.py) checks that nothing else
does. This runs a small sample (VSC_IR_FUZZ_EXAMPLES, default 300); `make fuzz-ir` runs 20k+.
"""
from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings

from .ir_fuzz import HERE, check, mutants, seeds
from vsc.errors import VerificationError
from vsc.ir.parser import parse_module
from vsc.ir.verifier import verify, verify_or_raise


def expected(name: str) -> str:
    """The output module of a golden pass test."""
    return (HERE / "golden_passes" / f"{name}.vsir").read_text().split("// EXPECTED:", 1)[1]


def edit(text: str, line_pattern: str, old: str, new: str) -> str:
    """`text` with `old` replaced by `new` in the one line matching `line_pattern`."""
    lines = text.split("\n")
    hits = [i for i, line in enumerate(lines) if re.search(line_pattern, line)]
    assert len(hits) == 1, hits
    assert old in lines[hits[0]]
    lines[hits[0]] = lines[hits[0]].replace(old, new, 1)
    return "\n".join(lines)


def diagnostics(text: str) -> list[str]:
    with pytest.raises(VerificationError) as err:
        verify_or_raise(parse_module(text))
    return [str(d) for d in err.value.diagnostics]


def test_the_seeds_are_real_modules():
    """Every seed parses; all but the printer's golden (a hand-made module) verify."""
    assert len(seeds()) > 40
    modules = [parse_module(text) for text in seeds()]
    assert all(verify(m) == [] for m in modules[1:])


def test_a_symbolic_dim_in_a_concatenated_weight_is_a_diagnostic():
    """Was: TypeError in the concat check (verifier.py:101), summing 'T' with ints."""
    text = edit(expected("fuse-qkv"), r"weight @model\.layers\.\{i\}\.self_attn\.q_proj\.weight :", "f32[32, 32]",
                "f32[T, 32]")
    assert diagnostics(text) == [
        "[types.weight-type] weight @model.layers.{i}.self_attn.q_proj.weight: weight type f32[T, 32] must have a known dtype "
        "and static positive dims (from import qwen2)"]


def test_a_max_context_that_is_not_an_int_is_a_diagnostic():
    """Was: TypeError comparing the cache capacity with the string (verifier.py:316)."""
    text = edit(expected("fuse-qkv"), r"^  deployment ", "max_context = 256", 'max_context = "x"')
    assert diagnostics(text) == ["[cache.max-context] deployment: max_context must be a positive int, got 'x' (from spec test.vs:1:1)"]


def test_a_symbolic_dim_in_a_quantized_weight_source_is_a_diagnostic():
    """Was: TypeError in the int8 group rule (weight_inits.py:46), 'T' % 16."""
    text = edit(expected("weight-int8"), r"weight @model\.layers\.\{i\}\.self_attn\.o_proj\.weight :", "f32[32, 32]",
                "f32[32, T]")
    assert diagnostics(text) == [
        "[types.weight-type] weight @model.layers.{i}.self_attn.o_proj.weight: weight type f32[32, T] must have a known dtype "
        "and static positive dims (from import llama)"]


@settings(max_examples=int(os.environ.get("VSC_IR_FUZZ_EXAMPLES", "300")), derandomize=True, deadline=None,
          database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutants())
def test_mutated_modules_raise_only_typed_errors(text):
    assert check(text) in ("ok", "IRParseError", "VerificationError")


def test_a_block_format_that_is_not_a_string_is_a_diagnostic():
    """Found by the fuzz: TypeError (unhashable list) testing `format in QUANT_DTYPES`."""
    text = edit(expected("quantize-weights"), r"weight @model\.layers\.\{i\}\.self_attn\.o_proj_q4_1\.weight :",
                '{format = "q4_1"}', "{format = []}")
    assert any("quantize(): format must be one of q4_0, q4_1, q8_0, got []" in d for d in diagnostics(text))


def test_a_schema_with_a_lone_surrogate_is_a_diagnostic():
    """Found reading the verifier: UnicodeEncodeError hashing a json-mode schema text that the IR's
    string escapes can spell but UTF-8 cannot encode."""
    text = edit(expected("json-mode"), "stage constrain", 'schema = "{\\"type\\":\\"object\\"}"',
                'schema = "{\\"a\\":\\"\\ud800\\"}"')
    assert any("sha256 does not match the schema text" in d for d in diagnostics(text))
