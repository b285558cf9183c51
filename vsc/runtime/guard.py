"""Who may call a server, and how much they may send: an ASGI middleware in front of the API.

Checked in this order, before any route runs and before a byte of a request body is read:

  Host          the Host header must name this server (`allowed_hosts`; against DNS
                rebinding, a page on evil.example resolving its name to 127.0.0.1)  -> 400
  API key       /v1/*, /tokenize, /detokenize, /tokenizer_info (and /metrics with `protect_metrics`)
                need `Authorization: Bearer KEY`, compared in constant time        -> 401
                (vLLM guards /v1 only; the tokenizer endpoints are work done for the
                caller, so a keyed server asks for the key there too. /health and
                /version stay open, as in vLLM.)
  Content-Type  a POST must say application/json, so a web page cannot send one
                as a CORS "simple request" (form or text/plain) without a preflight -> 415
  body size     a Content-Length over `max_body_bytes` is refused unread; a chunked
                body is counted as it arrives and refused when it passes the limit  -> 413

No CORS headers are ever added: a browser page on another origin gets no readable answer
and no preflight approval. Refusals are OpenAI-style JSON error bodies and close the
connection (an unread body is not drained). The key is never logged or echoed: the
Authorization header is removed from the request before the app sees it.
"""
from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

import orjson

#: The smallest default body limit, and the default's bytes per token of context
#: (a token of text is ~4 bytes; JSON escapes, token-id lists and a prediction fit in 64).
MIN_BODY_BYTES = 1 << 20
BODY_BYTES_PER_TOKEN = 64

#: Paths outside /v1 that need the API key when the server has one.
KEYED_PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info"})

#: Host names a server bound to loopback answers to by default.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def default_max_body(max_context: int) -> int:
    """The default request-body limit of a server with `max_context` tokens of context."""
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * int(max_context))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str) -> frozenset[str] | None:
    """A loopback server answers only to loopback names; others to any Host (None)."""
    if is_loopback(bind_host):
        return frozenset({*LOOPBACK_NAMES, bind_host.strip("[]").lower()})
    return None


def parse_allowed_hosts(text: str) -> frozenset[str] | None:
    """`--allowed-hosts a,b,c` -> the set of names (None for `*`: any Host)."""
    names = [n.strip().strip("[]").lower() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("give one or more host names, comma-separated, or *")
    return None if "*" in names else frozenset(names)


def parse_size(text: str) -> int:
    """`4194304`, `4MiB`, `512KiB`, `1GiB` (or KB/MB/GB, also powers of two) -> bytes, > 0."""
    t = text.strip().lower().replace(" ", "")
    for suffix, mult in (("kib", 1 << 10), ("mib", 1 << 20), ("gib", 1 << 30), ("kb", 1 << 10), ("mb", 1 << 20),
                         ("gb", 1 << 30), ("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30), ("b", 1)):
        if t.endswith(suffix):
            t, unit = t[:-len(suffix)], mult
            break
    else:
        unit = 1
    try:
        n = int(t) * unit
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 4MiB, 512KiB or a number of bytes)") from None
    if n <= 0:
        raise ValueError(f"{text!r}: the size must be positive")
    return n


@dataclass(frozen=True)
class Security:
    """What the guard enforces (see the module docstring)."""

    api_key: str | None = None
    protect_metrics: bool = False
    allowed_hosts: frozenset[str] | None = None     # None: any Host header
    max_body_bytes: int = MIN_BODY_BYTES

    def __post_init__(self):
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")
        if self.api_key is not None and not (self.api_key.isascii() and self.api_key.isprintable()
                                             and self.api_key.strip() == self.api_key and " " not in self.api_key):
            raise ValueError("the API key must be printable ASCII without spaces (it travels in an HTTP header)")
        if self.max_body_bytes <= 0:
            raise ValueError("the body limit must be positive")

    def __repr__(self) -> str:      # never print the key
        key = "set" if self.api_key else None
        return (f"Security(api_key={key}, protect_metrics={self.protect_metrics}, "
                f"allowed_hosts={self.allowed_hosts}, max_body_bytes={self.max_body_bytes})")


def _error(status: int, message: str, code: str, type_: str = "invalid_request_error",
           extra: tuple = ()) -> tuple[int, list, bytes]:
    body = orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *extra]
    return status, headers, body


def _host_name(value: bytes) -> str:
    """The name in a Host header value, without the port ('[::1]:8000' -> '::1')."""
    v = value.decode("latin-1").strip().lower()
    if v.startswith("["):
        return v[1:v.find("]")] if "]" in v else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


def _media_type(value: bytes) -> str:
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


class HttpGuard:
    """The ASGI middleware; `Starlette(middleware=[Middleware(HttpGuard, security=...)])`."""

    def __init__(self, app, security: Security):
        self.app, self.s = app, security
        self.key = security.api_key.encode() if security.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._check(scope)
        if refusal is not None:
            await _respond(send, *refusal)
            return
        if scope["method"] == "POST":
            receive = await self._read_body(scope, receive, send)
            if receive is None:
                return
        await self.app(scope, receive, send)

    def _check(self, scope) -> tuple[int, list, bytes] | None:
        s = self.s
        host = auth = ctype = length = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"authorization":
                auth = value
            elif name == b"content-type":
                ctype = value
            elif name == b"content-length":
                length = value
        if s.allowed_hosts is not None and host is not None and _host_name(host) not in s.allowed_hosts:
            return _error(400, f"the Host header {host.decode('latin-1')!r} does not name this server; "
                               "start it with --allowed-hosts to answer to other names", "invalid_host")
        path = scope["path"]
        if self.key is not None and (path.startswith("/v1/") or path == "/v1" or path in KEYED_PATHS
                                     or (s.protect_metrics and path == "/metrics")):
            scheme, _, token = (auth or b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                what = "no API key was given" if auth is None else "the API key is not valid"
                return _error(401, f"{what}: send it as 'Authorization: Bearer <key>'", "invalid_api_key",
                              extra=((b"www-authenticate", b"Bearer"),))
        if auth is not None:        # checked (or not asked for): the app never sees it
            scope["headers"] = [(n, v) for n, v in scope["headers"] if n != b"authorization"]
        if scope["method"] == "POST":
            if ctype is None or _media_type(ctype) != "application/json":
                got = "none" if ctype is None else repr(ctype.decode("latin-1"))
                return _error(415, f"a POST body must be sent as Content-Type: application/json (got {got})",
                              "unsupported_media_type")
            if length is not None:
                try:
                    n = int(length)
                except ValueError:
                    n = -1      # h11 has already refused a malformed Content-Length
                if n > s.max_body_bytes:
                    return self._too_large(f"{n} bytes")
        return None

    def _too_large(self, size: str) -> tuple[int, list, bytes]:
        return _error(413, f"the request body ({size}) is over this server's limit of {self.s.max_body_bytes} "
                           "bytes (--max-body-size)", "request_too_large")

    async def _read_body(self, scope, receive, send):
        """Read the body up to the limit; returns a `receive` that replays it (None: answered or gone)."""
        limit, parts, n = self.s.max_body_bytes, [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":      # the client left mid-upload: nobody to answer
                return None
            chunk = message.get("body", b"")
            n += len(chunk)
            if n > limit:
                await _respond(send, *self._too_large(f"over {limit} bytes"))
                return None
            if chunk:
                parts.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(parts), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return replay


async def _respond(send, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
