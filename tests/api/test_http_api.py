"""The OpenAI-compatible API, driven by the official `openai` client against a live server.

The server runs a fake engine (and a fake character-level tokenizer, both in http_fakes.py)
so these tests depend only on the Engine / Tokenizer contracts.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import orjson
import pytest


from http_fakes import BOS, MODEL, FakeEngine, FakeTokenizer, expected, serving, wait_for


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
    prompt_len = len(FakeTokenizer().apply_chat_template([{"role": "user", "content": "part one, \ntwo"}]))  # joined as vLLM does
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
        "from http_fakes import FakeEngine, FakeTokenizer, MODEL\n"
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
