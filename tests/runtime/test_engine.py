"""LLMEngine end to end over a toy ModelRunner that checks every StepBatch.

The toy model's logits are a pure function of the sequence's whole context, which it
reads back from its own KV store through the block table. So a step that reads a block
another sequence overwrote, or KV that was freed and reused, changes the next token
and the comparison against `reference()` (the same function applied to plain lists)
fails, besides the explicit invariant checks in `ToyRunner._forward`.
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from vsc.models.tiny import make_tiny
from vsc.runtime.api import (CacheConfig, EngineConfig, GenerateRequest, InvalidRequest, Overloaded, QueueFull,
                             SamplingParams)
from vsc.runtime.engine import LLMEngine
from vsc.runtime.tokenizer import Tokenizer

torch.set_num_threads(1)

VOCAB = 2048           # the tiny tokenizer's vocabulary, so outputs detokenize
EOS = 2                # <|im_end|> in the tiny model
EOS_TRIGGER = 1000     # the toy model answers EOS right after this token
POISON = 1001          # a forward step containing this token raises


def toy_logits(context: tuple[int, ...]) -> torch.Tensor:
    """Logits of the next token after `context`: random but a pure function of it."""
    g = torch.Generator().manual_seed(hash(context) & 0x7FFFFFFF)
    logits = torch.randn(VOCAB, generator=g) * 3.0
    logits[:3] = -1e9                  # never a special token by chance ...
    logits[EOS_TRIGGER] = logits[POISON] = -1e9
    if context[-1] == EOS_TRIGGER:     # ... only on purpose
        logits[EOS] = 1e9
    return logits


def reference(prompt: list[int], max_tokens: int, ignore_eos: bool = False) -> list[int]:
    """Greedy output of the toy model, computed without any engine."""
    ctx = list(prompt)
    out = []
    for _ in range(max_tokens):
        tok = int(toy_logits(tuple(ctx)).argmax())
        out.append(tok)
        ctx.append(tok)
        if tok == EOS and not ignore_eos:
            break
    return out


class ToyRunner:
    """A ModelRunner whose 'KV cache' stores (token, position) per slot, and checks batches."""

    def __init__(self, num_blocks: int, block_size: int, step_cost: float = 0.0):
        self.step_cost = step_cost           # seconds each forward takes (what admission measures)
        self.cache_config = CacheConfig(layers=1, kv_heads=1, head_dim=1, block_size=block_size,
                                        num_blocks=num_blocks)
        self.vocab_size = VOCAB
        self.kv: dict[int, tuple[int, int]] = {}
        self.steps: list[tuple[str, list[int], list[int]]] = []   # (kind, query lens, context lens)
        self.gate: threading.Event | None = None                  # set: block inside forward
        self.entered = threading.Event()

    def create_kv_cache(self):
        self.kv = {}
        return self.kv

    def prefill(self, batch):
        return self._forward(batch, "prefill")

    def decode(self, batch):
        assert batch.is_decode
        return self._forward(batch, "decode")

    def _forward(self, batch, kind):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.step_cost:
            time.sleep(self.step_cost)
        bs = self.cache_config.block_size
        tokens = batch.tokens.tolist()
        positions = batch.positions.tolist()
        slots = batch.slot_mapping.tolist()
        qs = batch.query_start.tolist()
        ctx_lens = batch.context_lens.tolist()
        tables = batch.block_tables.tolist()
        b_count = batch.num_seqs
        # Shapes, dtypes, host copies.
        for t in (batch.tokens, batch.positions, batch.slot_mapping, batch.query_start,
                  batch.context_lens, batch.block_tables):
            assert t.dtype == torch.int64
        assert len(qs) == b_count + 1 and qs[0] == 0 and qs[-1] == len(tokens) == len(positions) == len(slots)
        assert len(tables) == b_count
        q_lens = [qs[b + 1] - qs[b] for b in range(b_count)]
        assert batch.query_lens_host == q_lens and batch.context_lens_host == ctx_lens
        assert batch.is_decode == all(q == 1 for q in q_lens)
        assert len(set(slots)) == len(slots), "a slot written twice in one step"
        used_blocks: set[int] = set()
        if POISON in tokens:
            raise ValueError("poisoned token")
        logits = torch.empty(b_count, VOCAB)
        for b in range(b_count):
            n, ctx = q_lens[b], ctx_lens[b]
            assert n >= 1 and ctx >= n
            nblocks = -(-ctx // bs)
            table = tables[b]
            assert all(x == 0 for x in table[nblocks:]), "block table not padded with 0"
            own = table[:nblocks]
            assert all(0 <= x < self.cache_config.num_blocks for x in own)
            assert not used_blocks & set(own), "two sequences of one step share a block"
            used_blocks |= set(own)
            for t in range(qs[b], qs[b + 1]):
                pos = positions[t]
                assert pos == ctx - n + (t - qs[b])
                assert slots[t] == table[pos // bs] * bs + pos % bs
            # Old context must be exactly what this sequence wrote before.
            context = []
            for pos in range(ctx - n):
                slot = table[pos // bs] * bs + pos % bs
                assert slot in self.kv, f"reads never-written slot {slot}"
                tok, wpos = self.kv[slot]
                assert wpos == pos, f"slot {slot} holds position {wpos}, expected {pos}"
                context.append(tok)
            for t in range(qs[b], qs[b + 1]):
                self.kv[slots[t]] = (tokens[t], positions[t])
                context.append(tokens[t])
            logits[b] = toy_logits(tuple(context))
        self.steps.append((kind, q_lens, ctx_lens))
        return logits


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_model_dir(make_tiny(tmp_path_factory.mktemp("tiny"), arch="llama"))


@pytest.fixture
def make_engine(tokenizer):
    engines = []

    def make(num_blocks=64, block_size=4, on_token=None, step_cost=0.0, **cfg):
        cfg.setdefault("max_context", 128)
        runner = ToyRunner(num_blocks, block_size, step_cost)
        engine = LLMEngine(runner, tokenizer, EngineConfig(**cfg), "toy", on_token=on_token)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


def prompt(i: int, length: int) -> list[int]:
    return [3 + (i * 7919 + j * 104729) % 900 for j in range(length)]


def req(rid, prompt_ids, max_tokens=8, **params) -> GenerateRequest:
    params.setdefault("temperature", 0.0)
    return GenerateRequest(rid, prompt_ids, SamplingParams(max_tokens=max_tokens, **params), time.monotonic())


async def collect(engine, request):
    return [e async for e in engine.generate(request)]


def run_all(engine, requests, timeout=30.0):
    async def main():
        return await asyncio.wait_for(asyncio.gather(*(collect(engine, r) for r in requests)), timeout)
    return asyncio.run(main())


def tokens_of(events):
    return [t for e in events for t in e.token_ids]


def test_one_request_matches_reference_and_counts(make_engine, tokenizer):
    engine = make_engine()
    p = prompt(0, 11)
    (events,) = run_all(engine, [req("a", p, max_tokens=12)])
    want = reference(p, 12)
    assert tokens_of(events) == want
    assert [e.finish_reason for e in events] == [None] * 11 + ["length"]
    assert events[-1].prompt_tokens == 11 and events[-1].completion_tokens == 12
    assert "".join(e.text for e in events) == tokenizer.decode(want)
    s = engine.stats()
    assert s["kv_blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0
    assert s["generated_tokens"] == 12 and s["kv_blocks_total"] == 64


def test_sixteen_concurrent_requests_get_the_same_tokens_as_alone(make_engine):
    engine = make_engine(num_blocks=96, max_batch=8, max_tokens=64)
    reqs = [req(f"r{i}", prompt(i, 3 + (i * 5) % 17), max_tokens=4 + (i * 3) % 13) for i in range(16)]
    results = run_all(engine, reqs)
    for r, events in zip(reqs, results):
        assert tokens_of(events) == reference(r.prompt_ids, r.params.max_tokens), r.request_id
    runner = engine.runner
    assert max(len(q) for _, q, _ in runner.steps) == 8                       # batched, capped at max_batch
    assert any(k == "prefill" and any(x == 1 for x in q) for k, q, _ in runner.steps)  # mixed steps
    assert any(k == "decode" for k, _, _ in runner.steps)
    assert all(sum(q) <= 64 for _, q, _ in runner.steps)                      # token budget
    assert engine.stats()["kv_blocks_used"] == 0


def test_chunked_prefill_gives_the_same_tokens_as_unchunked(make_engine):
    reqs = [req(f"c{i}", prompt(i, 20 + 9 * i), max_tokens=6) for i in range(4)]
    chunked = make_engine(chunked_prefill=7)
    plain = make_engine()
    got = run_all(chunked, reqs)
    assert got == run_all(plain, reqs)
    for r, events in zip(reqs, got):
        assert tokens_of(events) == reference(r.prompt_ids, 6)
    steps = chunked.runner.steps
    assert max(max(q) for _, q, _ in steps) == 7
    # a chunk that continues an earlier one: context longer than the chunk, more than 1 token
    assert any(1 < qn < c for _, q, cl in steps for qn, c in zip(q, cl))
    assert max(max(q) for _, q, _ in plain.runner.steps) == 20 + 9 * 3


def test_preemption_under_a_tiny_block_pool_finishes_everything_identically(make_engine):
    # 6 requests that each need 6 blocks at the end, 12 blocks in all.
    engine = make_engine(num_blocks=12, block_size=4, max_batch=6)
    reqs = [req(f"p{i}", prompt(i, 8), max_tokens=16) for i in range(6)]
    results = run_all(engine, reqs)
    for r, events in zip(reqs, results):
        assert tokens_of(events) == reference(r.prompt_ids, 16)
        assert events[-1].finish_reason == "length"
    s = engine.stats()
    assert s["preemptions"] > 0
    assert s["kv_blocks_used"] == 0


def test_prefill_longer_than_the_step_budget_is_split_even_unchunked(make_engine):
    engine = make_engine(max_tokens=16, max_context=128)
    p = prompt(3, 40)
    (events,) = run_all(engine, [req("long", p, max_tokens=5)])
    assert tokens_of(events) == reference(p, 5)
    assert all(sum(q) <= 16 for _, q, _ in engine.runner.steps)


def hold_step(runner, n: int) -> threading.Event:
    """Make the runner's step `n` (1-based) wait inside its forward until the returned event is
    set: what a request sees by then does not depend on how fast the engine thread runs."""
    release = threading.Event()
    real = runner._forward

    def forward(batch, kind):
        if len(runner.steps) == n - 1:
            assert release.wait(10)
        return real(batch, kind)

    runner._forward = forward
    return release


def test_abort_mid_generation_frees_every_block(make_engine):
    engine = make_engine()
    release = hold_step(engine.runner, 4)
    p = prompt(1, 10)

    async def main():
        events = []
        async for e in engine.generate(req("x", p, max_tokens=100)):
            events.append(e)
            if len(events) == 3:
                engine.abort("x")
                release.set()
        return events

    events = asyncio.run(asyncio.wait_for(main(), 30))
    assert events[-1].finish_reason == "abort"
    # the abort lands after the step in flight (the 4th), if not before it
    n = len(tokens_of(events))
    assert n in (3, 4) and tokens_of(events) == reference(p, n)
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0


def test_a_consumer_that_goes_away_aborts_its_request(make_engine):
    engine = make_engine()
    release = hold_step(engine.runner, 2)

    async def main():
        agen = engine.generate(req("gone", prompt(2, 10), max_tokens=100))
        await agen.__anext__()
        await agen.aclose()                      # the HTTP client disconnected
        release.set()
        for _ in range(1000):
            if engine.stats()["kv_blocks_used"] == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())
    assert engine.stats()["running"] == 0
    # the abort lands before step 2 starts or while it is held in flight: no step after that one
    assert len(engine.runner.steps) <= 2 and engine.stats()["generated_tokens"] in (1, 2)


def test_queue_full_beyond_max_waiting(make_engine):
    engine = make_engine(max_batch=1, max_waiting=2)
    runner = engine.runner
    runner.gate = threading.Event()

    async def main():
        first = asyncio.create_task(collect(engine, req("w0", prompt(0, 5), max_tokens=2)))
        while not runner.entered.is_set():       # w0 is inside the forward, the loop is blocked
            await asyncio.sleep(0.005)
        queued = [asyncio.create_task(collect(engine, req(f"w{i}", prompt(i, 5), max_tokens=2))) for i in (1, 2)]
        while engine.stats()["waiting"] < 2:
            await asyncio.sleep(0.005)
        with pytest.raises(QueueFull, match="2 requests"):
            await engine.generate(req("w3", prompt(3, 5))).__anext__()
        runner.gate.set()
        return await asyncio.gather(first, *queued)

    results = asyncio.run(asyncio.wait_for(main(), 30))
    assert [e[-1].finish_reason for e in results] == ["length"] * 3


@pytest.mark.parametrize("length, max_tokens, match", [
    (64, 1, "maximum context of 64 tokens"),
    (63, 2, "plus max_tokens .2. exceeds this model's maximum context of 64"),
    (0, 1, "empty"),
    (5, 0, "max_tokens must be at least 1"),
])
def test_invalid_requests_are_rejected_before_any_event(make_engine, length, max_tokens, match):
    engine = make_engine(max_context=64)

    async def main():
        with pytest.raises(InvalidRequest, match=match):
            await engine.generate(req("bad", prompt(0, length), max_tokens=max_tokens)).__anext__()

    asyncio.run(asyncio.wait_for(main(), 10))
    # the engine still serves
    (events,) = run_all(engine, [req("ok", prompt(0, 63), max_tokens=1)])
    assert events[-1].finish_reason == "length"


def test_requests_beyond_the_kv_capacity_and_bad_params_are_rejected(make_engine):
    engine = make_engine(num_blocks=4, block_size=4, max_context=64)
    bad = [req("cap", prompt(0, 10), max_tokens=10),
           req("ids", [5, VOCAB], max_tokens=1),
           req("tp", [5], top_p=0.0, temperature=1.0),
           req("t", [5], temperature=-1.0)]

    async def main():
        for r, match in zip(bad, ["KV cache capacity of 16 tokens", r"\[0, 2048\)", "top_p", "temperature"]):
            with pytest.raises(InvalidRequest, match=match):
                await engine.generate(r).__anext__()

    asyncio.run(main())


def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch(make_engine):
    p = prompt(5, 9)
    alone = make_engine()
    seeded = req("s", p, max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    (a,) = run_all(alone, [seeded])
    crowd = make_engine(max_batch=8)
    others = [req(f"o{i}", prompt(i, 4 + i), max_tokens=10, temperature=0.8, seed=None if i % 2 else i)
              for i in range(6)]
    b = run_all(crowd, others[:3] + [seeded] + others[3:])[3]
    assert tokens_of(a) == tokens_of(b)
    (c,) = run_all(alone, [req("s2", p, max_tokens=12, temperature=1.0, top_p=0.9, seed=4321)])
    assert tokens_of(c) != tokens_of(a)
    assert tokens_of(a) != reference(p, 12)          # it really sampled


def test_stop_strings_cut_the_text(make_engine, tokenizer):
    engine = make_engine()
    p = prompt(7, 6)
    full_ids = reference(p, 20)
    full = tokenizer.decode(full_ids)
    # a stop string spanning a token boundary, in the middle of the output
    cut = len(tokenizer.decode(full_ids[:8])) - 2
    stop = full[cut:cut + 4]
    assert len(stop) == 4 and full.find(stop) <= cut
    (events,) = run_all(engine, [req("st", p, max_tokens=20, stop=[stop, "never-there"])])
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == full[:full.find(stop)]
    assert len(tokens_of(events)) < 20


def test_eos_stop_token_ids_and_ignore_eos(make_engine):
    engine = make_engine()
    p = prompt(8, 5) + [EOS_TRIGGER]
    stop_ev, ignore_ev = run_all(engine, [req("eos", p, max_tokens=10),
                                          req("ign", p, max_tokens=10, ignore_eos=True)])
    assert tokens_of(stop_ev) == [EOS] and stop_ev[-1].finish_reason == "stop"
    assert stop_ev[-1].text == ""
    assert tokens_of(ignore_ev) == reference(p, 10, ignore_eos=True)
    assert ignore_ev[-1].finish_reason == "length"
    q = prompt(9, 5)
    want = reference(q, 10)
    (st,) = run_all(engine, [req("sti", q, max_tokens=10, stop_token_ids=[want[3]])])
    assert tokens_of(st) == want[:want.index(want[3]) + 1] and st[-1].finish_reason == "stop"


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(make_engine, caplog):
    engine = make_engine()
    with caplog.at_level("ERROR", logger="vsc.runtime.engine"):
        (bad,) = run_all(engine, [req("bad", prompt(1, 4) + [POISON], max_tokens=5)])
    assert bad[-1].finish_reason == "error"
    assert "engine step failed" in caplog.text and "poisoned token" in caplog.text
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["errors"] == 1
    (good,) = run_all(engine, [req("good", prompt(1, 4), max_tokens=5)])
    assert tokens_of(good) == reference(prompt(1, 4), 5)


def test_static_batching_admits_only_when_nothing_runs(make_engine):
    engine = make_engine(mode="static", max_batch=4)
    reqs = [req(f"s{i}", prompt(i, 4 + i), max_tokens=3 + i % 3) for i in range(10)]
    results = run_all(engine, reqs)
    for r, events in zip(reqs, results):
        assert tokens_of(events) == reference(r.prompt_ids, r.params.max_tokens)
    for _, q, cl in engine.runner.steps:
        fresh = [qn == c for qn, c in zip(q, cl)]
        assert all(fresh) or not any(fresh), "a new sequence joined a running batch"


def test_on_token_reports_first_token_and_every_token(make_engine):
    calls = []
    engine = make_engine(on_token=lambda rid, now, first: calls.append((rid, now, first)))
    reqs = [req(f"t{i}", prompt(i, 5), max_tokens=4 + i) for i in range(3)]
    run_all(engine, reqs)
    for i, r in enumerate(reqs):
        mine = [c for c in calls if c[0] == r.request_id]
        assert len(mine) == 4 + i
        assert [c[2] for c in mine] == [True] + [False] * (3 + i)
        times = [c[1] for c in mine]
        assert times == sorted(times) and times[0] >= r.arrival_time


def test_idle_engine_does_not_spin_and_shutdown_aborts_pending(make_engine):
    engine = make_engine()
    assert engine.is_alive()
    # idle, the engine thread waits on its condition: it does not poll the scheduler
    real_has_work, polls = engine.scheduler.has_work, []
    engine.scheduler.has_work = lambda: polls.append(1) or real_has_work()
    time.sleep(0.3)                          # time a spinning loop would poll in, thousands of times
    assert len(polls) <= 1                   # at most the check before its first wait
    del engine.scheduler.has_work
    runner = engine.runner
    runner.gate = threading.Event()

    async def main():
        task = asyncio.create_task(collect(engine, req("pending", prompt(0, 5), max_tokens=50)))
        while not runner.entered.is_set():
            await asyncio.sleep(0.005)
        stopper = threading.Thread(target=engine.shutdown)
        stopper.start()
        runner.gate.set()
        events = await task
        stopper.join()
        return events

    events = asyncio.run(asyncio.wait_for(main(), 30))
    assert events[-1].finish_reason == "abort"
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.is_alive()


def test_duplicate_request_id_is_rejected(make_engine):
    engine = make_engine()
    runner = engine.runner
    runner.gate = threading.Event()

    async def main():
        task = asyncio.create_task(collect(engine, req("dup", prompt(0, 5), max_tokens=20)))
        while not runner.entered.is_set():       # "dup" is inside its first step: still live
            await asyncio.sleep(0.005)
        with pytest.raises(InvalidRequest, match="already in use"):
            await engine.generate(req("dup", prompt(1, 5))).__anext__()
        runner.gate.set()
        return await task

    events = asyncio.run(asyncio.wait_for(main(), 30))
    assert events[-1].finish_reason == "length"


def test_a_failing_on_token_hook_is_disabled_not_fatal(make_engine, caplog):
    def hook(rid, now, first):
        raise RuntimeError("metrics bug")

    engine = make_engine(on_token=hook)
    with caplog.at_level("ERROR", logger="vsc.runtime.engine"):
        (events,) = run_all(engine, [req("h", prompt(4, 5), max_tokens=6)])
    assert tokens_of(events) == reference(prompt(4, 5), 6)
    assert engine.on_token is None and "on_token hook failed" in caplog.text


# --- overload = shed: admission by the TTFT objective (vsc.runtime.admission)

def _overloaded(make_engine, overload: str):
    """A 1-row engine whose steps take >= 50 ms with a 1 ms TTFT objective: once a step is
    measured, any request is predicted to miss it. Returns the exception (or None) of a
    request submitted after a first one ran, and the first one's events."""
    engine = make_engine(max_batch=1, step_cost=0.05, overload=overload, ttft_slo_ms=1.0)

    async def main():
        first = await collect(engine, req("a", prompt(0, 20), max_tokens=2))   # nothing measured: admitted
        try:
            events = await collect(engine, req("b", prompt(1, 20), max_tokens=2))
        except QueueFull as e:
            return first, e
        return first, events

    return engine, asyncio.run(asyncio.wait_for(main(), 30))


