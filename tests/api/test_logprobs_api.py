"""logprobs, echo, prompt_logprobs, n, best_of and batched prompts through the official openai client
against a compiled tiny server (with a prefix cache): every logprob equals torch.log_softmax of the
Hugging Face reference model's logits, in vLLM's response shapes; the copies of a prompt (n > 1)
find it in the prefix cache instead of computing it again."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vsc.cli import main as vsc_main
from vsc.models.tiny import make_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
import live_server  # noqa: E402

SPEC = """
deployment logprobs_api {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{ arrivals = closed(4), prompt_tokens = normal(32, 8), output_tokens = fixed(8) }}
  accuracy {{ greedy_exact(probes = 2) }}
  serve {{ max_context = 256 }}
  optimize "fuse-qkv,paged-kv{{block=16}},continuous-batching{{max_batch=8,max_tokens=512}},prefix-cache{{policy=radix}}"
}}
"""
PROMPT = "The quick brown fox jumps over the lazy dog and then runs far away into the forest where"
ATOL = 1e-3      # f32 plan against the f32 reference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("lp-model") / "tiny-llama", arch="llama")


@pytest.fixture(scope="module")
def live(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lp-srv")
    spec = root / "lp.vs"
    spec.write_text(SPEC.format(model=model_dir))
    assert vsc_main(["compile", str(spec), "-o", str(root / "server")]) == 0
    server = live_server.Live(root / "server")
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()

    def log_softmax(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return log_softmax


def encode(live, text: str) -> list[int]:
    return list(live.engine.tokenizer.encode(text, add_special_tokens=True))


def token_text(live, token_id: int) -> str:
    return live.engine.tokenizer.decode([token_id], skip_special_tokens=False)


def test_completion_logprobs_equal_reference_log_softmax(live, reference):
    r = live.client.completions.create(model=live.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    prompt = encode(live, PROMPT)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    # the generated ids: each position's greedy pick under the reference
    ids = list(prompt)
    for i in range(5):
        ref = reference(ids)[-1]
        best = int(ref.argmax())
        assert lp.tokens[i] == token_text(live, best)
        assert lp.token_logprobs[i] == pytest.approx(float(ref[best]), abs=ATOL)
        top3 = ref.topk(3)
        want = {token_text(live, int(t)): float(v) for t, v in zip(top3.indices, top3.values)}
        assert lp.top_logprobs[i].keys() == want.keys()       # greedy: the chosen token is the first of them
        for k, v in want.items():
            assert lp.top_logprobs[i][k] == pytest.approx(v, abs=ATOL)
        ids.append(best)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_echo_with_max_tokens_0_returns_the_prompt_and_its_logprobs(live, reference):
    """lm-eval's loglikelihood request: echo + logprobs with max_tokens 0 (vLLM: the prompt alone)."""
    r = live.client.completions.create(model=live.model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                       temperature=0)
    choice = r.choices[0]
    prompt = encode(live, PROMPT)
    assert choice.text == PROMPT
    lp = choice.logprobs
    assert lp.tokens == [token_text(live, t) for t in prompt]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference(prompt)
    for i in range(1, len(prompt)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=ATOL)
        assert token_text(live, prompt[i]) in lp.top_logprobs[i]
    # as vLLM: the prompt logprobs echo computed are also in the choice's prompt_logprobs
    extra = choice.model_extra["prompt_logprobs"]
    assert extra[0] is None and extra[1][str(prompt[1])]["logprob"] == lp.token_logprobs[1]
    # served again, the prompt is in the prefix cache: its logprobs are computed all the same
    again = live.client.completions.create(model=live.model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    assert again.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=ATOL)


def test_echo_with_generation_and_streaming_logprobs(live):
    kwargs = dict(model=live.model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True)
    whole = live.client.completions.create(**kwargs).choices[0]
    assert whole.text.startswith(PROMPT)
    chunks = list(live.client.completions.create(stream=True, **kwargs))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert tokens == whole.logprobs.tokens
    assert values[0] is None and values[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-6)


