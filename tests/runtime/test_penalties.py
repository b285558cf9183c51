"""The logits-adjustment stage (min_tokens, logit_bias, repetition / frequency / presence penalties)
and min_p, as vLLM defines them: against a plain per-token reference, in the sampler, through the
engine, and exact under speculative decoding."""
from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from vsc.runtime.api import EngineConfig, GenerateRequest, InvalidRequest, SamplingParams
from vsc.runtime.engine import LLMEngine
from vsc.runtime.penalties import TokenCounts, adjust_logits
from vsc.runtime.sampler import Sampler
from toy_runner import ContextRunner

torch.set_num_threads(1)

sampler = Sampler()


def reference_adjust(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int],
                     eos: set[int]) -> list[float]:
    """The definitions, one token at a time (vLLM: min_tokens, logit_bias, then the penalties)."""
    out = list(logits)
    if len(output) < p.min_tokens:
        for t in eos | set(p.stop_token_ids):
            out[t] = float("-inf")
    for t, b in (p.logit_bias or {}).items():
        out[t] += b
    for t in range(len(out)):
        c = output.count(t)
        if t in prompt or c:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        out[t] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    return out


def counts_of(p: SamplingParams, prompt: list[int], output: list[int], vocab: int) -> TokenCounts | None:
    c = TokenCounts.of(p, prompt, vocab, "cpu")
    for t in output:
        if c is not None:
            c.add(t)
    return c


def test_adjust_logits_matches_the_definitions_row_by_row():
    rng = random.Random(0)
    vocab, eos = 40, {2}
    cases = [SamplingParams(repetition_penalty=1.7), SamplingParams(frequency_penalty=0.8),
             SamplingParams(presence_penalty=-1.1), SamplingParams(logit_bias={5: -100.0, 7: 3.5}),
             SamplingParams(min_tokens=4, stop_token_ids=[9]), SamplingParams(min_tokens=2),
             SamplingParams(repetition_penalty=0.6, frequency_penalty=0.4, presence_penalty=0.3,
                            logit_bias={1: 2.0}, min_tokens=10),
             SamplingParams()]                                   # untouched
    logits = torch.randn(len(cases), vocab, generator=torch.Generator().manual_seed(1)) * 3
    prompts = [[rng.randrange(vocab) for _ in range(6)] for _ in cases]
    outputs = [[rng.randrange(6) for _ in range(rng.randrange(1, 8))] for _ in cases]   # repeats
    got = adjust_logits(logits, cases, [counts_of(p, pr, o, vocab) for p, pr, o in zip(cases, prompts, outputs)],
                        [len(o) for o in outputs], None, eos)
    for i, p in enumerate(cases):
        want = torch.tensor(reference_adjust(logits[i].tolist(), p, prompts[i], outputs[i], eos))
        assert torch.allclose(got[i], want, atol=1e-5), (i, p)
    assert torch.equal(got[-1], logits[-1])
    assert adjust_logits(logits, [SamplingParams()] * len(cases), [None] * len(cases), [0] * len(cases),
                         None, eos) is logits      # nothing to do: the same tensor, no copy


def test_drafts_before_a_row_count_as_output():
    """Speculative verify: row j of a drafted sequence is adjusted as if its first j drafts were output."""
    vocab, eos = 30, {2}
    p = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.2, min_tokens=3)
    prompt, output, drafts = [4, 5, 6], [7, 7], [8, 7, 2]
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(2)) * 2
    counts = counts_of(p, prompt, output, vocab)
    got = adjust_logits(logits, [p] * 4, [counts] * 4, [len(output)] * 4, [drafts[:j] for j in range(4)], eos)
    for j in range(4):
        want = reference_adjust(logits[j].tolist(), p, prompt, output + drafts[:j], eos)
        assert torch.allclose(got[j], torch.tensor(want), atol=1e-5), j
    assert counts.counts.sum() == len(output)          # the sequence's own counts are untouched


def test_min_p_one_at_temperature_1_5_always_picks_the_argmax():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(3))
    want = logits.argmax(-1).tolist()
    for _ in range(5):
        assert sampler(logits, [SamplingParams(temperature=1.5, min_p=1.0)] * 64) == want
    assert sampler(logits, [SamplingParams(temperature=1.5)] * 64) != want          # it does sample freely


