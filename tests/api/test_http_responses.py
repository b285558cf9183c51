"""POST /v1/responses (OpenAI's Responses API, plain text) through the official openai SDK."""
from __future__ import annotations

import httpx2 as httpx
import pytest

from http_fakes import MODEL, OUTPUT, FakeEngine, FakeTokenizer, expected, serving


class _StoppingEngine(FakeEngine):
    """Ends every answer after its first "fox" (finish_reason stop), as a model's EOS would."""

    async def generate(self, request):
        request.params.stop = ["fox"]
        async for ev in super().generate(request):
            yield ev


def test_a_response_holds_the_chat_answer_and_its_usage():
    with serving() as lv, lv.client() as c:
        r = c.responses.create(model=MODEL, input="hello", instructions="be brief", max_output_tokens=7,
                               metadata={"k": "v"})
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
        prompt = FakeTokenizer().apply_chat_template(messages, add_generation_prompt=True)
        engine = lv.engine
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == expected(7)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == len(prompt) and r.usage.output_tokens == 7 and r.usage.total_tokens == len(prompt) + 7
    assert r.instructions == "be brief" and r.metadata == {"k": "v"} and r.max_output_tokens == 7
    (req,) = engine.requests.values()           # the chat template received instructions + input
    assert req.prompt_ids == FakeTokenizer().encode(prompt) and req.params.max_tokens == 7


def test_message_items_and_a_completed_response():
    items = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "output_text", "text": "yo"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                              {"type": "input_text", "text": "b"}]}]
    with serving(_StoppingEngine()) as lv, lv.client() as c:
        r = c.responses.create(model=MODEL, input=items, max_output_tokens=100, temperature=0)
        (req,) = lv.engine.requests.values()
    want = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "a\nb"}]
    assert req.prompt_ids == FakeTokenizer().encode(FakeTokenizer().apply_chat_template(want))
    assert req.params.temperature == 0.0
    assert r.status == "completed" and r.incomplete_details is None
    assert r.output_text == OUTPUT[:OUTPUT.index("fox")]
    assert r.output[0].type == "message" and r.output[0].role == "assistant" and r.output[0].status == "completed"


def test_the_stream_has_the_responses_events_in_order():
    with serving(_StoppingEngine()) as lv, lv.client() as c:
        events = list(c.responses.create(model=MODEL, input="hello", max_output_tokens=100, stream=True))
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:-4] == ["response.output_text.delta"] * len(deltas) and len(deltas) > 1
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = OUTPUT[:OUTPUT.index("fox")]
    assert "".join(deltas) == text == events[-4].text
    final = events[-1].response
    assert final.status == "completed" and final.output_text == text and final.id == events[0].response.id
    assert final.usage.output_tokens == len(text) + 3          # "fox" was generated, then cut


def test_a_stream_cut_by_max_output_tokens_ends_incomplete():
    with serving() as lv, lv.client() as c:
        events = list(c.responses.create(model=MODEL, input="hello", max_output_tokens=5, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == expected(5) and events[-1].response.usage.output_tokens == 5


@pytest.mark.parametrize("fields, param", [
    ({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"reasoning": {"effort": "low"}}, "reasoning"), ({"background": True}, "background"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": 5}, "input"), ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"text": {"format": {"type": "xml"}}}, "text"),
])
def test_refused_fields(fields, param):
    with serving() as lv:
        r = httpx.post(lv.url + "/v1/responses", json={"model": MODEL, "input": "hi", **fields}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_text_format_json_object_turns_on_json_mode():
    with serving() as lv, lv.client() as c:
        c.responses.create(model=MODEL, input="hi", max_output_tokens=3, text={"format": {"type": "json_object"}})
        (req,) = lv.engine.requests.values()
    assert req.params.json_schema is not None


def test_an_engine_failure_mid_stream_ends_in_response_failed():
    with serving() as lv, lv.client() as c:
        events = list(c.responses.create(model=MODEL, input="FAIL", max_output_tokens=20, stream=True))
        r = httpx.post(lv.url + "/v1/responses", json={"model": MODEL, "input": "FAIL", "max_output_tokens": 20},
                       timeout=10)
    assert events[0].type == "response.created" and events[-1].type == "response.failed"
    assert events[-1].response.status == "failed" and events[-1].response.error.message
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
