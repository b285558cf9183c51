"""The request and response bodies of the HTTP API, declared once (pydantic v2).

`check(Model, body)` validates a parsed JSON body against its declaration (strict types: an
integer field takes no bool or float, a string field no number; `null` is the same as absent)
and returns the model; a body that does not fit raises `RequestError` with the field (`param`)
and a one-line message naming it, which the HTTP layer answers as an OpenAI-style 400. Fields a
model does not declare are kept in `model_extra`: the HTTP layer logs and ignores them, as vLLM
does. What depends on the server (the vocabulary, the context, a JSON Schema the grammar engine
must compile, the tool names a `tool_choice` may name) is checked where the request is served
(vsc.runtime.http, vsc.runtime.tools), once the declared shape is known to hold.

`openapi()` is the OpenAPI 3.1 document of the API, generated from these declarations (GET
/openapi.json). Requests are validated once each, before anything is streamed: the per-token
path never sees these models (bench/schema_overhead.py measures the cost per request).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError, core_schema

from vsc.runtime.logprobs import MAX_LOGPROBS

SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1
MAX_N = 64          # most choices (n, best_of) one request may ask for


class RequestError(ValueError):
    """A request body that does not fit its declaration: (param, one-line message) -> HTTP 400."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


# --------------------------------------------------------------------------- declaring

def _expect(what: str, whole: bool = True):
    """A field refused with one message, "'<field>' `what`" (a Python wrap validator, for values whose
    parts have messages of their own: those are kept, with their path). `whole`: whatever failed
    (a union's several errors as one line); else only the value itself (not an object), while an
    error below it keeps pydantic's kind of message ('<field>.<part>' must be ...)."""
    def validate(v, handler):
        try:
            return handler(v)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            if err["type"] in ("vsc", "vsc_whole"):     # a part with its own message: keep it, and where it is
                ctx = err["ctx"] if err["type"] == "vsc" else {"what": err["msg"], "at": ""}
                raise PydanticCustomError("vsc", "{what}", {"what": ctx["what"],
                                                            "at": _path(err["loc"]) + ctx["at"]}) from None
            if not whole and err["loc"]:
                raise PydanticCustomError("vsc", "{what}", {"what": _phrase(err), "at": _path(err["loc"])}) from None
            raise PydanticCustomError("vsc", "{what}", {"what": what, "at": ""}) from None
    return WrapValidator(validate)


class _OneOf:
    """A value refused with one message, "'<field>' `what`", whatever part of it failed (a union's
    several errors as one line). A core schema wrapper: nothing runs in Python when it fits."""

    def __init__(self, what: str):
        self.what = what

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.custom_error_schema(handler(source), "vsc_whole", custom_error_message=self.what)


class _Body(BaseModel):
    """A request body: strict types; fields it does not declare are kept in model_extra."""

    model_config = ConfigDict(strict=True, extra="allow")


class _Part(BaseModel):
    """A nested object: strict types; other keys are allowed (the raw body keeps them: tools are
    passed on as sent)."""

    model_config = ConfigDict(strict=True, extra="ignore",
                              json_schema_extra={"additionalProperties": True})


class TextPart(_Part):
    type: Literal["text"]
    text: str


TEXT_PARTS = "a string or a list of text parts ({'type': 'text', 'text': ...})"
Content = Annotated[str | list[TextPart], _OneOf(f"must be {TEXT_PARTS}")]


class ChatMessage(_Part):
    """A message of the conversation; `content` text or text parts (joined with "\\n", as vLLM)."""

    role: str
    content: Content | None = None
    name: str | None = None
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")
    tool_calls: list[dict[str, Any]] | None = Field(
        None, description="an assistant message's calls: {id, type: function, function: {name, arguments}}")


class FunctionDefinition(_Part):
    name: Annotated[str, _OneOf("must be 1 to 64 letters, digits, _ or -")]
    description: Annotated[str, _OneOf("must be a string")] | None = None
    parameters: Annotated[dict[str, Any], _OneOf("must be a JSON Schema object")] | None = Field(
        None, description="the arguments' JSON Schema")


