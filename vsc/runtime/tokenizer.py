"""Tokenizer of a Hugging Face model folder, without transformers, plus streaming decode.

`Tokenizer` wraps `tokenizers.Tokenizer` (tokenizer.json) and reads the chat template and
special tokens from tokenizer_config.json / chat_template.jinja. The chat template is
rendered the way transformers' `apply_chat_template(..., tokenize=False)` renders it (an
immutable sandboxed jinja2 environment with trim_blocks, lstrip_blocks, loop controls,
and the same `raise_exception`, `tojson`, `strftime_now` helpers), so a server formats a
conversation exactly as the model saw it in training.

`IncrementalDetokenizer` turns a stream of token ids into a stream of text that never
has to be taken back: a multi-byte character split over tokens, or text that might be
the start of a stop string, is held until it is settled.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from vsc.errors import ModelError

#: Special-token names transformers hands to every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


#: Texts longer than this are encoded without holding the GIL (tokenizers' encode() keeps it
#: for the whole call: 4 MB took 5 s here, with every other thread, the event loop included, stopped).
_GIL_FREE_CHARS = 8192

# Normalizers by how much they can shrink a text (characters in / characters out); any other
# (Strip, StripAccents, NMT, Precompiled, a regex Replace, ...) can drop text without bound.
_NORMALIZER_SHRINK = {"NFC": 4, "NFKC": 4, "NFD": 4, "NFKD": 4, "Lowercase": 1, "Prepend": 1}
# Pre-tokenizers that keep every character (Whitespace and friends drop the whitespace).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation"}


def chars_per_token_bound(tokenizer: HFTokenizer) -> int | None:
    """The most characters of input one token can stand for, when the pipeline allows a bound.

    A BPE token covers at most its own length in characters (byte-level: in bytes, and a
    character is at least a byte) of normalized text, and an NF*C normalizer composes at most
    4 code points into one; so tokens >= len(text) / (longest token * 4). None when some stage
    can drop text (a shrinking normalizer, a whitespace-dropping pre-tokenizer, fused or missing
    unknown tokens, added tokens that swallow whitespace)."""
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None
    pre = _flatten(spec.get("pre_tokenizer"), "pretokenizers")
    if any(p.get("type") not in _KEEPING_PRE_TOKENIZERS or p.get("behavior") == "Removed" for p in pre):
        return None
    byte_level = any(p.get("type") == "ByteLevel" for p in pre)
    if not (byte_level or model.get("byte_fallback") or (model.get("unk_token") and not model.get("fuse_unk"))):
        return None                     # characters outside the vocabulary vanish
    shrink = 1
    for n in _flatten(spec.get("normalizer"), "normalizers"):
        if n.get("type") == "Replace":
            pattern, content = (n.get("pattern") or {}).get("String"), n.get("content")
            if not isinstance(pattern, str) or not isinstance(content, str) or len(content) < len(pattern):
                return None
            continue
        factor = _NORMALIZER_SHRINK.get(n.get("type"))
        if factor is None:
            return None
        shrink *= factor
    if any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or []):
        return None
    longest = max((len(t) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1)
    return max(1, longest) * shrink


def _flatten(stage: dict | None, key: str) -> list[dict]:
    if not stage:
        return []
    if stage.get("type") == "Sequence":
        return [x for sub in stage.get(key) or [] for x in _flatten(sub, key)]
    return [stage]


# Where a server folder of a GGUF plan keeps the model's tokenizer and config (a GGUF
# carries them inside; `vsc compile` writes them out as HF files).
MODEL_META_DIR = "tokenizer"


def read_tokenizer_json(folder: str | Path, needed_for: str = "") -> HFTokenizer:
    """The `tokenizers.Tokenizer` of a model folder's tokenizer.json; ModelError when the file is
    missing (saying what it is `needed_for`, if given) or unreadable."""
    tok_file = Path(folder) / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelError(folder, "no tokenizer.json in the model folder" + (f" ({needed_for})" if needed_for else ""))
    try:
        return HFTokenizer.from_file(str(tok_file))
    except Exception as err:  # noqa: BLE001 - the Rust side raises plain Exceptions
        raise ModelError(tok_file, f"cannot read the tokenizer: {err}") from err


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None, eos_token_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_token_ids))
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._template: jinja2.Template | None = None
        #: At most this many characters of text make one token (None: no sound bound for this
        #: tokenizer), so a text of n characters is at least n / chars_per_token tokens long.
        self.chars_per_token: int | None = chars_per_token_bound(tokenizer)

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json, tokenizer_config.json, chat_template.jinja, config.json and
        generation_config.json (all but tokenizer.json optional) from a model folder."""
        path = Path(path)
        tokenizer = read_tokenizer_json(path)
        tok_config = _read_json(path / "tokenizer_config.json")
        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(tok_config.get(name))
            if content is not None:
                special[name] = content
        # transformers 5 saves the template as its own file, which wins over the config entry.
        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        else:
            chat_template = _pick_template(tok_config.get("chat_template"))
        eos_ids: list[int] = []
        for config_file in ("generation_config.json", "config.json"):
            eos_ids += _as_id_list(_read_json(path / config_file).get("eos_token_id"))
        if "eos_token" in special:
            eos_id = tokenizer.token_to_id(special["eos_token"])
            if eos_id is not None:
                eos_ids.append(eos_id)
        return cls(tokenizer, chat_template, special, eos_ids)

    # --- text <-> ids ----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if len(text) > _GIL_FREE_CHARS:     # encode() holds the GIL throughout; encode_batch() lets it go
            return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """The vocabulary's string of each id (byte-level BPE shows a space as 'Ġ'), as transformers gives them."""
        to_token = self.tokenizer.id_to_token
        return [to_token(i) for i in ids]

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    # --- chat ------------------------------------------------------------------------

    @functools.cached_property
    def supports_tools(self) -> bool:
        """The chat template renders a `tools` variable (else vsc.runtime.tools' fallback renders them)."""
        if self.chat_template is None:
            return False
        env = ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols])
        try:
            return "tools" in jinja2.meta.find_undeclared_variables(env.parse(self.chat_template))
        except jinja2.TemplateSyntaxError:
            return False

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **kwargs: Any) -> str:
        """The prompt text for `messages`, as transformers renders it with tokenize=False.

        Keys whose value is None are dropped from each message (as transformers does:
        OpenAI clients send `content: null` for tool calls). Extra keyword arguments
        (e.g. `tools`) are passed to the template. `continue_final_message`: the text ends
        right after the last message's content (no end-of-turn), so the model continues that
        message; found as transformers finds it, by a tag appended to the content.
        """
        if self.chat_template is None:
            raise ValueError("this model has no chat template")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        if continue_final_message:
            if not messages or not isinstance(messages[-1].get("content"), str):
                raise ValueError("continue_final_message needs a final message with text content")
            messages[-1]["content"] += _CONTINUE_TAG
        variables = {**self.special_tokens, **kwargs}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **variables)
        if continue_final_message:
            at = text.rfind(_CONTINUE_TAG.strip())
            if at == -1:
                raise ValueError("continue_final_message: the chat template dropped the final message's text")
            # a template that trims the message also trimmed its trailing space: trim it here too
            text = text[:at] if text.startswith(_CONTINUE_TAG, at) else text[:at].rstrip()
        return text


