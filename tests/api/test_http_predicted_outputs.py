"""OpenAI predicted outputs (`prediction`) on both endpoints: the text reaches the engine as
token ids, usage reports accepted / rejected prediction tokens as OpenAI does (also in a
stream's usage chunk and through the openai SDK), and malformed predictions are 400s."""
from __future__ import annotations

import httpx2 as httpx
import orjson
import pytest

from http_fakes import ENDPOINTS, MODEL, post_fields, OUTPUT, FakeEngine, serving



@pytest.fixture(scope="module")
def live():
    with serving(FakeEngine(max_context=256)) as lv:
        yield lv


def post(live, path: str, **fields) -> httpx.Response:
    return post_fields(live, path, max_tokens=12, **fields)


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_the_prediction_reaches_the_engine_and_usage_counts_its_tokens(live, path):
    r = post(live, path, prediction={"type": "content", "content": "The quick red fox"})
    assert r.status_code == 200, r.text
    assert live.engine.requests[r.json()["id"]].params.prediction == [ord(c) for c in "The quick red fox"]
    details = r.json()["usage"]["completion_tokens_details"]
    assert details == {"accepted_prediction_tokens": len("The quick "), "rejected_prediction_tokens": 1}
    # text parts are joined; an empty prediction is none at all (no details in usage)
    parts = [{"type": "text", "text": "The "}, {"type": "text", "text": "quick"}]
    r = post(live, path, prediction={"type": "content", "content": parts})
    assert live.engine.requests[r.json()["id"]].params.prediction == [ord(c) for c in "The quick"]
    r = post(live, path, prediction={"type": "content", "content": ""})
    assert live.engine.requests[r.json()["id"]].params.prediction is None
    assert "completion_tokens_details" not in r.json()["usage"]


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_a_streams_usage_chunk_carries_the_prediction_counts(live, path):
    body = {"model": MODEL, "max_tokens": 12, **ENDPOINTS[path], "stream": True,
            "stream_options": {"include_usage": True}, "prediction": {"type": "content", "content": OUTPUT}}
    with httpx.stream("POST", live.url + path, content=orjson.dumps(body),
                      headers={"content-type": "application/json"}, timeout=10) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    usage = orjson.loads(lines[-1])["usage"]
    assert usage["completion_tokens_details"] == {"accepted_prediction_tokens": 12, "rejected_prediction_tokens": 1}


def test_the_openai_sdk_reads_the_counts(live):
    out = live.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, prediction={"type": "content", "content": OUTPUT})
    assert out.usage.completion_tokens_details.accepted_prediction_tokens == 8


@pytest.mark.parametrize("path", list(ENDPOINTS))
@pytest.mark.parametrize("prediction,message", [
    ("def f(): pass", "'prediction' must be {\"type\": \"content\""),
    ({"type": "text", "content": "x"}, "'prediction' must be {\"type\": \"content\""),
    ({"type": "content", "content": 5}, "'prediction.content' must be a string or a list of text parts"),
    ({"type": "content", "content": [{"type": "image_url"}]}, "'prediction.content' must be a string or a list"),
])
def test_malformed_predictions_are_400_with_one_clear_line(live, path, prediction, message):
    before = len(live.engine.requests)
    r = post(live, path, prediction=prediction)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "prediction" and message in err["message"] and "\n" not in err["message"]
    assert len(live.engine.requests) == before
