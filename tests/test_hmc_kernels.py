"""The gradient kernels (inference/hmc.py) and their warm-up (inference/adaptation.py) on
plain torch targets: moments within Monte Carlo standard errors (derived from the bulk
ESS), divergences where the geometry forces them, adaptation reaching its targets, the
per-chain masking of batched NUTS, and broken variants caught by the same moment test."""
from __future__ import annotations

import math

import pytest
import torch

from ppl.inference import hmc
from ppl.inference.adaptation import DualAveraging, Welford, warmup_windows
from ppl.inference.diagnostics import mcmc_ess
from ppl.inference.hmc import (Metric, bfmi, hmc_step, init_state, leapfrog, mala_step, nuts_step,
                               sample_nuts)
from ppl.inference.randomness import TorchRandomness

F64 = torch.float64
Z_MAX = 4.0  # a moment may be this many Monte Carlo standard errors from the truth


# -- targets --------------------------------------------------------------------------

class Gaussian:
    """N(0, Sigma) with Sigma = diag(scales) R diag(scales), R with off-diagonal corr."""

    def __init__(self, scales, corr=0.0):
        self.scales = torch.as_tensor(scales, dtype=F64)
        D = self.scales.numel()
        R = torch.full((D, D), corr, dtype=F64)
        R.fill_diagonal_(1.0)
        self.cov = R * self.scales[:, None] * self.scales[None, :]
        self.precision = torch.linalg.inv(self.cov)

    def value_and_grad(self, z):
        grad = -z @ self.precision
        return 0.5 * (z * grad).sum(-1), grad


class Funnel:
    """Neal's funnel in D dimensions: v ~ N(0, scale^2), x_i | v ~ N(0, exp(v)) (i < D).
    Centred: z = (v, x). Non-centred: z = (v, x_raw), x = exp(v/2) x_raw."""

    def __init__(self, D=10, scale=3.0, centred=True):
        self.D, self.scale, self.centred = D, scale, centred

    def log_density(self, z):
        v, x = z[:, 0], z[:, 1:]
        lp = -0.5 * (v / self.scale) ** 2
        if self.centred:
            return lp - 0.5 * (x.square() * torch.exp(-v).unsqueeze(-1)).sum(-1) - 0.5 * (self.D - 1) * v
        return lp - 0.5 * x.square().sum(-1)

    def value_and_grad(self, z):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            lp = self.log_density(z)
            (grad,) = torch.autograd.grad(lp.sum(), z)
        return lp.detach(), grad


class HalfSpace(Gaussian):
    """A standard normal restricted to z_0 > 0: log density -inf on the other half."""

    def value_and_grad(self, z):
        lp, grad = super().value_and_grad(z)
        return torch.where(z[:, 0] > 0, lp, -math.inf), grad


class PerChainRandomness:
    """Each chain (row) draws from its own generator, so a chain's numbers do not depend on
    the batch it runs in."""

    def __init__(self, seeds):
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]

    def normal(self, shape, device):
        return torch.stack([torch.randn(shape[1:], dtype=F64, generator=g) for g in self.gens])

    def uniform(self, shape, device):
        return torch.stack([torch.rand(shape[1:], dtype=F64, generator=g) for g in self.gens])


def run(target, D, *, seed=0, C=4, **options):
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.rand(C, D, dtype=F64, generator=gen) * 4 - 2
    return sample_nuts(target, z0, randomness=TorchRandomness(gen), progress=False, **options)


def z_scores(draws, mean, var):
    """|estimate - truth| / MCSE for the mean and the variance of each coordinate of draws
    [C, S, D] (MCSE from the bulk ESS of x and of (x - mean)^2). Returns the largest."""
    x = draws.permute(2, 0, 1)  # [D, C, S]
    ess = mcmc_ess(x)
    est_mean = x.mean((1, 2))
    z_mean = (est_mean - mean).abs() / (x.std((1, 2)) / ess.sqrt())
    sq = (x - torch.as_tensor(mean, dtype=F64).reshape(-1, 1, 1)).square()
    ess_sq = mcmc_ess(sq)
    z_var = (sq.mean((1, 2)) - var).abs() / (sq.std((1, 2)) / ess_sq.sqrt())
    return float(torch.cat([z_mean, z_var]).max())


# -- moments -----------------------------------------------------------------------------

def test_nuts_standard_normal_moments():
    res = run(Gaussian([1.0] * 5), 5, samples=600, warmup=300, seed=1)
    assert z_scores(res.z, torch.zeros(5), torch.ones(5)) < Z_MAX
    assert res.z.shape == (4, 600, 5) and res.z.dtype == F64
    assert int(res.divergent.sum()) == 0
    assert res.tree_depth.min() >= 1 and (res.n_steps >= 1).all()


