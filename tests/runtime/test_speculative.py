"""Speculative decoding in the runtime: proposers, the acceptance rule, the scheduler's
draft-carrying steps, and the engine against plain decoding.

The engine tests run a toy runner whose logits are a pure function of the context it reads
back through the block table (so wrong KV bookkeeping changes tokens) and which returns
logits at `batch.logits_rows`. Its next token depends mostly on the last token alone, so
outputs fall into loops that n-gram drafts predict, except at every fourth position, where
it depends on the whole context, so some drafts are rejected.
"""
from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from vsc.runtime.api import CacheConfig, EngineConfig, GenerateRequest, SamplingParams
from vsc.runtime.block_manager import BlockManager
from vsc.runtime.engine import LLMEngine
from vsc.runtime.sampler import Sampler, _mask_top_k_top_p
from vsc.runtime.scheduler import Scheduler
from vsc.runtime.sequence import Sequence
from vsc.runtime.speculative import (
    NgramProposer, accepted_length, draft_limit, make_proposer, rewind, verify, wants_drafts,
)

torch.set_num_threads(1)

VOCAB = 2048
EOS = 2
ALPHABET = list(range(100, 148))      # the toy model only ever emits these (48 tokens: loops come fast)


def seq(rid, prompt, max_tokens=16, **params):
    params.setdefault("temperature", 0.0)
    return Sequence(GenerateRequest(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **params)))


# --- proposers -------------------------------------------------------------------------------


def brute_ngram(tokens, n_max, limit):
    """The n-gram proposer's answer by brute force: longest n first, most recent earlier
    occurrence of the tail, drafts continuing periodically past the end."""
    for n in range(min(n_max, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for end in range(len(tokens) - 1, n - 1, -1):
            if tokens[end - n:end] == tail:
                ext = list(tokens)
                for j in range(limit):
                    ext.append(ext[end + j])
                return ext[len(tokens):]
    return []


def brute_prompt_lookup(tokens, prompt_len, n_max, limit):
    """Prompt lookup by brute force: the first occurrence in the prompt, prompt tokens after it."""
    prompt = tokens[:prompt_len]
    for n in range(min(n_max, len(tokens)), 0, -1):
        tail = tokens[-n:]
        for end in range(n, prompt_len):
            if prompt[end - n:end] == tail:
                return prompt[end:end + limit]
    return []


def test_ngram_prefers_the_longest_then_the_most_recent_match_and_continues_periodically():
    p = NgramProposer(k=4, ngram=3, prompt_only=False)
    s = seq("a", [5, 6, 7, 1, 6, 7, 2, 9, 6, 7])
    assert p.propose(s, 4) == [2, 9, 6, 7]              # "6 7" last seen before "2"; no 3-gram match
    s.token_ids += [2]                                    # tail "6 7 2" matches (3-gram)
    assert p.propose(s, 4) == [9, 6, 7, 2]
    loop = seq("b", [1, 2, 3, 1, 2])
    assert NgramProposer(k=6, ngram=2, prompt_only=False).propose(loop, 6) == [3, 1, 2, 3, 1, 2]
    assert p.propose(seq("c", [1, 2, 3, 4]), 4) == []     # nothing repeats
    assert p.propose(s, 0) == []


def test_prompt_lookup_matches_the_prompt_only_first_occurrence_and_stops_at_its_end():
    p = NgramProposer(k=4, ngram=2, prompt_only=True)
    s = seq("a", [4, 8, 9, 3, 8, 9, 5, 6])
    s.token_ids += [1, 8]                                 # output so far: 1 8; tail "1 8" absent, "8" first at 1
    assert p.propose(s, 4) == [9, 3, 8, 9]
    s.token_ids += [9, 5]                                  # tail "9 5": in the prompt, followed by "6" then its end
    assert p.propose(s, 4) == [6]
    s.token_ids += [7, 7]                                  # "7" appears only in the output: no prompt match
    assert p.propose(s, 4) == []


@pytest.mark.parametrize("prompt_only", [False, True])
def test_incremental_index_agrees_with_brute_force(prompt_only):
    rng = random.Random(7)
    for trial in range(60):
        n_max, k = rng.randint(1, 4), rng.randint(1, 5)
        tokens = [rng.randint(0, 5) for _ in range(rng.randint(2, 12))]
        s = seq(f"t{trial}", tokens)
        p = NgramProposer(k=k, ngram=n_max, prompt_only=prompt_only)
        for _ in range(12):                               # the index grows with the output, step by step
            got = p.propose(s, k)
            want = (brute_prompt_lookup(s.token_ids, s.num_prompt_tokens, n_max, k) if prompt_only
                    else brute_ngram(s.token_ids, n_max, k))
            assert got == want, (s.token_ids, n_max, k)
            s.token_ids += [rng.randint(0, 5) for _ in range(rng.randint(1, 3))]


def test_draft_limit_leaves_room_for_the_bonus_token():
    s = seq("a", [1] * 10, max_tokens=5)
    assert draft_limit(s, 4, max_context=100) == 4
    s.token_ids += [1, 1, 1]                              # 3 of 5 output tokens: at most 1 draft + 1 pick
    assert draft_limit(s, 4, max_context=100) == 1
    assert draft_limit(s, 4, max_context=15) == 1 and draft_limit(s, 4, max_context=14) == 0
    s.num_computed = s.num_tokens - 1
    assert wants_drafts(s)
    s.num_computed -= 1                                   # more than its last token to compute: a prefill
    assert not wants_drafts(s)


def test_make_proposer_by_method():
    assert make_proposer("none", 0) is None
    assert make_proposer("ngram", 4).prompt_only is False
    assert make_proposer("prompt-lookup", 4, 2).prompt_only is True
    with pytest.raises(ValueError, match="draft runner"):
        make_proposer("draft", 4)
    with pytest.raises(ValueError, match="unknown speculative method"):
        make_proposer("medusa", 4)


# --- acceptance --------------------------------------------------------------------------------


def test_greedy_acceptance_keeps_drafts_up_to_the_first_miss_then_the_models_token():
    assert accepted_length([5, 6, 7], [5, 6, 9, 1]) == 2
    assert verify([5, 6, 7], [5, 6, 9, 1]) == ([5, 6, 9], 2)
    assert verify([5, 6, 7], [5, 6, 7, 1]) == ([5, 6, 7, 1], 3)      # all accepted: plus the bonus token
    assert verify([5, 6, 7], [4, 6, 7, 1]) == ([4], 0)
    assert verify([], [3]) == ([3], 0)
    with pytest.raises(ValueError):
        verify([5], [5])


#: chi-square critical values at p = 0.001, by degrees of freedom
CHI2_CRIT = {3: 16.266, 4: 18.467}


def chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs))


