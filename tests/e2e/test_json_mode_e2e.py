"""json mode end to end: `vsc compile examples/json-extract.vs` → a live server → the openai client.

The tiny model's weights are random, so its answers are junk, but every answer is JSON that
the example's schema (examples/schemas/person.json, bounded string lengths) accepts.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import openai
import pytest

from vsc.cli import main as vsc_main
from vsc.ir.parser import parse_module_file
from vsc.models.tiny import make_tiny
from vsc.runtime.constrain import canonical_schema
from live_server import Live

REPO = Path(__file__).resolve().parents[2]
PERSON = json.loads((REPO / "examples" / "schemas" / "person.json").read_text())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The example and its schema beside a fresh models/tiny-llama, as in a user's checkout."""
    root = tmp_path_factory.mktemp("json-ws")
    make_tiny(root / "models" / "tiny-llama", arch="llama")
    (root / "examples").mkdir()
    shutil.copy(REPO / "examples" / "json-extract.vs", root / "examples")
    shutil.copytree(REPO / "examples" / "schemas", root / "examples" / "schemas")
    return root


@pytest.fixture(scope="module")
def built(workspace) -> Path:
    out = workspace / "server"
    assert vsc_main(["compile", str(workspace / "examples" / "json-extract.vs"), "-o", str(out)]) == 0
    # The server folder must not need the spec's folder at run time.
    shutil.rmtree(workspace / "examples" / "schemas")
    return out


@pytest.fixture(scope="module")
def live(built):
    server = Live(built)
    yield server
    server.close()


