"""JSON Schema acceptance: what a schema must be for json mode, checked without a tokenizer.

The one rule the compiler's json-mode pass (at compile time, through vsc.ir.inputs) and the
server (a request's `response_format`, vsc.runtime.http) both apply: the schema as compact
JSON text (`canonical_schema`, its identity) that llguidance compiles under the resource
limits (`check_schema`). A declaration module the compiler may import (see the import-linter
contracts in pyproject.toml); the grammar engine that applies a schema per token is
vsc.runtime.constrain.
"""
from __future__ import annotations

import json

from vsc.runtime.api import InvalidRequest

#: The schema of "any JSON object": OpenAI's response_format {"type": "json_object"}, and
#: the json-mode pass's `schema=any`.
ANY_JSON_OBJECT = '{"type":"object"}'

#: llguidance JSON compile options applied before the schema's own `x-guidance`.
JSON_DEFAULTS = {"whitespace_flexible": False}

#: The largest schema accepted, as compact JSON text (bytes of UTF-8).
SCHEMA_MAX_BYTES = 64 * 1024

#: A constraint text starting with this is an llguidance Lark grammar, not a JSON Schema (the
#: prefix SGLang and llama.cpp use for llguidance grammars): vsc.runtime.tools builds one for
#: tool_choice auto (free text or schema-valid tool calls). Clients cannot send one: the HTTP
#: layer only passes JSON Schemas it parsed itself.
LARK_PREFIX = "%llguidance {}\n"

#: llguidance's resource limits for compiling and running a grammar (see `parser_limits`):
#: Earley items per mask step and per row, lexer fuel to build (initial) and to step, lexer
#: states (1-2 kB each) and grammar symbols. Going past one is a one-line grammar error.
GRAMMAR_LIMITS = {"step_max_items": 50_000, "max_items_in_row": 2_000, "initial_lexer_fuel": 1_000_000,
                  "step_lexer_fuel": 200_000, "max_lexer_states": 50_000, "max_grammar_size": 200_000}


class SchemaError(InvalidRequest):
    """A schema that is not JSON, not an object, too big, or that llguidance rejects (HTTP 400)."""

    param = "response_format"


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - a pinned dependency
        raise SchemaError(f"json mode needs the llguidance package ({e})") from None
    return llguidance


def parser_limits():
    """`GRAMMAR_LIMITS` as llguidance's LLParserLimits (errors without parser state dumps)."""
    return _llguidance().LLParserLimits(verbose_errors=False, **GRAMMAR_LIMITS)


def _one_line(message: str) -> str:
    first = next((line.strip() for line in str(message).splitlines() if line.strip()), "")
    return first or "unknown error"


def canonical_schema(schema: str | dict) -> str:
    """The schema as compact JSON text (its identity for caching and hashing).

    Raises SchemaError if `schema` is not JSON, not a JSON object, nested too deep for Python's
    JSON codec or longer than SCHEMA_MAX_BYTES. A Lark grammar (LARK_PREFIX) is its own identity.
    """
    if isinstance(schema, str) and schema.startswith(LARK_PREFIX):
        if len(schema.encode()) > 4 * SCHEMA_MAX_BYTES:
            raise SchemaError(f"the grammar is longer than {4 * SCHEMA_MAX_BYTES} bytes")
        return schema
    try:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise SchemaError(f"the schema is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(schema, dict):
            raise SchemaError(f"a JSON Schema must be a JSON object, got {type(schema).__name__}")
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except RecursionError:
        raise SchemaError("the schema is nested too deeply") from None
    except ValueError as e:      # NaN / Infinity in a schema given as a dict
        raise SchemaError(f"the schema is not valid JSON: {e}") from None
    size = len(text.encode())
    if size > SCHEMA_MAX_BYTES:
        raise SchemaError(f"the schema is {size} bytes as compact JSON; the limit is {SCHEMA_MAX_BYTES} bytes")
    return text


def grammar_of(schema_text: str) -> str:
    """The llguidance grammar for a (canonical) schema text, or a Lark grammar (LARK_PREFIX)."""
    llg = _llguidance()
    try:
        if schema_text.startswith(LARK_PREFIX):
            return llg.LLMatcher.grammar_from_lark(schema_text)
        return llg.LLMatcher.grammar_from_json_schema(schema_text, defaults=dict(JSON_DEFAULTS))
    except (ValueError, TypeError) as e:
        raise SchemaError(f"invalid JSON Schema: {_one_line(e)}") from None


def check_schema(schema: str | dict) -> str:
    """Canonical text of `schema` after llguidance accepted it (no tokenizer needed).

    Raises SchemaError with one line saying why not (e.g. an unknown `type`, a `$ref` to
    nothing, an unsupported keyword).
    """
    text = canonical_schema(schema)
    llg = _llguidance()
    message = llg.LLMatcher.validate_grammar(grammar_of(text), None, limits=parser_limits())
    if message and not message.startswith("WARNING"):
        raise SchemaError(f"invalid JSON Schema: {_one_line(message)}")
    return text
