"""OpenAI conformance, sampling and output fields of both endpoints, through the official openai SDK
in each of its modes (sync, async, streamed sync, streamed async): every field's effect on a real
engine over the toy model (tests/api/conformance.py), compared to a plain-Python greedy decoder
that applies vLLM's definitions (max_tokens, temperature 0, seed, min_p, top_k, top_p, logit_bias,
presence / frequency / repetition penalties, min_tokens, stop, stop_token_ids,
include_stop_str_in_output, ignore_eos, truncate_prompt_tokens), and the 400s."""
from __future__ import annotations

import asyncio
import json
import logging

import jsonschema
import openai
import pytest
import torch

from conformance import COPY, MODEL, RETURN, Api, toy_server

ENDPOINTS = ("completions", "chat")
WALK = "Once upon a time"                 # greedy walks a chain of distinct tokens
REPEAT = "Please" + COPY                  # greedy repeats the last token
STOPPING = "Now" + RETURN                 # the model wants to stop at once


#: The engine plain, and drafting with n-gram speculative decoding on every step (the output must
#: not change: each verified row sees its drafts in its penalty counts and min_tokens position).
ENGINES = {"plain": {}, "ngram": {"speculative_method": "ngram", "speculative_k": 4, "spec_gate": False}}


@pytest.fixture(scope="module", params=list(ENGINES))
def live(request):
    with toy_server(**ENGINES[request.param]) as lv:
        yield lv


def ask(api: Api, endpoint: str, prompt: str, **kw):
    """(text, finish_reason, usage) of one choice on `endpoint`."""
    if endpoint == "chat":
        if "max_tokens" in kw:                 # chat's own name for it
            kw["max_completion_tokens"] = kw.pop("max_tokens")
        out = api.chat(messages=[{"role": "user", "content": prompt}], **kw)
        return out.choices[0].message.content, out.choices[0].finish_reason, out.usage
    if "response_format" in kw:                # a vLLM extension on completions: not in the SDK's signature
        kw["extra_body"] = {**kw.get("extra_body", {}), "response_format": kw.pop("response_format")}
    out = api.complete(prompt=prompt, **kw)
    return out.choices[0].text, out.choices[0].finish_reason, out.usage


def prompt_ids(live, endpoint: str, prompt: str) -> list[int]:
    tok = live.toy.tok
    if endpoint == "chat":
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
    return tok.encode(prompt, add_special_tokens=True)


def reference(live, endpoint: str, prompt: str, max_tokens: int, **adjust) -> str:
    return live.toy.decode(live.toy.greedy(prompt_ids(live, endpoint, prompt), max_tokens, **adjust))


# --- max_tokens, temperature, seed, min_p, top_k, top_p --------------------------------------------

@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_max_tokens_bounds_the_completion_and_temperature_0_is_greedy(live, api, endpoint):
    for n in (1, 7):
        text, reason, usage = ask(api, endpoint, WALK, max_tokens=n, temperature=0)
        assert usage.completion_tokens == n and reason == "length"
        assert usage.prompt_tokens == len(prompt_ids(live, endpoint, WALK))
        assert usage.total_tokens == usage.prompt_tokens + n
        assert text == reference(live, endpoint, WALK, n)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_seed_reproduces_a_sampled_answer_and_other_seeds_differ(live, api, endpoint):
    greedy = reference(live, endpoint, WALK, 10)
    runs = [ask(api, endpoint, WALK, max_tokens=10, temperature=1.0, seed=s)[0] for s in (7, 7, 8, 9)]
    assert runs[0] == runs[1]
    assert len(set(runs)) == 3 and greedy not in runs


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("field,value", [("min_p", 1.0), ("top_k", 1), ("top_p", 1e-6)])
def test_a_filter_keeping_only_the_top_token_is_greedy_even_at_temperature_1_5(live, api, endpoint, field, value):
    greedy = reference(live, endpoint, WALK, 10)
    kw = {"top_p": value} if field == "top_p" else {"extra_body": {field: value}}
    for seed in (1, 2):
        assert ask(api, endpoint, WALK, max_tokens=10, temperature=1.5, seed=seed)[0] != greedy   # free ...
        assert ask(api, endpoint, WALK, max_tokens=10, temperature=1.5, seed=seed, **kw)[0] == greedy   # ... not


