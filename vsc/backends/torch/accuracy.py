"""The numeric half of verification: a lowered runner against the Hugging Face reference.

`check_accuracy(module, runner, probes, tolerance)` drives the runner directly with
StepBatches, the way the engine does:

- every probe prompt together in one multi-sequence prefill, then batched decode steps
  (so masking, slot mapping and per-sequence bookkeeping bugs show up);
- probe 0 again, prefilled in 7-token chunks that straddle KV blocks (attention over
  context already in the cache), while probe 1 decodes beside it: the mixed steps of a
  continuous-batching engine, then plain decode steps;
- every probe again through an `LLMEngine` built from the plan's manifest engine entry (its
  scheduler, block manager, and whatever the plan adds there), then requests that share
  prefixes with those (see `engine_phases`): runtime-level rewrites (prefix caching,
  speculation) are held to the same reference, tokens and logits (read through the
  engine's verification-only `logits_hook`).

Each run's greedy tokens and logits are compared with `AutoModelForCausalLM` in fp32,
teacher-forced on prompt + the runner's own tokens, so one early divergence does not
cascade: at every position the runner's pick must be the reference's argmax, unless the
reference itself rates the two tokens within `tolerance` (a near-tie, reported, not a
failure), and the largest |logit difference| must stay within `tolerance`.

Default tolerance (when the plan's accuracy bar gives none), by plan dtype. Measured on the
tiny models (8 probes x 16 tokens, one thread), the generated runner's logits differ from
transformers' by at most 4.3e-6 (llama), 5.7e-6 (qwen2), 4.8e-6 (mixtral) in fp32; the fp32
default of 1e-3 leaves over two orders of magnitude of headroom for bigger models and
other kernels while a real bug (a RoPE position off by one, a wrong softmax scale) moves
logits by 0.1 or more. bf16 / f16 plans are held to the same fp32 reference: measured
0.08-0.10 (bf16) and 0.010-0.013 (f16), so their defaults are 0.25 and 0.05.
"""
from __future__ import annotations

import inspect
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vsc.ir.gguf_import import is_gguf_path
from vsc.ir.module import ServingModule
from vsc.runtime.api import StepBatch

DEFAULT_TOLERANCE = {"f32": 1e-3, "f16": 5e-2, "bf16": 0.25}

#: Seconds the engine run may take per phase before the check fails it as stuck.
ENGINE_RUN_TIMEOUT = 300.0

#: Chunk size of the chunked-prefill run: small and prime, so chunks straddle block edges.
PREFILL_CHUNK = 7

#: Probe prompts: English and code, short to long (several are longer than a 16-token
#: block). Probe k uses text k; past the end of the list, two texts are joined.
PROBE_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog, and then it runs back into the forest to find its family before night falls.",
    "Hello! How are you?",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "In the beginning of the twentieth century, physicists discovered that light behaves both as a wave and as a particle. "
    "This strange duality led to the development of quantum mechanics, a theory that describes the behaviour of matter "
    "and energy at the smallest scales. Today it underpins lasers, transistors and the computers we use every day.",
    "Write a haiku about autumn leaves.",
    "#include <stdio.h>\n\nint main(void) {\n    int total = 0;\n    for (int i = 1; i <= 10; i++) {\n"
    "        total += i * i;\n    }\n    printf(\"%d\\n\", total);\n    return 0;\n}\n",
    "Q: What is the capital of France?\nA: Paris.\nQ: What is the capital of Japan?\nA:",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON orders.customer_id = customers.id "
    "GROUP BY name ORDER BY orders DESC LIMIT 10;",
    "Once upon a time",
    "{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"Summarize the report in three bullet points.\"}], \"temperature\": 0}",
    "The mitochondria is the powerhouse of the cell; it turns nutrients into the energy that keeps every living thing going.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n\n"
    "    def pop(self):\n        return self.items.pop()\n",
)


