"""Who may call the server and what it reads (vsc.runtime.guard): the API key, browser safety
(no CORS, JSON-only POSTs, the Host check), and the body limit, refused before a body is read."""
from __future__ import annotations

import logging
import socket
import threading

import httpx2 as httpx
import openai
import orjson
import pytest

from http_fakes import MODEL, FakeEngine, FakeTokenizer, expected, serving, wait_for
from vsc.runtime.guard import (Security, default_allowed_hosts, default_max_body, parse_allowed_hosts,
                               parse_size)

KEY = "sk-test-7f3a9c1e5b2d"
BODY = {"model": MODEL, "prompt": "x", "max_tokens": 3}
JSON_CT = {"content-type": "application/json"}


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


# --------------------------------------------------------------------------- item 5: the API key

@pytest.fixture(scope="module")
def keyed():
    with serving(FakeEngine(), security=Security(api_key=KEY)) as lv:
        yield lv


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": KEY},
                                     {"authorization": f"Basic {KEY}"}, {"authorization": f"Bearer {KEY}x"}])
def test_v1_routes_need_the_key(keyed, headers):
    for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                         ("GET", f"/v1/models/{MODEL}"), ("GET", "/v1/nope")):
        r = httpx.request(method, keyed.url + path, json=BODY, headers=headers, timeout=10)
        assert r.status_code == 401, (path, r.text)
        err = error_of(r)
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        assert "Authorization: Bearer" in err["message"] and KEY not in r.text
        assert r.headers["www-authenticate"] == "Bearer"
    assert keyed.engine.requests == {}


def test_the_key_opens_v1_and_health_metrics_stay_open(keyed):
    with openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=10) as c:
        assert c.completions.create(model=MODEL, prompt="x", max_tokens=3).choices[0].text == expected(3)
        assert [m.id for m in c.models.list()] == [MODEL]
    with openai.OpenAI(base_url=keyed.url + "/v1", api_key="not-it", max_retries=0, timeout=10) as c:
        with pytest.raises(openai.AuthenticationError):
            c.completions.create(model=MODEL, prompt="x", max_tokens=3)
    assert httpx.get(keyed.url + "/health", timeout=10).status_code == 200
    assert httpx.get(keyed.url + "/metrics", timeout=10).status_code == 200


