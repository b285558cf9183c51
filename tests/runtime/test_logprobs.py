"""Logprobs in the engine: each sampled token's and each prompt token's log-probability is the
log-softmax of the raw model logits of its position (before temperature and sampling), also
when the prompt is prefilled in chunks, shares a step with speculative verify rows, or sits in
the prefix cache (a request that asks for prompt logprobs computes its prompt anyway)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from test_speculative import ALPHABET, reference, req, run_all, tokens_of, toy_logits

from vsc.runtime.logprobs import token_logprobs


def log_softmax(context) -> torch.Tensor:
    return torch.log_softmax(toy_logits(tuple(context)), dim=-1)


def check(lp, context, token, k):
    want = log_softmax(context)
    assert lp.token_id == token
    assert lp.logprob == pytest.approx(float(want[token]), abs=1e-5)
    assert lp.rank == int((want > want[token]).sum()) + 1
    top = want.topk(k)
    assert [t for t, _ in lp.top] == top.indices.tolist()
    assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_token_logprobs_ranks_and_top_k_per_row():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 3.0, 0.0, 1.0]])
    a, b = token_logprobs(logits, [2, 3], [2, 0])
    want = torch.log_softmax(logits, dim=-1)
    assert (a.token_id, a.rank, b.rank) == (2, 2, 3)
    assert a.logprob == pytest.approx(float(want[0, 2])) and b.logprob == pytest.approx(float(want[1, 3]))
    assert [t for t, _ in a.top] == [1, 2] and b.top == []


def test_prompt_and_sampled_logprobs_with_chunks_drafts_and_the_prefix_cache(engines):
    engine = engines("ngram", k=3, max_batch=8, chunked_prefill=5, prefix_cache="radix")
    shared = [ALPHABET[(7 * i) % len(ALPHABET)] for i in range(13)]
    warm = [req(f"warm{i}", shared + [ALPHABET[i]], max_tokens=20) for i in range(2)]
    run_all(engine, warm)                       # the shared prefix is now cached
    hits = engine.stats()["prefix_hit_tokens"]
    prompts = [shared + [ALPHABET[5], ALPHABET[9]], shared[:6] + [ALPHABET[3]] * 4, shared + [ALPHABET[1]]]
    scored = [req(f"s{i}", p, max_tokens=12, logprobs=3, prompt_logprobs=2) for i, p in enumerate(prompts)]
    drafted = [req(f"d{i}", [ALPHABET[i + 20]] * 3, max_tokens=60) for i in range(3)]

    async def main():    # the drafted requests decode (verify rows) while the scored ones prefill
        streams = [engine.generate(r) for r in drafted]
        firsts = [await s.__anext__() for s in streams]

        async def rest(first, s):
            return [first] + [e async for e in s]

        async def whole(r):
            return [e async for e in engine.generate(r)]
        return await asyncio.wait_for(asyncio.gather(*(whole(r) for r in scored),
                                                     *(rest(f, s) for f, s in zip(firsts, streams))), 60)
    steps = []
    build = engine.scheduler._build

    def spy(seqs, num_new):
        step = build(seqs, num_new)
        steps.append((bool(step.prompt_rows), bool(step.num_drafts)))
        return step
    engine.scheduler._build = spy
    results = asyncio.run(main())
    assert (True, True) in steps          # a step carried prompt rows and drafts together
    for r, events in zip(scored + drafted, results):
        assert tokens_of(events) == reference(r.prompt_ids, r.params.max_tokens)
    assert engine.stats()["prefix_hit_tokens"] == hits       # the scored prompts computed their cached blocks
    assert engine.stats()["spec_accepted_tokens"] > 0
    for r, events in zip(scored, results):
        p = r.prompt_ids
        plps = events[0].prompt_logprobs
        assert len(plps) == len(p) and plps[0] is None
        for i in range(1, len(p)):
            check(plps[i], p[:i], p[i], 2)
        assert all(e.prompt_logprobs is None for e in events[1:])
        context = list(p)
        for e in events:
            assert len(e.logprobs) == len(e.token_ids) == 1       # logprobs: never drafted
            check(e.logprobs[0], context, e.token_ids[0], 3)
            context.append(e.token_ids[0])
    for events in results[len(scored):]:
        assert all(e.logprobs is None and e.prompt_logprobs is None for e in events)
    engine.block_manager.check()


def test_logprobs_are_of_the_raw_logits_not_the_tempered_distribution(engines):
    engine = engines("none")
    p = [ALPHABET[1], ALPHABET[2], ALPHABET[3]]
    (events,) = run_all(engine, [req("t", p, max_tokens=6, temperature=1.7, seed=5, logprobs=1)])
    context = list(p)
    for e in events:
        check(e.logprobs[0], context, e.token_ids[0], 1)      # vLLM's default logprobs_mode, raw_logprobs
        context.append(e.token_ids[0])


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_too_many_top_logprobs_are_refused(engines, field):
    from vsc.runtime.api import InvalidRequest
    engine = engines("none")
    with pytest.raises(InvalidRequest, match=field):
        run_all(engine, [req("x", [ALPHABET[0], ALPHABET[1]], **{field: 21})])


def test_a_long_prompt_with_prompt_logprobs_is_computed_a_bounded_chunk_a_step(engines, monkeypatch):
    from vsc.runtime import scheduler
    monkeypatch.setattr(scheduler, "PROMPT_ROWS_PER_STEP", 6)
    engine = engines("none")                       # no chunked prefill: the cap alone splits it
    rows: list[int] = []
    prefill = engine.runner.prefill

    def spy(batch):
        rows.append(batch.num_tokens)
        return prefill(batch)
    engine.runner.prefill = spy
    p = [ALPHABET[(3 * i) % len(ALPHABET)] for i in range(20)]
    (events,) = run_all(engine, [req("long", p, max_tokens=3, prompt_logprobs=1)])
    assert rows[:4] == [6, 6, 6, 2]
    plps = events[0].prompt_logprobs
    for i in range(1, len(p)):
        check(plps[i], p[:i], p[i], 1)
    assert tokens_of(events) == reference(p, 3)
