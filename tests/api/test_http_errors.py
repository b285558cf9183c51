"""Error paths of the HTTP API: bad requests, capacity, engine failures, client disconnects."""
from __future__ import annotations


import httpx2 as httpx
import openai
import orjson
import pytest

from http_fakes import MODEL, FakeEngine, expected, serving, wait_for

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def live():
    with serving(FakeEngine(max_context=256)) as lv:
        yield lv


def post(live, path: str, body, timeout: float = 10.0) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(live.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=timeout)


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --------------------------------------------------------------------------- 400 / 404

@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"a string"'])
def test_invalid_json_body_is_400(live, path, raw):
    r = post(live, path, raw)
    assert r.status_code == 400
    assert error_of(r)["type"] == "invalid_request_error"


@pytest.mark.parametrize("field,value", [
    ("temperature", "hot"), ("temperature", -0.5), ("temperature", 3), ("max_tokens", -5), ("max_tokens", 0),
    ("max_tokens", "10"), ("max_tokens", 2.5), ("top_p", 2), ("top_p", 0), ("top_k", "x"), ("seed", 1.5),
    ("stream", "yes"), ("stop", 5), ("stop", ["ok", 3]), ("ignore_eos", 1), ("n", "1"), ("model", 3),
    ("stream_options", {"include_usage": True}), ("prompt", None), ("prompt", 5), ("prompt", []),
    ("prompt", [1, "a"]), ("prompt", ["a", 3]), ("prompt", [-1]), ("presence_penalty", 2.5), ("echo", "yes"),
    ("logprobs", 21), ("logprobs", True), ("n", 0), ("best_of", 0),
    ("frequency_penalty", "x"), ("min_p", 1.5), ("repetition_penalty", 0), ("min_tokens", -1),
    ("min_tokens", 5), ("logit_bias", {"x": 1}), ("logit_bias", {"5": 101}), ("logit_bias", [1]),
    ("include_stop_str_in_output", "yes"), ("truncate_prompt_tokens", -2), ("truncate_prompt_tokens", 10**6),
    ("truncation_side", "middle"), ("structured_outputs", {"regex": "a+"}),
    ("structured_outputs", {"json": "{"}), ("structured_outputs", {}),
])
def test_wrong_completion_parameters_are_400(live, field, value):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, field: value}
    r = post(live, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error"
    if field not in ("stream_options",):
        assert err["param"] in (field, None) and (field in err["message"] or err["param"] == field)


@pytest.mark.parametrize("messages", [None, "hi", [], [{"content": "no role"}], [{"role": "user", "content": 5}],
                                      [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]])
def test_bad_chat_messages_are_400(live, messages):
    r = post(live, "/v1/chat/completions", {"model": MODEL, "messages": messages})
    assert r.status_code == 400 and error_of(r)["param"] == "messages"


def test_wrong_chat_types_are_400(live):
    for field, value in [("max_completion_tokens", -1), ("temperature", "hot"), ("logprobs", "yes"),
                         ("tools", [{"type": "function"}])]:
        r = post(live, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, field: value})
        assert r.status_code == 400 and error_of(r)["param"] == field, (field, r.text)


def test_streaming_best_of_more_than_n_is_400(live):
    r = post(live, "/v1/completions", {"model": MODEL, "prompt": "x", "n": 1, "best_of": 2, "stream": True})
    assert r.status_code == 400 and error_of(r)["param"] == "best_of"
    with live.client() as c, pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=CHAT, stream=True, extra_body={"prompt_logprobs": 1})


def test_unknown_model_is_404(live):
    r = post(live, "/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404
    err = error_of(r)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]
    with live.client() as c, pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-9", messages=CHAT)
    assert httpx.get(live.url + "/v1/models/gpt-9", timeout=5).status_code == 404


def test_model_may_be_omitted(live):
    r = post(live, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected(2)


def test_over_context_is_400_and_names_the_limit(live):
    r = post(live, "/v1/completions", {"model": MODEL, "prompt": [5] * 200, "max_tokens": 100})
    assert r.status_code == 400
    err = error_of(r)
    assert err["code"] == "context_length_exceeded"
    assert "context of 256 tokens" in err["message"] and "(prompt 200 + max_tokens 100)" in err["message"]
    # exactly at the limit is fine
    r = post(live, "/v1/completions", {"model": MODEL, "prompt": [5] * 200, "max_tokens": 56})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 56
    # chat with the default max_tokens: a prompt that fills the context leaves no room
    r = post(live, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 300}]})
    assert r.status_code == 400 and "context of 256 tokens" in error_of(r)["message"]
    with live.client() as c, pytest.raises(openai.BadRequestError, match="context of 256 tokens"):
        c.completions.create(model=MODEL, prompt="y" * 250, max_tokens=10)
    # completions without max_tokens: OpenAI's 16, clamped to the room left
    r = post(live, "/v1/completions", {"model": MODEL, "prompt": [5] * 250})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
    r = post(live, "/v1/completions", {"model": MODEL, "prompt": [5] * 256})
    assert r.status_code == 400 and "context of 256 tokens" in error_of(r)["message"]


