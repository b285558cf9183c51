"""What may appear where in a spec: the sections, keys, calls and values of each block.

`vsc.frontend.semantics` checks the items that `vsc.frontend.syntax` builds against these
tables; each entry carries how it is written, which is what an error message shows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from vsc.frontend import units
from vsc.frontend.syntax import Assign, Section


@dataclass
class Field:
    """What a name in a block must look like: its item shape and how to write it."""

    shape: type
    usage: str


QUANTITY_EXAMPLES = {units.TIME: "200 ms", units.SIZE: "8 GiB", units.RATE: "8 req/s",
                      units.THROUGHPUT: "500 tok/s"}

DEPLOYMENT_SECTIONS = {
    "model": Field(Section, 'model "path/to/model" { dtype = f32 }  (an HF folder, or a .gguf file)'),
    "target": Field(Section, "target cpu { threads = 4, memory = 8 GiB }"),
    "workload": Field(Section, "workload { ... }"),
    "slo": Field(Section, "slo { ttft p99 <= 200 ms }"),
    "accuracy": Field(Section, "accuracy { greedy_exact(probes = 8) }"),
    "serve": Field(Section, 'serve { host = "127.0.0.1", port = 8000 }'),
    "optimize": Field(Section, 'optimize "fuse-qkv,paged-kv{block=16}"'),
}
REQUIRED_SECTIONS = ("model", "target", "workload")

MODEL_KEYS = {"dtype": Field(Assign, "dtype = f32")}
DTYPES = {
    "f32": "f32", "float32": "f32", "fp32": "f32",
    "bf16": "bf16", "bfloat16": "bf16",
    "f16": "f16", "float16": "f16", "fp16": "f16",
}
DEFAULT_DTYPE = {"cpu": "f32", "cuda": "bf16"}

TARGET_KEYS = {
    "cpu": {
        "threads": Field(Assign, "threads = 4"),
        "memory": Field(Assign, "memory = 8 GiB"),
    },
    "cuda": {
        "arch": Field(Assign, "arch = sm_90"),
        "gpus": Field(Assign, "gpus = 1"),
        "memory": Field(Assign, "memory = 80 GiB"),
    },
}
TARGET_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "cuda": "cuda", "x86": "cpu", "arm": "cpu", "cpu": "cpu"}
ARCH_RE = re.compile(r"sm_[0-9]{2,3}[a-z]?")

WORKLOAD_KEYS = {
    "arrivals": Field(Assign, "arrivals = poisson(8 req/s)"),
    "prompt_tokens": Field(Assign, "prompt_tokens = uniform(32, 256)"),
    "output_tokens": Field(Assign, "output_tokens = fixed(64)"),
    "shared_prefix": Field(Section, "shared_prefix { tokens = 512, share = 0.9 }"),
    "dataset": Field(Assign, 'dataset = "prompts.jsonl"'),
    "kind": Field(Assign, "kind = code_edit"),
}
# What the requests are like, beyond their lengths: `vsc search` and `vsc bench` build
# that kind of request set, and `optimize auto` picks passes that pay on it (predicted_edit:
# requests carry their expected answer as OpenAI's `prediction`, so speculation drafts from
# it; vsc.passes.auto.auto_pipeline).
WORKLOAD_KINDS = ("chat", "shared_prefix", "code_edit", "json", "predicted_edit")
REQUIRED_WORKLOAD = ("arrivals", "prompt_tokens", "output_tokens")
SHARED_PREFIX_KEYS = {
    "tokens": Field(Assign, "tokens = 512"),
    "share": Field(Assign, "share = 0.9"),
}
# distribution name -> parameter names
DISTRIBUTIONS = {
    "fixed": ("n",),
    "uniform": ("lo", "hi"),
    "normal": ("mean", "std"),
    "lognormal": ("mean", "sigma"),
}
ARRIVALS = {"poisson": ("rate",), "closed": ("concurrency",)}

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
SLO_METRICS = LATENCY_METRICS + ("throughput",)
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99.9": 99.9}

# accuracy check -> (parameter names, how many are required)
ACCURACY_CHECKS = {
    "greedy_exact": (("probes", "tolerance"), 0),
    "logits_tol": (("tolerance", "probes"), 1),
}

SERVE_KEYS = {
    "host": Field(Assign, 'host = "127.0.0.1"'),
    "port": Field(Assign, "port = 8000"),
    "max_context": Field(Assign, "max_context = 2048"),
    "api": Field(Assign, "api = openai"),
    "overload": Field(Assign, "overload = shed"),
    "replicas": Field(Assign, "replicas = 2"),
    "router": Field(Assign, "router = prefix_affinity"),
}
APIS = ("openai",)
