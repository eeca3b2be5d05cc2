"""The fast paths of resampling return exactly what the plain computation returns.

Systematic and stratified resampling find their ancestors by counting (O(N) vector
operations) instead of torch's binary search once N is large; the ancestors must be
identical, bit for bit, to ``searchsorted`` on the same cumulative weights and uniforms
(clamped to the last particle of positive weight), for every kind of weight vector.
"""
import math

import pytest
import torch

from ppl.inference import resampling as R


def _reference(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cdf = torch.cumsum(w, 0)
    idx = torch.searchsorted(cdf, u * cdf[-1], right=True)
    return idx.clamp_(max=int(torch.nonzero(w > 0).max()))


def _weights(kind: int, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == 0:
        w = torch.rand(n, dtype=torch.float64, generator=g)
    elif kind == 1:  # a wide dynamic range
        w = torch.exp(torch.randn(n, dtype=torch.float64, generator=g) * 30)
    elif kind == 2:  # most weights zero, the last one too
        w = torch.rand(n, dtype=torch.float64, generator=g)
        w[torch.rand(n, generator=g) < 0.9] = 0
        w[-1] = 0
        w[0] = 0.5
    elif kind == 3:  # all equal
        w = torch.ones(n, dtype=torch.float64)
    elif kind == 4:  # one particle has all the weight
        w = torch.zeros(n, dtype=torch.float64)
        w[int(torch.randint(0, n, (), generator=g))] = 1.0
    else:  # zeros in runs, ties
        w = torch.repeat_interleave(torch.tensor([0.0, 1.0, 0.0, 2.0], dtype=torch.float64), n // 4 + 1)[:n]
        w[0] = 1.0
    return w / w.sum()


@pytest.mark.parametrize("scheme", ["systematic", "stratified"])
def test_counting_search_matches_binary_search(scheme):
    g = torch.Generator().manual_seed(7)
    for trial in range(60):
        n = int(torch.randint(R._COUNT_MIN, 4 * R._COUNT_MIN, (), generator=g))
        w = _weights(trial % 6, n, g)
        state = torch.get_rng_state()
        got = getattr(R, scheme)(w, n)
        torch.set_rng_state(state)
        if scheme == "systematic":
            u = (torch.arange(n, dtype=torch.float64) + torch.rand((), dtype=torch.float64)) / n
        else:
            u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, dtype=torch.float64)) / n
        assert torch.equal(got, _reference(w, u)), (scheme, trial, n)


def test_counting_search_declines_unusable_weights():
    n = R._COUNT_MIN
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for bad in (-1.0, math.nan, math.inf):
        w = torch.full((n,), 1.0 / n, dtype=torch.float64)
        w[3] = bad
        cdf = torch.cumsum(w, 0)
        assert R._count_search(w, cdf, u * cdf[-1]) is None