#: Marks the end of the final message's content while rendering for continue_final_message.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _compile_template(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # jinja's own tojson escapes HTML characters, which chat templates must not do.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(path, f"cannot read JSON: {err}") from err


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {name, template} (use "default")."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


class IncrementalDetokenizer:
    """Token ids in, settled text out; cuts the output before the first stop string.

    "First" means the first to be complete in the text: once a stop string has appeared,
    generation would have ended there, whatever a longer stop string might have become.

    Decoding works on a sliding window (as in vLLM): the text of the window's new tokens
    is decode(window) minus decode(window without them), which keeps the spaces and
    multi-byte characters that decoding tokens one by one would get wrong. The window
    starts with a few prompt tokens for the same reason. Text is released only when it
    does not end in U+FFFD (an incomplete UTF-8 sequence) and is not a possible start of
    a stop string.

    As in vLLM, `min_tokens`: no stop string is looked for in the text of the first min_tokens
    tokens (one that ends after it still counts); `include_stop`: the text keeps the stop string
    (include_stop_str_in_output).
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Any, prompt_ids: list[int] = (), stop: Iterable[str] = (),
                 skip_special_tokens: bool = True, min_tokens: int = 0, include_stop: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-self.CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._prefix_text = self._decode(self.ids)
        self.text = ""            # settled output text (cut before a stop string once found)
        self.emitted = 0          # how much of `text` has been returned
        self.stop = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._checked = 0         # `text` up to here holds no stop string
        self.stopped = False      # a stop string was found: output is complete
        self.min_tokens = min_tokens
        self.include_stop = include_stop
        self.added = 0            # tokens fed by add()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one generated token; returns the text that became settled (maybe "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self.added += 1
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(self._prefix_text) and not full.endswith("\ufffd"):
            self.text += full[len(self._prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self._prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        return self._release(final=False)

    def flush(self) -> str:
        """The generation ended for another reason: release everything still held."""
        if self.stopped:
            return ""
        if self.read_offset < len(self.ids):
            full = self._decode(self.ids[self.prefix_offset:])
            self.text += full[len(self._prefix_text):]
            self.prefix_offset = self.read_offset = len(self.ids)
            self._prefix_text = ""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.text
        start = self.emitted
        end = len(text)
        if self.stop and self.added <= self.min_tokens:
            self._checked = end       # min_tokens: this text cannot end a stop string
            if not final:
                end -= _held_back(text, self.stop)
        elif self.stop:
            # The stop string that completes first wins (on a tie, the longer one), as if
            # text arrived one character at a time: the result does not depend on how
            # the text is split into tokens. Only a match ending past `_checked` is new.
            found, found_end = -1, end + 1
            for s in self.stop:
                j = text.find(s, max(0, self._checked - len(s) + 1))
                if j != -1 and (j + len(s) < found_end or (j + len(s) == found_end and j < found)):
                    found, found_end = j, j + len(s)
            self._checked = end
            if found != -1:
                self.stopped = True
                end = found_end if self.include_stop else found
                self.text = text[:end]
            elif not final:
                end -= _held_back(text, self.stop)
        if end <= start:
            return ""
        self.emitted = end
        return text[start:end]


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is a proper start of some stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold
