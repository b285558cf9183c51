"""vsc search's parts without a server: objectives, the journal, the builtin proposer."""
from __future__ import annotations

import json

import pytest

from vsc.agent.journal import Journal, JournalError, replay
from vsc.agent.objectives import (MIN_NOISE, Objective, better, noise_threshold, objectives_for, pareto_front, score,
                                  slos_met)
from vsc.agent.proposal import Proposal, SearchContext
from vsc.agent.proposers.builtin import CANONICAL_ORDER, BuiltinProposer, Features, moves
from vsc.ir.printer import print_module
from vsc.passes.base import build_pipeline
from vsc.passes.pipeline import parse_pipeline

SLOS = [{"metric": "ttft", "percentile": 90.0, "op": "<=", "value": 0.5},
        {"metric": "throughput", "percentile": None, "op": ">=", "value": 300.0}]


def test_objectives_follow_the_slos_and_their_directions():
    objs = objectives_for({"slos": SLOS})
    assert [(o.name, o.higher_is_better, o.target) for o in objs] == [("ttft_p90", False, 0.5), ("throughput", True, 300.0)]
    only_latency = objectives_for({"slos": SLOS[:1]})
    assert only_latency[-1].name == "output_tok_s" and only_latency[-1].higher_is_better


def test_score_counts_a_halved_latency_like_a_doubled_throughput():
    objs = objectives_for({"slos": SLOS})
    base = {"ttft_p90": 0.4, "throughput": 1000.0}
    assert score(base, base, objs) == pytest.approx(1.0)
    assert score({"ttft_p90": 0.2, "throughput": 1000.0}, base, objs) == pytest.approx(2 ** 0.5)
    assert score({"ttft_p90": 0.4, "throughput": 2000.0}, base, objs) == pytest.approx(2 ** 0.5)
    assert score({"ttft_p90": 0.8, "throughput": 500.0}, base, objs) == pytest.approx(0.5)
    assert score({"ttft_p90": None, "throughput": 1000.0}, base, objs) == 0.0
    assert slos_met({"ttft_p90": 0.6, "throughput": 1000.0}, objs) == 1


def test_incumbent_changes_only_beyond_the_noise_and_slos_come_first():
    inc = {"slos_met": 1, "score": 1.0}
    assert not better({"slos_met": 1, "score": 1.04}, inc, noise=0.05)
    assert better({"slos_met": 1, "score": 1.06}, inc, noise=0.05)
    assert better({"slos_met": 2, "score": 0.5}, inc, noise=0.05)       # meets one more SLO
    assert not better({"slos_met": 0, "score": 9.0}, inc, noise=0.05)
    objs = objectives_for({"slos": SLOS})
    runs = [{"ttft_p90": 0.4, "throughput": 1000.0}, {"ttft_p90": 0.4, "throughput": 1000.0}]
    assert noise_threshold(runs, objs) == MIN_NOISE
    noisy = [{"ttft_p90": 0.4, "throughput": 1000.0}, {"ttft_p90": 0.4, "throughput": 1440.0}]
    assert noise_threshold(noisy, objs) == pytest.approx((1.2 - 1) / 2, rel=1e-6)   # sqrt(1.44) = 1.2


def test_pareto_front_keeps_trade_offs():
    objs = [Objective("ttft_p90", "ttft", 90.0, False), Objective("tput", "throughput", None, True)]
    recs = [{"id": 0, "status": "ok", "objectives": {"ttft_p90": 0.1, "tput": 100.0}},
            {"id": 1, "status": "ok", "objectives": {"ttft_p90": 0.2, "tput": 200.0}},
            {"id": 2, "status": "ok", "objectives": {"ttft_p90": 0.2, "tput": 150.0}},     # dominated by 1
            {"id": 3, "status": "rejected", "objectives": None}]
    assert pareto_front(recs, objs) == [0, 1]


def test_journal_survives_a_torn_last_line_and_rejects_damage(tmp_path):
    j = Journal(tmp_path)
    with pytest.raises(JournalError, match="no journal.jsonl here"):
        j.read()
    j.append({"event": "start", "spec": "x.vs"})
    j.append({"event": "proposed", "id": 0, "parent": None, "proposal": Proposal("a").to_json()})
    j.append({"event": "result", "id": 0, "status": "ok", "pipeline": "a"})
    j.append({"event": "proposed", "id": 1, "parent": 0, "proposal": Proposal("b").to_json()})
    with open(j.path, "a") as f:
        f.write('{"event": "result", "id": 1, "sta')              # kill -9 mid-write
    state = replay(j.read())
    assert [r["id"] for r in state["results"]] == [0]
    assert [p["id"] for p in state["pending"]] == [1]             # evaluated again on resume
    j.append({"event": "result", "id": 1, "status": "ok", "pipeline": "b"})
    assert [r["id"] for r in replay(j.read())["results"]] == [0, 1]   # the torn line was closed first
    lines = j.path.read_text().splitlines()
    j.path.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(JournalError, match=r"journal.jsonl:2: error: not a JSON line"):
        j.read()


def context(module, history=None, incumbent=None) -> SearchContext:
    return SearchContext(spec_path="x.vs", ir_text=print_module(module), pass_catalog=[], objectives=[],
                         history=history or [], incumbent=incumbent)


def with_workload(module, **wl):
    module.deployment["workload"] = {"arrivals": {"kind": "closed", "concurrency": 16},
                                     "prompt_tokens": {"kind": "normal", "params": [96.0, 24.0]},
                                     "output_tokens": {"kind": "fixed", "params": [64.0]}, **wl}
    module.deployment["accuracy"] = {"kind": "greedy_exact", "probes": 4}
    return module


