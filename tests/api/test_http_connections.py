"""Connections a server can afford (vsc.runtime.conn), checked on raw sockets: read deadlines
for idle, half-sent heads and half-sent bodies; a bound on open connections; keep-alive; and
a half-close after a complete request, which still gets its answer."""
from __future__ import annotations

import select
import socket

import orjson
import pytest

from http_fakes import MODEL, FakeEngine, expected, serving, wait_for
from vsc.runtime.conn import ConnLimits

LIMITS = ConnLimits(read_timeout=0.5, keep_alive=0.5, max_connections=4)


@pytest.fixture(scope="module")
def live():
    with serving(FakeEngine(), limits=LIMITS) as lv:
        yield lv


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)   # a hang fails the test, not a timing


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def request(body: dict, path: str = "/v1/completions", extra: str = "") -> bytes:
    data = orjson.dumps(body)
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{extra}\r\n").encode() + data


def status_and_body(out: bytes) -> tuple[bytes, bytes]:
    head, _, body = out.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


def test_a_connection_that_sends_nothing_is_closed(live):
    with connect(live.port) as s:
        status, body = status_and_body(read_all(s))
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert orjson.loads(body)["error"]["code"] == "request_timeout"


def test_a_half_sent_head_is_closed(live):
    with connect(live.port) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        status, body = status_and_body(read_all(s))
    assert status == b"HTTP/1.1 408 Request Timeout" and b"request head" in body


def test_a_head_trickled_a_byte_at_a_time_is_closed(live):
    """The head deadline runs from the first byte: a slowloris trickle does not extend it."""
    before = len(live.engine.requests)
    data = request({"model": MODEL, "prompt": "x", "max_tokens": 3})
    with connect(live.port) as s:
        for i in range(len(data)):
            if select.select([s], [], [], 0.05)[0]:      # the server has answered (and closed)
                break
            s.sendall(data[i:i + 1])
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 408 "), out[:100]
    assert len(live.engine.requests) == before


def test_a_half_sent_body_is_closed(live):
    before = len(live.engine.requests)
    data = request({"model": MODEL, "prompt": "x" * 100, "max_tokens": 3})
    with connect(live.port) as s:
        s.sendall(data[:-40])
        status, body = status_and_body(read_all(s))
    assert status == b"HTTP/1.1 408 Request Timeout" and b"request body" in body
    assert len(live.engine.requests) == before


def test_an_idle_keep_alive_connection_is_closed(live):
    with connect(live.port) as s:
        s.sendall(request({"model": MODEL, "prompt": "x", "max_tokens": 3}))
        out = read_all(s)                      # the answer, then the close after keep_alive
    status, body = status_and_body(out)
    assert status == b"HTTP/1.1 200 OK" and orjson.loads(body)["choices"][0]["text"] == expected(3)


def test_open_connections_are_bounded(live):
    socks = [connect(live.port) for _ in range(LIMITS.max_connections)]
    try:
        with connect(live.port) as extra:
            status, body = status_and_body(read_all(extra))
        assert status == b"HTTP/1.1 503 Service Unavailable"
        assert orjson.loads(body)["error"]["code"] == "too_many_connections"
    finally:
        for s in socks:
            s.close()
    # once they are gone, a new connection is served
    assert wait_for(lambda: _served(live), timeout=10)


def _served(live) -> bool:
    with connect(live.port) as s:
        s.sendall(request({"model": MODEL, "prompt": "x", "max_tokens": 3}, extra="Connection: close\r\n"))
        return read_all(s).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("stream", [False, True])
def test_a_half_close_after_the_request_gets_the_answer(live, stream):
    """shutdown(SHUT_WR) after a whole request (as `nc -N`, or a client that streams a request
    and closes its side): the response is still sent, whole, then the connection is closed."""
    before = len(live.engine.aborted)
    with connect(live.port) as s:
        s.sendall(request({"model": MODEL, "prompt": "x", "max_tokens": 40, "stream": stream}))
        s.shutdown(socket.SHUT_WR)
        out = read_all(s)
    out = out.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
    status, body = status_and_body(out)
    assert status == b"HTTP/1.1 200 OK", out[:200]
    if stream:
        assert body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")        # the last event, then the last chunk
    else:
        assert orjson.loads(body)["choices"][0]["text"] == expected(40)
    assert len(live.engine.aborted) == before


def test_a_client_that_closes_while_waiting_is_still_aborted():
    """A full close looks like a half-close (a FIN) until the server writes: the interim
    100 Continue it then sends is reset by a peer that is gone, and the request is aborted."""
    engine = FakeEngine(delay=0.002, max_context=100_000)
    with serving(engine, limits=LIMITS) as lv:
        with connect(lv.port) as s:
            s.sendall(request({"model": MODEL, "prompt": "long", "max_tokens": 50_000}))
            assert wait_for(lambda: engine.blocks_in_use() > 0)
        assert wait_for(lambda: len(engine.aborted) == 1, timeout=10), "engine.abort was not called"
        assert wait_for(lambda: engine.blocks_in_use() == 0, timeout=10)


def test_an_oversized_head_is_refused_at_h11s_bound(live):
    """A head past h11's 16 KiB bound (here one 20 KiB header, never finished) is refused, not buffered."""
    with connect(live.port) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 20480)
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 400 "), out[:100]
