"""The pass catalog as data: what a proposer may put in a pipeline, with each pass's docs.

The doc is the pass module's docstring (why it pays, what it changes, its options), the
same text `vsc passes` summarizes; a proposer (human or model) reads it to choose.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from vsc.passes.base import PASSES, load_builtin_passes


def pass_catalog() -> list[dict[str, Any]]:
    """One dict per registered pass, sorted by name (builtins and any loaded plugins)."""
    load_builtin_passes()
    out = []
    for name in sorted(PASSES):
        cls = PASSES[name]
        module = sys.modules.get(cls.__module__)
        out.append({
            "name": name,
            "summary": cls.summary,
            "doc": ((module.__doc__ if module is not None else None) or cls.__doc__ or "").strip(),
            "options": [{"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.doc,
                         **({"choices": list(o.choices)} if o.choices else {}),
                         **({"minimum": o.minimum} if o.minimum is not None else {})} for o in cls.options],
            "requires": list(cls.requires),
            "may_change_outputs": bool(cls.may_change_outputs),
            **({"note": NOTES[name]()} if name in NOTES else {}),
        })
    return out


def machine_cores() -> int:
    """Cores this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _replicate_note() -> str:
    return (f"a search measures replicas on this machine (`vsc serve --ray`): it has {machine_cores()} cores and "
            "each replica takes the target's threads (all cores when threads = 0), so n <= cores // threads; "
            "it pays when a throughput SLO is beyond what one replica measures")


#: What a proposer should know about a pass here, beyond its doc (computed per catalog).
NOTES = {"replicate": _replicate_note}

