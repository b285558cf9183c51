"""Where a compiled server's time goes, without HTTP: drive its engine in-process.

    python bench/profile_engine.py <server-folder> --concurrency 16 --prompt 64 --output 64

Loads the folder the way `vsc serve` does (vsc.runtime.launch.build_server), submits
`concurrency` requests of `prompt` random tokens each (closed loop until `requests`
are done), and reports engine steps per second, the time per decode step split into
scheduling, the runner's forward, sampling and bookkeeping, and the top functions of a
cProfile of the engine thread. Numbers are for comparison within one run only.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import random
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vsc.runtime.api import GenerateRequest, SamplingParams  # noqa: E402
from vsc.bench.workloads import WORKLOADS  # noqa: E402
from vsc.runtime.launch import build_server  # noqa: E402


class StepTimer:
    """Wraps the engine's scheduler.schedule, runner.decode/prefill, sampler, per-token bookkeeping
    (append + incremental detokenize) and the hand-off to the event loop to time each."""

    def __init__(self, engine):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        engine.scheduler.schedule = self._wrap("schedule", engine.scheduler.schedule)
        engine.runner.decode = self._wrap("decode forward", engine.runner.decode)
        engine.runner.prefill = self._wrap("prefill forward", engine.runner.prefill)
        self.prefill_tokens = 0
        prefill = engine.runner.prefill

        def counted(batch):
            self.prefill_tokens += int(batch.tokens.shape[0])
            return prefill(batch)
        engine.runner.prefill = counted
        engine.sampler = self._wrap("sample", engine.sampler)
        engine._run_step = self._wrap("whole step", engine._run_step)
        engine._append_token = self._wrap("append+detok", engine._append_token)     # per token
        engine._deliver = self._wrap("deliver", engine._deliver)
        engine.scheduler.advance = self._wrap("advance", engine.scheduler.advance)

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t
                self.counts[name] = self.counts.get(name, 0) + 1
        return timed

    def report(self) -> str:
        lines = [f"prefill computed {self.prefill_tokens} new tokens (prefix-cache hits excluded)",
                 f"{'part':<18}{'calls':>8}{'total s':>10}{'ms/call':>10}"]
        for name, total in sorted(self.totals.items(), key=lambda kv: -kv[1]):
            n = self.counts[name]
            lines.append(f"{name:<18}{n:>8}{total:>10.3f}{1000 * total / n:>10.3f}")
        return "\n".join(lines)


async def drive(engine, vocab: int, concurrency: int, requests: int, prompt: int, output: int, seed: int,
                prompts: list[tuple[list[int], int]] | None = None, latencies: list | None = None) -> float:
    """Closed loop: `concurrency` clients send `requests` requests in all (random token prompts,
    or `prompts`: (token ids, max_tokens) pairs of a bench workload, in order). `latencies`, when
    given, receives (TTFT s, TPOT s) per request as the bench's client measures them: from the
    send to the first event, and the time from the first to the last event over the tokens after
    the first."""
    rng = random.Random(seed)
    todo = list(range(requests))[::-1]

    async def client():
        while todo:
            i = todo.pop()
            schema = None
            if prompts:
                ids, out, prediction, ignore_eos, schema = prompts[i % len(prompts)]
            else:
                ids, out, prediction, ignore_eos = [rng.randrange(3, vocab) for _ in range(prompt)], output, None, True
            req = GenerateRequest(uuid.uuid4().hex, ids, SamplingParams(max_tokens=out, temperature=0.0,
                                                                        ignore_eos=ignore_eos, prediction=prediction,
                                                                        json_schema=schema), time.monotonic())
            sent, first, tokens = time.perf_counter(), None, 0
            async for event in engine.generate(req):
                tokens += len(event.token_ids)
                if first is None and event.token_ids:
                    first = time.perf_counter()
            if latencies is not None and first is not None and tokens > 1:
                latencies.append((first - sent, (time.perf_counter() - first) / (tokens - 1)))

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - t


def _prediction_ids(tokenizer, extra: dict) -> list[int] | None:
    """A bench request's predicted output (OpenAI `prediction`) as token ids, as the server tokenizes it."""
    content = ((extra or {}).get("prediction") or {}).get("content")
    return list(tokenizer.encode(content, add_special_tokens=False)) or None if content else None


def _schema(extra: dict) -> str | None:
    """A bench request's response_format json_schema as the engine's json_schema text (None: free text)."""
    fmt = (extra or {}).get("response_format") or {}
    if fmt.get("type") != "json_schema":
        return None
    from vsc.runtime.constrain import canonical_schema
    return canonical_schema(fmt["json_schema"]["schema"])