def test_chat_logprobs_and_top_logprobs_equal_reference(live, reference):
    messages = [{"role": "user", "content": "Name a colour."}]
    r = live.client.chat.completions.create(model=live.model, messages=messages, max_tokens=3, temperature=0,
                                            logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    ids = list(live.engine.tokenizer.encode(live.engine.tokenizer.apply_chat_template(messages)))
    for item in content:
        ref = reference(ids)[-1]
        best = int(ref.argmax())
        assert item.token == token_text(live, best)
        assert item.bytes == list(item.token.encode("utf-8", errors="replace"))
        assert item.logprob == pytest.approx(float(ref[best]), abs=ATOL)
        top = ref.topk(2)
        assert [t.token for t in item.top_logprobs] == [token_text(live, int(i)) for i in top.indices]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(top.values.tolist(), abs=ATOL)
        ids.append(best)
    streamed = live.client.chat.completions.create(model=live.model, messages=messages, max_tokens=3, temperature=0,
                                                   logprobs=True, top_logprobs=2, stream=True)
    got = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert got == [item.token for item in content]


def test_prompt_logprobs_vllm_extension(live, reference):
    r = live.client.completions.create(model=live.model, prompt=PROMPT, max_tokens=1, temperature=0,
                                       extra_body={"prompt_logprobs": 2})
    got = r.choices[0].model_extra["prompt_logprobs"]
    prompt = encode(live, PROMPT)
    ref = reference(prompt)
    assert got[0] is None and len(got) == len(prompt)
    for i in range(1, len(prompt)):
        entry = got[i][str(prompt[i])]
        assert entry["logprob"] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=ATOL)
        assert entry["rank"] == int((ref[i - 1] > ref[i - 1, prompt[i]]).sum()) + 1
        assert entry["decoded_token"] == token_text(live, prompt[i])
        for t in ref[i - 1].topk(2).indices.tolist():
            assert str(t) in got[i]


def test_n_copies_share_the_prompt_prefill(live):
    before = live.engine.stats()
    prompt = "Seven tired sailors rowed their small boat across the grey harbour before the storm came in"
    kwargs = dict(model=live.model, prompt=prompt, max_tokens=6, temperature=1.0, seed=11)
    r = live.client.completions.create(n=3, **kwargs)
    after = live.engine.stats()
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1              # seed + copy index: different samples
    assert r.usage.completion_tokens == sum(6 for _ in r.choices)
    n_prompt = len(encode(live, prompt))
    assert r.usage.prompt_tokens == n_prompt
    cached = (n_prompt - 1) // 16 * 16
    # the prompt was computed once: both other copies found its full blocks in the prefix cache
    assert after["prefix_hit_tokens"] - before["prefix_hit_tokens"] == 2 * cached > 0
    again = live.client.completions.create(n=3, **kwargs)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    one = live.client.completions.create(**kwargs)
    assert one.choices[0].text == r.choices[0].text          # copy 0 samples with the request's seed


