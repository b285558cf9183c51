"""`vsc search`: the command line of the agent loop.

    vsc search SPEC [--budget 24] [-o server/] [--proposer builtin|anthropic] [--runs runs/]
    vsc search --resume runs/<id>/ [-o server/]
    vsc search report runs/<id>/ [--png trajectory.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vsc.errors import VscError


def make_proposer(name: str, model: str | None = None):
    if name == "builtin":
        from vsc.agent.proposers.builtin import BuiltinProposer
        return BuiltinProposer()
    if name == "anthropic":
        from vsc.agent.proposers.anthropic import AnthropicProposer
        return AnthropicProposer(**({"model": model} if model else {}))
    raise VscError(f"unknown proposer {name!r} (use builtin or anthropic)")


def cmd_search(args) -> int:
    from vsc.progress import Activity

    if args.target == "report":
        return cmd_report(args)
    # progress lines on stderr; on a terminal, a spinner under them says what runs between them
    with Activity("vsc search") as activity:
        outcome = _search(args, activity)
    if isinstance(outcome, int):
        return outcome
    from vsc.agent.report import format_report, load, plot_report
    state, run_dir = outcome
    data = load(run_dir)
    print(format_report(data))
    png = plot_report(data, run_dir / "trajectory.png")
    print(f"wrote {png}")
    return 0 if state.incumbent is not None else 1


def _search(args, activity):
    """The search itself: (its final state, the run folder), or an exit code when interrupted."""
    from vsc.agent.evaluate import BenchSettings
    from vsc.agent.loop import Budget, Search, new_run_dir

    report = activity.print
    if args.resume:
        from vsc.agent.journal import Journal

        run_dir = Path(args.resume)
        if not (run_dir / "journal.jsonl").is_file():
            raise VscError(f"{run_dir}: error: no journal.jsonl here; nothing to resume")
        start = Journal(run_dir).read()[0]          # the proposer the search was started with
        search = Search(run_dir, make_proposer(start.get("proposer", "builtin"), args.model), report=report,
                        progress=activity.update)
    else:
        if not args.target:
            raise VscError("vsc search: error: give a spec (vsc search deploy.vs) or --resume runs/<id>/")
        spec = Path(args.target)
        if not spec.is_file():
            raise VscError(f"{spec}: error: spec file not found")
        proposer = make_proposer(args.proposer, args.model)     # fails fast (no API key) before any work
        run_dir = new_run_dir(Path(args.runs), spec)
        report(f"run folder {run_dir}")
        try:
            search = Search(run_dir, proposer, spec_path=spec,
                            budget=Budget(args.budget, args.wall_time, args.max_api_tokens, args.patience),
                            settings=BenchSettings(requests=args.requests, repeats=args.repeats, seed=args.seed),
                            report=report, references=_references(args.reference or []), progress=activity.update)
        except KeyboardInterrupt:
            return _interrupted(run_dir)
    try:
        state = search.run(Path(args.output) if args.output else None)
    except KeyboardInterrupt:
        return _interrupted(run_dir)
    return state, search.run_dir


def _interrupted(run_dir: Path) -> int:
    """Ctrl-C: the journal holds every finished candidate (the one cut off runs again)."""
    if (run_dir / "journal.jsonl").is_file():
        print(f"vsc search: interrupted; continue with: vsc search --resume {run_dir}", file=sys.stderr)
    else:
        print(f"vsc search: interrupted before the search started ({run_dir} holds nothing to resume)",
              file=sys.stderr)
    return 130


def _references(items: list[str]) -> list[str]:
    """--reference values: a pipeline, or a spec file whose optimize line is taken."""
    out = []
    for item in items:
        if item.endswith(".vs"):
            from vsc.driver import load_input, spec_pipeline
            out.append(spec_pipeline(load_input(item)))
        else:
            out.append(item)
    return out


def cmd_report(args) -> int:
    from vsc.agent.report import format_report, load, plot_report

    if not args.rest:
        raise VscError("vsc search report: error: give the run folder (vsc search report runs/<id>/)")
    run_dir = Path(args.rest)
    data = load(run_dir)
    print(format_report(data))
    png = plot_report(data, Path(args.png) if args.png else run_dir / "trajectory.png")
    print(f"wrote {png}", file=sys.stderr)
    return 0


def add_search_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("search", help="search for the fastest verified plan for a spec (agent loop)",
                              description="Propose pipelines (and new passes), verify each, benchmark the verified "
                                          "ones on the spec's workload, keep the best. `vsc search report RUN` "
                                          "prints a finished or running search.")
    p.add_argument("target", nargs="?", help="the spec (.vs), or `report`")
    p.add_argument("rest", nargs="?", help="with `report`: the run folder")
    p.add_argument("--budget", type=int, default=24, help="candidates to evaluate, the baseline included (default 24)")
    p.add_argument("--proposer", choices=["builtin", "anthropic"], default="builtin")
    p.add_argument("--model", help="with --proposer anthropic: the Claude model id")
    p.add_argument("-o", "--output", help="copy the best plan's server folder here")
    p.add_argument("--runs", default="runs", help="where run folders go (default runs/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the search in this run folder")
    p.add_argument("--wall-time", type=float, help="stop after this many seconds")
    p.add_argument("--max-api-tokens", type=int, help="stop after the proposer used this many API tokens")
    p.add_argument("--patience", type=int, help="stop after this many candidates without improvement")
    p.add_argument("--requests", type=int,
                   help="requests per measured run (default: 4 x the closed-loop concurrency, at least 16)")
    p.add_argument("--repeats", type=int, default=2, help="measured runs per candidate (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", help="with `report`: where to write the trajectory plot")
    p.add_argument("--reference", action="append", metavar="PIPELINE_OR_SPEC",
                   help="also measure this pipeline (or this spec's optimize line) for comparison; not a candidate")
    p.set_defaults(func=cmd_search)
    return p
