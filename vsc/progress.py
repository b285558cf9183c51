"""Progress for the long silent steps of `vsc compile`, `vsc verify` and `vsc search`.

An `Activity` is a rich spinner on stderr with the step it is in and the time spent, shown
only where stderr is a terminal (rich's own detection: `FORCE_COLOR`/`TTY_COMPATIBLE` and
friends count), so pipes, logs and tests stay clean. `PassProgress` is the PassManager
instrument that moves it from pass to pass.
"""
from __future__ import annotations

import time
from typing import Any

from vsc.passes.instruments import Instrument


def stderr_console():
    from rich.console import Console
    return Console(stderr=True, highlight=False)


class Activity:
    """`with Activity("compiling") as a: a.update("pass 3/11: paged-kv")`; nothing off a terminal."""

    def __init__(self, what: str, console: Any = None):
        self.console = console if console is not None else stderr_console()
        self.what = what
        self.enabled = bool(self.console.is_terminal)
        self._status = None
        self._started = time.monotonic()
        self._step = ""

    def __rich__(self) -> str:        # the spinner re-renders this each refresh: the clock ticks
        return self._text()

    def _text(self) -> str:
        step = f": {self._step}" if self._step else ""
        return f"{self.what}{step} ({time.monotonic() - self._started:.0f} s)"

    def update(self, step: str) -> None:
        self._step = step

    def print(self, line: str) -> None:
        """A line above the spinner (or just the line, on stderr, off a terminal)."""
        self.console.print(line, markup=False, soft_wrap=True)

    def __enter__(self) -> "Activity":
        self._started = time.monotonic()
        if self.enabled:
            from rich.live import Live
            from rich.spinner import Spinner

            # stderr writes (print-ir, progress lines) go above the spinner; stdout stays the
            # program's output, never routed to stderr
            self._status = Live(Spinner("dots", self), console=self.console, transient=True, refresh_per_second=8,
                                redirect_stdout=False, redirect_stderr=True)
            self._status.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


class PassProgress(Instrument):
    """Shows which pass of how many is running (the accuracy check after a lossy pass included)."""

    def __init__(self, activity: Activity, total: int):
        self.activity, self.total = activity, total

    def before_pass(self, p, index, ir):
        check = " (then the accuracy check)" if p.may_change_outputs else ""
        self.activity.update(f"pass {index}/{self.total} {p.spec}{check}")
