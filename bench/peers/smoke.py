"""Smoke-test peers: install, start on a model folder, one greedy streaming completion, stop.

    python -m bench.peers.smoke PEER [PEER ...] --model models/tiny-llama [--max-tokens 64] [--threads 2]
    python -m bench.peers.smoke llamacpp-gguf vsc-gguf --model models/smollm2-135m --gguf smollm2-135m

Prints one JSON line per peer: install and start-up seconds, time to first token, single-request
ms/token between streamed chunks, the completion text, and describe(). A peer that cannot be
installed or started prints {"peer": ..., "unavailable": reason}.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

from bench.peers import PEERS, PeerUnavailable, Running, get_peer
from bench.peers.gguf_file import resolve_gguf

PROMPT = "The capital of France is Paris. The capital of Germany is"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_completion(server: Running, prompt: str | list[int], max_tokens: int, ignore_eos: bool = True) -> dict:
    """One greedy streaming /v1/completions request: its text, chunk count, TTFT and ms/token.

    ms_per_token is the mean gap between the first and the last streamed chunk; e2e_ms_per_token
    is the whole request's time over its chunks (robust to servers that send chunks in bursts).
    """
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if ignore_eos:
        body.update(server.ignore_eos_fields)
    base_url = server.base_url
    text, times = [], []
    t0 = time.perf_counter()
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=300) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = "".join(c.get("text") or "" for c in chunk.get("choices", []))
            if piece:
                text.append(piece)
                times.append(time.perf_counter())
    out = {"text": "".join(text), "chunks": len(times)}
    if times:
        out["ttft_ms"] = round(1000 * (times[0] - t0), 1)
    if len(times) > 1:
        out["ms_per_token"] = round(1000 * (times[-1] - times[0]) / (len(times) - 1), 2)
        out["e2e_ms_per_token"] = round(1000 * (times[-1] - t0) / len(times), 2)
    return out


def smoke(name: str, model: Path, *, max_tokens: int, threads: int, max_batch: int, ctx: int,
          log_dir: Path) -> dict:
    peer = get_peer(name)
    result: dict = {"peer": name, "model": str(model)}
    try:
        t0 = time.monotonic()
        peer.install()
        result["install_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        server = peer.start(model, free_port(), max_batch=max_batch, threads=threads, ctx=ctx, log_dir=log_dir)
    except PeerUnavailable as e:
        return {**result, "unavailable": e.reason}
    result["start_s"] = round(time.monotonic() - t0, 1)       # includes convert / compile on a first run
    result["health_s"] = server.startup_s                    # launch -> healthy
    try:
        for _ in range(2):                                                # warm-up (vLLM needs two)
            stream_completion(server, PROMPT, max_tokens)
        result.update(stream_completion(server, PROMPT, max_tokens))
    except Exception as e:  # noqa: BLE001 - report, then stop the server
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        server.stop()
    result["describe"] = peer.describe()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("peers", nargs="+", choices=sorted(PEERS))
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--log-dir", type=Path, default=None)
    ap.add_argument("--gguf", default=None, metavar="PATH|NAME",
                    help="GGUF file for llamacpp-gguf / vsc-gguf (or a vsc registry model name)")
    args = ap.parse_args(argv)
    if args.gguf:
        gguf = resolve_gguf(args.gguf)
        for name in ("llamacpp-gguf", "vsc-gguf"):
            get_peer(name).gguf_file = gguf
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="vsc-peers-"))
    ok = True
    for name in args.peers:
        r = smoke(name, args.model.resolve(), max_tokens=args.max_tokens, threads=args.threads,
                  max_batch=args.max_batch, ctx=args.ctx, log_dir=log_dir)
        ok &= "unavailable" not in r and "error" not in r
        print(json.dumps(r), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
