"""Baseline numbers of a compiled server: batch-1 decode ms/token and 16-concurrent output tok/s.

A first, small measurement (the full load client and peer comparison live in bench/ later):
starts `vsc serve FOLDER` on loopback, streams greedy requests with ignore_eos so every
request generates exactly its max_tokens, and prints one JSON line.

    python bench/serve_baseline.py build/server [--concurrency 16] [--prompt-tokens 64] [--output-tokens 64]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time

import httpx2 as httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stream_one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> list[float]:
    """Arrival times of each streamed token chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    times = []
    async with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())
    return times


async def measure(base: str, concurrency: int, prompt_tokens: int, output_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=300) as client:
        model = (await client.get(base + "/v1/models")).json()["data"][0]["id"]
        url = base + "/v1/completions"
        prompt = [(7 * i + 3) % 1000 + 10 for i in range(prompt_tokens)]
        await stream_one(client, url, model, prompt, 8)  # warm-up
        # batch 1: time between tokens of a lone request
        solo = []
        for _ in range(3):
            t = await stream_one(client, url, model, prompt, output_tokens * 2)
            solo.append((t[-1] - t[0]) / (len(t) - 1))
        # N concurrent requests with distinct prompts
        prompts = [[(p + 11 * r) % 1000 + 10 for p in prompt] for r in range(concurrency)]
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, url, model, p, output_tokens) for p in prompts))
        wall = time.perf_counter() - start
        tokens = sum(len(r) for r in results)
        return {"model": model, "batch1_ms_per_token": round(1000 * statistics.median(solo), 3),
                "concurrency": concurrency, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
                "concurrent_output_tok_per_s": round(tokens / wall, 1), "concurrent_wall_s": round(wall, 3)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("server")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=64)
    args = ap.parse_args()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vsc", "serve", args.server, "--port", str(port)],
                            stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"server did not come up: {proc.stderr.read().decode()[-2000:]}", file=sys.stderr)
                return 1
        print(json.dumps(asyncio.run(measure(base, args.concurrency, args.prompt_tokens, args.output_tokens))))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
