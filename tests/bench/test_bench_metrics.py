"""Serving metrics on hand-made timelines, checked against values worked out by hand."""
from __future__ import annotations

import json

import pytest

from vsc.bench.loadgen import RequestRecord, RunResult
from vsc.bench.metrics import (BenchSummary, LatencyStats, check_slos, format_slos, format_table,
                               goodput_slos_from_plan, request_metrics, summarize)


def rec(i, send, chunks, end, usage=None, success=True, error=None, prompt=10, max_tokens=8) -> RequestRecord:
    return RequestRecord(i, prompt, max_tokens, send, list(chunks), "x" * len(chunks), end, usage, "length",
                         success, error, 200 if success else 500)


def run_of(records, duration, engine="vsc") -> RunResult:
    return RunResult(engine, "http://127.0.0.1:1", "m", "chat", "closed(2)", records, duration, offered=len(records))


# Three successful requests and one failure, over 2.0 s:
#   A: send 0.0, chunks 0.1 0.2 0.4 0.5, end 0.5, usage 4 -> ttft 0.1, e2e 0.5, tpot 0.4/3, itl .1 .2 .1
#   B: send 0.5, chunks 0.7 1.0 1.3,     end 1.3, usage 6 -> ttft 0.2, e2e 0.8, tpot 0.6/5, itl .3 .3
#   C: send 1.0, chunk  1.3,             end 1.4, usage 1 -> ttft 0.3, e2e 0.4, no tpot, no itl
#   D: failed (HTTP 500)
RECORDS = [rec(0, 0.0, [0.1, 0.2, 0.4, 0.5], 0.5, 4, prompt=10),
           rec(1, 0.5, [0.7, 1.0, 1.3], 1.3, 6, prompt=20),
           rec(2, 1.0, [1.3], 1.4, 1, prompt=30),
           rec(3, 1.1, [], 1.2, None, success=False, error="HTTP 500: boom", prompt=40)]


def test_one_request():
    m = request_metrics(RECORDS[0])
    assert m.ttft == pytest.approx(0.1) and m.e2e == pytest.approx(0.5)
    assert m.tpot == pytest.approx(0.4 / 3)
    assert m.itls == pytest.approx([0.1, 0.2, 0.1])
    assert m.output_tokens == 4 and m.tokens_from_usage
    assert request_metrics(RECORDS[2]).tpot is None
    assert request_metrics(RECORDS[3]) is None


def test_summary_against_hand_values():
    s = summarize(run_of(RECORDS, 2.0))
    assert (s.completed, s.failed) == (3, 1)
    assert s.errors == {"HTTP 500: boom": 1}
    assert s.total_input_tokens == 60 and s.total_output_tokens == 11     # failed requests count nothing
    assert s.request_throughput == pytest.approx(1.5)
    assert s.output_throughput == pytest.approx(5.5)
    assert s.total_token_throughput == pytest.approx(35.5)
    # TTFT 0.1 0.2 0.3: numpy linear percentiles -> p90 = 0.2 + 0.8 * 0.1, p99 = 0.2 + 0.98 * 0.1
    assert (s.ttft.mean, s.ttft.median, s.ttft.p50) == pytest.approx((0.2, 0.2, 0.2))
    assert (s.ttft.p90, s.ttft.p99) == pytest.approx((0.28, 0.298))
    # TPOT: A 0.4/3 = 0.1333, B 0.6/5 = 0.12; C has one token and no TPOT
    assert s.tpot.n == 2 and s.tpot.mean == pytest.approx((0.4 / 3 + 0.12) / 2)
    assert s.tpot.p99 == pytest.approx(0.12 + 0.99 * (0.4 / 3 - 0.12))
    # ITL pooled: .1 .2 .1 .3 .3 -> sorted .1 .1 .2 .3 .3, median .2, p90 = .3
    assert s.itl.n == 5 and s.itl.median == pytest.approx(0.2) and s.itl.mean == pytest.approx(0.2)
    assert s.itl.p90 == pytest.approx(0.3)
    # E2E 0.5 0.8 0.4
    assert s.e2e.mean == pytest.approx(1.7 / 3) and s.e2e.median == pytest.approx(0.5) and s.e2e.max == 0.8
    assert s.goodput is None and s.output_token_source == "usage"
    assert sorted(s.samples["ttft"]) == pytest.approx([0.1, 0.2, 0.3])


