"""Errors a user can cause. Each one knows where it happened and prints as one line.

The CLI catches `VscError`, prints `str(err)` (plus an optional source excerpt) and
exits with `err.exit_code`; anything else escaping is a bug in vsc.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class VscError(Exception):
    """Base class of every user-facing error."""

    exit_code = 2

    def render(self) -> str:
        """What the CLI prints: the one-line message, then any context lines."""
        return str(self)


@dataclass
class SourceLocation:
    """A point in a text file (1-based line and column)."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class LocatedError(VscError):
    """An error at a point in a text the user wrote; renders with a caret under it."""

    def __init__(self, message: str, location: SourceLocation, source_text: str | None = None):
        super().__init__(f"{location}: error: {message}")
        self.message = message
        self.location = location
        self.source_text = source_text

    def render(self) -> str:
        lines = [str(self)]
        if self.source_text is not None:
            text_lines = self.source_text.splitlines()
            if 1 <= self.location.line <= len(text_lines):
                src = text_lines[self.location.line - 1]
                lines.append("    " + src)
                lines.append("    " + " " * max(self.location.column - 1, 0) + "^")
        return "\n".join(lines)


class SpecError(LocatedError):
    """A syntax or semantic error in a deployment spec (`.vs`)."""


class IRParseError(LocatedError):
    """A syntax error in textual IR (`.vsir`)."""


class PipelineError(VscError):
    """A malformed pass pipeline string, an unknown pass or a bad pass option."""

    def __init__(self, message: str, pipeline: str = "", column: int | None = None):
        where = f"pipeline:{column}: " if column is not None else "pipeline: "
        super().__init__(f"{where}error: {message}")
        self.pipeline = pipeline
        self.column = column

    def render(self) -> str:
        lines = [str(self)]
        if self.pipeline and self.column is not None:
            lines.append("    " + self.pipeline)
            lines.append("    " + " " * max(self.column - 1, 0) + "^")
        return "\n".join(lines)


class ModelError(VscError):
    """A model folder that is missing, incomplete or of an unsupported architecture."""

    def __init__(self, path: str | Path, message: str):
        super().__init__(f"{path}: error: {message}")
        self.path = str(path)
        self.message = message


class VerificationError(VscError):
    """The IR broke one or more invariants; carries every diagnostic found."""

    exit_code = 1

    def __init__(self, diagnostics: list):
        self.diagnostics = list(diagnostics)
        first = self.diagnostics[0] if self.diagnostics else "unknown failure"
        more = f" (and {len(self.diagnostics) - 1} more)" if len(self.diagnostics) > 1 else ""
        super().__init__(f"verify: error: {first}{more}")

    def render(self) -> str:
        return "\n".join(f"verify: error: {d}" for d in self.diagnostics)


class PassFailure(VscError):
    """A pass raised, produced invalid IR, or mutated its input."""

    def __init__(self, pass_name: str, message: str, reproducer: str | None = None, index: int | None = None):
        tail = f" (reproducer: {reproducer})" if reproducer else ""
        super().__init__(f"pass {pass_name}: error: {message}{tail}")
        self.pass_name = pass_name
        self.message = message
        self.reproducer = reproducer
        self.index = index                    # 1-based position of the pass in its pipeline
        self.location: SourceLocation | None = None
        self.source_text: str | None = None

    def locate(self, location: SourceLocation, source_text: str | None = None) -> "PassFailure":
        """Point the error at where the pipeline was written (a spec's `optimize` line)."""
        tail = f" (reproducer: {self.reproducer})" if self.reproducer else ""
        self.args = (f"{location}: error: pass {self.pass_name}: {self.message}{tail}",)
        self.location, self.source_text = location, source_text
        return self

    def render(self) -> str:
        if self.location is None:
            return str(self)
        return LocatedError.render(self)
