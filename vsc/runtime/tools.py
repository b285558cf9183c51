"""OpenAI tool calling for chat completions: the request's `tools`, `tool_choice` and
`parallel_tool_calls`, the conversation's tool calls and results, and the reply's `tool_calls`.

Prompt. The tools and the conversation go through the model's own chat template, as
transformers' `apply_chat_template(messages, tools=...)` renders them, when the template renders
`tools` (it names the variable). A template without tool support gets the fallback, Hermes /
Qwen2.5's format rendered into plain messages: the tools, with the call format, are appended to
the system message (or make one); an assistant message's `tool_calls` become its text,
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` each; a `tool` message becomes
a `user` message `<tool_response>\\n...\\n</tool_response>` (consecutive ones share a message).

Output, by `tool_choice`:
- "none": the tools are in the prompt (as vLLM renders them), the reply is text.
- "required", or a named function: the reply is constrained (json mode, vsc.runtime.constrain)
  to the call's JSON: `{"name": <a tool's name>, "arguments": <its parameters schema>}`, or an
  array of at least one such call when `parallel_tool_calls` (the default) allows several and the
  choice is not a named function. Every finished reply is a parseable, schema-valid call.
- "auto" (the default with tools): a grammar (`auto_grammar`, llguidance Lark) lets the model choose:
  free text that does not start with `<tool_call>`, or calls, each `<tool_call>\n<call JSON,
  schema-constrained as above>\n</tool_call>` (the fallback's format, and Hermes / Qwen2.5 /
  SmolLM's); one call when `parallel_tool_calls` is false. A reply that starts with `<tool_call>`
  is read as calls (if a block is not JSON naming a given tool, possible only where the grammar did
  not apply, the whole reply is text); any other reply is text, so a stream can send it as it comes
  once its start differs from `<tool_call>`. With a json `response_format` the grammar gives way
  to it (the reply is read the same way).

A reply with calls has `message.tool_calls` (ids `call_...`, arguments as JSON text), `content`
null and finish_reason "tool_calls".
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from vsc.runtime.constrain import JSON_DEFAULTS, LARK_PREFIX

#: OpenAI's rule for a function's name.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: How a call starts under tool_choice auto (the text before it decides: text or calls).
CALL_TAG = "<tool_call>"
_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

NONE, AUTO, REQUIRED, NAMED = "none", "auto", "required", "named"

FALLBACK_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")


class ToolsError(ValueError):
    """A tools field the caller got wrong: (param, one-line message) -> HTTP 400."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolPlan:
    """What a request's tool fields ask for."""

    tools: list[dict]            # the request's tools, as sent (each {"type": "function", "function": {...}})
    choice: str                  # NONE, AUTO, REQUIRED or NAMED
    name: str | None = None      # NAMED: the function
    parallel: bool = True

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def constrained(self) -> bool:
        return self.choice in (REQUIRED, NAMED)

    @property
    def several(self) -> bool:
        """The constrained reply is an array of calls (else one call object)."""
        return self.choice == REQUIRED and self.parallel

    @property
    def parses(self) -> bool:
        """The reply is read for tool calls."""
        return self.choice != NONE