def test_shed_refuses_a_request_predicted_to_miss_the_objective(make_engine):
    engine, (first, second) = _overloaded(make_engine, "shed")
    assert first[-1].finish_reason == "length"
    assert isinstance(second, Overloaded) and second.status == 429 and second.reason == "ttft_slo"
    assert second.retry_after >= 1 and "1 ms objective" in str(second)
    assert engine.stats()["shed_requests"] == 1 and engine.stats()["waiting"] == 0
    engine.check_overload()             # idle: even measured, an empty prompt has nothing ahead of it
    runner = engine.runner
    runner.gate, runner.entered = threading.Event(), threading.Event()

    async def busy():
        engine.config.ttft_slo_ms = 60_000.0    # admit c ...
        running = asyncio.create_task(collect(engine, req("c", prompt(2, 5), max_tokens=2)))
        while not runner.entered.is_set():       # ... which then holds the only row
            await asyncio.sleep(0.005)
        engine.config.ttft_slo_ms = 1.0
        try:
            with pytest.raises(Overloaded):     # the check before a prompt is tokenized
                engine.check_overload()
        finally:
            runner.gate.set()
        return await running

    assert asyncio.run(asyncio.wait_for(busy(), 30))[-1].finish_reason == "length"


def test_queue_admits_the_same_request(make_engine):
    engine, (first, second) = _overloaded(make_engine, "queue")
    assert second[-1].finish_reason == "length" and engine.stats()["shed_requests"] == 0
    engine.check_overload()             # queue: never refuses by prediction


