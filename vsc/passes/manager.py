"""PassManager: runs a pipeline, verifying after every pass, with instruments around it.

After each pass it checks that the pass (1) did not raise, (2) left its input module
untouched, and (3) produced IR the structural verifier accepts. Any failure writes a
reproducer (the pass's input IR with the one-pass pipeline that breaks it) and raises
PassFailure naming the pass, the problem and the reproducer path.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from vsc.errors import PassFailure, VscError
from vsc.ir.module import ServingModule
from vsc.ir.verifier import verify
from vsc.passes.base import Pass, build_pipeline
from vsc.passes.instruments import Instrument, IRSnapshot
from vsc.passes.pipeline import format_pipeline

# A numeric check: given the module after a pass that may change outputs, return None when
# the outputs still match the reference, else a one-line reason. Provided by the backends.
NumericCheck = Callable[[ServingModule], "str | None"]


#: Where reproducers go when the caller names no folder (`--dump-dir`): one folder per failure
#: under this one, the newest KEEP_REPRODUCERS kept (a test run used to leave dozens of
#: /tmp/vsc-repro-* folders behind).
REPRODUCER_ROOT = Path(tempfile.gettempdir()) / "vsc-reproducers"
KEEP_REPRODUCERS = 20


class PassManager:
    def __init__(self, passes: list[Pass] | str, instruments: list[Instrument] | None = None,
                 verify_each: bool = True, numeric_check: NumericCheck | None = None,
                 reproducer_dir: str | Path | None = None, kernel_costs=None):
        self.passes = build_pipeline(passes) if isinstance(passes, str) else list(passes)
        self.instruments = list(instruments or [])
        self.verify_each = verify_each
        self.numeric_check = numeric_check
        self.reproducer_dir = Path(reproducer_dir) if reproducer_dir else None
        self.kernel_costs = kernel_costs      # measures kernels on the target (the driver supplies one)
        self.skipped: set[int] = set()        # indexes (1-based) of passes an instrument's should_run skipped

    @property
    def pipeline_text(self) -> str:
        """The pipeline that ran (a pass an instrument skipped is not in it)."""
        return format_pipeline([p.spec for i, p in enumerate(self.passes, 1) if i not in self.skipped])

    def run(self, module: ServingModule) -> ServingModule:
        self.skipped = set()
        ir = IRSnapshot(module, "")
        for inst in self.instruments:
            inst.before_pipeline(ir)
        done: list = []
        for index, p in enumerate(self.passes, 1):
            if not all([inst.should_run(p, index) for inst in self.instruments]):
                self.skipped.add(index)
                continue
            so_far = format_pipeline(done + [p.spec])
            for inst in self.instruments:
                inst.before_pass(p, index, ir)
            before = module.clone()           # the mutation check compares against it; no text printed
            start = time.perf_counter()
            p.kernel_costs = self.kernel_costs
            p.statistics = {}
            try:
                out = p.run(module)
            except VscError as e:
                self._fail(p, index, IRSnapshot(before, ir.pipeline), None, str(e))
            except Exception as e:  # a bug in the pass: keep the trace for the reproducer
                self._fail(p, index, IRSnapshot(before, ir.pipeline), None, f"{type(e).__name__}: {e}",
                           traceback.format_exc())
            seconds = time.perf_counter() - start
            if not isinstance(out, ServingModule):
                self._fail(p, index, IRSnapshot(before, ir.pipeline), None,
                           f"run() returned {type(out).__name__}, not a ServingModule")
            if module != before:
                self._fail(p, index, IRSnapshot(before, ir.pipeline), None,
                           "the pass mutated its input module (passes must return a new module)")
            out_ir = IRSnapshot(out, so_far)
            if self.verify_each:
                diags = verify(out)
                if diags:
                    self._fail(p, index, ir, out_ir, "produced invalid IR: " + "; ".join(map(str, diags)))
                if p.may_change_outputs and self.numeric_check is not None:
                    reason = self.numeric_check(out)
                    if reason:
                        self._fail(p, index, ir, out_ir, f"changed the model's outputs: {reason}")
            changed = out != module
            for inst in self.instruments:
                inst.after_pass(p, index, out_ir, changed, seconds)
            done.append(p.spec)
            module, ir = out, out_ir
        for inst in self.instruments:
            inst.after_pipeline(ir)
        return module

    def _fail(self, p: Pass, index: int, input_ir: IRSnapshot, output_ir: IRSnapshot | None, error: str,
              trace: str | None = None) -> None:
        for inst in self.instruments:
            inst.after_failure(p, index, input_ir, output_ir, error)
        repro = self._write_reproducer(p, input_ir.text, error, trace)
        raise PassFailure(str(p.spec), error, str(repro), index)

    def _write_reproducer(self, p: Pass, input_text: str, error: str, trace: str | None) -> Path:
        directory = self.reproducer_dir or _fresh_reproducer_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"reproducer_{p.name}.vsir"
        header = [f"// reproducer: {error.splitlines()[0] if error else ''}",
                  f'// run: vsc opt {path} --passes "{p.spec}"']
        if trace:
            header += ["// " + line for line in trace.rstrip().splitlines()]
        body = "\n".join(line for line in input_text.splitlines() if not line.startswith("// pipeline:"))
        path.write_text("\n".join(header) + "\n" + body + "\n")
        return path


def _fresh_reproducer_dir() -> Path:
    """A new folder under REPRODUCER_ROOT; the oldest beyond KEEP_REPRODUCERS are removed."""
    REPRODUCER_ROOT.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f"repro-{time.time_ns():020d}-", dir=REPRODUCER_ROOT))
    old = sorted(d for d in REPRODUCER_ROOT.iterdir() if d.is_dir() and d.name.startswith("repro-") and d != directory)
    for stale in old[:max(0, len(old) - (KEEP_REPRODUCERS - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return directory
