"""A fake Anthropic Messages API on 127.0.0.1, for testing the `anthropic` proposer offline.

The real SDK is pointed at it with `base_url`, so the tests exercise the SDK's own request
building, response parsing and error mapping. Replies are scripted: each POST /v1/messages
pops the next one, either a message body (a dict, sent with 200; build it with
`tool_reply` / `text_reply`) or a `(status, body)` pair for an error (build the body with
`error_body`). Every request body is recorded, so tests can assert on the prompt.
"""
from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ids = itertools.count(1)


def _message(content: list[dict[str, Any]], stop_reason: str, input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """A Messages API response body (the server fills `model` from the request)."""
    return {"id": f"msg_fake{next(_ids):08d}", "type": "message", "role": "assistant", "content": content,
            "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


def tool_reply(pipeline: str, pass_source: str | None = None, rationale: str = "", *,
               tool_name: str = "propose_candidate", input_tokens: int = 100, output_tokens: int = 20,
               **extra_input: Any) -> dict[str, Any]:
    """The model calling the proposer's tool with these arguments."""
    args: dict[str, Any] = {"pipeline": pipeline, "rationale": rationale, **extra_input}
    if pass_source is not None:
        args["pass_source"] = pass_source
    block = {"type": "tool_use", "id": f"toolu_fake{next(_ids):08d}", "name": tool_name, "input": args}
    return _message([block], "tool_use", input_tokens, output_tokens)


def text_reply(text: str, *, input_tokens: int = 100, output_tokens: int = 20) -> dict[str, Any]:
    """The model answering in prose instead of calling the tool."""
    return _message([{"type": "text", "text": text}], "end_turn", input_tokens, output_tokens)


def error_body(status: int, message: str = "") -> tuple[int, dict[str, Any]]:
    """(status, body) of an API error, typed as the real API types it."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
    return status, {"type": "error", "error": {"type": kind, "message": message or kind.replace("_", " ")},
                    "request_id": f"req_fake{next(_ids):08d}"}


class FakeAnthropic:
    """The server. `base_url` to point the SDK at, `script(replies)` to queue replies,
    `requests` (request bodies, in order) and `headers` (their headers) to inspect."""

    def __init__(self):
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._replies: list[Any] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                if self.path.split("?")[0] != "/v1/messages":
                    return self._send(*error_body(404, f"fake_anthropic serves POST /v1/messages, not {self.path}"))
                body = json.loads(raw or b"{}")
                with fake._lock:
                    fake.requests.append(body)
                    fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                    reply = fake._replies.pop(0) if fake._replies else None
                if reply is None:
                    return self._send(*error_body(500, "fake_anthropic: no scripted reply left"))
                if isinstance(reply, tuple):
                    return self._send(*reply)
                return self._send(200, {"model": body.get("model", "claude-fake"), **reply})

            def _send(self, status: int, body: dict[str, Any]):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", body.get("request_id") or f"req_fake{next(_ids):08d}")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-anthropic", daemon=True)

    def start(self) -> "FakeAnthropic":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def script(self, replies: list[Any]) -> None:
        """Queue replies, served in order (after any still queued)."""
        with self._lock:
            self._replies.extend(replies)

    @property
    def unused(self) -> int:
        """Scripted replies not served yet."""
        with self._lock:
            return len(self._replies)
