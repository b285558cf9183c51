"""vLLM's observability and utility surface: the vllm: metric families (names, types, labels,
buckets of vLLM's PrometheusStatLogger), /tokenize, /detokenize, /version, and the per-request
log line."""
from __future__ import annotations

import logging
from pathlib import Path

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vsc import __version__
from vsc.runtime.guard import Security
from vsc.runtime.tokenizer import Tokenizer

from http_fakes import MODEL, FakeEngine, FakeTokenizer, serving

LABELS = {"model_name": MODEL, "engine": "0"}
# vLLM's buckets, as vllm/v1/metrics/loggers.py declares them
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
             40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_TPOT = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
             80.0]
VLLM_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]
TINY_LLAMA = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"


def families(url: str) -> dict:
    r = httpx.get(url + "/metrics", timeout=5)
    assert r.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def sample(fams: dict, family: str, name: str | None = None, **labels) -> float:
    """The value of the one sample of `family` named `name` (default: the family's) with `labels`."""
    name = name or family
    hits = [s.value for s in fams[family].samples if s.name == name and s.labels == labels]
    assert len(hits) == 1, (family, name, labels, fams[family].samples)
    return hits[0]


def buckets(fams: dict, family: str, **labels) -> list[float]:
    return [float(s.labels["le"]) for s in fams[family].samples
            if s.name == family + "_bucket" and {k: v for k, v in s.labels.items() if k != "le"} == labels
            and s.labels["le"] != "+Inf"]


class _StatsEngine(FakeEngine):
    """Reports fixed engine state, as the real engine's stats() does."""

    STATS = {"running": 3, "waiting": 2, "kv_blocks_used": 25, "kv_blocks_total": 100, "prefix_query_tokens": 40,
             "prefix_hit_tokens": 16, "preemptions": 1, "spec_draft_tokens": 9, "spec_accepted_tokens": 7}

    def stats(self):
        return dict(self.STATS)


