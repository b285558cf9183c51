"""Seeded, deterministic benchmark workloads, made from text already on this machine.

A `Workload` is a list of `BenchRequest`s (prompt text, its token count under the model's
tokenizer, max_tokens, extra request-body fields) plus an arrival process: `poisson(rate)`
(open loop; the inter-arrival times are drawn here, from the seed) or `closed(concurrency)`
(N users, each sending its next request when the last one ends).

Six kinds:

- `chat`           prose prompts; prompt/output lengths from distributions like the spec
                   language's: fixed(n), uniform(lo, hi), normal(mean, std), lognormal(mean, sigma).
- `shared-prefix`  agent-style: a long system prefix (default 768 tokens) that a fraction of
                   the requests (default 0.9) start with, plus a short unique user turn.
- `long-prefix`    shared-prefix at the length agents and RAG send: a 4096-token shared prefix.
- `code-edit`      a Python snippet plus an edit instruction (rename an identifier, add a
                   header comment, delete comment lines); the expected output is the edited snippet, so
                   it mostly copies a span of the prompt (what prompt-lookup speculation uses).
                   `meta["expected_output"]` holds it.
- `predicted-edit` code-edit's requests, each carrying the snippet as it was (the answer before
                   the edit) as OpenAI's predicted output, `extra["prediction"]`.
- `json`           a passage plus a request to answer with a JSON object following a schema;
                   the schema is in the prompt text and in `extra["response_format"]`
                   (OpenAI's `{"type": "json_schema", "json_schema": {name, schema, strict}}`).

Text comes from a fixed, sorted list of files (Debian's /usr/share/common-licenses, the
running Python's standard-library docstrings and sources); files that are missing are left
out, nothing is downloaded. Prompts are cut to their target lengths with the model's own
tokenizer and returned as text; `prompt_tokens` is the length of that text re-encoded
without special tokens (the server adds its BOS on top).

Same seed, same model tokenizer, same machine -> an identical workload (`fingerprint()`).
Three independent random streams are spawned from the seed (lengths, text, arrivals), so
e.g. changing the arrival rate leaves the prompts unchanged.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import re
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vsc.errors import VscError


class WorkloadError(VscError):
    """A workload that cannot be built (bad distribution text, no text, unknown kind)."""


# --------------------------------------------------------------------------- requests and arrivals

@dataclass
class BenchRequest:
    """One request of a workload.

    `extra` is merged into the request body as is (e.g. `response_format`); `meta` is for
    the benchmark only and never sent (expected output, shared-prefix length, ...).
    """

    prompt: str
    prompt_tokens: int
    max_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Arrival:
    """The arrival process: `poisson` (open loop, `rate` req/s; inf = all at once) or `closed`."""

    kind: str
    rate: float | None = None
    concurrency: int | None = None

    def __post_init__(self):
        if self.kind == "poisson":
            if self.rate is None or not self.rate > 0:
                raise WorkloadError(f"poisson arrivals need a rate > 0 req/s, got {self.rate}")
        elif self.kind == "closed":
            if self.concurrency is None or self.concurrency < 1:
                raise WorkloadError(f"closed-loop arrivals need a concurrency >= 1, got {self.concurrency}")
        else:
            raise WorkloadError(f"unknown arrival process '{self.kind}' (known: poisson, closed)")

    def __str__(self) -> str:
        if self.kind == "poisson":
            return f"poisson({self.rate:g} req/s)"
        return f"closed({self.concurrency})"


def poisson(rate: float) -> Arrival:
    """Open loop: exponential inter-arrival times with mean 1/rate (rate=inf: all at t=0)."""
    return Arrival("poisson", rate=float(rate))


def closed(concurrency: int) -> Arrival:
    """Closed loop: `concurrency` users, each sending its next request when the last one ends."""
    return Arrival("closed", concurrency=int(concurrency))


@dataclass
class Workload:
    name: str
    requests: list[BenchRequest]
    arrival: Arrival
    seed: int
    description: str = ""
    #: Poisson only: send offsets in seconds from the start, one per request (first at 0).
    arrival_times: list[float] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def fingerprint(self) -> str:
        """sha256 over everything that defines the workload (requests, arrivals, params)."""
        payload = {"name": self.name, "arrival": asdict(self.arrival), "seed": self.seed,
                   "arrival_times": self.arrival_times, "params": self.params,
                   "requests": [asdict(r) for r in self.requests]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def describe(self) -> str:
        """One line: kind, size, arrivals, mean lengths."""
        n = len(self.requests)
        p = sum(r.prompt_tokens for r in self.requests) / max(n, 1)
        o = sum(r.max_tokens for r in self.requests) / max(n, 1)
        return (f"{self.name}: {n} requests, {self.arrival}, seed {self.seed}, "
                f"mean prompt {p:.0f} tok, mean max_tokens {o:.0f} tok"
                + (f" ({self.description})" if self.description else ""))


# --------------------------------------------------------------------------- length distributions

_DIST_PARAMS = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2}


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution, as the spec language writes it.

    fixed(n); uniform(lo, hi) (integers, both ends included); normal(mean, std) (rounded);
    lognormal(mean, sigma): sigma is the log-space standard deviation and `mean` the mean
    of the distribution itself (mu = ln(mean) - sigma^2 / 2). Samples are clipped to
    [lo, hi] given to `sample` (at least 1).
    """

    kind: str
    params: tuple[float, ...]

    def __post_init__(self):
        if self.kind not in _DIST_PARAMS:
            raise WorkloadError(f"unknown length distribution '{self.kind}' (known: {', '.join(_DIST_PARAMS)})")
        if len(self.params) != _DIST_PARAMS[self.kind]:
            raise WorkloadError(f"{self.kind}() takes {_DIST_PARAMS[self.kind]} parameter(s), got {len(self.params)}")
        if self.kind == "uniform" and self.params[0] > self.params[1]:
            raise WorkloadError(f"uniform(lo, hi) needs lo <= hi, got {self}")
        if self.kind in ("normal", "lognormal") and self.params[1] < 0:
            raise WorkloadError(f"{self.kind}() needs a non-negative spread, got {self}")
        if self.kind in ("fixed", "lognormal") and self.params[0] <= 0:
            raise WorkloadError(f"{self.kind}() needs a positive length, got {self}")

    @staticmethod
    def parse(text: str) -> "LengthDist":
        """'fixed(64)', 'uniform(32, 256)', 'normal(96,24)', 'lognormal(48, 0.5)', or a bare '64'."""
        t = text.strip()
        if re.fullmatch(r"\d+", t):
            return LengthDist("fixed", (float(t),))
        m = re.fullmatch(r"([a-z]+)\s*\(([^)]*)\)", t)
        if not m:
            raise WorkloadError(f"bad length distribution '{text}' (e.g. fixed(64), uniform(32, 256))")
        try:
            params = tuple(float(x) for x in m.group(2).split(",") if x.strip())
        except ValueError:
            raise WorkloadError(f"bad length distribution '{text}': parameters must be numbers") from None
        return LengthDist(m.group(1), params)

    @staticmethod
    def from_ir(d: dict) -> "LengthDist":
        """From a plan's workload entry: {kind = "uniform", params = [32.0, 256.0]}."""
        return LengthDist(str(d["kind"]), tuple(float(x) for x in d["params"]))

    def mean(self) -> float:
        if self.kind == "uniform":
            return (self.params[0] + self.params[1]) / 2
        return self.params[0]

    def sample(self, rng: np.random.Generator, n: int, lo: int = 1, hi: int | None = None) -> list[int]:
        k, p = self.kind, self.params
        if k == "fixed":
            x = np.full(n, p[0])
        elif k == "uniform":
            x = rng.integers(int(round(p[0])), int(round(p[1])) + 1, size=n)
        elif k == "normal":
            x = np.rint(rng.normal(p[0], p[1], size=n))
        else:
            mu = math.log(p[0]) - p[1] ** 2 / 2
            x = np.rint(rng.lognormal(mu, p[1], size=n))
        x = np.maximum(x, max(lo, 1))
        if hi is not None:
            x = np.minimum(x, hi)
        return [int(v) for v in x]

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(f'{v:g}' for v in self.params)})"


