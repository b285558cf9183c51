"""The compile driver: spec → IR → verified passes → lowered runner → accuracy check → server folder.

This is the only module that strings the stages together; each stage stays ignorant of
the others. `vsc compile` and `vsc verify server/` are thin wrappers around it.

CUDA targets: the runner runs on "cuda" and calls the Triton kernels the plan selected, so
its accuracy can only be checked on a machine with a CUDA device. Without one, the check
(after the passes that may change outputs, and after lowering) is not run and not faked:
the manifest records it as skipped (`"ok": null, "skipped": true`), `vsc compile` says so,
and `vsc verify server/` on the GPU host runs it. The structural verifier still runs
after every pass, and the generated source is still compiled (to bytecode) as a syntax
check. The server folder then also holds the kernels' sm_NN PTX and cubins.
"""
from __future__ import annotations

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


def load_input(path: str):
    """A ServingModule from a deployment spec (.vs) or textual IR (.vsir)."""
    p = Path(path)
    if p.suffix == ".vsir":
        return parse_module_file(p)
    if p.suffix == ".vs":
        from vsc.frontend.lower import lower_spec
        from vsc.frontend.parser import parse_spec_file

        spec = parse_spec_file(p)
        return lower_spec(spec, p.read_text())
    raise VscError(f"{path}: error: expected a deployment spec (.vs) or an IR file (.vsir)")


def spec_pipeline(module) -> str:
    """The pipeline the spec's `optimize` line asks for (`auto`: the default pipeline and what the
    workload kind pays for, vsc.passes.auto.auto_pipeline)."""
    from vsc.passes.auto import auto_pipeline

    optimize = module.deployment.get("optimize") or {}
    if optimize.get("auto"):
        return auto_pipeline(module.deployment)
    return optimize.get("pipeline") or ""


ACCURACY_SKIPPED = "skipped: no CUDA device on the compiling machine; run `vsc verify server/` on the GPU host"


@dataclass
class SkippedAccuracy:
    """Stands in for an AccuracyReport when the check cannot run here: `ok` is None, not True."""

    reason: str = "no CUDA device on the compiling machine"
    ok: None = None

    def summary(self) -> str:
        return ACCURACY_SKIPPED

    def to_json(self) -> dict:
        return {"ok": None, "skipped": True, "summary": self.summary(), "reason": self.reason}


def runner_device(module: ServingModule) -> str:
    """Where the plan's runner runs: "cuda" for cuda targets, else "cpu"."""
    return "cuda" if module.target.kind == "cuda" else "cpu"


