"""Plain PyTorch kernels: one function per `torch.*` kernel of the IR's kernel catalog.

Generated runners call these directly (`from vsc.runtime.kernels.torch_ops import rmsnorm,
...`), one call per op of the plan. Every function works on a flat token dimension
T (all sequences of a step, back to back), as the IR's `step` function does.

Attention reads the KV cache through `AttentionMetadata`, built once per step from the
`StepBatch` (`attention_metadata`) and shared by every layer: which cache slots each new
token is written to, and which slots each sequence reads back. The cache of one layer is
a pair of tensors `[num_blocks * block_size, kv_heads, head_dim]`; slot = block *
block_size + offset. A contiguous cache is the same thing with block_size = max_context
and one block per sequence. An int8 cache (the `kv-int8` pass) is a pair of `QuantizedKV`
per layer instead: int8 values of that shape plus an fp32 scale per (slot, kv head);
`paged_attention_int8` quantizes K/V as it writes them and dequantizes what it reads.

Numerics follow Hugging Face transformers (Llama / Qwen2 / Mixtral): RMSNorm in fp32,
non-interleaved (rotate_half) RoPE with cos/sin from fp32 frequencies, softmax routing
with renormalized top-k weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vsc.runtime.api import StepBatch
from vsc.runtime.quant_tensor import QuantTensor

__all__ = [
    "AttentionMetadata", "CascadePrefix", "RotaryTable", "SequenceSpan", "add", "allocate_kv_cache", "attention_metadata",
    "embedding", "last_token", "linear", "moe", "mul", "paged_attention", "rmsnorm", "rope", "sdpa",
    "linear_int8", "linear_onednn", "linear_quant", "embedding_quant", "rope_cos_sin", "rope_lookup", "rope_positions",
    "QuantizedKV", "paged_attention_int8", "quantize_int8",
    "silu", "silu_mul", "split",
]


# --- elementwise and dense ------------------------------------------------------------------


def embedding(tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """torch.embedding: rows of `table` for `tokens` -> [T, hidden]."""
    return F.embedding(tokens, table)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch.rmsnorm: x * rsqrt(mean(x^2) + eps) * weight, the statistics in fp32 (as HF does)."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(dtype)


def add_rmsnorm(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.add_rmsnorm: (rmsnorm(a + b), a + b) — the residual sum and its norm from one call."""
    s = a + b
    return rmsnorm(s, weight, eps), s


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.add: elementwise sum (the residual connections)."""
    return a + b


def mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.mul: elementwise product."""
    return a * b