def test_shed_admits_what_fits_the_objective(make_engine):
    engine = make_engine(max_batch=1, step_cost=0.05, overload="shed", ttft_slo_ms=60_000.0)

    async def main():
        return [await collect(engine, req(f"r{i}", prompt(i, 20), max_tokens=2)) for i in range(3)]

    assert [e[-1].finish_reason for e in asyncio.run(asyncio.wait_for(main(), 30))] == ["length"] * 3


def test_engine_refuses_unknown_overload_policies(make_engine):
    with pytest.raises(ValueError, match="unknown overload policy"):
        make_engine(overload="drop")
    with pytest.raises(ValueError, match="ttft_slo_ms"):
        make_engine(overload="shed")


def test_the_last_event_reports_the_time_waited_before_scheduling(make_engine):
    # one sequence at a time: the second request waits in the queue while the first runs its 5 steps
    engine = make_engine(mode="static", max_batch=1, step_cost=0.01)
    first, second = req("q0", prompt(0, 4), max_tokens=5), req("q1", prompt(1, 4), max_tokens=5)
    a, b = run_all(engine, [first, second])
    assert all(e.queue_seconds is None for e in a[:-1] + b[:-1])     # only the last event carries it
    assert a[-1].queue_seconds is not None and b[-1].queue_seconds is not None
    assert 0.0 <= a[-1].queue_seconds
    assert b[-1].queue_seconds >= 5 * 0.01     # waited for the first one's 5 steps
    assert b[-1].queue_seconds > a[-1].queue_seconds
