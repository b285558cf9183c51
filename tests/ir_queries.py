"""IR queries only tests need (kept out of vsc/ir: the compiler has no use for them)."""
from __future__ import annotations

import re

from vsc.ir.module import Region, ServingModule

_PIPELINE_HEADER = re.compile(r"^//\s*pipeline:\s*(.*)$", re.MULTILINE)


def layer_region(module: ServingModule) -> Region | None:
    """The region of the (first) `repeat` op: the decoder layer body."""
    for op in module.model.func.body:
        if op.kind == "repeat" and op.region is not None:
            return op.region
    return None


def read_pipeline_header(text: str) -> str | None:
    """The `// pipeline: ...` header line of an IR dump (vsc.ir.printer.print_module), if present."""
    m = _PIPELINE_HEADER.search(text)
    return m.group(1).strip() if m else None
