"""OpenAI `response_format` on both endpoints: json mode per request, and 400s for bad ones."""
from __future__ import annotations

import httpx2 as httpx
import pytest

from http_fakes import ENDPOINTS, post_fields, FakeEngine, serving
from vsc.runtime.constrain import ANY_JSON_OBJECT, canonical_schema

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def live():
    with serving(FakeEngine(max_context=256)) as lv:
        yield lv


def post(live, path: str, **fields) -> httpx.Response:
    return post_fields(live, path, max_tokens=4, **fields)


def schema_sent(live, r: httpx.Response) -> str | None:
    assert r.status_code == 200, r.text
    return live.engine.requests[r.json()["id"]].params.json_schema


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_response_format_reaches_the_engine_as_a_schema(live, path):
    assert schema_sent(live, post(live, path)) is None
    assert schema_sent(live, post(live, path, response_format={"type": "text"})) is None
    assert schema_sent(live, post(live, path, response_format={"type": "json_object"})) == ANY_JSON_OBJECT
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    assert schema_sent(live, post(live, path, response_format=fmt)) == canonical_schema(PERSON)


@pytest.mark.parametrize("path", list(ENDPOINTS))
@pytest.mark.parametrize("fmt,message", [
    ("json", "'response_format' must be an object"),
    ({"type": "xml"}, "'response_format.type' must be text, json_object or json_schema, got 'xml'"),
    ({}, "'response_format.type' is required"),
    ({"type": "json_schema"}, "'response_format.json_schema.schema' must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"schema": "{}"}}, "'response_format.json_schema.schema' must be a JSON"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}},
     "'response_format.json_schema.schema': invalid JSON Schema: Invalid type: objekt"),
    ({"type": "json_schema", "json_schema": {"schema": {"properties": {"a": {"$ref": "#/defs/nowhere"}}}}},
     "'response_format.json_schema.schema': invalid JSON Schema: "),
])
def test_bad_response_formats_are_400_with_one_clear_line(live, path, fmt, message):
    before = len(live.engine.requests)
    r = post(live, path, response_format=fmt)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and err["type"] == "invalid_request_error"
    assert err["message"].startswith(message) and "\n" not in err["message"]
    assert len(live.engine.requests) == before          # never reached the engine


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_a_schema_the_engine_refuses_is_a_400_before_generation(live, path):
    """The HTTP layer has the engine compile a request's schema (off the event loop) at admission."""
    before = len(live.engine.requests)
    refused = {**PERSON, "title": "REFUSE"}
    r = post(live, path, response_format={"type": "json_schema", "json_schema": {"schema": refused}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and err["type"] == "invalid_request_error"
    assert err["message"] == "'response_format.json_schema.schema': the fake engine refuses this schema"
    assert len(live.engine.requests) == before and live.engine.admitted[-1] == canonical_schema(refused)
