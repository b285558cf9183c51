"""OpenAI conformance, /v1/completions scoring fields through the official openai SDK (sync, async,
streamed sync, streamed async): logprobs equal to the log-softmax of the toy model's logits (in
OpenAI's legacy shape), echo, vLLM's prompt_logprobs, n, best_of, a list of prompts (text or
token ids) in one request, and the fields it refuses."""
from __future__ import annotations

import math

import openai
import pytest

from conformance import toy_server

WALK = "Once upon a time"
TOL = 1e-4


@pytest.fixture(scope="module")
def live():
    with toy_server() as lv:
        yield lv


def encode(live, text: str) -> list[int]:
    return live.toy.tok.encode(text, add_special_tokens=True)


def check_position(live, context: list[int], token: int, value: float, top: dict[str, float] | None, k: int):
    """One position's logprob and top logprobs against the toy's log-softmax."""
    lsm = live.toy.logprobs(context)
    assert math.isclose(value, float(lsm[token]), abs_tol=TOL)
    if top is None:
        return
    want = {live.toy.text_of[i]: float(lsm[i]) for i in lsm.topk(k).indices.tolist()} if k else {}
    want[live.toy.text_of[token]] = float(lsm[token])                 # the chosen token, then the k most likely
    assert top.keys() == want.keys()
    for s, v in top.items():
        assert math.isclose(v, want[s], abs_tol=TOL)


@pytest.mark.parametrize("k", [0, 3])
def test_logprobs_are_the_models_log_softmax(live, api, k):
    prompt = encode(live, WALK)
    out = api.complete(prompt=WALK, max_tokens=8, temperature=1.0, seed=11, logprobs=k)
    lp = out.choices[0].logprobs
    ids = live.toy.ids(lp.tokens)
    assert "".join(lp.tokens) == out.choices[0].text and len(ids) == out.usage.completion_tokens == 8
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    for i, token in enumerate(ids):
        assert len(lp.top_logprobs[i]) in (k, k + 1)
        check_position(live, prompt + ids[:i], token, lp.token_logprobs[i], lp.top_logprobs[i], k)


def test_echo_returns_the_prompt_and_its_logprobs_first(live, api):
    prompt = encode(live, WALK)
    out = api.complete(prompt=WALK, max_tokens=3, temperature=0, echo=True, logprobs=1)
    gen = live.toy.greedy(prompt, 3)
    assert out.choices[0].text == WALK + live.toy.decode(gen)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None     # nothing predicts the first token
    ids = prompt + gen
    assert len(lp.tokens) == len(ids) and out.usage.completion_tokens == 3
    for i in range(1, len(ids)):
        check_position(live, ids[:i], ids[i], lp.token_logprobs[i], lp.top_logprobs[i], 1)


def test_echo_with_max_tokens_0_scores_the_prompt_alone(live, api):
    """lm-eval's loglikelihood request: a token-id prompt, echo, logprobs, max_tokens 0."""
    prompt = encode(live, WALK + " and more")
    out = api.complete(prompt=prompt, max_tokens=0, echo=True, logprobs=0, temperature=0)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == live.toy.decode(prompt) and len(lp.tokens) == len(prompt)
    assert out.usage.completion_tokens == 1          # as vLLM counts it: the one token generated and not shown
    assert lp.token_logprobs[0] is None
    for i in range(1, len(prompt)):
        check_position(live, prompt[:i], prompt[i], lp.token_logprobs[i], lp.top_logprobs[i], 0)


def test_prompt_logprobs_score_every_prompt_token(live, api):
    prompt = encode(live, WALK)
    if api.streamed:          # as vLLM: "prompt_logprobs are not available when stream=True"
        with pytest.raises(openai.BadRequestError) as e:
            api.complete(prompt=WALK, max_tokens=2, extra_body={"prompt_logprobs": 2})
        assert e.value.body["param"] == "prompt_logprobs"
        return
    out = api.complete(prompt=WALK, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 2})
    plp = out.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(prompt)
    for i in range(1, len(prompt)):
        lsm = live.toy.logprobs(prompt[:i])
        top2 = lsm.topk(2).indices.tolist()
        assert set(plp[i]) == {str(prompt[i]), *map(str, top2)}
        for token, entry in plp[i].items():
            t = int(token)
            assert math.isclose(entry["logprob"], float(lsm[t]), abs_tol=TOL)
            assert entry["rank"] == 1 + int((lsm > lsm[t]).sum())
            assert entry["decoded_token"] == live.toy.text_of[t]


def test_n_gives_n_distinct_choices_with_their_indices(live, api):
    out = api.complete(prompt=WALK, max_tokens=8, temperature=1.0, seed=3, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) == 3
    assert out.usage.completion_tokens == 24 and out.usage.prompt_tokens == len(encode(live, WALK))


