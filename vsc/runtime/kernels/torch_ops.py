"""Plain PyTorch kernels: one function per `torch.*` kernel of the IR's kernel catalog.

Generated runners call these directly (`from vsc.runtime.kernels.torch_ops import rmsnorm,
...`), one call per op of the plan. Every function works on a flat token dimension
T (all sequences of a step, back to back), as the IR's `step` function does.

Attention reads the KV cache through `AttentionMetadata`, built once per step from the
`StepBatch` (`attention_metadata`) and shared by every layer: which cache slots each new
token is written to, and which slots each sequence reads back. The cache of one layer is
a pair of tensors `[num_blocks * block_size, kv_heads, head_dim]`; slot = block *
block_size + offset. A contiguous cache is the same thing with block_size = max_context
and one block per sequence.

Numerics follow Hugging Face transformers (Llama / Qwen2 / Mixtral): RMSNorm in fp32,
non-interleaved (rotate_half) RoPE with cos/sin from fp32 frequencies, softmax routing
with renormalized top-k weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vsc.runtime.api import StepBatch

__all__ = [
    "AttentionMetadata", "RotaryTable", "SequenceSpan", "add", "allocate_kv_cache", "attention_metadata",
    "embedding", "last_token", "linear", "moe", "mul", "paged_attention", "rmsnorm", "rope", "sdpa",
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


def split(x: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """torch.split: views of consecutive pieces of the last dim (no copy)."""
    return torch.split(x, list(sizes), dim=-1)


# --- rotary position embedding --------------------------------------------------------------


class RotaryTable:
    """cos/sin of every position up to max_position, computed once per runner.

    The frequencies are HF's default RoPE: inv_freq = 1 / theta^(2j / head_dim) in fp32,
    angle = position * inv_freq, duplicated over both halves of the head (rotate_half
    convention), then cast to the model dtype.
    """

    def __init__(self, theta: float, head_dim: int, max_position: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        self.head_dim = head_dim
        self.max_position = max_position
        self.cos = angles.cos().to(dtype=dtype, device=device)
        self.sin = angles.sin().to(dtype=dtype, device=device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows for `positions`, shaped [T, 1, head_dim] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.rope: rotate q [T, heads*hd] and k [T, kv_heads*hd] by the angles of their positions.

    `cos`, `sin` are [T, 1, head_dim] rows of a RotaryTable (`RotaryTable.lookup(positions)`,
    hoisted out of the layer loop since positions do not change between layers).
    """
    t = q.shape[0]
    qh = q.reshape(t, -1, head_dim)
    kh = k.reshape(t, -1, head_dim)
    q_rot = qh * cos + _rotate_half(qh) * sin
    k_rot = kh * cos + _rotate_half(kh) * sin
    return q_rot.reshape(t, -1), k_rot.reshape(t, -1)


# --- attention over the KV cache ------------------------------------------------------------


def allocate_kv_cache(layers: int, num_slots: int, kv_heads: int, head_dim: int,
                      dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (K, V) pair per layer, each [num_slots, kv_heads, head_dim], zero-filled.

    Zeros, not garbage: padded positions of a gathered context are masked out of the
    softmax, but 0 * NaN would still poison the weighted sum of V.
    """
    return [(torch.zeros(num_slots, kv_heads, head_dim, dtype=dtype, device=device),
             torch.zeros(num_slots, kv_heads, head_dim, dtype=dtype, device=device))
            for _ in range(layers)]


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
    key_mask: torch.Tensor | None = None
    single_rows: torch.Tensor | None = None
    spans: list[SequenceSpan] = field(default_factory=list)
    last_index: torch.Tensor | None = None


def _context_slots(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of context positions: block_tables[..., pos // bs] * bs + pos % bs."""
    return block_tables[..., positions // block_size] * block_size + positions % block_size


def _gather_layout(block_tables: torch.Tensor, context_lens: torch.Tensor, longest: int,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(longest, device=block_tables.device)
    slots = _context_slots(block_tables, positions, block_size)
    mask = (positions[None, :] < context_lens[:, None]).view(-1, 1, 1, longest)
    return slots, mask


def attention_metadata(batch: StepBatch, block_size: int) -> AttentionMetadata:
    """The AttentionMetadata of `batch` over a cache of `block_size`-token blocks."""
    device = batch.tokens.device
    context_lens = batch.context_lens_host or batch.context_lens.tolist()
    query_lens = batch.query_lens_host or (batch.query_start[1:] - batch.query_start[:-1]).tolist()
    decode = batch.is_decode or all(n == 1 for n in query_lens)
    meta = AttentionMetadata(batch.slot_mapping, block_size, decode)
    if decode:
        meta.gather_slots, meta.key_mask = _gather_layout(batch.block_tables, batch.context_lens,
                                                          max(context_lens), block_size)
        return meta
    singles: list[int] = []
    start = 0
    for b, (n, c) in enumerate(zip(query_lens, context_lens)):
        if n == 1:
            singles.append(b)
        else:
            span = SequenceSpan(start, start + n, c)
            past = c - n
            if past > 0:
                positions = torch.arange(c, device=device)
                span.first_block = int(batch.block_tables[b, 0])
                span.slots = _context_slots(batch.block_tables[b], positions, block_size)
                span.mask = positions[None, :] <= (past + torch.arange(n, device=device))[:, None]
            meta.spans.append(span)
        start += n
    if singles:
        index = torch.tensor(singles, device=device)
        meta.single_rows = batch.query_start[index]
        meta.gather_slots, meta.key_mask = _gather_layout(batch.block_tables[index], batch.context_lens[index],
                                                          max(context_lens[b] for b in singles), block_size)
    meta.last_index = batch.query_start[1:] - 1
    return meta


def _write_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
    k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float, gqa: bool) -> torch.Tensor:
    """One query per sequence: gather each context into [B, kv_heads, S, hd], one masked SDPA."""
    b, heads, hd = q.shape
    keys = k_cache[meta.gather_slots].transpose(1, 2).to(q.dtype)
    values = v_cache[meta.gather_slots].transpose(1, 2).to(q.dtype)
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
    for span in meta.spans:
        qs = q[span.start:span.end].transpose(0, 1)
        if not span.has_past:
            ks, vs = k[span.start:span.end].transpose(0, 1), v[span.start:span.end].transpose(0, 1)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            if contiguous:   # the sequence's slab is one block: its context is a view, no gather
                base = span.first_block * meta.block_size
                ks, vs = k_cache[base:base + span.context_len], v_cache[base:base + span.context_len]
            else:
                ks, vs = k_cache[span.slots], v_cache[span.slots]
            ks, vs = ks.transpose(0, 1).to(q.dtype), vs.transpose(0, 1).to(q.dtype)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=span.mask, scale=scale, enable_gqa=gqa)
        out[span.start:span.end] = o.transpose(0, 1)
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