def test_hmc_standard_normal_moments():
    res = run(Gaussian([1.0] * 5), 5, samples=600, warmup=300, seed=2, kernel="hmc", trajectory_length=1.3)
    assert z_scores(res.z, torch.zeros(5), torch.ones(5)) < Z_MAX
    assert int(res.divergent.sum()) == 0


def test_mala_standard_normal_moments():
    res = run(Gaussian([1.0] * 3), 3, samples=1500, warmup=300, seed=3, kernel="mala", target_accept=0.57)
    assert z_scores(res.z, torch.zeros(3), torch.ones(3)) < Z_MAX


CORRELATED = Gaussian([1.0, 100.0], corr=0.99)


def test_nuts_correlated_scaled_gaussian_moments():
    res = run(CORRELATED, 2, samples=300, warmup=200, seed=4, max_tree_depth=6)
    assert z_scores(res.z, torch.zeros(2), CORRELATED.scales ** 2) < Z_MAX
    corr = torch.corrcoef(res.z.reshape(-1, 2).T)[0, 1]
    assert abs(float(corr) - 0.99) < 0.005


def test_hmc_correlated_scaled_gaussian_moments():
    res = run(CORRELATED, 2, samples=800, warmup=300, seed=5, kernel="hmc", trajectory_length=2.0)
    assert z_scores(res.z, torch.zeros(2), CORRELATED.scales ** 2) < Z_MAX


def test_dense_mass_whitens_a_correlated_gaussian():
    res = run(CORRELATED, 2, samples=300, warmup=200, seed=6, dense_mass=True, max_tree_depth=6)
    assert res.inverse_mass.shape == (4, 2, 2)
    assert z_scores(res.z, torch.zeros(2), CORRELATED.scales ** 2) < Z_MAX
    # the adapted inverse mass is close to the covariance: the whitened target is round
    corr = res.inverse_mass[:, 0, 1] / (res.inverse_mass[:, 0, 0] * res.inverse_mass[:, 1, 1]).sqrt()
    assert (corr > 0.9).all(), corr  # the identity it started from has 0
    assert res.tree_depth.double().mean() < 3.5  # short trees on the whitened target


# -- divergences and density zero --------------------------------------------------------

def test_funnel_centred_diverges_and_non_centred_does_not():
    centred = run(Funnel(centred=True), 10, samples=100, warmup=150, seed=0, C=8, max_tree_depth=6)
    non_centred = run(Funnel(centred=False), 10, samples=100, warmup=150, seed=0, C=8, max_tree_depth=6)
    assert int(centred.divergences().sum()) > 0
    assert int(non_centred.divergences().sum()) == 0
    assert non_centred.warmup_divergences.shape == (8,)


def test_impossible_half_space_is_divergent_never_raises():
    target = HalfSpace([1.0, 1.0])
    gen = torch.Generator().manual_seed(8)
    z0 = torch.rand(4, 2, dtype=F64, generator=gen) + 0.5
    res = sample_nuts(target, z0, samples=400, warmup=200, randomness=TorchRandomness(gen), progress=False)
    assert (res.z[..., 0] > 0).all()
    assert int(res.divergences().sum()) > 0
    # the half-normal's moments: E z0 = sqrt(2/pi), E z0^2 = 1
    x = res.z[..., 0]
    ess = float(mcmc_ess(x))
    assert abs(float(x.mean()) - math.sqrt(2 / math.pi)) < Z_MAX * float(x.std()) / math.sqrt(ess)
    # HMC through the impossible half is rejected, never raises either
    state = init_state(target, z0)
    for _ in range(20):
        state, info = hmc_step(target, state, torch.full((4,), 0.9, dtype=F64), Metric.identity(4, 2),
                               TorchRandomness(gen), num_steps=5)
        assert (state.z[:, 0] > 0).all() and torch.isfinite(state.logp).all()


def test_initial_point_of_density_zero_is_a_located_error():
    from ppl.semantics.errors import PPLRuntimeError
    z0 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    with pytest.raises(PPLRuntimeError, match=r"chain\(s\) \[1\]"):
        sample_nuts(HalfSpace([1.0, 1.0]), z0, samples=1, warmup=0, randomness=TorchRandomness())


# -- adaptation ------------------------------------------------------------------------------

def test_dual_averaging_reaches_the_target_acceptance():
    for target_accept, tolerance in [(0.8, 0.05), (0.95, 0.03)]:
        res = run(Gaussian([1.0] * 5), 5, samples=300, warmup=400, seed=9, adapt_mass=False,
                  target_accept=target_accept)
        assert abs(float(res.accept_stat.mean()) - target_accept) < tolerance