# --------------------------------------------------------------------------- text on this machine

LICENSES_DIR = Path("/usr/share/common-licenses")
#: Standard-library modules whose docstrings are prose prompts (fixed, sorted).
DOC_MODULES = ("argparse", "asyncio/events", "calendar", "collections/__init__", "configparser", "contextlib",
               "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email/message", "enum",
               "fractions", "functools", "heapq", "http/client", "inspect", "json/__init__", "logging/__init__",
               "mailbox", "optparse", "pathlib", "pickle", "pydoc", "shutil", "statistics", "string",
               "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest/case", "urllib/parse",
               "zipfile")
#: Standard-library sources that code-edit snippets are cut from (fixed, sorted).
CODE_MODULES = ("bisect", "calendar", "colorsys", "csv", "difflib", "fnmatch", "fractions", "glob", "graphlib",
                "heapq", "json/decoder", "json/encoder", "numbers", "pprint", "queue", "sched", "shlex",
                "statistics", "string", "textwrap", "tomllib/_parser")


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def prose_documents() -> list[str]:
    """Paragraph text: the licence files (sorted), then the listed modules' docstrings."""
    docs: list[str] = []
    if LICENSES_DIR.is_dir():
        for p in sorted(LICENSES_DIR.iterdir()):
            if p.is_file() and not p.is_symlink():
                docs.append(_paragraphs(p.read_text(encoding="utf-8", errors="ignore")))
    for mod in DOC_MODULES:
        path = _stdlib() / f"{mod}.py"
        if not path.is_file():
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except SyntaxError:
            continue
        strings = [ast.get_docstring(n) for n in ast.walk(tree)
                   if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(s for s in strings if s and len(s) > 80)
        if text:
            docs.append(_paragraphs(text))
    return [d for d in docs if d.strip()]


def code_documents() -> list[tuple[str, str]]:
    """(relative name, source) of the listed standard-library modules that exist."""
    out = []
    for mod in CODE_MODULES:
        path = _stdlib() / f"{mod}.py"
        if path.is_file():
            out.append((f"Lib/{mod}.py", path.read_text(encoding="utf-8", errors="ignore")))
    return out


def _paragraphs(text: str) -> str:
    """Collapse each paragraph's whitespace to single spaces; paragraphs joined by blank lines."""
    paras = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paras if p)


