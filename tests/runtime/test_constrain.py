"""vsc.runtime.constrain on the tiny model's byte-level BPE tokenizer: schemas, masks, advancing."""
from __future__ import annotations

import json
import random

import pytest
import torch

from vsc.models.tiny import EOS_ID, VOCAB_SIZE, make_tiny
from vsc.runtime.api import InvalidRequest
from vsc.runtime import constrain
from vsc.runtime.constrain import (ANY_JSON_OBJECT, SCHEMA_MAX_BYTES, SchemaError, apply_constraints, canonical_schema,
                                   check_schema, compiler_for, make_constraint)
from vsc.runtime.tokenizer import Tokenizer

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
#: Bounded fields: any walk through the grammar ends within a few dozen tokens.
SMALL = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_model_dir(make_tiny(tmp_path_factory.mktemp("constrain") / "tiny", arch="llama"))


def allowed_ids(c) -> list[int]:
    return torch.nonzero(c.allowed()).flatten().tolist()


def test_canonical_schema_is_compact_json_of_an_object():
    assert canonical_schema('{ "type" : "object" }') == ANY_JSON_OBJECT
    assert canonical_schema({"type": "object"}) == ANY_JSON_OBJECT
    assert json.loads(canonical_schema(PERSON)) == PERSON


@pytest.mark.parametrize("schema,match", [
    ("{not json", "not valid JSON: .* at line 1 column 2"),
    ("[1, 2]", "must be a JSON object, got list"),
    ('{"type": "objekt"}', "invalid JSON Schema: Invalid type: objekt"),
    ('{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}', "invalid JSON Schema: .*nowhere"),
])
def test_bad_schemas_are_rejected_in_one_line(schema, match):
    with pytest.raises(SchemaError, match=match) as err:
        check_schema(schema)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, InvalidRequest)        # the HTTP layer answers it with a 400


def test_the_first_token_must_open_the_object_and_eos_waits_for_the_end(tok):
    c = make_constraint(tok, VOCAB_SIZE, PERSON)
    first = allowed_ids(c)
    assert first and EOS_ID not in first
    assert all(tok.decode([t], skip_special_tokens=False).startswith("{") for t in first)
    ids = tok.encode('{"name":"Al","age":42}')
    for t in ids[:-1]:
        assert t in allowed_ids(c)
        assert EOS_ID not in allowed_ids(c)
        assert c.advance(t) is None
        assert not c.is_complete
    assert c.advance(ids[-1]) == "stop"                  # the closing brace completes the document
    assert c.is_complete
    assert allowed_ids(c) == [EOS_ID]                    # nothing but EOS may follow


def test_eos_is_allowed_where_the_document_may_end_or_go_on(tok):
    c = make_constraint(tok, VOCAB_SIZE, {"type": "integer"})
    for t in tok.encode("12"):
        assert c.advance(t) is None
    allowed = allowed_ids(c)
    assert EOS_ID in allowed and tok.encode("3")[0] in allowed
    assert c.advance(EOS_ID) == "stop"


def test_a_forbidden_token_is_an_error_not_an_exception(tok):
    c = make_constraint(tok, VOCAB_SIZE, PERSON)
    bad = tok.encode("hello")[0]
    assert bad not in allowed_ids(c)
    assert c.advance(bad) == "error"
    assert c.error and "\n" not in c.error


def test_apply_constraints_masks_only_constrained_rows(tok):
    c = make_constraint(tok, VOCAB_SIZE, PERSON)
    logits = torch.randn(3, VOCAB_SIZE)
    before = logits.clone()
    out = apply_constraints(logits, [None, c, None])
    assert torch.equal(logits, before)                   # the input is left alone
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    allowed = c.allowed()
    assert torch.equal(out[1][allowed], logits[1][allowed])
    assert bool(torch.isneginf(out[1][~allowed]).all())
    assert apply_constraints(logits, [None, None, None]) is logits


def test_schemas_compile_once_per_tokenizer(tok):
    compiler = compiler_for(tok, VOCAB_SIZE)
    assert compiler_for(tok, VOCAB_SIZE) is compiler
    a = compiler.matcher(PERSON)
    compiled = len(compiler._prototypes)
    b = compiler.matcher(json.dumps(PERSON, indent=2))   # the same schema, written differently
    assert len(compiler._prototypes) == compiled         # no second compile ...
    assert a is not b                                    # ... but each request has its own state
    assert a.consume_token(tok.encode("{")[0])
    assert allowed_ids(compiler.constraint(PERSON)) == allowed_ids(make_constraint(tok, VOCAB_SIZE, PERSON))
    assert tok.encode("{")[0] in allowed_ids(compiler.constraint(PERSON))   # a fresh copy starts at the top


@pytest.mark.parametrize("seed", range(5))
def test_any_walk_of_allowed_tokens_is_valid_json(tok, seed):
    """Pick uniformly among the allowed tokens (a worst-case model) until the grammar stops."""
    rng = random.Random(seed)
    c = make_constraint(tok, VOCAB_SIZE, SMALL)
    out: list[int] = []
    reason = None
    for _ in range(200):
        choices = [t for t in allowed_ids(c) if t != EOS_ID] or [EOS_ID]
        t = rng.choice(choices)
        out.append(t)
        reason = c.advance(t)
        if reason is not None:
            break
    assert reason == "stop"
    value = json.loads(tok.decode(out))
    assert set(value) == {"name", "age"} and isinstance(value["name"], str) and len(value["name"]) <= 6
    assert type(value["age"]) is int and 0 <= value["age"] <= 99


