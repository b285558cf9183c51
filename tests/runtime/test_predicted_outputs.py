"""Predicted outputs (OpenAI's `prediction`): a request's own expected answer drafts it.

The alignment follows the output through the prediction and finds its place again after an
edit; the engine's output is exactly plain decoding's — greedy and seeded sampling — with an
exact prediction, an edited one and a useless one, on a plan without speculation and beside
n-gram drafting; the final event counts accepted and rejected prediction tokens."""
from __future__ import annotations

import random

import pytest

from test_speculative import ALPHABET, prompts, reference, req, run_all, seq, tokens_of
from vsc.runtime.speculative import (
    PREDICTION_K, PREDICTION_K_FIRST, PredictionProposer, SpecGate, make_proposer, prediction_proposer,
)


def drafting(prompt, prediction, k=PREDICTION_K, max_tokens=64):
    s = seq("p", prompt, max_tokens=max_tokens, prediction=list(prediction))
    return s, PredictionProposer(k)


def test_an_exact_prediction_is_drafted_in_runs_that_grow_while_accepted():
    pred = list(range(200, 260))
    s, p = drafting([5, 6], pred)
    s.token_ids.append(200)                               # the prefill step's token
    d = p.propose(s, 99)
    assert d == pred[1:1 + PREDICTION_K_FIRST]
    s.token_ids += d + [pred[1 + len(d)]]                 # all accepted, then the bonus token
    p.accepted(s, len(d), len(d))
    d2 = p.propose(s, 99)
    start = 2 + PREDICTION_K_FIRST
    assert d2 == pred[start:start + min(PREDICTION_K, 2 * PREDICTION_K_FIRST)]
    assert p.propose(s, 3) == pred[start:start + 3]       # the step's limit cuts the run