def test_sampled_acceptance_emits_exactly_the_models_distribution():
    """A fixed 8-token logits vector with temperature, top-k and top-p; the draft is a fairly
    likely token. Over 4000 seeded steps the first emitted token follows p (the distribution
    plain sampling draws from, after the sampler's processing), the draft is accepted with
    probability p(draft), and rejected steps follow p without the draft, renormalised."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -3.0, -9.0, -9.0])
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.99)
    sampler = Sampler()
    # p as the sampler sees it: temperature, then top-k and top-p
    p = torch.softmax(_mask_top_k_top_p((logits / params.temperature)[None], [params.top_k], [params.top_p])[0], dim=-1)
    support = [t for t in range(8) if p[t] > 0]
    assert support == [0, 1, 2, 3, 4]                     # top-k cuts two tokens, top-p one more
    draft = 1
    g = torch.Generator().manual_seed(1234)
    first, after_reject = [0] * 8, [0] * 8
    accepted = 0
    trials = 4000
    for _ in range(trials):
        picks = sampler(torch.stack([logits, logits + 0.3]), [params, params], [g, g])
        tokens, a = verify([draft], picks)
        first[tokens[0]] += 1
        accepted += a
        if a == 0:
            after_reject[tokens[0]] += 1
    probs = [float(p[t]) for t in support]
    assert chi_square([first[t] for t in support], probs) < CHI2_CRIT[4]
    assert abs(accepted / trials - float(p[draft])) < 4 * (float(p[draft]) * (1 - float(p[draft])) / trials) ** 0.5
    rest = [t for t in support if t != draft]
    q = [float(p[t]) / (1 - float(p[draft])) for t in rest]
    assert after_reject[draft] == 0
    assert chi_square([after_reject[t] for t in rest], q) < CHI2_CRIT[3]
    # plain sampling of the same vector, for comparison: the same test passes
    plain = [0] * 8
    for _ in range(trials):
        plain[sampler(logits[None], [params], [g])[0]] += 1
    assert chi_square([plain[t] for t in support], probs) < CHI2_CRIT[4]


def test_rewind_leaves_the_generator_where_plain_decoding_would():
    vocab = 50
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    state = a.get_state()
    noise = torch.empty(4, vocab)
    for row in noise:                                     # the sampler drew 4 verified positions
        row.uniform_(generator=a)
    rewind(a, state, 2, vocab)                            # but only 2 tokens were kept
    plain = torch.empty(2, vocab)
    for row in plain:
        row.uniform_(generator=b)
    assert torch.equal(noise[:2], plain)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


# --- scheduler ---------------------------------------------------------------------------------


def make_scheduler(num_blocks=8, block_size=4, **cfg):
    cfg.setdefault("max_context", 64)
    return Scheduler(EngineConfig(**cfg), BlockManager(num_blocks, block_size))


def decoding(sched, *specs):
    """Running sequences, one per (prompt, last token): prefilled together, `last` sampled."""
    seqs = [seq(f"s{i}", prompt) for i, (prompt, _) in enumerate(specs)]
    for s in seqs:
        sched.add(s)
    step = sched.schedule()
    assert step.seqs == seqs
    sched.advance(step)
    for s, (_, last) in zip(seqs, specs):
        s.token_ids.append(last)
    return seqs


def test_a_drafted_sequence_gets_its_last_token_plus_drafts_and_logits_rows():
    sched = make_scheduler()
    (a,) = decoding(sched, ([10, 11, 12], 13))
    a.draft_ids = [14, 15, 16]
    step = sched.schedule()
    b = step.batch
    assert step.num_new == [4] and step.num_drafts == [3] and step.sample_rows == [0]
    assert b.tokens.tolist() == [13, 14, 15, 16] and b.positions.tolist() == [3, 4, 5, 6]
    assert b.slot_mapping.tolist() == [3, 4, 5, 6] and b.context_lens.tolist() == [7]
    assert a.block_table == [0, 1] and not b.is_decode
    assert b.logits_rows.tolist() == [0, 1, 2, 3]


def test_logits_rows_cover_drafted_and_plain_rows_and_skip_mid_prefill_chunks():
    sched = make_scheduler(num_blocks=16, chunked_prefill=4)
    a, b = decoding(sched, ([1, 2, 3], 4), ([5, 6], 7))
    a.draft_ids = [8, 9]
    sched.add(seq("c", range(20, 30)))                    # 10 prompt tokens: a 4-token chunk this step
    step = sched.schedule()
    assert step.num_new == [3, 1, 4] and step.num_drafts == [2, 0, 0] and step.sample_rows == [0, 1]
    assert step.batch.tokens.tolist() == [4, 8, 9, 7, 20, 21, 22, 23]
    assert step.batch.logits_rows.tolist() == [0, 1, 2, 3]


def test_without_drafts_the_decode_step_is_unchanged():
    sched = make_scheduler()
    decoding(sched, ([1, 2, 3], 4))
    step = sched.schedule()
    assert step.batch.is_decode and step.batch.logits_rows is None and step.num_drafts == []


def test_drafts_are_cut_to_the_budget_leaving_a_token_for_every_later_sequence():
    sched = make_scheduler(num_blocks=16, max_tokens=6)
    a, b, c = decoding(sched, ([1, 2], 3), ([4, 5], 6), ([7, 8], 9))
    for s in (a, b, c):
        s.draft_ids = [1, 1, 1]
    step = sched.schedule()                               # oldest first: a takes what b and c can spare
    assert step.num_new == [4, 1, 1] and step.num_drafts == [3, 0, 0]
    assert step.batch.logits_rows.tolist() == [0, 1, 2, 3, 4, 5]
    sched.config.max_tokens = 5
    step = sched.schedule()
    assert step.num_new == [3, 1, 1] and step.num_drafts == [2, 0, 0]


def test_drafts_never_preempt_and_unused_blocks_are_released():
    sched = make_scheduler(num_blocks=2, block_size=4)
    a, b = decoding(sched, ([1, 2], 3), ([5, 6], 7))     # a block each, none free
    a.draft_ids = [1, 1, 1]                               # positions 2..5: would need a second block
    step = sched.schedule()
    assert step.num_new == [1, 1] and step.num_drafts == [] and sched.num_preemptions == 0
    sched.finish([b])
    step = sched.schedule()
    assert step.num_new == [4] and step.num_drafts == [3] and a.block_table == [0, 1]
    step.num_new[0] = 1                                   # every draft rejected: only the last token stays
    sched.advance(step)
    a.token_ids.append(9)                                 # the model's own token; next position 3, block 0
    sched.release_unused_blocks(a)
    assert a.block_table == [0] and sched.block_manager.num_free == 1 and a.num_computed == 3
    sched.release_unused_blocks(a)                        # nothing more to release
    assert a.block_table == [0]
    sched.block_manager.check()


# --- engine ------------------------------------------------------------------------------------


def toy_logits(context: tuple[int, ...]) -> torch.Tensor:
    """Next-token logits: a function of the last token, except at every 4th length, where of
    the whole context (so loops form, and some drafts miss)."""
    key = context[-1] if len(context) % 4 else hash(context) & 0x7FFFFFFF
    g = torch.Generator().manual_seed(key)
    logits = torch.full((VOCAB,), -1e9)
    logits[ALPHABET] = torch.randn(len(ALPHABET), generator=g) * 2.0
    return logits


def reference(prompt, max_tokens, stop_ids=()):
    ctx, out = list(prompt), []
    for _ in range(max_tokens):
        tok = int(toy_logits(tuple(ctx)).argmax())
        out.append(tok)
        ctx.append(tok)
        if tok in stop_ids:
            break
    return out


class ToyRunner:
    """KV store of (token, position) per slot; logits at each sequence's last token or at
    `logits_rows`, computed from the context read back through the block table."""

    def __init__(self, num_blocks=64, block_size=4):
        self.cache_config = CacheConfig(layers=1, kv_heads=1, head_dim=1, block_size=block_size, num_blocks=num_blocks)
        self.vocab_size = VOCAB
        self.kv: dict[int, tuple[int, int]] = {}
        self.drafted_steps = 0

    def create_kv_cache(self, num_blocks=None):
        self.kv = {}
        return self.kv

    def decode(self, batch):
        assert batch.is_decode and batch.logits_rows is None
        return self.prefill(batch)

    def prefill(self, batch):
        bs = self.cache_config.block_size
        tokens, positions, slots = batch.tokens.tolist(), batch.positions.tolist(), batch.slot_mapping.tolist()
        qs, ctx_lens, tables = batch.query_start.tolist(), batch.context_lens.tolist(), batch.block_tables.tolist()
        contexts = []               # per row t: the context through token t
        for b in range(batch.num_seqs):
            n, ctx = qs[b + 1] - qs[b], ctx_lens[b]
            context = []
            for pos in range(ctx - n):
                tok, wpos = self.kv[tables[b][pos // bs] * bs + pos % bs]
                assert wpos == pos, "stale KV read"
                context.append(tok)
            for t in range(qs[b], qs[b + 1]):
                assert slots[t] == tables[b][positions[t] // bs] * bs + positions[t] % bs
                self.kv[slots[t]] = (tokens[t], positions[t])
                context.append(tokens[t])
                contexts.append(tuple(context))
        if batch.logits_rows is None:
            rows = [qs[b + 1] - 1 for b in range(batch.num_seqs)]
        else:
            rows = batch.logits_rows.tolist()
            self.drafted_steps += 1
        return torch.stack([toy_logits(contexts[t]) for t in rows])


def make_toy_engine(method="ngram", k=4, num_blocks=64, block_size=4, tokenizer=None, **cfg):
    """A started engine over ToyRunner (the `engines` fixture, tests/runtime/conftest.py, shuts it down)."""
    cfg.setdefault("max_context", 256)
    cfg.setdefault("max_tokens", 512)
    cfg.setdefault("spec_gate", False)        # drafting decided by measured time: off, so tests are deterministic
    config = EngineConfig(speculative_method=method, speculative_k=k if method != "none" else 0, **cfg)
    engine = LLMEngine(ToyRunner(num_blocks, block_size), tokenizer, config, "toy")
    engine.start()
    return engine


def run_all(engine, requests, timeout=60.0):
    async def collect(r):
        return [e async for e in engine.generate(r)]

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(collect(r) for r in requests)), timeout)
    return asyncio.run(main())


def req(rid, prompt, max_tokens=24, **params):
    params.setdefault("temperature", 0.0)
    return GenerateRequest(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **params), time.monotonic())


def tokens_of(events):
    return [t for e in events for t in e.token_ids]


def prompts(count):
    rng = random.Random(11)
    return [[rng.choice(ALPHABET) for _ in range(rng.randint(3, 20))] for _ in range(count)]


@pytest.mark.parametrize("method", ["ngram", "prompt-lookup"])
def test_greedy_speculation_gives_plain_decodings_tokens_and_drafts(engines, method):
    engine = engines(method, k=4, max_batch=8)
    ps = prompts(12)
    results = run_all(engine, [req(f"r{i}", p, max_tokens=32) for i, p in enumerate(ps)])
    for p, events in zip(ps, results):
        assert tokens_of(events) == reference(p, 32)
        assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 32
        assert all(e.token_ids for e in events)
    s = engine.stats()
    assert s["spec_draft_tokens"] > s["spec_accepted_tokens"] > 0, s      # drafts, some accepted, some rejected
    assert any(len(e.token_ids) > 1 for events in results for e in events)   # several tokens from one step
    assert s["kv_blocks_used"] == 0 and s["generated_tokens"] == 12 * 32
    assert engine.runner.drafted_steps > 0
    engine.block_manager.check()


def test_seeded_sampling_is_identical_with_and_without_speculation(engines):
    ps = prompts(8)
    params = dict(temperature=0.7, top_p=0.95, top_k=12, max_tokens=32)
    reqs = [req(f"r{i}", p, seed=100 + i, **params) for i, p in enumerate(ps)]
    plain = run_all(engines("none"), reqs)
    spec_engine = engines("ngram", k=3, max_batch=8)
    spec = run_all(spec_engine, reqs)
    assert [tokens_of(e) for e in spec] == [tokens_of(e) for e in plain]
    s = spec_engine.stats()
    assert s["spec_draft_tokens"] > s["spec_accepted_tokens"] > 0, s


def test_a_stop_token_inside_an_accepted_run_ends_the_request_there(engines):
    ps = prompts(12)
    plain_tokens = [reference(p, 40) for p in ps]
    # stop on a token each output reaches only after its loop has started (drafts accepted)
    stops = [next((t for j, t in enumerate(out) if j >= 12 and t in out[:j]), None) for out in plain_tokens]
    cases = [(p, s) for p, s in zip(ps, stops) if s is not None]
    assert len(cases) >= 3
    engine = engines("ngram", k=6, max_batch=12)
    results = run_all(engine, [req(f"r{i}", p, max_tokens=40, stop_token_ids=[s]) for i, (p, s) in enumerate(cases)])
    for (p, stop), events in zip(cases, results):
        want = reference(p, 40, stop_ids=(stop,))
        assert tokens_of(events) == want and want[-1] == stop
        assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == len(want)
    assert any(len(events[-1].token_ids) > 1 for events in results)      # the stop came inside a drafted run
    assert engine.stats()["spec_accepted_tokens"] > 0 and engine.stats()["kv_blocks_used"] == 0


def test_stop_strings_max_tokens_and_context_cut_where_plain_decoding_does(engines, tiny_tokenizer):
    ps = prompts(10)
    plain_engine = engines("none", tokenizer=tiny_tokenizer, max_context=40)
    spec_engine = engines("ngram", k=5, tokenizer=tiny_tokenizer, max_batch=10, max_context=40)
    first = run_all(plain_engine, [req(f"p{i}", p, max_tokens=40 - len(p)) for i, p in enumerate(ps)])
    # a stop string: the text of a token well into each output
    reqs = []
    for i, (p, events) in enumerate(zip(ps, first)):
        text = "".join(e.text for e in events)
        stop = tiny_tokenizer.decode([tokens_of(events)[10]]).strip() or None
        stops = [stop] if i % 2 == 0 and stop and stop in text else []      # odd ones end by length
        reqs.append(req(f"s{i}", p, max_tokens=min(17 + i, 40 - len(p)), stop=stops))
    plain, spec = run_all(plain_engine, reqs), run_all(spec_engine, reqs)
    for a, b in zip(plain, spec):
        assert tokens_of(a) == tokens_of(b)
        assert "".join(e.text for e in a) == "".join(e.text for e in b)
        assert a[-1].finish_reason == b[-1].finish_reason and a[-1].completion_tokens == b[-1].completion_tokens
    assert {e[-1].finish_reason for e in spec} == {"stop", "length"}
    assert spec_engine.stats()["spec_draft_tokens"] > 0


def test_preemption_under_a_small_block_pool_keeps_outputs_exact(engines):
    engine = engines("ngram", k=4, num_blocks=14, block_size=4, max_batch=8)
    ps = prompts(8)
    results = run_all(engine, [req(f"r{i}", p, max_tokens=24) for i, p in enumerate(ps)])
    for p, events in zip(ps, results):
        assert tokens_of(events) == reference(p, 24)
    s = engine.stats()
    assert s["preemptions"] > 0 and s["spec_accepted_tokens"] > 0 and s["kv_blocks_used"] == 0


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from vsc.models.tiny import make_tiny
    from vsc.runtime.tokenizer import Tokenizer
    return Tokenizer.from_model_dir(make_tiny(tmp_path_factory.mktemp("tiny"), arch="llama"))


# --- the tiny model through a generated runner ---------------------------------------------------

TINY_SPEC = """
deployment spec {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{ arrivals = closed(8), prompt_tokens = fixed(32), output_tokens = fixed(16) }}
  serve {{ max_context = 256 }}
}}
"""
BASE_PIPELINE = "fuse-qkv,paged-kv{block=16},continuous-batching{max_batch=16,max_tokens=512}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(plan compiler, prompts): the tiny llama, a second tiny llama of another seed (a draft
    model that mostly misses), and the accuracy probes' prompts."""
    from vsc.backends.torch.reference import tokenize_probes
    from vsc.backends.torch.codegen import generate_runner_source, load_runner_class
    from vsc.backends.torch.draft import attach_draft_runner
    from vsc.frontend.lower import lower_spec
    from vsc.frontend.parser import parse_spec_text
    from vsc.models.tiny import make_tiny
    from vsc.passes.manager import PassManager

    root = tmp_path_factory.mktemp("spec-tiny")
    model = make_tiny(root / "tiny-llama", arch="llama")
    make_tiny(root / "other-llama", arch="llama", seed=1)
    spec_path = root / "spec.vs"

    def plan(pipeline: str):
        module = lower_spec(parse_spec_text(TINY_SPEC.format(model=model), spec_path))
        module = PassManager(pipeline).run(module)
        runner = load_runner_class(generate_runner_source(module), f"vsc_spec_test_{abs(hash(pipeline))}")(str(model))
        attach_draft_runner(module, runner)
        return module, runner

    return plan, tokenize_probes(model, 12, 160)