def test_min_p_keeps_tokens_above_its_fraction_of_the_top_one_renormalized():
    torch.manual_seed(4)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = probs.log().expand(n, 4).contiguous()
    out = torch.tensor(sampler(logits, [SamplingParams(min_p=0.4)] * n))     # keeps p >= 0.2: tokens 0, 1
    freq = torch.bincount(out, minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015), freq
    # after temperature: at 2.0 the probabilities flatten, and token 2 (sqrt 0.15 / sqrt 0.5 > 0.4) joins
    out = set(sampler(logits[:4000], [SamplingParams(min_p=0.4, temperature=2.0)] * 4000))
    assert out == {0, 1, 2}


def test_logit_bias_minus_100_bans_a_token_and_plus_100_forces_one():
    logits = torch.randn(200, 50, generator=torch.Generator().manual_seed(5))
    top = logits.argmax(-1)
    params = [SamplingParams(temperature=1.0, logit_bias={int(t): -100.0}) for t in top]
    for _ in range(3):
        adjusted = adjust_logits(logits, params, [None] * 200, [0] * 200, None, ())
        picks = torch.tensor(sampler(adjusted, params))
        assert not bool((picks == top).any())
    forced = [SamplingParams(temperature=1.0, logit_bias={7: 100.0})] * 200
    assert set(sampler(adjust_logits(logits, forced, [None] * 200, [0] * 200, None, ()), forced)) == {7}


# --- through the engine ---------------------------------------------------------------------------

VOCAB = 64
EOS = 2
EOS_TRIGGER = 60       # the toy model answers EOS right after this token


def toy_logits(context: tuple[int, ...]) -> torch.Tensor:
    """Random but a pure function of the last token, and it strongly prefers repeating it: greedy
    decoding repeats its first token forever unless a penalty intervenes."""
    g = torch.Generator().manual_seed(context[-1])
    logits = torch.rand(VOCAB, generator=g) * 2.0 + 1.0        # positive: repetition divides
    logits[:3] = -1e9
    logits[context[-1]] = 4.0                                  # above every other (at most 3)
    logits[EOS_TRIGGER] = -1e9
    if context[-1] == EOS_TRIGGER:
        logits[EOS] = 1e9
    return logits


def greedy_reference(prompt: list[int], p: SamplingParams) -> list[int]:
    """Greedy decoding of the toy model with the definitions applied token by token."""
    ctx, out = list(prompt), []
    for _ in range(p.max_tokens):
        row = reference_adjust(toy_logits(tuple(ctx)).tolist(), p, prompt, out, {EOS})
        tok = max(range(VOCAB), key=lambda t: row[t])
        out.append(tok)
        ctx.append(tok)
        if tok == EOS or tok in p.stop_token_ids:
            break
    return out


def Runner(num_blocks=64, block_size=4):
    return ContextRunner(toy_logits, VOCAB, num_blocks, block_size)


@pytest.fixture
def engines():
    made = []

    def make(method="none", k=0, **cfg):
        cfg.setdefault("max_context", 128)
        cfg.setdefault("spec_gate", False)
        config = EngineConfig(speculative_method=method, speculative_k=k, **cfg)
        engine = LLMEngine(Runner(), None, config, "toy")     # no tokenizer: tokens only, no text
        engine.eos_token_ids = frozenset({EOS})
        engine.start()
        made.append(engine)
        return engine

    yield make
    for e in made:
        e.shutdown()


def run(engine, *requests):
    async def one(r):
        return [t for e in [e async for e in engine.generate(r)] for t in e.token_ids]

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(r) for r in requests)), 60)
    return asyncio.run(main())


def req(rid, prompt, **params) -> GenerateRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 16)
    return GenerateRequest(rid, list(prompt), SamplingParams(**params), time.monotonic())


PENALTIES = [dict(repetition_penalty=2.0), dict(frequency_penalty=1.5), dict(presence_penalty=2.0),
             dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5)]


@pytest.mark.parametrize("penalty", PENALTIES)
def test_penalties_change_greedy_output_as_the_definitions_say(engines, penalty):
    engine = engines()
    prompt = [10, 11, 12]
    plain, penalized = run(engine, req("a", prompt), req("b", prompt, **penalty))
    assert plain == greedy_reference(prompt, SamplingParams(max_tokens=16, temperature=0.0))
    assert len(set(plain)) == 1                                  # the toy repeats itself ...
    assert penalized == greedy_reference(prompt, SamplingParams(max_tokens=16, temperature=0.0, **penalty))
    assert len(set(penalized)) > 1                               # ... until penalized