def profile_decodes(engine, n: int, top: int, kind: str = "decode") -> None:
    """torch.profiler over the next `n` decode (or prefill) forwards (printed when the n-th returns)."""
    from torch.profiler import ProfilerActivity, profile
    decode = getattr(engine.runner, kind)
    state = {"left": n, "prof": None}

    def profiled(batch):
        if state["left"] <= 0:
            return decode(batch)
        if state["prof"] is None:
            state["prof"] = profile(activities=[ProfilerActivity.CPU])
            state["prof"].__enter__()
        out = decode(batch)
        state["left"] -= 1
        if state["left"] == 0:
            state["prof"].__exit__(None, None, None)
            print(state["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
        return out
    setattr(engine.runner, kind, profiled)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("server", type=Path)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--output", type=int, default=None,
                    help="output tokens per request (default 64; with --workload, the workload's own lengths)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0, help="override the plan's torch thread count")
    ap.add_argument("--workload", choices=list(WORKLOADS),
                    help="use this bench workload's prompts and output lengths instead of random tokens")
    ap.add_argument("--no-cprofile", action="store_true")
    ap.add_argument("--no-jump-forward", action="store_true",
                    help="json-mode requests decode one token per step (EngineConfig.jump_forward off)")
    ap.add_argument("--drop-predictions", action="store_true",
                    help="send a workload's requests without their predicted outputs (the same stopping rule)")
    ap.add_argument("--torch-profile", type=int, default=0, metavar="N",
                    help="also run torch.profiler over N decode forwards and print its op table")
    ap.add_argument("--profile-prefill", action="store_true", help="--torch-profile the prefill forwards instead")
    args = ap.parse_args()
    _, engine, manifest = build_server(args.server)
    if args.no_jump_forward:
        engine.config.jump_forward = False
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    vocab = engine.tokenizer.vocab_size if hasattr(engine.tokenizer, "vocab_size") else 256
    engine.start()
    try:
        args.output = args.output if args.output or args.workload else 64
        asyncio.run(drive(engine, vocab, args.concurrency, args.concurrency, args.prompt, 8, 1))   # warm-up
        timer = StepTimer(engine)
        profiler = None if args.no_cprofile else cProfile.Profile()
        steps0, tokens0 = engine.num_steps, engine.generated_tokens
        if profiler is not None:
            # the engine thread does the work: profile it by hooking its step
            inner = engine._step

            def profiled_step():
                profiler.enable()
                try:
                    inner()
                finally:
                    profiler.disable()
            engine._step = profiled_step
        if args.torch_profile:
            profile_decodes(engine, args.torch_profile, args.top, "prefill" if args.profile_prefill else "decode")
        prompts = None
        if args.workload:
            from vsc.bench.workloads import build_workload
            shipped = args.server / "tokenizer"       # a GGUF plan's server carries its tokenizer
            source = shipped if (shipped / "tokenizer.json").is_file() else manifest["model"]["path"]
            wl = build_workload(args.workload, source, args.requests, seed=0,
                                max_context=manifest["serve"]["max_context"])
            # as the bench's client sends them: no ignore_eos where the request carries a
            # prediction or a response_format (those answers end where the model ends them)
            prompts = [(engine.tokenizer.encode(r.prompt), args.output or r.max_tokens,
                        None if args.drop_predictions else _prediction_ids(engine.tokenizer, r.extra),
                        not ({"prediction", "response_format"} & set(r.extra or {})), _schema(r.extra))
                       for r in wl.requests]
        latencies: list[tuple[float, float]] = []
        wall = asyncio.run(drive(engine, vocab, args.concurrency, args.requests, args.prompt, args.output, 2, prompts,
                                 latencies))
    finally:
        engine.shutdown()
    steps, tokens = engine.num_steps - steps0, engine.generated_tokens - tokens0
    print(f"pipeline: {manifest['pipeline']}")
    print(f"{args.requests} requests, {args.concurrency} concurrent, {args.prompt} -> {args.output} tokens: "
          f"{wall:.2f} s, {tokens / wall:.0f} out tok/s, {steps} steps, {1000 * wall / steps:.2f} ms/step")
    if latencies:
        ttft, tpot = sorted(x[0] for x in latencies), sorted(x[1] for x in latencies)
        print(f"TTFT median {1000 * ttft[len(ttft) // 2]:.1f} ms; TPOT median {1000 * tpot[len(tpot) // 2]:.1f} ms, "
              f"p99 {1000 * tpot[min(len(tpot) - 1, round(0.99 * (len(tpot) - 1)))]:.1f} ms (in-process, no HTTP)")
    print(timer.report())
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