def test_adapted_inverse_mass_matches_posterior_variances():
    scales = torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0], dtype=F64)
    res = run(Gaussian(scales), 5, samples=1, warmup=300, seed=10, max_tree_depth=5)
    # Stan's regularised estimate from the last slow window (iterations 150..249: n = 100)
    n = 100
    expected = n / (n + 5) * scales ** 2 + 1e-3 * 5 / (n + 5)
    # each chain its own estimate from ~100 autocorrelated draws: within a factor 3 per
    # chain, a factor 1.5 on the chains' geometric mean, across 8 orders of magnitude
    ratio = res.inverse_mass / expected
    assert ((ratio > 1 / 3) & (ratio < 3)).all(), ratio
    mean_ratio = ratio.log().mean(0).exp()
    assert ((mean_ratio > 1 / 1.5) & (mean_ratio < 1.5)).all(), mean_ratio


def test_warmup_windows_follow_stan():
    assert warmup_windows(1000) == [99, 149, 249, 449, 949]
    assert warmup_windows(500) == [99, 149, 249, 449]
    assert warmup_windows(100) == [89]  # 15 / 75 / 10
    assert warmup_windows(19) == []


def test_welford_regularisation_and_dual_averaging_step():
    w = Welford(1, 2)
    xs = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 1.0]], dtype=F64)
    for x in xs:
        w.update(x.unsqueeze(0))
    var = xs.var(0)
    assert torch.allclose(w.inverse_mass()[0], 3 / 8 * var + 1e-3 * 5 / 8)
    da = DualAveraging(torch.tensor([1.0], dtype=F64), 0.8)
    step = da.update(torch.tensor([1.0], dtype=F64))  # accepted more than the target: grow
    s_bar = (1 / 11) * (0.8 - 1.0)
    assert torch.allclose(step, torch.tensor([math.exp(math.log(10) - s_bar / 0.05)], dtype=F64))


def test_bfmi_closed_form():
    energy = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0]], dtype=F64)
    assert torch.allclose(bfmi(energy), torch.tensor([3 / 1.0, 3 / 5.0], dtype=F64))


# -- exactness of the kernels ------------------------------------------------------------------

def test_mala_is_the_langevin_proposal_with_its_density():
    """One mala_step = z' = z + (eps^2/2) grad + eps xi accepted with the Langevin densities."""
    target = Gaussian([1.0, 3.0], corr=0.5)
    z = torch.tensor([[0.3, -1.0], [1.5, 2.0]], dtype=F64)
    state = init_state(target, z)
    eps = torch.tensor([0.7, 1.1], dtype=F64)
    rand = PerChainRandomness([11, 12])
    xi = PerChainRandomness([11, 12]).normal((2, 2), None)
    new, info = mala_step(target, state, eps, rand)
    e = eps.unsqueeze(-1)
    prop = z + 0.5 * e ** 2 * state.grad + e * xi
    lp1, g1 = target.value_and_grad(prop)

    def log_q(to, frm, grad):  # Langevin proposal density up to a constant
        return -((to - frm - 0.5 * e ** 2 * grad) ** 2).sum(-1) / (2 * eps ** 2)

    log_alpha = lp1 - state.logp + log_q(z, prop, g1) - log_q(prop, z, state.grad)
    assert torch.allclose(info.accept_stat, log_alpha.exp().clamp(max=1.0))
    assert torch.allclose(torch.where(info.accepted.unsqueeze(-1), prop, z), new.z)


def test_leapfrog_is_reversible():
    target = Gaussian([1.0, 2.0, 0.5], corr=0.3)
    z = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    p = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    metric = Metric(torch.tensor([[1.0, 2.0, 0.5]] * 3, dtype=F64))
    logp, grad = target.value_and_grad(z)
    eps = torch.tensor([0.1, 0.3, -0.2], dtype=F64)
    z1, p1, _, g1 = leapfrog(target, z, p, grad, eps, metric)
    z2, p2, _, _ = leapfrog(target, z1, p1, g1, -eps, metric)
    assert torch.allclose(z2, z) and torch.allclose(p2, p)


def test_batched_nuts_equals_chains_run_one_by_one():
    """Per-chain masking: chains with very different step sizes (trees of different depths)
    in one batch make exactly the draws each makes alone with the same random numbers."""
    target = Gaussian([1.0, 10.0, 0.1], corr=0.0)
    seeds = [21, 22, 23]
    steps = torch.tensor([0.01, 0.3, 2.0], dtype=F64)
    z0 = torch.tensor([[0.5, 1.0, -0.1], [-1.0, 3.0, 0.05], [0.0, -8.0, 0.2]], dtype=F64)
    metric = Metric(torch.tensor([[1.0, 1.0, 1.0]] * 3, dtype=F64))

    def chain_run(rows):
        rand = PerChainRandomness([seeds[r] for r in rows])
        state = init_state(target, z0[rows])
        m = Metric(metric.inv_mass[rows])
        out, depths = [], []
        for _ in range(15):
            state, info = nuts_step(target, state, steps[rows], m, rand, max_tree_depth=8)
            out.append(state.z), depths.append(info.tree_depth)
        return torch.stack(out, 1), torch.stack(depths, 1)

    batched, depth = chain_run([0, 1, 2])
    assert depth[0].max() >= 6 and depth[2].max() <= 3  # very different trees in one batch
    for c in range(3):
        alone, _ = chain_run([c])
        assert torch.allclose(alone[0], batched[c], rtol=0, atol=1e-12)


