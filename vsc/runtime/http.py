"""The OpenAI-compatible HTTP API of a generated server (Starlette on asyncio).

    POST /v1/completions, POST /v1/chat/completions   (streamed as SSE or not)
    GET  /v1/models, /v1/models/{id}, /health, /metrics, /version
    GET  /openapi.json      (OpenAPI 3.1, generated from the declared bodies: vsc.runtime.schema)
    POST /tokenize, /detokenize                       (vLLM's request and response bodies)
    GET  /tokenizer_info    (vLLM's, behind its --enable-tokenizer-info-endpoint: lm-eval's remote tokenizer)
    POST /v1/responses      (plain text, streamed or not: served as a chat completion, vsc.runtime.responses)

Every request the engine accepted is logged at INFO when it ends, one line (its id, finish
reason, token counts, time to first token, duration), and every refused one (status, code),
never the prompt or the output.

The request bodies are declared once (vsc.runtime.schema, pydantic): a body is checked against its
declaration before anything else (a 400 naming the field), then turned into engine parameters here.
The app drives an `Engine` (vsc.runtime.api): it validates and tokenizes a request, calls
`engine.generate()`, waits for the first event (QueueFull / InvalidRequest surface there,
before any byte is sent, as 429 / 400), then streams or collects the events. A request's
`response_format` (json_object, json_schema) turns on json mode for it (vsc.runtime.constrain);
without one, a server compiled with json-mode applies its own schema. One small
watcher task per request waits for the client to disconnect; when it does, the request is
aborted in the engine (which frees its KV blocks) and the handler is cancelled.

The per-token path is kept to a few allocations: a streamed chunk is a precomputed
per-request prefix + orjson.dumps(text) + a precomputed suffix, sent as one ASGI message.
Requests with logprobs or echo (vsc.runtime.choices shapes those fields as vLLM does), and
several choices in one request (n, best_of, a list of prompts: one engine request each, the
copies of a prompt forking the first), take a slower path that builds each chunk with orjson.
"""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
import uuid
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from vsc import __version__
from vsc.runtime.api import GenerateRequest, QueueFull, RuntimeError_, SamplingParams, TokenEvent
from vsc.runtime.choices import Choice, TokenText
from vsc.runtime.constrain import ANY_JSON_OBJECT, SchemaError, check_schema
from vsc.runtime.guard import HttpGuard, Security, default_max_body
from vsc.runtime import schema
from vsc.runtime.metrics import ServerMetrics
from vsc.runtime.responses import ResponsesInputError, StreamTranslator, chat_body, response_object
from vsc.runtime import tools as tooling

log = logging.getLogger("vsc.runtime.http")

JSON = "application/json"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]
_DONE = b"data: [DONE]\n\n"
_BODY = "http.response.body"
_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "server_error"}


# --------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An error answered to the client as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(orjson.dumps(self.body()), status_code=self.status, media_type=JSON, headers=self.headers)


def _bad(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _internal(what: str) -> ApiError:
    return ApiError(500, f"internal server error while {what}; see the server log", code="internal_error")


def _failed(final: TokenEvent | None) -> ApiError:
    """The error answered for a request the engine ended with finish_reason "error": its cause when
    the client may see it (json mode: the grammar failed), else an internal error (a step raised)."""
    e = final.error if final is not None else None
    if e is None:
        return _internal("generating")
    return ApiError(e.status, str(e), param=getattr(e, "param", None), code=e.code)


# --------------------------------------------------------------------------- request validation
# The bodies are declared in vsc.runtime.schema (types, ranges: checked there, one 400 naming the
# field); what follows turns a checked body into the engine's parameters, with the checks that need
# more than the body's shape (the vocabulary, a JSON Schema, fields that depend on each other).

def _check(model, body: dict):
    """`body` as the declared `model` (vsc.runtime.schema), or a 400 naming the field."""
    try:
        return schema.check(model, body)
    except schema.RequestError as e:
        raise _bad(e.param, str(e)) from None


def _or(v, default):
    return default if v is None else v


def _in_vocab(ids: list[int], key: str, vocab: int | None) -> list[int]:
    """Token ids (declared integers) the model has."""
    if ids and (min(ids) < 0 or (vocab and max(ids) >= vocab)):
        raise _bad(key, f"'{key}' holds a token id outside the vocabulary [0, {vocab or 'vocab size'})")
    return ids


def _logit_bias(v: dict[str, float] | None, vocab: int | None) -> dict[int, float] | None:
    """OpenAI `logit_bias` ({"token id": bias in [-100, 100]}) -> {token id: bias} (None: absent or empty)."""
    out: dict[int, float] = {}
    for key, bias in (v or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise _bad("logit_bias", f"'logit_bias' keys must be token ids, got {key!r}") from None
        if token < 0 or (vocab and token >= vocab):
            raise _bad("logit_bias", f"'logit_bias' names token {token}, outside the vocabulary [0, {vocab})")
        out[token] = bias
    return out or None


def _structured_outputs(v: schema.StructuredOutputs | None) -> str | None:
    """vLLM's `structured_outputs` -> the JSON Schema text of json mode (None: absent). Its `json`
    (a schema, as an object or as JSON text) and `json_object` use json mode; regex, choice, grammar
    and structural_tag are refused."""
    if v is None:
        return None
    key = "structured_outputs"
    given = {"json": v.json_, "regex": v.regex, "choice": v.choice, "grammar": v.grammar,
             "json_object": v.json_object, "structural_tag": v.structural_tag}
    kinds = [k for k, x in given.items() if x is not None]
    if len(kinds) != 1:
        raise _bad(key, f"'{key}' must give exactly one of json, regex, choice, grammar, json_object, "
                        f"structural_tag; got {', '.join(kinds) or 'none'}")
    if kinds[0] not in ("json", "json_object"):
        raise _bad(key, f"'{key}.{kinds[0]}' is not supported by this server (only json and json_object: "
                        "it constrains output with JSON Schemas)")
    if v.disable_additional_properties or v.whitespace_pattern is not None:
        raise _bad(key, f"'{key}': disable_additional_properties and whitespace_pattern are not supported")
    if kinds[0] == "json_object":
        if v.json_object is not True:
            raise _bad(key, f"'{key}.json_object' must be true")
        return ANY_JSON_OBJECT
    spec = v.json_
    if isinstance(spec, str):
        try:
            spec = orjson.loads(spec)
        except orjson.JSONDecodeError as e:
            raise _bad(key, f"'{key}.json' is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise _bad(key, f"'{key}.json' must be a JSON Schema object")
    try:
        return check_schema(spec)
    except SchemaError as e:
        raise _bad(key, f"'{key}.json': {e}") from None


def _unsupported(key: str, v, default_ok) -> None:
    """A known field this server does not implement: accepted only at its no-op value."""
    if v is not None and not default_ok(v):
        raise _bad(key, f"'{key}'={v!r} is not supported by this server")


def _unknown(q) -> None:
    """Fields the request's declaration does not know: logged and ignored, as vLLM does (names cut
    short: they are the client's text). `user` is declared: an end user's id, no effect (as in vLLM)."""
    unknown = [k for k in q.model_extra or () if k not in schema.VLLM_UNIMPLEMENTED]    # those: off, or refused
    if unknown:
        names = ", ".join(repr(k[:40]) for k in unknown[:8]) + (f" and {len(unknown) - 8} more"
                                                                if len(unknown) > 8 else "")
        log.warning("ignored request field(s) this server does not know: %s", names)


def _common(q, chat: bool, vocab: int | None = None) -> tuple[SamplingParams, bool, bool]:
    """Sampling parameters (max_tokens left at its request value or None), stream, include_usage."""
    if not chat:
        _unsupported("suffix", q.suffix, lambda v: v == "")
    # max_tokens 0 with echo (completions): the prompt and its logprobs alone, as vLLM (lm-eval's scoring)
    max_tokens = q.max_tokens
    if max_tokens == 0 and (chat or q.echo is not True):
        raise _bad("max_tokens", "'max_tokens' must be >= 1, got 0")
    if chat:
        max_tokens = _or(q.max_completion_tokens, max_tokens)
    min_tokens = _or(q.min_tokens, 0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise _bad("min_tokens", f"'min_tokens' must be at most max_tokens={max_tokens}, got {min_tokens}")
    stop = q.stop
    stops = ([stop] if stop else []) if isinstance(stop, str) else [s for s in stop or () if s]
    stream = q.stream is True
    include_usage = False
    if q.stream_options is not None:
        if not stream:
            raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
        include_usage = q.stream_options.include_usage is not False     # vLLM: true unless said
        if q.stream_options.continuous_usage_stats:      # vLLM's usage on every chunk: not implemented
            raise _bad("stream_options", "'stream_options.continuous_usage_stats' is not supported by this server")

    response_format = q.response_format
    json_schema = _response_format(response_format)
    structured = _structured_outputs(q.structured_outputs)
    if structured is not None:
        if json_schema is not None:
            raise _bad("structured_outputs", "give 'structured_outputs' or a json 'response_format', not both")
        json_schema = structured
    text_only = response_format is not None and response_format.type == "text" and structured is None
    top_k = _or(q.top_k, 0)
    params = SamplingParams(max_tokens=max_tokens, temperature=_or(q.temperature, 1.0), top_p=_or(q.top_p, 1.0),
                            top_k=0 if top_k == -1 else top_k, seed=q.seed, stop=stops,
                            stop_token_ids=list(q.stop_token_ids or ()), ignore_eos=q.ignore_eos is True,
                            json_schema=json_schema, text_only=text_only, min_p=_or(q.min_p, 0.0),
                            min_tokens=min_tokens, logit_bias=_logit_bias(q.logit_bias, vocab),
                            repetition_penalty=_or(q.repetition_penalty, 1.0),
                            frequency_penalty=_or(q.frequency_penalty, 0.0),
                            presence_penalty=_or(q.presence_penalty, 0.0),
                            include_stop_str_in_output=q.include_stop_str_in_output is True)
    return params, stream, include_usage


def _scoring(q, chat: bool, params: SamplingParams) -> tuple[int, int, bool, int | None]:
    """n, best_of, echo, prompt_logprobs as asked; sets params.logprobs / prompt_logprobs (the engine's:
    also for the echoed prompt's logprobs). vsc.runtime.choices shapes them."""
    n = _or(q.n, 1)
    best_of = n
    if chat:
        if q.logprobs is True:
            params.logprobs = _or(q.top_logprobs, 0)
        elif q.top_logprobs is not None:
            raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        echo = False
    else:
        best_of = _or(q.best_of, n)
        if best_of < n:
            raise _bad("best_of", f"'best_of' ({best_of}) must be >= 'n' ({n})")
        params.logprobs = q.logprobs
        echo = q.echo is True
    asked = params.prompt_logprobs = q.prompt_logprobs
    if echo and params.prompt_logprobs is None and params.logprobs is not None:
        params.prompt_logprobs = params.logprobs         # echoed prompt tokens carry logprobs too
    return n, best_of, echo, asked


def _response_format(v: schema.ResponseFormat | None) -> str | None:
    """OpenAI `response_format` -> the JSON Schema text of json mode (None: free text, or the
    deployment's own schema when it was compiled with json-mode)."""
    if v is None or v.type == "text":
        return None
    if v.type == "json_object":
        return ANY_JSON_OBJECT
    spec = v.json_schema.schema_ if v.json_schema is not None else None
    if spec is None:
        raise _bad("response_format", "'response_format.json_schema.schema' must be a JSON Schema object, e.g. "
                                      '{"type": "json_schema", "json_schema": {"schema": {...}}}')
    try:
        return check_schema(spec)
    except SchemaError as e:
        raise _bad("response_format", f"'response_format.json_schema.schema': {e}") from None


def _prediction(v: schema.Prediction | None) -> str | None:
    """OpenAI `prediction` ({"type": "content", "content": text or text parts}) -> its text
    (None: absent or empty). The engine drafts the answer from it; the output is unchanged."""
    if v is None:
        return None
    content = v.content
    return (content if isinstance(content, str) else "".join(p.text for p in content)) or None


def _messages(messages: list[schema.ChatMessage]) -> list[dict]:
    """The conversation as the chat template takes it: text content (text parts joined with "\\n",
    as vLLM joins them), an assistant's tool calls, a tool result's call id, an author's name."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        text = content if isinstance(content, str) else "" if content is None else "\n".join(p.text for p in content)
        msg: dict[str, Any] = {"role": m.role, "content": text}
        try:
            calls = tooling.check_message_calls({"role": m.role, "tool_calls": m.tool_calls}, i)
        except tooling.ToolsError as e:
            raise _bad(e.param, str(e)) from None
        if calls is not None:
            msg["tool_calls"] = calls
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def _tool_plan(body: dict, params: SamplingParams) -> tooling.ToolPlan | None:
    """The request's tools (vsc.runtime.tools); with tool_choice required or a named function, the
    reply's schema goes to json mode (params.json_schema)."""
    try:
        plan = tooling.parse(body)
        if plan is None or plan.choice == tooling.NONE:
            return plan
        if params.json_schema is not None:
            if plan.choice == tooling.AUTO:     # the request's json format wins; its reply is still read for calls
                return plan
            raise tooling.ToolsError("tool_choice", "'tool_choice' required or a named function constrains the "
                                                    "reply to a tool call: it cannot be combined with a json "
                                                    "'response_format' or 'structured_outputs'")
        try:
            params.json_schema = check_schema(tooling.call_schema(plan) if plan.constrained
                                              else tooling.auto_grammar(plan))
        except SchemaError as e:
            raise tooling.ToolsError("tools", f"'tools': the tool call's schema: {e}") from None
    except tooling.ToolsError as e:
        raise _bad(e.param, str(e)) from None
    params.text_only = False
    return plan


def _ignore_unknown(q, endpoint: str) -> None:
    extra = sorted(q.model_extra or ())
    if extra:
        log.warning("%s: the following fields were present in the request but ignored: %s", endpoint, extra)


def _chat_continuation(q) -> tuple[bool, bool]:
    """(add_generation_prompt, continue_final_message), as vLLM takes them (not both)."""
    add = q.add_generation_prompt is not False
    cont = q.continue_final_message is True
    if add and cont:
        raise _bad("continue_final_message", "'continue_final_message' continues the last message: it needs "
                                             "'add_generation_prompt': false")
    return add, cont


def _chat_reply(q, messages: list[dict]) -> tuple[str, str]:
    """(role, echo) of a chat reply, as vLLM gives them: the role is "assistant", or the last message's
    without a generation prompt; with `echo`, the reply starts with the last message's text when that
    message has the reply's role (e.g. the start of an answer the model continues)."""
    add, _ = _chat_continuation(q)
    last = messages[-1]
    role = "assistant" if add else last["role"]
    return role, (last["content"] if q.echo is True and last["role"] == role else "")


def _truncate(ids: list[int], keep: tuple[int, str] | None) -> list[int]:
    """The prompt cut to `keep` = (k tokens, side) (None: as it is)."""
    if keep is None or len(ids) <= keep[0]:
        return ids
    k, side = keep
    return ids[len(ids) - k:] if side == "left" else ids[:k]


# --------------------------------------------------------------------------- one request in flight

class _Req:
    """The state of one request the engine has accepted (shared by handler, stream and watcher)."""

    __slots__ = ("rid", "chat", "created", "arrival", "prompt_len", "include_usage", "counted", "finished",
                 "aborted", "client_gone", "guarded", "task", "watcher", "predicted", "shutdown", "ttft", "role",
                 "echo", "out", "tools")

    def __init__(self, rid: str, chat: bool, arrival: float, prompt_len: int, include_usage: bool,
                 predicted: bool = False):
        self.rid, self.chat, self.arrival, self.prompt_len = rid, chat, arrival, prompt_len
        self.include_usage = include_usage
        self.predicted = predicted  # the request carried a prediction: usage reports its tokens
        self.created = int(time.time())
        self.counted = 0            # completion tokens seen so far
        self.finished = False       # the final event arrived (nothing to abort)
        self.aborted = False
        self.client_gone = False
        self.guarded = False        # the watcher may cancel `task` on disconnect
        self.shutdown = False       # aborted because the server is shutting down
        self.task: asyncio.Task | None = None
        self.watcher: asyncio.Task | None = None
        self.ttft: float | None = None  # seconds from arrival to the first event (the request log line)
        self.role = "assistant"     # chat: the reply's role (the last message's without a generation prompt)
        self.echo = ""              # chat echo: the last message's text, put before the reply
        self.out: Choice | None = None   # logprobs / echo shaping (vsc.runtime.choices)
        self.tools: tooling.ToolPlan | None = None   # chat: the reply is read for tool calls


class _App:
    def __init__(self, engine, tokenizer, metrics: ServerMetrics, served_model_name: str):
        self.engine, self.tokenizer, self.metrics, self.name = engine, tokenizer, metrics, served_model_name
        self.name_json = orjson.dumps(served_model_name)
        self.token_text = TokenText(tokenizer)      # logprobs: each token's text alone
        vocab = getattr(tokenizer, "vocab_size", None)
        self.vocab = vocab if type(vocab) is int and vocab > 0 else None
        bound = getattr(tokenizer, "chars_per_token", None)
        self.chars_per_token = bound if type(bound) is int and bound > 0 else None
        self.model_created = int(time.time())
        self.live: set[_Req] = set()      # accepted requests not finished yet (ended at shutdown)
        self.draining = False             # a shutdown signal came: new requests get 503
        check = getattr(engine, "check_overload", None)   # overload = shed (vsc.runtime.engine)
        self._check_overload = check if callable(check) else None

    # ----------------------------------------------------------------- shutdown
    def begin_shutdown(self, grace_s: float) -> None:
        """The server got SIGTERM/SIGINT and waits up to `grace_s` for requests in flight: let them
        run, and end those still running a little before that time is up (a stream then gets its
        last chunk with finish_reason "abort" and [DONE], a non-streaming request a 503)."""
        if self.draining:
            return
        self.draining = True
        margin = min(1.0, grace_s / 4)
        log.info("shutting down: %d request(s) in flight get %.1f s to finish", len(self.live), grace_s - margin)
        asyncio.get_running_loop().call_later(max(0.0, grace_s - margin), self._end_in_flight)

    def _end_in_flight(self) -> None:
        for r in list(self.live):
            if not (r.finished or r.aborted):
                r.shutdown = True
                try:
                    self.engine.abort(r.rid)      # the engine ends its stream with an "abort" event
                except Exception:
                    log.exception("engine.abort(%s) failed", r.rid)

    def _log_shutdown_abort(self, r: _Req) -> None:
        log.warning("request %s aborted by shutdown after %d completion token(s)", r.rid, r.counted)

    # ----------------------------------------------------------------- helpers
    async def _json(self, request: Request) -> dict:
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise _bad(None, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise _bad(None, "request body must be a JSON object")
        model = body.get("model")
        if model is not None:
            if not isinstance(model, str):
                raise _bad("model", "'model' must be a string")
            if model != self.name:
                raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.name}`.",
                               param="model", code="model_not_found")
        return body

    def _fit(self, prompt_len: int, max_tokens: int | None, prompt_param: str = "prompt") -> int:
        """Check the request against the context; returns max_tokens (the rest of the context when None)."""
        ctx = int(self.engine.max_context)
        if max_tokens is None:
            if prompt_len >= ctx:
                raise _bad(prompt_param, f"The prompt of {prompt_len} tokens leaves no room for output in the "
                                       f"model's context of {ctx} tokens", code="context_length_exceeded")
            return ctx - prompt_len
        if prompt_len + max_tokens > ctx:
            raise _bad("max_tokens", f"This request needs {prompt_len + max_tokens} tokens, which exceeds the "
                                     f"model's context of {ctx} tokens (prompt {prompt_len} + max_tokens "
                                     f"{max_tokens})", code="context_length_exceeded")
        return max_tokens

    def _encode(self, text: str, add_special_tokens: bool, param: str, bounded: bool = True) -> list[int]:
        """Tokenize a prompt; one that cannot fit the context whatever its tokens (more characters
        than the tokenizer's chars_per_token bound allows) is refused without tokenizing it, unless
        not `bounded` (it will be truncated: truncate_prompt_tokens)."""
        bound, ctx = self.chars_per_token, int(self.engine.max_context)
        if bounded and bound is not None and len(text) > bound * ctx:
            raise _bad(param, f"The prompt of {len(text)} characters is at least {len(text) // bound} tokens, more "
                              f"than the model's context of {ctx} tokens", code="context_length_exceeded")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _truncation(self, q) -> tuple[int, str] | None:
        """vLLM's truncate_prompt_tokens (k, or -1: the context length) and truncation_side ("left"
        keeps the last k prompt tokens, the default; "right" the first k): (k, side), or None."""
        ctx = int(self.engine.max_context)
        k, side = q.truncate_prompt_tokens, q.truncation_side
        if k is None:
            return None
        if k > ctx:
            raise _bad("truncate_prompt_tokens", f"'truncate_prompt_tokens'={k} is more than the model's context "
                                                 f"of {ctx} tokens")
        return (ctx if k == -1 else k), side or "left"

    def _abort(self, r: _Req) -> None:
        if r.finished or r.aborted:
            return
        r.aborted = True
        try:
            self.engine.abort(r.rid)
        except Exception:
            log.exception("engine.abort(%s) failed", r.rid)
        self._ended(r, "abort", r.prompt_len, r.counted, None)

    async def _watch(self, receive, r: _Req) -> None:
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
        except Exception:  # a broken receive channel means the client is gone too
            pass
        r.client_gone = True
        self._abort(r)
        if r.guarded and r.task is not None:
            r.task.cancel()

    def _ended(self, r: _Req, reason: str, prompt: int, completion: int, queue_seconds: float | None) -> None:
        """Record an accepted request that ended (any reason): /metrics and its log line."""
        duration = time.monotonic() - r.arrival
        self.metrics.request_finished(reason, prompt, completion, duration, queue_seconds)
        log.info("request %s: finish_reason=%s prompt_tokens=%d completion_tokens=%d ttft=%s duration=%.3fs",
                 r.rid, reason, prompt, completion, "-" if r.ttft is None else f"{r.ttft:.3f}s", duration)

    @staticmethod
    def _log_refusal(e: ApiError, arrival: float) -> None:
        log.info("request refused: status=%d code=%s param=%s duration=%.3fs", e.status, e.code, e.param,
                 time.monotonic() - arrival)

    def _refused(self, e: QueueFull, arrival: float) -> Response:
        """429 for a request the engine will not take now, counted in /metrics by reason."""
        self.metrics.rejected.labels(reason=e.reason).inc()
        err = ApiError(e.status, str(e) or "the server is at capacity; retry later", code=e.code,
                       headers={"retry-after": str(e.retry_after)})
        self._log_refusal(err, arrival)
        return err.response()

    def _unguard(self, r: _Req) -> None:
        self.live.discard(r)
        r.guarded = False
        if r.watcher is not None:
            r.watcher.cancel()

    def _finish(self, r: _Req, final: TokenEvent | None) -> tuple[str, dict]:
        """Record the finished request; returns (finish_reason, usage)."""
        r.finished = True
        if final is None:                       # the engine ended the stream without a final event
            reason, prompt, completion = "abort", r.prompt_len, r.counted
        else:
            reason = final.finish_reason
            prompt = final.prompt_tokens or r.prompt_len
            completion = final.completion_tokens or r.counted
        if reason == "abort" and r.shutdown:
            self._log_shutdown_abort(r)
        self._ended(r, reason, prompt, completion, final.queue_seconds if final is not None else None)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if r.predicted:       # as OpenAI reports predicted outputs
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": final.accepted_prediction_tokens if final is not None else 0,
                "rejected_prediction_tokens": final.rejected_prediction_tokens if final is not None else 0}
        return reason, usage

    # ----------------------------------------------------------------- endpoints
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, self._completion_prompt, "cmpl-", chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, self._chat_prompt, "chatcmpl-", chat=True)

    async def responses(self, request: Request) -> Response:
        """OpenAI's Responses API, plain text: the request served as a chat completion, its answer
        (or stream) translated back (vsc.runtime.responses)."""
        original: dict = {}

        def translate(body: dict) -> dict:
            original.update(body)
            return chat_body(body)
        answer = await self._handle(request, self._chat_prompt, "resp_", chat=True, translate=translate)
        if answer.status_code != 200:
            return answer
        if isinstance(answer, _EventStream):
            return _ResponsesStream(answer, StreamTranslator(original, self.name))
        return Response(orjson.dumps(response_object(original, self.name, orjson.loads(answer.body))),
                        media_type=JSON)

    async def _handle(self, request: Request, prompt_of, prefix: str, chat: bool, translate=None) -> Response:
        """Parse and check a request (`prompt_of(body, params) -> ids`), then serve it
        (`translate`: turns the body into a chat completions body first, /v1/responses).

        Every way parsing can fail ends here as one response: a 400 for the caller's
        mistakes, 499 for a client gone mid-upload, 500 (logged) for our own.
        """
        arrival = time.monotonic()
        try:
            body = await self._json(request)
            if translate is not None:
                _check(schema.ResponsesRequest, body)
                try:
                    body = translate(body)
                except ResponsesInputError as e:
                    raise _bad(e.param, str(e)) from None
            q = _check(schema.ChatCompletionRequest if chat else schema.CompletionRequest, body)
            refused = schema.unimplemented_vllm_field(q.model_extra, chat)
            if refused is not None:
                raise _bad(*refused)
            params, stream, include_usage = _common(q, chat=chat, vocab=self.vocab)
            n, best_of, echo, prompt_k = _scoring(q, chat, params)
            predicted = _prediction(q.prediction)
            messages = _messages(q.messages) if chat else None
            reply = _chat_reply(q, messages) if chat else None
            asked_schema = params.json_schema
            plan = _tool_plan(body, params) if chat else None
            by_tools = params.json_schema is not asked_schema      # the tools' grammar constrains the reply
            if plan is not None and plan.parses and n > 1:
                raise _bad("n", "requests with 'tools' (tool_choice other than none) are served with n = 1 only")
            if self._check_overload is not None:     # overload = shed: refuse before tokenizing
                self._check_overload()
            # tokenizing (and the chat template) off the event loop: a long prompt delays only itself
            prompts = await asyncio.to_thread(prompt_of, q, params, messages, plan)
            if params.min_tokens > params.max_tokens:
                raise _bad("min_tokens", f"'min_tokens' must be at most max_tokens={params.max_tokens}, "
                                         f"got {params.min_tokens}")
            echo_only = echo and params.max_tokens == 0       # vLLM runs one token and shows only the prompt
            if echo_only:
                params.max_tokens = 1
            if stream and best_of > n:
                raise _bad("best_of", "'best_of' > 'n' is not streamed (the best copies are known at the end); "
                                      "send 'stream': false")
            if stream and prompt_k is not None:
                raise _bad("prompt_logprobs", "'prompt_logprobs' are not available when 'stream' is true")
            if reply is not None and reply != ("assistant", "") and (n > 1 or len(prompts) > 1):
                raise _bad("n", "chat 'echo' and 'add_generation_prompt': false are served with n = 1 only")
            if predicted is not None:
                params.prediction = list(await asyncio.to_thread(self.tokenizer.encode, predicted,
                                                                 add_special_tokens=False)) or None
            await self._admit_schema(params.json_schema, "tools" if by_tools else
                                     "response_format" if q.structured_outputs is None else "structured_outputs")
            if echo and any(text is None for _, text in prompts):     # echoed token ids: decode off the loop
                jobs = await asyncio.to_thread(self._jobs, prompts, params, chat, n, best_of, echo, echo_only, stream)
            else:
                jobs = self._jobs(prompts, params, chat, n, best_of, echo, echo_only, stream)
        except ApiError as e:
            self._log_refusal(e, arrival)
            return e.response()
        except QueueFull as e:
            return self._refused(e, arrival)
        except ClientDisconnect:
            return Response(b"", status_code=499)
        except Exception:
            log.exception("failed to parse a %s request", "chat completion" if chat else "completion")
            return _internal("reading the request").response()
        _unknown(q)     # as vLLM: logged and ignored
        if len(jobs) > 1:
            return await self._serve_many(request, prefix, chat, jobs, n, stream, include_usage, arrival)
        ids, params, choice = jobs[0]
        return await self._serve(request, prefix, chat, ids, params, stream, include_usage, arrival, choice, reply,
                                 plan if plan is not None and plan.parses else None)

    def _jobs(self, prompts: list[tuple[list[int], str | None]], params: SamplingParams, chat: bool, n: int,
              best_of: int, echo: bool, echo_only: bool, stream: bool = False
              ) -> list[tuple[list[int], SamplingParams, Choice]]:
        """One engine request per choice: `best_of` copies of each prompt (the best `n` by cumulative
        logprob are returned). A seeded copy j samples with seed + j (vLLM's children); only the first
        copy computes prompt logprobs, the others share its prompt blocks (streamed with echo, each
        copy's first chunk needs them: each computes its own)."""
        jobs = []
        for p, (ids, text) in enumerate(prompts):
            if echo and text is None:
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
            for j in range(best_of):
                copy = dataclasses.replace(params)
                if j and not (stream and echo):
                    copy.prompt_logprobs = None
                if j and params.seed is not None:
                    copy.seed = (params.seed + j) % (1 << 64)
                if best_of > n and copy.logprobs is None:
                    copy.logprobs = 0          # best_of ranks the copies by their tokens' logprobs
                # prompt_logprobs in the response whenever they were computed (echo with logprobs too), as vLLM
                choice = Choice(p, chat, params.logprobs, echo, echo_only, text or "", ids, params.prompt_logprobs)
                jobs.append((ids, copy, choice))
        return jobs

    async def _admit_schema(self, schema: str | None, param: str = "response_format") -> None:
        """json mode: compile the request's schema for the engine's tokenizer (off the event loop;
        cached) so one the grammar engine refuses is a 400 here, never a failure mid-generation."""
        if schema is None:
            return
        try:
            await asyncio.to_thread(self.engine.admit_schema, schema)
        except SchemaError as e:
            where = {"response_format": "'response_format.json_schema.schema'",
                     "tools": "'tools': the tool call's schema"}.get(param, f"'{param}.json'")
            raise _bad(param, f"{where}: {e}") from None

    def _completion_prompt(self, q: schema.CompletionRequest, params: SamplingParams, *_
                           ) -> list[tuple[list[int], str | None]]:
        """The prompt(s) as (token ids, text or None when given as ids): a string, a list of token ids,
        or a list of those (several prompts in one request: their choices in order)."""
        prompt = q.prompt
        keep = self._truncation(q)
        usage = "'prompt' must be a string, a list of token ids, or a list of strings or of token id lists"
        if isinstance(prompt, str):
            items: list = [prompt]
        elif isinstance(prompt, list) and prompt and type(prompt[0]) is int:
            items = [prompt]
        elif isinstance(prompt, list) and prompt:
            items = prompt
        else:
            raise _bad("prompt", usage)
        out = []
        for item in items:
            if isinstance(item, str):
                ids, text = list(self._encode(item, True, "prompt", keep is None)), item
            elif isinstance(item, list) and item:
                ids, text = list(_in_vocab(item, "prompt", self.vocab)), None
            else:
                raise _bad("prompt", usage)
            cut = _truncate(ids, keep)
            if len(cut) != len(ids):          # truncated: an echo shows the tokens kept
                ids, text = cut, None
            if not ids:
                raise _bad("prompt", "the prompt is empty")
            out.append((ids, text))
        longest = max(len(ids) for ids, _ in out)
        if params.max_tokens is None:     # OpenAI's default of 16, clamped to the room left in the context
            params.max_tokens = min(16, self._fit(longest, None, "prompt"))
        else:
            self._fit(longest, max(params.max_tokens, 1))
        return out

    def _chat_prompt(self, q: schema.ChatCompletionRequest, params: SamplingParams, messages: list[dict],
                     plan: tooling.ToolPlan | None) -> list[tuple[list[int], str]]:
        keep = self._truncation(q)
        add_generation_prompt, continue_final = _chat_continuation(q)
        messages, extra = tooling.template_messages(messages, plan,
                                                    getattr(self.tokenizer, "supports_tools", False) is True)
        if continue_final:
            extra["continue_final_message"] = True
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
        except Exception as e:  # template errors (role order, ...) are the caller's
            raise _bad("messages", f"the chat template rejected the messages: {e}") from None
        ids = _truncate(list(self._encode(text, False, "messages", keep is None)), keep)
        if not ids:
            raise _bad("messages", "the prompt is empty")
        params.max_tokens = self._fit(len(ids), params.max_tokens, "messages")
        return [(ids, text)]

    async def _serve(self, request: Request, prefix: str, chat: bool, ids: list[int], params: SamplingParams,
                     stream: bool, include_usage: bool, arrival: float, choice: Choice | None = None,
                     reply: tuple[str, str] | None = None, plan: tooling.ToolPlan | None = None) -> Response:
        if self.draining:
            return ApiError(503, "the server is shutting down; retry on another instance", code="server_shutdown",
                            headers={"connection": "close"}).response()
        r = _Req(prefix + uuid.uuid4().hex, chat, arrival, len(ids), include_usage, bool(params.prediction))
        r.out = choice or Choice(0, chat, None, False, False, "", ids, None)
        if reply is not None:
            r.role, r.echo = reply
        r.tools = plan
        self.live.add(r)
        engine = self.engine
        started = False
        r.task = asyncio.current_task()
        r.watcher = asyncio.get_running_loop().create_task(self._watch(request.receive, r))
        r.guarded = True
        try:
            it = engine.generate(GenerateRequest(r.rid, ids, params, arrival))
            if inspect.isawaitable(it):
                it = await it
            it = it.__aiter__()
            started = True
            try:
                first = await it.__anext__()
            except StopAsyncIteration:
                first = None
            now = time.monotonic()
            r.ttft = now - arrival
            self.metrics.ttft.observe(r.ttft)
            if stream and plan is not None and plan.choice == tooling.AUTO and params.logprobs is None:
                first = await _peek_call(it, first)     # text (streamed as it comes) or calls?
                if first is not None and first.finish_reason is None and not first.text.startswith(tooling.CALL_TAG):
                    r.tools = None
                    return _EventStream(self, r, it, first, now)
            if stream and plan is not None:     # tool calls are known once the reply is: sent then
                return await self._collect(r, it, first, now, stream=True)
            if stream:
                return _EventStream(self, r, it, first, now)     # takes over r.guarded / r.watcher
            return await self._collect(r, it, first, now)
        except asyncio.CancelledError:
            self._unguard(r)
            self._abort(r)
            if r.client_gone:
                r.task.uncancel()
                return Response(b"", status_code=499)          # nobody reads it
            if self.draining:           # the shutdown grace ran out (uvicorn cancels what is left)
                r.task.uncancel()
                self._log_shutdown_abort(r)
                return _shutdown_error().response()
            raise
        except QueueFull as e:
            self._unguard(r)
            r.finished = True
            return self._refused(e, arrival)
        except RuntimeError_ as e:
            self._unguard(r)
            r.finished = True
            err = ApiError(e.status, str(e), param=getattr(e, "param", None), code=e.code)
            self._log_refusal(err, arrival)
            return err.response()
        except Exception:
            self._unguard(r)
            log.exception("engine failed on request %s", r.rid)
            if started:
                self._abort(r)
            return _internal("generating").response()

    async def _serve_many(self, request: Request, prefix: str, chat: bool, jobs: list, n: int, stream: bool,
                          include_usage: bool, arrival: float) -> Response:
        """Several choices (n, best_of, a list of prompts): one engine request each, submitted together
        (the copies of a prompt fork the first: admitted once it has computed the prompt, they share its
        blocks), streamed or collected concurrently; best_of keeps each prompt's best n copies (not
        streamed)."""
        if self.draining:
            return ApiError(503, "the server is shutting down; retry on another instance", code="server_shutdown",
                            headers={"connection": "close"}).response()
        rid = prefix + uuid.uuid4().hex
        reqs = []
        for i, (ids, params, choice) in enumerate(jobs):
            r = _Req(f"{rid}-{i}", chat, arrival, len(ids), False, bool(params.prediction))
            r.out = choice
            reqs.append(r)
            self.live.add(r)
        # the copies of a prompt fork the first: they share its computed prompt blocks (vsc.runtime.scheduler)
        first_of: dict[int, str] = {}
        forks = [first_of.setdefault(r.out.index, r.rid) for r in reqs]
        task = asyncio.current_task()
        gone = asyncio.Event()

        async def watch() -> None:
            try:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # a broken receive channel means the client is gone too
                pass
            gone.set()
            for r in reqs:
                self._abort(r)
            task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        started: list[_Req] = []

        async def start(r: _Req, ids: list[int], params: SamplingParams, parent: str):
            fork_of = parent if parent != r.rid else None
            it = self.engine.generate(GenerateRequest(r.rid, ids, params, arrival, fork_of=fork_of))
            if inspect.isawaitable(it):
                it = await it
            it = it.__aiter__()
            started.append(r)
            try:
                first = await it.__anext__()
            except StopAsyncIteration:
                first = None
            self.metrics.ttft.observe(time.monotonic() - arrival)
            return it, first

        try:
            firsts = await asyncio.gather(*(start(r, ids, params, parent)
                                            for r, (ids, params, _), parent in zip(reqs, jobs, forks)))
            if stream:
                watcher.cancel()
                for r in reqs:
                    self._unguard(r)
                return _ManyStream(self, rid, chat, reqs, firsts, include_usage)
            results = await asyncio.gather(*(self._gather(r, it, first, time.monotonic())
                                             for r, (it, first) in zip(reqs, firsts)))
        except asyncio.CancelledError:
            for r in reqs:
                self._unguard(r)
                self._abort(r)
            if gone.is_set():
                task.uncancel()
                return Response(b"", status_code=499)
            raise
        except RuntimeError_ as e:      # refused (QueueFull, InvalidRequest): the others are aborted
            for r in reqs:
                self._unguard(r)
                self._abort(r)
            if isinstance(e, QueueFull):
                return self._refused(e)
            return ApiError(e.status, str(e), param=getattr(e, "param", None), code=e.code).response()
        except Exception:
            for r in reqs:
                self._unguard(r)
                self._abort(r)
            log.exception("engine failed on request %s", rid)
            return _internal("generating").response()
        finally:
            watcher.cancel()
        for (reason, _, ev) in results:
            if reason == "error":
                return _failed(ev).response()
            if reason == "abort":
                return _shutdown_error().response()
        # each prompt's copies: the first computed the prompt's logprobs, the others share them
        by_prompt: dict[int, list[Choice]] = {}
        for c in (r.out for r in reqs):
            by_prompt.setdefault(c.index, []).append(c)     # (index: the prompt's, until numbered here)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p in sorted(by_prompt):
            copies = by_prompt[p]
            first = copies[0]
            for c in copies[1:]:
                c.prompt_lps = first.prompt_lps
                if c.echo and first.prompt_lps is not None:
                    c.lps[:len(c.prompt_ids)] = first.prompt_lps
            kept = sorted(copies, key=lambda c: -c.cumulative)[:n] if len(copies) > n else copies
            prompt_tokens += len(first.prompt_ids)
            for j, c in enumerate(kept):
                c.index = p * n + j
                completion_tokens += c.completion_tokens
                choices.append(self._choice(c, c.finish_reason))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        first = reqs[0].out
        return Response(orjson.dumps(self._body(rid, reqs[0].created, chat, choices, usage,
                                                first.prompt_logprobs_json(self.token_text) if chat else None)),
                        media_type=JSON)

    async def _collect(self, r: _Req, it, ev: TokenEvent | None, last: float, stream: bool = False) -> Response:
        reason, usage, ev = await self._gather(r, it, ev, last)
        if reason == "error":               # the engine failed the request (a model step raised, a grammar failed)
            if stream:
                return _sse([_failed(ev).body()])
            return _failed(ev).response()
        if reason == "abort" and r.shutdown and not stream:
            return _shutdown_error().response()
        c = r.out
        choice = self._choice(c, reason, r.role, r.echo)
        if r.tools is not None:
            content, calls = tooling.extract(r.tools, "".join(c.parts))
            if calls:
                choice["message"]["content"] = (r.echo + content) if content or r.echo else None
                choice["message"]["tool_calls"] = calls
                if choice["finish_reason"] == "stop":
                    choice["finish_reason"] = "tool_calls"
        if stream:
            return self._tool_stream(r, choice, usage)
        obj = self._body(r.rid, r.created, r.chat, [choice], usage,
                         c.prompt_logprobs_json(self.token_text) if c.chat else None)
        return Response(orjson.dumps(obj), media_type=JSON)

    def _tool_stream(self, r: _Req, choice: dict, usage: dict) -> Response:
        """A finished reply of a request with tools as OpenAI streams it: the role, the content,
        each call (`delta.tool_calls`, numbered by `index`), the finish reason, the usage."""
        message = choice["message"]
        head = {"id": r.rid, "object": "chat.completion.chunk", "created": r.created, "model": self.name}
        extra = {"usage": None} if r.include_usage else {}

        def chunk(delta: dict, reason: str | None = None, logprobs: dict | None = None) -> dict:
            return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": reason}], **extra}
        events = [chunk({"role": message["role"], "content": ""})]
        if message.get("content"):
            events.append(chunk({"content": message["content"]}, None, choice["logprobs"]))
        for i, call in enumerate(message.get("tool_calls") or []):
            events.append(chunk({"tool_calls": [{"index": i, **call}]}))
        events.append(chunk({}, choice["finish_reason"]))
        if r.include_usage:
            events.append({**head, "choices": [], "usage": usage})
        return _sse(events)

    async def _gather(self, r: _Req, it, ev: TokenEvent | None, last: float):
        """Collect a request's events into r.out; (finish_reason, usage, last event)."""
        out = r.out

        def each(ev: TokenEvent) -> None:
            out.add(ev.token_ids, ev.text, ev.logprobs, ev.prompt_logprobs)
        try:
            ev = await _pump(r, it, ev, last, self.metrics.itl.observe, each)
            if ev is not None:
                each(ev)
            reason, usage = self._finish(r, ev)
            out.finish_reason = reason
        finally:
            self._unguard(r)
        await _close(it)
        return reason, usage, ev

    def _choice(self, c: Choice, reason: str, role: str = "assistant", echo: str = "") -> dict:
        """One choice of a response; chat: the reply's `role` and the `echo`ed text before it."""
        tok = self.token_text
        text = "".join(c.parts)
        logprobs = c.logprobs_json(tok, c.token_ids, c.lps)
        if c.chat:
            choice = {"index": c.index, "message": {"role": role, "content": echo + text}, "logprobs": logprobs,
                      "finish_reason": reason}
        else:
            choice = {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": reason}
            if c.prompt_k is not None:
                choice["prompt_logprobs"] = c.prompt_logprobs_json(tok)
        return choice

    def _body(self, rid: str, created: int, chat: bool, choices: list[dict], usage: dict,
              prompt_logprobs: list | None = None) -> dict:
        if chat:
            obj = {"id": rid, "object": "chat.completion", "created": created, "model": self.name,
                   "choices": choices, "usage": usage}
            if prompt_logprobs is not None:
                obj["prompt_logprobs"] = prompt_logprobs
            return obj
        return {"id": rid, "object": "text_completion", "created": created, "model": self.name,
                "choices": choices, "usage": usage}

    # ----------------------------------------------------------------- small endpoints
    async def models(self, request: Request) -> Response:
        return Response(orjson.dumps({"object": "list", "data": [self._model_card()]}), media_type=JSON)

    async def model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id != self.name:
            return ApiError(404, f"The model `{model_id}` does not exist; this server serves `{self.name}`.",
                            param="model", code="model_not_found").response()
        return Response(orjson.dumps(self._model_card()), media_type=JSON)

    def _model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.model_created, "owned_by": "vsc",
                "max_model_len": int(self.engine.max_context)}

    async def openapi(self, request: Request) -> Response:
        """The OpenAPI 3.1 document of this API, generated from its declarations (vsc.runtime.schema)."""
        return Response(orjson.dumps(schema.openapi(__version__)), media_type=JSON)

    async def version(self, request: Request) -> Response:
        return Response(orjson.dumps({"version": __version__}), media_type=JSON)

    async def tokenizer_info(self, request: Request) -> Response:
        """vLLM's GET /tokenizer_info: the tokenizer's class, special tokens, context and chat template.
        lm-eval's `local-completions` (tokenizer_backend auto or remote) tokenizes through this server
        when it answers here and at /tokenize, so the client needs no copy of the tokenizer."""
        info = {"tokenizer_class": type(self.tokenizer).__name__,
                **getattr(self.tokenizer, "special_tokens", {}), "model_max_length": int(self.engine.max_context)}
        template = getattr(self.tokenizer, "chat_template", None)
        if template:
            info["chat_template"] = template
        return Response(orjson.dumps(info), media_type=JSON)

    async def _small(self, request: Request, what: str, answer) -> Response:
        """A small POST endpoint: `await answer(body)` is the answer's JSON; refusals are answered as
        the generation endpoints answer them (400 / 404, 499 for a client gone mid-upload, 500 logged)."""
        arrival = time.monotonic()
        try:
            out = await answer(await self._json(request))
        except ApiError as e:
            self._log_refusal(e, arrival)
            return e.response()
        except ClientDisconnect:
            return Response(b"", status_code=499)
        except Exception:
            log.exception("failed while %s", what)
            return _internal(what).response()
        return Response(orjson.dumps(out), media_type=JSON)

    async def tokenize(self, request: Request) -> Response:
        """vLLM's POST /tokenize: {prompt} or {messages} -> {count, max_model_len, tokens, token_strs}."""
        return await self._small(request, "tokenizing", self._tokenize)

    async def _tokenize(self, body: dict) -> dict:
        q = _check(schema.TokenizeRequest, body)
        _ignore_unknown(q, "/tokenize")
        chat = q.messages is not None
        if chat and q.prompt is not None:
            raise _bad("messages", "give either 'prompt' or 'messages', not both")
        for key in ("chat_template", "chat_template_kwargs", "mm_processor_kwargs", "media_io_kwargs"):
            _unsupported(key, getattr(q, key), lambda v: not v)
        add_special = _or(q.add_special_tokens, not chat)     # vLLM's defaults
        want_strs = q.return_token_strs is True
        if want_strs and not callable(getattr(self.tokenizer, "convert_ids_to_tokens", None)):
            raise _bad("return_token_strs", "this server's tokenizer cannot name its tokens")
        if chat:
            _unsupported("continue_final_message", q.continue_final_message, lambda v: v is False)
            messages = _messages(q.messages)
            try:
                plan = tooling.parse({"tools": body.get("tools")})
            except tooling.ToolsError as e:
                raise _bad(e.param, str(e)) from None
            text = await asyncio.to_thread(self._render_chat, messages, q.add_generation_prompt is not False, plan)
        else:
            for key in ("add_generation_prompt", "continue_final_message"):
                if getattr(q, key) is not None:
                    raise _bad(key, f"'{key}' applies to 'messages', not to 'prompt'")
            if q.tools:
                raise _bad("tools", "'tools' applies to 'messages', not to 'prompt'")
            text = q.prompt
            if text is None:
                raise _bad("prompt", "'prompt' must be a string (or send 'messages')")
        ids = list(await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special))
        strs = list(self.tokenizer.convert_ids_to_tokens(ids)) if want_strs else None
        return {"count": len(ids), "max_model_len": int(self.engine.max_context), "tokens": ids, "token_strs": strs}

    def _render_chat(self, messages: list[dict], add_generation_prompt: bool,
                     plan: tooling.ToolPlan | None = None) -> str:
        messages, extra = tooling.template_messages(messages, plan,
                                                    getattr(self.tokenizer, "supports_tools", False) is True)
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
        except Exception as e:  # template errors (role order, ...) are the caller's
            raise _bad("messages", f"the chat template rejected the messages: {e}") from None

    async def detokenize(self, request: Request) -> Response:
        """vLLM's POST /detokenize: {tokens} -> {prompt}, special tokens included (as vLLM decodes)."""
        return await self._small(request, "detokenizing", self._detokenize)

    async def _detokenize(self, body: dict) -> dict:
        q = _check(schema.DetokenizeRequest, body)
        _ignore_unknown(q, "/detokenize")
        ids = _in_vocab(q.tokens, "tokens", self.vocab)
        return {"prompt": await asyncio.to_thread(self.tokenizer.decode, ids, skip_special_tokens=False)}

    async def health(self, request: Request) -> Response:
        alive = getattr(self.engine, "is_alive", None)
        try:
            ok = True if alive is None else bool(alive() if callable(alive) else alive)
        except Exception:
            log.exception("engine.is_alive() failed")
            ok = False
        if ok:
            return Response(b'{"status":"ok"}', media_type=JSON)
        return Response(b'{"status":"error","message":"the engine is not running"}', status_code=503,
                        media_type=JSON)

    async def metrics_endpoint(self, request: Request) -> Response:
        body, content_type = self.metrics.render(request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type})


async def _peek_call(it, first: TokenEvent | None) -> TokenEvent | None:
    """tool_choice auto, streamed: the events up to where the text differs from `<tool_call>` (text:
    streamed from there), starts with it (calls) or ends, merged into one event."""
    events, text, tag = [first], first.text if first is not None else "", tooling.CALL_TAG
    while events[-1] is not None and events[-1].finish_reason is None and len(text) < len(tag) and tag.startswith(text):
        try:
            ev = await it.__anext__()
        except StopAsyncIteration:
            ev = None
        events.append(ev)
        text += ev.text if ev is not None else ""
    got = [e for e in events if e is not None]
    if len(events) == 1 or not got:
        return first
    last = got[-1]
    return dataclasses.replace(last, token_ids=[t for e in got for t in e.token_ids], text=text,
                               completion_tokens=last.completion_tokens if last.finish_reason else 0)


async def _pump(r: _Req, it, ev: TokenEvent | None, last: float, observe, each) -> TokenEvent | None:
    """Drive one request's engine stream from its first event `ev` (at monotonic time `last`):
    `each(event)` for every event before the final one (an awaitable it returns is awaited: a
    chunk's send), completion tokens counted in r.counted and each inter-token latency observed.
    Returns the final event (its tokens counted, not passed to `each`), or None when the stream
    ended without one. The one loop of the collected, streamed and tool-call paths."""
    anext_ = it.__anext__
    while ev is not None and ev.finish_reason is None:
        r.counted += len(ev.token_ids)
        sending = each(ev)
        if sending is not None:
            await sending
        try:
            ev = await anext_()
        except StopAsyncIteration:
            ev = None
        now = time.monotonic()
        observe(now - last)
        last = now
    if ev is not None:
        r.counted += len(ev.token_ids)
    return ev


def _sse(events: list[dict]) -> Response:
    """A whole event stream at once (each event a JSON object), ended by [DONE]."""
    return Response(b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + _DONE,
                    headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
                    media_type="text/event-stream")


def _shutdown_error() -> ApiError:
    return ApiError(503, "the server shut down before the request finished; retry it", code="server_shutdown")


async def _close(it) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.exception("closing an engine stream failed")


class _EventStream(Response):
    """Server-sent events of one accepted request; aborts it in the engine if the client leaves."""

    def __init__(self, app: _App, r: _Req, it, first: TokenEvent | None, t_first: float):
        self.app, self.r, self.it, self.first, self.t_first = app, r, it, first, t_first
        self.status_code = 200
        self.background = None
        self.raw_headers = _SSE_HEADERS

    def _chunk_parts(self) -> tuple[bytes, bytes, bytes]:
        """(role chunk or b"", prefix, suffix): a content chunk is prefix + orjson.dumps(text) + suffix."""
        r, name = self.r, self.app.name_json
        head = b'data: {"id":"' + r.rid.encode() + b'","object":"' + \
            (b"chat.completion.chunk" if r.chat else b"text_completion") + \
            b'","created":' + str(r.created).encode() + b',"model":' + name + b',"choices":[{"index":0,'
        tail = b',"logprobs":null,"finish_reason":null}]' + (b',"usage":null' if r.include_usage else b"") + b"}\n\n"
        if r.chat:
            first = head + b'"delta":{"role":' + orjson.dumps(r.role) + b',"content":""}' + tail
            if r.echo:          # chat echo: the last message's text, in the chunk after the role's
                first += head + b'"delta":{"content":' + orjson.dumps(r.echo) + b"}" + tail
            return first, head + b'"delta":{"content":', b"}" + tail
        return b"", head + b'"text":', tail

    def _choice(self, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        if self.r.chat:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": reason}
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def _detailed(self, ev: TokenEvent, reason: str | None) -> tuple[bytes, str, dict | None]:
        """A chunk with logprobs / the echoed prompt (the slow path): (chunk or b"", text, logprobs)."""
        r, out = self.r, self.r.out
        text, ids, entries = out.add(ev.token_ids, ev.text, ev.logprobs, ev.prompt_logprobs)
        logprobs = out.logprobs_json(self.app.token_text, ids, entries)
        out.text_len += len(text)
        if reason is not None or not (text or ids):
            return b"", text, logprobs
        obj = "chat.completion.chunk" if r.chat else "text_completion"
        chunk: dict[str, Any] = {"id": r.rid, "object": obj, "created": r.created, "model": self.app.name,
                                 "choices": [self._choice(text, None, logprobs)]}
        if r.include_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n", text, logprobs

    def _final(self, text: str, reason: str, usage: dict, logprobs: dict | None = None) -> bytes:
        r = self.r
        obj = "chat.completion.chunk" if r.chat else "text_completion"
        choice = self._choice(text, reason, logprobs)
        chunk: dict[str, Any] = {"id": r.rid, "object": obj, "created": r.created, "model": self.app.name,
                                 "choices": [choice]}
        out = [b"data: ", orjson.dumps(chunk), b"\n\n"]
        if r.include_usage:
            chunk["usage"] = None
            out[1] = orjson.dumps(chunk)
            out += [b"data: ", orjson.dumps({"id": r.rid, "object": obj, "created": r.created,
                                              "model": self.app.name, "choices": [], "usage": usage}), b"\n\n"]
        out.append(_DONE)
        return b"".join(out)

    async def __call__(self, scope, receive, send) -> None:
        r, app = self.r, self.app
        try:
            await self._stream(send)
        except asyncio.CancelledError:
            if r.client_gone:           # cancelled by our watcher: the client left, nothing more to do
                r.task.uncancel()
                return
            if app.draining:            # the shutdown grace ran out (uvicorn cancels what is left)
                r.task.uncancel()
                if not r.finished:
                    app._log_shutdown_abort(r)
                    await self._send_last(send, "abort")
                return
            raise
        finally:
            app._unguard(r)
            app._abort(r)               # no-op when the request finished

    async def _send_last(self, send, reason: str) -> None:
        """A stream's last chunk (finish_reason `reason`) and [DONE], if the connection takes it."""
        r = self.r
        usage = {"prompt_tokens": r.prompt_len, "completion_tokens": r.counted,
                 "total_tokens": r.prompt_len + r.counted}
        try:
            await send({"type": _BODY, "body": self._final("", reason, usage), "more_body": False})
        except Exception:   # the client or the connection is gone
            pass

    async def _stream(self, send) -> None:
        r, app, it = self.r, self.app, self.it
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        pending, prefix, suffix = self._chunk_parts()
        dumps = orjson.dumps
        detailed = r.out is not None and r.out.detailed

        def each(ev: TokenEvent):
            """A token event's chunk: the send to await (None: nothing to send yet)."""
            nonlocal pending
            if detailed:
                chunk = self._detailed(ev, None)[0]
                if not chunk:
                    return None
                body = pending + chunk
            elif ev.text:
                body = pending + prefix + dumps(ev.text) + suffix
            else:
                return None
            pending = b""
            return send({"type": _BODY, "body": body, "more_body": True})
        try:
            ev = await _pump(r, it, self.first, self.t_first, app.metrics.itl.observe, each)
        except Exception:               # (a cancellation is a BaseException and passes through)
            log.exception("engine failed while streaming request %s", r.rid)
            app._unguard(r)
            app._abort(r)
            err = _internal("generating").body()
            await send({"type": _BODY, "body": pending + b"data: " + orjson.dumps(err) + b"\n\n" + _DONE,
                        "more_body": False})
            return
        text, logprobs = "", None
        if ev is not None:
            if detailed:
                _, text, logprobs = self._detailed(ev, ev.finish_reason)
            else:
                text = ev.text
        reason, usage = app._finish(r, ev)
        app._unguard(r)                 # finished: a disconnect from here on changes nothing
        if reason == "error":           # the engine failed the request (a model step raised, a grammar failed)
            out = pending + b"data: " + orjson.dumps(_failed(ev).body()) + b"\n\n" + _DONE
        else:
            out = pending + self._final(text, reason, usage, logprobs)
        await send({"type": _BODY, "body": out, "more_body": False})
        await _close(it)


class _ResponsesStream(Response):
    """A chat completions event stream re-encoded as Responses API events (vsc.runtime.responses)."""

    def __init__(self, inner: _EventStream, translator: StreamTranslator):
        self.inner, self.translator = inner, translator
        self.status_code, self.background, self.raw_headers = 200, None, inner.raw_headers

    async def __call__(self, scope, receive, send) -> None:
        feed = self.translator.feed

        async def translated(message) -> None:
            if message["type"] == _BODY:
                body, more = feed(message.get("body", b"")), message.get("more_body", False)
                if body or not more:
                    await send({"type": _BODY, "body": body, "more_body": more})
                return
            await send(message)
        await self.inner(scope, receive, translated)


class _ManyStream(Response):
    """Server-sent events of several choices (n > 1, a list of prompts), as vLLM streams them: each
    chunk carries one choice, named by its index; usage (stream_options.include_usage) sums them.
    Every chunk goes through orjson (no fast path: these streams are the rare case)."""

    def __init__(self, app: _App, rid: str, chat: bool, reqs: list[_Req], firsts: list, include_usage: bool):
        self.app, self.rid, self.chat, self.reqs, self.firsts = app, rid, chat, reqs, firsts
        self.include_usage = include_usage
        self.status_code = 200
        self.background = None
        self.raw_headers = _SSE_HEADERS
        self.prompt_tokens = sum({r.out.index: len(r.out.prompt_ids) for r in reqs}.values())
        for i, r in enumerate(reqs):      # jobs are in prompt order, then copy order: the choice index
            r.out.index = i

    def _chunk(self, c: Choice, text: str, reason: str | None, logprobs: dict | None) -> bytes:
        if self.chat:
            choice = {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                      "finish_reason": reason}
        else:
            choice = {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return self._data([choice])

    def _data(self, choices: list, usage: dict | None = None) -> bytes:
        obj: dict[str, Any] = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                               "created": self.reqs[0].created, "model": self.app.name, "choices": choices}
        if self.include_usage:
            obj["usage"] = usage
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    async def __call__(self, scope, receive, send) -> None:
        app, reqs = self.app, self.reqs
        task = asyncio.current_task()
        queue: asyncio.Queue = asyncio.Queue()
        gone = False

        async def pump(i: int, it, ev) -> None:
            try:
                while ev is not None:
                    queue.put_nowait((i, ev))
                    if ev.finish_reason is not None:
                        return
                    try:
                        ev = await it.__anext__()
                    except StopAsyncIteration:
                        ev = None
            except Exception:
                log.exception("engine failed while streaming request %s", reqs[i].rid)
            queue.put_nowait((i, None))

        async def watch() -> None:
            nonlocal gone
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # a broken receive channel means the client is gone too
                pass
            gone = True
            for r in reqs:
                app._abort(r)
            task.cancel()

        loop = asyncio.get_running_loop()
        pumps = [loop.create_task(pump(i, it, first)) for i, (it, first) in enumerate(self.firsts)]
        watcher = loop.create_task(watch())
        completion = 0
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if self.chat:
                await send({"type": _BODY, "more_body": True, "body": b"".join(
                    self._data([{"index": r.out.index, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]) for r in reqs)})
            left = len(reqs)
            while left:
                i, ev = await queue.get()
                r = reqs[i]
                c = r.out
                if r.finished:
                    continue
                text, entries, ids = "", [], []
                if ev is not None:
                    r.counted += len(ev.token_ids)
                    text, ids, entries = c.add(ev.token_ids, ev.text, ev.logprobs, ev.prompt_logprobs)
                logprobs = c.logprobs_json(app.token_text, ids, entries) if ids or text else None
                c.text_len += len(text)
                if ev is not None and ev.finish_reason is None:
                    if text or ids:
                        await send({"type": _BODY, "body": self._chunk(c, text, None, logprobs), "more_body": True})
                    continue
                reason, _ = app._finish(r, ev)
                left -= 1
                if reason == "error" or ev is None:      # one choice failed: the stream ends with the error
                    err = _failed(ev).body() if ev is not None else _internal("generating").body()
                    await send({"type": _BODY, "body": b"data: " + orjson.dumps(err) + b"\n\n" + _DONE,
                                "more_body": False})
                    return
                completion += c.completion_tokens
                await send({"type": _BODY, "body": self._chunk(c, text, reason, logprobs), "more_body": True})
            tail = b""
            if self.include_usage:
                tail = self._data([], {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                                       "total_tokens": self.prompt_tokens + completion})
            await send({"type": _BODY, "body": tail + _DONE, "more_body": False})
        except asyncio.CancelledError:
            if gone:
                task.uncancel()
                return
            raise
        finally:
            watcher.cancel()
            for r in reqs:
                app._abort(r)              # no-op for the finished ones
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for it, _ in self.firsts:
                await _close(it)


# --------------------------------------------------------------------------- the app

def build_app(engine, tokenizer, metrics: ServerMetrics, served_model_name: str,
              security: Security | None = None) -> Starlette:
    """The OpenAI-compatible app over `engine`; `metrics` also reads engine.stats() at each scrape.
    `security` (vsc.runtime.guard): API key, allowed hosts, body limit (default: from the context)."""
    metrics.bind_engine(engine, served_model_name)
    a = _App(engine, tokenizer, metrics, served_model_name)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code,
                        type_="invalid_request_error").response()

    routes = [Route(e.route, getattr(a, e.handler), methods=[e.method]) for e in schema.ENDPOINTS]
    security = security or Security(max_body_bytes=default_max_body(engine.max_context))
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found},
                    middleware=[Middleware(HttpGuard, security=security)])
    app.state.vsc = a
    return app
