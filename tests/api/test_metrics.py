"""/metrics: Prometheus exposition of client-side latencies, token counters and engine gauges."""
from __future__ import annotations


import httpx2 as httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from vsc.runtime.api import Overloaded
from vsc.runtime.http import build_app
from vsc.runtime.metrics import ServerMetrics

from http_fakes import MODEL, FakeEngine, FakeTokenizer, serving, wait_for


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}."""
    r = httpx.get(url + "/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples, name: str, **labels) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def test_metrics_after_requests():
    engine = FakeEngine(delay=0.002, kv_blocks_total=777)
    with serving(engine) as lv:
        before = scrape(lv.url)
        assert value(before, "vsc_time_to_first_token_seconds_count") == 0
        assert value(before, "vsc_generated_tokens_total") == 0
        with lv.client() as c:
            c.completions.create(model=MODEL, prompt="abc", max_tokens=5)                        # 4 prompt tokens
            list(c.completions.create(model=MODEL, prompt="abcd", max_tokens=7, stream=True))    # 5
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        m = scrape(lv.url)
        assert value(m, "vsc_time_to_first_token_seconds_count") == 3
        assert value(m, "vsc_time_to_first_token_seconds_sum") > 0
        assert value(m, "vsc_time_to_first_token_seconds_bucket", le="+Inf") == 3
        assert value(m, "vsc_e2e_request_latency_seconds_count") == 3
        # one inter-token gap per event after the first: 4 + 6 + 2
        assert value(m, "vsc_inter_token_latency_seconds_count") == 12
        assert value(m, "vsc_generated_tokens_total") == 5 + 7 + 3
        chat_prompt = len(FakeTokenizer().apply_chat_template([{"role": "user", "content": "hi"}]))
        assert value(m, "vsc_prompt_tokens_total") == 4 + 5 + chat_prompt
        assert value(m, "vsc_requests_total", finish_reason="length") == 3
        assert value(m, "vsc_kv_blocks_total") == 777
        assert value(m, "vsc_requests_running") == 0 and value(m, "vsc_kv_blocks_used") == 0
        assert value(m, "vsc_requests_waiting") == 0


def test_gauges_are_read_from_the_engine_at_scrape_time():
    engine = FakeEngine(delay=0.005, max_context=100_000)
    with serving(engine) as lv:
        body = {"model": MODEL, "prompt": "x" * 40, "max_tokens": 5000, "stream": True}
        with httpx.Client(timeout=10) as hc, hc.stream("POST", lv.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            rid = orjson.loads(next(lines)[6:])["id"]
            m = scrape(lv.url)
            assert value(m, "vsc_requests_running") == 1
            assert value(m, "vsc_kv_blocks_used") >= 41 / 4            # prompt (BOS + 40) in blocks of 4
        assert wait_for(lambda: rid in engine.aborted and engine.blocks_in_use() == 0)
        m = scrape(lv.url)
        assert value(m, "vsc_requests_running") == 0 and value(m, "vsc_kv_blocks_used") == 0
        assert value(m, "vsc_requests_total", finish_reason="abort") == 1
        assert value(m, "vsc_generated_tokens_total") >= 1


def test_each_server_metrics_has_its_own_registry():
    a, b = ServerMetrics(), ServerMetrics()            # would raise "Duplicated timeseries" on a shared registry
    build_app(FakeEngine(), FakeTokenizer(), a, MODEL)
    a.request_finished("stop", 10, 4, 0.05)
    a.ttft.observe(0.01)
    body_a, ctype = a.render()
    body_b, _ = b.render()
    fam_a = {f.name: f for f in text_string_to_metric_families(body_a.decode())}
    fam_b = {f.name: f for f in text_string_to_metric_families(body_b.decode())}
    assert ctype.startswith("text/plain")
    assert [s.value for s in fam_a["vsc_generated_tokens"].samples if s.name.endswith("_total")] == [4]
    assert [s.value for s in fam_b["vsc_generated_tokens"].samples if s.name.endswith("_total")] == [0]
    assert fam_a["vsc_kv_blocks_total"].samples[0].value == 1024        # from the bound engine's stats()
    assert fam_b["vsc_kv_blocks_total"].samples[0].value == 0           # no engine bound: zeros


def test_a_failing_stats_call_does_not_break_the_scrape():
    class Broken:
        def stats(self):
            raise RuntimeError("stats exploded")

    m = ServerMetrics()
    m.bind_engine(Broken())
    body, _ = m.render()
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "vsc_time_to_first_token_seconds" in names and "vsc_requests_running" in names


class _SheddingEngine(FakeEngine):
    """Refuses every request as predicted to miss the TTFT objective (overload = shed)."""

    async def generate(self, request):
        raise Overloaded("the server is overloaded: first token predicted in 9000 ms", retry_after=9)
        yield  # an async generator, like the real engine's


def test_refused_requests_are_counted_by_reason_with_retry_after():
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    with serving(_SheddingEngine()) as lv:
        assert value(scrape(lv.url), "vsc_requests_rejected_total", reason="ttft_slo") == 0
        for _ in range(3):
            r = httpx.post(lv.url + "/v1/completions", json=body, timeout=10)
            assert r.status_code == 429 and r.headers["retry-after"] == "9"
            assert r.json()["error"]["code"] == "rate_limit_exceeded" and "overloaded" in r.json()["error"]["message"]
        m = scrape(lv.url)
        assert value(m, "vsc_requests_rejected_total", reason="ttft_slo") == 3
        assert value(m, "vsc_requests_rejected_total", reason="queue_full") == 0
        assert value(m, "vsc_time_to_first_token_seconds_count") == 0     # no first token was served
    with serving(FakeEngine(capacity=0)) as lv:
        r = httpx.post(lv.url + "/v1/completions", json=body, timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert value(scrape(lv.url), "vsc_requests_rejected_total", reason="queue_full") == 1


class _PrecheckingEngine(FakeEngine):
    """overload = shed, refusing at the cheap check before the prompt is tokenized."""

    def check_overload(self) -> None:
        raise Overloaded("the server is overloaded: first token predicted in 900 ms", retry_after=2)


def test_a_refusal_before_tokenizing_is_a_429_too():
    engine = _PrecheckingEngine()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with serving(engine) as lv:
        r = httpx.post(lv.url + "/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        bad = httpx.post(lv.url + "/v1/chat/completions", json={**body, "max_tokens": 0}, timeout=10)
        assert bad.status_code == 400        # a malformed request is still told what is wrong with it
        assert value(scrape(lv.url), "vsc_requests_rejected_total", reason="ttft_slo") == 1
    assert engine.requests == {}             # the engine never saw either