def test_batched_prompts_and_best_of(live):
    prompts = ["Once upon a time", "The weather today"]
    r = live.client.completions.create(model=live.model, prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        alone = live.client.completions.create(model=live.model, prompt=prompt, max_tokens=4, temperature=0)
        assert r.choices[2 * p].text == r.choices[2 * p + 1].text == alone.choices[0].text
    assert r.usage.prompt_tokens == sum(len(encode(live, p)) for p in prompts)
    best = live.client.completions.create(model=live.model, prompt=prompts[0], max_tokens=4, temperature=1.0,
                                          seed=3, n=1, best_of=4, logprobs=0)
    assert len(best.choices) == 1
    total = sum(best.choices[0].logprobs.token_logprobs)
    for j in range(4):            # best_of's copies are the seeded copies j: the kept one scores highest
        copy = live.client.completions.create(model=live.model, prompt=prompts[0], max_tokens=4, temperature=1.0,
                                              seed=3 + j, logprobs=0)
        assert sum(copy.choices[0].logprobs.token_logprobs) <= total + 1e-6


@pytest.mark.parametrize("body, param", [
    ({"n": 0}, "n"), ({"n": 2, "best_of": 1}, "best_of"), ({"logprobs": 21}, "logprobs"),
    ({"max_tokens": 0}, "max_tokens"), ({"best_of": 2, "stream": True}, "best_of"), ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
])
def test_bad_scoring_parameters_are_refused(live, body, param):
    import httpx2 as httpx
    resp = httpx.post(live.base + "/v1/completions", json={"model": live.model, "prompt": "hi", **body})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param


def test_chat_top_logprobs_needs_logprobs(live):
    import httpx2 as httpx
    resp = httpx.post(live.base + "/v1/chat/completions",
                      json={"model": live.model, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "top_logprobs"


def test_streamed_n_and_batched_prompts_give_the_collected_choices(live):
    kwargs = dict(model=live.model, prompt=["Once upon a time", "The weather today"], max_tokens=5, n=2,
                  temperature=0.9, seed=21, logprobs=1)
    whole = live.client.completions.create(**kwargs)
    chunks = list(live.client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    reasons: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.logprobs:
                tokens.setdefault(c.index, []).extend(c.logprobs.tokens)
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert tokens == {c.index: c.logprobs.tokens for c in whole.choices}
    assert reasons == {c.index: "length" for c in whole.choices}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streamed_chat_with_n(live):
    messages = [{"role": "user", "content": "Say something."}]
    whole = live.client.chat.completions.create(model=live.model, messages=messages, max_tokens=4, n=3, seed=2,
                                                temperature=1.0)
    streamed = live.client.chat.completions.create(model=live.model, messages=messages, max_tokens=4, n=3, seed=2,
                                                   temperature=1.0, stream=True)
    texts: dict[int, str] = {}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert len(whole.choices) == 3


def test_lm_eval_style_batched_token_prompts_with_echo(live, reference):
    """lm-eval's local-completions loglikelihood request: token-id prompts in one batch, echo,
    max_tokens 1, logprobs 1; it reads token_logprobs[ctxlen:-1] of each choice, by index."""
    contexts = [encode(live, "The sky is"), encode(live, "Two plus two is")]
    conts = [list(live.engine.tokenizer.encode(" blue")), list(live.engine.tokenizer.encode(" four"))]
    prompts = [c + x for c, x in zip(contexts, conts)]
    r = live.client.completions.create(model=live.model, prompt=prompts, echo=True, max_tokens=1, logprobs=1,
                                       temperature=0, seed=1234)
    assert [c.index for c in r.choices] == [0, 1]
    for choice, ids, ctx in zip(r.choices, prompts, contexts):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
        ref = reference(ids)
        got = lp.token_logprobs[len(ctx):-1]
        want = [float(ref[i - 1, ids[i]]) for i in range(len(ctx), len(ids))]
        assert got == pytest.approx(want, abs=ATOL)
        for i, top in zip(range(len(ctx), len(ids)), lp.top_logprobs[len(ctx):-1]):
            greedy = int(ref[i - 1].argmax()) == ids[i]
            assert (lp.token_logprobs[i] == max(top.values())) == greedy     # lm-eval's is_greedy


def test_json_mode_logprobs_are_of_the_masked_logits(live, reference):
    """As vLLM (its structured-output bitmask applies before the sampler's raw logprobs): in json mode
    a token's logprob is the log-softmax of the model's logits with the grammar's forbidden tokens at -inf."""
    from vsc.runtime.constrain import ANY_JSON_OBJECT, apply_constraints, make_constraint
    messages = [{"role": "user", "content": "Give me a JSON object."}]
    r = live.client.chat.completions.create(model=live.model, messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=2, response_format={"type": "json_object"})
    content = r.choices[0].logprobs.content
    constraint = make_constraint(live.engine.tokenizer, live.engine.vocab_size, ANY_JSON_OBJECT)
    ids = list(live.engine.tokenizer.encode(live.engine.tokenizer.apply_chat_template(messages)))
    for item in content:
        raw = reference(ids)[-1]
        masked = torch.log_softmax(apply_constraints(raw[None], [constraint])[0], dim=-1)
        best = int(masked.argmax())
        assert item.token == token_text(live, best)
        assert item.logprob == pytest.approx(float(masked[best]), abs=ATOL)
        assert item.logprob > float(raw[best]) + 1e-3        # the allowed tokens share the mass
        ids.append(best)
        if constraint.advance(best) is not None:
            break