class Tool(_Part):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Part):
    name: str


class NamedToolChoice(_Part):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Annotated[Literal["none", "auto", "required"] | NamedToolChoice,
                       _OneOf('must be none, auto, required or {"type": "function", "function": {"name": ...}}')]


class StreamOptions(_Part):
    include_usage: bool | None = Field(None, description="default true once stream_options is given (as vLLM)")
    continuous_usage_stats: bool | None = Field(None, description="refused when true (usage on every chunk)")


class JsonSchemaSpec(_Part):
    name: str | None = None
    description: str | None = None
    schema_: Annotated[dict[str, Any], _expect("must be a JSON Schema object")] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Part):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StructuredOutputs(_Part):
    """vLLM's structured outputs: json (a schema, as an object or JSON text) and json_object are served."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: str | None = None


PREDICTION = '{"type": "content", "content": "..."}'


class Prediction(_Part):
    """Predicted output: drafts for speculative decoding (the output is unchanged)."""

    type: Literal["content"]
    content: Annotated[str | list[TextPart], _OneOf(f"must be a string or a list of text parts, as in {PREDICTION}")]


TokenIds = list[Annotated[int, Ge(0)]]
Tools = list[Annotated[Tool, _expect('must be {"type": "function", "function": {...}}')]]

_Stop = Annotated[str | list[str], _OneOf("must be a string or a list of strings")]
_LogitBias = Annotated[dict[str, Annotated[float, Ge(-100), Le(100), _OneOf("must be a number in [-100, 100]")]],
                       _expect("must be an object mapping token ids to biases in [-100, 100], e.g. {\"50256\": -100}",
                               whole=False)]


class _Sampling(_Body):
    """The fields both generation endpoints take (vLLM's SamplingParams and OpenAI's)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, description="completions: default 16; 0 only with echo")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: off")
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: _Stop | None = None
    stop_token_ids: TokenIds | None = None
    ignore_eos: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: Annotated[ResponseFormat, _expect(
        'must be an object, e.g. {"type": "json_object"} or {"type": "json_schema", "json_schema": '
        '{"schema": {...}}}', whole=False)] | None = None
    structured_outputs: StructuredOutputs | None = None
    prediction: Annotated[Prediction, _expect(f"must be {PREDICTION}")] | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    logit_bias: _LogitBias | None = None
    min_tokens: int | None = Field(None, ge=0)
    include_stop_str_in_output: bool | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description="-1: the context length")
    truncation_side: Literal["left", "right"] | None = None
    user: str | None = Field(None, description="an end user's id; changes no output")


