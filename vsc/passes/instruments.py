"""Instruments hang off the PassManager's hooks: printing, dump files, timing.

Each hook gets the pass (or None for the pipeline input), its 1-based index and the
module text, so instruments never re-print a module the manager already printed.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from vsc.passes.base import Pass


class Instrument:
    def before_pipeline(self, module_text: str) -> None: ...
    def before_pass(self, p: Pass, index: int, module_text: str, pipeline_so_far: str) -> None: ...
    def after_pass(self, p: Pass, index: int, module_text: str, changed: bool, seconds: float, pipeline_so_far: str) -> None: ...
    def after_failure(self, p: Pass, index: int, input_text: str, output_text: str | None, error: str) -> None: ...


@dataclass
class PrintIR(Instrument):
    """`--print-ir-before-all`, `--print-ir-after-all`, `--print-ir-after-change`, `--print-ir-after-failure`."""

    before: bool = False
    after: bool = False
    after_change: bool = False
    after_failure_: bool = False
    stream: TextIO = field(default_factory=lambda: sys.stderr)

    def _emit(self, title: str, text: str) -> None:
        self.stream.write(f"// ----- {title} -----\n{text}")
        self.stream.flush()

    def before_pass(self, p, index, module_text, pipeline_so_far):
        if self.before:
            self._emit(f"IR before {p.spec} (#{index})", module_text)

    def after_pass(self, p, index, module_text, changed, seconds, pipeline_so_far):
        if self.after or (self.after_change and changed):
            self._emit(f"IR after {p.spec} (#{index}){'' if changed else ' (no change)'}", module_text)

    def after_failure(self, p, index, input_text, output_text, error):
        if self.after_failure_:
            self._emit(f"IR after failed {p.spec} (#{index}): {error}", output_text or input_text)


@dataclass
class DumpIR(Instrument):
    """Numbered dump files: `000_input.vsir`, `001_fuse-qkv.vsir`, ... each headed by its pipeline."""

    directory: Path
    written: list[Path] = field(default_factory=list)

    def __post_init__(self):
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, text: str) -> None:
        path = self.directory / name
        path.write_text(text)
        self.written.append(path)

    def before_pipeline(self, module_text):
        self._write("000_input.vsir", module_text)

    def after_pass(self, p, index, module_text, changed, seconds, pipeline_so_far):
        self._write(f"{index:03d}_{p.name}.vsir", module_text)


@dataclass
class PassTiming(Instrument):
    """Wall time of each pass; `report()` is the table `--time-passes` prints."""

    rows: list[tuple[str, float, bool]] = field(default_factory=list)

    def after_pass(self, p, index, module_text, changed, seconds, pipeline_so_far):
        self.rows.append((str(p.spec), seconds, changed))

    def report(self) -> str:
        total = sum(s for _, s, _ in self.rows) or 1e-12
        w = max([len("total")] + [len(name) for name, _, _ in self.rows])
        lines = [f"{'pass':<{w}} {'ms':>9} {'%':>6}  changed"]
        for name, s, changed in self.rows:
            lines.append(f"{name:<{w}} {s * 1e3:9.2f} {100 * s / total:6.1f}  {'yes' if changed else 'no'}")
        lines.append(f"{'total':<{w}} {total * 1e3:9.2f}")
        return "\n".join(lines)
