"""The `Pass` base class, declared options, and the registry of passes by name.

A pass is a class in its own file with a `name`, typed `options`, the passes it
`requires` earlier in the pipeline, and whether it `may_change_outputs` (such passes
get the numeric check, not only the structural one). `run` must return a new module
and leave its input alone; the default `run` clones the module and calls `apply`.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from vsc.errors import PipelineError, VscError
from vsc.ir.module import ServingModule
from vsc.passes.pipeline import PassSpec, parse_pipeline


@dataclass(frozen=True)
class Option:
    """A declared pass option: `block: int = 16 — tokens per KV block`."""

    name: str
    type: type
    default: Any
    doc: str
    choices: tuple | None = None
    minimum: float | None = None

    def convert(self, text: str, pass_name: str) -> Any:
        try:
            if self.type is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value = text.lower() in ("true", "1")
            else:
                value = self.type(text)
        except ValueError:
            raise PipelineError(f"option '{self.name}' of {pass_name} must be {self.type.__name__}, got '{text}'") from None
        if self.choices is not None and value not in self.choices:
            raise PipelineError(f"option '{self.name}' of {pass_name} must be one of {', '.join(map(str, self.choices))}, got '{text}'")
        if self.minimum is not None and value < self.minimum:
            raise PipelineError(f"option '{self.name}' of {pass_name} must be >= {self.minimum}, got {value}")
        return value

    def describe(self) -> str:
        extra = f" (one of {', '.join(map(str, self.choices))})" if self.choices else ""
        return f"{self.name}: {self.type.__name__} = {self.default} — {self.doc}{extra}"


class Pass:
    """Base class of every rewrite. Subclasses set the class attributes and `apply`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    may_change_outputs: ClassVar[bool] = False
    # Set by the PassManager: measures candidate kernels on the target, (module, op, kernel
    # names) -> {name: microseconds}, or None where nothing measures (passes fall back to rules).
    kernel_costs: Any = None

    def __init__(self, **values: Any):
        self.statistics: dict[tuple[str, str], int] = {}
        known = {o.name: o for o in self.options}
        for key in values:
            if key not in known:
                raise PipelineError(f"unknown option '{key}' for pass {self.name} "
                                    f"(options: {', '.join(known) or 'none'})")
        self.values = {o.name: values.get(o.name, o.default) for o in self.options}
        self.given = dict(values)

    def __getattr__(self, item: str) -> Any:
        values = self.__dict__.get("values", {})
        if item in values:
            return values[item]
        raise AttributeError(item)

    @property
    def spec(self) -> PassSpec:
        """The pipeline text of this pass as the user wrote it (only the options given)."""
        return PassSpec(self.name, {k: _text(v) for k, v in self.given.items()})

    def stat(self, verb: str, count: int = 1, what: str = "") -> None:
        """Count something this run did, for `--pass-statistics`: `self.stat("fused", 1, "qkv")`
        once per fusion prints `fused 30 qkv`. The PassManager clears the counters before each run."""
        key = (verb, what)
        self.statistics[key] = self.statistics.get(key, 0) + int(count)

    def run(self, module: ServingModule) -> ServingModule:
        out = module.clone()
        self.apply(out)
        return out

    def apply(self, module: ServingModule) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


PASSES: dict[str, type[Pass]] = {}
_recording: list[str] | None = None  # names registered while a user pass file executes


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its `name` in pipelines."""
    if not cls.name:
        raise VscError(f"pass class {cls.__name__} has no name")
    PASSES[cls.name] = cls
    if _recording is not None:
        _recording.append(cls.name)
    return cls


_BUILTINS_LOADED = False


def load_builtin_passes() -> None:
    """Import every module of vsc.passes so that their @register_pass runs."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    import vsc.passes as pkg
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("base", "pipeline", "manager", "instruments"):
            importlib.import_module(f"vsc.passes.{info.name}")
    _BUILTINS_LOADED = True


def load_pass_file(path: str | Path) -> list[str]:
    """Load a user's pass module (`--load-pass my_pass.py`); returns the pass names it registered."""
    global _recording
    p = Path(path)
    if not p.is_file():
        raise VscError(f"{path}: error: pass file does not exist")
    mod_name = f"vsc_user_pass_{p.stem}_{abs(hash(str(p.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, p)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    _recording = []
    try:
        spec.loader.exec_module(module)
        added = sorted(_recording)
    except VscError:
        raise
    except Exception as e:  # the user's code failed to import: say where, in one line
        raise VscError(f"{path}: error: loading the pass failed: {type(e).__name__}: {e}") from None
    finally:
        _recording = None
    if not added:
        raise VscError(f"{path}: error: the file registered no pass (decorate a Pass subclass with @register_pass)")
    return added


def build_pipeline(text: str) -> list[Pass]:
    """Pass instances for pipeline text, with options converted and requirements checked."""
    load_builtin_passes()
    passes: list[Pass] = []
    for spec in parse_pipeline(text):
        cls = PASSES.get(spec.name)
        if cls is None:
            import difflib
            close = difflib.get_close_matches(spec.name, PASSES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise PipelineError(f"unknown pass '{spec.name}'{hint}", text, spec.column)
        known = {o.name: o for o in cls.options}
        values = {}
        for key, raw in spec.options.items():
            if key not in known:
                raise PipelineError(f"unknown option '{key}' for pass {spec.name} (options: {', '.join(known) or 'none'})",
                                    text, spec.column)
            try:
                values[key] = known[key].convert(raw, spec.name)
            except PipelineError as e:
                raise PipelineError(str(e).split("error: ", 1)[-1], text, spec.column) from None
        earlier = {p.name for p in passes}
        for req in cls.requires:
            if req not in earlier:
                raise PipelineError(f"pass {spec.name} requires {req} earlier in the pipeline", text, spec.column)
        passes.append(cls(**values))
    return passes