def silu(x: torch.Tensor) -> torch.Tensor:
    """torch.silu: x * sigmoid(x)."""
    return F.silu(x)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """torch.silu_mul: silu(x[..., :n]) * x[..., n:] for a [.., 2n] input (fused gate/up)."""
    n = x.shape[-1] // 2
    return F.silu(x[..., :n]) * x[..., n:]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch.linear: x @ weight^T (+ bias); weight is [out, in]."""
    return F.linear(x, weight, bias)


# One float scratch matrix per (shape, dtype, device), reused by every linear_int8 call of that
# shape (a handful per model, not a copy per weight). Calls never overlap: a runner steps on
# one thread, and on cuda one stream orders them. A fresh multi-MiB temporary per call costs
# page faults instead: 2.7 ms vs 0.15 ms for a 1536x576 dequantize at T=1 (measured).
_DEQUANT_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (tuple(shape), dtype, device)
    buf = _DEQUANT_SCRATCH.get(key)
    if buf is None:
        buf = _DEQUANT_SCRATCH[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch.linear_int8: x @ (weight * scales)^T (+ bias), weight int8 [out, in], scales fp32
    [out, in / group] (one column: one scale per output row).

    Per row, the scale factors out of each dot product: the int8 weight is converted into a
    scratch matrix, multiplied, and the output columns scaled. Per group it cannot: the
    groups are dequantized into the scratch matrix, then multiplied. The runner keeps only
    the int8 weights and scales. (Why not torch._weight_int8pack_mm: vsc/passes/weight_int8.py.)
    """
    out_features, in_features = weight.shape
    buf = _scratch(weight.shape, x.dtype, x.device)
    if scales.shape[1] == 1:
        buf.copy_(weight)
        y = F.linear(x, buf).mul_(scales[:, 0].to(x.dtype))
        return y if bias is None else y.add_(bias)
    groups = scales.shape[1]
    buf.copy_(weight)        # convert, then scale in place: faster than one mixed-dtype broadcast mul
    buf.view(out_features, groups, in_features // groups).mul_(scales.unsqueeze(-1).to(x.dtype))
    return F.linear(x, buf, bias)


def linear_quant(x: torch.Tensor, weight: QuantTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch.linear_quant: x @ dequant(weight)^T (+ bias) for a block-quantized weight
    (q8_0/q4_0/q4_1): the whole matrix dequantized, then F.linear. The portable fallback (a
    cpu plan of a GGUF starts on tvm.quant_linear instead)."""
    return F.linear(x, weight.dequantize().to(x.dtype), bias)


def embedding_quant(tokens: torch.Tensor, table: QuantTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torch.embedding_quant: the rows of a block-quantized table for `tokens`, dequantized."""
    return table.rows(tokens.reshape(-1)).dequantize().to(dtype).reshape(*tokens.shape, table.shape[1])


def linear_onednn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch.linear_onednn: x @ W^T (+ bias) with W packed by oneDNN at load (`onednn_pack`).

    Why: F.linear (MKL sgemm) repacks the weight on every call; for the skinny [16, k]
    inputs of decode, that streams each weight twice and runs at a third of DRAM bandwidth
    here. A weight packed once reads at close to bandwidth: SmolLM2-135M's 30 layers of
    linears at 16 rows, 35.3 -> 14.2 ms (2 threads), and prefill-sized inputs ~2x faster.
    """
    if packed.dtype != x.dtype:      # pack-linear-weights{dtype=bf16}: bf16 in, f32 accumulated, x's dtype out
        b = None if bias is None else bias.to(packed.dtype)
        return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, b, "none", [], "").to(x.dtype)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def split(x: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """torch.split: views of consecutive pieces of the last dim (no copy)."""
    return torch.split(x, list(sizes), dim=-1)


# --- rotary position embedding --------------------------------------------------------------


def rope_cos_sin(positions: torch.Tensor, theta: float, head_dim: int,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [len(positions), head_dim] of HF's default RoPE at `positions`.

    inv_freq = 1 / theta^(2j / head_dim) in fp32, angle = position * inv_freq in fp32,
    duplicated over both halves of the head (rotate_half convention), cast to `dtype`. A
    RotaryTable (and the folded `rope_cos`/`rope_sin` weights) is this over every position,
    so on the CPU its rows equal these bit for bit (elementwise fp32 math, checked in
    tests/backends/test_torch_kernels.py).
    """
    device = positions.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class RotaryTable:
    """cos/sin of every position up to max_position, computed once (on the CPU, then moved).

    Row p is `rope_cos_sin` at position p: HF's default RoPE frequencies in fp32, cast to
    the model dtype. The `fold-rope-tables` pass makes these tables plan weights.
    """

    def __init__(self, theta: float, head_dim: int, max_position: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        cos, sin = rope_cos_sin(torch.arange(max_position), theta, head_dim, dtype)
        self.head_dim = head_dim
        self.max_position = max_position
        self.cos = cos.to(device=device)
        self.sin = sin.to(device=device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows for `positions`, shaped [T, 1, head_dim] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.rope_rotate: rotate q [T, heads*hd] and k [T, kv_heads*hd] by given cos/sin rows.

    `cos`, `sin` are [T, head_dim] rows (`rope_lookup`, once per step, before the layer
    loop) or [T, 1, head_dim] (`RotaryTable.lookup`); either broadcasts over the heads.
    """
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    t = q.shape[0]
    qh = q.reshape(t, -1, head_dim)
    kh = k.reshape(t, -1, head_dim)
    q_rot = qh * cos + _rotate_half(qh) * sin
    k_rot = kh * cos + _rotate_half(kh) * sin
    return q_rot.reshape(t, -1), k_rot.reshape(t, -1)


def rope_positions(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.rope: rotate q and k by the angles of `positions`, computing cos/sin inside the
    op (`rope_cos_sin`), on every call: what an unfolded `rope` op costs per layer."""
    cos, sin = rope_cos_sin(positions, theta, head_dim, q.dtype)
    return rope(q, k, cos, sin, head_dim)


def rope_lookup(positions: torch.Tensor, cos_table: torch.Tensor,
                sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.rope_lookup: the rows [T, head_dim] of folded cos/sin tables for `positions`."""
    return cos_table[positions], sin_table[positions]


# --- attention over the KV cache ------------------------------------------------------------


def allocate_kv_cache(layers: int, num_slots: int, kv_heads: int, head_dim: int,
                      dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (K, V) pair per layer, each [num_slots, kv_heads, head_dim], zero-filled.

    Zeros, not garbage: padded positions of a gathered context are masked out of the
    softmax, but 0 * NaN would still poison the weighted sum of V. `dtype=torch.int8`
    (kv-int8) gives `QuantizedKV` pairs: int8 values plus fp32 scales [num_slots, kv_heads].
    """
    if dtype == torch.int8:
        return [(QuantizedKV.zeros(num_slots, kv_heads, head_dim, device),
                 QuantizedKV.zeros(num_slots, kv_heads, head_dim, device)) for _ in range(layers)]
    return [(torch.zeros(num_slots, kv_heads, head_dim, dtype=dtype, device=device),
             torch.zeros(num_slots, kv_heads, head_dim, dtype=dtype, device=device))
            for _ in range(layers)]


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: x [..., hd] -> (int8 [..., hd], fp32 scale [...]),
    scale = amax(|x|) / 127 so x ~ values * scale with |error| <= scale / 2. An all-zero
    vector gets scale 0 (and dequantizes to zeros, not NaN)."""
    x32 = x.to(torch.float32)
    scale = x32.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = torch.round(x32 / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return values, scale


@dataclass
class QuantizedKV:
    """One layer's K (or V) cache in int8: `values` [slots, kv_heads, hd] int8 and `scales`
    [slots, kv_heads] fp32, one per token and kv head (the scale needs only the token
    itself, so each slot is written once, as a paged cache fills token by token).

    `cache[index]` dequantizes the indexed slots to fp32 (slots [S] or [B, S], or a slice),
    so the attention code reads it as it reads a float cache; `write` quantizes.
    """

    values: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def zeros(cls, num_slots: int, kv_heads: int, head_dim: int,
              device: torch.device | str = "cpu") -> "QuantizedKV":
        return cls(torch.zeros(num_slots, kv_heads, head_dim, dtype=torch.int8, device=device),
                   torch.zeros(num_slots, kv_heads, dtype=torch.float32, device=device))

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Quantize x [T, kv_heads, hd] into `slots` [T]."""
        values, scales = quantize_int8(x)
        self.values.index_copy_(0, slots, values)
        self.scales.index_copy_(0, slots, scales)

    def __getitem__(self, index) -> torch.Tensor:
        return self.values[index].to(torch.float32) * self.scales[index].unsqueeze(-1)


@dataclass
class SequenceSpan:
    """One sequence of a prefill step.

    Its new tokens are rows start:end of q/k/v. When earlier context is already cached
    (chunked prefill, prefix reuse), `slots` lists the cache slots of its whole context
    (old + new, in order), `first_block` is its first block and `mask` [new, context]
    lets new token j see context positions <= past + j. Without earlier context the new
    tokens attend to each other causally straight from q/k/v (`slots` and `mask` None).
    """

    start: int
    end: int
    context_len: int
    first_block: int = 0
    slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    blocks: torch.Tensor | None = None    # paged, small blocks: the context's blocks, read whole (see BLOCK_GATHER_MAX)
    row: int = -1                         # the sequence's row of the step's block tables

    @property
    def has_past(self) -> bool:
        return self.slots is not None


@dataclass
class AttentionMetadata:
    """Everything attention needs about a step's layout in the cache, built once per step.

    Sequences with one new token (all of them in a decode step; the running ones in an
    engine's mixed step) are attended together: `single_rows` are their rows of q (None:
    every row), `gather_slots` [G, S] the cache slots of their contexts padded to S = the
    longest, `key_mask` [G, 1, 1, S] True where a position is real. Sequences with more
    new tokens get a `SequenceSpan` each (`spans`). `last_index` holds the row of each
    sequence's last token (None in decode, where every row is a last token).
    """

    slot_mapping: torch.Tensor
    block_size: int
    is_decode: bool
    gather_slots: torch.Tensor | None = None
    gather_blocks: torch.Tensor | None = None     # paged: [G, W] block ids, contexts read whole blocks at a time
    key_mask: torch.Tensor | None = None
    single_rows: torch.Tensor | None = None
    spans: list[SequenceSpan] = field(default_factory=list)
    last_index: torch.Tensor | None = None
    cascade: "CascadePrefix | None" = None        # a shared prefix read once for a group (cascade-attention)
    # the block tables / context lengths of the gathered rows, for kernels that read the cache
    # in place through them (tvm.paged_attention)
    gather_tables: torch.Tensor | None = None
    gather_lens: torch.Tensor | None = None
    gather_longest: int = 0                       # the longest of gather_lens (host copy)
    # prefill steps: the step's block tables (spans index them by `row`), and the TVM prefill
    # kernel's tile list, built on first use and kept for the step's other layers
    block_tables: torch.Tensor | None = None
    prefill_tiles: tuple[torch.Tensor, torch.Tensor] | None = None    # (prefill kernel's, short kernel's)


@dataclass
class CascadePrefix:
    """Cascade attention's layout: `members` (rows of the gathered one-query sequences) all
    start with the same `blocks` (prefix_len = len(blocks) * block_size tokens, physically
    shared through the prefix cache). Their attention over that prefix is one GEMM per kv
    head for the whole group; gather_blocks / key_mask then describe only what follows
    the prefix for members (each sequence's whole context for the others)."""

    members: torch.Tensor
    blocks: torch.Tensor
    prefix_len: int
    rest_lens: torch.Tensor | None = None      # every gathered row's context after its shared part
    rest_longest: int = 0                      # (members: after the prefix; the others: all of it)


def _context_slots(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of context positions: block_tables[..., pos // bs] * bs + pos % bs."""
    return block_tables[..., positions // block_size] * block_size + positions % block_size


#: Largest block size for which decode attention gathers whole blocks: one index_select of
#: block-sized rows is ~4x faster than indexing slot by slot (measured: 16 contexts of 832
#: tokens, 3 kv heads x 64, 0.55 -> 0.13 ms per K gather). A contiguous cache (one block of
#: max_context per sequence) gathers only the slots its longest context uses instead.
BLOCK_GATHER_MAX = 128


def _shared_prefix(tables: list[list[int]], lens: list[int], block_size: int,
                   min_tokens: int) -> tuple[list[int], int] | None:
    """(member rows, shared leading block count) of the largest group of sequences whose
    block tables start with the same blocks, if it has at least 2 members and the shared
    part is at least `min_tokens` tokens; every member keeps one token after the prefix."""
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(tables):
        if t:
            groups.setdefault(t[0], []).append(i)
    if not groups:
        return None
    members = max(groups.values(), key=len)
    if len(members) < 2:
        return None
    limit = min((lens[i] - 1) // block_size for i in members)
    first = tables[members[0]]
    shared = 0
    while shared < limit and all(tables[i][shared] == first[shared] for i in members):
        shared += 1
    if shared * block_size < max(1, min_tokens):
        return None
    return members, shared


def _gather_layout(meta: AttentionMetadata, block_tables: torch.Tensor, context_lens: torch.Tensor,
                   longest: int, block_size: int, cascade_min_tokens: int = 0,
                   lens_host: list[int] | None = None) -> None:
    """Fill meta's gather_blocks or gather_slots, and key_mask, for one query per sequence
    (and meta.cascade when a group shares a long enough prefix; cascade_min_tokens > 0)."""
    meta.gather_tables, meta.gather_lens, meta.gather_longest = block_tables, context_lens, longest
    if cascade_min_tokens > 0 and block_size <= BLOCK_GATHER_MAX and block_tables.shape[0] > 1:
        lens = lens_host if lens_host is not None else context_lens.tolist()
        width = -(-longest // block_size)
        tables = [row[:-(-n // block_size)] for row, n in zip(block_tables[:, :width].tolist(), lens)]
        found = _shared_prefix(tables, lens, block_size, cascade_min_tokens)
        if found is not None:
            members, shared = found
            is_member = set(members)
            rest = [t[shared:] if i in is_member else t for i, t in enumerate(tables)]
            rest_lens = [n - shared * block_size if i in is_member else n for i, n in enumerate(lens)]
            w = max(len(t) for t in rest)
            device = block_tables.device
            meta.gather_blocks = torch.tensor([t + [0] * (w - len(t)) for t in rest], dtype=block_tables.dtype,
                                              device=device)
            positions = torch.arange(w * block_size, device=device)
            lens_t = torch.tensor(rest_lens, device=device)
            meta.key_mask = (positions[None, :] < lens_t[:, None]).view(-1, 1, 1, positions.shape[0])
            meta.cascade = CascadePrefix(torch.tensor(members, device=device),
                                         torch.tensor(tables[members[0]][:shared], dtype=block_tables.dtype,
                                                      device=device), shared * block_size,
                                         lens_t, max(rest_lens))
            return
    if block_size <= BLOCK_GATHER_MAX:
        width = -(-longest // block_size)         # the blocks the longest context fills; no more
        positions = torch.arange(width * block_size, device=block_tables.device)
        meta.gather_blocks = block_tables[:, :width]
    else:
        positions = torch.arange(longest, device=block_tables.device)
        meta.gather_slots = _context_slots(block_tables, positions, block_size)
    meta.key_mask = (positions[None, :] < context_lens[:, None]).view(-1, 1, 1, positions.shape[0])


def _gather_context(cache, meta: AttentionMetadata) -> torch.Tensor:
    """The K or V of every gathered context: [G, S, kv_heads, hd] (S padded, see key_mask)."""
    blocks = meta.gather_blocks
    if blocks is None:
        return cache[meta.gather_slots]
    bs = meta.block_size
    if isinstance(cache, QuantizedKV):
        slots = (blocks[:, :, None] * bs + torch.arange(bs, device=blocks.device)).view(blocks.shape[0], -1)
        return cache[slots]
    _, kv_heads, hd = cache.shape
    rows = cache.view(-1, bs * kv_heads * hd).index_select(0, blocks.reshape(-1))
    return rows.view(blocks.shape[0], blocks.shape[1] * bs, kv_heads, hd)


def attention_metadata(batch: StepBatch, block_size: int, cascade_min_tokens: int = 0) -> AttentionMetadata:
    """The AttentionMetadata of `batch` over a cache of `block_size`-token blocks.

    cascade_min_tokens > 0 (the cascade-attention pass): one-query sequences that share at
    least that many leading cached tokens attend to them together (`CascadePrefix`)."""
    device = batch.tokens.device
    context_lens = batch.context_lens_host or batch.context_lens.tolist()
    query_lens = batch.query_lens_host or (batch.query_start[1:] - batch.query_start[:-1]).tolist()
    decode = batch.is_decode or all(n == 1 for n in query_lens)
    meta = AttentionMetadata(batch.slot_mapping, block_size, decode)
    if decode:
        _gather_layout(meta, batch.block_tables, batch.context_lens, max(context_lens), block_size,
                       cascade_min_tokens, context_lens)
        return meta
    meta.block_tables = batch.block_tables
    singles: list[int] = []
    start = 0
    for b, (n, c) in enumerate(zip(query_lens, context_lens)):
        if n == 1:
            singles.append(b)
        else:
            span = SequenceSpan(start, start + n, c, row=b)
            past = c - n
            if past > 0:
                positions = torch.arange(c, device=device)
                span.first_block = int(batch.block_tables[b, 0])
                span.slots = _context_slots(batch.block_tables[b], positions, block_size)
                if block_size <= BLOCK_GATHER_MAX:
                    span.blocks = batch.block_tables[b, :-(-c // block_size)]
                span.mask = positions[None, :] <= (past + torch.arange(n, device=device))[:, None]
            meta.spans.append(span)
        start += n
    if singles:
        index = torch.tensor(singles, device=device)
        meta.single_rows = batch.query_start[index]
        _gather_layout(meta, batch.block_tables[index], batch.context_lens[index],
                       max(context_lens[b] for b in singles), block_size, cascade_min_tokens,
                       [context_lens[b] for b in singles])
    meta.last_index = batch.query_start[1:] - 1
    return meta


def _write_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
    if isinstance(k_cache, QuantizedKV):     # kv-int8: quantize on write
        k_cache.write(meta.slot_mapping, k)
        v_cache.write(meta.slot_mapping, v)
        return
    k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))


def _softmax_parts(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalized attention over one part of a context: (out, row max, row sum of exp)."""
    m = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - m)
    return torch.matmul(p, values), m, p.sum(-1, keepdim=True)


def _cascade_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Decode attention with a shared prefix (meta.cascade): the members' queries attend to
    the prefix together, one [group x g, prefix] GEMM per kv head that reads the prefix's
    K/V once instead of once per sequence; every sequence attends to the rest of its own
    context; the two parts merge by their softmax statistics (exact up to rounding)."""
    b, heads, hd = q.shape
    c = meta.cascade
    bs = meta.block_size
    kv_heads = k_cache.shape[1]
    g = heads // kv_heads
    qg = q.view(b, kv_heads, g, hd)
    # own part: [B, kvh, g, S] scores over each sequence's gathered rest
    keys = _gather_context(k_cache, meta).permute(0, 2, 3, 1).to(q.dtype)       # [B, kvh, hd, S]
    values = _gather_context(v_cache, meta).transpose(1, 2).to(q.dtype)         # [B, kvh, S, hd]
    scores = torch.matmul(qg, keys).mul_(scale).masked_fill_(~meta.key_mask, float("-inf"))
    out, m_own, l_own = _softmax_parts(scores, values)
    # shared part: members only, [kvh, M*g, P]
    n = c.members.shape[0]
    rows = c.blocks
    kp = k_cache.view(-1, bs * kv_heads * hd).index_select(0, rows).view(c.prefix_len, kv_heads, hd)
    vp = v_cache.view(-1, bs * kv_heads * hd).index_select(0, rows).view(c.prefix_len, kv_heads, hd)
    qm = qg.index_select(0, c.members).permute(1, 0, 2, 3).reshape(kv_heads, n * g, hd)
    shared_scores = torch.bmm(qm, kp.permute(1, 2, 0).to(q.dtype)).mul_(scale)
    o_p, m_p, l_p = _softmax_parts(shared_scores, vp.transpose(0, 1).to(q.dtype))
    o_p = o_p.view(kv_heads, n, g, hd).transpose(0, 1)
    m_p = m_p.view(kv_heads, n, g, 1).transpose(0, 1)
    l_p = l_p.view(kv_heads, n, g, 1).transpose(0, 1)
    o_m, m_m, l_m = out.index_select(0, c.members), m_own.index_select(0, c.members), l_own.index_select(0, c.members)
    m = torch.maximum(m_m, m_p)
    a_own, a_p = torch.exp(m_m - m), torch.exp(m_p - m)
    merged = (o_m * a_own + o_p * a_p) / (l_m * a_own + l_p * a_p)
    out = out / l_own
    out.index_copy_(0, c.members, merged)
    return out.reshape(b, heads * hd)


def _gather_span(cache: torch.Tensor, span: SequenceSpan, block_size: int) -> torch.Tensor:
    """One sequence's whole context [context_len, kv_heads, hd], read block by block."""
    _, kv_heads, hd = cache.shape
    rows = cache.view(-1, block_size * kv_heads * hd).index_select(0, span.blocks)
    return rows.view(-1, kv_heads, hd)[:span.context_len]


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float, gqa: bool) -> torch.Tensor:
    """One query per sequence: gather each context into [B, kv_heads, S, hd], one masked SDPA
    (or cascade attention when meta.cascade names a shared prefix)."""
    if meta.cascade is not None:
        if isinstance(k_cache, QuantizedKV):
            raise ValueError("cascade attention reads a float KV cache; the plan pairs it with an int8 one")
        return _cascade_attention(q, k_cache, v_cache, meta, scale)
    b, heads, hd = q.shape
    keys = _gather_context(k_cache, meta).transpose(1, 2).to(q.dtype)
    values = _gather_context(v_cache, meta).transpose(1, 2).to(q.dtype)
    out = F.scaled_dot_product_attention(q.reshape(b, heads, 1, hd), keys, values, attn_mask=meta.key_mask,
                                         scale=scale, enable_gqa=gqa)
    return out.reshape(b, heads * hd)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, gqa: bool,
                       contiguous: bool) -> torch.Tensor:
    """Per sequence: causal attention of its new tokens over its (cached) context; the
    one-token sequences of a mixed step together, as in decode."""
    out = torch.empty_like(q)
    if meta.single_rows is not None:
        out[meta.single_rows] = _decode_attention(q[meta.single_rows], k_cache, v_cache, meta, scale, gqa).view(
            -1, q.shape[1], q.shape[2])
    # SDPA gets 4-D [1, heads, n, hd] inputs: with 3-D ones torch 2.13 on CPU takes the math
    # path (materialized scores, no causal skipping): 6x slower for an 850-token prompt.
    for span in meta.spans:
        qs = q[span.start:span.end].transpose(0, 1)[None]
        if not span.has_past:
            ks, vs = k[span.start:span.end].transpose(0, 1)[None], v[span.start:span.end].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            if contiguous:   # the sequence's slab is one block: its context is a view, no gather
                base = span.first_block * meta.block_size
                ks, vs = k_cache[base:base + span.context_len], v_cache[base:base + span.context_len]
            else:
                if span.blocks is not None and not isinstance(k_cache, QuantizedKV):
                    ks, vs = _gather_span(k_cache, span, meta.block_size), _gather_span(v_cache, span, meta.block_size)
                else:
                    ks, vs = k_cache[span.slots], v_cache[span.slots]
            ks, vs = ks.transpose(0, 1).to(q.dtype)[None], vs.transpose(0, 1).to(q.dtype)[None]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=span.mask, scale=scale, enable_gqa=gqa)
        out[span.start:span.end] = o[0].transpose(0, 1)
    return out.view(q.shape[0], -1)


def _attention(q, k, v, k_cache, v_cache, meta, heads, kv_heads, head_dim, scale, contiguous):
    t = q.shape[0]
    qh = q.reshape(t, heads, head_dim)
    kh = k.reshape(t, kv_heads, head_dim)
    vh = v.reshape(t, kv_heads, head_dim)
    _write_cache(kh, vh, k_cache, v_cache, meta)
    gqa = heads != kv_heads
    if meta.is_decode:
        return _decode_attention(qh, k_cache, v_cache, meta, scale, gqa)
    return _prefill_attention(qh, kh, vh, k_cache, v_cache, meta, scale, gqa, contiguous)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, heads: int, kv_heads: int,
                    head_dim: int, scale: float) -> torch.Tensor:
    """torch.paged_attention: write k, v [T, kv_heads*hd] to their slots, then causal GQA
    attention of q [T, heads*hd] over each sequence's context read through its block table."""
    return _attention(q, k, v, k_cache, v_cache, meta, heads, kv_heads, head_dim, scale, contiguous=False)


def paged_attention_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: QuantizedKV,
                         v_cache: QuantizedKV, meta: AttentionMetadata, heads: int, kv_heads: int,
                         head_dim: int, scale: float) -> torch.Tensor:
    """torch.paged_attention_int8: paged_attention over an int8 cache (kv-int8). The new k, v
    are quantized per (token, kv head) into their slots; context read back from the cache is
    dequantized (in fp32, then the model dtype). A prefill with no earlier context attends to
    its own exact k, v, as the float kernel does; only cached context carries int8 rounding."""
    if not isinstance(k_cache, QuantizedKV) or not isinstance(v_cache, QuantizedKV):
        raise TypeError(f"paged_attention_int8 needs QuantizedKV caches (allocate_kv_cache with torch.int8), "
                        f"got {type(k_cache).__name__}")
    return _attention(q, k, v, k_cache, v_cache, meta, heads, kv_heads, head_dim, scale, contiguous=False)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
         meta: AttentionMetadata, heads: int, kv_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """torch.sdpa: the same over a contiguous cache (one max_context slab per sequence), where a
    prefilling sequence's context is a slice of its slab rather than a gather."""
    return _attention(q, k, v, k_cache, v_cache, meta, heads, kv_heads, head_dim, scale, contiguous=True)


# --- mixture of experts and the step's tail -------------------------------------------------


def moe(x: torch.Tensor, router_logits: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
        w2: torch.Tensor, experts: int, top_k: int) -> torch.Tensor:
    """torch.moe: Mixtral's sparse MLP.

    Routing weights are softmax(router_logits) in fp32, the top_k per token renormalized
    to sum to 1; expert e computes w2[e](silu(w1[e] x) * w3[e] x). The expert weights are
    stacked [experts, out, in]. Tokens are grouped by expert with one sort, then each
    expert runs once over its tokens and scatters back with index_add_.
    """
    probs = torch.softmax(router_logits.to(torch.float32), dim=-1)
    top_weights, top_experts = torch.topk(probs, top_k, dim=-1)
    top_weights = (top_weights / top_weights.sum(dim=-1, keepdim=True)).to(x.dtype)
    flat_experts = top_experts.flatten()
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=experts).tolist()
    flat_weights = top_weights.flatten()[order]
    token_rows = order // top_k
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = token_rows[start:start + n]
        h = x[rows]
        y = F.linear(F.silu(F.linear(h, w1[e])) * F.linear(h, w3[e]), w2[e])
        out.index_add_(0, rows, y * flat_weights[start:start + n, None])
        start += n
    return out


def last_token(h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """torch.last_token: each sequence's last row of h [T, H] -> [B, H]."""
    if meta.last_index is None:
        return h
    return h.index_select(0, meta.last_index)