def can_run_here(module: ServingModule) -> bool:
    """Whether this machine can run the plan's runner (a cuda plan needs a CUDA device)."""
    if module.target.kind != "cuda":
        return True
    import torch
    return torch.cuda.is_available()


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
    """Generate the runner for `module`, instantiate it and run the accuracy check.

    Returns (source, report); the report is a SkippedAccuracy (ok None) for a cuda plan on
    a machine without a CUDA device, where the source is only compiled to bytecode.
    """
    from vsc.backends.torch.codegen import generate_runner_source, load_runner_class

    settings = settings or accuracy_settings(module)
    source = generate_runner_source(module)
    if not can_run_here(module):
        compile(source, f"<vsc-generated vsc_runner_{module.name}>", "exec")
        return source, SkippedAccuracy()
    from vsc.backends.torch.accuracy import check_accuracy

    runner_cls = load_runner_class(source, f"vsc_runner_{module.name}")
    runner = runner_cls(module.model.attrs["path"], device=runner_device(module))
    from vsc.backends.torch.draft import attach_draft_runner
    attach_draft_runner(module, runner)           # speculative{method=draft}: the engine run drafts with it
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
        """PassManager hook: None when the lowered module still meets the accuracy bar, or
        when the check cannot run here (recorded as skipped, not as passed)."""
        _, report = lower_and_check(module)
        self.pending_accuracy = report
        return None if report.ok is not False else report.summary()

    def after_pass(self, p, index, ir, changed, seconds):
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
                      instruments: list[Instrument] | None = None, reproducer_dir: Path | None = None,
                      progress=None) -> CompileResult:
    """`progress(step)`, where given, hears each step after the passes (vsc.progress.Activity.update)."""
    from vsc.backends.server.emit import Verification, build_manifest, write_server

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    recorder = _RecordVerifications()
    verify_or_raise(module)
    from vsc.backends.kernel_costs import MeasuredKernelCosts
    manager = PassManager(pipeline, [*(instruments or []), recorder], numeric_check=recorder.numeric_check,
                          reproducer_dir=reproducer_dir, kernel_costs=MeasuredKernelCosts())
    final = manager.run(module)
    times["passes"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    if progress is not None:
        progress("lowering the plan and checking its accuracy")
    source, report = lower_and_check(final)
    times["lower+accuracy" if report.ok is not None else "lower"] = time.perf_counter() - t1
    if report.ok is False:
        raise CompileError(f"compile: error: accuracy check failed, no server written: {report.summary()}")

    verifications = [Verification("structural", "input", True, "all invariants hold"), *recorder.entries,
                     Verification("accuracy", "lowering", report.ok, report.summary(), report.to_json())]
    plan_text = print_module(final, pipeline=manager.pipeline_text)
    model_path = Path(final.model.attrs["path"])
    served_name = model_path.stem if model_path.suffix == ".gguf" else model_path.name
    manifest = build_manifest(final, manager.pipeline_text, spec_path, plan_text, source, verifications, served_name)
    if progress is not None:
        progress("writing the server folder")
    write_server(out_dir, final, manager.pipeline_text, source, manifest, seconds=times)
    times["total"] = time.perf_counter() - t0
    return CompileResult(Path(out_dir), final, manager.pipeline_text, report.summary(), times)


def verify_server(server_dir: Path, progress=None) -> tuple[bool, list[str]]:
    """Re-check a built server, in an order that runs nothing unproven:

    1. integrity: the digest of every file in the folder, of every model file it loads and of
       the manifest's own settings match what `vsc compile` recorded; nothing is imported or
       loaded before this holds (a missing file is an error, exit 2; a changed one fails);
    2. structural: plan.vsir parses and every invariant holds;
    3. runner: model.py (and draft_model.py) is, byte for byte, the source the compiler
       generates from plan.vsir now (the compiler is deterministic, so the code that runs is
       the plan's code and nothing else);
    4. accuracy: the runner, on the manifest's model, still meets the plan's accuracy bar.

    `progress(step)`, where given, hears each step as it starts (vsc.progress.Activity.update).
    """
    progress = progress or (lambda step: None)
    from vsc.backends.torch.accuracy import check_accuracy
    from vsc.backends.torch.codegen import generate_runner_source
    from vsc.backends.torch.draft import DRAFT_RUNNER_FILE, attach_draft_runner, draft_runner_source
    from vsc.runtime import integrity
    from vsc.runtime.launch import compile_runner, import_runner_module, load_step, read_manifest

    server_dir = Path(server_dir)
    progress("integrity: hashing the folder's and the model's files")
    manifest = read_manifest(server_dir)
    problems = integrity.check(server_dir, manifest)
    missing = [p for p in problems if p.what == "missing"]
    if missing:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise integrity.IntegrityError(f"{missing[0].path}: error: missing: the manifest records its digest; "
                                       f"cannot verify the server{more}")
    if problems:
        return False, [f"integrity: {p}" for p in problems]
    files = manifest["integrity"]["files"]
    lines = [f"integrity: ok ({len(files)} files, {len(manifest['integrity']['model_files'])} model files and the "
             f"manifest's settings match their {manifest['integrity']['algorithm']} digests)"]
    progress("structural: parsing and verifying plan.vsir")
    module = parse_module_file(server_dir / "plan.vsir")
    diags = verify(module)
    lines.append(f"structural: {'ok' if not diags else '; '.join(map(str, diags))}")
    if diags:
        return False, lines
    progress("runner: regenerating model.py from plan.vsir")
    regenerated = {"model.py": generate_runner_source(module)}
    draft_source = draft_runner_source(module)
    if draft_source is not None or DRAFT_RUNNER_FILE in files:
        regenerated[DRAFT_RUNNER_FILE] = draft_source or ""
    for name in regenerated:                 # a damaged runner is an error (exit 2), before any comparison
        if (server_dir / name).is_file():
            compile_runner(server_dir / name, (server_dir / name).read_bytes())
    differ = [name for name, source in regenerated.items()
              if not (server_dir / name).is_file() or (server_dir / name).read_bytes() != source.encode()]
    if differ:
        from vsc import __version__
        built_by = manifest.get("vsc_version")
        why = f" (compiled by vsc {built_by}, this is vsc {__version__})" if built_by != __version__ else ""
        lines.append(f"runner: {', '.join(differ)} is not the source vsc generates from plan.vsir{why}")
        return False, lines
    lines.append(f"runner: {', '.join(regenerated)} regenerated from plan.vsir, byte for byte the same")
    if not can_run_here(module):
        # Not run is not passed: the folder is verified only once the check has run on a GPU host.
        lines.append("accuracy: not run: the plan targets cuda and this machine has no CUDA device; "
                     "run `vsc verify` on the GPU host")
        return False, lines
    model_dir = Path(manifest["model"]["path"])
    progress("accuracy: loading the model and running the probes")
    settings = accuracy_settings(module)
    generated = import_runner_module(server_dir, digest=files["model.py"])
    runner = load_step("the model", model_dir, generated.Runner, str(model_dir), device=runner_device(module))
    draft_file = server_dir / DRAFT_RUNNER_FILE
    load_step("the draft model", draft_file, attach_draft_runner, module, runner,
              draft_file.read_text() if draft_file.is_file() else None)
    report = load_step("the accuracy check's inputs (tokenizer, reference model)", model_dir, check_accuracy,
                       module, runner, probes=settings.probes, tolerance=settings.tolerance)
    lines.append(f"accuracy: {report.summary()}")
    return report.ok, lines
