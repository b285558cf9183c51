"""A compiled server, end to end: vsc compile → live HTTP server → the official openai client."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vsc.cli import main as vsc_main
from vsc.models.tiny import EOS_ID, make_tiny

from live_server import Live

SPEC = """
deployment e2e {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{
    arrivals = closed(16)
    prompt_tokens = uniform(8, 64)
    output_tokens = fixed(16)
  }}
  accuracy {{ greedy_exact(probes = 4) }}
  serve {{ max_context = 256 }}
  optimize "{pipeline}"
}}
"""
PIPELINE = "fuse-qkv,fuse-gate-up,paged-kv{block=16},continuous-batching{max_batch=16,max_tokens=512}"


def compile_server(tmp: Path, arch: str, pipeline: str = PIPELINE, name: str = "server") -> Path:
    model = tmp / f"tiny-{arch}"
    if not model.exists():
        make_tiny(model, arch=arch)
    spec = tmp / f"{arch}.vs"
    spec.write_text(SPEC.format(model=model, pipeline=pipeline))
    out = tmp / name
    assert vsc_main(["compile", str(spec), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return compile_server(tmp_path_factory.mktemp("e2e"), "llama")


@pytest.fixture(scope="module")
def live(built):
    server = Live(built)
    yield server
    server.close()


def test_server_folder_contents(built):
    names = sorted(p.name for p in built.iterdir())
    assert names == ["__init__.py", "__main__.py", "manifest.json", "model.py", "plan.vsir"]
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["pipeline"] == PIPELINE
    assert set(manifest["model"]["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    checks = [(v["check"], v["after"], v["ok"]) for v in manifest["verification"]]
    assert checks[0] == ("structural", "input", True)
    assert [c[1] for c in checks[1:5]] == ["fuse-qkv", "fuse-gate-up", "paged-kv{block=16}",
                                           "continuous-batching{max_batch=16,max_tokens=512}"]
    assert checks[-1][0] == "accuracy" and checks[-1][2] is True
    source = (built / "model.py").read_text()
    assert "LAYERS = 4" in source and "BLOCK_SIZE = 16" in source and "paged_attention" in source
    assert "import vsc.ir" not in source and "from vsc.ir" not in source


def test_completion_and_chat_plain_and_streamed(live):
    c = live.client
    r = c.completions.create(model=live.model, prompt="def main():", max_tokens=8, temperature=0)
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=live.model, prompt="def main():", max_tokens=8, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    chat = c.chat.completions.create(model=live.model, messages=[{"role": "user", "content": "Hello"}],
                                     max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    chunks = list(c.chat.completions.create(model=live.model, messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=6, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content


def test_sampling_parameters_act_on_a_compiled_server(live):
    """vLLM's sampling fields through the compiled runner: min_p 1 makes temperature 1.5 greedy, a
    -100 logit_bias bans a token, a repetition penalty changes greedy text, min_tokens holds EOS."""
    c = live.client
    kw = dict(model=live.model, prompt="def main():", max_tokens=16)
    greedy = c.completions.create(temperature=0, **kw).choices[0].text
    for seed in range(3):
        assert c.completions.create(temperature=1.5, seed=seed, extra_body={"min_p": 1.0}, **kw).choices[0].text \
            == greedy
    assert {c.completions.create(temperature=1.5, seed=s, **kw).choices[0].text for s in range(3)} != {greedy}
    penalized = c.completions.create(temperature=0, extra_body={"repetition_penalty": 5.0}, **kw).choices[0].text
    assert penalized != greedy
    biased = c.completions.create(temperature=0, frequency_penalty=2.0, presence_penalty=2.0, **kw).choices[0].text
    assert biased != greedy
    eos = {str(EOS_ID): 100}                              # +100: the model ends at once ...
    ended = c.completions.create(temperature=0, logit_bias=eos, **kw)
    assert ended.usage.completion_tokens == 1 and ended.choices[0].finish_reason == "stop"
    held = c.completions.create(temperature=0, logit_bias=eos, extra_body={"min_tokens": 5}, **kw)
    assert held.usage.completion_tokens == 6 and held.choices[0].finish_reason == "stop"   # ... after 5 tokens
    assert held.choices[0].text == greedy[:len(held.choices[0].text)] != ""


def test_sixteen_concurrent_requests_match_each_alone(live):
    prompts = [f"Request number {i}: " + "the quick brown fox " * (i % 5 + 1) for i in range(16)]

    def ask(p):
        return live.client.completions.create(model=live.model, prompt=p, max_tokens=12, temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    together: list[str | None] = [None] * 16

    def worker(i):
        together[i] = ask(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert together == alone
    assert live.engine.stats()["kv_blocks_used"] == 0


def test_disconnect_mid_stream_frees_kv_blocks(live):
    body = {"model": live.model, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", live.base + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            seen = 0
            for line in lines:
                if line.startswith("data: "):
                    seen += 1
                if seen == 3:
                    assert live.engine.stats()["kv_blocks_used"] > 0
                    break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and live.engine.stats()["kv_blocks_used"] != 0:
        time.sleep(0.02)
    stats = live.engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0


def test_over_context_is_400_naming_the_limit(live):
    with pytest.raises(openai.BadRequestError) as e:
        live.client.completions.create(model=live.model, prompt="word " * 200, max_tokens=200)
    assert "256" in str(e.value)


def test_invalid_json_is_400(live):
    r = httpx.post(live.base + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_metrics_parse_and_count(live):
    live.client.completions.create(model=live.model, prompt="hello", max_tokens=4, temperature=0)
    text = httpx.get(live.base + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["vsc_generated_tokens"].samples[0].value >= 4
    ttft_count = [s for s in families["vsc_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft_count and ttft_count[0].value >= 1
    assert "vsc_kv_blocks_used" in families and "vsc_requests_running" in families


def test_vllm_surface_of_a_compiled_server(live):
    """vLLM's metric families from the real engine, /tokenize and /detokenize through its tokenizer,
    and /v1/responses, on a compiled server."""
    before = {f.name: f for f in text_string_to_metric_families(httpx.get(live.base + "/metrics").text)}
    labels = {"model_name": live.model, "engine": "0"}

    def value(fams, family, name, **extra):
        (v,) = [s.value for s in fams[family].samples if s.name == name and s.labels == {**labels, **extra}]
        return v
    r = live.client.completions.create(model=live.model, prompt="hello there", max_tokens=5, temperature=0)
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(live.base + "/metrics").text)}
    for family, name in [("vllm:request_queue_time_seconds", "vllm:request_queue_time_seconds_count"),
                         ("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count"),
                         ("vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count")]:
        assert value(fams, family, name) == value(before, family, name) + 1, name
    assert value(fams, "vllm:generation_tokens", "vllm:generation_tokens_total") - \
        value(before, "vllm:generation_tokens", "vllm:generation_tokens_total") == r.usage.completion_tokens
    assert value(fams, "vllm:prompt_tokens", "vllm:prompt_tokens_total") - \
        value(before, "vllm:prompt_tokens", "vllm:prompt_tokens_total") == r.usage.prompt_tokens
    assert value(fams, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc") == 0.0     # idle: every block free
    tok = httpx.post(live.base + "/tokenize", json={"prompt": "hello there"}).json()
    assert tok["count"] == r.usage.prompt_tokens and tok["max_model_len"] == 256     # the prompt the engine saw
    back = httpx.post(live.base + "/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
    assert back.endswith("hello there")
    resp = live.client.responses.create(model=live.model, input="hello", max_output_tokens=4, temperature=0)
    chat = live.client.chat.completions.create(model=live.model, messages=[{"role": "user", "content": "hello"}],
                                               max_tokens=4, temperature=0)
    assert resp.output_text == chat.choices[0].message.content and resp.usage.output_tokens == 4


def test_queue_full_is_429(built, tmp_path):
    folder = tmp_path / "server"
    shutil.copytree(built, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"]["max_waiting"] = 0
    (folder / "manifest.json").write_text(json.dumps(manifest))
    server = Live(folder, integrity_check=False)      # a folder edited on purpose (--no-integrity-check)
    try:
        with pytest.raises(openai.RateLimitError):
            server.client.completions.create(model=server.model, prompt="hi", max_tokens=2)
    finally:
        server.close()


def test_qwen2_family_serves(tmp_path):
    folder = compile_server(tmp_path, "qwen2", pipeline="fuse-qkv,paged-kv{block=8}")
    server = Live(folder)
    try:
        r = server.client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5
    finally:
        server.close()


def test_python_dash_m_entry_point(built, tmp_path):
    """The folder runs on its own (`python -m server`), binds loopback, answers, and stops on SIGTERM."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", built.name, "--port", str(port)], cwd=built.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                       json={"model": "tiny-llama", "prompt": "x", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"on http://127.0.0.1:{port}/v1" in out


def test_vsc_verify_server_and_tampered_weights(built, tmp_path, capsys):
    assert vsc_main(["verify", str(built)]) == 0
    assert "accuracy: 4/4 probes exact" in capsys.readouterr().out
    # a server whose weights changed after compile fails verification, saying which file
    folder = compile_server(tmp_path, "llama", pipeline="fuse-qkv")
    capsys.readouterr()
    make_tiny(tmp_path / "tiny-llama", arch="llama", seed=1)
    assert vsc_main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'tiny-llama' / 'model.safetensors'} changed since compile" in out and "FAILED" in out


