"""JSON mode: grammar-constrained decoding, so every response is JSON matching a JSON Schema.

Built on llguidance (the Rust grammar engine behind Guidance; see vsc/passes/json_mode.py for
why this library). Per step, each constrained row of the logits is masked: every token the
grammar does not allow next is set to -inf before sampling, for greedy and sampled rows
alike, so whatever the sampler picks keeps the output a prefix of a valid document. EOS is
allowed only once the document is complete, and once nothing but EOS could follow (the
closing brace of the top-level object) the request finishes at once, with "stop".

Costs are paid once where they can be:
- `GrammarCompiler`: the llguidance view of the model's tokenizer (its token trie), built
  once per tokenizer object (`compiler_for`, a weak cache: one per server);
- per schema text, one compiled matcher kept as a prototype (LRU of `SCHEMA_CACHE`);
- per request, a `Constraint` holding a cheap deep copy of that prototype (the state).

Schemas are compiled with compact separators and no free whitespace between tokens
(llguidance's `whitespace_flexible: false`): a model then spends its tokens on content,
not on runs of spaces that the grammar would otherwise allow. A schema may override this
with llguidance's own `x-guidance` keyword.

A client's schema is untrusted input, checked at admission (`GrammarCompiler.admit`, which the
HTTP layer runs before a request reaches the engine): its size is bounded (`SCHEMA_MAX_BYTES`),
llguidance compiles it under explicit resource limits (`parser_limits`), and a short dry run
walks the path the grammar forces from the start (`PROBE_STEPS`), so a schema that admits no
document at all (`{"$ref": "#"}`) or forces an endless one (a `$ref` cycle through required
properties) is refused with one line naming the problem, never discovered mid-generation.
What only a sampled choice can reach still fails during generation: the matcher then enters
llguidance's error state, the request ends with finish_reason "error" carrying the message
(`Constraint.failure`), logged once per request.

This module is runtime: it never imports the compiler. What a schema must be (`check_schema`,
which the compiler's json-mode pass and the HTTP layer call to reject a bad schema early with
one clear line) lives in vsc.runtime.json_schema, re-exported here.
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch

from vsc.runtime.api import RuntimeError_
from vsc.runtime.json_schema import (ANY_JSON_OBJECT, GRAMMAR_LIMITS, JSON_DEFAULTS, LARK_PREFIX,  # noqa: F401
                                     SCHEMA_MAX_BYTES, SchemaError, _llguidance, _one_line, canonical_schema,
                                     check_schema, grammar_of, parser_limits)

log = logging.getLogger("vsc.runtime.constrain")

#: Compiled schemas kept per tokenizer (least recently used dropped first); refused ones are
#: remembered as well (their one-line reason), so a client repeating one is not compiled again.
SCHEMA_CACHE = 64

#: Admission's dry run: at most this many rounds of "compute the mask, take the tokens the
#: grammar forces" from the start, stopping at the first choice left to the model.
PROBE_STEPS = 16


class GrammarFailure(RuntimeError_):
    """A grammar that failed during generation (a resource limit, or a token it refused): carried
    on the request's last event. 400 for a request's own schema, 500 for the deployment's."""

    code = "grammar_error"

    def __init__(self, message: str, own_schema: bool):
        super().__init__(message)
        self.status = 400 if own_schema else 500
        self.param = "response_format" if own_schema else None


