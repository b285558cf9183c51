"""`vsc` command line: parse, opt, verify, passes, models.

User errors (VscError) print one line (plus a source excerpt where there is one) to
stderr and exit non-zero; a traceback means a bug in vsc.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vsc import __version__
from vsc.errors import VscError
from vsc.runtime.enums import OVERLOAD_POLICIES


def load_input(path: str):
    """A ServingModule from a deployment spec (.vs) or textual IR (.vsir): vsc.driver.load_input."""
    from vsc.driver import load_input as load

    return load(path)


def spec_pipeline(module) -> str:
    """The pipeline the spec's `optimize` line asks for: vsc.driver.spec_pipeline."""
    from vsc.driver import spec_pipeline as pipeline

    return pipeline(module)


def _at_optimize_line(err, input_path: str, pipeline: str):
    """A pass of the spec's own pipeline failed: point the error at the spec's `optimize` line
    (the caret under the pass, or under `auto`)."""
    from vsc.errors import SourceLocation
    from vsc.frontend.parser import parse_spec_file
    from vsc.passes.pipeline import parse_pipeline

    path = Path(input_path)
    optimize = parse_spec_file(path).optimize
    loc = optimize.loc
    if loc is None:
        return err
    column = loc.column
    if not optimize.auto:
        specs = parse_pipeline(pipeline)
        index = err.index            # a check after the passes names the pass only: its first occurrence
        if index is None:
            index = next((i for i, s in enumerate(specs, 1) if s.name == err.pass_name), None)
        if index is not None and 1 <= index <= len(specs):
            column = loc.column + specs[index - 1].column      # past the opening quote
    return err.locate(SourceLocation(loc.file, loc.line, column), path.read_text())


def _run_pipeline(args, pipeline: str, run):
    """run(), with a failing pass of the spec's own pipeline pointed at the spec's optimize line."""
    from vsc.errors import PassFailure

    try:
        return run()
    except PassFailure as e:
        if args.passes is None and Path(args.input).suffix == ".vs":
            raise _at_optimize_line(e, args.input, pipeline) from None
        raise


def _load_passes(args) -> None:
    from vsc.passes.base import load_builtin_passes, load_pass_file

    load_builtin_passes()
    for f in getattr(args, "load_pass", None) or []:
        load_pass_file(f)


def cmd_parse(args) -> int:
    from vsc.ir.printer import print_module

    module = load_input(args.spec)
    sys.stdout.write(print_module(module))
    return 0


def _pass_instruments(args, manager_passes) -> tuple[list, object | None]:
    """The instruments `--disable-pass` and `--pass-statistics` ask for (opt and compile share
    them); the statistics instrument is returned too, to print its report after the run."""
    from vsc.passes.instruments import DisablePasses, PassStatistics

    instruments: list = []
    if args.disable_pass:
        disable = DisablePasses(tuple(args.disable_pass))
        disable.check(manager_passes)
        instruments.append(disable)
    stats = PassStatistics() if args.pass_statistics else None
    if stats is not None:
        instruments.append(stats)
    return instruments, stats


def cmd_opt(args) -> int:
    from vsc.ir.printer import print_module
    from vsc.passes.base import build_pipeline
    from vsc.passes.instruments import DumpIR, PassTiming, PrintIR
    from vsc.passes.manager import PassManager

    _load_passes(args)
    module = load_input(args.input)
    pipeline = args.passes
    if pipeline is None:
        pipeline = spec_pipeline(module)
    passes = build_pipeline(pipeline)
    printer = PrintIR(before=args.print_ir_before_all, after=args.print_ir_after_all,
                      after_change=args.print_ir_after_change, after_failure_=args.print_ir_after_failure)
    timing = PassTiming()
    extra, stats = _pass_instruments(args, passes)
    instruments = [*extra, printer, timing]
    if args.dump_dir:
        instruments.append(DumpIR(Path(args.dump_dir)))
    manager = PassManager(passes, instruments, verify_each=not args.no_verify,
                          reproducer_dir=args.dump_dir)
    result = _run_pipeline(args, pipeline, lambda: manager.run(module))
    text = print_module(result, pipeline=manager.pipeline_text)
    if args.output:
        Path(args.output).write_text(text)
    elif not args.quiet:          # the --print-ir-* flags add to stderr; the final IR always goes here
        sys.stdout.write(text)
    if args.time_passes:
        print(timing.report(), file=sys.stderr)
    if stats is not None:
        print(stats.report(), file=sys.stderr)
    return 0