BROKEN_PASS = '''
from vsc.ir.module import walk_ops
from vsc.ir.types import pass_origin
from vsc.passes.base import Pass, register_pass


@register_pass


class WrongRope(Pass):
    name = "test-wrong-rope-theta"

    def apply(self, module):
        for op in walk_ops(module.model.func.body):
            if op.kind == "rope":
                op.attrs["theta"] = 10.0
                op.origin = pass_origin(self.name)
'''


def test_compile_refuses_a_plan_that_fails_the_accuracy_check(tmp_path, capsys):
    make_tiny(tmp_path / "tiny-llama", arch="llama")
    spec = tmp_path / "s.vs"
    spec.write_text(SPEC.format(model=tmp_path / "tiny-llama", pipeline="fuse-qkv"))
    plugin = tmp_path / "wrong_rope.py"
    plugin.write_text(BROKEN_PASS)
    out = tmp_path / "server"
    code = vsc_main(["compile", str(spec), "-o", str(out), "--load-pass", str(plugin),
                     "--passes", "fuse-qkv,test-wrong-rope-theta"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.startswith("compile: error: accuracy check failed, no server written: probe ")
    assert "diverged at position" in err


def test_serve_bad_folder_is_one_line(tmp_path, capsys):
    assert vsc_main(["serve", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("(no manifest.json); build one with `vsc compile`")


def test_real_smollm2_serves_coherent_text(smollm2_dir, tmp_path):
    spec = tmp_path / "smol.vs"
    spec.write_text(SPEC.format(model=smollm2_dir, pipeline=PIPELINE).replace("memory = 256 MiB", "memory = 2 GiB"))
    assert vsc_main(["compile", str(spec), "-o", str(tmp_path / "server")]) == 0
    server = Live(tmp_path / "server")
    try:
        r = server.client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16, temperature=0)
        assert "Paris" in r.choices[0].message.content
    finally:
        server.close()


@pytest.mark.parametrize("extra", ["chunked-prefill{tokens=16}", "fuse-add-rmsnorm", "fuse-silu-mul", "select-kernels"])
def test_pass_plans_serve_the_same_tokens(live, tmp_path, extra):
    """Each exact pass, compiled and served, answers exactly as the baseline plan does."""
    folder = compile_server(tmp_path, "llama", pipeline=PIPELINE + "," + extra)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["pipeline"].endswith(extra)
    accuracy_after = [v["after"] for v in manifest["verification"] if v["check"] == "accuracy"]
    # passes that may change outputs get their own accuracy run; lowering always gets one
    assert accuracy_after == ([extra, "lowering"] if extra == "select-kernels" else ["lowering"])
    other = Live(folder)
    try:
        prompt = "A long prompt that needs several chunks: " + "lorem ipsum dolor sit amet " * 12
        want = live.client.completions.create(model=live.model, prompt=prompt, max_tokens=10, temperature=0)
        got = other.client.completions.create(model=other.model, prompt=prompt, max_tokens=10, temperature=0)
        assert got.usage.prompt_tokens > 3 * 16  # long enough to be chunked
        assert got.choices[0].text == want.choices[0].text
    finally:
        other.close()
