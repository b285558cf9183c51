"""Hugging Face `transformers serve --continuous-batching` as a peer, in its own venv under `<cache>/hf/venv`.

The model folder is the positional FORCE_MODEL argument: it is loaded before the server
listens, and every request must then name exactly that string as "model" (or none);
/v1/models lists the HF hub cache, not the forced model, so the name is fixed here.
The CLI has no max-batch flag: the KV cache is bounded instead (`--cb-num-blocks`, pages of
256 tokens, enough for `max_batch` sequences of `ctx` tokens) and the batch token budget is
`--cb-max-batch-tokens` (2048, as in vsc's pipeline).
Requests: "prompt" must be a string (no token-id lists), and unknown fields such as
`ignore_eos` are rejected with 422; running past EOS is asked for with a per-request
`generation_config` JSON whose eos_token_id is empty.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from bench.peers.base import VenvPeer, pip_version

TRANSFORMERS_VERSION = "5.23.0"
TORCH_VERSION = "2.13.0"
PAGE_SIZE = 256                 # ContinuousBatchingConfig.page_size default (tokens per block)
MAX_BATCH_TOKENS = 2048


class HfServePeer(VenvPeer):
    name = "hf"
    start_timeout = 240.0
    token_prompts = False          # 400 "prompt must be a string."

    def ignore_eos_fields(self) -> dict:
        # the request's generation_config replaces the model's: greedy, and no token ends generation
        return {"generation_config": json.dumps({"do_sample": False, "eos_token_id": []})}

    def __init__(self, cache_dir: Path | None = None, version: str = TRANSFORMERS_VERSION):
        super().__init__(cache_dir)
        self.transformers_version = version

    @property
    def pinned(self) -> str:
        return self.transformers_version

    def install_steps(self) -> list[list[str]]:
        py = str(self.python)
        return [[py, "-m", "pip", "install", f"torch=={TORCH_VERSION}"],
                [py, "-m", "pip", "install", f"transformers[serving]=={self.transformers_version}"]]

    def install_check(self) -> tuple[list[str], str]:
        return [str(self.venv / "bin" / "transformers"), "serve", "--help"], "transformers serve --help"

    def version(self) -> str | None:
        py = self.venv / "bin" / "python"
        v = pip_version(py, "transformers") if py.exists() else None
        return f"transformers {v}" if v else None

    def num_blocks(self, max_batch: int, ctx: int) -> int:
        return math.ceil(max_batch * ctx / PAGE_SIZE) + 1

    def command(self, model_dir: Path, port: int, *, max_batch: int = 16, threads: int = 2, ctx: int = 2048,
                **_) -> list[str]:
        return [str(self.venv / "bin" / "transformers"), "serve", str(model_dir), "--continuous-batching",
                "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
                "--cb-num-blocks", str(self.num_blocks(max_batch, ctx)),
                "--cb-max-batch-tokens", str(MAX_BATCH_TOKENS), "--log-level", "info"]

    def env(self, *, threads: int) -> dict[str, str]:
        return {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

    def served_model_name(self, model_dir: Path, **prepared) -> str | None:
        return str(model_dir)

    def describe(self) -> dict:
        d = super().describe()
        d.update(dtype="float32")
        return d
