"""vsc itself as a peer: write a deployment spec, `vsc compile` it into the cache, `python -m vsc serve` it.

The compiled folder is reused when nothing that goes into it changed: the spec text, the
model folder's content and the compiler's own sources (vsc/, grammars included) are hashed into
the folder's key.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

from bench.peers.base import REPO_ROOT, Peer, PeerUnavailable, dir_content_hash, install_lock, pip_version, run_logged
from bench.peers.gguf_file import check_gguf, file_content_hash, gguf_dtype
from vsc.passes.auto import WORKLOAD_PASSES

# Exact passes only (no int8): the same numbers as the peers' fp32. prefix-cache costs a
# tree lookup per admission and pays on any workload whose prompts share a prefix.
# select-kernels gives attention TVM's paged kernel (reads the cache in place), faster than
# cascade-attention's torch path even behind a shared prefix, so the cascade is left out; the
# tied LM head is packed for oneDNN as a second copy (SmolLM2: +113 MB, 17.9 -> 5.9 ms at 16
# rows); silu-mul and add-rmsnorm run fused (TVM kernels: one pass over the prompt's activations
# instead of three; SmolLM2 code-edit c16 in-process 47.4 / 47.2 -> 45.9 / 44.0 s). bench/RESULTS.md
# has the A/Bs.
STEP_TOKENS = 2048             # the default pipeline's step budget (continuous-batching max_tokens)
DEFAULT_PIPELINE = ("fold-rope-tables,fuse-qkv,fuse-gate-up,paged-kv{block=16},"
                    "continuous-batching{max_batch=<max_batch>,max_tokens=2048},prefix-cache{policy=radix},"
                    "pack-linear-weights{tied_head=true},intra-op-threads,fuse-silu-mul,fuse-add-rmsnorm,select-kernels")
# A GGUF's linears stay block-quantized: pack-linear-weights (oneDNN packing of f32 linears) has
# nothing to pack there and fails the compile, so vsc-gguf leaves it out; select-kernels runs
# them (and the norms, rope, silu-mul, attention) with the TVM kernels vsc compile builds for this CPU.
# Every op of that plan has a TVM kernel, so its decode forward compiles into one Relax function
# (compile-decode-step: one VM call per step; SmolLM2 decode step 8.45 -> 6.03 ms at one sequence,
# 34.8 -> 28.2 ms at 16, in-process).
DEFAULT_GGUF_PIPELINE = DEFAULT_PIPELINE.replace(",pack-linear-weights{tied_head=true}", "") + ",compile-decode-step"
ACTIVATION_RESERVE = 0.10      # the share of `memory` vsc keeps back from weights + KV (vsc/frontend/lower.py)
MEMORY_SLACK = 256 << 20       # on top: activations of a max_tokens step, the runtime


def kv_bytes_per_token(config: dict, dtype_bytes: int = 4) -> int:
    """Keys + values of every layer for one token."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def memory_for(model_dir: Path, *, max_batch: int, ctx: int, weights: int | None = None) -> int:
    """A memory budget (bytes, a whole number of MiB) that holds the weights (default: the folder's
    f32 safetensors; `weights` bytes when given, e.g. a GGUF file's size) plus `max_batch` full
    `ctx`-token sequences of f32 KV cache (shape from model_dir's config.json), after vsc's
    activation reserve, plus slack."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if weights is None:
        weights = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    need = weights + kv_bytes_per_token(config) * ctx * max_batch
    total = need / (1 - ACTIVATION_RESERVE) + MEMORY_SLACK
    return math.ceil(total / (64 << 20)) * (64 << 20)


def spec_text(model_dir: Path, *, max_batch: int, threads: int, ctx: int, memory: int, pipeline: str,
              accuracy: str | None = None) -> str:
    """The deployment spec for a closed-loop benchmark of `model_dir` (an HF folder, or a .gguf file);
    `accuracy`: the spec's accuracy bar (default: the compiler's, greedy-exact)."""
    return (
        "# written by bench/peers/vsc_peer.py\n"
        "deployment bench_peer {\n"
        f"  model {json.dumps(str(model_dir))} {{ dtype = f32 }}\n"
        f"  target cpu {{ threads = {threads}, memory = {memory >> 20} MiB }}\n"
        "  workload {\n"
        f"    arrivals = closed({max_batch})\n"
        "    prompt_tokens = uniform(16, 256)\n"
        "    output_tokens = fixed(64)\n"
        "  }\n"
        f"  serve {{ host = \"127.0.0.1\", max_context = {ctx} }}\n"
        + (f"  accuracy {{ {accuracy} }}\n" if accuracy else "")
        + f"  optimize {json.dumps(pipeline)}\n"
        "}\n")


def compiler_hash() -> str:
    """A key for the compiler's sources: a change anywhere in vsc/ (its grammars too) recompiles."""
    h = hashlib.sha256()
    for folder in (REPO_ROOT / "vsc",):
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.suffix in (".py", ".lark", ".json", ".txt", ".jinja") and "__pycache__" not in p.parts:
                h.update(p.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


class VscPeer(Peer):
    name = "vsc"
    start_timeout = 180.0
    # A variant adds to the plan what `optimize auto` adds for a spec whose workload is described
    # so (vsc.passes.auto.auto_pipeline): drafts from the requests' predictions for
    # `workload { kind = predicted_edit }`, cascade attention behind a 2048+-token shared prefix.
    VARIANTS = {"default": [], "prediction": [WORKLOAD_PASSES["predicted_edit"]], "cascade": ["cascade-attention"]}
    WORKLOAD_VARIANTS = {"predicted-edit": ("default", "prediction"), "long-prefix": ("default", "cascade")}
    ANCHOR = "prefix-cache{policy=radix}"     # the variant's passes go right after it, as auto_pipeline puts them

    def __init__(self, cache_dir: Path | None = None, pipeline: str = DEFAULT_PIPELINE,
                 python: Path | None = None):
        super().__init__(cache_dir)
        self.pipeline = pipeline
        self.accuracy: str | None = None      # the spec's accuracy bar; None: the compiler's default
        self.python = Path(python) if python else REPO_ROOT / ".venv" / "bin" / "python"

    @property
    def vsc_bin(self) -> Path:
        return self.python.parent / "vsc"

    def pipeline_for(self, max_batch: int, ctx: int = STEP_TOKENS) -> str:
        """The pipeline for this batch and context: past STEP_TOKENS of context, a prompt is
        prefilled in STEP_TOKENS-token chunks (continuous-batching's step budget must hold a
        whole prompt otherwise; the verifier refuses the plan)."""
        pipeline = self.pipeline.replace("<max_batch>", str(max_batch))
        extra = self.VARIANTS[self.variant]
        if extra:
            pipeline = pipeline.replace(self.ANCHOR, ",".join([self.ANCHOR, *extra]), 1)
        step = f"max_tokens={STEP_TOKENS}}}"
        if ctx > STEP_TOKENS and step in pipeline and "chunked-prefill" not in pipeline:
            pipeline = pipeline.replace(step, f"max_tokens={ctx}}},chunked-prefill{{tokens={STEP_TOKENS}}}", 1)
        return pipeline

    def install(self) -> None:
        if not self.python.exists() or not self.vsc_bin.exists():
            raise PeerUnavailable(self.name, f"no {self.vsc_bin}: run `make install` in {REPO_ROOT}")
        self.cache.mkdir(parents=True, exist_ok=True)

    def version(self) -> str | None:
        return pip_version(self.python, "vsc")

    def server_key(self, spec: str, model_hash: str, compiler: str) -> str:
        return hashlib.sha256(f"{spec}\0{model_hash}\0{compiler}".encode()).hexdigest()[:16]

    # --- what the spec's model line names (overridden by vsc-gguf) ---------------------------
    def model_source(self, model_dir: Path) -> Path:
        """The path the spec's `model` line names."""
        return Path(model_dir)

    def weights_bytes(self, model_dir: Path) -> int | None:
        """Weight bytes the memory budget holds (None: the folder's safetensors)."""
        return None

    def model_hash(self, model_dir: Path) -> str:
        return dir_content_hash(model_dir)

    def prepare(self, model_dir: Path, *, max_batch: int, threads: int, ctx: int) -> dict:
        source = self.model_source(model_dir)
        memory = memory_for(model_dir, max_batch=max_batch, ctx=ctx, weights=self.weights_bytes(model_dir))
        pipeline = self.pipeline_for(max_batch, ctx)
        spec = spec_text(source, max_batch=max_batch, threads=threads, ctx=ctx, memory=memory, pipeline=pipeline,
                         accuracy=self.accuracy)
        key = self.server_key(spec, self.model_hash(model_dir), compiler_hash())
        folder = self.cache / "servers" / f"{source.stem if source.suffix == '.gguf' else source.name}-{key}"
        server = folder / "server"
        with install_lock(self.cache):
            if not (server / "manifest.json").exists():
                self.compile(folder, spec)
            os.utime(folder)                       # last used: what prune() keeps
            self.prune()
        return {"server_dir": str(server), "pipeline": pipeline, "memory_bytes": memory, "model": str(source),
                "spec": str(folder / "deploy.vs")}

    def prune(self, keep: int = 8) -> None:
        """Delete all but the `keep` most recently used compiled servers (each compiler change adds one)."""
        folders = sorted((p for p in (self.cache / "servers").iterdir() if p.is_dir()),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for old in folders[keep:]:
            shutil.rmtree(old, ignore_errors=True)

    def compile(self, folder: Path, spec: str) -> None:
        """`vsc compile` `spec` (written to folder/deploy.vs) into folder/server; its output in folder/compile.log."""
        server = folder / "server"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "deploy.vs").write_text(spec)
        log = folder / "compile.log"
        log.unlink(missing_ok=True)
        shutil.rmtree(server, ignore_errors=True)
        run_logged([self.vsc_bin, "compile", folder / "deploy.vs", "-o", server], log,
                   peer=self.name, what="vsc compile", timeout=1800)

    def command(self, model_dir: Path, port: int, *, max_batch: int = 16, threads: int = 2, ctx: int = 2048,
                server_dir: str = "<server_dir>", **_) -> list[str]:
        return [str(self.python), "-m", "vsc", "serve", str(server_dir), "--host", "127.0.0.1", "--port", str(port)]

    def describe(self) -> dict:
        d = super().describe()
        pipeline = self.last.get("pipeline", self.pipeline)
        dtype = "f32, linear weights bf16" if "dtype=bf16" in pipeline else "f32"
        d.update(pipeline=pipeline, dtype=dtype, variant=self.variant)
        return d


# llama.cpp quantizes activations to 8 bits per 32-block for its dot products; under a logits
# tolerance select-kernels does the same (VNNI kernels). Measured on SmolLM2's Q4_1 GGUF against
# its dequantized model: max |dlogit| 1.3 over 4 probes x 16 tokens (bench/RESULTS.md).
GGUF_ACCURACY = "logits_tol(3.0, probes = 4)"


class VscGgufPeer(VscPeer):
    """vsc compiling a GGUF file as is: the spec's model line is `model "/abs/path/x.gguf" { dtype = f32 }`
    (dtype: activations and KV cache; the weights stay in the file's format), the memory budget holds
    the GGUF file's bytes instead of f32 weights. The HF folder passed to start() gives the KV cache
    shape (config.json) and the workload's tokenizer. Set `gguf_file` first."""
    name = "vsc-gguf"

    def __init__(self, cache_dir: Path | None = None, pipeline: str = DEFAULT_GGUF_PIPELINE,
                 python: Path | None = None, gguf_file: Path | None = None):
        super().__init__(cache_dir, pipeline, python)
        self.gguf_file = Path(gguf_file) if gguf_file else None
        self.accuracy = GGUF_ACCURACY

    def install(self) -> None:
        check_gguf(self.name, self.gguf_file)
        super().install()

    def model_source(self, model_dir: Path) -> Path:
        return check_gguf(self.name, self.gguf_file).resolve()

    def weights_bytes(self, model_dir: Path) -> int | None:
        return self.model_source(model_dir).stat().st_size

    def model_hash(self, model_dir: Path) -> str:
        return file_content_hash(self.model_source(model_dir))

    def prepare(self, model_dir: Path, *, max_batch: int, threads: int, ctx: int) -> dict:
        prepared = super().prepare(model_dir, max_batch=max_batch, threads=threads, ctx=ctx)
        return {**prepared, "gguf": prepared["model"], "dtype": gguf_dtype(Path(prepared["model"]))}

    def describe(self) -> dict:
        d = super().describe()
        gguf = self.last.get("gguf") or (str(self.gguf_file) if self.gguf_file else None)
        d.update(dtype=self.last.get("dtype") or (gguf_dtype(Path(gguf)) if gguf else None), gguf=gguf,
                 activation_dtype="f32 (int8 per 32-block inside the quantized linears, as llama.cpp)",
                 accuracy=self.accuracy)
        return d