def test_after_an_edit_the_output_finds_its_place_again_and_runs_shrink():
    pred = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]
    s, p = drafting([1], pred)
    s.token_ids += [10, 11, 12, 99, 98]                   # an edit replaced 13 and 14
    assert p.propose(s, 8) == []                          # lost: nothing to draft
    p.accepted(s, 4, 1)
    assert p._state(s).k == max(2, PREDICTION_K_FIRST // 2)
    s.token_ids += [15]                                   # back in step (the tail 15 occurs once)
    assert p.propose(s, 3) == [16, 17, 18]
    s.token_ids += [16, 17, 18, 55, 19]                   # an insertion, then the prediction again
    assert p.propose(s, 2) == [20, 21]


def test_a_repeated_tail_resyncs_at_the_nearest_occurrence_after_the_last_known_place():
    pred = [7, 8, 1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6]
    s, p = drafting([0], pred)
    s.token_ids += [7, 8, 1, 2, 3, 9, 9, 0, 2, 3]         # in step through position 7, then "0 2 3"
    assert p.propose(s, 2) == [4, 5]                      # "2 3" after the anchor (7): ends at 10


def test_method_prediction_drafts_nothing_but_predictions():
    assert make_proposer("prediction", 8) is None
    assert prediction_proposer("prediction", 32).k == 32
    assert prediction_proposer("none", 0).k == PREDICTION_K
    with pytest.raises(ValueError, match="k >= 1"):
        PredictionProposer(0)


def edited(out, rng):
    """`out` with a few edits: tokens replaced, inserted and deleted."""
    out = list(out)
    for _ in range(3):
        i = rng.randrange(len(out))
        what = rng.random()
        if what < 0.4:
            out[i] = rng.choice(ALPHABET)
        elif what < 0.7:
            out.insert(i, rng.choice(ALPHABET))
        else:
            del out[i]
    return out


@pytest.mark.parametrize("method", ["none", "ngram", "prediction"])
def test_greedy_output_is_plain_decodings_with_exact_edited_and_useless_predictions(engines, method):
    rng = random.Random(5)
    engine = engines(method, k=4 if method != "none" else 0, max_batch=8, spec_rows=0)    # no row cap
    ps = prompts(9)
    outs = [reference(p, 40) for p in ps]
    preds = []
    for i, out in enumerate(outs):
        kind = i % 3
        preds.append(out if kind == 0 else edited(out, rng) if kind == 1 else [rng.choice(ALPHABET) for _ in range(30)])
    reqs = [req(f"r{i}", p, max_tokens=40, prediction=pred) for i, (p, pred) in enumerate(zip(ps, preds))]
    reqs.append(req("plain", ps[0], max_tokens=40))       # no prediction, same batch
    results = run_all(engine, reqs)
    for out, events in zip(outs + [outs[0]], results):
        assert tokens_of(events) == out
    finals = [events[-1] for events in results]
    exact = finals[0::3][:3]
    assert all(f.accepted_prediction_tokens >= 30 for f in exact), exact    # most of an exact prediction is taken
    assert sum(f.rejected_prediction_tokens for f in finals[1:9:3]) > 0     # edits cost rejected drafts
    assert finals[-1].accepted_prediction_tokens == finals[-1].rejected_prediction_tokens == 0
    s = engine.stats()
    assert s["spec_accepted_tokens"] >= sum(f.accepted_prediction_tokens for f in finals[:-1])
    assert max(len(e.token_ids) for e in results[0]) > 4                   # long runs from one step
    assert s["kv_blocks_used"] == 0
    engine.block_manager.check()


def test_seeded_sampling_is_identical_with_a_prediction(engines):
    ps = prompts(6)
    params = dict(temperature=0.8, top_k=10, max_tokens=32)
    plain = run_all(engines("none"), [req(f"r{i}", p, seed=7 + i, **params) for i, p in enumerate(ps)])
    outs = [tokens_of(e) for e in plain]
    with_pred = run_all(engines("none"), [req(f"r{i}", p, seed=7 + i, prediction=out, **params)
                                          for i, (p, out) in enumerate(zip(ps, outs))])
    assert [tokens_of(e) for e in with_pred] == outs
    assert sum(e[-1].accepted_prediction_tokens for e in with_pred) > 0


def test_a_prediction_outside_the_vocabulary_is_refused(engines):
    from vsc.runtime.api import InvalidRequest
    engine = engines("none")
    with pytest.raises(InvalidRequest, match="prediction token ids"):
        run_all(engine, [req("x", [100, 101], prediction=[5, 10 ** 6])])


def test_guessed_drafts_fill_a_step_only_up_to_spec_rows(engines):
    """On a CPU a step costs about the same up to ~16 rows: guessed drafts (predictions, n-grams)
    fill it to `spec_rows`, shared among the decoding sequences; outputs are unchanged."""
    ps = prompts(6)
    outs = [reference(p, 40) for p in ps]
    reqs = [req(f"r{i}", p, max_tokens=40, prediction=out) for i, (p, out) in enumerate(zip(ps, outs))]
    for cap in (8, 12):
        engine = engines("none", max_batch=8, spec_rows=cap)
        seen = []
        real = engine._run_spec_step

        def spy(step, real=real):
            seen.append(len(step.seqs) + sum(step.num_drafts))
            return real(step)
        engine._run_spec_step = spy
        results = run_all(engine, reqs)
        assert [tokens_of(e) for e in results] == outs
        assert seen and max(seen) <= cap, (cap, seen)
    alone = engines("none", max_batch=8, spec_rows=12)
    (events,) = run_all(alone, reqs[:1])
    assert tokens_of(events) == outs[0] and max(len(e.token_ids) for e in events) == 12    # 11 drafts + 1


def test_the_gate_keeps_drafting_only_while_it_measures_faster_and_probes_the_other_way():
    gate = SpecGate()
    assert gate.drafting()                                # nothing measured: draft
    gate.observe(True, 30, 1.0)                           # 30 tokens/s with drafts
    assert gate.drafting()                                # no plain step measured yet
    gate.observe(False, 40, 1.0)                          # 40 tokens/s plain: drafting loses
    decisions = [gate.drafting() for _ in range(2 * SpecGate.PROBE_EVERY)]
    assert decisions.count(True) == 2                     # one probe step per PROBE_EVERY
    for _ in range(10):
        gate.observe(True, 80, 1.0)                       # the probes measure drafts faster now
    assert gate.draft_rate > gate.plain_rate
    decisions = [gate.drafting() for _ in range(2 * SpecGate.PROBE_EVERY)]
    assert decisions.count(False) == 2                    # drafting, with a plain probe now and then
    gate.observe(True, 0, 1.0)
    gate.observe(False, 5, 0.0)                           # nothing to learn from empty or instant steps
    assert gate.draft_rate > gate.plain_rate


def test_a_gate_that_says_no_leaves_plain_decoding(engines):
    ps = prompts(4)
    outs = [reference(p, 30) for p in ps]
    engine = engines("ngram", k=4, max_batch=8, spec_gate=True)
    engine.spec_gate.drafting = lambda: False
    results = run_all(engine, [req(f"r{i}", p, max_tokens=30, prediction=out) for i, (p, out) in enumerate(zip(ps, outs))])
    assert [tokens_of(e) for e in results] == outs
    assert engine.stats()["spec_draft_tokens"] == 0
