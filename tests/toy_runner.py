"""A ModelRunner for engine tests whose logits are a pure function of each row's context, read back
through the KV slots it wrote (so paging, prefix sharing, chunking and drafts must all be right for
the context to come back whole). `logits_of(context tuple) -> [vocab] tensor`."""
from __future__ import annotations

import torch

from vsc.runtime.api import CacheConfig


class ContextRunner:
    def __init__(self, logits_of, vocab: int, num_blocks: int = 64, block_size: int = 16):
        self.logits_of = logits_of
        self.cache_config = CacheConfig(layers=1, kv_heads=1, head_dim=1, block_size=block_size, num_blocks=num_blocks)
        self.vocab_size = vocab
        self.kv: dict[int, int] = {}

    def create_kv_cache(self, num_blocks=None):
        self.kv = {}
        return self.kv

    def decode(self, batch):
        return self.prefill(batch)

    def prefill(self, batch):
        bs = self.cache_config.block_size
        tokens, slots = batch.tokens.tolist(), batch.slot_mapping.tolist()
        qs, ctx_lens, tables = batch.query_start.tolist(), batch.context_lens.tolist(), batch.block_tables.tolist()
        contexts = []
        for b in range(batch.num_seqs):
            n, ctx = qs[b + 1] - qs[b], ctx_lens[b]
            context = [self.kv[tables[b][pos // bs] * bs + pos % bs] for pos in range(ctx - n)]
            for t in range(qs[b], qs[b + 1]):
                self.kv[slots[t]] = tokens[t]
                context.append(tokens[t])
                contexts.append(tuple(context))
        rows = [qs[b + 1] - 1 for b in range(batch.num_seqs)] if batch.logits_rows is None \
            else batch.logits_rows.tolist()
        return torch.stack([self.logits_of(contexts[t]) for t in rows])
