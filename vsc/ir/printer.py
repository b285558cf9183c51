"""Print a ServingModule as text (`.vsir`); `vsc.ir.parser` reads it back to an equal module."""
from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from typing import Any

from vsc.ir.module import Op, Region, ServingModule, Weight

IR_VERSION = 1
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INDENT = "  "


def format_attr_value(v: Any) -> str:
    """An attribute value in IR syntax; round-trips exactly through the parser."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"attribute value {v} is not finite")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_attr_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return format_attrs(v, empty="{}")
    raise TypeError(f"cannot print attribute value of type {type(v).__name__}: {v!r}")


def format_attrs(attrs: dict, empty: str = "") -> str:
    if not attrs:
        return empty
    items = []
    for k, v in attrs.items():
        key = k if _IDENT.match(k) else json.dumps(k)
        items.append(f"{key} = {format_attr_value(v)}")
    return "{" + ", ".join(items) + "}"


def _dataclass_attrs(obj) -> dict:
    """The fields of a policy dataclass (all but origin) as an attribute dict."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if f.name != "origin"}


def format_op(op: Op, indent: str) -> list[str]:
    head = ""
    if op.results:
        head = ", ".join(op.results) + " = "
    text = f"{indent}{head}{op.kind}({', '.join(op.operands)})"
    if op.attrs:
        text += " " + format_attrs(op.attrs)
    if op.types:
        text += " : " + ", ".join(str(t) for t in op.types)
    if op.kernel is not None:
        text += f" via {op.kernel.name}"
        if op.kernel.config:
            text += format_attrs(op.kernel.config)
    text += f" {op.origin}"
    if op.region is None:
        return [text]
    return [text + " {", *format_region(op.region, indent + _INDENT), indent + "}"]


def format_region(region: Region, indent: str) -> list[str]:
    args = ", ".join(f"{name}: {t}" for name, t in region.args)
    lines = [f"{indent}^({args}):"]
    for op in region.ops:
        lines.extend(format_op(op, indent))
    lines.append(f"{indent}yield {', '.join(region.yields)}")
    return lines


def format_weight(w: Weight, indent: str) -> str:
    args = ", ".join(a if a.startswith("@") else json.dumps(a) for a in w.init_args)
    text = f"{indent}weight {w.name} : {w.type} = {w.init_fn}({args})"
    if w.init_attrs:
        text += " " + format_attrs(w.init_attrs)
    return f"{text} {w.origin}"


def print_module(module: ServingModule, pipeline: str | None = None) -> str:
    """The module as `.vsir` text. `pipeline`, when given, is recorded in a header comment."""
    out = [f"// vsc-ir {IR_VERSION}"]
    if pipeline is not None:
        out.append(f"// pipeline: {pipeline}")
    out.append(f"module @{module.name} {module.origin} {{")
    i1, i2, i3 = _INDENT, _INDENT * 2, _INDENT * 3
    out.append(f"{i1}deployment {format_attrs(module.deployment, empty='{}')}")
    t = module.target
    out.append(f"{i1}target {t.kind} {format_attrs(t.attrs, empty='{}')} {t.origin}")

    m = module.model
    out.append(f"{i1}model @{m.name} {format_attrs(m.attrs, empty='{}')} {m.origin} {{")
    for w in m.weights:
        out.append(format_weight(w, i2))
    f = m.func
    params = ", ".join(f"{name}: {t}" for name, t in f.params)
    out.append(f"{i2}func @{f.name}[{', '.join(f.symbols)}]({params}) {{")
    for op in f.body:
        out.extend(format_op(op, i3))
    out.append(f"{i3}return {', '.join(f.returns)}")
    out.append(f"{i2}}}")
    out.append(f"{i1}}}")

    for keyword, section in (("schedule", module.schedule), ("cache", module.cache), ("batching", module.batching)):
        attrs = section.attrs if keyword == "schedule" else _dataclass_attrs(section)
        out.append(f"{i1}{keyword} {format_attrs(attrs, empty='{}')} {section.origin}")

    out.append(f"{i1}requests {{")
    for stage in module.requests.stages():
        out.append(f"{i2}stage {stage.name} {format_attrs(stage.attrs, empty='{}')} {stage.origin}")
    for src, dst in module.requests.edges():
        out.append(f"{i2}{src} -> {dst}")
    out.append(f"{i1}}}")
    out.append("}")
    return "\n".join(out) + "\n"
