"""The per-request cost of the declared request schema (vsc.runtime.schema) against the hand parser
it replaced, and the streamed (SSE) per-token path of both, measured side by side.

    python bench/schema_overhead.py [--old-rev REV] [--rounds 5] [--requests 10000] [--tokens 20000]

The old code is REV's `vsc` package (default 8eee8a5, the last commit with the hand parser),
extracted with `git archive` into a temporary folder; the new one is this checkout's. Each round
runs one process per side (old, new, alternating: the box is noisy), and each process measures, in
its own CPU time (time.process_time, so other processes on a busy box count less):

  parse    a typical chat request body (system + 3 turns, sampling fields, stop, seed,
           stream_options, response_format text, two tools with JSON Schema parameters):
           orjson.loads of its bytes + everything the handler runs to check it and turn it into
           the engine's SamplingParams, messages, (role, echo) and tool plan, as each version's
           handler calls it (the old one ran _messages and tools.parse twice: for the reply and
           for the prompt) -- not the chat template, tokenizing or the tools' grammar, the same in
           both. timeit, µs per request (best of 3 x --requests). New side only: `schema_check_us`,
           orjson.loads + schema.check(ChatCompletionRequest) alone.
  sse      the streaming fast path: `_EventStream._stream` over --tokens token events from an
           in-memory iterator into a no-op send (what one request's SSE costs per token).

Prints one JSON line per process and a summary: the median of the rounds per side, new / old.
Nothing is served and no model is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BODY = {
    "model": "fake-model",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "It is sunny, 21 degrees."},
        {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"},
                                     {"type": "text", "text": "In Celsius, please."}]},
    ],
    "temperature": 0.7, "top_p": 0.9, "max_tokens": 128, "seed": 1234, "stop": ["\n\n", "User:"],
    "presence_penalty": 0.1, "frequency_penalty": 0.2, "stream": True, "stream_options": {"include_usage": True},
    "response_format": {"type": "text"}, "user": "bench",
    "tools": [
        {"type": "function", "function": {
            "name": "get_weather", "description": "The weather forecast of a city on a day",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string"}, "day": {"type": "string", "enum": ["today", "tomorrow"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "day"]}}},
        {"type": "function", "function": {
            "name": "get_time", "description": "The local time of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    ],
    "tool_choice": "auto",
}

CHILD = r'''
import asyncio, json, sys, time, timeit
import orjson
import torch
torch.set_num_threads(1)
from vsc.runtime import http, tools as tooling
from vsc.runtime.api import TokenEvent
from vsc.runtime.choices import Choice
from vsc.runtime.metrics import ServerMetrics

raw = orjson.dumps(json.loads(sys.argv[1]))
requests, tokens = int(sys.argv[2]), int(sys.argv[3])
VOCAB = 49152
declared = hasattr(http, "_check")

if declared:
    from vsc.runtime import schema
    def parse():
        body = orjson.loads(raw)
        q = http._check(schema.ChatCompletionRequest, body)
        params, stream, usage = http._common(q, True, VOCAB)
        http._scoring(q, True, params)
        http._prediction(q.prediction)
        messages = http._messages(q.messages)
        http._chat_reply(q, messages)
        tooling.parse(body)                 # _tool_plan's
        http._chat_continuation(q)          # _chat_prompt's (it takes the messages and the plan)
        http._unknown(q)
    def check_only():
        schema.check(schema.ChatCompletionRequest, orjson.loads(raw))
else:
    def parse():
        body = orjson.loads(raw)
        params, stream, usage = http._common(body, True, VOCAB)
        http._scoring(body, True, params)
        http._prediction(body.get("prediction"))
        http._chat_reply(body)              # (it ran _messages)
        tooling.parse(body)                 # _tool_plan's
        http._chat_continuation(body)       # _chat_prompt's, which ran _messages and tools.parse again
        http._messages(body)
        tooling.parse(body)
        http._unknown_fields(body, True)
    check_only = None

parse()
clock = time.process_time     # this process's CPU time: other processes on a busy box do not count
per_request = min(timeit.repeat(parse, number=requests, repeat=3, timer=clock)) / requests * 1e6
check_us = (min(timeit.repeat(check_only, number=requests, repeat=3, timer=clock)) / requests * 1e6
            if check_only else None)


class Tok:
    vocab_size = VOCAB
    def decode(self, ids, skip_special_tokens=True): return "x" * len(ids)
    def convert_ids_to_tokens(self, ids): return ["x"] * len(ids)


class Engine:
    max_context = 4096
    def stats(self): return {}


async def events(n):
    for i in range(n):
        yield TokenEvent("r", [i % 1000 + 3], "ab")
    yield TokenEvent("r", [7], "c", finish_reason="length", prompt_tokens=5, completion_tokens=n + 1)


async def sse_once(app, n):
    r = http._Req("chatcmpl-x", True, time.monotonic(), 5, True)
    r.out = Choice(0, True, None, False, False, "", [1, 2, 3, 4, 5], None)
    it = events(n).__aiter__()
    first = await it.__anext__()
    sent = []
    async def send(message):
        sent.append(len(message.get("body", b"")))
    await http._EventStream(app, r, it, first, time.monotonic())._stream(send)
    assert len(sent) == n + 2, len(sent)     # the start, n chunks, the last chunk


async def sse():
    app = http._App(Engine(), Tok(), ServerMetrics(), "fake-model")
    await sse_once(app, 100)
    best = float("inf")
    for _ in range(3):
        t = clock()
        await sse_once(app, tokens)
        best = min(best, clock() - t)
    return best / tokens * 1e6

per_token = asyncio.run(sse())
print(json.dumps({"declared": declared, "parse_us_per_request": round(per_request, 2),
                  "schema_check_us": check_us and round(check_us, 2),
                  "sse_us_per_token": round(per_token, 3)}))
'''


def run(side_root: Path, requests: int, tokens: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(side_root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(BODY), str(requests), str(tokens)], env=env,
                         capture_output=True, text=True, cwd=side_root)
    if out.returncode != 0:
        sys.exit(f"the {side_root} side failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-rev", default="8eee8a5", help="the commit with the hand parser")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--tokens", type=int, default=20000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.old_rev, "vsc"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        rows: dict[str, list[dict]] = {"old": [], "new": []}
        for _ in range(a.rounds):
            for side, root in (("old", Path(tmp)), ("new", ROOT)):
                row = run(root, a.requests, a.tokens)
                rows[side].append(row)
                print(json.dumps({"side": side, **row}), flush=True)
    summary = {}
    for key in ("parse_us_per_request", "sse_us_per_token"):
        old = statistics.median(r[key] for r in rows["old"])
        new = statistics.median(r[key] for r in rows["new"])
        summary[key] = {"old": old, "new": new, "new/old": round(new / old, 3)}
    print(json.dumps({"summary": summary, "old_rev": a.old_rev, "rounds": a.rounds, "requests": a.requests,
                      "tokens": a.tokens}))


if __name__ == "__main__":
    main()