def parse(body: dict) -> ToolPlan | None:
    """The request's tool fields, checked (None: no tools, and no tool_choice asking for them)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and type(parallel) is not bool:
        raise ToolsError("parallel_tool_calls", f"'parallel_tool_calls' must be a boolean, got {parallel!r}")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise ToolsError("tool_choice", "'tool_choice' needs 'tools'")
        if parallel is not None:
            raise ToolsError("parallel_tool_calls", "'parallel_tool_calls' needs 'tools'")
        return None
    if not isinstance(tools, list):
        raise ToolsError("tools", "'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    seen: set[str] = set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ToolsError("tools", f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolsError("tools", f"'{where}.function.name' must be 1 to 64 letters, digits, _ or -, got {name!r}")
        if name in seen:
            raise ToolsError("tools", f"'{where}.function.name': {name!r} is given twice")
        seen.add(name)
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise ToolsError("tools", f"'{where}.function.description' must be a string")
        if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
            raise ToolsError("tools", f"'{where}.function.parameters' must be a JSON Schema object")
    if choice is None or choice in (AUTO, NONE, REQUIRED):
        return ToolPlan(tools, choice or AUTO, None, parallel is not False)
    usage = "'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}"
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(choice.get("function"), dict):
        raise ToolsError("tool_choice", usage)
    name = choice["function"].get("name")
    if name not in seen:
        raise ToolsError("tool_choice", f"'tool_choice' names {name!r}, which is not one of the tools "
                                        f"({', '.join(sorted(seen))})")
    return ToolPlan(tools, NAMED, name, parallel is not False)


# --------------------------------------------------------------------------- the constraint

def call_schema(plan: ToolPlan) -> dict:
    """The JSON Schema of a constrained reply: one call {"name", "arguments"} (an array of at least
    one when several calls are allowed). Each tool's `$defs` / `definitions` move to the top level
    (as `<i>_<name>`), their `$ref`s rewritten, so they resolve where the parameters are nested."""
    defs: dict[str, Any] = {}
    calls = []
    for i, t in enumerate(plan.tools):
        f = t["function"]
        if plan.choice == NAMED and f["name"] != plan.name:
            continue
        params = dict(f.get("parameters") or {"type": "object", "properties": {}})
        moved = {}
        for key in ("$defs", "definitions"):
            for k, v in (params.pop(key, None) or {}).items():
                moved[(key, k)] = f"{i}_{k}"
        params = _rewrite_refs(params, moved)
        for (key, k), new in moved.items():
            defs[new] = _rewrite_refs(f["parameters"][key][k], moved)
        calls.append({"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                      "required": ["name", "arguments"], "additionalProperties": False})
    one: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {"type": "array", "items": one, "minItems": 1} if plan.several else dict(one)
    if defs:
        schema["$defs"] = defs
    return schema


def _rewrite_refs(node: Any, moved: dict[tuple[str, str], str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                for (key, name), new in moved.items():
                    if v == f"#/{key}/{name}":
                        v = f"#/$defs/{new}"
                        break
                else:
                    if v == "#" or v.startswith("#/"):
                        raise ToolsError("tools", f"tool parameters: '$ref': {v!r} is not supported (only refs "
                                                  "to the parameters' own $defs or definitions)")
            out[k] = _rewrite_refs(v, moved)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, moved) for v in node]
    return node


def auto_grammar(plan: ToolPlan) -> str:
    """The Lark grammar of tool_choice auto: text not starting with `<tool_call>`, or one or more
    (one: parallel_tool_calls false) `<tool_call>` blocks of a schema-valid call."""
    # compact JSON as json mode compiles it (a Lark %json is whitespace-flexible by default: a
    # model could then spend max_tokens on spaces inside a call and leave it unfinished)
    one = {**call_schema(ToolPlan(plan.tools, REQUIRED, None, parallel=False)), "x-guidance": dict(JSON_DEFAULTS)}
    calls = "call+" if plan.parallel else "call"
    return (f"{LARK_PREFIX}start: (TEXT | calls)?\ncalls: {calls}\n"
            f"call: \"<tool_call>\\n\" %json {json.dumps(one, ensure_ascii=False)} \"\\n</tool_call>\" \"\\n\"?\n"
            "TEXT: /(.|\\n)+/ & ~/<tool_call>(.|\\n)*/\n")


# --------------------------------------------------------------------------- the prompt

def template_messages(messages: list[dict], plan: ToolPlan | None, native: bool) -> tuple[list[dict], dict]:
    """(messages, extra template variables) for the chat template: `native` (the template renders
    `tools`): the tools as the `tools` variable and tool calls' arguments as objects, as
    transformers' templates expect; else the fallback format rendered into plain text messages."""
    if native:
        out = []
        for m in messages:
            if m.get("tool_calls"):
                m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments":
                                          _arguments_object(c["function"]["arguments"])}}
                                         for c in m["tool_calls"]]}
            out.append(m)
        return out, ({"tools": plan.tools} if plan is not None else {})
    out = []
    for m in messages:
        role = m["role"]
        if role == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_response"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_response": True})
            continue
        text = m.get("content") or ""
        if m.get("tool_calls"):
            calls = [f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': _arguments_object(c['function']['arguments'])}, ensure_ascii=False)}\n</tool_call>"  # noqa: E501
                     for c in m["tool_calls"]]
            text = "\n".join(([text] if text else []) + calls)
        out.append({"role": role, "content": text})
    for m in out:
        m.pop("_tool_response", None)
    if plan is not None:
        block = FALLBACK_INSTRUCTIONS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in plan.tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" + block) if out[0]["content"] else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, {}


def _arguments_object(arguments: Any) -> Any:
    """A call's arguments (OpenAI sends JSON text) as the object templates render."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def check_message_calls(m: dict, i: int) -> list[dict] | None:
    """An assistant message's `tool_calls`, checked (None: none)."""
    calls = m.get("tool_calls")
    if calls is None or calls == []:
        return None
    where = f"messages[{i}].tool_calls"
    if m.get("role") != "assistant":
        raise ToolsError("messages", f"'{where}': only assistant messages carry tool calls")
    if not isinstance(calls, list):
        raise ToolsError("messages", f"'{where}' must be a list")
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or \
                not isinstance(f.get("arguments"), (str, dict)):
            raise ToolsError("messages", f"'{where}[{j}]' must be {{\"id\": ..., \"type\": \"function\", "
                                         "\"function\": {\"name\": ..., \"arguments\": \"...\"}}")
        out.append({"id": c.get("id"), "type": "function",
                    "function": {"name": f["name"], "arguments": f["arguments"]}})
    return out


# --------------------------------------------------------------------------- the reply

def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call(name: str, arguments: Any) -> dict:
    return {"id": new_call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def extract(plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a finished reply's text; no calls: (text, [])."""
    if not plan.parses:
        return text, []
    if plan.constrained:
        try:
            value = json.loads(text)
        except ValueError:
            return text, []
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, dict) and v.get("name") in plan.names and "arguments" in v for v in items):
            return text, []
        return None, [_call(v["name"], v["arguments"]) for v in items]
    if not text.startswith(CALL_TAG):
        return text, []
    calls = []
    for block in _CALL_BLOCK.findall(text):
        try:
            value = json.loads(block)
        except ValueError:
            return text, []
        if not isinstance(value, dict) or value.get("name") not in plan.names:
            return text, []
        arguments = value.get("arguments", value.get("parameters", {}))
        calls.append(_call(value["name"], arguments))
    if not calls:
        return text, []
    if not plan.parallel:
        calls = calls[:1]
    return None, calls