def test_goodput_counts_requests_meeting_every_slo():
    run = run_of(RECORDS, 2.0)
    # ttft <= 0.25 keeps A, B; tpot <= 0.125 drops A (0.133), keeps B (0.12) and C (no TPOT: met, as in vLLM)
    s = summarize(run, {"ttft": 0.25, "tpot": 0.125})
    assert s.good_requests == 1 and s.goodput == pytest.approx(0.5)
    s = summarize(run, {"tpot": 0.125})
    assert s.good_requests == 2
    s = summarize(run, {"e2e": 0.45})
    assert s.good_requests == 1                                             # only C (0.4)
    with pytest.raises(ValueError):
        summarize(run, {"itl": 0.1})


def test_output_tokens_fall_back_to_chunks():
    records = [rec(0, 0.0, [0.1, 0.2, 0.3], 0.3, None), rec(1, 0.0, [0.1, 0.4], 0.4, 5)]
    s = summarize(run_of(records, 1.0))
    assert s.output_token_source == "mixed" and s.total_output_tokens == 3 + 5
    s = summarize(run_of(records[:1], 1.0))
    assert s.output_token_source == "chunks"
    assert s.tpot.mean == pytest.approx((0.3 - 0.1) / 2)


def test_no_successes_no_crash():
    s = summarize(run_of([RECORDS[3]], 1.0))
    assert s.completed == 0 and s.ttft == LatencyStats() and s.output_throughput == 0.0
    assert "-" in format_table({"vsc": s})


PLAN_SLOS = [{"metric": "ttft", "percentile": 99.0, "op": "<=", "value": 0.2},
             {"metric": "tpot", "percentile": 50.0, "op": "<=", "value": 0.025},
             {"metric": "itl", "percentile": 99.0, "op": "<=", "value": 0.05},
             {"metric": "e2e", "percentile": 90.0, "op": "<=", "value": 4.0},
             {"metric": "ttft", "percentile": 50.0, "op": "<=", "value": 0.1},
             {"metric": "throughput", "percentile": None, "op": ">=", "value": 5.0}]


def test_plan_slos():
    assert goodput_slos_from_plan(PLAN_SLOS) == {"ttft": 0.1, "tpot": 0.025, "e2e": 4.0}
    s = summarize(run_of(RECORDS, 2.0), plan_slos=PLAN_SLOS)
    got = {(r.metric, r.percentile): (r.measured, r.met) for r in s.slo_results}
    assert got[("ttft", 99.0)] == (pytest.approx(0.298), False)
    assert got[("ttft", 50.0)] == (pytest.approx(0.2), False)
    assert got[("tpot", 50.0)][1] is False
    assert got[("itl", 99.0)] == (pytest.approx(0.3), False)
    assert got[("e2e", 90.0)] == (pytest.approx(0.5 + 0.8 * 0.3), True)
    assert got[("throughput", None)] == (pytest.approx(5.5), True)
    text = format_slos(s)
    assert "throughput >= 5 tok/s: 5.5 tok/s  met" in text and "ttft p99 <= 200 ms: 298.0 ms  MISSED" in text
    assert check_slos(s, [{"metric": "e2e", "percentile": 50.0, "op": "<=", "value": 0.5}])[0].met


def test_json_round_trip():
    s = summarize(run_of(RECORDS, 2.0), {"ttft": 0.25}, PLAN_SLOS)
    text = s.to_json()
    back = BenchSummary.from_json(text)
    assert back == s
    assert "samples" not in json.loads(s.to_json(samples=False))
    d = json.loads(text)
    d["from_a_newer_version"] = 1
    assert BenchSummary.from_dict(d) == s


def test_table_puts_engines_side_by_side_with_ratios():
    fast = summarize(run_of(RECORDS, 2.0))
    slow = summarize(run_of(RECORDS, 4.0, engine="vllm"))      # same requests, twice the duration
    table = format_table({"vsc": fast, "vllm": slow})
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split() == ["metric", "vsc", "vllm", "vllm/vsc"]
    row = next(line for line in lines if line.startswith("request throughput"))
    assert row.split()[-3:] == ["1.50", "0.75", "0.50x"]
    row = next(line for line in lines if line.startswith("TTFT median"))
    assert row.split()[-3:] == ["200.00", "200.00", "1.00x"]
    assert "/" not in format_table({"vllm": slow}, reference="vsc").splitlines()[1]


def test_table_notes_chunk_counted_tokens():
    s = summarize(run_of([rec(0, 0.0, [0.1, 0.2], 0.2, None)], 1.0, engine="peer"))
    assert "peer (chunks)" in format_table({"peer": s})
