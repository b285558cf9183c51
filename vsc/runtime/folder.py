"""A compiled server folder, assembled: read its manifest, check its digests, import its runner,
build the app and engine (vsc.runtime.launch starts it; vsc.runtime.ray_serve builds one per
replica). Runtime only, never the compiler."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

from vsc import __version__
from vsc.errors import VscError
from vsc.runtime import integrity
from vsc.runtime.enums import OVERLOAD_POLICIES

log = logging.getLogger("vsc.runtime.launch")


class ServerFolderError(VscError):
    """The server folder is incomplete, or its model folder changed or vanished."""


class ServeOptionError(VscError):
    """A serve option is out of range, or the server cannot listen where it was asked to."""


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        raise ServerFolderError(f"{folder}: error: not a vsc server folder (no manifest.json); build one with `vsc compile`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ServerFolderError(f"{path}: error: manifest is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(manifest, dict):
        raise ServerFolderError(f"{path}: error: manifest is not a JSON object; recompile the server")
    return manifest


def import_runner_module(folder: Path, file: str = "model.py", digest: str | None = None):
    """Import the folder's generated model.py (or draft_model.py) under a private module name.

    The source is read once and compiled from those bytes (never from a bytecode cache);
    `digest` (the manifest's integrity digest), when given, must be theirs, so what runs is
    what was checked."""
    path = folder / file
    if not path.is_file():
        raise ServerFolderError(f"{folder}: error: the server folder has no {file}; recompile it")
    source = path.read_bytes()
    if digest is not None and integrity.digest_bytes(source) != digest:
        raise integrity.IntegrityError(f"{path}: error: changed since compile (its digest differs from the "
                                       "manifest's); refusing to run it")
    code = compile_runner(path, source)
    name = f"vsc_generated_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except Exception as e:  # noqa: BLE001 - whatever a damaged runner raises at import is a damaged folder
        sys.modules.pop(name, None)
        raise ServerFolderError(f"{path}: error: the generated runner fails at import: {_one_line(e)}") from None
    return module


def compile_runner(path: Path, source: bytes):
    """The code object of a generated runner's source (nothing runs); a syntax error is one line."""
    try:
        return compile(source, str(path), "exec")
    except (SyntaxError, ValueError) as e:
        where = f"{path}:{e.lineno}" if getattr(e, "lineno", None) else str(path)
        raise ServerFolderError(f"{where}: error: the generated runner does not compile "
                                f"({getattr(e, 'msg', None) or e}); recompile the server") from None


def _one_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def load_step(what: str, where, fn, *args, **kw):
    """fn(*args, **kw); any failure but a VscError becomes one ServerFolderError line naming `what`."""
    try:
        return fn(*args, **kw)
    except VscError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, TVM, json... each raise their own; all mean a bad file
        raise ServerFolderError(f"{where}: error: cannot load {what}: {_one_line(e)}") from None


def check_integrity(folder: Path, manifest: dict, enabled: bool = True) -> None:
    """Refuse a folder (or model file) changed since compile, before anything is imported or
    loaded; with `enabled` False, say in the log that nothing is checked."""
    if not enabled:
        log.warning("--no-integrity-check: serving %s without checking its files against the manifest's hashes",
                    folder)
        return
    start = time.perf_counter()
    integrity.check_or_raise(folder, manifest)
    log.info("integrity: every file of %s and of its model matches the manifest (%.2f s)",
             folder, time.perf_counter() - start)


def build_server(folder: Path, security=None, integrity_check: bool = True, overload: str | None = None):
    """(app, engine, manifest) for a server folder; the engine is not started yet.
    `security`: a vsc.runtime.guard.Security, or a function of max_context returning one. `overload`:
    queue | shed in place of the plan's policy (shed needs the plan's TTFT objective).

    First the folder's files, the manifest and the model files are checked against the
    manifest's hashes (`integrity_check` False skips that: --no-integrity-check); any file
    that then fails to load is one ServerFolderError line naming it."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_integrity(folder, manifest, integrity_check)
    try:
        return _build(folder, manifest, integrity_check, security, overload)
    except KeyError as e:
        raise ServerFolderError(f"{folder / 'manifest.json'}: error: the manifest lacks {e}; recompile the server") \
            from None


def _build(folder: Path, manifest: dict, integrity_check: bool, security, overload: str | None):
    from vsc.runtime.api import EngineConfig
    from vsc.runtime.constrain import SchemaError
    from vsc.runtime.engine import LLMEngine
    from vsc.runtime.http import build_app
    from vsc.runtime.metrics import ServerMetrics
    from vsc.runtime.tokenizer import Tokenizer

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
    import torch
    if manifest.get("target", {}).get("kind") == "cuda" and not torch.cuda.is_available():
        raise ServerFolderError(f"{folder}: error: the plan targets cuda ({manifest['target'].get('arch')}) and this "
                                "machine has no CUDA device; serve it on the GPU host")
    threads = int(manifest.get("target", {}).get("threads") or 0)
    if threads > 0:  # the plan's thread count; 0 leaves torch's default (all cores)
        torch.set_num_threads(threads)
    files = ((manifest.get("integrity") or {}).get("files") or {}) if integrity_check else {}
    generated = import_runner_module(folder, digest=files.get("model.py"))
    engine_fields = dict(manifest["engine"])
    if overload is not None:
        if overload not in OVERLOAD_POLICIES:
            raise ServerFolderError(f"--overload: error: unknown overload policy '{overload}' "
                                    f"(one of: {', '.join(OVERLOAD_POLICIES)})")
        if overload == "shed" and not engine_fields.get("ttft_slo_ms"):
            raise ServerFolderError("--overload: error: shed needs a TTFT objective and the plan has none "
                                    "(add e.g. 'ttft p99 <= 200 ms' to the spec's slo block and recompile)")
        engine_fields["overload"] = overload
    config = load_step("the engine settings", folder / "manifest.json", EngineConfig, **engine_fields)
    runner_context = getattr(generated, "MAX_CONTEXT", None)
    if isinstance(runner_context, int) and config.max_context > runner_context:
        raise ServerFolderError(f"{folder / 'manifest.json'}: error: engine max_context {config.max_context} exceeds "
                                f"the {runner_context} tokens the runner was compiled for; recompile the server")
    runner = load_step("the model", model_dir, generated.Runner, str(model_dir))
    draft_runner = None
    if config.speculative_method == "draft":     # speculative decoding with a draft model: its own runner
        draft_dir = Path(config.draft_model or "")
        if not (draft_dir / "config.json").is_file():
            raise ServerFolderError(f"{draft_dir}: error: the server's draft model folder is missing or incomplete")
        draft = import_runner_module(folder, "draft_model.py", digest=files.get("draft_model.py"))
        draft_runner = load_step("the draft model", draft_dir, draft.Runner, str(draft_dir))
    tokenizer = load_step("the tokenizer", meta_dir, Tokenizer.from_model_dir, meta_dir)
    try:
        engine = LLMEngine(runner, tokenizer, config, manifest["model"]["name"], draft_runner=draft_runner)
    except SchemaError as e:      # the deployment's json-mode schema, compiled for the tokenizer at start
        raise ServerFolderError(f"{folder}: error: the deployment's json-mode schema: {e}") from None
    metrics = ServerMetrics()
    if callable(security):
        security = security(int(engine.max_context))
    app = build_app(engine, tokenizer, metrics, manifest["model"]["name"], security)
    return app, engine, manifest


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not between 0 and 65535")
    return port


def _add_guard_args(ap: argparse.ArgumentParser) -> None:
    """Authentication, exposure and connection limits (vsc.runtime.guard, vsc.runtime.conn)."""
    from vsc.runtime.conn import ConnLimits
    d = ConnLimits()
    ap.add_argument("--api-key", default=os.environ.get("VSC_API_KEY") or None,
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $VSC_API_KEY; none: open)")
    ap.add_argument("--protect-metrics", action="store_true", help="require the API key on /metrics too")
    ap.add_argument("--allowed-hosts", metavar="NAMES",
                    help="comma-separated names the Host header may carry, or * for any (default: loopback "
                         "names when bound to loopback, else any)")
    ap.add_argument("--max-body-size", metavar="SIZE",
                    help="largest request body, e.g. 4MiB (default: 64 bytes per token of context, at least 1MiB)")
    ap.add_argument("--max-connections", type=int, default=d.max_connections,
                    help=f"open connections; more are answered 503 (default {d.max_connections})")
    ap.add_argument("--read-timeout", type=float, default=d.read_timeout,
                    help=f"seconds for a request head, or a pause in a body (default {d.read_timeout:g})")
    ap.add_argument("--keep-alive", type=float, default=d.keep_alive,
                    help=f"seconds an idle connection is kept between requests (default {d.keep_alive:g})")


def _guard_from_args(args, host: str):
    """(security(max_context), ConnLimits) from the parsed options; ServeOptionError on a bad one."""
    from vsc.runtime.conn import ConnLimits
    from vsc.runtime.guard import Security, default_allowed_hosts, default_max_body, parse_allowed_hosts, parse_size
    try:
        limits = ConnLimits(read_timeout=args.read_timeout, keep_alive=args.keep_alive,
                            max_connections=args.max_connections)
        hosts = default_allowed_hosts(host) if args.allowed_hosts is None else parse_allowed_hosts(args.allowed_hosts)
        max_body = None if args.max_body_size is None else parse_size(args.max_body_size)
        if args.api_key is not None and not args.api_key.strip():
            raise ValueError("--api-key is empty")
        if args.protect_metrics and args.api_key is None:
            raise ValueError("--protect-metrics needs an API key (--api-key or VSC_API_KEY)")
        if args.api_key is not None:
            Security(api_key=args.api_key.strip())      # its own checks (printable ASCII, ...)
            args.api_key = args.api_key.strip()
    except ValueError as e:
        raise ServeOptionError(f"serve: error: {e}") from None

    def security(max_context: int) -> Security:
        return Security(api_key=args.api_key, protect_metrics=args.protect_metrics, allowed_hosts=hosts,
                        max_body_bytes=max_body or default_max_body(max_context))
    return security, limits