def test_protect_metrics():
    with serving(FakeEngine(), security=Security(api_key=KEY, protect_metrics=True)) as lv:
        r = httpx.get(lv.url + "/metrics", timeout=10)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        assert httpx.get(lv.url + "/metrics", headers={"authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200
        assert httpx.get(lv.url + "/health", timeout=10).status_code == 200


def test_the_key_never_reaches_a_log_or_a_response(keyed, caplog):
    caplog.set_level(logging.DEBUG)
    bodies = []
    for auth in (f"Bearer {KEY}", f"Bearer {KEY[:-1]}", f"Bearer {KEY} extra"):
        r = httpx.post(keyed.url + "/v1/completions", headers={"authorization": auth},
                       json={**BODY, "prompt": "BOOM"}, timeout=10)    # BOOM: the engine fails, logged
        bodies.append((r.status_code, r.text))
    assert [code for code, _ in bodies] == [500, 401, 401]   # the right key reached the (failing) engine
    assert "the fake engine exploded" in caplog.text
    assert KEY[:-1] not in caplog.text and all(KEY[:-1] not in text for _, text in bodies)
    assert KEY not in repr(Security(api_key=KEY)) and KEY not in str(Security(api_key=KEY))


def test_the_app_does_not_see_the_authorization_header():
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from vsc.runtime.guard import HttpGuard

    async def echo(request):
        return JSONResponse(sorted(request.headers.keys()))
    app = Starlette(routes=[Route("/v1/echo", echo)], middleware=[Middleware(HttpGuard, security=Security(api_key=KEY))])
    with TestClient(app) as c:
        r = c.get("/v1/echo", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and "authorization" not in r.json()


@pytest.mark.parametrize("key", ["", "two words", " padded", "clé", "tab\there"])
def test_security_refuses_a_key_no_header_can_carry(key):
    with pytest.raises(ValueError):
        Security(api_key=key)


# --------------------------------------------------------------------------- item 6: browser safety

@pytest.fixture(scope="module")
def local():
    with serving(FakeEngine(), security=Security(allowed_hosts=default_allowed_hosts("127.0.0.1"))) as lv:
        yield lv


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                   "application/jsonp", "text/json"])
def test_post_must_be_json(local, ctype):
    headers = {} if ctype is None else {"content-type": ctype}
    r = httpx.post(local.url + "/v1/completions", content=orjson.dumps(BODY), headers=headers, timeout=10)
    assert r.status_code == 415, r.text
    err = error_of(r)
    assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]
    assert local.engine.requests == {}


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_json_content_types_pass(local, ctype):
    r = httpx.post(local.url + "/v1/completions", content=orjson.dumps(BODY), headers={"content-type": ctype},
                   timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected(3)


def test_no_cors_headers(local):
    pre = httpx.options(local.url + "/v1/completions", timeout=10,
                        headers={"origin": "https://evil.example", "access-control-request-method": "POST",
                                 "access-control-request-headers": "content-type"})
    r = httpx.post(local.url + "/v1/completions", json=BODY, headers={"origin": "https://evil.example"}, timeout=10)
    assert r.status_code == 200
    for resp in (pre, r, httpx.get(local.url + "/v1/models", headers={"origin": "https://evil.example"})):
        assert not any(h.lower().startswith("access-control-") for h in resp.headers), resp.headers


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}", "10.0.0.1"])
def test_host_header_must_name_a_loopback_server(local, host):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1."""
    for path in ("/v1/models", "/health"):
        r = httpx.get(local.url + path, headers={"host": host.format(port=local.port)}, timeout=10)
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_host", r.text


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST", "[::1]:{port}"])
def test_loopback_host_names_pass(local, host):
    r = httpx.get(local.url + "/v1/models", headers={"host": host.format(port=local.port)}, timeout=10)
    assert r.status_code == 200


def test_allowed_hosts_parsing():
    assert parse_allowed_hosts("api.example.com, Other.Example") == {"api.example.com", "other.example"}
    assert parse_allowed_hosts("*") is None and default_allowed_hosts("0.0.0.0") is None
    assert "localhost" in default_allowed_hosts("::1") and "::1" in default_allowed_hosts("127.0.0.1")
    with pytest.raises(ValueError):
        parse_allowed_hosts(" , ")


# --------------------------------------------------------------------------- item 7: the body limit

def test_default_body_limit_follows_the_context():
    assert default_max_body(2048) == 1 << 20 and default_max_body(131072) == 8 << 20
    assert parse_size("4MiB") == 4 << 20 and parse_size("512k") == 512 << 10 and parse_size("1000") == 1000
    for bad in ("", "-1", "0", "4 MiBs", "x"):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.fixture(scope="module")
def small():
    with serving(FakeEngine(max_context=100_000), security=Security(max_body_bytes=64 << 10)) as lv:
        yield lv


def test_a_declared_oversized_body_is_refused_unread(small):
    """Content-Length over the limit: 413 before the body is sent at all, and the connection closed."""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {20_000_000}\r\n\r\n").encode()
    out = raw(small.port, head + b'{"prompt": "')       # 20 MB promised, a dozen bytes sent
    status, _, rest = out.partition(b"\r\n")
    assert status == b"HTTP/1.1 413 Request Entity Too Large", out[:200]
    err = orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert err["code"] == "request_too_large" and str(64 << 10) in err["message"]
    assert small.engine.requests == {}


@pytest.mark.parametrize("auth", [None, "Bearer wrong"])
def test_a_client_that_sends_the_whole_body_first_reads_the_refusal(auth):
    """http.client (requests, urllib) sends all 20 MB before reading: the server's early answer
    must not turn into a connection reset under it (it drains the body a while after answering)."""
    import http.client
    body = b'{"prompt": "' + b"x" * 20_000_000 + b'"}'
    security = Security(max_body_bytes=64 << 10, api_key=KEY if auth else None)
    with serving(FakeEngine(), security=security) as lv:
        c = http.client.HTTPConnection("127.0.0.1", lv.port, timeout=10)
        headers = {"content-type": "application/json", **({"authorization": auth} if auth else {})}
        c.request("POST", "/v1/completions", body=body, headers=headers)
        r = c.getresponse()
        assert r.status == (401 if auth else 413)
        assert orjson.loads(r.read())["error"]["code"] == ("invalid_api_key" if auth else "request_too_large")
        c.close()


def test_a_chunked_body_is_cut_off_at_the_limit(small):
    """No Content-Length: the body is counted as it arrives and refused (413) once past the limit,
    without waiting for its end."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"a" * 8192
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as s:
        s.sendall(head)
        for _ in range(9):                              # 72 KiB: just over the limit, no end chunk
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        out = b""
        while part := s.recv(65536):                    # the server answers without the rest
            out += part
    assert out.startswith(b"HTTP/1.1 413 "), out[:200]
    assert small.engine.requests == {}