def probe_texts(count: int) -> list[str]:
    """The first `count` probe prompts (deterministic)."""
    out = []
    n = len(PROBE_TEXTS)
    for k in range(count):
        if k < n:
            out.append(PROBE_TEXTS[k])
        else:
            out.append(PROBE_TEXTS[k % n] + "\n" + PROBE_TEXTS[(k // n + k) % n])
    return out


# --- report ---------------------------------------------------------------------------------


#: How each kind of run is named in messages. "batched", "chunked" and "mixed" drive the
#: runner directly; "engine" and "engine-prefix" go through the plan's own engine.
RUN_LABELS = {
    "batched": "",
    "chunked": " (chunked prefill)",
    "mixed": " (mixed steps)",
    "engine": " (through the engine)",
    "engine-prefix": " (through the engine, sharing a prefix with an earlier request)",
}


@dataclass
class Divergence:
    """Where a runner's greedy pick first differs from the reference's argmax.

    `expected_logit` / `got_logit` are the reference's logits of the two tokens;
    `runner_logit` is the runner's own logit of the token it picked.
    """

    probe: int
    position: int
    expected_token: int
    got_token: int
    expected_logit: float
    got_logit: float
    runner_logit: float
    run: str = "batched"

    def describe(self) -> str:
        label = f"probe {self.probe}" + RUN_LABELS[self.run]
        if self.expected_token < 0:
            return (f"{label}: the engine failed the request (an error, or no progress within "
                    f"{ENGINE_RUN_TIMEOUT:.0f} s) after {self.position} tokens; see the log")
        return (f"{label} diverged at position {self.position}: expected token {self.expected_token} "
                f"(logit {self.expected_logit:.3f}), got {self.got_token} (logit {self.got_logit:.3f})")


@dataclass
class ProbeResult:
    """One probe run: the runner's greedy tokens and how they compare with the reference."""

    probe: int
    run: str        # a key of RUN_LABELS
    prompt_tokens: int
    tokens: list[int]
    max_logit_error: float
    max_error_position: int
    near_ties: list[int] = field(default_factory=list)      # positions where a near-tie flipped the pick
    divergence: Divergence | None = None

    @property
    def exact(self) -> bool:
        return self.divergence is None and not self.near_ties

    @property
    def label(self) -> str:
        return f"probe {self.probe}" + RUN_LABELS[self.run]


@dataclass
class AccuracyReport:
    ok: bool
    tolerance: float
    max_new_tokens: int
    probes: list[ProbeResult]
    max_logit_error: float
    near_ties: int
    first_divergence: Divergence | None
    worst_logits: ProbeResult | None     # the run with the largest logit error, when it exceeds tolerance
    constrained: Any = None              # json-mode plans: the constrained run's ConstrainedReport

    def summary(self) -> str:
        text = self._summary()
        c = self.constrained
        if c is None:
            return text
        if not c.ok and self.first_divergence is None and self.worst_logits is None:
            return c.summary()
        return f"{text}; json-mode: {c.summary()}"

    def _summary(self) -> str:
        if self.first_divergence is not None:
            return f"{self.first_divergence.describe()}; max |dlogit| {self.max_logit_error:.1e}"
        if self.worst_logits is not None:
            w = self.worst_logits
            return (f"{w.label}: max |dlogit| {w.max_logit_error:.1e} at position {w.max_error_position} exceeds "
                    f"tolerance {self.tolerance:.1e} (greedy tokens match)")
        batched = [p for p in self.probes if p.run == "batched"]
        again = [p for p in self.probes if p.run != "batched"]
        exact = sum(p.exact for p in batched)
        text = f"{exact}/{len(batched)} probes exact over {self.max_new_tokens} tokens"
        chunked = [p for p in again if not p.run.startswith("engine")]
        engine = [p for p in again if p.run.startswith("engine")]
        if chunked:
            text += f", chunked-prefill run {'exact' if all(p.exact for p in chunked) else 'within near-ties'}"
        if engine:
            text += f", engine run {'exact' if all(p.exact for p in engine) else 'within near-ties'}"
        ties = f"{self.near_ties} near-tie" + ("" if self.near_ties == 1 else "s")
        return f"{text}; max |dlogit| {self.max_logit_error:.1e}; {ties}"

    def to_json(self) -> dict:
        return {
            "ok": self.ok, "summary": self.summary(), "tolerance": self.tolerance,
            "max_new_tokens": self.max_new_tokens, "max_logit_error": self.max_logit_error,
            "near_ties": self.near_ties,
            "first_divergence": asdict(self.first_divergence) if self.first_divergence else None,
            "probes": [{"probe": p.probe, "run": p.run, "prompt_tokens": p.prompt_tokens, "exact": p.exact,
                        "max_logit_error": p.max_logit_error, "near_ties": p.near_ties} for p in self.probes],
            "constrained": self.constrained.to_json() if self.constrained is not None else None,
        }


# --- reference ------------------------------------------------------------------------------

_REFERENCES: dict[str, torch.nn.Module] = {}


def reference_model(model_dir: str | Path) -> torch.nn.Module:
    """The HF transformers model of `model_dir` in fp32, loaded once per process (a GGUF file:
    its model with the blocks dequantized)."""
    key = str(Path(model_dir).resolve())
    model = _REFERENCES.get(key)
    if model is None and is_gguf_path(key):      # a GGUF plan is checked against its dequantized model
        from vsc.models.gguf_import import dequantized_model
        model = _REFERENCES[key] = dequantized_model(Path(key))
    if model is None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        model.eval()
        _REFERENCES[key] = model
    return model


@torch.inference_mode()
def reference_logits(model: torch.nn.Module, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """Reference logits [len(generated), V] predicting each generated token, teacher-forced on
    prompt + generated (row j is what the reference predicts after prompt + generated[:j])."""
    if not generated:
        return torch.zeros(0, model.config.vocab_size)
    ids = torch.tensor([prompt + generated[:-1]], dtype=torch.long)
    logits = model(input_ids=ids).logits[0].to(torch.float32)
    return logits[len(prompt) - 1:]


def tokenize_probes(model_dir: str | Path, count: int, limit: int) -> list[list[int]]:
    """Token ids of the first `count` probe prompts, each cut to at most `limit` tokens."""
    from vsc.runtime.tokenizer import read_tokenizer_json
    if is_gguf_path(model_dir):
        from vsc.models.gguf_import import companion_dir
        model_dir = companion_dir(Path(model_dir))
    tok = read_tokenizer_json(model_dir, needed_for="the accuracy check tokenizes probes with it")
    return [tok.encode(text).ids[:limit] or [0] for text in probe_texts(count)]


# --- driving the runner ---------------------------------------------------------------------


class _Driver:
    """Feeds a runner StepBatches as an engine would, with blocks allocated linearly per sequence."""

    def __init__(self, runner, num_seqs: int, max_len: int):
        cfg = runner.cache_config
        self.runner = runner
        self.block_size = cfg.block_size
        self.blocks_per_seq = -(-max_len // self.block_size)
        needed = num_seqs * self.blocks_per_seq
        if "num_blocks" in inspect.signature(runner.create_kv_cache).parameters:
            runner.create_kv_cache(num_blocks=needed)          # only what the probes use
        else:
            if cfg.num_blocks < needed:
                raise ValueError(f"the runner's KV cache ({cfg.num_blocks} blocks of {cfg.block_size}) cannot hold "
                                 f"the accuracy probes ({needed} blocks)")
            runner.create_kv_cache()
        self.tables = [list(range(s * self.blocks_per_seq, (s + 1) * self.blocks_per_seq)) for s in range(num_seqs)]
        self.device = getattr(runner, "device", torch.device("cpu"))

    def slot(self, seq: int, position: int) -> int:
        return self.tables[seq][position // self.block_size] * self.block_size + position % self.block_size

    def step(self, seqs: list[int], new_tokens: list[list[int]], starts: list[int], decode: bool) -> torch.Tensor:
        """One step: sequence seqs[b] gets new_tokens[b] at positions starts[b]...; logits [B, V] (fp32, cpu)."""
        tokens, positions, slots, query_start, context = [], [], [], [0], []
        for seq, new, start in zip(seqs, new_tokens, starts):
            tokens += new
            positions += range(start, start + len(new))
            slots += [self.slot(seq, p) for p in range(start, start + len(new))]
            query_start.append(query_start[-1] + len(new))
            context.append(start + len(new))
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        batch = StepBatch(
            tokens=as_tensor(tokens), positions=as_tensor(positions), query_start=as_tensor(query_start),
            context_lens=as_tensor(context), block_tables=as_tensor([self.tables[s] for s in seqs]),
            slot_mapping=as_tensor(slots), is_decode=decode,
            query_lens_host=[len(n) for n in new_tokens], context_lens_host=context)
        logits = self.runner.decode(batch) if decode else self.runner.prefill(batch)
        return logits.detach().to(device="cpu", dtype=torch.float32)

    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 chunks: list[int | None] | None = None) -> list[tuple[list[int], torch.Tensor]]:
        """Greedy continuation of every prompt, all sequences in every step, as a continuous-
        batching engine runs them: sequence s prefills in chunks[s]-token pieces (None: whole),
        and once its prompt is in, decodes one token per step beside the others' prefill
        chunks (a mixed step). A step where every sequence has one new token is a `decode`.
        Returns per prompt (its greedy tokens [N], the logits that picked them [N, V])."""
        chunks = chunks or [None] * len(prompts)
        done = [0] * len(prompts)                 # prompt tokens already in the cache
        picks: list[list[int]] = [[] for _ in prompts]
        rows: list[list[torch.Tensor]] = [[] for _ in prompts]
        while True:
            active = [s for s in range(len(prompts)) if len(picks[s]) < max_new_tokens]
            if not active:
                break
            new, starts = [], []
            for s in active:
                if done[s] < len(prompts[s]):
                    size = chunks[s] or len(prompts[s])
                    new.append(prompts[s][done[s]:done[s] + size])
                    starts.append(done[s])
                else:
                    new.append([picks[s][-1]])
                    starts.append(len(prompts[s]) + len(picks[s]) - 1)
            step_logits = self.step(active, new, starts, decode=all(len(n) == 1 for n in new))
            for row, s in enumerate(active):
                if done[s] < len(prompts[s]):
                    done[s] += len(new[row])
                    if done[s] < len(prompts[s]):
                        continue                  # mid-prompt chunk: its logits pick nothing
                rows[s].append(step_logits[row])
                picks[s].append(int(torch.argmax(step_logits[row])))
        return [(picks[s], torch.stack(rows[s])) for s in range(len(prompts))]


def engine_phases(prompts: list[list[int]], limit: int) -> list[list[list[int]]]:
    """The engine run's requests, in two phases submitted one after the other.

    Phase 1 is every probe prompt at once. Phase 2 reuses phase 1's longest prompt P in ways
    a prefix cache must tell apart: P again (a full hit), P with its last tokens replaced
    (a hit that must stop early), P's first block's worth with another probe's tokens after
    it, and P shifted by one token (the same block contents at other positions, and under
    another first token, so a cache keyed on a block's tokens alone would hit wrongly).
    Every prompt is cut to `limit` tokens.

    Phase 2 also holds prompts on which speculative decoding drafts, so its verification
    (accepting and rejecting drafts) is held to the reference too: P twice (a passage
    repeated, what prompt-lookup and n-gram drafts copy), and every distinct probe token
    once, in order of first appearance (so it starts as probe 0 does), then the same rotated
    by a third. The random test models' greedy outputs spread over the whole vocabulary and
    seldom repeat within a probe's few tokens, so P twice alone rarely drafts there; a prompt
    holding a few hundred distinct tokens is hit by some output token on every tiny model
    tried (llama, qwen2, mixtral; 4 to 8 probes), and those drafts are mostly rejected.
    """
    longest = max(prompts, key=len)
    other = next((p for p in prompts if p is not longest), longest)
    distinct = list(dict.fromkeys(t for p in prompts for t in p))
    third = len(distinct) // 3
    variants = [
        list(longest),
        longest[:max(1, len(longest) - 5)] + other[:5],
        longest[:16] + other,
        [other[0]] + longest,
        longest[1:] or longest,
        longest * 2,
        distinct,
        distinct[third:] + distinct[:third],
    ]
    return [[list(p) for p in prompts], [v[:limit] for v in variants]]


def _engine_generate(module: ServingModule, runner, phases: list[list[list[int]]],
                     max_new_tokens: int) -> list[list[tuple[list[int], str | None]]]:
    """Greedy tokens of every request of every phase, run by an LLMEngine configured exactly
    as the compiled server's (its manifest's engine entry), on a KV cache sized for the
    largest phase, with the model's logits behind each token (the engine's logits hook).
    Returns per phase, per request (tokens, finish reason, logits [N, V] or None)."""
    import asyncio

    from vsc.backends.server.emit import engine_config
    from vsc.runtime.api import EngineConfig, GenerateRequest, SamplingParams
    from vsc.runtime.engine import LLMEngine

    block = runner.cache_config.block_size
    blocks = max(sum(-(-(len(p) + max_new_tokens) // block) for p in phase) for phase in phases) + 1
    # the check must exercise the plan's drafting, whatever this machine measures (no SpecGate)
    engine = LLMEngine(runner, None, EngineConfig(**engine_config(module), spec_gate=False), module.name,
                       num_blocks=blocks)
    rows: dict[str, dict[int, torch.Tensor]] = {}

    def record(request_id: str, position: int, row: torch.Tensor) -> None:
        rows.setdefault(request_id, {})[position] = row.detach().to(device="cpu", dtype=torch.float32).clone()

    engine.logits_hook = record

    async def run(phase_index: int, phase: list[list[int]]):
        outputs: list[tuple[list[int], str | None]] = [([], None) for _ in phase]

        async def one(i: int, prompt: list[int]):
            params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
            tokens: list[int] = []
            reason = None
            outputs[i] = (tokens, reason, prompt, f"probe-{phase_index}-{i}")
            async for event in engine.generate(GenerateRequest(f"probe-{phase_index}-{i}", prompt, params)):
                tokens += event.token_ids
                reason = event.finish_reason
                outputs[i] = (tokens, reason, prompt, f"probe-{phase_index}-{i}")

        try:   # an engine that stops making progress fails the check instead of hanging the compile
            await asyncio.wait_for(asyncio.gather(*(one(i, p) for i, p in enumerate(phase))), ENGINE_RUN_TIMEOUT)
        except asyncio.TimeoutError:
            pass            # unfinished requests keep reason None: reported as an engine failure
        return outputs

    engine.start()
    try:
        raw = [list(asyncio.run(run(n, phase))) for n, phase in enumerate(phases)]
    finally:
        engine.shutdown()
    out = []
    for phase in raw:
        done = []
        for tokens, reason, prompt, request_id in phase:
            seen = rows.get(request_id, {})
            picked = [seen.get(len(prompt) + n) for n in range(len(tokens))]
            logits = torch.stack(picked) if tokens and all(r is not None for r in picked) else None
            done.append((tokens, reason, logits))
        out.append(done)
    return out


def _compare(probe: int, run: str, prompt: list[int], tokens: list[int], got: torch.Tensor,
             ref: torch.Tensor, tolerance: float) -> ProbeResult:
    errors = (got - ref).abs().amax(dim=-1)
    worst = int(torch.argmax(errors))
    result = ProbeResult(probe, run, len(prompt), tokens, float(errors[worst]), worst)
    expected = torch.argmax(ref, dim=-1).tolist()
    for pos, (want, have) in enumerate(zip(expected, tokens)):
        if want == have:
            continue
        gap = float(ref[pos, want] - ref[pos, have])
        if gap <= tolerance:
            result.near_ties.append(pos)
        elif result.divergence is None:
            result.divergence = Divergence(probe, pos, want, have, float(ref[pos, want]), float(ref[pos, have]),
                                           float(got[pos, have]), run)
    return result


def _exercise_cascade(runner) -> None:
    """A plan with cascade attention (CASCADE_MIN_TOKENS in its generated module) is checked
    with the threshold at one token, so any two probes sharing a block run the cascade
    layout; at the plan's threshold (64 tokens by default) the short probes would never
    reach it and a wrong cascade would pass unseen (found by a mutant)."""
    generated = sys.modules.get(type(runner).__module__)
    if generated is not None and getattr(generated, "CASCADE_MIN_TOKENS", 0):
        generated.CASCADE_MIN_TOKENS = 1


def check_accuracy(module: ServingModule, runner, probes: int, tolerance: float | None,
                   max_new_tokens: int = 16) -> "AccuracyReport":
    """Run `probes` prompts through `runner` (batched; then probe 0 chunked beside probe 1) and
    compare with the fp32 transformers reference; see the module docstring for the rules.

    The runner's KV cache is (re)allocated with just the blocks the probes need when its
    `create_kv_cache` takes `num_blocks` (generated runners do); call `create_kv_cache()`
    again before serving with the same runner.
    """
    if probes < 1 or max_new_tokens < 1:
        raise ValueError("need at least one probe and one new token")
    _exercise_cascade(runner)
    model_dir = module.model.attrs["path"]
    dtype = module.model.attrs.get("dtype", "f32")
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE["f32"])
    max_context = int(module.deployment.get("max_context") or module.model.attrs.get("max_position", 2048))
    limit = min(max_context, int(module.model.attrs.get("max_position", max_context))) - max_new_tokens
    if limit < 1:
        raise ValueError(f"max_context {max_context} leaves no room for a prompt and {max_new_tokens} new tokens")
    prompts = tokenize_probes(model_dir, probes, limit)
    reference = reference_model(model_dir)

    results: list[ProbeResult] = []
    longest = max(len(p) for p in prompts) + max_new_tokens
    batched = _Driver(runner, len(prompts), longest).generate(prompts, max_new_tokens)
    for k, (prompt, (tokens, logits)) in enumerate(zip(prompts, batched)):
        ref = reference_logits(reference, prompt, tokens)
        if ref.shape != logits.shape:
            raise ValueError(f"runner logits {tuple(logits.shape)} and reference logits {tuple(ref.shape)} differ in shape")
        results.append(_compare(k, "batched", prompt, tokens, logits, ref, tol))

    # Probe 0 again, prefilled in chunks over its cached context, beside probe 1 which
    # decodes meanwhile (the engine's mixed steps).
    mixed = prompts[:2]
    runs = _Driver(runner, len(mixed), longest).generate(mixed, max_new_tokens, chunks=[PREFILL_CHUNK, None])
    for k, (prompt, (tokens, logits)) in enumerate(zip(mixed, runs)):
        results.append(_compare(k, "chunked" if k == 0 else "mixed", prompt, tokens, logits,
                                reference_logits(reference, prompt, tokens), tol))

    # Every probe again through the plan's own engine (scheduler, block manager, and whatever
    # the plan adds there: prefix cache, speculation), then requests that share prefixes with
    # those. Tokens only: the engine does not expose logits.
    phases = engine_phases(prompts, limit)
    runs = _engine_generate(module, runner, phases, max_new_tokens)
    for run_name, phase, outputs in zip(("engine", "engine-prefix"), phases, runs):
        for k, (prompt, (tokens, reason, logits)) in enumerate(zip(phase, outputs)):
            if not tokens:
                result = ProbeResult(k, run_name, len(prompt), [], 0.0, 0)
            else:
                ref = reference_logits(reference, prompt, tokens)
                result = _compare(k, run_name, prompt, tokens, ref if logits is None else logits, ref, tol)
            if reason not in ("length", "stop") and result.divergence is None:
                result.divergence = Divergence(k, len(tokens), -1, -1, 0.0, 0.0, 0.0, run_name)
            results.append(result)

    first = next((r.divergence for r in results if r.divergence is not None), None)
    worst = max(results, key=lambda r: (math.isnan(r.max_logit_error), r.max_logit_error))
    max_err = worst.max_logit_error
    too_far = worst if not (max_err <= tol) else None     # `not <=` also catches NaN
    ok = first is None and too_far is None

    # json-mode plans: constrained decoding against the grammar-masked reference as well.
    from vsc.backends.torch.constrained_check import constrained_report
    constrained = constrained_report(module, runner, probes=min(probes, 4), tolerance=tol)
    if constrained is not None:
        ok = ok and constrained.ok
    return AccuracyReport(ok, tol, max_new_tokens, results, max_err, sum(len(r.near_ties) for r in results),
                          first, too_far, constrained)