# --- hostile schemas (issue 15, item 8): refused at admission, or failing cleanly mid-generation

#: No finite document: `a` is required and is again such an object (llguidance's grammar forces
#: `{"a":{"a":...` until its item limit). Reproducer: a 500 mid-generation before admission checked.
ENDLESS = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
#: No value at all. Reproducer: a 200 with empty, non-JSON content.
NOTHING = {"$ref": "#"}
#: Fine until the model has chosen the boolean; after it, the grammar forces an endless object:
#: only generation can find that out.
LATE = {"type": "object", "properties": {"x": {"type": "boolean"}, "a": {"$ref": "#/$defs/inf"}},
        "required": ["x", "a"], "additionalProperties": False,
        "$defs": {"inf": {"type": "object", "properties": {"b": {"$ref": "#/$defs/inf"}}, "required": ["b"]}}}


@pytest.mark.parametrize("schema,match", [
    (ENDLESS, r"the schema forces a document past llguidance's limits \(parser error: Too many items"),
    ({"type": "array", "items": {"$ref": "#"}, "minItems": 1}, "forces a document past llguidance's limits"),
    (NOTHING, "the schema admits no JSON value"),
])
def test_schemas_without_a_finite_document_are_refused_when_compiled(tok, schema, match):
    compilers = (lambda: make_constraint(tok, VOCAB_SIZE, schema), lambda: compiler_for(tok, VOCAB_SIZE).admit(schema))
    for compile_it in compilers:
        with pytest.raises(SchemaError, match=match) as err:
            compile_it()
        assert "\n" not in str(err.value) and err.value.param == "response_format"


def test_a_refused_schema_is_remembered_not_compiled_again(tok, monkeypatch):
    compiler = compiler_for(tok, VOCAB_SIZE)
    with pytest.raises(SchemaError):
        compiler.admit(ENDLESS)
    monkeypatch.setattr(constrain, "_probe", lambda *a: pytest.fail("compiled again"))
    with pytest.raises(SchemaError, match="forces a document past"):
        compiler.admit(json.dumps(ENDLESS, indent=1))


def test_recursive_schemas_with_a_finite_document_are_admitted(tok):
    for schema in ({"type": "object", "properties": {"a": {"$ref": "#"}}},
                   {"type": "array", "items": {"$ref": "#"}}, LATE, {"const": "abc" * 2000}):
        c = make_constraint(tok, VOCAB_SIZE, schema)
        assert c.error is None and c.failure() is None and allowed_ids(c)


def test_schema_size_and_depth_are_bounded():
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(4000)}}
    with pytest.raises(SchemaError, match=f"the schema is [0-9]+ bytes as compact JSON; the limit is {SCHEMA_MAX_BYTES}"):
        check_schema(big)
    deep: dict = {"type": "integer"}
    for _ in range(5000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(SchemaError, match="nested too deeply"):
        check_schema(deep)


def test_a_grammar_over_its_limits_is_refused_when_compiled(tok):
    rows = {"type": "object", "properties": {f"p{i}": {"enum": ["a", "b"]} for i in range(1200)}}
    with pytest.raises(SchemaError, match="invalid JSON Schema: .*max is 2000") as err:
        make_constraint(tok, VOCAB_SIZE, rows)
    assert "\n" not in str(err.value)


def test_a_grammar_failing_mid_generation_is_an_error_with_its_reason(tok):
    c = make_constraint(tok, VOCAB_SIZE, LATE)
    assert [c.advance(t) for t in tok.encode('{"x":true')] == [None] * len(tok.encode('{"x":true'))
    reason = None
    for _ in range(32):           # from here `,"a":{"b":{"b":...` is forced: any walk ends in the grammar's error
        allowed = allowed_ids(c)
        assert EOS_ID not in allowed
        reason = c.advance(allowed[0])
        if reason is not None:
            break
    assert reason == "error"
    assert "Too many items" in c.error and "\n" not in c.error
    first = c.error
    assert c.advance(tok.encode(",")[0]) == "error" and c.failure() == first      # stays failed, same reason
    assert c.forced(8) == []


def test_a_mask_the_grammar_failed_on_is_a_failure(tok):
    """A matcher that fails computing its mask (here: one never admitted) allows only EOS; the
    constraint reports the failure instead of letting that EOS pass for a finished document."""
    grammar = constrain.grammar_of('{"$ref":"#"}')
    raw = constrain._llguidance().LLMatcher(compiler_for(tok, VOCAB_SIZE).tokenizer, grammar, log_level=0)
    c = constrain.Constraint(raw, VOCAB_SIZE)
    assert c.failure() is None
    assert allowed_ids(c) == [EOS_ID]
    assert c.failure() == "NoExtensionBias" and not c.is_complete