def test_seeded_copies_are_reproducible_and_echo_only_adds_the_prompt(live, api):
    """Copy j of a seeded request samples with seed + j (vLLM's children), streamed or not, echoed or not."""
    kw = {"prompt": WALK, "max_tokens": 6, "temperature": 1.0, "seed": 2, "n": 3}
    texts = [c.text for c in api.complete(**kw).choices]
    assert len(set(texts)) == 3 and texts == [c.text for c in api.complete(**kw).choices]
    assert [c.text for c in api.complete(echo=True, **kw).choices] == [WALK + t for t in texts]
    assert texts[1] == api.complete(**{**kw, "n": 1, "seed": 3}).choices[0].text


def test_the_copies_of_a_prompt_share_its_prefill(live, api):
    prompt = f"A prompt this suite sends once ({api.mode}), long enough to fill two blocks of sixteen tokens"
    full_blocks = len(encode(live, prompt)) // 16 * 16
    before = live.engine.stats()["prefix_hit_tokens"]
    api.complete(prompt=prompt, max_tokens=3, temperature=1.0, seed=1, n=4)
    assert full_blocks >= 32 and live.engine.stats()["prefix_hit_tokens"] - before == 3 * full_blocks


def test_best_of_returns_the_most_likely_of_its_candidates(live, api):
    kw = {"prompt": WALK, "max_tokens": 4, "temperature": 1.0, "seed": 5, "logprobs": 0}
    if api.streamed:          # the best copies are known only at the end (vLLM refuses it too)
        with pytest.raises(openai.BadRequestError) as e:
            api.complete(n=1, best_of=3, **kw)
        assert e.value.body["param"] == "best_of"
        return
    candidates = api.complete(n=3, best_of=3, **kw).choices
    score = {c.text: sum(c.logprobs.token_logprobs) for c in candidates}
    assert len(score) == 3
    best = api.complete(n=1, best_of=3, **kw).choices
    assert len(best) == 1 and best[0].index == 0 and best[0].text == max(score, key=score.get)
    two = api.complete(n=2, best_of=3, **kw).choices
    assert [c.text for c in two] == sorted(score, key=score.get, reverse=True)[:2]


def test_a_list_of_prompts_gives_one_choice_per_prompt_in_order(live, api):
    prompts = [WALK, "Please stay", "Hello there friend"]
    out = api.complete(prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for c, p in zip(out.choices, prompts):
        assert c.text == live.toy.decode(live.toy.greedy(encode(live, p), 5))
    assert out.usage.prompt_tokens == sum(len(encode(live, p)) for p in prompts)
    assert out.usage.completion_tokens == 15
    # token-id prompts, with n: choice index = prompt * n + copy
    ids = [encode(live, p) for p in prompts[:2]]
    out = api.complete(prompt=ids, max_tokens=3, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        assert c.text == live.toy.decode(live.toy.greedy(ids[c.index // 2], 3))


def test_prompts_times_copies_with_echo_and_logprobs(live, api):
    """lm-eval's and a sampler's request at once: two prompts, two copies each, echoed, with logprobs;
    each choice's tokens spell its text and score as the model does."""
    prompts = [WALK, "Hello there"]
    out = api.complete(prompt=prompts, max_tokens=5, temperature=1.0, seed=4, n=2, logprobs=1, echo=True)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        prompt = encode(live, prompts[c.index // 2])
        lp = c.logprobs
        assert c.text.startswith(prompts[c.index // 2]) and "".join(lp.tokens) == c.text
        ids = prompt + live.toy.ids(lp.tokens[len(prompt):])
        assert len(ids) == len(prompt) + 5 and lp.token_logprobs[0] is None
        for i in range(1, len(ids)):
            check_position(live, ids[:i], ids[i], lp.token_logprobs[i], lp.top_logprobs[i], 1)


@pytest.mark.parametrize("kw,param", [
    ({"suffix": "the end"}, "suffix"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"logprobs": 21}, "logprobs"),
    ({"extra_body": {"prompt_logprobs": -1}}, "prompt_logprobs"),
    ({"prompt": [[1, 99999]]}, "prompt"),
    ({"prompt": []}, "prompt"),
])
def test_refused_fields_are_400s_naming_the_field(live, api, kw, param):
    kw = {"prompt": WALK, "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        api.complete(**kw)
    assert e.value.body["param"] == param and param in e.value.message and "\n" not in e.value.message


def test_a_stream_sends_each_token_as_it_comes(live, clients):
    """Streamed, the text arrives in several chunks (not one at the end), the usage last."""
    c = clients["sync"].sync_client()
    chunks = list(c.completions.create(model="toy", prompt=WALK, max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    texts = [ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].text]
    assert len(texts) >= 3 and "".join(texts) == live.toy.decode(live.toy.greedy(encode(live, WALK), 6))
    assert chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices
