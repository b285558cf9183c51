"""The load client against live fake servers on loopback: closed and open loop, failures,
the deadline, the per-request timeout, what it sends, and its refusal of other hosts."""
from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from vsc.bench.loadgen import LoadgenError, check_loopback, request_body, run
from vsc.bench.metrics import summarize
from vsc.bench.workloads import BenchRequest, LengthDist, Workload, build_workload, closed, poisson
from vsc.runtime.serve import start_in_thread, stop_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))
from http_fakes import MODEL, FakeEngine, expected, serving  # noqa: E402


def workload(prompts: list[str], max_tokens: int, arrival, offsets=None, extra=None) -> Workload:
    reqs = [BenchRequest(p, len(p), max_tokens, dict(extra or {})) for p in prompts]
    return Workload("test", reqs, arrival, 0, arrival_times=offsets)


def in_flight_max(records) -> int:
    events = sorted([(r.send_time, 1) for r in records] + [(r.end_time, -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def test_closed_loop_against_the_vsc_http_app():
    engine = FakeEngine(delay=0.003)
    with serving(engine) as live:
        res = run(workload([f"hello {i}" for i in range(9)], 12, closed(3)), live.url, deadline=30)
    assert res.model == MODEL and len(res.records) == 9 and not res.deadline_hit
    for rec in res.records:
        assert rec.success and rec.error is None and rec.status == 200
        assert rec.text == expected(12) and rec.completion_tokens == 12 and rec.finish_reason == "length"
        assert rec.send_time < rec.chunk_times[0] <= rec.chunk_times[-1] <= rec.end_time
    assert [r.index for r in res.records] == list(range(9))
    assert in_flight_max(res.records) <= 3
    sent = list(engine.requests.values())
    assert len(sent) == 9
    assert all(r.params.temperature == 0 and r.params.ignore_eos and r.params.max_tokens == 12 for r in sent)
    s = summarize(res)
    assert s.completed == 9 and s.failed == 0 and s.total_output_tokens == 9 * 12
    assert s.output_token_source == "usage"
    assert s.ttft.n == 9 and s.tpot.mean > 0 and s.itl.n > 0


def test_open_loop_follows_the_arrival_times_and_stops_at_duration():
    offsets = [0.0, 0.05, 0.1, 0.3, 0.35, 5.0, 6.0]       # the last two fall after the 1 s duration
    s = Scripted(chunks=3, wait_for=5)
    with scripted(s) as url:
        # the first request ends only once the server holds all five: the others were sent on
        # schedule, not after it (a closed loop would time it out); a 4.5 s deadline is hit if
        # the run waits for the 5 s arrival it must not send
        res = run(workload(["WAIT first"] + [f"p{i}" for i in range(1, 7)], 4, poisson(10.0), offsets), url,
                  duration=1.0, deadline=4.5, request_timeout=30)
    assert len(res.records) == 5 and len(s.bodies) == 5 and not res.deadline_hit
    for rec in res.records:
        assert rec.success and rec.scheduled_time == offsets[rec.index]
        assert rec.send_time >= offsets[rec.index] - 0.005          # never before its arrival time
    assert [r.index for r in sorted(res.records, key=lambda r: r.send_time)] == list(range(5))
    assert res.records[0].end_time > max(r.send_time for r in res.records[1:])


def test_failures_are_recorded_and_counted():
    with serving(FakeEngine(delay=0.001)) as live:
        res = run(workload(["fine", "BOOM now", "FAIL later", "fine too"], 6, closed(2)), live.url, deadline=30)
    by = {r.index: r for r in res.records}
    assert by[0].success and by[3].success
    assert not by[1].success and by[1].error.startswith("HTTP 500")
    assert not by[2].success and by[2].error.startswith("stream error")
    s = summarize(res)
    assert (s.completed, s.failed) == (2, 2) and sum(s.errors.values()) == 2
    assert s.total_output_tokens == 12


def test_a_real_workload_from_the_tiny_tokenizer(tmp_path):
    from vsc.models.tiny import make_tiny

    model = make_tiny(tmp_path / "tiny", arch="llama")
    w = build_workload("json", model, 6, seed=0, arrival=poisson(40.0), prompt_tokens=LengthDist("fixed", (80,)),
                       output_tokens=LengthDist("fixed", (5,)))
    with serving(FakeEngine(max_context=4096, delay=0.001)) as live:
        res = run(w, live.url, deadline=30)
    assert all(r.success and r.completion_tokens == 5 for r in res.records)
    assert res.workload_fingerprint == w.fingerprint()


# --------------------------------------------------------------------------- a bare-bones SSE server

class Scripted:
    """/v1/completions that streams `chunks` text chunks `gap` s apart, no usage; records bodies.

    A prompt containing "HANG" sends one chunk and then nothing for 60 s; one containing "WAIT"
    sends one chunk, then the rest once `wait_for` requests have arrived (at most 60 s later).
    """

    def __init__(self, chunks: int = 5, gap: float = 0.01, wait_for: int = 0):
        self.chunks, self.gap, self.wait_for, self.bodies = chunks, gap, wait_for, []

    async def _pause(self, prompt: str) -> None:
        if "HANG" in prompt:
            await asyncio.sleep(60)
        elif "WAIT" in prompt:
            for _ in range(6000):
                if len(self.bodies) >= self.wait_for:
                    break
                await asyncio.sleep(0.01)
        else:
            await asyncio.sleep(self.gap)

    def app(self) -> Starlette:
        async def models(request: Request):
            return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

        async def completions(request: Request):
            body = await request.json()
            self.bodies.append(body)

            async def events():
                for i in range(self.chunks):
                    yield "data: " + json.dumps({"choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}]}) \
                        + "\n\n"
                    await self._pause(body["prompt"])
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])


@contextlib.contextmanager
def scripted(s: Scripted):
    server, thread, port = start_in_thread(s.app(), timeout=10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(server, thread, timeout=5)


def test_without_usage_tokens_are_counted_from_chunks_and_the_body_is_as_asked():
    s = Scripted(chunks=5)
    schema = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}
    with scripted(s) as url:
        res = run(workload(["a", "b"], 7, closed(1), extra=schema), url, deadline=20)
        run(workload(["c"], 7, closed(1), extra=schema), url, deadline=20, send_extra=False, ignore_eos=False)
    assert all(r.success and r.completion_tokens is None and len(r.chunk_times) == 5 for r in res.records)
    summary = summarize(res)
    assert summary.output_token_source == "chunks" and summary.total_output_tokens == 10
    first, last = s.bodies[0], s.bodies[-1]
    assert first["model"] == "scripted" and first["stream"] is True and first["temperature"] == 0
    # a schema-constrained request ends with its document: no ignore_eos, which would write past it
    assert first["max_tokens"] == 7 and "ignore_eos" not in first
    assert first["stream_options"] == {"include_usage": True} and first["response_format"] == schema["response_format"]
    assert "response_format" not in last and "ignore_eos" not in last
    assert request_body(workload(["d"], 3, closed(1), extra=schema).requests[0], "m", True, False)["ignore_eos"] is True
    # an edit carrying its prediction ends with the edited file too
    predicted = workload(["e"], 3, closed(1), extra={"prediction": {"type": "content", "content": "x"}}).requests[0]
    assert "ignore_eos" not in request_body(predicted, "m", True, True)


def test_the_deadline_is_honoured():
    with scripted(Scripted(chunks=3)) as url:
        res = run(workload(["ok", "HANG", "HANG too", "after ok", "HANG again", "not sent"], 3, closed(3)), url,
                  deadline=1.0,
                  request_timeout=60)
    assert res.deadline_hit          # the hanging requests end as "deadline", not at their 60 s timeout
    by = {r.index: r for r in res.records}
    assert by[0].success
    assert not by[1].success and by[1].error.startswith("deadline")
    assert not by[2].success and by[2].error.startswith("deadline")
    assert by[3].success                       # its worker was free again after "ok"
    assert not by[4].success and by[4].error.startswith("deadline")
    assert 5 not in by                         # every worker was stuck when the deadline came
    s = summarize(res)
    assert (s.completed, s.failed) == (2, 3) and s.deadline_hit and s.offered == 6


def test_the_per_request_timeout():
    with scripted(Scripted(chunks=3)) as url:
        res = run(workload(["HANG"], 3, closed(1)), url, deadline=30, request_timeout=0.5)
    rec = res.records[0]
    assert not rec.success and rec.error.startswith("timeout") and len(rec.chunk_times) == 1
    assert not res.deadline_hit


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000",
                                 "http://192.168.1.2", "ftp://127.0.0.1/", "http://[2001:db8::1]:80", "127.0.0.1:80"])
def test_refuses_targets_off_this_machine(url):
    with pytest.raises(LoadgenError):
        check_loopback(url)
    with pytest.raises(LoadgenError):
        run(workload(["x"], 1, closed(1)), url, deadline=5)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/", "http://127.3.2.1:1", "http://localhost:9", "http://[::1]:80"])
def test_accepts_loopback_targets(url):
    assert check_loopback(url) == url.rstrip("/")
