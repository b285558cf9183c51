"""Start a compiled server folder: read its manifest, import its runner, serve HTTP.

This is all a generated `__main__.py` calls. It uses only the runtime (and the folder's
own generated `model.py`), never the compiler, so a server starts fast and cannot
depend on compiler state.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path

from vsc import __version__
from vsc.errors import VscError
from vsc.runtime.enums import OVERLOAD_POLICIES

log = logging.getLogger("vsc.runtime.launch")


class ServerFolderError(VscError):
    """The server folder is incomplete, or its model folder changed or vanished."""


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        raise ServerFolderError(f"{folder}: error: not a vsc server folder (no manifest.json); build one with `vsc compile`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ServerFolderError(f"{path}: error: manifest is not valid JSON ({e.msg} at line {e.lineno})") from None


def import_runner_module(folder: Path, file: str = "model.py"):
    """Import the folder's generated model.py (or draft_model.py) under a private module name."""
    path = folder / file
    if not path.is_file():
        raise ServerFolderError(f"{folder}: error: the server folder has no {file}; recompile it")
    name = f"vsc_generated_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_server(folder: Path, overload: str | None = None):
    """(app, engine, manifest) for a server folder; the engine is not started yet. `overload`:
    queue | shed in place of the plan's policy (shed needs the plan's TTFT objective)."""
    from vsc.runtime.api import EngineConfig
    from vsc.runtime.engine import LLMEngine
    from vsc.runtime.http import build_app
    from vsc.runtime.metrics import ServerMetrics
    from vsc.runtime.tokenizer import Tokenizer

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("vsc_version") != __version__:
        log.warning("server was compiled by vsc %s, running with vsc %s", manifest.get("vsc_version"), __version__)
    model_dir = Path(manifest["model"]["path"])
    meta_dir = model_dir
    if "meta" in manifest["model"]:           # a GGUF plan: weights in the file, tokenizer in the folder
        meta_dir = folder / manifest["model"]["meta"]["dir"]
        if not model_dir.is_file():
            raise ServerFolderError(f"{model_dir}: error: the server's GGUF model file is missing")
        if not (meta_dir / "tokenizer.json").is_file():
            raise ServerFolderError(f"{meta_dir}: error: the server folder lacks its tokenizer; recompile it")
    elif not (model_dir / "config.json").is_file():
        raise ServerFolderError(f"{model_dir}: error: the server's model folder is missing or incomplete")
    threads = int(manifest.get("target", {}).get("threads") or 0)
    if threads > 0:  # the plan's thread count; 0 leaves torch's default (all cores)
        import torch
        torch.set_num_threads(threads)
    generated = import_runner_module(folder)
    runner = generated.Runner(str(model_dir))
    engine_fields = dict(manifest["engine"])
    if overload is not None:
        if overload not in OVERLOAD_POLICIES:
            raise ServerFolderError(f"--overload: error: unknown overload policy '{overload}' "
                                    f"(one of: {', '.join(OVERLOAD_POLICIES)})")
        if overload == "shed" and not engine_fields.get("ttft_slo_ms"):
            raise ServerFolderError("--overload: error: shed needs a TTFT objective and the plan has none "
                                    "(add e.g. 'ttft p99 <= 200 ms' to the spec's slo block and recompile)")
        engine_fields["overload"] = overload
    config = EngineConfig(**engine_fields)
    draft_runner = None
    if config.speculative_method == "draft":     # speculative decoding with a draft model: its own runner
        draft_dir = Path(config.draft_model or "")
        if not (draft_dir / "config.json").is_file():
            raise ServerFolderError(f"{draft_dir}: error: the server's draft model folder is missing or incomplete")
        draft_runner = import_runner_module(folder, "draft_model.py").Runner(str(draft_dir))
    tokenizer = Tokenizer.from_model_dir(meta_dir)
    engine = LLMEngine(runner, tokenizer, config, manifest["model"]["name"], draft_runner=draft_runner)
    metrics = ServerMetrics()
    app = build_app(engine, tokenizer, metrics, manifest["model"]["name"])
    return app, engine, manifest


def main(folder: Path, argv: list[str]) -> int:
    from vsc.runtime.serve import SignalLatch

    latch = SignalLatch().install()   # first: a SIGTERM/Ctrl-C while the model loads is not lost
    try:
        return _main(folder, argv, latch)
    finally:
        latch.uninstall()


def _main(folder: Path, argv: list[str], latch) -> int:
    from vsc.runtime.serve import run_server

    ap = argparse.ArgumentParser(prog=f"python -m {Path(folder).name}", description="serve a vsc-compiled plan")
    ap.add_argument("--host", help="bind address (default: from the spec, normally 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default: from the spec)")
    ap.add_argument("--log-level", default="warning")
    ap.add_argument("--shutdown-grace", type=float, default=10.0, metavar="SECONDS",
                    help="on SIGTERM/Ctrl-C, how long requests in flight may run on before they are ended "
                         "(streams get finish_reason \"abort\"; default 10)")
    ap.add_argument("--overload", choices=OVERLOAD_POLICIES,
                    help="override the plan's overload policy (default: the spec's serve { overload })")
    args = ap.parse_args(argv)
    if not 0 <= args.shutdown_grace < float("inf"):
        ap.error(f"--shutdown-grace must be a number of seconds >= 0, got {args.shutdown_grace}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app, engine, manifest = build_server(Path(folder), overload=args.overload)
    except VscError as e:
        print(e.render(), file=sys.stderr)
        return e.exit_code
    host = args.host or manifest["serve"]["host"]
    port = args.port if args.port is not None else manifest["serve"]["port"]
    engine.start()
    if latch.received:
        print(f"vsc server stopped by signal {latch.received[0]} before serving", file=sys.stderr, flush=True)
        engine.shutdown()
        return 0
    print(f"vsc server for {manifest['model']['name']} on http://{host}:{port}/v1 "
          f"(pipeline: {manifest['pipeline'] or 'none'})", file=sys.stderr, flush=True)
    try:
        run_server(app, host=host, port=port, log_level=args.log_level, graceful_timeout=args.shutdown_grace,
                   latch=latch, on_signal=lambda: app.state.vsc.begin_shutdown(args.shutdown_grace))
    finally:
        engine.shutdown()
    return 0