def test_top_k_and_min_p_keep_every_sampled_token_among_the_allowed(live, api):
    """Each sampled token's rank under the toy's logits (read back through completions logprobs)."""
    toy = live.toy
    prompt = toy.tok.encode(WALK, add_special_tokens=True)

    def ranks(**kw) -> list[int]:
        out = api.complete(prompt=WALK, max_tokens=24, temperature=1.5, seed=3, logprobs=0, **kw)
        ids = toy.ids(out.choices[0].logprobs.tokens)
        return [int((toy.logits(prompt + ids[:i]) > toy.logits(prompt + ids[:i])[t]).sum())
                for i, t in enumerate(ids)]
    assert max(ranks()) >= 3
    assert max(ranks(extra_body={"top_k": 3})) < 3
    # min_p 0.5 at temperature 1.5: p_i >= p_max / 2, i.e. logit_i >= logit_max - 1.5 ln 2
    out = api.complete(prompt=WALK, max_tokens=24, temperature=1.5, seed=3, logprobs=0, extra_body={"min_p": 0.5})
    ids = toy.ids(out.choices[0].logprobs.tokens)
    for i, t in enumerate(ids):
        logits = toy.logits(prompt + ids[:i])
        assert logits[t] >= logits.max() - 1.5 * 0.6931472 - 1e-4
    # top_p 0.05 at temperature 1.5: the token is in the nucleus (the more likely tokens hold < 5%)
    out = api.complete(prompt=WALK, max_tokens=24, temperature=1.5, seed=3, logprobs=0, top_p=0.05)
    ids = toy.ids(out.choices[0].logprobs.tokens)
    for i, t in enumerate(ids):
        probs = torch.softmax(toy.logits(prompt + ids[:i]) / 1.5, dim=-1)
        assert float(probs[probs > probs[t]].sum()) < 0.05
    assert out.choices[0].text != api.complete(prompt=WALK, max_tokens=24, temperature=1.5, seed=3).choices[0].text


# --- logit_bias and the penalties --------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_logit_bias_minus_100_bans_and_plus_100_forces_a_token(live, api, endpoint):
    toy = live.toy
    plain = toy.greedy(prompt_ids(live, endpoint, WALK), 8)
    text, _, _ = ask(api, endpoint, WALK, max_tokens=8, temperature=0, logit_bias={str(plain[0]): -100})
    want = toy.greedy(prompt_ids(live, endpoint, WALK), 8, logit_bias={plain[0]: -100.0})
    assert plain[0] not in want and text == toy.decode(want) != toy.decode(plain)
    forced = toy.id_of[" value"]
    text, _, _ = ask(api, endpoint, WALK, max_tokens=5, temperature=1.0, seed=4, logit_bias={str(forced): 100})
    assert text == " value" * 5


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("field,value", [("presence_penalty", 2.0), ("frequency_penalty", 1.5),
                                         ("repetition_penalty", 2.0)])
def test_a_positive_penalty_breaks_repetition(live, api, endpoint, field, value):
    toy = live.toy
    plain = toy.greedy(prompt_ids(live, endpoint, REPEAT), 12)
    assert len(set(plain)) == 1                                       # the toy repeats itself
    kw = {"extra_body": {field: value}} if field == "repetition_penalty" else {field: value}
    text, _, _ = ask(api, endpoint, REPEAT, max_tokens=12, temperature=0, **kw)
    adjust = {"presence_penalty": "presence", "frequency_penalty": "frequency", "repetition_penalty": "repetition"}
    want = toy.greedy(prompt_ids(live, endpoint, REPEAT), 12, **{adjust[field]: value})
    assert text == toy.decode(want) and len(set(want)) > 1


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("field,value", [("presence_penalty", -2.0), ("frequency_penalty", -2.0),
                                         ("repetition_penalty", 0.5)])
def test_a_negative_penalty_makes_repetition_likelier(live, api, endpoint, field, value):
    toy = live.toy
    ids = prompt_ids(live, endpoint, WALK)
    plain = toy.greedy(ids, 16)
    kw = {"extra_body": {field: value}} if field == "repetition_penalty" else {field: value}
    text, _, _ = ask(api, endpoint, WALK, max_tokens=16, temperature=0, **kw)
    adjust = {"presence_penalty": "presence", "frequency_penalty": "frequency", "repetition_penalty": "repetition"}
    want = toy.greedy(ids, 16, **{adjust[field]: value})
    assert text == toy.decode(want) and len(set(want)) < len(set(plain))


# --- min_tokens, stop, stop_token_ids, include_stop_str_in_output, ignore_eos ---------------------------