def tiny_engine(module, runner, **overrides):
    from vsc.backends.server.emit import engine_config
    return LLMEngine(runner, None, EngineConfig(**{**engine_config(module), **overrides}), "tiny", num_blocks=256)


def greedy_outputs(engine, prompts, max_tokens=48):
    engine.start()
    try:
        results = run_all(engine, [req(f"t{i}", p, max_tokens=max_tokens, ignore_eos=True) for i, p in enumerate(prompts)],
                          timeout=300)
    finally:
        engine.shutdown()
    return [tokens_of(events) for events in results], engine.stats()


@pytest.mark.parametrize("method", ["ngram", "prompt-lookup"])
def test_tiny_model_gives_the_same_greedy_tokens_with_lookup_speculation(tiny, method):
    plan, prompts = tiny
    module, runner = plan(BASE_PIPELINE + f",speculative{{method={method},k=4}}")
    plain, _ = greedy_outputs(tiny_engine(module, runner, speculative_method="none", speculative_k=0), prompts)
    spec, stats = greedy_outputs(tiny_engine(module, runner), prompts)
    assert spec == plain
    assert stats["spec_draft_tokens"] > stats["spec_accepted_tokens"], stats    # drafts proposed, some rejected
    if method == "ngram":      # the random model's outputs fall into loops, which n-gram drafts predict
        assert stats["spec_accepted_tokens"] > 0, stats


def test_tiny_model_with_a_draft_model(tiny):
    plan, prompts = tiny
    base, runner = plan(BASE_PIPELINE)
    plain, _ = greedy_outputs(tiny_engine(base, runner), prompts[:6], 32)
    # the target as its own draft: every draft is right, so the draft KV bookkeeping is exact
    module, runner = plan(BASE_PIPELINE + ",speculative{method=draft,k=3,model=tiny-llama}")
    spec, stats = greedy_outputs(tiny_engine(module, runner), prompts[:6], 32)
    assert spec == plain
    assert stats["spec_draft_tokens"] == stats["spec_accepted_tokens"] > 0, stats
    assert stats["steps"] < 32 // 2                       # k + 1 = 4 tokens per step, not 1
    # another model: mostly misses, same tokens
    module, runner = plan(BASE_PIPELINE + ",speculative{method=draft,k=3,model=other-llama}")
    spec, stats = greedy_outputs(tiny_engine(module, runner), prompts[:6], 32)
    assert spec == plain
    assert stats["spec_draft_tokens"] > stats["spec_accepted_tokens"], stats
