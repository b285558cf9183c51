"""The declared request and response bodies (vsc.runtime.schema): GET /openapi.json generated from
them, the answers they describe, and the one-line 400s a body that does not fit them gets."""
from __future__ import annotations

import httpx2 as httpx
import pytest
from starlette.routing import Route

from vsc import __version__
from vsc.runtime import schema
from vsc.runtime.guard import Security
from vsc.runtime.http import build_app
from vsc.runtime.metrics import ServerMetrics

from http_fakes import MODEL, FakeEngine, FakeTokenizer, serving

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def live():
    with serving() as lv:
        yield lv


def post(live, path: str, body: dict) -> httpx.Response:
    return httpx.post(live.url + path, json=body, timeout=10)


def refs(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


# --------------------------------------------------------------------------- /openapi.json

def test_openapi_json_documents_every_endpoint_from_the_declarations(live):
    r = httpx.get(live.url + "/openapi.json", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["openapi"].startswith("3.1") and doc["info"]["version"] == __version__
    app = build_app(FakeEngine(), FakeTokenizer(), ServerMetrics(), MODEL)
    served = {route.path.replace(":path}", "}"): route.methods for route in app.routes if isinstance(route, Route)}
    assert set(doc["paths"]) == set(served)
    for path, item in doc["paths"].items():
        methods = {m for m in item if m in ("get", "post")}
        assert {m.upper() for m in methods} == served[path] - {"HEAD"}, path
        assert all("200" in item[m]["responses"] for m in methods), path
    components = doc["components"]["schemas"]
    for ref in refs(doc):          # every reference resolves inside the document
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in components, ref

    chat = components["ChatCompletionRequest"]
    assert {"messages", "temperature", "tools", "tool_choice", "logprobs", "top_logprobs", "response_format",
            "max_completion_tokens", "stream_options", "min_p", "logit_bias"} <= set(chat["properties"])
    assert chat["required"] == ["messages"] and chat["additionalProperties"] is True   # unknown: logged, ignored
    temperature = next(s for s in chat["properties"]["temperature"]["anyOf"] if s.get("type") == "number")
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    completion = components["CompletionRequest"]
    assert {"prompt", "echo", "logprobs", "best_of", "suffix"} <= set(completion["properties"])
    assert completion["required"] == ["prompt"]
    body = doc["paths"]["/v1/chat/completions"]["post"]
    assert body["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    ok = body["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ChatCompletion") and "text/event-stream" in ok
    assert body["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    models = doc["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert models["$ref"].endswith("/ModelList")


def test_openapi_json_is_open_like_version_while_v1_needs_the_key():
    with serving(security=Security(api_key="sk-test")) as lv:
        assert httpx.get(lv.url + "/openapi.json", timeout=10).status_code == 200
        assert httpx.get(lv.url + "/v1/models", timeout=10).status_code == 401


def test_the_answers_are_what_the_document_declares(live):
    """Each answer validates against its declared model (the document describes what is served)."""
    chat = post(live, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 3})
    assert schema.ChatCompletion.model_validate(chat.json()).choices[0].finish_reason == "length"
    completion = post(live, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 3, "logprobs": 1})
    assert schema.Completion.model_validate(completion.json()).usage.completion_tokens == 3
    models = schema.ModelList.model_validate(httpx.get(live.url + "/v1/models", timeout=10).json())
    assert [m.id for m in models.data] == [MODEL]
    schema.ModelCard.model_validate(httpx.get(live.url + f"/v1/models/{MODEL}", timeout=10).json())
    tokens = schema.TokenizeResponse.model_validate(post(live, "/tokenize", {"prompt": "ab"}).json())
    assert schema.DetokenizeResponse.model_validate(post(live, "/detokenize", {"tokens": tokens.tokens}).json())
    err = post(live, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "temperature": "hot"})
    assert err.status_code == 400 and schema.ErrorResponse.model_validate(err.json()).error.param == "temperature"


# --------------------------------------------------------------------------- 400s from the declarations

@pytest.mark.parametrize("path,fields,param,message", [
    ("/v1/chat/completions", {"temperature": "hot"}, "temperature", "'temperature' must be a number, got string 'hot'"),
    ("/v1/chat/completions", {"temperature": 3}, "temperature", "'temperature' must be in [0, 2], got 3"),
    ("/v1/chat/completions", {"top_p": 0}, "top_p", "'top_p' must be in (0, 1], got 0"),
    ("/v1/chat/completions", {"n": 1.0}, "n", "'n' must be an integer, got number 1.0"),
    ("/v1/chat/completions", {"n": 65}, "n", "'n' must be between 1 and 64, got 65"),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs", "'logprobs' must be a boolean, got integer 1"),
    ("/v1/chat/completions", {"top_logprobs": "3"}, "top_logprobs", "'top_logprobs' must be an integer"),
    ("/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options",
     "'stream_options.include_usage' must be a boolean, got string 'yes'"),
    ("/v1/chat/completions", {"messages": [{"role": 5, "content": "x"}]}, "messages",
     "'messages[0].role' must be a string, got integer 5"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}, {"role": "user", "content": {"text": "x"}}]},
     "messages", "'messages[1].content' must be a string or a list of text parts"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages",
     "'messages[0].name' must be a string, got integer 5"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x", "tool_call_id": 7}]}, "messages",
     "'messages[0].tool_call_id' must be a string, got integer 7"),
    ("/v1/chat/completions", {"user": 42}, "user", "'user' must be a string, got integer 42"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": "x"}}, "response_format",
     "'response_format.json_schema' must be an object, got string 'x'"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools", "'tools[0].function.parameters' must be a JSON Schema object"),
    ("/v1/chat/completions", {"tool_choice": 5}, "tool_choice", "'tool_choice' must be none, auto, required"),
    ("/v1/chat/completions", {"structured_outputs": {"choice": "ab"}}, "structured_outputs",
     "'structured_outputs.choice' must be a list, got string 'ab'"),
    ("/v1/completions", {"stop_token_ids": [1, "2"]}, "stop_token_ids",
     "'stop_token_ids[1]' must be an integer, got string '2'"),
    ("/v1/completions", {"logit_bias": {"5": "x"}}, "logit_bias", "'logit_bias.5' must be a number in [-100, 100]"),
    ("/v1/completions", {"logit_bias": [5]}, "logit_bias", "'logit_bias' must be an object mapping token ids"),
    ("/v1/completions", {"prompt": {"text": "x"}}, "prompt", "'prompt' must be a string, a list of token ids"),
    ("/v1/completions", {"suffix": 5}, "suffix", "'suffix' must be a string, got integer 5"),
    ("/tokenize", {"prompt": "x", "return_token_strs": "yes"}, "return_token_strs",
     "'return_token_strs' must be a boolean"),
    ("/detokenize", {"tokens": [1, 2.5]}, "tokens", "'tokens[1]' must be an integer, got number 2.5"),
    ("/v1/responses", {"metadata": {"k": 1}}, "metadata", "'metadata.k' must be a string, got integer 1"),
    ("/v1/responses", {"temperature": -1}, "temperature", "'temperature' must be in [0, 2], got -1"),
])
def test_a_body_that_does_not_fit_its_declaration_is_a_one_line_400_naming_the_field(live, path, fields, param,
                                                                                      message):
    before = len(live.engine.requests)
    base = {"/v1/chat/completions": {"messages": CHAT}, "/v1/completions": {"prompt": "x"},
            "/v1/responses": {"input": "x"}, "/tokenize": {}, "/detokenize": {}}[path]
    r = post(live, path, {"model": MODEL, "max_tokens": 2, **base, **fields} if path.startswith("/v1/c")
             else {"model": MODEL, **base, **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["message"].startswith(message) and "\n" not in err["message"], err["message"]
    assert len(live.engine.requests) == before          # never reached the engine


def test_check_names_the_first_field_that_does_not_fit():
    q = schema.check(schema.ChatCompletionRequest, {"messages": CHAT, "temperature": 1, "frobnicate": True})
    assert q.temperature == 1.0 and type(q.temperature) is float and q.model_extra == {"frobnicate": True}
    with pytest.raises(schema.RequestError) as e:
        schema.check(schema.ChatCompletionRequest, {"messages": []})
    assert e.value.param == "messages" and str(e.value) == "'messages' must not be empty"
    with pytest.raises(schema.RequestError) as e:
        schema.check(schema.CompletionRequest, {})
    assert e.value.param == "prompt" and str(e.value) == "'prompt' is required"
    with pytest.raises(schema.RequestError) as e:     # null is absent: the default
        schema.check(schema.CompletionRequest, {"prompt": "x", "temperature": None, "seed": True})
    assert e.value.param == "seed" and str(e.value) == "'seed' must be an integer, got boolean True"
