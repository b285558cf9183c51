"""PassManager: runs a pipeline, verifying after every pass, with instruments around it.

After each pass it checks that the pass (1) did not raise, (2) left its input module
untouched, and (3) produced IR the structural verifier accepts. Any failure writes a
reproducer (the pass's input IR with the one-pass pipeline that breaks it) and raises
PassFailure naming the pass, the problem and the reproducer path.
"""
from __future__ import annotations

import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from vsc.errors import PassFailure, VscError
from vsc.ir.module import ServingModule
from vsc.ir.printer import print_module
from vsc.ir.verifier import verify
from vsc.passes.base import Pass, build_pipeline
from vsc.passes.instruments import Instrument
from vsc.passes.pipeline import format_pipeline

# A numeric check: given the module after a pass that may change outputs, return None when
# the outputs still match the reference, else a one-line reason. Provided by the backends.
NumericCheck = Callable[[ServingModule], "str | None"]


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

    @property
    def pipeline_text(self) -> str:
        return format_pipeline([p.spec for p in self.passes])

    def run(self, module: ServingModule) -> ServingModule:
        text = print_module(module, pipeline="")
        for inst in self.instruments:
            inst.before_pipeline(text)
        done: list = []
        for index, p in enumerate(self.passes, 1):
            so_far = format_pipeline(done + [p.spec])
            for inst in self.instruments:
                inst.before_pass(p, index, text, format_pipeline(done))
            start = time.perf_counter()
            p.kernel_costs = self.kernel_costs
            try:
                out = p.run(module)
            except VscError as e:
                self._fail(p, index, text, None, str(e))
            except Exception as e:  # a bug in the pass: keep the trace for the reproducer
                self._fail(p, index, text, None, f"{type(e).__name__}: {e}", traceback.format_exc())
            seconds = time.perf_counter() - start
            if not isinstance(out, ServingModule):
                self._fail(p, index, text, None, f"run() returned {type(out).__name__}, not a ServingModule")
            if print_module(module, pipeline=format_pipeline(done)) != text:
                self._fail(p, index, text, None, "the pass mutated its input module (passes must return a new module)")
            out_text = print_module(out, pipeline=so_far)
            if self.verify_each:
                diags = verify(out)
                if diags:
                    self._fail(p, index, text, out_text, "produced invalid IR: " + "; ".join(map(str, diags)))
                if p.may_change_outputs and self.numeric_check is not None:
                    reason = self.numeric_check(out)
                    if reason:
                        self._fail(p, index, text, out_text, f"changed the model's outputs: {reason}")
            changed = _body(out_text) != _body(text)
            for inst in self.instruments:
                inst.after_pass(p, index, out_text, changed, seconds, so_far)
            done.append(p.spec)
            module, text = out, out_text
        return module

    def _fail(self, p: Pass, index: int, input_text: str, output_text: str | None, error: str,
              trace: str | None = None) -> None:
        for inst in self.instruments:
            inst.after_failure(p, index, input_text, output_text, error)
        repro = self._write_reproducer(p, input_text, error, trace)
        raise PassFailure(str(p.spec), error, str(repro))

    def _write_reproducer(self, p: Pass, input_text: str, error: str, trace: str | None) -> Path:
        directory = self.reproducer_dir or Path(tempfile.mkdtemp(prefix="vsc-repro-"))
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"reproducer_{p.name}.vsir"
        header = [f"// reproducer: {error.splitlines()[0] if error else ''}",
                  f'// run: vsc opt {path} --passes "{p.spec}"']
        if trace:
            header += ["// " + line for line in trace.rstrip().splitlines()]
        body = "\n".join(line for line in input_text.splitlines() if not line.startswith("// pipeline:"))
        path.write_text("\n".join(header) + "\n" + body + "\n")
        return path


def _body(text: str) -> str:
    """Module text without header comments, for change detection."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("//"))
