"""The numeric check of a json-mode plan: constrained greedy decoding against the reference.

json-mode changes outputs by design, so "same tokens as the unconstrained reference" is the
wrong bar. The right one: run the plan's own engine (the manifest's engine entry, schema
included) greedily on the probe prompts, then replay each output against the Hugging Face
fp32 reference, teacher-forced on prompt + the engine's tokens. At every position:

- the engine's token must be one the grammar allows there (masking happened, on the right row);
- it must be the argmax of the reference logits restricted to the allowed tokens, unless
  the reference rates the two within `tolerance` (a near-tie, counted, not a failure);

and an output that finished with "stop" must parse as JSON that the schema accepts: the
`jsonschema` package's validator when it is installed, else llguidance's own (a fresh
matcher must accept the text re-tokenized from scratch, a tokenization independent of the
engine's). An output cut at max_new_tokens ("length") must still be a valid prefix (every
token was accepted); a random-weight model can stay inside one string for a long time.

`check_constrained(module, runner, ...)` returns None when the plan meets the bar (or has no
constrain stage), else one line saying where it failed; `constrained_report` gives the details.
The runner's KV cache is reallocated by the engine run; call `create_kv_cache()` before
serving with the same runner.
"""
from __future__ import annotations

import asyncio
import inspect
import json
from dataclasses import dataclass, field

import torch

from vsc.ir.module import ServingModule


@dataclass
class ConstrainedProbe:
    probe: int
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str | None
    near_ties: list[int] = field(default_factory=list)
    problem: str | None = None       # None: this probe meets the bar

    @property
    def parsed(self) -> bool:
        return self.finish_reason == "stop" and self.problem is None


@dataclass
class ConstrainedReport:
    ok: bool
    tolerance: float
    max_new_tokens: int
    probes: list[ConstrainedProbe]

    def summary(self) -> str:
        bad = next((p for p in self.probes if p.problem), None)
        if bad is not None:
            return f"json-mode probe {bad.probe}: {bad.problem}"
        done = sum(p.parsed for p in self.probes)
        ties = sum(len(p.near_ties) for p in self.probes)
        return (f"{len(self.probes)} constrained probes match the grammar-masked reference over up to "
                f"{self.max_new_tokens} tokens; {done} complete and schema-valid, {len(self.probes) - done} "
                f"valid prefixes cut at the length limit; {ties} near-tie" + ("" if ties == 1 else "s"))

    def to_json(self) -> dict:
        return {"ok": self.ok, "summary": self.summary(), "tolerance": self.tolerance,
                "max_new_tokens": self.max_new_tokens,
                "probes": [{"probe": p.probe, "prompt_tokens": p.prompt_tokens, "finish_reason": p.finish_reason,
                            "tokens": len(p.tokens), "near_ties": p.near_ties, "problem": p.problem}
                           for p in self.probes]}


def check_constrained(module: ServingModule, runner, probes: int = 4, tolerance: float | None = None,
                      max_new_tokens: int = 48) -> str | None:
    """None when the json-mode plan's constrained greedy outputs meet the bar (see the module
    docstring) or the plan has no constrain stage; else a one-line reason."""
    report = constrained_report(module, runner, probes, tolerance, max_new_tokens)
    return None if report is None or report.ok else report.summary()


def constrained_report(module: ServingModule, runner, probes: int = 4, tolerance: float | None = None,
                       max_new_tokens: int = 48) -> ConstrainedReport | None:
    """The check's full report (None for a plan without a constrain stage)."""
    from vsc.backends.torch.reference import DEFAULT_TOLERANCE, reference_logits, reference_model, tokenize_probes
    from vsc.errors import PassFailure
    from vsc.ir.plan import plan_json_schema
    from vsc.runtime.constrain import SchemaError, compiler_for
    from vsc.runtime.tokenizer import Tokenizer

    schema = plan_json_schema(module)
    if schema is None:
        return None
    if probes < 1 or max_new_tokens < 1:
        raise ValueError("need at least one probe and one new token")
    model_dir = module.model.attrs["path"]
    dtype = module.model.attrs.get("dtype", "f32")
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE["f32"])
    max_context = int(module.deployment.get("max_context") or module.model.attrs.get("max_position", 2048))
    limit = max_context - max_new_tokens
    if limit < 1:
        raise ValueError(f"max_context {max_context} leaves no room for a prompt and {max_new_tokens} new tokens")
    tokenizer = Tokenizer.from_model_dir(model_dir)
    try:     # what the server does at start: a schema its grammar engine cannot serve fails here, in one line
        compiler_for(tokenizer, runner.vocab_size).admit(schema)
    except SchemaError as e:
        # the json-mode pass brought the schema in: the error points at it (in the spec's optimize line)
        raise PassFailure("json-mode", f"json-mode schema: {e}") from None
    prompts = tokenize_probes(model_dir, probes, limit)
    outputs = _engine_generate(module, runner, tokenizer, schema, prompts, max_new_tokens)
    reference = reference_model(model_dir)
    results = []
    for k, (prompt, (tokens, reason)) in enumerate(zip(prompts, outputs)):
        result = ConstrainedProbe(k, len(prompt), tokens, reason)
        if not tokens:
            result.problem = f"the engine produced no token (finish reason {reason!r})"
        else:
            ref = reference_logits(reference, prompt, tokens)
            _replay(result, ref, tokenizer, runner.vocab_size, schema, tol)
        results.append(result)
    return ConstrainedReport(all(r.problem is None for r in results), tol, max_new_tokens, results)


