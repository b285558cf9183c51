"""OpenAI / vLLM conformance, the other endpoints through the official openai SDK (sync and async
clients; `client.get` / `client.post` for vLLM's own routes): /v1/models, /v1/models/{id},
/v1/responses (plain and streamed, through `responses.create` and the SDK's `responses.stream`
helper), /tokenize and /detokenize, /version, /health and vLLM's metric names at /metrics."""
from __future__ import annotations

import json
import logging

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conformance import MODEL, Api, apis, toy_server
from vsc import __version__

ASK = "Once upon a time"


@pytest.fixture(scope="module")
def live():
    with toy_server() as lv:
        yield lv


@pytest.fixture(scope="module")
def clients(live):
    with apis(live.url, ("sync", "async", "stream")) as out:
        yield out


@pytest.fixture(scope="module")
def root(live):
    """SDK clients whose base is the server's root (vLLM's routes are not under /v1)."""
    sync, async_ = openai.OpenAI(base_url=live.url, api_key="x", max_retries=0), Api(live.url, "async")
    async_.base = live.url
    yield sync, async_
    sync.close()
    async_.close()


def greedy_chat(live, messages, n: int) -> str:
    tok = live.toy.tok
    return live.toy.decode(live.toy.greedy(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True)),
                                           n))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_models_list_and_retrieve(clients, mode):
    if mode == "sync":
        c = clients["sync"].sync_client()
        models, one = c.models.list(), c.models.retrieve(MODEL)
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("no-such-model")
    else:
        async def run(c):
            with pytest.raises(openai.NotFoundError):
                await c.models.retrieve("no-such-model")
            return await c.models.list(), await c.models.retrieve(MODEL)
        models, one = clients["async"].run(run)
    assert [m.id for m in models.data] == [MODEL] and one.id == MODEL and one.object == "model"


# --- /v1/responses ---------------------------------------------------------------------------------

def test_responses_plain_and_streamed_give_the_chat_answer(live, clients):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ASK}]
    want = greedy_chat(live, messages, 6)
    kw = {"model": MODEL, "input": ASK, "instructions": "Be brief.", "max_output_tokens": 6, "temperature": 0}
    c = clients["sync"].sync_client()
    r = c.responses.create(**kw)
    events = list(c.responses.create(stream=True, **kw))

    async def run(c):
        return [e async for e in await c.responses.create(stream=True, **kw)]
    assert r.output_text == want and r.status == "incomplete" and r.usage.output_tokens == 6
    assert r.incomplete_details.reason == "max_output_tokens"
    for stream in (events, clients["async"].run(run)):
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        assert "".join(deltas) == want and len(deltas) > 1
        assert [e.type for e in stream][:2] == ["response.created", "response.in_progress"]
        last = stream[-1]
        assert last.type == "response.incomplete" and last.response.output_text == want
        assert last.response.incomplete_details.reason == "max_output_tokens" and last.response.usage.output_tokens == 6


PET = {"type": "object", "properties": {"kind": {"enum": ["cat"]}}, "required": ["kind"], "additionalProperties": False}


def test_responses_message_items_and_a_completed_answer_through_the_stream_helper(clients):
    input_ = [{"role": "developer", "content": "Be brief."},
              {"role": "user", "content": [{"type": "input_text", "text": ASK}]}]
    kw = {"model": MODEL, "input": input_, "max_output_tokens": 40, "temperature": 0,
          "text": {"format": {"type": "json_schema", "name": "pet", "strict": True, "schema": PET}}}
    c = clients["sync"].sync_client()
    plain = c.responses.create(**kw)
    with c.responses.stream(**kw) as s:
        streamed = s.get_final_response()

    async def run(c):
        async with c.responses.stream(**kw) as s:
            return await s.get_final_response()
    for r in (plain, streamed, clients["async"].run(run)):
        assert r.status == "completed" and json.loads(r.output_text) == {"kind": "cat"}
        assert r.output[0].type == "message" and r.output[0].role == "assistant"


@pytest.mark.parametrize("kw,param", [({"previous_response_id": "resp_1"}, "previous_response_id"),
                                      ({"store": True}, "store"),
                                      ({"tools": [{"type": "web_search"}]}, "tools"),
                                      ({"background": True}, "background")])