def test_builtin_proposer_is_deterministic_and_follows_the_cost_model(make_module):
    shared = with_workload(make_module(), shared_prefix={"tokens": 512, "share": 0.9})
    start = "fuse-qkv,paged-kv{block=16},continuous-batching{max_batch=16}"
    ctx = context(shared, history=[{"id": 0, "pipeline": start, "status": "ok"}],
                  incumbent={"id": 0, "pipeline": start})
    first = BuiltinProposer().propose(ctx, 3)
    assert [p.pipeline for p in first] == [p.pipeline for p in BuiltinProposer().propose(ctx, 3)]
    assert first[0].pipeline == start + ",prefix-cache{policy=radix}"      # 90% of 608 prompt tokens shared
    # answers that repeat the prompt: prompt-lookup speculation comes first instead
    edit = with_workload(make_module(), kind="code_edit")
    top = BuiltinProposer().propose(context(edit, [{"id": 0, "pipeline": start, "status": "ok"}],
                                            {"id": 0, "pipeline": start}), 1)[0]
    assert "speculative{method=prompt-lookup,k=4}" in top.pipeline
    assert "expected gain" in top.rationale
    # requests that carry their answers: drafting from the predictions comes first
    predicted = with_workload(make_module(), kind="predicted_edit")
    top = BuiltinProposer().propose(context(predicted, [{"id": 0, "pipeline": start, "status": "ok"}],
                                            {"id": 0, "pipeline": start}), 1)[0]
    assert "speculative{method=prediction,k=16}" in top.pipeline
    assert not any("method=prediction" in m[1] and m[0] > 0 for m in moves(start, Features.of(ctx)))


def test_bf16_linear_weights_are_proposed_only_under_a_logits_tolerance(make_module):
    start = "fuse-qkv,paged-kv{block=16},continuous-batching{max_batch=16},pack-linear-weights"
    retune = "retune pack-linear-weights -> pack-linear-weights{dtype=bf16}"
    exact = Features.of(context(with_workload(make_module())))
    assert exact.exact and next(m for m in moves(start, exact) if m[2] == retune)[0] == 0.0
    loose = with_workload(make_module())
    loose.deployment["accuracy"] = {"kind": "logits_tol", "tolerance": 0.5, "probes": 4}
    f = Features.of(context(loose))
    assert not f.exact
    ranked = moves(start, f)
    gain, text, _ = next(m for m in ranked if m[2] == retune)
    assert gain > 0 and text.endswith("pack-linear-weights{dtype=bf16}")
    assert gain >= max(m[0] for m in ranked if m[2].startswith("retune pack-linear-weights") and m[2] != retune)


def test_every_move_is_a_valid_pipeline_in_canonical_order(make_module):
    f = Features.of(context(with_workload(make_module())))
    start = "fuse-qkv,continuous-batching{max_batch=16},intra-op-threads"
    rank = {n: i for i, n in enumerate(CANONICAL_ORDER)}
    all_moves = moves(start, f)
    assert len(all_moves) > 20 and len({m[1] for m in all_moves}) == len(all_moves)
    for gain, text, what in all_moves:
        names = [s.name for s in parse_pipeline(text)] if text else []
        assert names == sorted(names, key=rank.__getitem__), what
        build_pipeline(text)          # options and requirements hold (raises otherwise)
    spec_move = next(m for m in all_moves if m[2] == "add speculative{method=prompt-lookup,k=4}")
    assert "paged-kv{block=16}" in spec_move[1]               # brought along: speculative requires it
    held = moves("paged-kv{block=16},prefix-cache{policy=radix}", f)
    assert not any(m[2] == "remove paged-kv{block=16}" for m in held)     # prefix-cache requires it
    assert any(m[2] == "remove prefix-cache{policy=radix}" for m in held)


def test_builtin_proposer_never_repeats_a_tried_pipeline(make_module):
    m = with_workload(make_module())
    start = "paged-kv{block=16},continuous-batching{max_batch=16}"
    history = [{"id": 0, "pipeline": start, "status": "ok"}]
    proposer = BuiltinProposer()
    seen = {start}
    for i in range(1, 12):
        ctx = context(m, history, {"id": 0, "pipeline": start})
        (p,) = proposer.propose(ctx, 1)
        assert p.pipeline not in seen
        seen.add(p.pipeline)
        history.append({"id": i, "pipeline": p.pipeline, "status": "rejected"})
    assert json.dumps([h["pipeline"] for h in history])      # plain data, journal-ready


def test_a_pass_that_lost_before_is_demoted_not_banned(make_module):
    from vsc.agent.proposers.builtin import failures
    edit = with_workload(make_module(), kind="code_edit")
    start = "paged-kv{block=16},continuous-batching{max_batch=16}"
    spec_k4 = "paged-kv{block=16},continuous-batching{max_batch=16},speculative{method=prompt-lookup,k=4}"
    history = [{"id": 0, "parent": None, "pipeline": start, "status": "ok", "score": 1.0},
               {"id": 1, "parent": 0, "pipeline": spec_k4, "status": "ok", "score": 0.8},
               {"id": 2, "parent": 0, "pipeline": start + ",intra-op-threads", "status": "ok", "score": 1.2}]
    assert failures(history) == {"speculative{method=prompt-lookup,k=4}": 1}
    ctx = context(edit, history, {"id": 2, "pipeline": start + ",intra-op-threads"})
    proposals = BuiltinProposer().propose(ctx, 40)
    texts = [p.pipeline for p in proposals]
    k4 = next(i for i, t in enumerate(texts) if "prompt-lookup,k=4" in t)
    k2 = next(i for i, t in enumerate(texts) if "prompt-lookup,k=2" in t)
    assert k2 < k4          # k=4 lost once: demoted below its untried sibling, still proposed
