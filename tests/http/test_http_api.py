"""The OpenAI-compatible API, driven by the official `openai` client against a live server.

The server runs a fake engine (and a fake character-level tokenizer) so these tests depend
only on the Engine / Tokenizer contracts. The fakes and the `serving` helper live here and
are imported by test_http_errors.py and test_metrics.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import orjson
import pytest

from vsc.runtime.api import GenerateRequest, QueueFull, TokenEvent
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

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i > EOS)

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
        self.requests: dict[str, GenerateRequest] = {}
        self.aborted: list[str] = []
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
        try:
            for n in range(1, p.max_tokens + 1):
                await asyncio.sleep(self.delay)
                with self._lock:
                    if rid in self._abort_flags:
                        queue.put_nowait(TokenEvent(rid, [], "", "abort", plen, n - 1))
                        return
                    self.generated += 1
                    self._blocks[rid] = math.ceil((plen + n) / self.block_size)
                if fail_after is not None and n > fail_after:
                    queue.put_nowait(RuntimeError("the fake engine broke mid-stream") if "BANG" in prompt
                                     else TokenEvent(rid, [], "", "error", plen, n - 1))
                    return
                ch = OUTPUT[(n - 1) % len(OUTPUT)]
                text += ch
                cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
                if cut >= 0:
                    queue.put_nowait(TokenEvent(rid, [ord(ch)], text[emitted:cut], "stop", plen, n))
                    return
                if n == p.max_tokens:
                    queue.put_nowait(TokenEvent(rid, [ord(ch)], text[emitted:], "length", plen, n))
                    return
                safe = max(emitted, len(text) - hold)
                queue.put_nowait(TokenEvent(rid, [ord(ch)], text[emitted:safe], None, plen, n))
                emitted = safe
        finally:
            with self._lock:
                self._blocks.pop(rid, None)


class Live:
    def __init__(self, engine: FakeEngine, metrics: ServerMetrics, port: int):
        self.engine, self.metrics, self.port = engine, metrics, port
        self.url = f"http://127.0.0.1:{port}"

    def client(self, timeout: float = 30.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=timeout)


@contextlib.contextmanager
def serving(engine: FakeEngine | None = None, name: str = MODEL):
    """A live server on an ephemeral port around `engine`, stopped (bounded) on exit."""
    engine = engine or FakeEngine()
    metrics = ServerMetrics()
    server, thread, port = start_in_thread(build_app(engine, FakeTokenizer(), metrics, name), timeout=10)
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


@pytest.fixture(scope="module")
def live():
    with serving(FakeEngine(max_context=256)) as lv:
        yield lv


@pytest.fixture(scope="module")
def client(live):
    with live.client() as c:
        yield c


# --------------------------------------------------------------------------- discovery

def test_models_lists_the_served_model(live, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    r = httpx.get(live.url + f"/v1/models/{MODEL}", timeout=5)
    assert r.status_code == 200 and r.json()["id"] == MODEL


def test_health_follows_the_engine(live):
    r = httpx.get(live.url + "/health", timeout=5)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    live.engine.alive = False
    try:
        assert httpx.get(live.url + "/health", timeout=5).status_code == 503
    finally:
        live.engine.alive = True


# --------------------------------------------------------------------------- completions

def test_completion_text_usage_and_shape(live, client):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=7)
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert len(out.choices) == 1
    choice = out.choices[0]
    assert choice.text == expected(7) and choice.finish_reason == "length" and choice.index == 0
    assert choice.logprobs is None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (6, 7, 13)
    req = live.engine.requests[out.id]                 # the response id is the engine's request id
    assert req.prompt_ids == [BOS] + [ord(c) for c in "Hello"]
    assert req.params.max_tokens == 7 and req.arrival_time > 0


def test_completion_default_max_tokens_is_16(live, client):
    out = client.completions.create(model=MODEL, prompt="x")
    assert out.choices[0].text == expected(16) and out.usage.completion_tokens == 16


def test_completion_token_id_prompts(live, client):
    out = client.completions.create(model=MODEL, prompt=[72, 105, 33], max_tokens=3)
    assert out.usage.prompt_tokens == 3 and live.engine.requests[out.id].prompt_ids == [72, 105, 33]
    out = client.completions.create(model=MODEL, prompt=[[72, 105]], max_tokens=2)
    assert live.engine.requests[out.id].prompt_ids == [72, 105]
    out = client.completions.create(model=MODEL, prompt=["Hi"], max_tokens=2)
    assert live.engine.requests[out.id].prompt_ids == [BOS, 72, 105]


def test_sampling_parameters_reach_the_engine(live, client):
    out = client.completions.create(model=MODEL, prompt="p", max_tokens=4, temperature=0, top_p=0.5, seed=7,
                                    stop="zzz", user="someone",
                                    extra_body={"top_k": 5, "ignore_eos": True, "some_unknown_field": 1})
    params = live.engine.requests[out.id].params
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.0, 0.5, 5, 7)
    assert params.ignore_eos is True and params.stop == ["zzz"] and params.greedy


def test_completion_stream_chunks_and_usage(live, client):
    chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in content) == expected(10)
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == 3 and chunks[-1].usage.total_tokens == 13


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == expected(3)


def test_stop_strings_pass_through(live, client):
    out = client.completions.create(model=MODEL, prompt="a", max_tokens=30, stop=["fox", "never"])
    assert out.choices[0].text == "The quick brown " and out.choices[0].finish_reason == "stop"
    assert live.engine.requests[out.id].params.stop == ["fox", "never"]
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=40, stop=" over", stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The quick brown fox jumps" and chunks[-1].choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------- chat

def test_chat_completion(live, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == MODEL
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == expected(12)
    assert out.choices[0].finish_reason == "length"
    prompt = FakeTokenizer().apply_chat_template(messages)
    assert live.engine.requests[out.id].prompt_ids == FakeTokenizer().encode(prompt)   # no BOS added twice
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == 12


def test_chat_default_max_tokens_is_rest_of_context(live, client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}]}]
    out = client.chat.completions.create(model=MODEL, messages=messages)
    prompt_len = len(FakeTokenizer().apply_chat_template([{"role": "user", "content": "part one, two"}]))
    assert out.usage.prompt_tokens == prompt_len
    assert live.engine.requests[out.id].params.max_tokens == live.engine.max_context - prompt_len
    assert out.usage.completion_tokens == live.engine.max_context - prompt_len


def test_chat_stream(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == expected(8)
    assert content[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_stream_wire_format(live):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [orjson.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in payloads[-1]


# --------------------------------------------------------------------------- load

def test_sixteen_concurrent_requests_complete(live):
    def one(i: int) -> tuple[int, str]:
        with live.client(timeout=30) as c:
            n = 5 + i
            if i % 2:
                chunks = c.completions.create(model=MODEL, prompt=f"request {i}", max_tokens=n, stream=True)
                return n, "".join(ch.choices[0].text for ch in chunks if ch.choices)
            out = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"r{i}"}],
                                            max_tokens=n)
            return n, out.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(16)]
        results = [f.result(timeout=60) for f in futures]
    assert all(text == expected(n) for n, text in results)
    assert wait_for(lambda: live.engine.blocks_in_use() == 0)


# --------------------------------------------------------------------------- run_server

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_server_shuts_down_gracefully_on_signal(tmp_path, sig):
    with socket.socket() as s:                      # a free port (run_server takes a fixed one)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "serve.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_http_api import FakeEngine, FakeTokenizer, MODEL\n"
        "from vsc.runtime.http import build_app\n"
        "from vsc.runtime.metrics import ServerMetrics\n"
        "from vsc.runtime.serve import run_server\n"
        "run_server(build_app(FakeEngine(), FakeTokenizer(), ServerMetrics(), MODEL), port=int(sys.argv[1]))\n"
        "print('returned after shutdown', flush=True)\n")
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None     # stop waiting if it died
        assert wait_for(up, timeout=60, interval=0.1) and proc.poll() is None
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=10)
        assert r.json()["choices"][0]["text"] == expected(2)
        # a stream in flight when the signal comes is drained, not cut
        body = {"model": MODEL, "prompt": "x", "max_tokens": 150, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(sig)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert orjson.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert "returned after shutdown" in out
