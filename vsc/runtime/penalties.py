"""The logits-adjustment stage: min_tokens, logit_bias and the three penalties, before sampling.

The engine runs it on a step's sampled rows after json mode's grammar mask and before the
sampler (temperature, min_p, top-k, top-p, the draw), as vLLM orders them; so a greedy request
is affected too, and a log-softmax taken after it is that of the distribution sampled from.
Definitions are vLLM's (vllm/sampling_params.py, the v1 sampler):

- min_tokens: while a row's sequence has generated fewer tokens, EOS and its stop_token_ids are
  masked (-inf). (The detokenizer likewise ignores stop strings in the first min_tokens tokens.)
- logit_bias: {token id: bias} added to the logits.
- repetition_penalty r (> 0): the logit l of every token seen in the prompt or the output so far
  becomes l / r if l > 0, else l * r.
- frequency_penalty f and presence_penalty p (in [-2, 2], OpenAI's definitions): l -= f * c + p *
  (c > 0), c = the token's count in the output so far (the prompt does not count).

All work is on [rows, vocab] tensors: a sequence that uses a penalty keeps its output-token
counts as a [vocab] int32 tensor (`TokenCounts`, updated per generated token: one element) and,
for the repetition penalty, its prompt's tokens as a [vocab] mask; a step stacks the rows that
need them. The only Python loops are over rows and over the few ids a row names (its stop ids,
its logit_bias entries, its drafts).

Speculative decoding and jump-forward stay exact: a verify step samples row j of a drafted
sequence at the position after its first j drafts, so that row's counts (and min_tokens
position) include those drafts (`before`): each row is adjusted exactly as plain decoding would
adjust it at that position, the acceptance rule of vsc.runtime.speculative then holds as is.
"""
from __future__ import annotations

from typing import Iterable, Sequence as Seq

import torch

from vsc.runtime.api import SamplingParams


class TokenCounts:
    """Output-token counts of one sequence ([vocab] int32) and, for the repetition penalty, the
    tokens of its prompt ([vocab] bool; None when the request has no repetition penalty)."""

    __slots__ = ("counts", "prompt_mask")

    def __init__(self, params: SamplingParams, prompt_ids: Seq[int], vocab: int, device: torch.device | str):
        self.counts = torch.zeros(vocab, dtype=torch.int32, device=device)
        self.prompt_mask: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            mask[torch.tensor(list(prompt_ids), dtype=torch.int64, device=device)] = True
            self.prompt_mask = mask

    @classmethod
    def of(cls, params: SamplingParams, prompt_ids: Seq[int], vocab: int,
           device: torch.device | str) -> "TokenCounts | None":
        """The counts a request needs (None when it uses no penalty)."""
        return cls(params, prompt_ids, vocab, device) if params.penalized else None

    def add(self, token: int) -> None:
        self.counts[token] += 1


def adjust_logits(logits: torch.Tensor, params: Seq[SamplingParams], counts: Seq[TokenCounts | None],
                  num_output: Seq[int], before: Seq[Seq[int]] | None, stop_ids: Iterable[int]) -> torch.Tensor:
    """`logits` [R, V] with each row's min_tokens mask, logit_bias and penalties applied.

    Row i follows `params[i]`; its sequence has generated `num_output[i]` tokens and its
    counts are `counts[i]` (None without a penalty); `before[i]` are the drafts between the
    sequence's last token and row i's position (speculative verify; None or [] otherwise),
    counted as output. `stop_ids` are the tokens min_tokens masks besides a row's own
    stop_token_ids (the tokenizer's EOS ids). Returns `logits` itself when no row adjusts
    anything, else a float32 copy.
    """
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    out = logits.float().clone()
    device, vocab = out.device, out.shape[1]
    eos = tuple(stop_ids)
    n_before = (lambda i: len(before[i])) if before is not None else (lambda i: 0)

    # min_tokens: EOS and the stop token ids are not allowed yet
    mask_r: list[int] = []
    mask_c: list[int] = []
    for i in rows:
        p = params[i]
        if num_output[i] + n_before(i) < p.min_tokens:
            ids = {t for t in set(eos).union(p.stop_token_ids) if 0 <= t < vocab}   # an id past it never comes
            mask_r += [i] * len(ids)
            mask_c += ids
    if mask_r:
        out[torch.tensor(mask_r, device=device), torch.tensor(mask_c, device=device)] = float("-inf")

    # logit_bias: added
    bias_r: list[int] = []
    bias_c: list[int] = []
    bias_v: list[float] = []
    for i in rows:
        lb = params[i].logit_bias
        if lb:
            bias_r += [i] * len(lb)
            bias_c += lb.keys()
            bias_v += lb.values()
    if bias_r:
        out.index_put_((torch.tensor(bias_r, device=device), torch.tensor(bias_c, device=device)),
                       torch.tensor(bias_v, dtype=out.dtype, device=device), accumulate=True)

    pen = [i for i in rows if params[i].penalized]
    if pen:
        drafts = [before[i] if before is not None else () for i in pen]
        if len(pen) == out.shape[0]:            # every row: in place
            _penalize(out, list(params), list(counts), drafts)
        else:
            index = torch.tensor(pen, device=device)
            out[index] = _penalize(out[index], [params[i] for i in pen], [counts[i] for i in pen], drafts)
    return out


def _penalize(logits: torch.Tensor, params: list[SamplingParams], counts: list[TokenCounts | None],
              before: list[Seq[int]]) -> torch.Tensor:
    """Repetition, then frequency and presence penalties, in place on `logits` (rows that all use one
    of them). Only the entries of tokens seen so far change: they are gathered (nonzero of the
    [n, V] masks), adjusted and scattered back, which on a CPU costs a fraction of dense [n, V]
    arithmetic (a row has at most context-length such tokens)."""
    device = logits.device
    if any(c is None for c in counts):
        raise ValueError("a penalized row has no token counts")
    count = torch.stack([c.counts for c in counts]).to(device)         # [n, V] int32 (a copy)
    extra_r = [k for k, drafts in enumerate(before) for _ in drafts]
    if extra_r:                                                         # drafts before the row count as output
        extra_c = [t for drafts in before for t in drafts]
        count.index_put_((torch.tensor(extra_r, device=device), torch.tensor(extra_c, device=device)),
                         torch.ones(len(extra_r), dtype=count.dtype, device=device), accumulate=True)
    present = count > 0
    rep = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in rep):
        none = None
        masks = []
        for c in counts:
            if c.prompt_mask is None:
                if none is None:
                    none = torch.zeros(logits.shape[1], dtype=torch.bool, device=device)
                masks.append(none)
            else:
                masks.append(c.prompt_mask.to(device))
        seen = torch.stack(masks)
        seen |= present
        rows, cols = seen.nonzero(as_tuple=True)
        values = logits[rows, cols]
        r = torch.tensor(rep, dtype=logits.dtype, device=device)[rows]
        logits[rows, cols] = torch.where(values > 0, values / r, values * r)
    freq = [p.frequency_penalty for p in params]
    pres = [p.presence_penalty for p in params]
    if any(f != 0.0 for f in freq) or any(p != 0.0 for p in pres):
        rows, cols = present.nonzero(as_tuple=True)
        f = torch.tensor(freq, dtype=logits.dtype, device=device)[rows]
        p = torch.tensor(pres, dtype=logits.dtype, device=device)[rows]
        logits[rows, cols] -= f * count[rows, cols].to(logits.dtype) + p
    return logits
