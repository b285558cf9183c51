"""Instruments hang off the PassManager's hooks: printing, dump files, timing, statistics,
and `should_run` (which lets an instrument skip a pass, as `--disable-pass` does).

Each hook gets the pass (or nothing, around the whole pipeline), its 1-based index and an
`IRSnapshot` of the module: the module itself, the pipeline that produced it, and its text,
printed only when an instrument asks for it (once, however many instruments ask).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TextIO

from vsc.errors import VscError
from vsc.ir.module import ServingModule
from vsc.ir.printer import print_module
from vsc.passes.base import Pass


@dataclass(eq=False)
class IRSnapshot:
    """The module at one point of the pipeline; `text` is printed on first use."""

    module: ServingModule
    pipeline: str = ""

    @cached_property
    def text(self) -> str:
        return print_module(self.module, pipeline=self.pipeline)


class Instrument:
    """Hooks around a pipeline run (MLIR's PassInstrumentation, TVM's PassInstrument)."""

    def before_pipeline(self, ir: IRSnapshot) -> None: ...
    def should_run(self, p: Pass, index: int) -> bool:
        return True
    def before_pass(self, p: Pass, index: int, ir: IRSnapshot) -> None: ...
    def after_pass(self, p: Pass, index: int, ir: IRSnapshot, changed: bool, seconds: float) -> None: ...
    def after_failure(self, p: Pass, index: int, input_ir: IRSnapshot, output_ir: IRSnapshot | None,
                      error: str) -> None: ...
    def after_pipeline(self, ir: IRSnapshot) -> None: ...


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

    def before_pass(self, p, index, ir):
        if self.before:
            self._emit(f"IR before {p.spec} (#{index})", ir.text)

    def after_pass(self, p, index, ir, changed, seconds):
        if self.after or (self.after_change and changed):
            self._emit(f"IR after {p.spec} (#{index}){'' if changed else ' (no change)'}", ir.text)

    def after_failure(self, p, index, input_ir, output_ir, error):
        if self.after_failure_:
            self._emit(f"IR after failed {p.spec} (#{index}): {error}", (output_ir or input_ir).text)


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

    def before_pipeline(self, ir):
        self._write("000_input.vsir", ir.text)

    def after_pass(self, p, index, ir, changed, seconds):
        self._write(f"{index:03d}_{p.name}.vsir", ir.text)


@dataclass
class PassTiming(Instrument):
    """Wall time of each pass; `report()` is the table `--time-passes` prints."""

    rows: list[tuple[str, float, bool]] = field(default_factory=list)

    def after_pass(self, p, index, ir, changed, seconds):
        self.rows.append((str(p.spec), seconds, changed))

    def report(self) -> str:
        total = sum(s for _, s, _ in self.rows) or 1e-12
        w = max([len("total")] + [len(name) for name, _, _ in self.rows])
        lines = [f"{'pass':<{w}} {'ms':>9} {'%':>6}  changed"]
        for name, s, changed in self.rows:
            lines.append(f"{name:<{w}} {s * 1e3:9.2f} {100 * s / total:6.1f}  {'yes' if changed else 'no'}")
        lines.append(f"{'total':<{w}} {total * 1e3:9.2f}")
        return "\n".join(lines)


@dataclass
class PassStatistics(Instrument):
    """What each pass reported with `Pass.stat` (`fused 30 qkv`); `report()` is what
    `--pass-statistics` prints: one block per pass that ran, in pipeline order."""

    rows: list[tuple[str, dict[tuple[str, str], int]]] = field(default_factory=list)

    def after_pass(self, p, index, ir, changed, seconds):
        self.rows.append((str(p.spec), dict(p.statistics)))

    def report(self) -> str:
        lines = ["pass statistics:"]
        for name, stats in self.rows:
            lines.append(f"  {name}")
            if not stats:
                lines.append("    (nothing counted)")
            width = max([len(str(n)) for n in stats.values()] or [1])
            for (verb, what), count in stats.items():
                lines.append(f"    {verb} {count:>{width}} {what}".rstrip())
        return "\n".join(lines)


@dataclass
class DisablePasses(Instrument):
    """`--disable-pass NAME`: `should_run` says no for each named pass (every occurrence).

    `check(pipeline)` refuses, in one line, a name that no registered pass has, a pass the
    pipeline does not run, and a pass a later pass of the pipeline requires."""

    names: tuple[str, ...] = ()
    skipped: list[str] = field(default_factory=list)

    def check(self, passes: list[Pass]) -> None:
        from vsc.passes.base import PASSES

        ran = [p.name for p in passes]
        for name in self.names:
            if name not in PASSES:
                import difflib
                close = difflib.get_close_matches(name, PASSES, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else " (`vsc passes` lists them)"
                raise VscError(f"--disable-pass {name}: error: no pass is named '{name}'{hint}")
            if name not in ran:
                raise VscError(f"--disable-pass {name}: error: the pipeline does not run {name} "
                                    f"(it runs {', '.join(ran) or 'no pass'})")
        for p in passes:
            if p.name in self.names:
                continue
            needed = [r for r in p.requires if r in self.names]
            if needed:
                raise VscError(f"--disable-pass {needed[0]}: error: {p.name} requires it earlier in the pipeline")

    def should_run(self, p, index):
        if p.name in self.names:
            self.skipped.append(f"{p.spec} (#{index})")
            return False
        return True