def assert_person(text: str) -> dict:
    value = json.loads(text)
    assert isinstance(value, dict) and {"name", "age"} <= set(value) <= {"name", "age", "email"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= PERSON["properties"]["name"]["maxLength"]
    assert type(value["age"]) is int and 0 <= value["age"] <= 150
    assert isinstance(value.get("email", ""), str)
    return value


def test_the_plan_and_manifest_carry_the_schema_inline(built):
    manifest = json.loads((built / "manifest.json").read_text())
    schema = canonical_schema(PERSON)
    assert manifest["engine"]["json_schema"] == schema
    stage = parse_module_file(built / "plan.vsir").requests.stage("constrain")
    assert stage.attrs["schema"] == schema and stage.attrs["source"] == "schemas/person.json"
    assert stage.attrs["sha256"] == hashlib.sha256(schema.encode()).hexdigest()
    after = [v["after"] for v in manifest["verification"]]
    assert "json-mode{schema=schemas/person.json}" in after


def test_every_answer_is_schema_valid_json(live):
    c = live.client
    chat = c.chat.completions.create(model=live.model, temperature=0, max_tokens=64,
                                     messages=[{"role": "user", "content": "Ada Lovelace was 36. Extract her."}])
    assert chat.choices[0].finish_reason == "stop"
    assert_person(chat.choices[0].message.content)
    sampled = c.completions.create(model=live.model, prompt="Name and age of Alan Turing:", max_tokens=64,
                                   temperature=1.0, seed=11)
    assert sampled.choices[0].finish_reason == "stop"
    assert_person(sampled.choices[0].text)


def test_streamed_answer_equals_the_whole_one(live):
    c = live.client
    whole = c.completions.create(model=live.model, prompt="Grace Hopper, 85:", max_tokens=64, temperature=0)
    chunks = c.completions.create(model=live.model, prompt="Grace Hopper, 85:", max_tokens=64, temperature=0,
                                  stream=True)
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert streamed == whole.choices[0].text
    assert_person(streamed)


def test_a_request_may_bring_its_own_schema(live):
    fmt = {"type": "json_schema", "json_schema": {"name": "flag", "schema": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": False}}}
    r = live.client.chat.completions.create(model=live.model, temperature=0, max_tokens=32, response_format=fmt,
                                            messages=[{"role": "user", "content": "Is the sky blue?"}])
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"ok"} and isinstance(value["ok"], bool)


def test_a_bad_response_format_is_a_400(live):
    with pytest.raises(openai.BadRequestError) as err:
        live.client.chat.completions.create(
            model=live.model, max_tokens=8, messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    assert "response_format" in str(err.value) and "Invalid type: objekt" in str(err.value)


@pytest.mark.parametrize("schema_text,message", [
    (None, "json-mode schema file {path} not found"),
    ("{not json", "json-mode schema {path}: the schema is not valid JSON"),
    ('{"type": "objekt"}', "json-mode schema {path}: invalid JSON Schema: Invalid type: objekt"),
    # no finite document: found compiling the schema for the model's tokenizer (was: a traceback)
    ('{"$ref": "#"}', "json-mode schema: the schema admits no JSON value"),
    ('{"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}',
     "json-mode schema: the schema forces a document past llguidance's limits"),
])


def test_a_missing_or_bad_schema_fails_the_compile_in_one_line(workspace, tmp_path, capsys, schema_text, message):
    spec = tmp_path / "bad.vs"
    text = (REPO / "examples" / "json-extract.vs").read_text()
    text = text.replace('"../models/tiny-llama"', json.dumps(str(workspace / "models" / "tiny-llama")))
    spec.write_text(text.replace("schemas/person.json", "schemas/broken.json"))
    if schema_text is not None:
        (tmp_path / "schemas").mkdir()
        (tmp_path / "schemas" / "broken.json").write_text(schema_text)
    assert vsc_main(["compile", str(spec), "-o", str(tmp_path / "server")]) != 0
    err = capsys.readouterr().err.rstrip().splitlines()
    # one error line at the pass in the spec's optimize line, then that line and a caret (issue 17, item 12)
    assert len(err) == 3 and err[0].startswith(f"{spec}:") and ": error: pass json-mode" in err[0], err
    assert message.format(path=tmp_path / "schemas" / "broken.json") in err[0], err
    assert err[1].strip().startswith("optimize ") and err[2].strip() == "^"
    assert not (tmp_path / "server").exists()


# --- hostile schemas (issue 15, item 8): a client's schema never produces a 500

ENDLESS = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}     # was: 500 mid-generation
NOTHING = {"$ref": "#"}                                                              # was: 200, empty content
LATE = {"type": "object", "properties": {"x": {"type": "boolean"}, "a": {"$ref": "#/$defs/inf"}},
        "required": ["x", "a"], "additionalProperties": False,
        "$defs": {"inf": {"type": "object", "properties": {"b": {"$ref": "#/$defs/inf"}}, "required": ["b"]}}}


def post_schema(live, schema: dict, stream: bool):
    import httpx2 as httpx
    body = {"model": live.model, "max_tokens": 48, "stream": stream, "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    return httpx.post(live.base + "/v1/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("schema,problem", [
    (ENDLESS, "the schema forces a document past llguidance's limits (parser error: Too many items"),
    (NOTHING, "the schema admits no JSON value"),
])
def test_a_schema_without_a_finite_document_is_a_400_naming_the_problem(live, schema, problem, stream):
    r = post_schema(live, schema, stream)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and err["type"] == "invalid_request_error"
    assert err["message"].startswith("'response_format.json_schema.schema': " + problem), err["message"]


def test_a_grammar_failing_mid_generation_is_an_error_not_a_500(live):
    r = post_schema(live, LATE, stream=False)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "grammar_error" and err["param"] == "response_format"
    assert err["message"].startswith("json mode: the request's schema failed after ") and "Too many items" in err["message"]
    r = post_schema(live, LATE, stream=True)
    assert r.status_code == 200
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "grammar_error"
    assert all("error" not in json.loads(e) for e in events[:-2])


def test_a_server_folder_whose_schema_cannot_be_served_fails_to_start_in_one_line(built, tmp_path):
    from vsc.runtime.integrity import seal
    from vsc.runtime.launch import ServerFolderError, build_server
    folder = tmp_path / "server"
    shutil.copytree(built, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"]["json_schema"] = canonical_schema(NOTHING)
    (folder / "manifest.json").write_text(json.dumps(seal(folder, manifest)))     # edited on purpose: resealed
    with pytest.raises(ServerFolderError, match="the deployment's json-mode schema: the schema admits no JSON value"):
        build_server(folder)


def test_response_format_text_gets_free_text_from_a_json_mode_server(live):
    """A json-mode deployment's schema is the default, not a must: {"type": "text"} turns it off for the
    request (as vLLM, which has no deployment schema, answers it)."""
    c = live.client
    messages = [{"role": "user", "content": "Ada Lovelace was 36. Extract her."}]
    forced = c.chat.completions.create(model=live.model, temperature=0, max_tokens=24, messages=messages)
    free = c.chat.completions.create(model=live.model, temperature=0, max_tokens=24, messages=messages,
                                     response_format={"type": "text"})
    assert_person(forced.choices[0].message.content)
    assert free.choices[0].message.content != forced.choices[0].message.content
    assert not free.choices[0].message.content.startswith("{")