def test_unknown_route_and_method_are_json_errors(live):
    r = httpx.get(live.url + "/v1/nothing", timeout=5)
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = httpx.get(live.url + "/v1/completions", timeout=5)
    assert r.status_code == 405 and error_of(r)


# --------------------------------------------------------------------------- 429 / 500

def test_queue_full_is_429():
    engine = FakeEngine(delay=0.005, capacity=1, max_context=100_000)
    with serving(engine) as lv:
        body = {"model": MODEL, "prompt": "hold", "max_tokens": 2000, "stream": True}
        with httpx.Client(timeout=10) as hc, hc.stream("POST", lv.url + "/v1/completions", json=body) as held:
            assert held.status_code == 200
            lines = held.iter_lines()                                  # (keep it: closing it drops the connection)
            assert next(lines).startswith("data: ")                    # the slot is taken
            r = post(lv, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 429
            err = error_of(r)
            assert err["code"] == "rate_limit_exceeded" and r.headers.get("retry-after") == "1"
            with lv.client() as c, pytest.raises(openai.RateLimitError):
                c.completions.create(model=MODEL, prompt="x", max_tokens=2)
        # the held stream was closed: its slot comes back and requests succeed again
        assert wait_for(lambda: engine.blocks_in_use() == 0)
        r = post(lv, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


def test_engine_error_before_first_token_is_500(live):
    r = post(live, "/v1/completions", {"model": MODEL, "prompt": "BOOM", "max_tokens": 4})
    assert r.status_code == 500
    err = error_of(r)
    assert err["type"] == "server_error" and "exploded" not in err["message"]   # internals stay in the log
    r = post(live, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 4, "stream": True})
    assert r.status_code == 200                                        # the server survived
    with live.client() as c, pytest.raises(openai.InternalServerError):
        c.completions.create(model=MODEL, prompt="BOOM", max_tokens=4, stream=True)


@pytest.mark.parametrize("prompt", ["BANG", "FAIL"])      # the engine raises / ends with finish_reason "error"
def test_engine_error_mid_request(live, prompt):
    r = post(live, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 10})
    assert r.status_code == 500 and error_of(r)["type"] == "server_error"
    # streamed: headers are out already, so the error arrives as an SSE event, then [DONE]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=10) as s:
        events = [e for e in s.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert orjson.loads(events[-2][len("data: "):])["error"]["type"] == "server_error"
    assert wait_for(lambda: live.engine.blocks_in_use() == 0)


# --------------------------------------------------------------------------- client disconnects

def test_stream_disconnect_aborts_the_request():
    engine = FakeEngine(delay=0.002, max_context=100_000)
    with serving(engine) as lv:
        body = {"model": MODEL, "prompt": "long", "max_tokens": 50_000, "stream": True}   # ~100 s if not aborted
        client = httpx.Client(timeout=10)
        try:
            with client.stream("POST", lv.url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                chunks = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        chunks.append(orjson.loads(line[6:]))
                        if len(chunks) == 2:
                            break
                rid = chunks[0]["id"]
                assert engine.blocks_in_use() > 0
        finally:
            client.close()                                             # drop the connection
        assert wait_for(lambda: rid in engine.aborted, timeout=5), "engine.abort was not called"
        assert wait_for(lambda: engine.blocks_in_use() == 0, timeout=5)
        assert engine.aborted.count(rid) == 1
        assert httpx.get(lv.url + "/health", timeout=5).status_code == 200


def test_non_stream_disconnect_aborts_the_request():
    engine = FakeEngine(delay=0.002, max_context=100_000)
    with serving(engine) as lv:
        body = {"model": MODEL, "prompt": "long", "max_tokens": 50_000}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(lv.url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
        assert wait_for(lambda: len(engine.aborted) == 1, timeout=5), "engine.abort was not called"
        assert wait_for(lambda: engine.blocks_in_use() == 0, timeout=5)
        # the server carries on
        r = post(lv, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected(3)


def test_finished_requests_are_not_aborted(live):
    before = len(live.engine.aborted)
    with live.client() as c:
        c.completions.create(model=MODEL, prompt="x", max_tokens=3)
        list(c.completions.create(model=MODEL, prompt="x", max_tokens=3, stream=True))
    assert len(live.engine.aborted) == before
