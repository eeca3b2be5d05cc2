"""inference.diagnostics.mcmc_ess / split_r_hat: pyro.ops.stats's effective_sample_size and
split_gelman_rubin computed in fewer, contiguous passes (one inverse FFT per site). They
must agree with pyro to float64 rounding on chains of every shape the MH layer produces
(one or several chains, odd and even lengths, independent, random-walk and sticky draws,
a constant chain beside moving ones), batched over sites or not; and chain_diagnostics
must report them."""
from __future__ import annotations

import pytest
import torch
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from ppl.inference.diagnostics import mcmc_ess, split_r_hat

SHAPES = [(1, 4), (1, 101), (2, 4), (2, 5), (3, 100), (4, 1000), (7, 9)]


def draws(kind: str, chains: int, n: int, seed: int) -> torch.Tensor:
    x = torch.randn(chains, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if kind == "walk":
        return x.cumsum(1)
    if kind == "sticky":  # each value held for 3 draws
        return torch.repeat_interleave(x[:, ::3], 3, 1)[:, :n]
    if kind == "one constant chain" and chains > 1:
        x[0] = 0.5
    return x


@pytest.mark.parametrize("kind", ["iid", "walk", "sticky", "one constant chain"])
@pytest.mark.parametrize("chains,n", SHAPES)
def test_ess_and_r_hat_agree_with_pyro(kind, chains, n):
    x = draws(kind, chains, n, seed=chains * 1000 + n)
    expected = float(effective_sample_size(x, chain_dim=0, sample_dim=1))
    assert float(mcmc_ess(x)) == pytest.approx(expected, rel=1e-10, abs=1e-10)
    if chains >= 2:
        expected = float(split_gelman_rubin(x, chain_dim=0, sample_dim=1))
        assert float(split_r_hat(x)) == pytest.approx(expected, rel=1e-10)


def test_batched_over_sites_equals_one_site_at_a_time():
    x = torch.stack([draws(kind, 4, 200, seed=i) for i, kind in enumerate(["iid", "walk", "sticky"])])  # [3, 4, 200]
    ess, r_hat = mcmc_ess(x), split_r_hat(x)
    assert ess.shape == r_hat.shape == (3,)
    for i in range(3):
        assert float(ess[i]) == pytest.approx(float(mcmc_ess(x[i])), rel=1e-12)
        assert float(r_hat[i]) == pytest.approx(float(split_r_hat(x[i])), rel=1e-12)


def test_independent_draws_have_an_ess_near_their_number_and_a_walk_far_below():
    """A known answer, not only agreement: 4 x 1000 independent normal draws have ESS
    close to 4000 (Geyer's estimator, within 15%) and R-hat close to 1; a random walk has
    an ESS of a few dozen at most and an R-hat far above 1.01."""
    iid, walk = draws("iid", 4, 1000, seed=1), draws("walk", 4, 1000, seed=1)
    assert float(mcmc_ess(iid)) == pytest.approx(4000, rel=0.15)
    assert float(split_r_hat(iid)) == pytest.approx(1.0, abs=0.01)
    assert float(mcmc_ess(walk)) < 100
    assert float(split_r_hat(walk)) > 1.05
