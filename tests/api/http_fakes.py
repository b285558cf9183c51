"""Fakes for the HTTP tests: an engine and a character-level tokenizer honouring the
Engine / Tokenizer contracts of vsc.runtime, and `serving()`, a live server around them."""
from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time

import openai

from vsc.runtime.api import GenerateRequest, QueueFull, TokenEvent
from vsc.runtime.constrain import SchemaError
from vsc.runtime.http import build_app
from vsc.runtime.metrics import ServerMetrics
from vsc.runtime.serve import start_in_thread, stop_server

MODEL = "fake-model"
OUTPUT = "The quick brown fox jumps over the lazy dog. "   # what the fake engine always says
BOS, EOS = 1, 2


class FakeTokenizer:
    """One token per character (its code point); BOS=1 when special tokens are added."""

    eos_token_ids = [EOS]
    vocab_size = 0x110000

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [ord(c) for c in text]
        return [BOS] + ids if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("<s>" if i == BOS else "</s>" if i == EOS else chr(i) for i in ids
                       if i > EOS or not skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return ["<s>" if i == BOS else "</s>" if i == EOS else chr(i) for i in ids]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


def expected(n: int) -> str:
    return (OUTPUT * (n // len(OUTPUT) + 1))[:n]


class FakeEngine:
    """Behaves like the real engine as the HTTP layer sees it.

    Each request is produced by its own task (standing in for the engine thread), so it
    keeps running and holding KV blocks when its consumer goes away, until it finishes or
    abort() is honoured at the next step boundary. Output is OUTPUT repeated, one character
    per token, `delay` seconds per token; stop strings are held back and cut like the real
    detokenizer does. A prompt containing "BOOM" fails before the first event, one
    containing "BANG" raises after two events, one containing "FAIL" ends after two events
    with finish_reason "error" (what the real engine does when a model step raises).
    """

    def __init__(self, max_context: int = 256, delay: float = 0.001, capacity: int = 64, block_size: int = 4,
                 kv_blocks_total: int = 1024):
        self.max_context, self.model_name = max_context, MODEL
        self.delay, self.capacity, self.block_size, self.kv_blocks_total = delay, capacity, block_size, kv_blocks_total
        self.alive = True
        self.output = OUTPUT      # what it says (repeated): a test may script it
        self.requests: dict[str, GenerateRequest] = {}
        self.aborted: list[str] = []
        self.admitted: list[str] = []
        self.generated = 0
        self._blocks: dict[str, int] = {}
        self._abort_flags: set[str] = set()
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()

    # --- the Engine protocol
    def is_alive(self) -> bool:
        return self.alive

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.aborted.append(request_id)
            self._abort_flags.add(request_id)

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"running": len(self._blocks), "waiting": 0, "kv_blocks_used": sum(self._blocks.values()),
                    "kv_blocks_total": self.kv_blocks_total, "generated_tokens": self.generated}

    def admit_schema(self, schema: str) -> None:
        """Records the schema; refuses one titled REFUSE (as the real engine refuses one its
        grammar engine cannot serve)."""
        self.admitted.append(schema)
        if '"title":"REFUSE"' in schema:
            raise SchemaError("the fake engine refuses this schema")

    async def generate(self, request: GenerateRequest):
        rid = request.request_id
        with self._lock:
            if len(self._blocks) >= self.capacity:
                raise QueueFull(f"{len(self._blocks)} requests in flight, the bound is {self.capacity}")
            self.requests[rid] = request
            prompt = "".join(chr(i) for i in request.prompt_ids if i > EOS)
            if "BOOM" in prompt:
                raise RuntimeError("the fake engine exploded")
            self._blocks[rid] = math.ceil(len(request.prompt_ids) / self.block_size)
        queue: asyncio.Queue = asyncio.Queue()
        fail_after = 2 if "BANG" in prompt or "FAIL" in prompt else None
        task = asyncio.get_running_loop().create_task(self._produce(request, queue, prompt, fail_after))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        while True:
            ev = await queue.get()
            if isinstance(ev, Exception):
                raise ev
            yield ev
            if ev.finish_reason is not None:
                return

    # --- helpers for tests
    def blocks_in_use(self) -> int:
        with self._lock:
            return sum(self._blocks.values())

    async def _produce(self, req: GenerateRequest, queue: asyncio.Queue, prompt: str, fail_after: int | None) -> None:
        rid, p, plen = req.request_id, req.params, len(req.prompt_ids)
        hold = max((len(s) for s in p.stop), default=1) - 1
        text, emitted = "", 0
        # "scheduled" now: the last event reports the wait, as the real engine does
        q = max(0.0, time.monotonic() - req.arrival_time) if req.arrival_time else None
        try:
            for n in range(1, p.max_tokens + 1):
                await asyncio.sleep(self.delay)
                with self._lock:
                    if rid in self._abort_flags:
                        queue.put_nowait(TokenEvent(rid, [], "", "abort", plen, n - 1, queue_seconds=q))
                        return
                    self.generated += 1
                    self._blocks[rid] = math.ceil((plen + n) / self.block_size)
                if fail_after is not None and n > fail_after:
                    queue.put_nowait(RuntimeError("the fake engine broke mid-stream") if "BANG" in prompt
                                     else TokenEvent(rid, [], "", "error", plen, n - 1, queue_seconds=q))
                    return
                ch = self.output[(n - 1) % len(self.output)]
                text += ch
                cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
                if cut >= 0:
                    queue.put_nowait(TokenEvent(rid, [ord(ch)], text[emitted:cut], "stop", plen, n, queue_seconds=q))
                    return
                if n == p.max_tokens:
                    queue.put_nowait(TokenEvent(rid, [ord(ch)], text[emitted:], "length", plen, n,
                                                *_prediction_counts(p.prediction, text), queue_seconds=q))
                    return
                safe = max(emitted, len(text) - hold)
                queue.put_nowait(TokenEvent(rid, [ord(ch)], text[emitted:safe], None, plen, n))
                emitted = safe
        finally:
            with self._lock:
                self._blocks.pop(rid, None)


def _prediction_counts(prediction: list[int] | None, text: str) -> tuple[int, int]:
    """(accepted, rejected) prediction tokens as the fake reports them: the prediction's
    leading characters the output repeats, and one rejected draft if it then differs."""
    if not prediction:
        return 0, 0
    same = 0
    while same < min(len(prediction), len(text)) and prediction[same] == ord(text[same]):
        same += 1
    return same, int(same < len(prediction))


class Live:
    def __init__(self, engine: FakeEngine, metrics: ServerMetrics, port: int):
        self.engine, self.metrics, self.port = engine, metrics, port
        self.url = f"http://127.0.0.1:{port}"

    def client(self, timeout: float = 30.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=timeout)


@contextlib.contextmanager
def serving(engine: FakeEngine | None = None, name: str = MODEL, security=None, limits=None, tokenizer=None):
    """A live server on an ephemeral port around `engine`, stopped (bounded) on exit
    (`security`, `limits`: vsc.runtime.guard.Security, vsc.runtime.conn.ConnLimits)."""
    engine = engine or FakeEngine()
    metrics = ServerMetrics()
    app = build_app(engine, tokenizer or FakeTokenizer(), metrics, name, security)
    server, thread, port = start_in_thread(app, timeout=10, limits=limits)
    try:
        yield Live(engine, metrics, port)
    finally:
        stop_server(server, thread, timeout=10)
        assert not thread.is_alive(), "server thread did not stop"


def wait_for(cond, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


#: One minimal body per endpoint, for tests that check a field on both.
ENDPOINTS = {"/v1/completions": {"prompt": "hello"},
             "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]}}


def post_fields(live: "Live", path: str, max_tokens: int = 4, **fields):
    """POST one of ENDPOINTS with `fields` added (a bounded, non-streaming call)."""
    import httpx2 as httpx
    import orjson

    body = {"model": MODEL, "max_tokens": max_tokens, **ENDPOINTS[path], **fields}
    return httpx.post(live.url + path, content=orjson.dumps(body), headers={"content-type": "application/json"},
                      timeout=10)