def test_repetition_penalty_counts_the_prompt_and_frequency_does_not(engines):
    engine = engines()
    prompt = [10, 11, 12]
    first = run(engine, req("p", prompt, max_tokens=1))[0][0]
    [rep], [freq] = run(engine, req("r", prompt + [first], max_tokens=1, repetition_penalty=3.0),
                        req("f", prompt + [first], max_tokens=1, frequency_penalty=2.0))
    row = toy_logits(tuple(prompt + [first]))
    assert row.argmax() != rep                          # the prompt's token was penalized
    assert freq == int(row.argmax())                    # not by frequency: that counts the output only


def test_min_tokens_suppresses_eos_and_stop_token_ids(engines):
    engine = engines()
    prompt = [10, 11, EOS_TRIGGER]
    plain, held = run(engine, req("a", prompt), req("b", prompt, min_tokens=5))
    assert plain == [EOS]
    assert EOS not in held[:5] and len(held) >= 5
    assert held == greedy_reference(prompt, SamplingParams(max_tokens=16, temperature=0.0, min_tokens=5))
    q = [20, 21]
    (free,) = run(engine, req("c", q))
    (stopped,) = run(engine, req("d", q, stop_token_ids=[free[0]]))
    (late,) = run(engine, req("e", q, stop_token_ids=[free[0]], min_tokens=3))
    assert stopped == [free[0]]
    assert free[0] not in late[:3] and len(late) > 1


def test_logit_bias_through_the_engine(engines):
    engine = engines()
    prompt = [10, 11, 12]
    (plain,) = run(engine, req("a", prompt))
    (banned,) = run(engine, req("b", prompt, logit_bias={plain[0]: -100.0}))
    assert plain[0] not in banned
    assert banned == greedy_reference(prompt, SamplingParams(max_tokens=16, temperature=0.0,
                                                             logit_bias={plain[0]: -100.0}))


def test_bad_values_are_refused_before_any_event(engines):
    engine = engines()
    for params in (dict(min_p=1.5), dict(min_tokens=20), dict(repetition_penalty=0.0), dict(presence_penalty=3.0),
                   dict(logit_bias={VOCAB: 1.0})):
        with pytest.raises(InvalidRequest):
            run(engine, req("x", [10], **params))


# --- exact under speculative decoding ---------------------------------------------------------------

SPEC_PROMPTS = [[10, 11, 12, 10, 11], [20, 21, 20, 21, 20], [30, 31, 32, 33], [40, 40, 41]]


#: Mild enough that runs still form (n-gram drafts get accepted) and a penalty ends each run mid-draft.
SPEC_PENALTIES = [dict(frequency_penalty=0.1), dict(repetition_penalty=1.05, frequency_penalty=0.15, presence_penalty=0.1),
                  dict(presence_penalty=0.3, frequency_penalty=0.12), dict(min_tokens=6, logit_bias={13: 2.5})]


@pytest.mark.parametrize("penalty", SPEC_PENALTIES)
def test_greedy_penalties_give_the_same_tokens_with_and_without_speculation(engines, penalty):
    reqs = [req(f"r{i}", p, max_tokens=24, **penalty) for i, p in enumerate(SPEC_PROMPTS)]
    plain = run(engines(), *reqs)
    spec_engine = engines("ngram", k=4)
    spec = run(spec_engine, *reqs)
    assert spec == plain
    assert spec == [greedy_reference(p, r.params) for p, r in zip(SPEC_PROMPTS, reqs)]
    s = spec_engine.stats()
    assert s["spec_accepted_tokens"] > 0, s             # drafts were verified with penalties, some kept


def test_seeded_sampling_with_penalties_is_identical_with_and_without_speculation(engines):
    params = dict(temperature=0.8, top_p=0.95, max_tokens=24, repetition_penalty=1.05, frequency_penalty=0.1,
                  presence_penalty=0.1, min_p=0.05)
    reqs = [req(f"r{i}", p, seed=7 + i, **params) for i, p in enumerate(SPEC_PROMPTS)]
    plain = run(engines(), *reqs)
    spec_engine = engines("ngram", k=3)
    assert run(spec_engine, *reqs) == plain
    s = spec_engine.stats()
    assert s["spec_accepted_tokens"] > 0, s


def test_min_tokens_with_a_stop_token_id_past_the_vocabulary_masks_the_rest():
    logits = torch.zeros(1, 10)
    p = SamplingParams(min_tokens=2, stop_token_ids=[4, 99])
    out = adjust_logits(logits, [p], [None], [0], None, (2,))
    assert out[0].isinf().nonzero().flatten().tolist() == [2, 4]