# -- broken variants are caught by the same moment test ------------------------------------------

def test_nuts_choosing_the_first_state_of_each_subtree_is_caught(monkeypatch):
    """Taking each new sub-tree's first state instead of a multinomial draw from it."""
    target = Gaussian([1.0])
    good = run(target, 1, samples=600, warmup=300, seed=13)
    assert z_scores(good.z, torch.zeros(1), torch.ones(1)) < Z_MAX
    monkeypatch.setattr(hmc, "_choose_leaf", lambda weights, log_total, u: torch.zeros_like(u, dtype=torch.int64))
    broken = run(target, 1, samples=600, warmup=300, seed=13)
    assert z_scores(broken.z, torch.zeros(1), torch.ones(1)) > Z_MAX


def test_hmc_without_metropolis_correction_is_caught():
    target = Gaussian([1.0] * 5)
    gen = torch.Generator().manual_seed(14)
    rand = TorchRandomness(gen)
    metric = Metric.identity(4, 5)
    eps = torch.full((4,), 1.2, dtype=F64)

    def chain(step):
        state = init_state(target, torch.randn(4, 5, dtype=F64, generator=gen))
        out = []
        for i in range(1100):
            state = step(state)
            if i >= 100:
                out.append(state.z)
        return torch.stack(out, 1)

    def correct(state):
        return hmc_step(target, state, eps, metric, rand, num_steps=3)[0]

    def no_mh(state):  # the leapfrog end point, always accepted
        p = metric.sample_momentum(rand)
        z, grad = state.z, state.grad
        for _ in range(3):
            z, p, logp, grad = leapfrog(target, z, p, grad, eps, metric)
        return hmc.State(z, logp, grad)

    assert z_scores(chain(correct), torch.zeros(5), torch.ones(5)) < Z_MAX
    assert z_scores(chain(no_mh), torch.zeros(5), torch.ones(5)) > Z_MAX


def test_nan_density_or_gradient_never_raises():
    """NaN log densities are density zero (divergent, rejected); NaN gradient entries do
    not poison the chains, and moves stay within the finite region."""

    class Broken(Gaussian):
        def value_and_grad(self, z):
            lp, grad = super().value_and_grad(z)
            lp = torch.where(z[:, 0] < -1.0, math.nan, lp)
            grad = torch.where((z[:, 1] > 1.0).unsqueeze(-1), math.nan, grad)
            return lp, grad

    target = Broken([1.0, 1.0])
    gen = torch.Generator().manual_seed(15)
    state = init_state(target, torch.zeros(4, 2, dtype=F64))
    rand = TorchRandomness(gen)
    divergent = 0
    for kernel in (nuts_step, hmc_step):
        for _ in range(40):
            options = {"num_steps": 4} if kernel is hmc_step else {}
            state, info = kernel(target, state, torch.full((4,), 0.8, dtype=F64), Metric.identity(4, 2), rand,
                                 **options)
            divergent += int(info.divergent.sum())
            assert torch.isfinite(state.logp).all() and torch.isfinite(state.z).all()
            assert (state.z[:, 0] >= -1.0).all()
    assert divergent > 0


def test_warmup_adapts_each_chain_on_its_own():
    """sample_nuts: a chain's step size, mass matrix and draws are the same in a batch as
    alone (per-chain adaptation; fixed random numbers per chain and transition), up to
    rounding: torch's vectorised exp differs in the last bit between batch sizes, and
    adaptation carries such differences along (to ~1e-6 here; chains that shared anything
    would differ by O(1))."""
    target = Gaussian([0.3, 1.0, 3.0])
    z0 = torch.tensor([[0.1, 1.0, -3.0], [-0.05, 0.5, 4.0]], dtype=F64)

    def chains(rows):
        return sample_nuts(target, z0[rows], samples=10, warmup=40, randomness=PerChainRandomness(
            [31 + r for r in rows]), max_tree_depth=5, progress=False)

    both, alone = chains([0, 1]), chains([1])
    assert torch.allclose(both.step_size[1:], alone.step_size, rtol=1e-4)
    assert torch.allclose(both.inverse_mass[1:], alone.inverse_mass, rtol=1e-4)
    assert torch.allclose(both.z[1:], alone.z, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(both.step_size[0], both.step_size[1])
