"""Pass pipelines as text: `fuse-qkv,paged-kv{block=16},continuous-batching{max_batch=32}`.

`parse_pipeline` and `format_pipeline` are exact inverses on canonical text (no spaces,
options in the order written), so a pipeline string can head every IR dump and be
pasted back into `vsc opt --passes`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from vsc.errors import PipelineError

# What `optimize auto` runs until `vsc search` chooses per deployment: the exact rewrites
# every plan benefits from (prefix-cache costs a lookup per admission when nothing is shared).
# select-kernels gives a cpu plan TVM's paged attention (reads the cache in place), which beats
# cascade-attention's torch path even behind a shared prefix (SmolLM2, 16 sequences, 768-token
# prefix: decode step 103 -> 80 ms, bench/RESULTS.md), so cascade-attention is no longer here.
# silu-mul and add-rmsnorm fused: one pass over a prompt's activations instead of three (SmolLM2
# code-edit, 16 concurrent: 4-7% less wall time, bench/RESULTS.md).
DEFAULT_PIPELINE = ("fuse-qkv,fuse-gate-up,fold-rope-tables,paged-kv{block=16},continuous-batching{max_batch=16,max_tokens=2048},"
                    "prefix-cache{policy=radix},pack-linear-weights,intra-op-threads,fuse-silu-mul,fuse-add-rmsnorm,"
                    "select-kernels")

#: What `optimize auto` adds for a workload kind (the spec's `workload { kind = ... }`), after
#: prefix-cache: the mechanisms that pay only when requests are like that. predicted_edit:
#: requests carry their expected answer (OpenAI `prediction`), drafted from in runs of up to 16.
WORKLOAD_PASSES = {"predicted_edit": "speculative{method=prediction,k=16}"}
#: A shared prefix at least this long (`workload { shared_prefix { tokens = N } }`) gets cascade
#: attention: SmolLM2 fp32, 16 sequences behind 4096 shared tokens, decode step 131-137 -> 93-100 ms
#: (bench/RESULTS.md); behind 768 tokens it measured within noise, so shorter prefixes go without.
CASCADE_PREFIX_TOKENS = 2048


def auto_pipeline(deployment: dict) -> str:
    """The pipeline `optimize auto` means for a deployment: DEFAULT_PIPELINE, plus what its
    workload pays for (WORKLOAD_PASSES by kind; cascade-attention behind a long shared prefix)."""
    workload = (deployment or {}).get("workload") or {}
    extra = [WORKLOAD_PASSES[workload["kind"]]] if workload.get("kind") in WORKLOAD_PASSES else []
    if int((workload.get("shared_prefix") or {}).get("tokens") or 0) >= CASCADE_PREFIX_TOKENS:
        extra.insert(0, "cascade-attention")
    if not extra:
        return DEFAULT_PIPELINE
    anchor = "prefix-cache{policy=radix}"
    return DEFAULT_PIPELINE.replace(anchor, ",".join([anchor, *extra]), 1)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_BARE_VALUE = re.compile(r"[A-Za-z0-9_.+\-/]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass
class PassSpec:
    """One pipeline element: a pass name and the options written for it (as text values)."""

    name: str
    options: dict[str, str] = field(default_factory=dict)
    column: int = 1

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={_format_value(v)}" for k, v in self.options.items()) + "}"


def _format_value(v: str) -> str:
    if _BARE_VALUE.fullmatch(v):
        return v
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_pipeline(specs: list[PassSpec]) -> str:
    return ",".join(str(s) for s in specs)


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse pipeline text; errors carry the 1-based column of the problem."""
    specs: list[PassSpec] = []
    pos, n = 0, len(text)

    def skip_ws():
        nonlocal pos
        while pos < n and text[pos].isspace():
            pos += 1

    def fail(msg: str, at: int):
        raise PipelineError(msg, text, at + 1)

    skip_ws()
    if pos == n:
        return specs
    while True:
        skip_ws()
        m = _NAME.match(text, pos)
        if not m:
            fail(f"expected a pass name, found {text[pos]!r}" if pos < n else "expected a pass name after ','", pos)
        spec = PassSpec(m.group(0), {}, pos + 1)
        pos = m.end()
        skip_ws()
        if pos < n and text[pos] == "{":
            pos += 1
            while True:
                skip_ws()
                km = _NAME.match(text, pos)
                if not km:
                    fail("expected an option name", pos)
                key = km.group(0)
                if key in spec.options:
                    fail(f"option '{key}' given twice for {spec.name}", pos)
                pos = km.end()
                skip_ws()
                if pos >= n or text[pos] != "=":
                    fail(f"expected '=' after option '{key}'", pos)
                pos += 1
                skip_ws()
                qm = _QUOTED.match(text, pos)
                vm = _BARE_VALUE.match(text, pos)
                if qm:
                    value = re.sub(r"\\(.)", r"\1", qm.group(1))
                    pos = qm.end()
                elif vm:
                    value = vm.group(0)
                    pos = vm.end()
                else:
                    fail(f"expected a value for option '{key}'", pos)
                spec.options[key] = value
                skip_ws()
                if pos < n and text[pos] == ",":
                    pos += 1
                    continue
                if pos < n and text[pos] == "}":
                    pos += 1
                    break
                fail(f"expected ',' or '}}' in the options of {spec.name}", pos)
        specs.append(spec)
        skip_ws()
        if pos == n:
            return specs
        if text[pos] != ",":
            fail(f"expected ',' between passes, found {text[pos]!r}", pos)
        pos += 1
