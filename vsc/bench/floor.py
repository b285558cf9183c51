"""The physical floor: the least time a decode step can take on this machine.

Measured rates (`measure_machine`):

- memory bandwidth, GB/s: summing a large fp32 tensor (reads only; a decode step mostly
  reads), best of a few, with all threads and with one; also at a cache-resident size
  (a quarter of the last-level cache), since a small model's weights stay in cache;
- fp32 matmul rate, GFLOP/s: torch.mm of square matrices, best of a few, one thread and
  all threads.

Model arithmetic (`ModelShape`, from an HF config.json; d = head_dim, h = heads, kv = kv_heads,
H = hidden, I = intermediate, V = vocab, L = layers, E experts of which k active per token):

    attention weights / layer   A = H*h*d (q) + 2*H*kv*d (k, v) + h*d*H (o)   (+ q/k/v biases)
    MLP weights / layer / expert M = 3*H*I   (gate, up, down); router H*E when E > 0
    matmul weights per token    P = L*(A + k*M + router) + V*H   (lm_head; k = 1 when dense)
    weight bytes (stored)       = bytes/param * (V*H embed + V*H lm_head unless tied
                                                  + L*(A + E*M + router + 2H norms) + H)

Decode step, batch B, every sequence holding C tokens of context:

    FLOPs       = 2*B*P  +  4*B*C*L*h*d              (matmuls; QK^T and PV over C positions)
    bytes read  = bytes/param * (L*(A + min(E, B*k)*M + router + 2H) + V*H + H + B*H)
                  + B*C*L*2*kv*d*kv_bytes  (KV read)  +  B*L*2*kv*d*kv_bytes (KV written)
    t_step      = max(bytes / bandwidth, FLOPs / matmul rate)
    best output tok/s at batch B = B / t_step;  best batch-1 ms/token = 1000 * t_step(B=1)

Prefill of one N-token prompt: FLOPs = 2*N*P + 4*L*h*d*N*(N+1)/2 (causal attention), bytes =
all weights + the N tokens' KV written; least time per prompt token = max(...) / N.

Norms, RoPE, activations and the softmax are left out (they are O(B*H) per layer, small next
to the matmuls). The bandwidth used is the cache-resident one when a step's bytes fit in
half the last-level cache, the DRAM one otherwise; `Floor.bandwidth_kind` says which. With
threads="all" a rate is never taken below the one-thread rate (a server could use one).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vsc.errors import ModelError, VscError
from vsc.ir.hf_import import SUPPORTED_MODEL_TYPES, config_attrs, read_hf_config

DTYPE_BYTES = {"f32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "f16": 2, "float16": 2}


# --------------------------------------------------------------------------- the machine

@dataclass
class MachineRates:
    bandwidth_gbs: float            # DRAM read bandwidth, all threads
    bandwidth_1t_gbs: float         # DRAM read bandwidth, one thread
    cache_bandwidth_gbs: float      # read bandwidth of a cache-resident tensor (best of 1 and all threads)
    llc_bytes: int                  # last-level cache size (0: unknown)
    gflops_1t: float                # fp32 matmul, one thread
    gflops_all: float               # fp32 matmul, all threads
    threads: int                    # what "all threads" was

    def to_dict(self) -> dict:
        return asdict(self)


CPU0_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def last_level_cache_bytes(caches: Path = CPU0_CACHES) -> int:
    """Size of the highest-level CPU cache (sysfs `index*/level` and `index*/size`), 0 when unknown."""
    best_level, best = -1, 0
    for d in sorted(Path(caches).glob("index*")):
        try:
            level = int((d / "level").read_text())
            size = (d / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        try:
            n = int(size.rstrip("KMG")) * mult
        except ValueError:
            continue
        if level > best_level or (level == best_level and n > best):
            best_level, best = level, n
    return best


class _threads:
    """Temporarily set torch's intra-op thread count."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch

        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.old)


