"""OpenAI's Responses API (POST /v1/responses) for plain text, over the chat completions path.

A Responses request is translated into a chat completions body (`chat_body`: `instructions`
becomes a system message, `input` the messages, `max_output_tokens` max_completion_tokens,
`text.format` response_format), served by the same code as /v1/chat/completions (one event
pump), and its answer translated back: `response_object` turns a chat.completion into a
`response`, `StreamTranslator` turns chat.completion.chunk SSE into the Responses stream
events (response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta ..., response.output_text.done,
response.content_part.done, response.output_item.done, then response.completed /
response.incomplete / response.failed), each sent as `event: TYPE` + `data: JSON`.

Nothing is stored (`store` must be false or absent, no `previous_response_id`); tools,
reasoning, images and background mode are refused with a one-line error.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import orjson

from vsc.runtime.schema import ResponsesRequest

log = logging.getLogger("vsc.runtime.responses")

#: Fields of a Responses request this server reads (declared in vsc.runtime.schema); others are
#: logged and ignored (as vLLM does).
FIELDS = frozenset(ResponsesRequest.model_fields)
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesInputError(ValueError):
    """A Responses request this server refuses (the HTTP layer answers 400 with `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _refuse_unless(body: dict, key: str, ok) -> None:
    v = body.get(key)
    if v is not None and not ok(v):
        raise ResponsesInputError(key, f"'{key}'={v!r} is not supported by this server")


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"),
                                                                                                       str):
                raise ResponsesInputError("input", f"{where}.content[{j}]: only text parts ({{'type': 'input_text', "
                                                   "'text': ...}) are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ResponsesInputError("input", f"{where}.content must be a string or a list of text parts")


def _messages(body: dict) -> list[dict]:
    msgs: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ResponsesInputError("instructions", "'instructions' must be a string")
        msgs.append({"role": "system", "content": instructions})
    inp = body.get("input")
    if isinstance(inp, str):
        msgs.append({"role": "user", "content": inp})
    elif isinstance(inp, list) and inp:
        for i, item in enumerate(inp):
            where = f"input[{i}]"
            if not isinstance(item, dict) or item.get("type", "message") != "message":
                kind = item.get("type") if isinstance(item, dict) else type(item).__name__
                raise ResponsesInputError("input", f"{where}: only message items are supported, got {kind!r}")
            role = _ROLES.get(item.get("role"))
            if role is None:
                raise ResponsesInputError("input", f"{where}.role must be one of {', '.join(_ROLES)}, "
                                                   f"got {item.get('role')!r}")
            msgs.append({"role": role, "content": _content_text(item.get("content"), where)})
    else:
        raise ResponsesInputError("input", "'input' must be a string or a non-empty list of messages")
    return msgs


def _response_format(text: Any) -> dict | None:
    """Responses `text.format` -> chat `response_format`."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise ResponsesInputError("text", "'text' must be an object, e.g. {\"format\": {\"type\": \"text\"}}")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise ResponsesInputError("text", "'text.format' must be an object")
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")}}
    raise ResponsesInputError("text", f"'text.format.type' must be text, json_object or json_schema, got {kind!r}")


def chat_body(body: dict) -> dict:
    """The chat completions body that serves a Responses request `body` (refusals: ResponsesInputError)."""
    extra = sorted(k for k in body if k not in FIELDS)
    if extra:
        log.warning("/v1/responses: the following fields were present in the request but ignored: %s", extra)
    _refuse_unless(body, "store", lambda v: v is False)
    _refuse_unless(body, "previous_response_id", lambda v: False)
    _refuse_unless(body, "tools", lambda v: v == [])
    _refuse_unless(body, "tool_choice", lambda v: v in ("none", "auto"))
    _refuse_unless(body, "reasoning", lambda v: False)
    _refuse_unless(body, "truncation", lambda v: v == "disabled")
    _refuse_unless(body, "include", lambda v: v == [])
    _refuse_unless(body, "top_logprobs", lambda v: v == 0)
    _refuse_unless(body, "background", lambda v: v is False)
    _refuse_unless(body, "stream_options", lambda v: False)
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise ResponsesInputError("metadata", "'metadata' must be an object of strings")
    limit = body.get("max_output_tokens")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ResponsesInputError("max_output_tokens", f"'max_output_tokens' must be an integer >= 1, got {limit!r}")
    out: dict[str, Any] = {"messages": _messages(body)}
    for src, dst in (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"),
                     ("top_p", "top_p"), ("stream", "stream")):
        if body.get(src) is not None:
            out[dst] = body[src]
    if body.get("stream") is True:
        out["stream_options"] = {"include_usage": True}     # the usage of response.completed
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        out["response_format"] = fmt
    return out


def _usage(u: dict | None) -> dict | None:
    if u is None:
        return None
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"]}


class _Shape:
    """The parts of a response object that come from the request."""

    def __init__(self, body: dict, model: str):
        self.model = model
        self.created_at = int(time.time())
        self.msg_id = "msg_" + uuid.uuid4().hex
        fmt = (body.get("text") or {}).get("format") or {"type": "text"}
        self.echo = {"instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                     "metadata": body.get("metadata") or {}, "parallel_tool_calls": True,
                     "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
                     "tool_choice": body.get("tool_choice") or "auto", "tools": [], "text": {"format": fmt},
                     "store": False, "truncation": "disabled", "previous_response_id": None, "reasoning": None}

    def message(self, text: str, status: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != \
            "in_progress" else []
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant", "content": content}

    def response(self, rid: str, status: str, output: list, usage: dict | None, finish_reason: str | None,
                 error: dict | None = None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
        return {"id": rid, "object": "response", "created_at": self.created_at, "status": status,
                "error": error, "incomplete_details": incomplete, "model": self.model, "output": output,
                "usage": usage, **self.echo}


def _status(finish_reason: str | None) -> str:
    return {"stop": "completed", "length": "incomplete", "abort": "cancelled"}.get(finish_reason or "", "failed")


def response_object(body: dict, model: str, completion: dict) -> dict:
    """A chat.completion (the answer to `chat_body(body)`) as a Responses `response`."""
    shape = _Shape(body, model)
    choice = completion["choices"][0]
    reason = choice.get("finish_reason")
    status = _status(reason)
    item = shape.message(choice["message"].get("content") or "", "completed" if status == "completed" else
                         "incomplete")
    return shape.response(completion["id"], status, [item], _usage(completion.get("usage")), reason)


class StreamTranslator:
    """chat.completion.chunk SSE bytes -> Responses stream events (bytes), one request's worth."""

    def __init__(self, body: dict, model: str):
        self.shape = _Shape(body, model)
        self.seq = 0
        self.started = False
        self.text: list[str] = []
        self.reason: str | None = None
        self.rid = ""
        self.buffer = b""

    def _event(self, kind: str, **fields) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def _start(self, rid: str) -> list[bytes]:
        self.started, self.rid, s = True, rid, self.shape
        pending = s.response(rid, "in_progress", [], None, None)
        return [self._event("response.created", response=pending),
                self._event("response.in_progress", response=pending),
                self._event("response.output_item.added", output_index=0, item=s.message("", "in_progress")),
                self._event("response.content_part.added", item_id=s.msg_id, output_index=0, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def feed(self, chunk: bytes) -> bytes:
        """The events for one ASGI body of the chat stream (which may hold several `data:` lines)."""
        self.buffer += chunk
        out: list[bytes] = []
        while b"\n\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n\n", 1)
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                continue
            out += self._chunk(orjson.loads(data))
        return b"".join(out)

    def _chunk(self, obj: dict) -> list[bytes]:
        if "error" in obj:      # the engine failed mid-stream
            err = obj["error"]
            out = [] if self.started else self._start(self.rid or "resp_" + uuid.uuid4().hex)
            failed = self.shape.response(self.rid, "failed", [], None, None,
                                         error={"code": err.get("code") or "server_error",
                                                "message": err.get("message", "")})
            return out + [self._event("response.failed", response=failed)]
        out = [] if self.started else self._start(obj["id"])
        s = self.shape
        if obj.get("choices"):
            choice = obj["choices"][0]
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                self.text.append(delta)
                out.append(self._event("response.output_text.delta", item_id=s.msg_id, output_index=0,
                                       content_index=0, delta=delta, logprobs=[]))
            if choice.get("finish_reason") is not None:
                self.reason = choice["finish_reason"]
        elif "usage" in obj:    # the last chunk: the usage, after the finish reason
            out += self._finish(_usage(obj["usage"]))
        return out

    def _finish(self, usage: dict | None) -> list[bytes]:
        s, text = self.shape, "".join(self.text)
        status = _status(self.reason)
        item = s.message(text, "completed" if status == "completed" else "incomplete")
        part = item["content"][0]
        final = s.response(self.rid, status, [item], usage, self.reason)
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(status,
                                                                                          "response.failed")
        return [self._event("response.output_text.done", item_id=s.msg_id, output_index=0, content_index=0,
                            text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=s.msg_id, output_index=0, content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=0, item=item),
                self._event(kind, response=final)]