@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_min_tokens_holds_off_eos(live, api, endpoint):
    text, reason, usage = ask(api, endpoint, STOPPING, max_tokens=12, temperature=0)
    assert (text, reason, usage.completion_tokens) == ("", "stop", 1)           # EOS at once
    text, reason, usage = ask(api, endpoint, STOPPING, max_tokens=12, temperature=0, extra_body={"min_tokens": 5})
    assert reason == "stop" and usage.completion_tokens == 6                     # 5 tokens, then EOS
    assert text == reference(live, endpoint, STOPPING, 12, min_tokens=5)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_min_tokens_defers_stop_strings_and_stop_token_ids(live, api, endpoint):
    toy = live.toy
    ids = prompt_ids(live, endpoint, WALK)
    full = toy.greedy(ids, 12)
    stop = toy.text_of[full[1]]
    assert toy.decode(full).count(stop) == 1                        # said once, as the second token
    text, reason, _ = ask(api, endpoint, WALK, max_tokens=12, temperature=0, stop=[stop])
    assert (text, reason) == (toy.text_of[full[0]], "stop")
    text, reason, _ = ask(api, endpoint, WALK, max_tokens=12, temperature=0, stop=[stop],
                          extra_body={"min_tokens": 3})
    assert (text, reason) == (toy.decode(full), "length")          # not looked for in the first 3 tokens
    # a stop token id is masked until min_tokens, as EOS is: the model says something else
    text, _, _ = ask(api, endpoint, WALK, max_tokens=12, temperature=0,
                     extra_body={"min_tokens": 3, "stop_token_ids": [full[1]]})
    want = toy.greedy(ids, 12, logit_bias={full[1]: float("-inf")}, stop_at_eos=True)[:2]
    assert text.startswith(toy.decode(want)) and not text.startswith(toy.decode(full[:2]))


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_ignore_eos_generates_max_tokens(live, api, endpoint):
    _, reason, usage = ask(api, endpoint, STOPPING, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert reason == "length" and usage.completion_tokens == 6


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_stop_strings_cut_the_text_and_include_stop_str_in_output_keeps_them(live, api, endpoint):
    full = reference(live, endpoint, WALK, 12)
    stop = full[6:9]
    at = full.find(stop)
    text, reason, _ = ask(api, endpoint, WALK, max_tokens=12, temperature=0, stop=[stop, "never said"])
    assert (text, reason) == (full[:at], "stop")
    text, reason, _ = ask(api, endpoint, WALK, max_tokens=12, temperature=0, stop=stop,
                          extra_body={"include_stop_str_in_output": True})
    assert (text, reason) == (full[:at] + stop, "stop")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_stop_token_ids_end_the_answer(live, api, endpoint):
    toy = live.toy
    plain = toy.greedy(prompt_ids(live, endpoint, WALK), 12)
    text, reason, usage = ask(api, endpoint, WALK, max_tokens=12, temperature=0,
                              extra_body={"stop_token_ids": [plain[3]]})
    assert (text, reason, usage.completion_tokens) == (toy.decode(plain[:3]), "stop", 4)
    text, _, _ = ask(api, endpoint, WALK, max_tokens=12, temperature=0,
                     extra_body={"stop_token_ids": [plain[3]], "include_stop_str_in_output": True})
    assert text == toy.decode(plain[:4])


# --- truncate_prompt_tokens -------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_truncate_prompt_tokens_keeps_the_last_k_tokens(live, api, endpoint):
    prompt = STOPPING + " and then" + " some more words after it"
    _, reason, usage = ask(api, endpoint, prompt, max_tokens=6, temperature=0)
    assert reason == "stop"                                          # the marker is in the prompt
    ids = prompt_ids(live, endpoint, prompt)
    text, reason, usage = ask(api, endpoint, prompt, max_tokens=6, temperature=0,
                              extra_body={"truncate_prompt_tokens": 4})
    assert usage.prompt_tokens == 4 and reason == "length"           # ... not in its last 4 tokens
    assert text == live.toy.decode(live.toy.greedy(ids[-4:], 6))


def test_truncation_side_right_keeps_the_first_k_tokens(live, api):
    toy = live.toy
    ids = toy.tok.encode(WALK, add_special_tokens=True)
    out = api.complete(prompt=WALK, max_tokens=4, temperature=0,
                       extra_body={"truncate_prompt_tokens": 2, "truncation_side": "right"})
    assert out.usage.prompt_tokens == 2 and out.choices[0].text == toy.decode(toy.greedy(ids[:2], 4))


def test_completions_max_tokens_defaults_to_16(live, api):
    out = api.complete(prompt=WALK, temperature=0)
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"


# --- structured outputs -------------------------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "kind": {"enum": ["cat", "dog"]}},
          "required": ["name", "age", "kind"], "additionalProperties": False}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("how", ["response_format", "structured_outputs"])