class GrammarCompiler:
    """Compiles schemas for one tokenizer; thread-safe (the engine's callers submit from
    the event loop while the engine thread runs)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int] = ()):
        llg = _llguidance()
        eos = [int(t) for t in eos_token_ids] or None
        self.vocab_size = int(vocab_size)
        self.tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=self.vocab_size, eos_token=eos)
        self._prototypes: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int) -> "GrammarCompiler":
        """From a vsc.runtime.tokenizer.Tokenizer (or a bare `tokenizers.Tokenizer`)."""
        hf = getattr(tokenizer, "tokenizer", tokenizer)
        to_str = getattr(hf, "to_str", None)
        if to_str is None:
            raise SchemaError("json mode needs the model's tokenizer.json (a `tokenizers` tokenizer)")
        return cls(to_str(), vocab_size, getattr(tokenizer, "eos_token_ids", ()) or ())

    def matcher(self, schema: str | dict) -> Any:
        """A fresh llguidance LLMatcher for `schema` (compiled and admitted once, then copied)."""
        return self._prototype(canonical_schema(schema)).deep_copy()

    def admit(self, schema: str | dict) -> str:
        """Compile and dry-run `schema` (or find it in the cache); returns its canonical text.

        Raises SchemaError naming the problem: too big, not a schema llguidance supports, over
        a grammar limit, admitting no document, or forcing one that never ends."""
        text = canonical_schema(schema)
        self._prototype(text)
        return text

    def _prototype(self, text: str) -> Any:
        with self._lock:
            proto = self._prototypes.get(text)
            if proto is not None:
                self._prototypes.move_to_end(text)
                if isinstance(proto, str):
                    raise SchemaError(proto)
                return proto
        llg = _llguidance()
        try:
            proto = llg.LLMatcher(self.tokenizer, grammar_of(text), log_level=0, limits=parser_limits())
            if proto.is_error():
                raise SchemaError(f"invalid JSON Schema: {_one_line(proto.get_error())}")
            _probe(proto.deep_copy(), self.vocab_size)
        except SchemaError as e:
            self._remember(text, str(e))
            raise
        self._remember(text, proto)
        return proto

    def _remember(self, text: str, entry: Any) -> None:
        with self._lock:
            self._prototypes[text] = entry
            self._prototypes.move_to_end(text)
            while len(self._prototypes) > SCHEMA_CACHE:
                self._prototypes.popitem(last=False)

    def constraint(self, schema: str | dict) -> "Constraint":
        return Constraint(self.matcher(schema), self.vocab_size)


_COMPILERS: "weakref.WeakKeyDictionary[Any, GrammarCompiler]" = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


def compiler_for(tokenizer: Any, vocab_size: int) -> GrammarCompiler:
    """The GrammarCompiler of `tokenizer` (built on first use, then cached with it)."""
    if tokenizer is None:
        raise SchemaError("json mode needs the model's tokenizer, and this engine has none")
    with _COMPILERS_LOCK:
        compiler = _COMPILERS.get(tokenizer)
        if compiler is None or compiler.vocab_size != vocab_size:
            compiler = GrammarCompiler.from_tokenizer(tokenizer, vocab_size)
            _COMPILERS[tokenizer] = compiler
    return compiler


def _probe(m: Any, vocab_size: int) -> None:
    """Admission's dry run on `m` (a copy; consumed): from the start, compute the mask and take
    the tokens the grammar forces, up to PROBE_STEPS times, until the model would have a choice
    or the document is complete. Raises SchemaError if the grammar fails on that path: it admits
    no document at all, or it forces one longer than llguidance's limits (an endless one)."""
    words = np.zeros(_words(vocab_size), dtype=np.int32)
    for _ in range(PROBE_STEPS):
        if m.is_stopped():
            break
        m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        forced = [] if m.is_error() else m.compute_ff_tokens()
        if forced:
            m.consume_tokens(forced)
        if m.is_error():
            raise SchemaError(_refusal(m.get_error()))
        if not forced:
            break


def _refusal(error: str) -> str:
    """The one line saying why a schema's grammar failed its dry run."""
    line = _one_line(error)
    if line.startswith("NoExtension"):    # llguidance: nothing may be generated at all
        return "the schema admits no JSON value (e.g. a `$ref` that only refers to itself)"
    if "Too many items" in line or "too complex" in line.lower():
        return (f"the schema forces a document past llguidance's limits ({line}); e.g. a `$ref` cycle "
                "through required properties admits no finite document")
    return f"invalid JSON Schema: {line}"


def make_constraint(tokenizer: Any, vocab_size: int, schema: str | dict) -> "Constraint":
    """A request's constraint (raises SchemaError, an InvalidRequest, for a bad schema)."""
    return compiler_for(tokenizer, vocab_size).constraint(schema)


