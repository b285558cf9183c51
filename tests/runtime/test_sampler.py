"""Sampler: greedy, temperature, top-k, top-p, seeds independent of batch neighbours, and
sampling frequencies that match the target distribution."""
from __future__ import annotations

import pytest
import torch

from vsc.runtime.api import SamplingParams
from vsc.runtime.sampler import TOP_P_CANDIDATES, Sampler, _mask_top_k_top_p

torch.set_num_threads(1)

sampler = Sampler()


def sp(**kw) -> SamplingParams:
    return SamplingParams(**kw)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_all_greedy_is_argmax():
    logits = torch.randn(5, 50, generator=gen(0))
    assert sampler(logits, [sp(temperature=0.0)] * 5) == logits.argmax(-1).tolist()


def test_greedy_rows_stay_argmax_in_a_sampled_batch():
    logits = torch.randn(6, 50, generator=gen(1))
    params = [sp(temperature=0.0) if i % 2 == 0 else sp(temperature=2.0) for i in range(6)]
    for _ in range(5):
        out = sampler(logits, params)
        assert [out[i] for i in (0, 2, 4)] == logits.argmax(-1)[[0, 2, 4]].tolist()


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(8, 100, generator=gen(2))
    want = logits.argmax(-1).tolist()
    assert sampler(logits, [sp(temperature=1.5, top_k=1)] * 8) == want
    assert sampler(logits, [sp(temperature=1.5, top_p=1e-6)] * 8) == want


def test_top_k_and_top_p_restrict_the_support():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4).contiguous()
    top_k = set(sampler(logits, [sp(top_k=2)] * 4000))
    assert top_k == {1, 3}
    # top-p 0.7: 0.5 (token 1) alone is below 0.7, adding 0.3 (token 3) reaches it
    top_p = set(sampler(logits, [sp(top_p=0.7)] * 4000))
    assert top_p == {1, 3}
    both = set(sampler(logits, [sp(top_k=3, top_p=0.85)] * 4000))
    assert both == {1, 2, 3}


def test_sampling_frequencies_match_softmax_of_scaled_logits():
    torch.manual_seed(0)                              # unseeded rows use the global generator
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0])
    n = 20000
    batch = logits.expand(n, 5).contiguous()
    for temperature in (0.5, 1.0, 2.0):
        out = torch.tensor(sampler(batch, [sp(temperature=temperature)] * n))
        freq = torch.bincount(out, minlength=5).float() / n
        want = torch.softmax(logits / temperature, -1)
        assert torch.allclose(freq, want, atol=0.015), (temperature, freq, want)


def test_top_p_renormalizes_the_kept_tokens():
    torch.manual_seed(1)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    n = 20000
    logits = probs.log().expand(n, 4).contiguous()
    out = torch.tensor(sampler(logits, [sp(top_p=0.65)] * n))
    freq = torch.bincount(out, minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]), atol=0.015)


def test_a_seeded_row_does_not_depend_on_its_neighbours_or_row():
    vocab = 300
    mine = torch.randn(vocab, generator=gen(3))
    params = sp(temperature=1.0, top_p=0.95, top_k=50, seed=7)

    def draw(batch_rows: torch.Tensor, row: int, neighbours_seeded: bool) -> list[int]:
        g = gen(7)
        got = []
        for _ in range(10):
            logits = batch_rows.clone()
            logits[row] = mine
            n = logits.shape[0]
            ps = [sp(temperature=0.7, seed=100 + i if neighbours_seeded else None) for i in range(n)]
            gs = [gen(100 + i) if neighbours_seeded else None for i in range(n)]
            ps[row], gs[row] = params, g
            got.append(sampler(logits, ps, gs)[row])
        return got

    alone = draw(torch.empty(1, vocab), 0, False)
    assert draw(torch.randn(5, vocab, generator=gen(4)), 3, False) == alone
    assert draw(torch.randn(9, vocab, generator=gen(5)), 0, True) == alone
    assert len(set(alone)) > 1                        # it is sampling, not argmax
    other_seed = []
    g = gen(8)
    for _ in range(10):
        other_seed.append(sampler(mine.unsqueeze(0), [params], [g])[0])
    assert other_seed != alone


def test_sample_returns_a_device_tensor_of_ids():
    logits = torch.randn(3, 20, generator=gen(6))
    out = sampler.sample(logits, [sp(), sp(temperature=0.0), sp(top_k=3)])
    assert out.dtype == torch.int64 and out.shape == (3,)
    assert out[1] == logits[1].argmax()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits(dtype):
    logits = torch.randn(4, 64, generator=gen(9)).to(dtype)
    out = sampler(logits, [sp(top_p=0.9)] * 4)
    assert all(0 <= t < 64 for t in out)
    assert sampler(logits, [sp(temperature=0.0)] * 4) == logits.argmax(-1).tolist()


def reference_mask(logits: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """Kept tokens of one row, by the textbook definition (full sort)."""
    vocab = logits.shape[0]
    order = logits.argsort(descending=True)
    keep = torch.zeros(vocab, dtype=torch.bool)
    kept = order[:k] if 0 < k < vocab else order
    probs = torch.softmax(logits[kept], dim=0)
    mass_before = probs.cumsum(0) - probs
    n = int((mass_before < p).sum()) if p < 1.0 else len(kept)
    keep[kept[:max(n, 1)]] = True
    return keep


def test_top_k_top_p_mask_matches_the_definition_including_large_nuclei():
    vocab = 3000
    g = gen(10)
    scales = [0.01, 0.5, 3.0, 8.0, 0.05, 1.0]      # flat rows need > TOP_P_CANDIDATES tokens for p=0.9
    logits = torch.stack([torch.randn(vocab, generator=g) * s for s in scales])
    for ks, ps in [([0] * 6, [0.9] * 6), ([0, 1, 5, 2999, 50, 0], [0.5, 0.9, 0.99, 0.9, 1.0, 0.3]),
                   ([7] * 6, [1.0] * 6), ([0, 0, 0, 0, 0, 1000], [0.99, 1.0, 1.0, 0.7, 0.95, 1.0])]:
        masked = _mask_top_k_top_p(logits, ks, ps)
        for row in range(6):
            want = reference_mask(logits[row], ks[row], ps[row])
            assert torch.equal(masked[row] > float("-inf"), want), (ks[row], ps[row], scales[row])
    flat = _mask_top_k_top_p(logits[:1], [0], [0.9])
    assert int((flat > float("-inf")).sum()) > TOP_P_CANDIDATES       # the fallback path ran