def test_responses_refuses_what_it_cannot_honour(clients, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        clients["sync"].sync_client().responses.create(model=MODEL, input=ASK, max_output_tokens=4, **kw)
    assert e.value.body["param"] == param and "\n" not in e.value.message


# --- vLLM's /tokenize, /detokenize, /version, /health ----------------------------------------------------

@pytest.mark.parametrize("mode", ["sync", "async"])
def test_tokenize_and_detokenize_round_trip(live, clients, root, mode):
    tok = live.toy.tok
    text = "Hello there, friend"
    messages = [{"role": "user", "content": ASK}]
    calls = [("/tokenize", {"model": MODEL, "prompt": text}),
             ("/tokenize", {"model": MODEL, "prompt": text, "add_special_tokens": False, "return_token_strs": True}),
             ("/tokenize", {"model": MODEL, "messages": messages})]

    def post(c, path, body):
        return c.post(path, body=body, cast_to=httpx.Response)
    sync, async_ = root
    if mode == "sync":
        out = [post(sync, p, b).json() for p, b in calls]
        back = post(sync, "/detokenize", {"model": MODEL, "tokens": out[0]["tokens"]}).json()
    else:
        async def run(c):
            res = [(await post(c, p, b)).json() for p, b in calls]
            return res, (await post(c, "/detokenize", {"model": MODEL, "tokens": res[0]["tokens"]})).json()
        out, back = async_.run(run)
    plain, strs, chat = out
    assert plain["tokens"] == tok.encode(text, add_special_tokens=True) and plain["count"] == len(plain["tokens"])
    assert plain["max_model_len"] == 512 and plain["token_strs"] is None
    assert strs["tokens"] == tok.encode(text) and len(strs["token_strs"]) == strs["count"]
    assert back == {"prompt": text}
    # the chat form counts what a chat completion's usage counts
    usage = clients["sync"].chat(messages=messages, max_completion_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens


def test_tokenize_and_detokenize_refuse_bad_input(live):
    for path, body, param in [("/tokenize", {"prompt": 5}, "prompt"),
                              ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
                               "messages"),
                              ("/detokenize", {"tokens": [1, 99999]}, "tokens"),
                              ("/detokenize", {"tokens": "1 2"}, "tokens")]:
        r = httpx.post(live.url + path, json=body, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_version_and_health(root):
    c = root[0]
    assert c.get("/version", cast_to=httpx.Response).json() == {"version": __version__}
    assert c.get("/health", cast_to=httpx.Response).status_code == 200


# --- metrics ---------------------------------------------------------------------------------------------

def test_vllm_metric_families_count_the_requests_served(live, clients):
    def families():
        return {f.name: f for f in text_string_to_metric_families(httpx.get(live.url + "/metrics", timeout=10).text)}

    def value(fams, family, sample, **labels):
        labels = {"model_name": MODEL, "engine": "0", **labels}
        (v,) = [s.value for s in fams[family].samples if s.name == sample and s.labels == labels]
        return v
    before, stats = families(), live.engine.stats()
    api = clients["sync"]
    long = "A prompt for the metrics test, long enough to fill two blocks of sixteen tokens in the cache"
    prompts = sum(api.complete(prompt=p, max_tokens=5, temperature=0).usage.prompt_tokens for p in (long, long))
    prompts += api.chat(messages=[{"role": "user", "content": ASK}], max_completion_tokens=3,
                        temperature=0).usage.prompt_tokens
    after = families()
    hits = live.engine.stats()["prefix_hit_tokens"] - stats["prefix_hit_tokens"]
    assert hits >= 32                                               # the second long prompt's two blocks
    for family, sample, delta in [("vllm:request_success", "vllm:request_success_total", 3),
                                  ("vllm:generation_tokens", "vllm:generation_tokens_total", 13),
                                  ("vllm:prompt_tokens", "vllm:prompt_tokens_total", prompts),
                                  ("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total", hits),
                                  ("vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count", 3),
                                  ("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count", 3),
                                  ("vllm:request_queue_time_seconds", "vllm:request_queue_time_seconds_count", 3)]:
        labels = {"finished_reason": "length"} if family == "vllm:request_success" else {}
        assert value(after, family, sample, **labels) - value(before, family, sample, **labels) == delta, family
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert after[gauge].type == "gauge" and value(after, gauge, gauge) >= 0
    assert not [n for n in after if not n.startswith(("vllm:", "vsc_", "python_", "process_"))]


@pytest.mark.parametrize("mode", ["sync", "stream"])
def test_one_info_log_line_per_request_never_the_prompt(clients, mode, caplog):
    secret = "Zanzibar"
    with caplog.at_level(logging.INFO, logger="vsc.runtime.http"):
        out = clients[mode].complete(prompt="Once " + secret, max_tokens=3, temperature=0)
        with pytest.raises(openai.BadRequestError):
            clients[mode].complete(prompt=secret, max_tokens=3, temperature=9)
    lines = [r.getMessage() for r in caplog.records if r.name == "vsc.runtime.http" and r.levelno == logging.INFO]
    assert all(secret not in line for line in lines)
    (done,) = [line for line in lines if "finish_reason" in line]
    assert out.id in done and "finish_reason=length" in done and "completion_tokens=3" in done
    assert f"prompt_tokens={out.usage.prompt_tokens}" in done and "ttft=" in done and "duration=" in done
    (refused,) = [line for line in lines if "refused" in line]
    assert "status=400" in refused and "param=temperature" in refused
