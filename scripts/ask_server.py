"""Start a compiled server, ask it one question with the official openai client, stop it.

The last step of `make demo`: proof that the folder `vsc compile` wrote is a working
OpenAI-compatible server. Usage: python scripts/ask_server.py SERVER_DIR [QUESTION]
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx2 as httpx
import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    folder = argv[0] if argv else "build/server"
    question = argv[1] if len(argv) > 1 else "Write one sentence about compilers."
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "vsc", "serve", folder, "--port", str(port)])
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print("the server did not come up", file=sys.stderr)
                return 1
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=0)
        model = client.models.list().data[0].id
        print(f"user> {question}\n{model}> ", end="", flush=True)
        start = time.perf_counter()
        tokens = 0
        for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                    max_tokens=48, temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                tokens += 1
                print(chunk.choices[0].delta.content, end="", flush=True)
        print(f"\n[{tokens} chunks in {time.perf_counter() - start:.2f} s]")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