def test_vllm_request_families_count_what_vsc_counts():
    with serving(FakeEngine(delay=0.002)) as lv:
        before = families(lv.url)
        assert sample(before, "vllm:request_success", "vllm:request_success_total", finished_reason="stop",
                      **LABELS) == 0                                  # every reason exposed from the start
        with lv.client() as c:
            c.completions.create(model=MODEL, prompt="abc", max_tokens=5)                        # 4 prompt tokens
            list(c.completions.create(model=MODEL, prompt="abcd", max_tokens=7, stream=True))    # 5
            c.completions.create(model=MODEL, prompt="xy", max_tokens=30, stop=["fox"])          # 3, stops
        f = families(lv.url)
    for name, kind in [("vllm:time_to_first_token_seconds", "histogram"),
                       ("vllm:time_per_output_token_seconds", "histogram"),
                       ("vllm:e2e_request_latency_seconds", "histogram"),
                       ("vllm:request_queue_time_seconds", "histogram"), ("vllm:prompt_tokens", "counter"),
                       ("vllm:generation_tokens", "counter"), ("vllm:request_success", "counter"),
                       ("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"),
                       ("vllm:kv_cache_usage_perc", "gauge"), ("vllm:gpu_cache_usage_perc", "gauge"),
                       ("vllm:request_prompt_tokens", "histogram"), ("vllm:request_generation_tokens", "histogram"),
                       ("vllm:prefix_cache_queries", "counter"),
                       ("vllm:prefix_cache_hits", "counter"), ("vllm:spec_decode_num_draft_tokens", "counter"),
                       ("vllm:spec_decode_num_accepted_tokens", "counter")]:
        assert f[name].type == kind, name
    assert buckets(f, "vllm:time_to_first_token_seconds", **LABELS) == VLLM_TTFT
    assert buckets(f, "vllm:time_per_output_token_seconds", **LABELS) == VLLM_TPOT
    assert buckets(f, "vllm:e2e_request_latency_seconds", **LABELS) == VLLM_LATENCY
    assert buckets(f, "vllm:request_queue_time_seconds", **LABELS) == VLLM_LATENCY
    # vLLM's 1-2-5 token buckets up to the context (the fake's: 256)
    assert buckets(f, "vllm:request_prompt_tokens", **LABELS) == [1, 2, 5, 10, 20, 50, 100, 200]
    assert sample(f, "vllm:request_generation_tokens", "vllm:request_generation_tokens_sum", **LABELS) == \
        sample(f, "vllm:generation_tokens", "vllm:generation_tokens_total", **LABELS)
    assert sample(f, "vllm:request_prompt_tokens", "vllm:request_prompt_tokens_count", **LABELS) == 3
    # the same measurements as vsc's families
    for vllm, vsc in [("vllm:time_to_first_token_seconds", "vsc_time_to_first_token_seconds"),
                      ("vllm:time_per_output_token_seconds", "vsc_inter_token_latency_seconds"),
                      ("vllm:e2e_request_latency_seconds", "vsc_e2e_request_latency_seconds")]:
        for suffix in ("_count", "_sum"):
            assert sample(f, vllm, vllm + suffix, **LABELS) == sample(f, vsc, vsc + suffix), vllm + suffix
    assert sample(f, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count", **LABELS) == 3
    assert sample(f, "vllm:request_queue_time_seconds", "vllm:request_queue_time_seconds_count", **LABELS) == 3
    stopped_at = "The quick brown fox".index("fox") + 3      # the fake stops once "fox" is out
    assert sample(f, "vllm:generation_tokens", "vllm:generation_tokens_total", **LABELS) == 5 + 7 + stopped_at
    assert sample(f, "vllm:prompt_tokens", "vllm:prompt_tokens_total", **LABELS) == 4 + 5 + 3
    assert sample(f, "vllm:prompt_tokens", "vllm:prompt_tokens_total", **LABELS) == \
        sample(f, "vsc_prompt_tokens", "vsc_prompt_tokens_total")
    assert sample(f, "vllm:request_success", "vllm:request_success_total", finished_reason="length", **LABELS) == 2
    assert sample(f, "vllm:request_success", "vllm:request_success_total", finished_reason="stop", **LABELS) == 1
    assert sample(f, "vllm:request_success", "vllm:request_success_total", finished_reason="abort", **LABELS) == 0
    assert sample(f, "vllm:num_requests_running", **LABELS) == 0


def test_vllm_engine_families_read_the_same_stats_as_vsc():
    with serving(_StatsEngine(), name="served-as") as lv:
        f = families(lv.url)
    labels = {"model_name": "served-as", "engine": "0"}
    s = _StatsEngine.STATS
    assert sample(f, "vllm:num_requests_running", **labels) == s["running"] == sample(f, "vsc_requests_running")
    assert sample(f, "vllm:num_requests_waiting", **labels) == s["waiting"] == sample(f, "vsc_requests_waiting")
    assert sample(f, "vllm:kv_cache_usage_perc", **labels) == 0.25      # 25 of 100 blocks, as a fraction
    assert sample(f, "vllm:gpu_cache_usage_perc", **labels) == 0.25     # vLLM's older name, the same value
    assert sample(f, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total", **labels) == 40 == \
        sample(f, "vsc_prefix_cache_query_tokens", "vsc_prefix_cache_query_tokens_total")
    assert sample(f, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total", **labels) == 16
    assert sample(f, "vllm:num_preemptions", "vllm:num_preemptions_total", **labels) == 1
    assert sample(f, "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_draft_tokens_total", **labels) == 9
    assert sample(f, "vllm:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens_total",
                  **labels) == 7
    assert not [n for n in f if not (n.startswith("vsc_") or n.startswith("vllm:"))]   # nothing unprefixed


def test_one_log_line_per_request_without_the_prompt(caplog):
    caplog.set_level(logging.INFO, logger="vsc.runtime.http")
    secret = "PROMPT-SECRET-42"
    with serving(FakeEngine(delay=0.001)) as lv, lv.client() as c:
        done = c.completions.create(model=MODEL, prompt=secret, max_tokens=6)
        streamed = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": secret}],
                                                  max_tokens=4, stream=True))
        bad = httpx.post(lv.url + "/v1/completions", json={"model": MODEL, "prompt": secret, "max_tokens": 0},
                         timeout=10)
    assert bad.status_code == 400
    lines = [r.getMessage() for r in caplog.records if r.name == "vsc.runtime.http" and r.levelno == logging.INFO]
    assert not [line for line in lines if secret in line]
    (one,) = [line for line in lines if done.id in line]
    assert f"prompt_tokens={len(secret) + 1} completion_tokens=6" in one and "finish_reason=length" in one
    assert "ttft=" in one and "ttft=-" not in one and "duration=" in one
    (two,) = [line for line in lines if streamed[0].id in line]
    assert "completion_tokens=4" in two and "finish_reason=length" in two
    refused = [line for line in lines if "refused" in line]
    assert len(refused) == 1 and "status=400" in refused[0] and "param=max_tokens" in refused[0]


def post(lv, path: str, body: dict, **kw):
    return httpx.post(lv.url + path, json=body, timeout=10, **kw)


def test_tokenize_and_detokenize_round_trip_through_the_tokenizer():
    tok = FakeTokenizer()
    text = "héllo wörld"
    with serving(FakeEngine(max_context=300)) as lv:
        r = post(lv, "/tokenize", {"model": MODEL, "prompt": text})
        assert r.status_code == 200
        body = r.json()
        assert body == {"count": len(text) + 1, "max_model_len": 300, "tokens": tok.encode(text, True),
                        "token_strs": None}
        back = post(lv, "/detokenize", {"model": MODEL, "tokens": body["tokens"]}).json()
        assert back == {"prompt": tok.decode(body["tokens"], skip_special_tokens=False)} == {"prompt": "<s>" + text}
        plain = post(lv, "/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True}).json()
        assert plain["tokens"] == tok.encode(text) and plain["token_strs"] == list(text)
        assert post(lv, "/detokenize", {"tokens": plain["tokens"]}).json()["prompt"] == text
        messages = [{"role": "user", "content": "hi"}]
        chat = post(lv, "/tokenize", {"messages": messages}).json()    # vLLM's chat default: no special tokens
        assert chat["tokens"] == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        bare = post(lv, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
        assert bare["tokens"] == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False))
        assert bare["count"] < chat["count"]


@pytest.mark.skipif(not (TINY_LLAMA / "tokenizer.json").is_file(), reason="models/tiny-llama is not here")
def test_tokenize_with_a_real_tokenizer():
    tok = Tokenizer.from_model_dir(TINY_LLAMA)
    text = "Hello, world! Tokenize me."
    with serving(FakeEngine(), tokenizer=tok) as lv:
        body = post(lv, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
        assert body["tokens"] == tok.encode(text, add_special_tokens=True)
        assert body["token_strs"] == [tok.tokenizer.id_to_token(i) for i in body["tokens"]]
        back = post(lv, "/detokenize", {"tokens": body["tokens"]}).json()["prompt"]
        assert back == tok.decode(body["tokens"], skip_special_tokens=False) and back.endswith(text)


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "a", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "a"}], "continue_final_message": True}, 400, "continue_final_message"),
    ({"messages": [{"role": "user", "content": "a"}], "chat_template": "{{ x }}"}, 400, "chat_template"),
    ({"prompt": "a", "add_generation_prompt": True}, 400, "add_generation_prompt"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400, "messages"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "a", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ({"prompt": "a", "model": "other"}, 404, "model"),
])
def test_tokenize_refuses_what_it_cannot_honour(body, status, param):
    with serving() as lv:
        r = post(lv, "/tokenize", body)
        assert r.status_code == status and r.json()["error"]["param"] == param


@pytest.mark.parametrize("tokens", ["abc", [1, "2"], [-1], None, [FakeTokenizer.vocab_size]])
def test_detokenize_refuses_what_is_not_token_ids(tokens):
    with serving() as lv:
        r = post(lv, "/detokenize", {"tokens": tokens})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_version_is_open_and_the_tokenizer_endpoints_need_the_key():
    key = "sk-test-key"
    with serving(security=Security(api_key=key)) as lv:
        v = httpx.get(lv.url + "/version", timeout=5)
        assert v.status_code == 200 and v.json() == {"version": __version__}
        for path, body in [("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [97]})]:
            assert post(lv, path, body).status_code == 401
            assert post(lv, path, body, headers={"authorization": f"Bearer {key}"}).status_code == 200