def _engine_generate(module: ServingModule, runner, tokenizer, schema: str, prompts: list[list[int]],
                     max_new_tokens: int) -> list[tuple[list[int], str | None]]:
    """Greedy outputs of every prompt, all at once, from an LLMEngine configured as the
    compiled server's (engine entry + json_schema), on a KV cache just big enough."""
    from vsc.ir.plan import engine_config, json_mode_config
    from vsc.runtime.api import EngineConfig, GenerateRequest, SamplingParams
    from vsc.runtime.engine import LLMEngine

    config = EngineConfig(**{**engine_config(module), **json_mode_config(module)})
    assert config.json_schema == schema
    extra = {}
    if "num_blocks" in inspect.signature(LLMEngine.__init__).parameters:
        block = runner.cache_config.block_size
        extra["num_blocks"] = sum(-(-(len(p) + max_new_tokens) // block) for p in prompts) + 1
    engine = LLMEngine(runner, tokenizer, config, module.name, **extra)

    async def run():
        async def one(i: int, prompt: list[int]):
            params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
            tokens: list[int] = []
            reason = None
            async for event in engine.generate(GenerateRequest(f"json-probe-{i}", prompt, params)):
                tokens += event.token_ids
                reason = event.finish_reason
            return tokens, reason
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    engine.start()
    try:
        return list(asyncio.run(run()))
    finally:
        engine.shutdown()


def _replay(result: ConstrainedProbe, ref: torch.Tensor, tokenizer, vocab_size: int, schema: str,
            tolerance: float) -> None:
    """Walk the grammar along the engine's tokens, comparing each with the masked reference."""
    from vsc.runtime.constrain import make_constraint

    constraint = make_constraint(tokenizer, vocab_size, schema)
    eos = set(getattr(tokenizer, "eos_token_ids", ()) or ())
    for pos, token in enumerate(result.tokens):
        allowed = constraint.allowed()
        row = ref[pos, :allowed.shape[0]]
        if not bool(allowed[token]):
            result.problem = f"token {token} at position {pos} is not allowed by the grammar there"
            return
        masked = row.masked_fill(~allowed, float("-inf"))
        want = int(torch.argmax(masked))
        if want != token:
            gap = float(masked[want] - masked[token])
            if gap > tolerance:
                result.problem = (f"diverged at position {pos}: the masked reference picks token {want} "
                                  f"(logit {float(masked[want]):.3f}), the engine {token} (logit {float(masked[token]):.3f})")
                return
            result.near_ties.append(pos)
        if token in eos and pos == len(result.tokens) - 1:
            break                                  # EOS ends the output (allowed only when complete)
        if constraint.advance(token) == "error":
            result.problem = f"token {token} at position {pos} broke the grammar: {constraint.error}"
            return
    if result.finish_reason == "length":
        return                                     # a valid prefix, cut at the limit
    if result.finish_reason != "stop":
        result.problem = f"finished with {result.finish_reason!r}"
        return
    text = tokenizer.decode(result.tokens)
    result.problem = _validate(text, tokenizer, vocab_size, schema)


def _validate(text: str, tokenizer, vocab_size: int, schema: str) -> str | None:
    """None when `text` is JSON the schema accepts, else why not."""
    from vsc.runtime.constrain import make_constraint

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"the output is not JSON ({e.msg} at column {e.colno}): {text[:80]!r}"
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        try:
            jsonschema.validate(value, json.loads(schema))
        except jsonschema.ValidationError as e:
            return f"the output does not match the schema: {e.message}"
        return None
    fresh = make_constraint(tokenizer, vocab_size, schema)
    for token in tokenizer.encode(text):
        if fresh.advance(token) == "error":
            return f"the schema rejects the output {text[:80]!r}: {fresh.error}"
    if not fresh.is_complete:
        return f"the output is an incomplete document for the schema: {text[:80]!r}"
    return None
