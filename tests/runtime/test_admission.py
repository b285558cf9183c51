"""Admission by the TTFT objective (overload = shed): the TTFT predictor (the engine's use of it
is tested in test_engine.py)."""
from __future__ import annotations

import pytest

from vsc.runtime.admission import TTFTPredictor, retry_after_s
from vsc.runtime.api import GenerateRequest, SamplingParams
from vsc.runtime.sequence import Sequence



def seq(rid: str, prompt_len: int, max_tokens: int, computed: int = 0, generated: int = 0) -> Sequence:
    """A sequence with `computed` prompt tokens prefilled, or `generated` tokens decoded (then
    all but its last token are computed, as after a step)."""
    s = Sequence(GenerateRequest(rid, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens)))
    s.token_ids += [5] * generated
    s.num_computed = s.num_tokens - 1 if generated else computed
    return s


def measured(step_s: float, prefill_tps: float) -> TTFTPredictor:
    p = TTFTPredictor()
    p.step_s, p.prefill_tps = step_s, prefill_tps
    return p


def test_no_prediction_before_the_steps_are_measured():
    p = TTFTPredictor()
    assert p.predict([], [], 10, max_batch=4) is None
    p.observe_step(0, 0.1)                 # a decode step: prefill speed still unknown
    assert p.predict([], [], 10, max_batch=4) is None
    p.observe_step(40, 0.2)
    assert p.predict([], [], 10, max_batch=4) == pytest.approx(10 / 200)


def test_prediction_counts_prompts_ahead_and_free_rows():
    p = measured(step_s=0.05, prefill_tps=1000)
    running = [seq("r0", 100, 50, computed=40)]              # 60 prompt tokens left to prefill
    waiting = [seq("w0", 30, 8), seq("w1", 70, 8)]
    # rows to spare: only prefill ahead of it counts
    assert p.predict(running, waiting, 20, max_batch=4) == pytest.approx((60 + 30 + 70 + 20) / 1000)
    # shortest-first: the longer waiting prompt is scheduled after it
    assert p.predict(running, waiting, 50, max_batch=4, shortest_first=True) == pytest.approx((60 + 30 + 50) / 1000)


def test_a_full_batch_adds_the_steps_until_a_row_frees():
    p = measured(step_s=0.05, prefill_tps=1000)
    running = [seq("r0", 10, 30, generated=10), seq("r1", 10, 50, generated=5)]
    # r0 frees its row after 20 more tokens, r1 after 45; w0 takes r0's row for 8 tokens (until 28)
    waiting = [seq("w0", 10, 8)]
    got = p.predict(running, waiting, 10, max_batch=2)
    assert got == pytest.approx(28 * 0.05 + (10 + 10) / 1000)
    # once finished requests measured shorter outputs, rows are expected to free sooner
    p.output_tokens = 12.0
    got = p.predict(running, waiting, 10, max_batch=2)
    # r0 has 12 - 10 left, then w0 holds that row until 2 + 8; r1 (12 - 5 left) frees first
    assert got == pytest.approx(7 * 0.05 + (10 + 10) / 1000)


def test_more_work_ahead_predicts_later():
    p = measured(step_s=0.02, prefill_tps=500)
    running = [seq(f"r{i}", 20, 64, generated=1) for i in range(4)]
    times = [p.predict(running, [seq(f"w{i}", 20, 64) for i in range(n)], 20, max_batch=4) for n in range(0, 40, 8)]
    assert times == sorted(times) and times[-1] > times[0]


def test_retry_after_is_whole_seconds_at_least_one():
    assert retry_after_s(0.25, 0.2) == 1
    assert retry_after_s(12.3, 0.2) == 13