def measure_bandwidth(nbytes: int = 512 << 20, threads: int | None = None, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of `repeats` timings of summing an fp32 tensor of `nbytes`.

    Small (cache-resident) tensors are summed several times per timing so each timing
    lasts at least ~20 ms.
    """
    import torch

    n = max(1024, nbytes // 4)
    x = torch.ones(n, dtype=torch.float32)
    with _threads(threads or torch.get_num_threads()):
        x.sum()                                   # warm up: touch the pages, fill the cache
        t = time.perf_counter()
        x.sum()
        once = max(time.perf_counter() - t, 1e-7)
        inner = max(1, int(0.02 / once))
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(inner):
                x.sum()
            best = min(best, (time.perf_counter() - t) / inner)
    return n * 4 / best / 1e9


def measure_matmul(n: int = 1024, threads: int | None = None, repeats: int = 3) -> float:
    """fp32 matmul rate in GFLOP/s: best of `repeats` timings of torch.mm of two n x n matrices."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.rand(n, n, generator=g)
    b = torch.rand(n, n, generator=g)
    with _threads(threads or torch.get_num_threads()):
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def measure_machine(dram_bytes: int = 512 << 20, matmul_sizes: tuple[int, ...] = (512, 1024, 2048),
                    repeats: int = 5, rounds: int = 2) -> MachineRates:
    """Measure this machine's rates (about 5 s a round with the defaults).

    Every rate is the best seen over `rounds` rounds of `repeats` timings (the floor is a
    bound: the fastest the machine has shown); the cache-resident bandwidth is the best over
    one and all threads at 1/8 and 1/4 of the LLC. Other load on the machine lowers the
    numbers: measure on a quiet machine, or raise `rounds`, before reporting them.
    """
    import torch

    threads = torch.get_num_threads()
    llc = last_level_cache_bytes()
    cache_sizes = (llc // 8, llc // 4) if llc else (2 << 20, 4 << 20)
    bw_all = bw_1 = bw_cache = gf_1 = gf_all = 0.0
    for _ in range(max(1, rounds)):
        bw_all = max(bw_all, measure_bandwidth(dram_bytes, threads, repeats))
        bw_1 = max(bw_1, measure_bandwidth(dram_bytes, 1, repeats))
        bw_cache = max([bw_cache] + [measure_bandwidth(n, t, repeats) for n in cache_sizes for t in {1, threads}])
        gf_1 = max([gf_1] + [measure_matmul(n, 1, repeats) for n in matmul_sizes])
        gf_all = max([gf_all] + [measure_matmul(n, threads, repeats) for n in matmul_sizes])
    return MachineRates(bw_all, bw_1, max(bw_cache, bw_all, bw_1), llc, gf_1, gf_all, threads)


# --------------------------------------------------------------------------- the model

@dataclass
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    experts: int = 0                # 0: dense
    experts_per_token: int = 1
    attention_bias: bool = False
    dtype_bytes: int = 4            # weights (the CPU servers run f32)
    kv_bytes: int = 4               # one KV cache element

    @staticmethod
    def from_config(cfg: dict, name: str = "", dtype_bytes: int = 4, kv_bytes: int | None = None) -> "ModelShape":
        """The shape of an HF config.json, read by the importer's reader (`config_attrs`), so the
        floor counts the weights the compiled model has."""
        if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise ModelError(name or "config.json", f"unsupported model_type {cfg.get('model_type')!r} "
                             f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})")
        try:
            a = config_attrs(cfg)
        except KeyError as e:
            raise ModelError(name or "config.json", f"config lacks {e.args[0]!r}") from None
        return ModelShape(
            name=name or str(cfg.get("_name_or_path") or a["model_type"]),
            layers=int(a["layers"]), hidden=int(a["hidden"]), heads=int(a["heads"]), kv_heads=int(a["kv_heads"]),
            head_dim=int(a["head_dim"]), intermediate=int(a["intermediate"]), vocab=int(a["vocab"]),
            tied=a["tie_word_embeddings"], experts=int(a.get("experts", 0)),
            experts_per_token=int(a.get("experts_per_token", 1)), attention_bias=a["attention_bias"],
            dtype_bytes=dtype_bytes, kv_bytes=dtype_bytes if kv_bytes is None else kv_bytes)

    @staticmethod
    def from_model_dir(path: str | Path, dtype_bytes: int = 4) -> "ModelShape":
        """The shape of a model folder's config.json (checked as `vsc compile` checks it)."""
        path = Path(path)
        return ModelShape.from_config(read_hf_config(path), path.name, dtype_bytes)

    # parameter counts
    @property
    def attn_params(self) -> int:
        h, d, kv, H = self.heads, self.head_dim, self.kv_heads, self.hidden
        bias = (h * d + 2 * kv * d) if self.attention_bias else 0
        return H * h * d + 2 * H * kv * d + h * d * H + bias

    @property
    def mlp_params(self) -> int:
        """One expert's (or the dense) MLP: gate, up, down."""
        return 3 * self.hidden * self.intermediate

    @property
    def router_params(self) -> int:
        return self.hidden * self.experts if self.experts else 0

    @property
    def params(self) -> int:
        """Stored parameters (embedding and lm_head counted once when tied)."""
        H = self.hidden
        per_layer = self.attn_params + max(self.experts, 1) * self.mlp_params + self.router_params + 2 * H
        return self.vocab * H * (1 if self.tied else 2) + self.layers * per_layer + H

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def matmul_params_per_token(self) -> int:
        """P: weights one token multiplies through (active experts only, lm_head included)."""
        k = self.experts_per_token if self.experts else 1
        return self.layers * (self.attn_params + k * self.mlp_params + self.router_params) + self.vocab * self.hidden

    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.kv_bytes

    def decode_flops(self, batch: int, context: int) -> int:
        return 2 * batch * self.matmul_params_per_token + 4 * batch * context * self.layers * self.heads * self.head_dim

    def decode_bytes(self, batch: int, context: int) -> int:
        H = self.hidden
        experts_read = min(self.experts, batch * self.experts_per_token) if self.experts else 1
        weights = (self.layers * (self.attn_params + experts_read * self.mlp_params + self.router_params + 2 * H)
                   + self.vocab * H + H + batch * H)
        return weights * self.dtype_bytes + batch * (context + 1) * self.kv_bytes_per_token()

    def prefill_flops(self, n: int) -> int:
        return 2 * n * self.matmul_params_per_token + 4 * self.layers * self.heads * self.head_dim * n * (n + 1) // 2

    def prefill_bytes(self, n: int) -> int:
        return self.weight_bytes + n * self.kv_bytes_per_token()


# --------------------------------------------------------------------------- the floor

@dataclass
class Floor:
    model: str
    batch: int
    context: int
    threads: str                    # "all" or "1": which matmul rate / bandwidth were used
    weight_bytes: int
    step_bytes: int
    step_flops: int
    bandwidth_gbs: float
    bandwidth_kind: str             # "cache" or "dram"
    gflops: float
    t_memory_s: float
    t_compute_s: float
    t_step_s: float
    bound: str                      # "memory" or "compute"
    tok_per_s: float                # best output tok/s at this batch
    prefill_tokens: int
    prefill_s_per_token: float

    @property
    def ms_per_step(self) -> float:
        return 1000.0 * self.t_step_s

    def to_dict(self) -> dict:
        return asdict(self)


def _bandwidth(rates: MachineRates, nbytes: int, threads: str) -> tuple[float, str]:
    """The read bandwidth a step of `nbytes` can reach: cache-resident when it fits in half the LLC."""
    if rates.llc_bytes and nbytes <= rates.llc_bytes // 2:
        return rates.cache_bandwidth_gbs, "cache"
    if threads == "1":
        return rates.bandwidth_1t_gbs, "dram"
    return max(rates.bandwidth_gbs, rates.bandwidth_1t_gbs), "dram"


def _gflops(rates: MachineRates, threads: str) -> float:
    """Matmul rate with one thread, or with all (never less than one thread's: a bound, not a guess)."""
    return rates.gflops_1t if threads == "1" else max(rates.gflops_all, rates.gflops_1t)


def decode_floor(shape: ModelShape, rates: MachineRates, batch: int = 1, context: int = 512,
                 threads: str = "all", prefill_tokens: int = 512) -> Floor:
    """The least time of one decode step at (batch, context), and what follows from it."""
    flops = shape.decode_flops(batch, context)
    nbytes = shape.decode_bytes(batch, context)
    bw, kind = _bandwidth(rates, nbytes, threads)
    gf = _gflops(rates, threads)
    t_mem = nbytes / (bw * 1e9)
    t_cmp = flops / (gf * 1e9)
    t = max(t_mem, t_cmp)
    pf_bytes = shape.prefill_bytes(prefill_tokens)
    pf_bw, _ = _bandwidth(rates, pf_bytes, threads)
    t_pf = max(pf_bytes / (pf_bw * 1e9), shape.prefill_flops(prefill_tokens) / (gf * 1e9))
    return Floor(shape.name, batch, context, threads, shape.weight_bytes, nbytes, flops, bw, kind, gf, t_mem, t_cmp,
                 t, "memory" if t_mem >= t_cmp else "compute", batch / t, prefill_tokens, t_pf / prefill_tokens)


def _bytes(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def format_machine(rates: MachineRates) -> list[str]:
    return [f"machine: DRAM read {rates.bandwidth_gbs:.1f} GB/s ({rates.threads} threads), "
            f"{rates.bandwidth_1t_gbs:.1f} GB/s (1 thread); cache-resident read {rates.cache_bandwidth_gbs:.1f} GB/s "
            f"(LLC {_bytes(rates.llc_bytes) if rates.llc_bytes else 'unknown'})",
            f"machine: fp32 matmul {rates.gflops_all:.1f} GFLOP/s ({rates.threads} threads), "
            f"{rates.gflops_1t:.1f} GFLOP/s (1 thread)"]


def format_floor(rates: MachineRates | None, floors: list[Floor]) -> str:
    """Text lines: the machine's rates, then one line per floor."""
    lines = format_machine(rates) if rates is not None else []
    for f in floors:
        lines.append(
            f"floor {f.model} batch {f.batch} ctx {f.context} ({f.threads} threads): weights {_bytes(f.weight_bytes)}, "
            f"step reads {_bytes(f.step_bytes)} and does {f.step_flops / 1e9:.3f} GFLOP -> "
            f"{f.ms_per_step:.3f} ms/step ({f.bound}-bound; {f.bandwidth_kind} {f.bandwidth_gbs:.1f} GB/s, "
            f"{f.gflops:.1f} GFLOP/s), best {f.tok_per_s:.0f} output tok/s; "
            f"prefill >= {1000 * f.prefill_s_per_token:.4f} ms/token ({f.prefill_tokens}-token prompt)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m vsc.bench.floor MODEL_DIR... [--batch 1 16] [--context 512] [--json OUT]`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vsc.bench.floor", description="this machine's decode floor")
    ap.add_argument("models", nargs="+", help="HF model folders (config.json)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2, help="measurement rounds (best kept; more on a busy machine)")
    ap.add_argument("--json", help="write the rates and floors here")
    args = ap.parse_args(argv)
    try:
        shapes = [ModelShape.from_model_dir(m) for m in args.models]
    except VscError as e:
        print(e, file=sys.stderr)
        return e.exit_code
    rates = measure_machine(rounds=args.rounds)
    floors = [decode_floor(shape, rates, b, args.context, prefill_tokens=args.prefill_tokens)
              for shape in shapes for b in args.batch]
    print(format_floor(rates, floors))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": rates.to_dict(), "floors": [f.to_dict() for f in floors]},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