class Constraint:
    """One request's position in its grammar: which tokens may come next, and advancing."""

    __slots__ = ("matcher", "vocab_size", "error")

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.error: str | None = None

    def fill_bitmask(self, row: np.ndarray) -> None:
        """Write the allowed-token bitmask (int32 words, bit t = token t allowed) into `row`."""
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def allowed(self) -> torch.Tensor:
        """Bool [vocab_size]: the tokens the grammar allows next."""
        words = np.empty((1, _words(self.vocab_size)), dtype=np.int32)
        self.fill_bitmask(words[0])
        return _unpack(words, self.vocab_size)[0]

    def advance(self, token: int) -> str | None:
        """Consume the sampled `token`. Returns the finish reason it causes: None (go on),
        "stop" (the document is complete: nothing but EOS may follow) or "error" (the grammar
        failed: a resource limit, or a token it refused, which masking prevents; `error` says
        which)."""
        if self.failure() is not None or not self.matcher.consume_token(int(token)):
            self.fail(f"after token {int(token)}: {_one_line(self.matcher.get_error())}")
            return "error"
        return "stop" if self.matcher.is_stopped() else None

    def failure(self) -> str | None:
        """Why the grammar failed (e.g. a limit hit computing the last mask); None while it works."""
        if self.error is None and self.matcher.is_error():
            self.fail(_one_line(self.matcher.get_error()))
        return self.error

    def fail(self, message: str) -> None:
        """Record the grammar's failure (the first one only; the engine logs it as the request ends)."""
        if self.error is None:
            self.error = message

    def forced(self, limit: int) -> list[int]:
        """Up to `limit` tokens the grammar forces next (llguidance's fast-forward tokens: the
        forced bytes in the tokenizer's canonical tokens, stopping where a longer token could
        still merge); [] when the next token is the model's choice. Leaves the state as it is."""
        if limit <= 0 or self.error is not None or self.matcher.is_stopped():
            return []
        return list(self.matcher.compute_ff_tokens())[:limit]

    def after(self, tokens: Sequence[int]) -> list["Constraint"]:
        """The states after tokens[:1], tokens[:2], ...: the masks of the positions that follow
        each of a step's drafts (this state is unchanged). Stops early at a token the grammar
        refuses (the rows past it are never sampled from)."""
        m = self.matcher.deep_copy()
        out = []
        for token in tokens:
            if not m.consume_token(int(token)):
                break
            out.append(Constraint(m.deep_copy(), self.vocab_size))
        return out

    @property
    def is_complete(self) -> bool:
        """The output so far is a whole document (EOS would be accepted)."""
        return bool(self.matcher.is_accepting())


def _words(vocab: int) -> int:
    return (vocab + 31) // 32


def _unpack(words: np.ndarray, vocab: int) -> torch.Tensor:
    """int32 bitmask words [n, W] -> bool [n, vocab] (bit k of word w is token 32w + k)."""
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    return torch.from_numpy(bits).bool()


def apply_constraints(logits: torch.Tensor, constraints: Sequence[Constraint | None]) -> torch.Tensor:
    """`logits` [B, V] with every token a row's constraint forbids set to -inf (rows whose
    constraint is None are left alone). Returns a new tensor; the input is not modified."""
    rows = [b for b, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    grammar_vocab = constraints[rows[0]].vocab_size      # one tokenizer per engine
    words = np.zeros((len(rows), _words(grammar_vocab)), dtype=np.int32)
    for i, b in enumerate(rows):
        constraints[b].fill_bitmask(words[i])
    allowed = _unpack(words, grammar_vocab)[:, :vocab]
    if allowed.shape[1] < vocab:                          # logits past the grammar's vocabulary: never allowed
        allowed = torch.cat([allowed, allowed.new_zeros(len(rows), vocab - allowed.shape[1])], dim=1)
    index = torch.tensor(rows, device=logits.device)
    out = logits.clone()
    out[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
    return out