#: vLLM request fields that change its output and that vsc does not implement: a request may send
#: each at the value that means "off" (vLLM's default; what vsc does anyway), any other value is
#: refused with a 400 naming the field, never ignored. Per field: (is_off(value, chat), why).
_NONE_OR_EMPTY = (lambda v, chat: v is None or v == [] or v == {})
VLLM_UNIMPLEMENTED: dict[str, tuple[Any, str]] = {
    "allowed_token_ids": (_NONE_OR_EMPTY, "restrict the vocabulary with 'logit_bias' instead"),
    "bad_words": (_NONE_OR_EMPTY, "ban single tokens with 'logit_bias' (-100) instead"),
    "skip_special_tokens": (lambda v, chat: v is None or v is True, "special tokens are always left out of the text"),
    "spaces_between_special_tokens": (lambda v, chat: v is None or v is True, "special tokens are always left out"),
    "use_beam_search": (lambda v, chat: v is None or v is False, "no beam search; use 'n' or 'best_of'"),
    "length_penalty": (lambda v, chat: v is None or v == 1, "no beam search"),
    "early_stopping": (lambda v, chat: v is None or v is False, "no beam search"),
    "return_tokens_as_token_ids": (lambda v, chat: v is None or v is False, "logprobs name tokens by their text"),
    "logits_processors": (_NONE_OR_EMPTY, "a server runs no client-named code"),
    "add_special_tokens": (lambda v, chat: v is None or v is (not chat),
                           "the prompt is tokenized as vLLM does by default (completions with, chat without)"),
    "chat_template": (lambda v, chat: v is None, "the model's own chat template is compiled into the server"),
    "chat_template_kwargs": (_NONE_OR_EMPTY, "the model's own chat template is compiled into the server"),
    "documents": (_NONE_OR_EMPTY, "no retrieval documents in the chat template"),
    "guided_json": (lambda v, chat: v is None, "send 'response_format' or 'structured_outputs': {\"json\": ...}"),
    "guided_regex": (lambda v, chat: v is None, "regex constraints are not served"),
    "guided_choice": (lambda v, chat: v is None, "choice constraints are not served"),
    "guided_grammar": (lambda v, chat: v is None, "grammar constraints are not served"),
    "guided_decoding_backend": (lambda v, chat: v is None, "one grammar engine (llguidance)"),
    "priority": (lambda v, chat: v is None or v == 0, "requests are scheduled first come, first served"),
    "prompt_embeds": (lambda v, chat: v is None, "prompts are text or token ids"),
}


