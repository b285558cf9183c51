"""The compile driver: spec → IR → verified passes → lowered runner → accuracy check → server folder.

This is the only module that strings the stages together; each stage stays ignorant of
the others. `vsc compile` and `vsc verify server/` are thin wrappers around it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from vsc.errors import VscError
from vsc.ir.module import ServingModule
from vsc.ir.parser import parse_module_file
from vsc.ir.printer import print_module
from vsc.ir.verifier import verify, verify_or_raise
from vsc.passes.instruments import Instrument
from vsc.passes.manager import PassManager


class CompileError(VscError):
    """The plan cannot be turned into a server that meets its accuracy bar."""


@dataclass
class AccuracySettings:
    probes: int
    tolerance: float | None
    kind: str


def accuracy_settings(module: ServingModule) -> AccuracySettings:
    acc = module.deployment.get("accuracy") or {}
    return AccuracySettings(probes=int(acc.get("probes") or 8), tolerance=acc.get("tolerance"),
                            kind=acc.get("kind") or "greedy_exact")


def lower_and_check(module: ServingModule, settings: AccuracySettings | None = None):
    """Generate the runner for `module`, instantiate it and run the accuracy check."""
    from vsc.backends.torch.accuracy import check_accuracy
    from vsc.backends.torch.codegen import generate_runner_source, load_runner_class

    settings = settings or accuracy_settings(module)
    source = generate_runner_source(module)
    runner_cls = load_runner_class(source, f"vsc_runner_{module.name}")
    runner = runner_cls(module.model.attrs["path"])
    report = check_accuracy(module, runner, probes=settings.probes, tolerance=settings.tolerance)
    return source, report


class _RecordVerifications(Instrument):
    """Collects manifest entries: each pass the structural verifier accepted, and the
    accuracy check run after each pass that may change outputs."""

    def __init__(self):
        from vsc.backends.server.emit import Verification
        self._cls = Verification
        self.entries: list = []
        self.pending_accuracy = None

    def numeric_check(self, module: ServingModule) -> str | None:
        """PassManager hook: None when the lowered module still meets the accuracy bar."""
        _, report = lower_and_check(module)
        self.pending_accuracy = report
        return None if report.ok else report.summary()

    def after_pass(self, p, index, module_text, changed, seconds, pipeline_so_far):
        self.entries.append(self._cls("structural", str(p.spec), True, "all invariants hold",
                                      {"changed": changed, "seconds": round(seconds, 6)}))
        if self.pending_accuracy is not None:
            report, self.pending_accuracy = self.pending_accuracy, None
            self.entries.append(self._cls("accuracy", str(p.spec), report.ok, report.summary(), report.to_json()))


@dataclass
class CompileResult:
    out_dir: Path
    module: ServingModule
    pipeline: str
    accuracy_summary: str
    seconds: dict[str, float] = field(default_factory=dict)


def compile_to_server(module: ServingModule, pipeline: str, out_dir: Path, spec_path: Path | None,
                      instruments: list[Instrument] | None = None, reproducer_dir: Path | None = None) -> CompileResult:
    from vsc.backends.server.emit import Verification, build_manifest, write_server

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    recorder = _RecordVerifications()
    verify_or_raise(module)
    manager = PassManager(pipeline, [*(instruments or []), recorder], numeric_check=recorder.numeric_check,
                          reproducer_dir=reproducer_dir)
    final = manager.run(module)
    times["passes"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    source, report = lower_and_check(final)
    times["lower+accuracy"] = time.perf_counter() - t1
    if not report.ok:
        raise CompileError(f"compile: error: accuracy check failed, no server written: {report.summary()}")

    verifications = [Verification("structural", "input", True, "all invariants hold"), *recorder.entries,
                     Verification("accuracy", "lowering", True, report.summary(), report.to_json())]
    plan_text = print_module(final, pipeline=manager.pipeline_text)
    served_name = Path(final.model.attrs["path"]).name
    manifest = build_manifest(final, manager.pipeline_text, spec_path, plan_text, source, verifications, served_name)
    write_server(out_dir, final, manager.pipeline_text, source, manifest)
    times["total"] = time.perf_counter() - t0
    return CompileResult(Path(out_dir), final, manager.pipeline_text, report.summary(), times)


def verify_server(server_dir: Path) -> tuple[bool, list[str]]:
    """Re-check a built server: files present, weights unchanged, plan valid, accuracy still met."""
    from vsc.backends.server.emit import model_file_checksums
    from vsc.backends.torch.accuracy import check_accuracy
    from vsc.backends.torch.codegen import load_runner_class

    server_dir = Path(server_dir)
    manifest_path = server_dir / "manifest.json"
    if not manifest_path.is_file():
        raise VscError(f"{server_dir}: error: not a vsc server folder (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise VscError(f"{manifest_path}: error: manifest is not valid JSON ({e.msg})") from None
    lines: list[str] = []
    ok = True
    module = parse_module_file(server_dir / "plan.vsir")
    diags = verify(module)
    lines.append(f"structural: {'ok' if not diags else '; '.join(map(str, diags))}")
    ok &= not diags
    model_dir = Path(manifest["model"]["path"])
    if not model_dir.is_dir():
        raise VscError(f"{model_dir}: error: the server's model folder is gone")
    now = model_file_checksums(model_dir)
    changed = sorted(k for k in manifest["model"]["files"] if now.get(k) != manifest["model"]["files"][k])
    lines.append("weights: " + ("unchanged" if not changed else f"changed since compile: {', '.join(changed)}"))
    ok &= not changed
    runner_cls = load_runner_class((server_dir / "model.py").read_text(), f"vsc_server_{server_dir.name}")
    settings = accuracy_settings(module)
    report = check_accuracy(module, runner_cls(str(model_dir)), probes=settings.probes, tolerance=settings.tolerance)
    lines.append(f"accuracy: {report.summary()}")
    ok &= report.ok
    return ok, lines
