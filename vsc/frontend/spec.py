"""The checked AST of a deployment spec: what the user asked for, with units resolved.

The parser (`vsc.frontend.parser`) builds these from `deploy.vs`; `vsc.frontend.lower`
turns them into a ServingModule. Every part keeps the `SourceLocation` it came from
so that the IR can say which spec line made a node.

Units are normalised here: times in seconds, sizes in bytes, rates in requests/s.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vsc.errors import SourceLocation


@dataclass
class ModelSpec:
    path: Path                      # absolute path of the HF folder (resolved against the spec file)
    dtype: str                      # "f32" | "bf16" | "f16"
    loc: SourceLocation


@dataclass
class TargetSpec:
    kind: str                       # "cpu" | "cuda"
    threads: int | None = None      # cpu only
    arch: str | None = None         # cuda only, e.g. "sm_90"
    gpus: int = 1                   # cuda only
    memory_bytes: int | None = None # memory the deployment may use (KV budget is derived from it)
    loc: SourceLocation | None = None


@dataclass
class Distribution:
    """A length distribution in tokens: fixed(n), uniform(lo, hi), normal(mean, std), lognormal(mean, sigma)."""

    kind: str
    params: tuple[float, ...]
    loc: SourceLocation | None = None


@dataclass
class ArrivalSpec:
    kind: str                       # "poisson" (open loop) | "closed" (fixed concurrency)
    rate: float | None = None       # requests/s, poisson only
    concurrency: int | None = None  # closed only
    loc: SourceLocation | None = None


@dataclass
class SharedPrefixSpec:
    tokens: int                     # length of the shared prefix
    share: float                    # fraction of requests that carry it, 0..1
    loc: SourceLocation | None = None


@dataclass
class WorkloadSpec:
    arrivals: ArrivalSpec
    prompt_tokens: Distribution
    output_tokens: Distribution
    shared_prefix: SharedPrefixSpec | None = None
    dataset: Path | None = None     # absolute path, resolved against the spec file
    kind: str | None = None         # chat | shared_prefix | code_edit | json | predicted_edit (None: chat, or
    #                                 shared_prefix when given)
    loc: SourceLocation | None = None


@dataclass
class SLOSpec:
    """One objective: `metric pNN <= value` (latencies) or `metric >= value` (throughput)."""

    metric: str                     # "ttft" | "tpot" | "itl" | "e2e" | "throughput"
    percentile: float | None        # 50, 90, 99 ... (None for throughput)
    op: str                         # "<=" or ">="
    value: float                    # seconds for latencies, tokens/s for throughput
    loc: SourceLocation | None = None


@dataclass
class AccuracySpec:
    kind: str                       # "greedy_exact" | "logits_tol"
    probes: int = 8                 # number of probe prompts
    tolerance: float | None = None  # max |logit difference| (logits_tol), also used for near-tie detection
    loc: SourceLocation | None = None


@dataclass
class ServeSpec:
    host: str = "127.0.0.1"
    port: int = 8000
    max_context: int | None = None  # None: the model's max_position_embeddings
    api: str = "openai"
    # what to do when a request would miss the TTFT objective (vsc.runtime.enums.OVERLOAD_POLICIES);
    # None: not written, so lowering picks "shed" when the slo block has a `ttft <=` bound, else "queue"
    overload: str | None = None
    # scale-out: how many replicas serve the plan (`vsc serve --ray`) and how requests are routed among
    # them (vsc.runtime.enums.ROUTER_POLICIES; None: not written, so prefix_affinity when replicas > 1).
    # Both go on the IR's `route` stage / deployment, not in the deployment's serve entry.
    replicas: int = 1
    router: str | None = None
    loc: SourceLocation | None = None


@dataclass
class OptimizeSpec:
    pipeline: str | None            # a pass pipeline string, or None when `auto`
    auto: bool = False
    loc: SourceLocation | None = None


@dataclass
class DeploymentSpec:
    name: str
    file: Path                      # the spec file (absolute)
    model: ModelSpec
    target: TargetSpec
    workload: WorkloadSpec
    slos: list[SLOSpec] = field(default_factory=list)
    accuracy: AccuracySpec = field(default_factory=lambda: AccuracySpec(kind="greedy_exact"))
    serve: ServeSpec = field(default_factory=ServeSpec)
    optimize: OptimizeSpec = field(default_factory=lambda: OptimizeSpec(pipeline=None, auto=False))
    loc: SourceLocation | None = None
