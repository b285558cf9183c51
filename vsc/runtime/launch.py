"""Start a compiled server folder: read its manifest, import its runner, serve HTTP.

This is all a generated `__main__.py` calls. It uses only the runtime (and the folder's
own generated `model.py`), never the compiler, so a server starts fast and cannot
depend on compiler state.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vsc.errors import VscError
from vsc.runtime.enums import OVERLOAD_POLICIES

log = logging.getLogger("vsc.runtime.launch")


from vsc.runtime.folder import (ServeOptionError, ServerFolderError, _add_guard_args,  # noqa: F401  (re-exported)
                                _guard_from_args, _port, build_server, check_integrity, compile_runner,
                                import_runner_module, load_step, read_manifest)


def _say_replicas(manifest: dict) -> None:
    """A plan of several replicas served without --ray runs one of them: say so, once, on stderr."""
    router = manifest.get("router") or {}
    if isinstance(router, dict) and isinstance(router.get("replicas"), int) and router["replicas"] > 1:
        print(f"vsc serve: this plan has {router['replicas']} replicas routed by {router.get('policy')}; without "
              "--ray this process serves one of them (add --ray to run them all on Ray Serve)",
              file=sys.stderr, flush=True)


# what a folder that cannot be served raises while it starts: each is one line on stderr, not a traceback
STARTUP_ERRORS = (argparse.ArgumentTypeError, KeyError, VscError)


def _startup_failed(folder: Path, e: Exception) -> int:
    """Say why the folder cannot be served, in one line; the exit code."""
    if isinstance(e, argparse.ArgumentTypeError):
        print(f"serve: error: the spec's {e}", file=sys.stderr)
        return 2
    if isinstance(e, KeyError):
        print(f"{Path(folder) / 'manifest.json'}: error: the manifest lacks {e}; recompile the server", file=sys.stderr)
        return 2
    print(e.render(), file=sys.stderr)
    return e.exit_code


def _serve_ray(folder: Path, args, latch) -> int:
    """`--ray`: vsc.runtime.ray_serve (imported only then: Ray is an optional dependency)."""
    from vsc.runtime.ray_serve import serve_folder
    try:
        return serve_folder(Path(folder), args, latch)
    except STARTUP_ERRORS as e:
        return _startup_failed(folder, e)


def main(folder: Path, argv: list[str]) -> int:
    from vsc.runtime.serve import SignalLatch

    latch = SignalLatch().install()   # first: a SIGTERM/Ctrl-C while the model loads is not lost
    try:
        return _main(folder, argv, latch)
    finally:
        latch.uninstall()


def _main(folder: Path, argv: list[str], latch) -> int:
    from vsc.runtime.serve import bind_socket, run_server

    ap = argparse.ArgumentParser(prog=f"python -m {Path(folder).name}", description="serve a vsc-compiled plan")
    ap.add_argument("--host", help="bind address (default: from the spec, normally 127.0.0.1)")
    ap.add_argument("--port", type=_port, help="port, 0-65535 (default: from the spec)")
    ap.add_argument("--log-level", default="warning", type=str.lower,   # (no uvicorn "trace": it logs headers)
                    choices=["critical", "error", "warning", "info", "debug"])
    ap.add_argument("--no-integrity-check", action="store_true",
                    help="serve the folder without checking its files against the manifest's hashes "
                         "(for a folder edited on purpose; the log says so)")
    ap.add_argument("--shutdown-grace", type=float, default=10.0, metavar="SECONDS",
                    help="on SIGTERM/Ctrl-C, how long requests in flight may run on before they are ended "
                         "(streams get finish_reason \"abort\"; default 10)")
    ap.add_argument("--overload", choices=OVERLOAD_POLICIES,
                    help="override the plan's overload policy (default: the spec's serve { overload })")
    _add_guard_args(ap)
    ap.add_argument("--ray", action="store_true",
                    help="serve the plan's replicas on Ray Serve behind a router (vsc.runtime.ray_serve)")
    ap.add_argument("--ray-address", metavar="ADDR", help="with --ray: the Ray cluster to join (default: "
                    "$RAY_ADDRESS, else a local one is started)")
    ap.add_argument("--replica-cpus", type=float, metavar="N",
                    help="with --ray: CPUs Ray reserves per replica (default: the plan's threads)")
    args = ap.parse_args(argv)
    if not args.ray and (args.ray_address or args.replica_cpus is not None):
        ap.error("--ray-address and --replica-cpus go with --ray")
    if args.replica_cpus is not None and not 0 < args.replica_cpus < float("inf"):
        ap.error(f"--replica-cpus must be a positive number, got {args.replica_cpus}")
    if not 0 <= args.shutdown_grace < float("inf"):
        ap.error(f"--shutdown-grace must be a number of seconds >= 0, got {args.shutdown_grace}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.ray:
        return _serve_ray(folder, args, latch)
    try:
        plan = read_manifest(Path(folder))
        _say_replicas(plan)
        serve = plan["serve"]
        host = args.host or serve["host"]
        port = args.port if args.port is not None else _port(str(serve["port"]))
        security, limits = _guard_from_args(args, host)
        app, engine, manifest = build_server(Path(folder), security, integrity_check=not args.no_integrity_check,
                                             overload=args.overload)
        try:
            sock = bind_socket(host, port)
        except OSError as e:
            raise ServeOptionError(f"serve: error: cannot listen on {host}:{port}: {e.strerror or e}") from None
    except STARTUP_ERRORS as e:
        return _startup_failed(folder, e)
    engine.start()
    if latch.received:
        print(f"vsc server stopped by signal {latch.received[0]} before serving", file=sys.stderr, flush=True)
        sock.close()
        engine.shutdown()
        return 0
    bound = sock.getsockname()[1]
    auth = "API key required" if args.api_key else "no API key"
    print(f"vsc server for {manifest['model']['name']} on http://{host}:{bound}/v1 "
          f"(pipeline: {manifest['pipeline'] or 'none'}; {auth})", file=sys.stderr, flush=True)
    try:
        run_server(app, host=host, port=bound, log_level=args.log_level, sock=sock, limits=limits,
                   graceful_timeout=args.shutdown_grace, latch=latch,
                   on_signal=lambda: app.state.vsc.begin_shutdown(args.shutdown_grace))
    finally:
        engine.shutdown()
    return 0
