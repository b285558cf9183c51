"""The prefix cache in the real engine: a generated runner of the tiny model gives the same
greedy tokens with the cache as without it, while the second wave of requests finds the
shared prefix cached (hits counted), under a pool small enough to evict."""
from __future__ import annotations

import asyncio

import pytest
import torch

from vsc.backends.server.emit import engine_config
from vsc.backends.torch.codegen import generate_runner_source, load_runner_class
from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text
from vsc.models.tiny import make_tiny
from vsc.passes.manager import PassManager
from vsc.runtime.api import EngineConfig, GenerateRequest, SamplingParams
from vsc.runtime.engine import LLMEngine

torch.set_num_threads(1)

SPEC = """deployment prefix_test {{
  model "{path}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 1 GiB }}
  workload {{ arrivals = closed(4), prompt_tokens = fixed(32), output_tokens = fixed(16) }}
  accuracy {{ greedy_exact(probes = 4) }}
  serve {{ max_context = 256 }}
}}
"""
PIPELINE = "paged-kv{block=16},continuous-batching{max_batch=8,max_tokens=512},prefix-cache{policy=radix}"
SHARED = [(7 * j + 11) % 1900 + 3 for j in range(53)]      # 3 full blocks and 5 tokens


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    model_dir = make_tiny(tmp_path_factory.mktemp("prefix-engine") / "tiny-llama", arch="llama")
    spec = parse_spec_text(SPEC.format(path=model_dir), str(model_dir.parent / "test.vs"))
    return PassManager(PIPELINE).run(lower_spec(spec))


@pytest.fixture(scope="module")
def runner(module):
    return load_runner_class(generate_runner_source(module), "prefix_engine_runner")(module.model.attrs["path"])


def tail(i: int, n: int) -> list[int]:
    return [(13 * i + 5 * j) % 1900 + 3 for j in range(n)]


def run_waves(runner, config: dict, waves: list[list[list[int]]], num_blocks: int):
    """Greedy tokens of each wave's prompts, the waves one after the other; and the engine."""
    engine = LLMEngine(runner, None, EngineConfig(**config), "tiny", num_blocks=num_blocks)

    async def one(rid, prompt):
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        return [t async for ev in engine.generate(GenerateRequest(rid, prompt, params)) for t in ev.token_ids]

    async def wave(n, prompts):
        return await asyncio.gather(*(one(f"w{n}-{i}", p) for i, p in enumerate(prompts)))

    engine.start()
    try:
        return [asyncio.run(wave(n, w)) for n, w in enumerate(waves)], engine
    finally:
        engine.shutdown()


WAVES = [
    [SHARED + tail(0, 9)],                                       # computes and caches the prefix
    [SHARED + tail(i, 3 + 4 * i) for i in range(1, 5)]           # each finds 3 cached blocks
    + [SHARED[:20] + tail(9, 30), SHARED[1:] + tail(10, 4), list(SHARED[:48])],
]


def test_same_tokens_with_and_without_the_cache_and_hits_counted(module, runner):
    config = engine_config(module)
    assert config["prefix_cache"] == "radix" and config["prefix_cache_capacity"] == 0
    waves = WAVES
    num_blocks = 40                                              # room for everything: no eviction
    cached, engine = run_waves(runner, config, waves, num_blocks)
    plain, _ = run_waves(runner, {**config, "prefix_cache": "none"}, waves, num_blocks)
    assert cached == plain
    stats = engine.stats()
    hits_per_request = [48, 48, 48, 48, 16, 0, 32]              # the last one recomputes its final block
    assert stats["prefix_hit_tokens"] == sum(hits_per_request)
    assert stats["prefix_query_tokens"] == sum(len(p) for w in waves for p in w)
    assert stats["prefix_cached_blocks"] > 0 and stats["kv_blocks_used"] == 0
    engine.block_manager.check()


@pytest.mark.parametrize("capacity", [0, 2])
def test_a_small_pool_evicts_and_still_gives_the_same_tokens(module, runner, capacity):
    """14 blocks for 7 concurrent requests of 4-5 blocks: cached blocks are evicted (and,
    with capacity 2, dropped as soon as more than 2 are unheld), requests wait or are
    preempted, and every token is still what the cache-off engine gives."""
    config = {**engine_config(module), "prefix_cache_capacity": capacity}
    cached, engine = run_waves(runner, config, WAVES, num_blocks=14)
    plain, _ = run_waves(runner, {**config, "prefix_cache": "none"}, WAVES, num_blocks=14)
    assert cached == plain
    stats = engine.stats()
    assert stats["prefix_evictions"] > 0 and stats["prefix_hit_tokens"] > 0
    assert stats["kv_blocks_used"] == 0
    if capacity:
        assert stats["prefix_cached_blocks"] <= capacity
    engine.block_manager.check()