def test_json_schema_outputs_are_schema_valid(live, api, endpoint, how):
    kw = ({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
          if how == "response_format" else {"extra_body": {"structured_outputs": {"json": PERSON}}})
    free, _, _ = ask(api, endpoint, WALK, max_tokens=60, temperature=1.0, seed=5)
    with pytest.raises(ValueError):
        json.loads(free)
    for seed in (5, 6):
        text, reason, _ = ask(api, endpoint, WALK, max_tokens=80, temperature=1.0, seed=seed, **kw)
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_json_object_gives_a_json_object(live, api, endpoint):
    """The toy never ends a string on its own: a bias on '"' and '}' lets it finish an object (any
    object: the grammar decides what is allowed, the bias only which allowed token wins)."""
    toy = live.toy
    bias = {str(toy.id_of['"']): 50, str(toy.id_of["}"]): 50}
    for kw in ({"response_format": {"type": "json_object"}}, {"extra_body": {"structured_outputs": {"json_object": True}}}):
        text, reason, _ = ask(api, endpoint, WALK, max_tokens=40, temperature=0, logit_bias=bias, **kw)
        assert reason == "stop" and isinstance(json.loads(text), dict), text
    text, _, _ = ask(api, endpoint, WALK, max_tokens=40, temperature=0, logit_bias=bias)      # free: not JSON
    with pytest.raises(ValueError):
        json.loads(text)


# --- refused and unknown fields -------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("kw,param", [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"logit_bias": {"99999": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ({"extra_body": {"top_k": -2}}, "top_k"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"min_tokens": 9}}, "min_tokens"),                       # > max_tokens (4)
    ({"extra_body": {"structured_outputs": {"regex": "[a-z]+"}}}, "structured_outputs"),
    ({"extra_body": {"truncate_prompt_tokens": 10_000}}, "truncate_prompt_tokens"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_bad_values_are_400s_naming_the_field(live, api, endpoint, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        ask(api, endpoint, WALK, max_tokens=4, **kw)
    assert e.value.status_code == 400 and param in e.value.message and "\n" not in e.value.message
    assert e.value.body["param"] == param


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_stream_options(live, clients, endpoint):
    """include_usage adds a last chunk with the usage (given stream_options, true unless false, as
    vLLM's StreamOptions defaults it); vLLM's continuous_usage_stats
    (usage on every chunk) is refused, not ignored."""
    c = clients["sync"].sync_client()

    def stream(**opts):
        kw = {"model": MODEL, "max_tokens": 3, "temperature": 0, "stream": True, **opts}
        if endpoint == "chat":
            return list(c.chat.completions.create(messages=[{"role": "user", "content": WALK}], **kw))
        return list(c.completions.create(prompt=WALK, **kw))
    assert all(ch.usage is None for ch in stream())
    assert all(ch.usage is None for ch in stream(stream_options={"include_usage": False}))
    chunks = stream(stream_options={"include_usage": True})
    assert chunks[-1].usage.completion_tokens == 3 and not chunks[-1].choices
    assert all(ch.usage is None for ch in chunks[:-1])
    assert stream(stream_options={})[-1].usage.completion_tokens == 3      # vLLM's default: include_usage true
    with pytest.raises(openai.BadRequestError) as e:
        stream(stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert e.value.body["param"] == "stream_options" and "continuous_usage_stats" in e.value.message


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_unknown_fields_are_ignored_and_logged_known_ones_never(live, api, endpoint, caplog):
    plain = ask(api, endpoint, WALK, max_tokens=6, temperature=0)[0]
    with caplog.at_level(logging.WARNING, logger="vsc.runtime.http"):
        text = ask(api, endpoint, WALK, max_tokens=6, temperature=0, user="someone",
                   extra_body={"frobnicate": 1, "min_p": 0.0})[0]
    assert text == plain
    lines = [r.getMessage() for r in caplog.records if "frobnicate" in r.getMessage()]
    assert len(lines) == 1 and "min_p" not in lines[0] and "user" not in lines[0]


# vLLM request fields (vllm/entrypoints/openai/protocol.py) that change its output and that vsc
# does not implement: each is refused with a 400 naming it unless set to its "off" value (a vLLM
# client sending one would otherwise get a different answer than vLLM's with a 200).
VLLM_ONLY = [("completions", "allowed_token_ids", [300]), ("completions", "bad_words", ["cla"]),
             ("completions", "skip_special_tokens", False), ("completions", "spaces_between_special_tokens", False),
             ("completions", "use_beam_search", True), ("completions", "return_tokens_as_token_ids", True),
             ("completions", "logits_processors", ["my.module:Processor"]),
             ("completions", "add_special_tokens", False), ("chat", "add_special_tokens", True),
             ("chat", "chat_template", "{{ messages[0]['content'] }}"),
             ("chat", "chat_template_kwargs", {"enable_thinking": False}),
             ("chat", "documents", [{"title": "t", "text": "x"}])]


@pytest.mark.parametrize("endpoint,field,value", VLLM_ONLY)
def test_vllm_fields_vsc_does_not_implement_are_refused(clients, endpoint, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        ask(clients["sync"], endpoint, WALK, max_tokens=4, temperature=0, extra_body={field: value})
    assert e.value.body["param"] == field and field in e.value.message and "\n" not in e.value.message


VLLM_OFF = [("completions", "skip_special_tokens", True), ("completions", "add_special_tokens", True),
            ("chat", "add_special_tokens", False), ("completions", "use_beam_search", False),
            ("chat", "bad_words", []), ("chat", "chat_template_kwargs", {}), ("completions", "priority", 0)]


@pytest.mark.parametrize("endpoint,field,value", VLLM_OFF)
def test_vllm_fields_at_their_off_value_change_nothing(clients, endpoint, field, value):
    plain = ask(clients["sync"], endpoint, WALK, max_tokens=4, temperature=0)[0]
    assert ask(clients["sync"], endpoint, WALK, max_tokens=4, temperature=0, extra_body={field: value})[0] == plain


def test_each_request_keeps_its_own_parameters_in_a_shared_batch(live, clients):
    """Concurrent requests (the async client, gathered) share the engine's steps: each still gets
    its own answer, seeded ones the same tokens as alone, penalized and biased ones the reference's."""
    toy = live.toy
    ids = {p: prompt_ids(live, "completions", p) for p in (WALK, REPEAT, STOPPING)}
    cases = [({"prompt": WALK, "temperature": 1.0, "seed": s}, None) for s in (1, 2, 3)]
    cases += [({"prompt": REPEAT, "temperature": 0, "presence_penalty": 2.0}, toy.greedy(ids[REPEAT], 10, presence=2.0)),
              ({"prompt": REPEAT, "temperature": 0, "extra_body": {"repetition_penalty": 2.0}},
               toy.greedy(ids[REPEAT], 10, repetition=2.0)),
              ({"prompt": REPEAT, "temperature": 0}, toy.greedy(ids[REPEAT], 10)),
              ({"prompt": STOPPING, "temperature": 0, "extra_body": {"min_tokens": 4}},
               toy.greedy(ids[STOPPING], 10, min_tokens=4)),
              ({"prompt": WALK, "temperature": 0, "logit_bias": {str(toy.id_of[" value"]): 100}}, [toy.id_of[" value"]] * 10)]
    api = clients["async"]
    alone = [api.complete(max_tokens=10, **kw).choices[0].text for kw, _ in cases[:3]]

    async def together(c):
        outs = await asyncio.gather(*[c.completions.create(model=MODEL, max_tokens=10, **kw) for kw, _ in cases * 2])
        return [o.choices[0].text for o in outs]
    texts = api.run(together)
    for i, (kw, want) in enumerate(cases * 2):
        assert texts[i] == (alone[i % len(cases)] if want is None else toy.decode(want)), kw


def test_drafted_steps_keep_every_adjustment_exact(live, clients):
    """On the n-gram engine, a repeating answer is drafted (and, penalized, its drafts rejected):
    the answers are still the reference's."""
    stats = live.engine.stats()
    toy, ids = live.toy, prompt_ids(live, "completions", REPEAT)
    for kw, adjust in [({}, {}), ({"presence_penalty": 2.0}, {"presence": 2.0}),
                       ({"frequency_penalty": -2.0}, {"frequency": -2.0}),
                       ({"extra_body": {"repetition_penalty": 2.0}}, {"repetition": 2.0}),
                       ({"logit_bias": {str(toy.id_of[" value"]): 100}}, {"logit_bias": {toy.id_of[" value"]: 100.0}})]:
        out = clients["sync"].complete(prompt=REPEAT, max_tokens=12, temperature=0, **kw)
        assert out.choices[0].text == toy.decode(toy.greedy(ids, 12, **adjust)), kw
    after = live.engine.stats()
    drafted = after["spec_draft_tokens"] - stats["spec_draft_tokens"]
    accepted = after["spec_accepted_tokens"] - stats["spec_accepted_tokens"]
    if live.engine.config.speculative_method == "ngram":
        assert drafted > accepted > 0
    else:
        assert drafted == 0
