"""HTTP/1.1 connections a server can afford: uvicorn's h11 protocol with read deadlines, a
bound on open connections, and half-close.

uvicorn (0.54, h11) closes an idle keep-alive connection after `timeout_keep_alive`, but
puts no deadline on a new connection that sends nothing, on a request head sent a byte at a
time, or on a body that stops halfway; it bounds the header section (h11's 16 KiB) but not
the number of open connections; and a client that shuts down its sending side after its
request (a half-close) loses the answer: uvicorn treats the EOF as a disconnect. This
subclass adds, per connection:

  head deadline   the request head must be complete `read_timeout` s after the connection
                  opens or the next request's first byte arrives                 -> 408, close
  body deadline   a body that stops arriving for `read_timeout` s (while the server is
                  reading it, not while flow control holds it back)              -> 408, close
  max connections a connection over `max_connections` open ones                 -> 503, close
  half-close      an EOF after a complete request keeps the connection open for writing;
                  the response is sent and then the connection closed. A FIN cannot tell a
                  half-close from a client that left, so the server then sends one interim
                  `100 Continue` (which HTTP/1.1 clients must skip) and watches the socket:
                  a peer that has gone answers it with a reset, and the request is dropped
                  as a disconnect (its engine work aborted) instead of answered

  lingering close an answer sent before the request's body was read (413, 401, 415, ...) shuts
                  only our side and reads and drops the rest of the body for up to 2 s, so
                  a client still sending (http.client, requests) reads the answer instead of
                  a connection reset

The idle time between requests on a kept-alive connection stays uvicorn's `timeout_keep_alive`.
"""
from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import h11
import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class ConnLimits:
    read_timeout: float = 10.0      # seconds: a request head, or a pause inside a body
    keep_alive: float = 5.0         # seconds idle between requests (uvicorn's timeout_keep_alive)
    max_connections: int = 1000     # open connections; more are answered 503 and closed

    def __post_init__(self):
        if not self.read_timeout > 0 or not self.keep_alive > 0:
            raise ValueError("timeouts must be positive")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_TCP_CLOSE = 7                      # linux tcp_info.tcpi_state of a connection the peer reset
_PEER_CHECK_S = 0.2
_LINGER_S = 2.0


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                   else "server_error", "param": None, "code": code}})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class _Transport:
    """The transport as uvicorn sees it: its close() may linger (GuardedH11Protocol._close)."""

    def __init__(self, real, protocol: "GuardedH11Protocol"):
        self._real, self._protocol = real, protocol

    def __getattr__(self, name):
        return getattr(self._real, name)

    def close(self) -> None:
        self._protocol._close()

    def is_closing(self) -> bool:
        return self._protocol._lingering or self._real.is_closing()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's H11Protocol plus the deadlines, bound and half-close above (`limits`)."""

    limits = ConnLimits()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None          # "head" / "body" while a deadline runs
        self._peer_eof = False
        self._lingering = False
        self._real = None

    # ----------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self._real = transport
        super().connection_made(_Transport(transport, self))
        if len(self.connections) > self.limits.max_connections:
            transport.write(_raw_response(503, "Service Unavailable",
                                          f"the server has {self.limits.max_connections} connections open "
                                          "(--max-connections); retry later", "too_many_connections"))
            transport.close()
            return
        self._rearm(activity=False)

    def data_received(self, data: bytes) -> None:
        if self._lingering:                 # the rest of a body nobody reads
            return
        super().data_received(data)
        self._rearm(activity=True)

    def eof_received(self) -> bool | None:
        if self._lingering:
            return None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and self.conn.their_state is h11.DONE:
            self._peer_eof = True           # a half-close after a whole request: answer it, then close
            cycle.keep_alive = False
            self._cancel()
            if not cycle.response_started:
                self.transport.write(_CONTINUE)     # a peer that is gone resets the connection
            self._deadline = self.loop.call_later(_PEER_CHECK_S, self._check_peer)
            return True
        return None                         # the transport closes; an unfinished request is disconnected

    def connection_lost(self, exc) -> None:
        self._cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._rearm(activity=False)

    def _close(self) -> None:
        """uvicorn closes the connection: at once, unless the request's body is still coming in
        (the answer went out before it was read): then shut our side and drain it a while."""
        real = self._real
        if self._lingering or real.is_closing() or self.conn.their_state is not h11.SEND_BODY \
                or not real.can_write_eof():
            real.close()
            return
        self._cancel()
        self._lingering = True
        real.write_eof()
        real.resume_reading()
        self._deadline = self.loop.call_later(_LINGER_S, real.close)

    def _check_peer(self) -> None:
        """After a FIN: drop the request as a disconnect once the peer resets the connection."""
        self._deadline = None
        cycle = self.cycle
        if self.transport is None or self.transport.is_closing() or cycle is None or cycle.response_complete:
            return
        sock = self.transport.get_extra_info("socket")
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except (AttributeError, OSError):   # no TCP_INFO here: the request is answered in full
            return
        if state == _TCP_CLOSE:
            self.transport.abort()          # connection_lost: the request is disconnected
            return
        self._deadline = self.loop.call_later(_PEER_CHECK_S, self._check_peer)

    # ----------------------------------------------------------------- deadlines
    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = None

    def _rearm(self, activity: bool) -> None:
        if self._lingering:
            return
        if self.transport is None or self.transport.is_closing() or self._peer_eof:
            self._cancel()
            return
        their = self.conn.their_state
        if their is h11.IDLE and self.timeout_keep_alive_task is None:
            if self._phase != "head":       # from the connection's start or the next request's first byte
                self._arm("head")
        elif their is h11.SEND_BODY:
            if self._phase != "body" or activity:
                self._arm("body")
        else:                               # idle between requests (uvicorn's keep-alive), or answering
            self._cancel()

    def _arm(self, phase: str) -> None:
        self._cancel()
        self._phase = phase
        self._deadline = self.loop.call_later(self.limits.read_timeout, self._expired)

    def _expired(self) -> None:
        phase, self._deadline = self._phase, None
        if self.transport is None or self.transport.is_closing():
            return
        if phase == "body" and self.flow is not None and self.flow.read_paused:
            self._arm("body")               # we are not reading (the app is busy): not the client's fault
            return
        cycle = self.cycle if phase == "body" else None
        if cycle is None or not cycle.response_started:
            what = "request head" if phase == "head" else "request body"
            self.transport.write(_raw_response(408, "Request Timeout",
                                               f"the {what} did not arrive within {self.limits.read_timeout:g} s",
                                               "request_timeout"))
        self._real.close()                  # (no lingering for a client that stopped sending)


def protocol_class(limits: ConnLimits) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn instantiates per connection (Config(http=...)), bound to `limits`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