def test_a_body_at_the_limit_is_served(small):
    prompt = "y" * ((64 << 10) - 200)
    body = orjson.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 3})
    body += b" " * ((64 << 10) - len(body))          # exactly the limit
    r = httpx.post(small.url + "/v1/completions", content=body, headers=JSON_CT, timeout=10)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(prompt) + 1
    r = httpx.post(small.url + "/v1/completions", content=body + b" ", headers=JSON_CT, timeout=10)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"


class _CountingTokenizer(FakeTokenizer):
    chars_per_token = 1             # one token per character: a sound bound

    def __init__(self):
        self.encoded: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.encoded.append(len(text))
        return super().encode(text, add_special_tokens)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "z" * 257}), ("/v1/completions", {"prompt": ["z" * 300]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "z" * 257}]})])
def test_a_prompt_too_long_for_any_tokenization_is_refused_untokenized(path, body):
    tok = _CountingTokenizer()
    with serving(FakeEngine(max_context=256), tokenizer=tok) as lv:
        r = httpx.post(lv.url + path, json={"model": MODEL, **body}, timeout=10)
        assert r.status_code == 400, r.text
        err = error_of(r)
        assert err["code"] == "context_length_exceeded" and "context of 256 tokens" in err["message"]
        assert tok.encoded == []
        r = httpx.post(lv.url + "/v1/completions", json={"model": MODEL, "prompt": "z" * 200, "max_tokens": 3},
                       timeout=10)
        assert r.status_code == 200 and tok.encoded == [200]


class _SlowTokenizer(FakeTokenizer):
    """encode() of a text holding "SLOW" blocks until released, like tokenizing a huge prompt."""

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if "SLOW" in text:
            self.entered.set()
            assert self.release.wait(30)
        return super().encode(text, add_special_tokens)


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "SLOW"}),
                                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "SLOW"}]})])
def test_tokenizing_does_not_stall_the_event_loop(path, body):
    """While one prompt is being tokenized, /health and other requests are answered."""
    tok = _SlowTokenizer()
    with serving(FakeEngine(), tokenizer=tok) as lv:
        result = {}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(
            lv.url + path, json={"model": MODEL, "max_tokens": 3, **body}, timeout=30)))
        t.start()
        try:
            assert tok.entered.wait(10)
            assert httpx.get(lv.url + "/health", timeout=5).status_code == 200     # old code: ReadTimeout
            r = httpx.post(lv.url + "/v1/completions", json=BODY, timeout=5)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected(3)
            assert "r" not in result
        finally:
            tok.release.set()
            t.join(30)
        assert result["r"].status_code == 200
        assert wait_for(lambda: lv.engine.blocks_in_use() == 0)
