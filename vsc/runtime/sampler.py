"""Batched next-token sampling: greedy, temperature, min-p, top-k, top-p, per-request seeds.

The logits it gets are final: json mode's grammar mask and the logits adjustments (min_tokens,
logit_bias, penalties: vsc.runtime.penalties) are applied before, by the engine. Then, as in
vLLM: greedy rows take the argmax; the others are divided by their temperature, min-p drops the
tokens less likely than min_p times the most likely one, then top-k and top-p, then the draw.

All work is on [B, V] tensors; the only Python loop is over seeded rows (to draw each
one's noise from its own generator). Sampling uses the exponential race: with
q ~ Exp(1) i.i.d., argmax(p / q) is distributed as p, so a row's token depends only on
its own probabilities and its own noise. A seeded request therefore gets the same tokens
whatever else shares its batch, and each draw consumes exactly V uniforms from its
generator.
"""
from __future__ import annotations

from typing import Sequence as Seq

import torch

from vsc.runtime.api import SamplingParams


class Sampler:
    def __call__(self, logits: torch.Tensor, params: Seq[SamplingParams],
                 generators: Seq[torch.Generator | None] | None = None) -> list[int]:
        """One token id per row of `logits` [B, V], following `params[b]`."""
        if all(p.temperature == 0.0 for p in params):
            return logits.argmax(dim=-1).tolist()
        return self.sample(logits, params, generators).tolist()

    def sample(self, logits: torch.Tensor, params: Seq[SamplingParams],
               generators: Seq[torch.Generator | None] | None = None) -> torch.Tensor:
        """Token ids [B] (int64, on logits' device)."""
        device = logits.device
        num_rows = logits.shape[0]
        temps = [p.temperature for p in params]
        greedy = [t == 0.0 for t in temps]
        logits = logits.float()
        scaled = logits / torch.tensor([t if t > 0.0 else 1.0 for t in temps], device=device).unsqueeze(1)

        min_p = [p.min_p for p in params]
        if any(m > 0.0 for m in min_p):
            scaled = _mask_min_p(scaled, min_p)
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            scaled = _mask_top_k_top_p(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)

        # q = -log(u) with u ~ U[0, 1) is Exp(1) in (0, inf]: no 0/0 even where p is 0.
        # (Uniforms then a log are several times faster than exponential_() on CPU.)
        noise = torch.empty_like(probs)
        seeded = [] if generators is None else [(b, g) for b, g in enumerate(generators) if g is not None]
        if not seeded:
            noise.uniform_()
        else:
            if len(seeded) < num_rows:
                noise.uniform_()      # the seeded rows are overwritten below
            for b, g in seeded:
                noise[b].uniform_(generator=g)
        sampled = (probs / noise.log_().neg_()).argmax(dim=-1)
        if any(greedy):
            mask = torch.tensor(greedy, device=device)
            sampled = torch.where(mask, logits.argmax(dim=-1), sampled)
        return sampled


def _mask_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Set to -inf every logit whose probability is below min_p times its row's largest (rows with
    min_p 0 keep everything): p_i < min_p * p_max, i.e. l_i - l_max < log(min_p), on the
    temperature-scaled logits. min_p 1 keeps only the most likely token(s)."""
    floor = torch.tensor(min_p, dtype=logits.dtype, device=logits.device).log().unsqueeze(1)   # log 0 = -inf
    threshold = logits.max(dim=-1, keepdim=True).values + floor
    return logits.masked_fill(logits < threshold, float("-inf"))


#: Top-p first looks for the nucleus among this many most likely tokens (a partial top-k
#: is much cheaper than sorting the vocabulary); rows whose nucleus is bigger fall back to
#: a full sort.
TOP_P_CANDIDATES = 1024


def _mask_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set to -inf every logit outside its row's top-k, then outside its top-p (nucleus).

    Top-k keeps logits >= the row's k-th largest (ties at the boundary all stay). Top-p
    keeps a token while the probability mass of the more likely tokens is below p, so
    the most likely token always stays.
    """
    device = logits.device
    rows, vocab = logits.shape
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    if any(k < vocab for k in ks):
        k_max = max(k for k in ks if k < vocab)
        kth = logits.topk(k_max, dim=-1).values
        index = torch.tensor([min(k, k_max) - 1 for k in ks], device=device).unsqueeze(1)
        threshold = kth.gather(1, index)
        threshold.masked_fill_(torch.tensor([k == vocab for k in ks], device=device).unsqueeze(1), float("-inf"))
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if not any(p < 1.0 for p in top_p):
        return logits
    probs = torch.softmax(logits, dim=-1)
    p = torch.tensor([pp if pp < 1.0 else 2.0 for pp in top_p], device=device).unsqueeze(1)
    uses_p = p < 1.0
    n = min(vocab, TOP_P_CANDIDATES)
    top_probs, top_index = probs.topk(n, dim=-1) if n < vocab else probs.sort(dim=-1, descending=True)
    cumulative = top_probs.cumsum(dim=-1)
    if n < vocab and not bool(((cumulative[:, -1:] >= p) | ~uses_p).all()):
        top_probs, top_index = probs.sort(dim=-1, descending=True)
        cumulative = top_probs.cumsum(dim=-1)
    keep = (cumulative - top_probs) < p
    keep[:, 0] = True
    drop = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top_index, ~keep)
    return logits.masked_fill(drop & uses_p, float("-inf"))
