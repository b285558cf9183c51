"""Copies of one prompt (n > 1): a request submitted with `fork_of` shares the computed prompt
blocks of the request it copies instead of computing the prompt again, with or without a prefix
cache, and its tokens are those it gets alone."""
from __future__ import annotations

import asyncio

import pytest

from test_speculative import ALPHABET, req, run_all, tokens_of


def counting(engine) -> list[int]:
    """Prompt tokens each step computes (rows of more than one token: prefill work)."""
    seen: list[int] = []
    prefill = engine.runner.prefill

    def spy(batch):
        seen.append(sum(n for n in batch.query_lens_host if n > 1))
        return prefill(batch)
    engine.runner.prefill = spy
    return seen


def submit_copies(engine, prompt, copies, **params):
    async def main():
        first = req("c0", prompt, **params)
        others = [req(f"c{j}", prompt, seed=params.get("seed", 0) + j, **{k: v for k, v in params.items()
                                                                          if k != "seed"})
                  for j in range(1, copies)]
        for r in others:
            r.fork_of = "c0"

        async def collect(r):
            return [e async for e in engine.generate(r)]
        return await asyncio.wait_for(asyncio.gather(collect(first), *(collect(r) for r in others)), 60)
    return asyncio.run(main())


@pytest.mark.parametrize("prefix_cache", ["none", "radix"])
def test_copies_share_the_prompt_blocks_of_the_first(engines, prefix_cache):
    engine = engines("none", max_batch=8, block_size=4, prefix_cache=prefix_cache)
    prompt = [ALPHABET[(5 * i) % len(ALPHABET)] for i in range(23)]        # 5 full blocks + 3 tokens
    computed = counting(engine)
    results = submit_copies(engine, prompt, 4, max_tokens=10, temperature=0.8, seed=40)
    stats = engine.stats()
    shared = 3 * 20                       # three copies, five blocks of four tokens each
    assert stats["forked_tokens"] + stats["prefix_hit_tokens"] == shared
    assert stats[{"none": "forked_tokens", "radix": "prefix_hit_tokens"}[prefix_cache]] == shared
    assert sum(computed) == 23 + 3 * 3    # the prompt once, and each copy's last partial block
    alone = [run_all(engines("none"), [req("x", prompt, max_tokens=10, temperature=0.8, seed=40 + j)])[0]
             for j in range(4)]
    assert [tokens_of(e) for e in results] == [tokens_of(e) for e in alone]
    assert engine.stats()["kv_blocks_used"] == 0
    engine.block_manager.check()


def test_a_copy_whose_parent_is_gone_computes_the_prompt_itself(engines):
    engine = engines("none", max_batch=8, block_size=4)
    prompt = [ALPHABET[i % len(ALPHABET)] for i in range(13)]
    run_all(engine, [req("c0", prompt, max_tokens=2)])
    late = req("c1", prompt, max_tokens=4)
    late.fork_of = "c0"                    # finished already: nothing to fork
    (events,) = run_all(engine, [late])
    assert tokens_of(events) == tokens_of(run_all(engines("none"), [req("x", prompt, max_tokens=4)])[0])
    assert engine.stats()["forked_tokens"] == 0
