"""Log-probabilities of chosen tokens, as the OpenAI `logprobs` fields report them.

Of the raw model logits (vLLM's default `logprobs_mode`, "raw_logprobs"): the log-softmax
of the logits the model computed, before temperature, top-k/top-p, penalties or logit bias
change what is sampled. A json-mode grammar mask does apply (vLLM applies the structured-output
bitmask to the logits before its sampler computes raw logprobs): a forbidden token is -inf,
the allowed ones share the probability. One batched pass over the rows that want them:
log-softmax, the chosen token's value and rank (1 + how many tokens are more likely), and
the top k of each row (k the most any row asks; each row keeps its own).
"""
from __future__ import annotations

from typing import Sequence as Seq

import torch

from vsc.runtime.api import TokenLogprobs

#: The most top logprobs a request may ask for per position (vLLM's default max_logprobs).
MAX_LOGPROBS = 20


def token_logprobs(logits: torch.Tensor, token_ids: Seq[int], ks: Seq[int]) -> list[TokenLogprobs]:
    """Row i of `logits` [R, V] scored for token `token_ids[i]`, with its `ks[i]` most likely tokens."""
    lsm = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(token_ids), dtype=torch.int64, device=lsm.device).unsqueeze(1)
    chosen = lsm.gather(1, ids)
    ranks = ((lsm > chosen).sum(dim=-1) + 1).tolist()
    values = chosen.squeeze(1).tolist()
    k_max = max(ks, default=0)
    if k_max > 0:
        top = lsm.topk(min(k_max, lsm.shape[-1]), dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    out = []
    for i, (token, value, rank, k) in enumerate(zip(token_ids, values, ranks, ks)):
        pairs = list(zip(top_ids[i][:k], top_values[i][:k])) if k > 0 else []
        out.append(TokenLogprobs(int(token), value, rank, pairs))
    return out
