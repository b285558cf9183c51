"""The json-mode pass: schema resolution and checking, the constrain stage, and its verifier rules."""
from __future__ import annotations

import hashlib
import json

import pytest

from vsc.errors import PassFailure
from vsc.ir.parser import parse_module
from vsc.ir.plan import plan_json_schema
from vsc.ir.printer import print_module
from vsc.ir.verifier import verify
from vsc.passes.manager import PassManager
from vsc.runtime.constrain import ANY_JSON_OBJECT, canonical_schema

SCHEMA = {"title": "Zitat \"mit\" Umlauten: äöü", "type": "object",
          "properties": {"quote": {"type": "string", "maxLength": 80}}, "required": ["quote"]}


def run(module, pipeline):
    return PassManager(pipeline).run(module)


@pytest.fixture
def spec_dir(tmp_path, make_module):
    """A module whose spec file lies in tmp_path, with schemas/quote.json beside it."""
    module = make_module("llama")
    module.deployment["spec"] = str(tmp_path / "deploy.vs")
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "quote.json").write_text(json.dumps(SCHEMA, indent=2, ensure_ascii=False))
    return tmp_path, module


def test_the_schema_file_is_resolved_against_the_spec_and_inlined(spec_dir):
    folder, module = spec_dir
    out = run(module, "json-mode{schema=schemas/quote.json}")
    text = canonical_schema(SCHEMA)
    assert plan_json_schema(out) == text
    stage = out.requests.stage("constrain")
    assert stage.attrs == {"grammar": "json_schema", "schema": text, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                           "source": "schemas/quote.json"}
    assert ("decode", "constrain") in out.requests.edges() and ("constrain", "sample") in out.requests.edges()
    assert ("decode", "sample") not in out.requests.edges()
    # the plan's text carries the schema exactly (quotes, non-ASCII) and reads back equal
    again = parse_module(print_module(out))
    assert again.requests == out.requests and plan_json_schema(again) == text
    assert verify(again) == []


def test_any_is_any_json_object_and_is_the_default(make_module):
    assert plan_json_schema(run(make_module("llama"), "json-mode")) == ANY_JSON_OBJECT
    assert plan_json_schema(run(make_module("llama"), "json-mode{schema=any}")) == ANY_JSON_OBJECT
    assert plan_json_schema(make_module("llama")) is None


@pytest.mark.parametrize("content,message", [
    (None, "json-mode schema file {path} not found"),
    ("{oops", "json-mode schema {path}: the schema is not valid JSON: "),
    ('"just a string"', "json-mode schema {path}: a JSON Schema must be a JSON object, got str"),
    ('{"type": "objekt"}', "json-mode schema {path}: invalid JSON Schema: Invalid type: objekt"),
])
def test_bad_schema_files_fail_in_one_line_naming_the_file(spec_dir, content, message):
    folder, module = spec_dir
    path = folder / "schemas" / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PassFailure) as err:
        run(module, "json-mode{schema=schemas/bad.json}")
    assert message.format(path=path) in str(err.value) and "\n" not in str(err.value)


def test_json_mode_twice_is_refused(make_module):
    with pytest.raises(PassFailure, match="already has a constrain stage"):
        run(make_module("llama"), "json-mode,json-mode")


def constrained(make_module):
    return run(make_module("llama"), "json-mode")


def messages(module) -> list[str]:
    return [d.message for d in verify(module) if d.check == "requests"]


def test_verifier_rejects_a_tampered_schema(make_module):
    m = constrained(make_module)
    m.requests.stage("constrain").attrs["schema"] = '{"type":"array"}'
    assert messages(m) == ["sha256 does not match the schema text"]
    m.requests.stage("constrain").attrs["schema"] = "[1, 2]"
    assert messages(m) == ["schema must be the text of a JSON object (a JSON Schema)"]
    m.requests.stage("constrain").attrs["grammar"] = "regex"
    assert 'grammar must be "json_schema", got \'regex\'' in messages(m)


def test_verifier_rejects_a_constrain_stage_out_of_place(make_module):
    m = constrained(make_module)
    g = m.requests.graph
    g.remove_edge("decode", "constrain")
    g.remove_edge("constrain", "sample")
    g.add_edge("decode", "sample")
    g.add_edge("sample", "constrain")
    g.add_edge("constrain", "detokenize")
    g.remove_edge("sample", "detokenize")
    assert "must feed exactly the sample stage, feeds ['detokenize']" in messages(m)
