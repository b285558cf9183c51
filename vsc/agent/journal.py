"""runs/<id>/journal.jsonl: the append-only record of a search, and what --resume reads.

One JSON object per line, written with flush + fsync before the loop moves on, so a
`kill -9` loses at most the line being written (a torn last line is ignored on read).
Events, in order:

    {"event": "start", "spec", "budget", "proposer", "settings", "objectives", "baseline_pipeline", ...}
    {"event": "proposed", "id", "parent", "proposal": {...}}        before a candidate is evaluated
    {"event": "result", "id", "status", "stage", "reason", "ir_hash", "objectives", "runs", ...}
    {"event": "incumbent", "id", "score", "slos_met"}
    {"event": "stop", "reason"}

Resume: every "proposed" without a "result" is evaluated again (it was cut off); the
history, the incumbent, the noise threshold and the budget used come from the results.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vsc.errors import VscError

JOURNAL = "journal.jsonl"


class JournalError(VscError):
    """The run folder has no journal, or its first event is not a search start."""


class Journal:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / JOURNAL

    def append(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, sort_keys=True, default=str)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every complete event. A torn last line (a kill mid-write) is cut off the file, so
        the next append starts on a clean line; a bad line anywhere else is damage."""
        if not self.path.is_file():
            raise JournalError(f"{self.run_dir}: error: no {JOURNAL} here; is this a `vsc search` run folder?")
        data = self.path.read_bytes()
        events = []
        offset = 0
        lines = data.split(b"\n")
        for i, raw in enumerate(lines):
            last = i == len(lines) - 1 or (i == len(lines) - 2 and not lines[-1])
            if raw.strip():
                try:
                    events.append(json.loads(raw))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    if not last:
                        raise JournalError(f"{self.path}:{i + 1}: error: not a JSON line; the journal is damaged") from None
                    with open(self.path, "r+b") as f:       # the torn tail: cut it off
                        f.truncate(offset)
                    break
            offset += len(raw) + 1
        if not events or events[0].get("event") != "start":
            raise JournalError(f"{self.path}: error: the journal does not begin with a search start event")
        return events


def replay(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The search state the journal describes: start event, results by id (in order),
    proposals without a result, the incumbent id, whether it stopped."""
    start = events[0]
    proposed: dict[int, dict[str, Any]] = {}
    results: dict[int, dict[str, Any]] = {}   # references (id >= 1000, "reference": true) included
    incumbent = None
    stopped = None
    for e in events[1:]:
        kind = e.get("event")
        if kind == "proposed":
            proposed[e["id"]] = e
        elif kind == "result":
            results[e["id"]] = e
        elif kind == "incumbent":
            incumbent = e["id"]
        elif kind == "stop":
            stopped = e.get("reason")
    pending = [proposed[i] for i in sorted(proposed) if i not in results]
    return {"start": start, "proposed": proposed, "results": [results[i] for i in sorted(results)],
            "pending": pending, "incumbent": incumbent, "stopped": stopped}
