"""vLLM's GET /tokenizer_info (what lm-eval's remote tokenizer reads): the special tokens, the
context and the chat template of the model folder's tokenizer; keyed like /tokenize."""
from __future__ import annotations

import httpx2 as httpx
import pytest

from vsc.models.tiny import make_tiny
from vsc.runtime.guard import Security
from vsc.runtime.tokenizer import Tokenizer

from http_fakes import FakeEngine, serving


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_model_dir(make_tiny(tmp_path_factory.mktemp("tok") / "tiny-llama"))


def test_tokenizer_info_gives_the_tokenizer_config(tok):
    with serving(FakeEngine(max_context=300), tokenizer=tok) as lv:
        r = httpx.get(lv.url + "/tokenizer_info", timeout=10)
    assert r.status_code == 200
    info = r.json()
    assert info == {"tokenizer_class": "Tokenizer", **tok.special_tokens, "model_max_length": 300,
                    "chat_template": tok.chat_template}
    # lm-eval takes the eos id from /tokenize of the eos token's text
    assert info["eos_token"] and tok.encode(info["eos_token"]) == [tok.tokenizer.token_to_id(info["eos_token"])]


def test_tokenizer_info_needs_the_key(tok):
    key = "sk-test-key"
    with serving(tokenizer=tok, security=Security(api_key=key)) as lv:
        assert httpx.get(lv.url + "/tokenizer_info", timeout=10).status_code == 401
        ok = httpx.get(lv.url + "/tokenizer_info", headers={"authorization": f"Bearer {key}"}, timeout=10)
        assert ok.status_code == 200 and ok.json()["eos_token"] == tok.eos_token