class TextSource:
    """The corpus tokenized once with one model's tokenizer; cuts text to token lengths."""

    def __init__(self, tokenizer, name: str = "", chat=None):
        self.tokenizer = tokenizer
        self.name = name
        self.chat = chat        # messages -> prompt text through the model's chat template (None: it has none)
        docs = prose_documents()
        if not docs:
            raise WorkloadError("no text on this machine to build prompts from (no licences, no Python stdlib)")
        self.prose_text = "\n\n".join(docs)
        enc = tokenizer.encode(self.prose_text, add_special_tokens=False)
        self._prose_offsets = enc.offsets
        self.code = code_documents()
        if not self.code:
            raise WorkloadError("no Python standard-library sources found to build code-edit prompts from")

    @staticmethod
    def for_model(model_dir: str | Path) -> "TextSource":
        return _source_for(str(Path(model_dir).resolve()))

    def count(self, text: str) -> int:
        """Tokens of `text` without special tokens."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    @property
    def prose_tokens(self) -> int:
        return len(self._prose_offsets)

    def cut_prose(self, rng: np.random.Generator, n_tokens: int) -> tuple[str, int]:
        """A window of about `n_tokens` tokens of prose at a random place; (text, its token count)."""
        total = len(self._prose_offsets)
        n = max(1, min(n_tokens, total - 1))
        start = int(rng.integers(0, total - n + 1))
        return self._fit(self.prose_text, self._prose_offsets, start, n)

    def _fit(self, text: str, offsets, start: int, n: int) -> tuple[str, int]:
        """Cut text[offsets[start] : offsets[end]] so that it re-encodes to n tokens (or as near as can be)."""
        end = start + n
        best: tuple[int, str, int] | None = None
        for _ in range(6):
            end = max(start + 1, min(end, len(offsets)))
            piece = text[offsets[start][0]:offsets[end - 1][1]].strip()
            count = self.count(piece)
            if best is None or abs(count - n) < best[0]:
                best = (abs(count - n), piece, count)
            if count == n:
                break
            end += n - count
        return best[1], best[2]


@functools.lru_cache(maxsize=8)
def _source_for(model_dir: str) -> TextSource:
    from tokenizers import Tokenizer

    from vsc.runtime.tokenizer import Tokenizer as ModelTokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise WorkloadError(f"{model_dir}: error: no tokenizer.json in the model folder")
    full = ModelTokenizer.from_model_dir(model_dir)
    chat = full.apply_chat_template if full.chat_template is not None else None
    return TextSource(Tokenizer.from_file(str(path)), name=Path(model_dir).name, chat=chat)


# --------------------------------------------------------------------------- the four kinds

def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """(lengths, text, arrivals): independent streams spawned from one seed."""
    a, b, c = np.random.SeedSequence(seed).spawn(3)
    return np.random.default_rng(a), np.random.default_rng(b), np.random.default_rng(c)


def arrival_offsets(arrival: Arrival, n: int, rng: np.random.Generator) -> list[float] | None:
    """Send times (s from start) for a Poisson process: first at 0, then exponential gaps."""
    if arrival.kind != "poisson":
        return None
    if math.isinf(arrival.rate):
        return [0.0] * n
    gaps = rng.exponential(1.0 / arrival.rate, size=max(n - 1, 0))
    return [0.0] + [float(x) for x in np.cumsum(gaps)]


def _room(max_context: int | None, margin: int = 8) -> int:
    """Tokens a prompt plus its output may use (the server adds BOS and may add a few more)."""
    return (max_context or 1 << 30) - margin


def chat_workload(source: TextSource, n: int, seed: int, arrival: Arrival,
                  prompt_tokens: LengthDist = LengthDist("uniform", (32, 256)),
                  output_tokens: LengthDist = LengthDist("fixed", (64,)),
                  max_context: int | None = None) -> Workload:
    """Prose prompts of `prompt_tokens` tokens asking for `output_tokens` tokens."""
    lens, text, arr = _streams(seed)
    room = _room(max_context)
    outs = output_tokens.sample(lens, n, hi=max(1, room // 2))
    ins = prompt_tokens.sample(lens, n)
    reqs = []
    for p, o in zip(ins, outs):
        body, count = source.cut_prose(text, max(1, min(p, room - o)))
        reqs.append(BenchRequest(body, count, o))
    return Workload("chat", reqs, arrival, seed, f"prompt {prompt_tokens}, output {output_tokens}",
                    arrival_offsets(arrival, n, arr),
                    {"prompt_tokens": str(prompt_tokens), "output_tokens": str(output_tokens),
                     "max_context": max_context})


SYSTEM_HEADER = ("You are the support assistant of a software foundation. Answer questions about the licences "
                 "and the documentation below, quote the relevant clause, and keep answers short.\n\n"
                 "Reference material:\n\n")


def shared_prefix_workload(source: TextSource, n: int, seed: int, arrival: Arrival,
                           prefix_tokens: int = 768, share: float = 0.9,
                           prompt_tokens: LengthDist = LengthDist("normal", (96, 24)),
                           output_tokens: LengthDist = LengthDist("lognormal", (48, 0.5)),
                           max_context: int | None = None) -> Workload:
    """A fraction `share` of the requests start with one fixed ~`prefix_tokens`-token system prefix.

    `prompt_tokens` is the unique user turn after the prefix. The prefix ends in a blank line
    and each user turn starts with a letter, so the prefix's tokens are identical at the head
    of every sharing prompt; `meta["shared_tokens"]` is how many leading tokens a request
    has in common with the prefix encoded alone (0 for requests without it; the prefix's
    last token may merge with the turn, as SmolLM2's tokenizer does with the blank line).
    """
    if not 0.0 <= share <= 1.0:
        raise WorkloadError(f"shared-prefix share must be in [0, 1], got {share}")
    lens, text, arr = _streams(seed)
    room = _room(max_context)
    body, _ = source.cut_prose(text, max(1, prefix_tokens - source.count(SYSTEM_HEADER) - 2))
    prefix = SYSTEM_HEADER + body + "\n\n"
    prefix_ids = source.tokenizer.encode(prefix, add_special_tokens=False).ids
    outs = output_tokens.sample(lens, n, hi=max(1, (room - len(prefix_ids)) // 2))
    tails = prompt_tokens.sample(lens, n)
    shared = lens.random(n) < share
    reqs = []
    for o, t, s in zip(outs, tails, shared):
        turn, _ = source.cut_prose(text, max(1, min(t, room - o - len(prefix_ids) - 8)))
        tail = "User: " + turn + "\nAssistant:"
        prompt = prefix + tail if s else tail
        ids = source.tokenizer.encode(prompt, add_special_tokens=False).ids
        common = 0
        if s:
            for a, b in zip(ids, prefix_ids):
                if a != b:
                    break
                common += 1
        reqs.append(BenchRequest(prompt, len(ids), o, meta={"shared_tokens": common}))
    return Workload("shared-prefix", reqs, arrival, seed,
                    f"{len(prefix_ids)}-token prefix shared by {share:.0%}, tail {prompt_tokens}, output {output_tokens}",
                    arrival_offsets(arrival, n, arr),
                    {"prefix_tokens": len(prefix_ids), "share": share, "prompt_tokens": str(prompt_tokens),
                     "output_tokens": str(output_tokens), "max_context": max_context})


_KEYWORDS = frozenset("""False None True and as assert async await break class continue def del elif else except
finally for from global if import in is lambda nonlocal not or pass raise return try while with yield self cls
print len range str int float list dict set tuple object super type isinstance""".split())

CODE_PROMPT = ("You are a careful code editor. Apply the instruction to the file below and reply with the "
               "complete edited file in one python code block, changing nothing else.\n\n"
               "File: {name}\n```python\n{code}\n```\n\nInstruction: {instruction}\n\nEdited file:\n```python\n")


# predicted-edit's user turn, rendered through the model's chat template (the assistant's turn
# then opens the code block): an instruct model copies a file far more faithfully when asked in
# its own format (SmolLM2-135M-Instruct: ~50% of the answer matches the prediction, against runs
# into "#\n#\n..." from the plain prompt).
CHAT_CODE_PROMPT = ("{instruction}\n\nFile: {name}\n```python\n{code}\n```\n\n"
                    "Reply with the complete edited file in one python code block, changing nothing else.")


def _edit(code: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """(kind, instruction, expected edited code) for one snippet."""
    names: dict[str, int] = {}
    for w in re.findall(r"\b[A-Za-z_][A-Za-z0-9_]{2,}\b", code):
        if w not in _KEYWORDS:
            names[w] = names.get(w, 0) + 1
    candidates = sorted(w for w, c in names.items() if c >= 2)
    choice = int(rng.integers(0, 3))
    if choice == 0 and candidates:
        old = candidates[int(rng.integers(0, len(candidates)))]
        new = old + "_v2"
        return ("rename", f"Rename the identifier `{old}` to `{new}` everywhere in the file.",
                re.sub(rf"\b{re.escape(old)}\b", new, code))
    comment_lines = [l for l in code.split("\n") if l.strip().startswith("#")]
    if choice == 1 and comment_lines:
        return ("drop-comments", "Delete every line that holds only a comment.",
                "\n".join(l for l in code.split("\n") if not l.strip().startswith("#")))
    return ("header", "Add the line `# Reviewed: no functional change.` at the top of the file.",
            "# Reviewed: no functional change.\n" + code)


def code_edit_workload(source: TextSource, n: int, seed: int, arrival: Arrival,
                       prompt_tokens: LengthDist = LengthDist("uniform", (512, 1536)),
                       output_tokens: LengthDist | None = None,
                       max_context: int | None = None, predicted: bool = False) -> Workload:
    """A code snippet (whole lines of a stdlib module) plus an instruction; the answer copies the snippet.

    The snippet takes what `prompt_tokens` leaves after the prompt's wrapper text, but at most
    half the context (the answer is about as long as the snippet). max_tokens is the expected
    output's length plus the closing fence, unless `output_tokens` is given.

    predicted=True is the `predicted-edit` workload: each request also carries the snippet as
    it was (and the closing fence) as OpenAI's `prediction` (`extra`), as an editor sends the
    file it asks to have edited, and the prompt goes through the model's chat template
    (CHAT_CODE_PROMPT as the user's turn) when it has one.
    """
    lens, text, arr = _streams(seed)
    room = _room(max_context)
    wrapper = source.count(CODE_PROMPT.format(name="Lib/x.py", code="", instruction="x" * 60))
    targets = prompt_tokens.sample(lens, n)
    fixed_outs = output_tokens.sample(lens, n) if output_tokens is not None else [None] * n
    reqs = []
    for target, fixed_out in zip(targets, fixed_outs):
        name, src = source.code[int(text.integers(0, len(source.code)))]
        budget = max(16, min(target - wrapper, (room - wrapper) // 2 - 16))
        code = _cut_lines(source, src, budget, text)
        kind, instruction, expected = _edit(code, text)
        if predicted and source.chat is not None:
            prompt = source.chat([{"role": "user", "content": CHAT_CODE_PROMPT.format(
                name=name, code=code, instruction=instruction)}], add_generation_prompt=True) + "```python\n"
        else:
            prompt = CODE_PROMPT.format(name=name, code=code, instruction=instruction)
        count = source.count(prompt)
        answer = expected + "\n```"
        out = fixed_out if fixed_out is not None else source.count(answer)
        out = max(1, min(out, room - count))
        unchanged = _unchanged_fraction(code, expected)
        extra = {"prediction": {"type": "content", "content": code + "\n```"}} if predicted else {}
        reqs.append(BenchRequest(prompt, count, out, extra=extra,
                                 meta={"edit": kind, "expected_output": answer, "copied_line_fraction": unchanged}))
    return Workload("predicted-edit" if predicted else "code-edit", reqs, arrival, seed,
                    f"prompt {prompt_tokens}, output = the edited snippet" if output_tokens is None
                    else f"prompt {prompt_tokens}, output {output_tokens}",
                    arrival_offsets(arrival, n, arr),
                    {"prompt_tokens": str(prompt_tokens),
                     "output_tokens": str(output_tokens) if output_tokens else "expected", "max_context": max_context})


def _cut_lines(source: TextSource, src: str, budget: int, rng: np.random.Generator) -> str:
    """Consecutive whole lines of `src`, starting at a random line, of at most ~`budget` tokens."""
    lines = src.split("\n")
    start = int(rng.integers(0, max(1, len(lines) - 40)))
    # grow in steps, measuring the token count of the joined text (tokens do not add up per line)
    end, step = start, 16
    while end < len(lines):
        nxt = min(len(lines), end + step)
        if source.count("\n".join(lines[start:nxt])) > budget:
            if step == 1:
                break
            step = max(1, step // 4)
            continue
        end = nxt
    if end == start:            # a single line longer than the budget: take it anyway
        end = start + 1
    return "\n".join(lines[start:end]).strip("\n") or lines[start]


def _unchanged_fraction(code: str, expected: str) -> float:
    a, b = code.split("\n"), set(expected.split("\n"))
    return round(sum(1 for l in a if l in b) / max(len(a), 1), 3)


JSON_SCHEMAS: dict[str, dict] = {
    "summary": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 80},
            "topics": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
            "tone": {"type": "string", "enum": ["formal", "neutral", "informal"]},
            "word_count_estimate": {"type": "integer", "minimum": 0},
        },
        "required": ["title", "topics", "tone", "word_count_estimate"],
        "additionalProperties": False,
    },
    "obligations": {
        "type": "object",
        "properties": {
            "parties": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            "obligations": {"type": "array", "maxItems": 4, "items": {
                "type": "object",
                "properties": {"who": {"type": "string"}, "must": {"type": "string"},
                               "conditional": {"type": "boolean"}},
                "required": ["who", "must", "conditional"], "additionalProperties": False}},
        },
        "required": ["parties", "obligations"],
        "additionalProperties": False,
    },
    "qa": {
        "type": "object",
        "properties": {
            "question": {"type": "string"},
            "answer": {"type": "string"},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "quotes": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["question", "answer", "confidence"],
        "additionalProperties": False,
    },
}

JSON_PROMPT = ("Read the passage and reply with only a JSON object that follows this JSON schema "
               "(no prose, no code fence).\n\nSchema ({name}):\n{schema}\n\nPassage:\n{passage}\n\nJSON:\n")


def json_workload(source: TextSource, n: int, seed: int, arrival: Arrival,
                  prompt_tokens: LengthDist = LengthDist("uniform", (128, 512)),
                  output_tokens: LengthDist = LengthDist("fixed", (128,)),
                  max_context: int | None = None) -> Workload:
    """Passage + schema; the output must follow the schema (`extra["response_format"]`, json_schema).

    `prompt_tokens` is the whole prompt (schema text included; at least the wrapper's length).
    """
    lens, text, arr = _streams(seed)
    room = _room(max_context)
    names = sorted(JSON_SCHEMAS)
    outs = output_tokens.sample(lens, n, hi=max(1, room // 2))
    ins = prompt_tokens.sample(lens, n)
    reqs = []
    for p, o in zip(ins, outs):
        name = names[int(text.integers(0, len(names)))]
        schema = JSON_SCHEMAS[name]
        wrapper = JSON_PROMPT.format(name=name, schema=json.dumps(schema, sort_keys=True), passage="")
        passage, _ = source.cut_prose(text, max(8, min(p, room - o) - source.count(wrapper)))
        prompt = JSON_PROMPT.format(name=name, schema=json.dumps(schema, sort_keys=True), passage=passage)
        extra = {"response_format": {"type": "json_schema",
                                     "json_schema": {"name": name, "schema": schema, "strict": True}}}
        reqs.append(BenchRequest(prompt, source.count(prompt), o, extra=extra, meta={"schema": name}))
    return Workload("json", reqs, arrival, seed,
                    f"output follows one of {len(names)} JSON schemas (response_format json_schema), "
                    f"prompt {prompt_tokens}, output {output_tokens}",
                    arrival_offsets(arrival, n, arr),
                    {"prompt_tokens": str(prompt_tokens), "output_tokens": str(output_tokens),
                     "schemas": names, "max_context": max_context})


def long_prefix_workload(source: TextSource, n: int, seed: int, arrival: Arrival, prefix_tokens: int = 4096,
                         **options) -> Workload:
    """shared-prefix with the system prompt agents and RAG send: ~4K shared tokens (90% of the
    requests), a short unique turn. The prefix takes at most 3/4 of the context (max_context
    8192 for the full 4K)."""
    prefix_tokens = min(prefix_tokens, _room(options.get("max_context")) * 3 // 4)
    w = shared_prefix_workload(source, n, seed, arrival, prefix_tokens=prefix_tokens, **options)
    w.name = "long-prefix"
    return w


def predicted_edit_workload(source: TextSource, n: int, seed: int, arrival: Arrival, **options) -> Workload:
    """code-edit's requests, each carrying the snippet as it was as its `prediction`."""
    return code_edit_workload(source, n, seed, arrival, predicted=True, **options)


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "chat": chat_workload,
    "shared-prefix": shared_prefix_workload,
    "code-edit": code_edit_workload,
    "json": json_workload,
    "predicted-edit": predicted_edit_workload,
    "long-prefix": long_prefix_workload,
}


def build_workload(kind: str, model: str | Path | TextSource, n: int, seed: int = 0,
                   arrival: Arrival | None = None, **options) -> Workload:
    """`n` requests of workload `kind` for the model folder `model` (its tokenizer.json).

    `options` go to the kind's builder (prompt_tokens, output_tokens, max_context, and for
    shared-prefix prefix_tokens / share). Default arrivals: closed(1).
    """
    if kind not in WORKLOADS:
        raise WorkloadError(f"unknown workload '{kind}' (known: {', '.join(WORKLOADS)})")
    if n < 1:
        raise WorkloadError(f"a workload needs at least one request, got {n}")
    source = model if isinstance(model, TextSource) else TextSource.for_model(model)
    return WORKLOADS[kind](source, n, seed, arrival or closed(1), **options)
