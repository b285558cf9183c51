"""The builtin proposer: deterministic neighbours of the incumbent, best expected gain first.

No network, no randomness: the same spec and history give the same proposals, so a
search can be resumed or repeated. Each proposal is one *move* on the incumbent's
pipeline:

    add       a pass the pipeline lacks, with one point of its option grid, inserted at its
              place in CANONICAL_ORDER (so requirements such as prefix-cache after paged-kv hold)
    retune    a pass already there, with another point of its option grid
    remove    a pass already there (unless another pass requires it)

Moves are ordered by a cost model, the expected relative gain of the move for this
deployment, computed from the IR and the spec's workload (`Features`):

- prefix-cache pays in proportion to the prefill it skips: share x prefix / prompt;
- prompt-lookup speculation pays when answers repeat the prompt (workload kind code_edit),
  drafting from the requests' own predictions when they carry them (predicted_edit);
- chunked prefill pays when prompts are long next to the step's token budget;
- the fusions and RoPE tables cut per-step op count, which matters most when the decode
  GEMMs are small (per-op overhead, not FLOPs, dominates: the intra-op-threads cost model);
- int8 passes save bytes but may change outputs: their gain is discounted by the accuracy
  bar (greedy_exact rejects almost any rounding change); bf16 linear weights
  (pack-linear-weights{dtype=bf16}) are proposed only under a logits tolerance;
- removals come last (the passes were there for a reason);
- history: a pass (with its options) that made a candidate worse than its parent, or got it
  rejected, is tried again on a later incumbent at a third of its expected gain per such
  failure (moves that lost once usually lose again; they are not ruled out, only demoted).

One more move adds `replicate{n=N,router=prefix_affinity}` (the plan served as N replicas on
Ray Serve; see `replicate_move`): only when the spec has a throughput SLO that the best
single-replica candidate measured misses, the target is a CPU whose machine gives each replica
its own threads (N <= cores // threads per replica, N >= 2) and Ray Serve is installed (the
evaluator measures such a plan with `vsc serve --ray`). It is the one move that scales
throughput past one server, so when it applies it comes first; its rationale says why.

Pipelines already tried (same text) are never proposed twice. Passes that change what the
server does rather than how fast (json-mode, speculative with a draft model) are not
proposed: they need information only the user has.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vsc.agent.catalog import machine_cores
from vsc.agent.proposal import Proposal, SearchContext
from vsc.passes.pipeline import PassSpec, format_pipeline, parse_pipeline

#: Where each pass goes in a pipeline: fusions and table folding on the model graph first,
#: weight formats, then the cache, batching, the request graph, kernel choice, threads.
CANONICAL_ORDER = ("fuse-qkv", "fuse-gate-up", "fuse-silu-mul", "fuse-add-rmsnorm", "fold-rope-tables",
                   "weight-int8", "paged-kv", "kv-int8", "continuous-batching", "chunked-prefill",
                   "prefix-cache", "cascade-attention", "speculative", "json-mode", "select-kernels", "pack-linear-weights",
                   "intra-op-threads", "compile-decode-step", "replicate")

#: Option grids: the variants of each pass the builtin proposer tries (text options as in pipelines).
GRIDS: dict[str, list[dict[str, str]]] = {
    "fuse-qkv": [{}], "fuse-gate-up": [{}], "fuse-silu-mul": [{}], "fuse-add-rmsnorm": [{}],
    "fold-rope-tables": [{}],
    "weight-int8": [{"group": "64"}, {"group": "0"}],
    "paged-kv": [{"block": "16"}, {"block": "32"}, {"block": "8"}],
    "kv-int8": [{}],
    "continuous-batching": [{"max_batch": "16", "max_tokens": "2048"}, {"max_batch": "32", "max_tokens": "4096"},
                            {"max_batch": "8", "max_tokens": "2048"}, {"max_batch": "16", "max_tokens": "4096"}],
    "chunked-prefill": [{"tokens": "512"}, {"tokens": "256"}],
    "prefix-cache": [{"policy": "radix"}],
    "cascade-attention": [{}, {"min_tokens": "256"}],
    "pack-linear-weights": [{}, {"include_head": "false"}, {"tied_head": "true"}, {"dtype": "bf16"}],
    "speculative": [{"method": "prompt-lookup", "k": "4"}, {"method": "prompt-lookup", "k": "2"},
                    {"method": "prompt-lookup", "k": "6"}, {"method": "ngram", "k": "4"},
                    {"method": "prediction", "k": "16"}],
    "select-kernels": [{}],
    "intra-op-threads": [{}, {"threads": "1"}, {"threads": "2"}],
    "compile-decode-step": [{}],
}

REQUIRES = {"cascade-attention": ("prefix-cache",), "chunked-prefill": ("continuous-batching",),
            "kv-int8": ("paged-kv",), "prefix-cache": ("paged-kv",),
            "speculative": ("continuous-batching", "paged-kv"),
            "compile-decode-step": ("fold-rope-tables", "paged-kv", "continuous-batching")}


@dataclass
class Features:
    """What the cost model knows about the deployment (from the spec's IR)."""

    kind: str = "chat"
    prefix_tokens: int = 0
    share: float = 0.0
    prompt_mean: float = 64.0
    output_mean: float = 64.0
    concurrency: int = 1
    small_gemms: bool = True
    exact: bool = True            # greedy_exact accuracy: int8 rounding is likely rejected
    target: str = "cpu"
    threads: int = 0              # the target's threads per server (0: all cores)
    cores: int = 1                # cores this machine gives the search (replicas share them)
    replicas: int = 1             # the spec's own `serve { replicas }`
    throughput_slo: tuple[str, float] | None = None   # (objective name, tok/s) of a `throughput >=` SLO

    @staticmethod
    def of(ctx: SearchContext, cores: int | None = None) -> "Features":
        from vsc.agent.objectives import objectives_for
        from vsc.ir.parser import parse_module
        from vsc.ir.route import replicas
        from vsc.passes.intra_op_threads import SMALL_GEMM_MACS, decode_gemm_macs

        module = parse_module(ctx.ir_text)
        d = module.deployment
        wl = d.get("workload") or {}
        f = Features()
        sp = wl.get("shared_prefix") or {}
        f.kind = wl.get("kind") or ("shared_prefix" if sp else "chat")
        f.prefix_tokens, f.share = int(sp.get("tokens") or 0), float(sp.get("share") or 0.0)
        f.prompt_mean = _mean(wl.get("prompt_tokens"), 64.0)
        f.output_mean = _mean(wl.get("output_tokens"), 64.0)
        arr = wl.get("arrivals") or {}
        f.concurrency = int(arr.get("concurrency") or 0) or max(1, round(float(arr.get("rate") or 1.0)
                                                                         * f.output_mean * 0.01))
        module.batching.max_batch = max(1, min(16, f.concurrency))
        macs = decode_gemm_macs(module)
        f.small_gemms = bool(macs) and sum(macs) / len(macs) < SMALL_GEMM_MACS
        f.exact = ((d.get("accuracy") or {}).get("kind") or "greedy_exact") == "greedy_exact"
        f.target = module.target.kind
        f.threads = int(module.target.attrs.get("threads") or 0)
        f.cores = cores or machine_cores()
        f.replicas = replicas(module)
        slos = [o for o in objectives_for(d) if o.metric == "throughput" and o.target is not None]
        if slos:
            f.throughput_slo = (slos[0].name, float(slos[0].target))
        return f


def _mean(dist: dict | None, default: float) -> float:
    if not dist:
        return default
    params = [float(x) for x in dist.get("params") or []]
    if dist.get("kind") == "uniform" and len(params) == 2:
        return sum(params) / 2
    return params[0] if params else default


def expected_gain(move: str, spec: PassSpec, f: Features) -> float:
    """The cost model: expected relative gain of adding (or retuning to) `spec`."""
    name, opts = spec.name, spec.options
    small = 2.0 if f.small_gemms else 1.0
    risky = 0.2 if f.exact else 0.7
    if move == "remove":
        return 0.005
    if name == "prefix-cache":
        prefill = f.share * f.prefix_tokens / max(1.0, f.share * f.prefix_tokens + f.prompt_mean)
        return 0.02 + 0.6 * prefill
    if name == "cascade-attention":     # decode attention reads the shared prefix once for the whole group
        shared = f.share * f.prefix_tokens / max(1.0, f.share * f.prefix_tokens + f.prompt_mean + f.output_mean)
        return (0.02 + 0.3 * shared) * (1.0 if f.concurrency > 1 else 0.1) * (1.0 if not opts else 0.5)
    if name == "pack-linear-weights":   # F.linear repacks every weight per call; packed once reads ~2x faster
        if f.target != "cpu":
            return 0.0
        if opts.get("dtype") == "bf16":   # 1.15-1.25x at 16 streams (bench/RESULTS.md), but rounds: a logits bar only
            return 0.0 if f.exact else 0.2
        return 0.35 if not opts else 0.1
    if name == "speculative":
        k = int(opts.get("k", "4"))
        if opts.get("method") == "prediction":   # requests carry their answers: the one source that knows them
            return 0.6 if f.kind == "predicted_edit" else 0.0
        base = 0.45 if f.kind in ("code_edit", "predicted_edit") else 0.03
        if opts.get("method") == "ngram":
            base *= 0.4
        return base * {4: 1.0, 2: 0.85, 6: 0.8}.get(k, 0.7)
    if name == "chunked-prefill":
        return 0.08 if f.prompt_mean >= 512 else 0.01
    if name == "paged-kv":
        return 0.25 if move == "add" else 0.015
    if name == "continuous-batching":
        if move == "add":
            return 0.3
        wanted = str(max(8, min(32, f.concurrency)))
        return 0.03 if opts.get("max_batch") == wanted else 0.012
    if name in ("fuse-qkv", "fuse-gate-up"):
        return 0.04 * small
    if name in ("fuse-silu-mul", "fuse-add-rmsnorm", "fold-rope-tables"):
        return 0.025 * small
    if name == "intra-op-threads":
        if not opts:
            return 0.3 if f.small_gemms and f.target == "cpu" else 0.01
        return 0.01
    if name == "weight-int8":
        return (0.03 if f.small_gemms else 0.15) * risky
    if name == "kv-int8":
        return 0.05 * risky
    if name == "select-kernels":        # cuda: Triton kernels; cpu: TVM attention in place, norms, rope
        return 0.2 if f.target == "cuda" else 0.1
    if name == "compile-decode-step":   # one VM call per decode step: pays where per-op dispatch dominates
        if f.target != "cpu":
            return 0.0
        return 0.35 if f.small_gemms or f.concurrency <= 2 else 0.08
    return 0.0


def _requirements(name: str) -> list[str]:
    """Every pass `name` needs earlier, transitively (cascade-attention: prefix-cache, paged-kv)."""
    out: list[str] = []
    stack = list(REQUIRES.get(name, ()))
    while stack:
        r = stack.pop()
        if r not in out:
            out.append(r)
            stack.extend(REQUIRES.get(r, ()))
    return out


def _place(specs: list[PassSpec], new: PassSpec) -> list[PassSpec]:
    rank = {n: i for i, n in enumerate(CANONICAL_ORDER)}
    at = len(specs)
    for i, s in enumerate(specs):
        if rank.get(s.name, len(CANONICAL_ORDER)) > rank.get(new.name, len(CANONICAL_ORDER)):
            at = i
            break
    return specs[:at] + [new] + specs[at:]


#: How much a move's expected gain shrinks per earlier failure of the same pass + options.
FAILURE_DISCOUNT = 1 / 3


def failures(history: list[dict[str, Any]]) -> dict[str, int]:
    """Per pass text (`speculative{method=prompt-lookup,k=4}`): how many candidates that added
    or retuned to it scored below their parent, or were rejected."""
    by_id = {h["id"]: h for h in history}
    out: dict[str, int] = {}
    for h in history:
        parent = by_id.get(h.get("parent"))
        if parent is None or parent.get("score") is None:
            continue
        try:
            mine = {str(s) for s in parse_pipeline(h.get("pipeline") or "")}
            theirs = {str(s) for s in parse_pipeline(parent.get("pipeline") or "")}
        except Exception:  # noqa: BLE001 - a malformed proposal's pipeline: nothing to learn
            continue
        worse = h.get("status") == "rejected" or (h.get("score") is not None and h["score"] < parent["score"])
        if worse:
            for spec in mine - theirs:
                out[spec] = out.get(spec, 0) + 1
    return out


#: The router replicate gets: it keeps each replica's prefix cache useful (docs/scale-out.md).
REPLICATE_ROUTER = "prefix_affinity"
#: Throughput of n replicas relative to n separate servers (the ingress's hop, a shared host).
REPLICA_EFFICIENCY = 0.8


def replica_threads(specs: list[PassSpec], f: Features) -> int:
    """Threads (cores) one replica of this pipeline's plan uses: intra-op-threads' number when it
    pins one, else the target's threads; 0 (all cores) takes the whole machine."""
    for s in specs:
        if s.name == "intra-op-threads" and str(s.options.get("threads", "")).isdigit():
            return int(s.options["threads"])
    return f.threads if f.threads > 0 else f.cores


def _replicated(pipeline: str) -> bool:
    try:
        return any(s.name == "replicate" for s in parse_pipeline(pipeline))
    except Exception:  # noqa: BLE001 - a malformed proposal's pipeline was never measured anyway
        return False


def best_single_replica(history: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The measured candidate without replicas with the highest value of objective `name`."""
    best = None
    for h in history:
        value = (h.get("objectives") or {}).get(name)
        if h.get("status") != "ok" or value is None or _replicated(h.get("pipeline") or ""):
            continue
        if best is None or value > best["objectives"][name]:
            best = h
    return best


def replicate_move(specs: list[PassSpec], f: Features, history: list[dict[str, Any]],
                   ray: bool = True) -> tuple[float, str, str] | None:
    """Add replicate{n=N,router=prefix_affinity} when one replica cannot meet the throughput SLO.

    Only when: the spec has a `throughput >=` SLO; the best measured single-replica candidate
    misses it; the pipeline (and the spec) has no replicas yet; the target is a CPU (a cuda plan
    needs a GPU per replica, which is for the user to give); Ray Serve is installed (`ray`); and
    the machine gives N >= 2 replicas their own threads each (N <= cores // threads per replica).
    N: the fewest replicas that would meet the SLO if throughput scaled linearly, at most that."""
    if f.throughput_slo is None or f.replicas > 1 or f.target != "cpu" or not ray:
        return None
    if any(s.name == "replicate" for s in specs):
        return None
    name, target = f.throughput_slo
    best = best_single_replica(history, name)
    if best is None or best["objectives"][name] <= 0 or best["objectives"][name] >= target:
        return None
    measured = best["objectives"][name]
    per = max(1, replica_threads(specs, f))
    most = f.cores // per
    if most < 2:
        return None
    n = min(most, max(2, math.ceil(target / measured)))
    new = PassSpec("replicate", {"n": str(n), "router": REPLICATE_ROUTER})
    why = (f"add {new}: {name} >= {target:g} tok/s is missed by one replica (the best single-replica candidate, "
           f"#{best['id']}, measured {measured:.1f} tok/s); {n} replicas x {per} thread(s) fit this machine's "
           f"{f.cores} cores" + ("" if n * measured >= target else f" (at most {most}: short of the SLO even if "
                                                                  f"throughput scales linearly)"))
    return REPLICA_EFFICIENCY * (n - 1), format_pipeline(_place(specs, new)), why


def moves(pipeline: str, f: Features, failed: dict[str, int] | None = None,
          history: list[dict[str, Any]] | None = None, ray: bool = True) -> list[tuple[float, str, str]]:
    """(gain, pipeline text, description) of every move from `pipeline`, best first; a move
    that brings in a pass text listed in `failed` is discounted (FAILURE_DISCOUNT per failure).
    `history` (the measured candidates) decides whether replicate is one of them (`replicate_move`)."""
    failed = failed or {}
    specs = parse_pipeline(pipeline) if pipeline.strip() else []
    present = {s.name for s in specs}
    out: list[tuple[float, str, str]] = []
    scale_out = replicate_move(specs, f, history or [], ray)
    if scale_out is not None:
        gain, text, what = scale_out
        new = next(s for s in parse_pipeline(text) if s.name == "replicate")
        out.append((gain * FAILURE_DISCOUNT ** failed.get(str(new), 0), text, what))
    for name, grid in GRIDS.items():
        if name in present:
            continue
        if name in ("intra-op-threads", "cascade-attention",
                    "pack-linear-weights", "compile-decode-step") and f.target != "cpu":
            continue
        missing = [r for r in _requirements(name) if r not in present]
        for opts in grid:
            new = PassSpec(name, dict(opts))
            base = specs
            for r in missing:            # bring what it requires along, with their first grid point
                base = _place(base, PassSpec(r, dict(GRIDS[r][0])))
            text = format_pipeline(_place(base, new))
            gain = expected_gain("add", new, f) * FAILURE_DISCOUNT ** failed.get(str(new), 0)
            out.append((gain - 0.01 * len(missing), text, f"add {new}"))
    for i, s in enumerate(specs):
        for opts in GRIDS.get(s.name, []):
            if opts == s.options or not opts:
                continue
            new = PassSpec(s.name, dict(opts))
            text = format_pipeline(specs[:i] + [new] + specs[i + 1:])
            gain = expected_gain("retune", new, f) * FAILURE_DISCOUNT ** failed.get(str(new), 0)
            out.append((gain, text, f"retune {s} -> {new}"))
        if not any(s.name in REQUIRES.get(o.name, ()) for o in specs):
            text = format_pipeline(specs[:i] + specs[i + 1:])
            out.append((expected_gain("remove", s, f), text, f"remove {s}"))
    out.sort(key=lambda m: (-m[0], m[1]))
    return out


class BuiltinProposer:
    name = "builtin"

    def __init__(self, cores: int | None = None, ray: bool | None = None) -> None:
        """`cores`: what the machine gives (default: this process's affinity); `ray`: whether Ray
        Serve is there to measure replicas (default: whether it is installed)."""
        self._features: Features | None = None
        self.cores = cores
        if ray is None:
            from vsc.runtime.ray_serve import installed
            ray = installed()
        self.ray = ray

    def usage(self) -> dict[str, int]:
        return {"input_tokens": 0, "output_tokens": 0}

    def propose(self, ctx: SearchContext, n: int) -> list[Proposal]:
        if self._features is None:
            self._features = Features.of(ctx, self.cores)
        tried = {h.get("pipeline") for h in ctx.history} | {h.get("proposal", {}).get("pipeline") for h in ctx.history}
        start = (ctx.incumbent or {}).get("pipeline")
        if start is None:
            start = ctx.history[0]["pipeline"] if ctx.history else ""
        proposals: list[Proposal] = []
        for gain, text, what in moves(start, self._features, failures(ctx.history), ctx.history, self.ray):
            if text in tried:
                continue
            tried.add(text)
            proposals.append(Proposal(text, rationale=f"{what} (expected gain {gain:.3f})"))
            if len(proposals) >= n:
                break
        return proposals