def cmd_compile(args) -> int:
    from vsc.driver import compile_to_server
    from vsc.passes.base import build_pipeline
    from vsc.passes.instruments import DumpIR, PrintIR

    from vsc.progress import Activity, PassProgress

    _load_passes(args)
    with Activity(f"compiling {args.input}") as activity:       # a spinner on stderr, on a terminal only
        activity.update("reading the spec and the model")
        module = load_input(args.input)
        pipeline = args.passes if args.passes is not None else spec_pipeline(module)
        passes = build_pipeline(pipeline)
        extra, stats = _pass_instruments(args, passes)
        instruments = [*extra, PrintIR(after_change=args.print_ir_after_change), PassProgress(activity, len(passes))]
        if args.dump_dir:
            instruments.append(DumpIR(Path(args.dump_dir)))
        spec_path = Path(args.input).resolve() if Path(args.input).suffix == ".vs" else None
        result = _run_pipeline(args, pipeline, lambda: compile_to_server(
            module, pipeline, Path(args.output), spec_path, instruments, args.dump_dir, progress=activity.update))
    print(f"wrote {result.out_dir}/ (pipeline: {result.pipeline or 'none'})")
    print(f"accuracy: {result.accuracy_summary}")
    print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items()))
    if stats is not None:
        print(stats.report(), file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from vsc.runtime.launch import main as launch

    extra = []
    if args.host:
        extra += ["--host", args.host]
    if args.port is not None:
        extra += ["--port", str(args.port)]
    if args.no_integrity_check:
        extra += ["--no-integrity-check"]
    for flag, value in (("--shutdown-grace", args.shutdown_grace), ("--overload", args.overload)):
        if value is not None:
            extra += [flag, str(value)]
    return launch(Path(args.server), extra + args.options)


def cmd_verify(args) -> int:
    from vsc.ir.verifier import INVARIANTS, RULES, rules_by_group, verify_or_raise
    from vsc.progress import Activity      # a spinner on stderr, on a terminal only

    if args.list:
        for name, rules in rules_by_group().items():
            print(f"{name:<9} {INVARIANTS[name]}")
            for rule in rules:
                print(f"  {rule:<31} {RULES[rule]}")
        return 0
    if not args.input:
        raise VscError("verify: error: give an IR file (.vsir), a spec (.vs) or a server folder, or --list")
    if Path(args.input).is_dir():
        from vsc.driver import verify_server

        with Activity(f"verifying {args.input}") as activity:
            ok, lines = verify_server(Path(args.input), progress=activity.update)
        for line in lines:
            print(line)
        print(f"{args.input}: {'ok' if ok else 'FAILED'}")
        return 0 if ok else 1
    with Activity(f"verifying {args.input}") as activity:
        activity.update("reading the input")
        module = load_input(args.input)
        activity.update(f"checking {len(RULES)} rules")
        verify_or_raise(module)
    print(f"{args.input}: ok ({len(RULES)} rules in {len(INVARIANTS)} groups hold)")
    return 0


def cmd_passes(args) -> int:
    from vsc.passes.base import PASSES

    _load_passes(args)
    for name in sorted(PASSES):
        cls = PASSES[name]
        flags = " [may change outputs]" if cls.may_change_outputs else ""
        req = f" [requires {', '.join(cls.requires)}]" if cls.requires else ""
        print(f"{name}{flags}{req}\n    {cls.summary}")
        for opt in cls.options:
            print(f"    {opt.describe()}")
    return 0


def _add_pass_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disable-pass", action="append", metavar="NAME",
                   help="skip every occurrence of this pass in the pipeline (repeatable)")
    p.add_argument("--pass-statistics", action="store_true",
                   help="print what each pass did (fused 30 qkv, packed 211 weights) to stderr")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vsc", description="compile LLM serving stacks from deployment specs")
    ap.add_argument("--version", action="version", version=f"vsc {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parse", help="print the IR of a deployment spec")
    p.add_argument("spec")
    p.set_defaults(func=cmd_parse)

    p = sub.add_parser("opt", help="run a pass pipeline over a spec or an IR file")
    p.add_argument("input", help="a .vs spec or a .vsir file")
    p.add_argument("--passes", help="pipeline text, e.g. 'fuse-qkv,paged-kv{block=16}' (default: the spec's optimize line)")
    p.add_argument("-o", "--output", help="write the final IR here instead of stdout")
    p.add_argument("--print-ir-before-all", action="store_true")
    p.add_argument("--print-ir-after-all", action="store_true")
    p.add_argument("--print-ir-after-change", action="store_true")
    p.add_argument("--print-ir-after-failure", action="store_true")
    p.add_argument("--dump-dir", help="write 000_input.vsir, 001_<pass>.vsir, ... (and any reproducer) here")
    p.add_argument("--time-passes", action="store_true", help="print each pass's wall time to stderr")
    p.add_argument("--no-verify", action="store_true", help="skip the verifier after each pass (debugging only)")
    p.add_argument("--load-pass", action="append", metavar="FILE", help="load a user pass from a Python file")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the final IR")
    _add_pass_flags(p)
    p.set_defaults(func=cmd_opt)

    p = sub.add_parser("compile", help="optimize, verify and lower a spec to a runnable server folder")
    p.add_argument("input", help="a .vs spec or a .vsir plan")
    p.add_argument("-o", "--output", required=True, help="the server folder to write (replaced atomically)")
    p.add_argument("--passes", help="pipeline text (default: the spec's optimize line)")
    p.add_argument("--print-ir-after-change", action="store_true")
    p.add_argument("--dump-dir", help="numbered IR dumps (and any reproducer) go here")
    p.add_argument("--load-pass", action="append", metavar="FILE")
    _add_pass_flags(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("serve", help="run a compiled server folder")
    p.add_argument("server")
    p.add_argument("--host", help="bind address (default: the spec's, 127.0.0.1)")
    p.add_argument("--port", help="port, 0-65535 (default: the spec's)")
    p.add_argument("--no-integrity-check", action="store_true",
                   help="serve without checking the folder's files against the manifest's hashes (for a folder "
                        "edited on purpose; the log says so)")
    p.add_argument("--shutdown-grace", type=float, metavar="SECONDS",
                   help="on SIGTERM/Ctrl-C, how long requests in flight may run on (default 10)")
    p.add_argument("--overload", choices=OVERLOAD_POLICIES,
                   help="override the plan's overload policy (vsc search measures plans with queue)")
    p.add_argument("options", nargs=argparse.REMAINDER,
                   help="server options after the folder: --api-key, --allowed-hosts, --max-body-size, "
                        "--no-integrity-check, ... (see `vsc serve FOLDER --help`)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("verify", help="verify an IR file or spec (structural), or a server folder (structural + accuracy)")
    p.add_argument("input", nargs="?")
    p.add_argument("--list", action="store_true", help="list the invariants the verifier checks")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("passes", help="list every registered pass and its options")
    p.add_argument("--load-pass", action="append", metavar="FILE")
    p.set_defaults(func=cmd_passes)

    from vsc.models.cli import add_models_commands
    add_models_commands(sub)
    from vsc.bench.cli import add_bench_command
    add_bench_command(sub)
    from vsc.agent.cli import add_search_command
    add_search_command(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VscError as e:
        print(e.render(), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("vsc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