def unimplemented_vllm_field(extra: dict | None, chat: bool) -> tuple[str, str] | None:
    """(field, message) for the first vLLM-only field in `extra` set to something vsc would not do."""
    for key, value in (extra or {}).items():
        rule = VLLM_UNIMPLEMENTED.get(key)
        if rule is not None and not rule[0](value, chat):
            shown = repr(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            return key, f"'{key}'={shown} is not supported by this server ({rule[1]})"
    return None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Literal[1] | None = Field(None, description="only 1 (chat)")
    echo: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None


Prompt = Annotated[str | list[int] | list[str] | list[list[int]], _OneOf(
    "must be a string, a list of token ids, or a list of strings or of token id lists")]


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Prompt
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = Field(None, description="only empty")


class TokenizeRequest(_Body):
    """POST /tokenize (vLLM's): `prompt`, or `messages` rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    tools: Tools | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM's)."""

    model: str | None = None
    tokens: list[int]


class ResponsesRequest(_Body):
    """POST /v1/responses, plain text (vsc.runtime.responses refuses what it cannot serve)."""

    model: str | None = None
    input: Annotated[str | list[dict[str, Any]], _OneOf("must be a string or a non-empty list of messages")]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = None
    text: dict[str, Any] | None = Field(None, description='{"format": {"type": "text" | "json_object" | '
                                                          '"json_schema", ...}}')
    store: bool | None = Field(None, description="false only: nothing is stored")
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = Field(None, description="refused: nothing is stored")
    tools: list[Any] | None = Field(None, description="[] only")
    tool_choice: Any = Field(None, description="none or auto only")
    parallel_tool_calls: bool | None = None
    reasoning: Any = Field(None, description="refused")
    truncation: str | None = Field(None, description="disabled only")
    include: list[Any] | None = Field(None, description="[] only")
    top_logprobs: int | None = Field(None, description="0 only")
    background: bool | None = Field(None, description="false only")
    user: str | None = None
    service_tier: str | None = None
    stream_options: Any = Field(None, description="refused")


# --------------------------------------------------------------------------- responses

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: dict[str, int] | None = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: str
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"] | None


class ChatCompletion(BaseModel):
    """The answer of a chat completion (stream false; streamed: chat.completion.chunk events)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[Any] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length", "abort"] | None
    prompt_logprobs: list[Any] | None = None


class Completion(BaseModel):
    """The answer of a completion (stream false; streamed: text_completion events)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str = Field(description="one line, naming the field")
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --------------------------------------------------------------------------- checking

_TYPES = {"int_type": "an integer", "float_type": "a number", "bool_type": "a boolean", "string_type": "a string",
          "list_type": "a list", "dict_type": "an object", "model_type": "an object",
          "model_attributes_type": "an object", "int_from_float": "an integer"}


def _path(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def _name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object",
            type(None): "null"}.get(type(v), type(v).__name__)


def _bounds(model: type[BaseModel], name: Any) -> tuple[Any, Any, bool, bool, bool]:
    """(lo, hi, lo open, hi open, a number) of a top-level field's declared range (None: unbounded)."""
    field = model.model_fields.get(name)
    lo = hi = None
    lo_open = hi_open = False
    for m in field.metadata if field is not None else ():
        if isinstance(m, (Ge, Gt)):
            lo, lo_open = (m.ge, False) if isinstance(m, Ge) else (m.gt, True)
        elif isinstance(m, (Le, Lt)):
            hi, hi_open = (m.le, False) if isinstance(m, Le) else (m.lt, True)
    return lo, hi, lo_open, hi_open, field is not None and float in get_args(field.annotation)


def _range(v: Any, ctx: dict, bounds: tuple | None) -> str:
    """'must be in [lo, hi], got v' (a number) or 'between lo and hi' (an integer) from the field's
    declared range (`bounds`, _bounds) or the one bound pydantic names (ctx)."""
    if bounds is not None and (bounds[0] is not None or bounds[1] is not None):
        lo, hi, lo_open, hi_open, number = bounds
    else:
        lo, lo_open = (ctx["ge"], False) if "ge" in ctx else (ctx.get("gt"), "gt" in ctx)
        hi, hi_open = (ctx["le"], False) if "le" in ctx else (ctx.get("lt"), "lt" in ctx)
        number = type(v) is float
    if hi is None:
        return f"must be {'>' if lo_open else '>='} {lo:g}, got {v}"
    if lo is None:
        return f"must be {'<' if hi_open else '<='} {hi:g}, got {v}"
    if not number:
        return f"must be between {lo} and {hi}, got {v}"
    return f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, got {v}"


def _phrase(err: dict, bounds: tuple | None = None) -> str:
    """What a field that failed with pydantic error `err` must be (the message after its name)."""
    kind, v = err["type"], err.get("input")
    if kind == "vsc":
        return err["ctx"]["what"]
    if kind == "vsc_whole":
        return err["msg"]
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return _range(v, err.get("ctx") or {}, bounds)
    if kind == "finite_number":
        return f"must be a finite number, got {v}"
    if kind == "missing":
        return "is required"
    if kind == "literal_error":
        return f"must be {err['ctx']['expected'].replace(chr(39), '')}, got {v!r}"
    if kind == "too_short":
        return "must not be empty"
    if kind in _TYPES:
        return f"must be {_TYPES[kind]}, got {_name(v)}" + ("" if v is None else f" {v!r}"[:200])
    return err["msg"]


def _message(model: type[BaseModel], err: dict) -> str:
    """One line for one pydantic error, naming the field."""
    loc = err["loc"]
    at = err["ctx"]["at"] if err["type"] == "vsc" else ""
    bounds = _bounds(model, loc[0]) if len(loc) == 1 else None
    return f"'{_path(loc)[1:]}{at}' {_phrase(err, bounds)}"


def check(model: type[BaseModel], body: dict) -> Any:
    """`body` as a `model`, or RequestError naming the first field that does not fit."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = err["loc"]
        raise RequestError(str(loc[0]) if loc else None, _message(model, err)) from None


# --------------------------------------------------------------------------- the OpenAPI document

def _json(model: str | None, description: str) -> dict:
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}} if model else {}
    return {"description": description, **({"content": content} if content else {})}


def _errors(*statuses: int) -> dict:
    words = {400: "a field that does not fit, named in `param`", 401: "a missing or wrong API key",
             404: "an unknown model", 413: "a body over the size limit", 415: "not application/json",
             429: "the server is at capacity (Retry-After)", 500: "a server error (logged)",
             503: "the server is shutting down"}
    return {str(s): _json("ErrorResponse", words[s]) for s in statuses}


def _post(model: str, answer: str | None, summary: str, stream: bool = False) -> dict:
    ok = _json(answer, "the answer")
    if stream:
        ok.setdefault("content", {})["text/event-stream"] = {
            "schema": {"type": "string", "description": "with `stream: true`: server-sent events, ended by "
                                                        "`data: [DONE]`"}}
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}},
        "responses": {"200": ok, **_errors(400, 401, 404, 413, 415, 429, 500, 503)}}}


def _get(answer: str | None, summary: str, media: str = "application/json", errors=()) -> dict:
    ok = _json(answer, "the answer") if answer or media == "application/json" else \
        {"description": "the answer", "content": {media: {"schema": {"type": "string"}}}}
    if not answer and media == "application/json":
        ok["content"] = {media: {"schema": {"type": "object"}}}
    return {"get": {"summary": summary, "responses": {"200": ok, **_errors(*errors)}}}


_MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest, ResponsesRequest,
    ChatCompletion, Completion, ModelList, ModelCard, TokenizeResponse, DetokenizeResponse, ErrorResponse)
_document: dict | None = None


@dataclass(frozen=True)
class Endpoint:
    """One route of the server, declared once: vsc.runtime.http serves `handler` (a method of its
    app) at `route`; the OpenAPI document describes it from `doc` (path item minus parameters)."""

    route: str                  # Starlette's path ("{model_id:path}" converters allowed)
    method: str
    handler: str
    doc: dict

    @property
    def path(self) -> str:      # the OpenAPI path: converters dropped
        return re.sub(r"\{(\w+):\w+\}", r"{\1}", self.route)


_MODEL_ID = [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/v1/completions", "POST", "completions",
             _post("CompletionRequest", "Completion", "completion", True)),
    Endpoint("/v1/chat/completions", "POST", "chat_completions",
             _post("ChatCompletionRequest", "ChatCompletion", "chat completion", True)),
    Endpoint("/v1/responses", "POST", "responses", _post("ResponsesRequest", None, "OpenAI Responses API, plain text", True)),
    Endpoint("/v1/models", "GET", "models", _get("ModelList", "the served model", errors=(401,))),
    Endpoint("/v1/models/{model_id:path}", "GET", "model",
             {**_get("ModelCard", "one model", errors=(401, 404)), "parameters": _MODEL_ID}),
    Endpoint("/health", "GET", "health", _get(None, "200 while the engine runs, else 503", errors=(503,))),
    Endpoint("/version", "GET", "version", _get(None, "the vsc version")),
    Endpoint("/tokenize", "POST", "tokenize", _post("TokenizeRequest", "TokenizeResponse", "token ids of a prompt or messages")),
    Endpoint("/tokenizer_info", "GET", "tokenizer_info",
             _get(None, "the tokenizer's class, special tokens and chat template", errors=(401,))),
    Endpoint("/detokenize", "POST", "detokenize", _post("DetokenizeRequest", "DetokenizeResponse", "the text of token ids")),
    Endpoint("/metrics", "GET", "metrics_endpoint",
             _get(None, "Prometheus metrics (vLLM's names and vsc_ ones)", media="text/plain")),
    Endpoint("/openapi.json", "GET", "openapi", _get(None, "this document")),
)


def openapi(version: str) -> dict:
    """The OpenAPI 3.1 document of the server's API (generated once, from the declarations above)."""
    global _document
    if _document is None:
        _, defs = models_json_schema([(m, "validation") for m in _MODELS],
                                     ref_template="#/components/schemas/{model}")
        _document = {
            "openapi": "3.1.0",
            "info": {"title": "vsc OpenAI-compatible server", "version": version,
                     "description": "A compiled vsc server's API: OpenAI's and vLLM's (docs/openai-api.md)."},
            "paths": {e.path: e.doc for e in ENDPOINTS},
            "components": {"schemas": defs["$defs"]},
        }
    return _document
