"""pi K = pi for the gradient kernels on a program's potential, tested in law: 4,000
chains (one batch) start at exact posterior draws of a conjugate program with a
constrained choice (gamma-poisson: lam > 0 moves as log lam), take several NUTS, HMC or
MALA transitions with a fixed step size and mass, and must still be exact posterior draws
(a Kolmogorov-Smirnov test against the closed-form posterior, and the mean within 5
standard errors: the chains are independent, so the draws are i.i.d. exactly when the
kernel leaves the posterior invariant). A kernel without its Metropolis correction is
caught by the same test."""
import math

import pytest
import torch
from scipy import stats

import ppl
from ppl.inference import hmc
from ppl.inference.mh import initial_state
from ppl.inference.potential import build_potential
from ppl.inference.randomness import TorchRandomness
from ppl.semantics.gfi import ModelRun

SRC = """
def rates(counts):
    lam ~ gamma(2, 1)
    for c in counts:
        observe c ~ poisson(lam)
"""
COUNTS = [3, 5, 2, 4, 6, 3]
A, B = 2 + sum(COUNTS), 1 + len(COUNTS)  # the posterior is gamma(A, rate B)
C = 4000


@pytest.fixture(scope="module")
def potential():
    m = ppl.model(SRC)
    data = m.prepare_data({"counts": COUNTS}, "cpu")
    interp = m.interpreter()
    with ppl.api.seeded(0):
        state = initial_state(interp, m.entry, data, C)
    return build_potential(ModelRun(interp, m.entry, data), state)


def _exact_start(seed):
    g = torch.Generator().manual_seed(seed)
    lam = torch.distributions.Gamma(torch.full((C,), float(A), dtype=torch.float64),
                                    torch.full((C,), float(B), dtype=torch.float64))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        x = lam.sample()
    return x.log().unsqueeze(1), TorchRandomness(g)


def _still_posterior(lam):
    lam = lam.double().numpy()
    ks = stats.kstest(lam, stats.gamma(A, scale=1 / B).cdf)
    se = math.sqrt(A) / B / math.sqrt(len(lam))
    return ks.pvalue > 1e-3 and abs(lam.mean() - A / B) < 5 * se


def _run(potential, kernel, randomness, z, step, transitions=8, **kw):
    state = hmc.init_state(potential, z)
    metric = hmc.Metric.identity(C, 1, z.device)
    eps = torch.full((C,), step, dtype=torch.float64)
    for _ in range(transitions):
        if kernel == "nuts":
            state, _ = hmc.nuts_step(potential, state, eps, metric, randomness, **kw)
        elif kernel == "hmc":
            state, _ = hmc.hmc_step(potential, state, eps, metric, randomness, num_steps=kw.get("num_steps", 4))
        else:
            state, _ = hmc.mala_step(potential, state, eps, randomness)
    return state.z[:, 0].exp()


@pytest.mark.parametrize("kernel,step", [("nuts", 0.3), ("hmc", 0.3), ("mala", 0.6)])
def test_gradient_kernels_leave_the_posterior_invariant(potential, kernel, step):
    z, randomness = _exact_start(11)
    assert _still_posterior(z[:, 0].exp())  # the test's own start
    assert _still_posterior(_run(potential, kernel, randomness, z, step))


class _AlwaysAccept(TorchRandomness):
    """Uniforms of 0: every Metropolis test accepts (the correction removed)."""

    def uniform(self, shape, device):
        return torch.zeros(shape, dtype=torch.float64, device=device)


@pytest.mark.parametrize("kernel", ["hmc", "mala"])
def test_a_kernel_without_its_metropolis_correction_is_caught(potential, kernel):
    z, randomness = _exact_start(12)
    broken = _AlwaysAccept(randomness.generator)
    assert not _still_posterior(_run(potential, kernel, broken, z, 0.5))
    # the same step size with the correction is fine
    z, randomness = _exact_start(12)
    assert _still_posterior(_run(potential, kernel, randomness, z, 0.5))
