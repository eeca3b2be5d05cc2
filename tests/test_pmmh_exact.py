"""PMMH checked exactly (``ppl.testing.validity.pmmh_kernel_check``), and broken PMMHs caught.

Every draw of PMMH goes through the pluggable randomness, so on a finite program with
two SMC particles the checker enumerates every outcome of a step (theta' from the prior,
SMC's prior draws and resampling given theta', the trajectory pick, the accept test) from
every state (theta, trajectory, Z_hat) of the extended space, and builds the kernel K
exactly. The target pi is p(theta) P_theta(x, Z_hat) Z_hat / Z. PMMH is right when
pi K = pi and pi's marginal on the trajectory is the exact posterior; both hold to float
rounding (1e-12), and each broken variant misses one of them by far more:

* re-estimating Z_hat of the current theta at every step ("Monte Carlo within
  Metropolis"): not invariant;
* an independent prior proposal accepted as if it were symmetric (the prior ratio
  counted, the proposal's Hastings term forgotten): not invariant;
* SMC's evidence without the resampling factor (Z_hat no longer unbiased): K is still
  invariant for *its* extended target, but that target's marginal is not the posterior.
"""
import dataclasses
from functools import partial

import pytest
import torch

import ppl
from ppl.inference import pmmh as pmmh_mod
from ppl.semantics.errors import PPLError
from ppl.testing.validity import pmmh_kernel_check

torch.set_num_threads(1)
EXACT = 1e-12

# k: the parameter (prior 1/4, 3/4), z: a latent choice SMC draws per particle
MODEL = """
def m():
    k ~ categorical([1, 3])
    z ~ flip(0.3 if k == 0 else 0.8)
    observe True ~ bernoulli(0.9 if z else 0.2)
    return z
"""

# two observations: two resampling steps, so Z_hat is a product of two means
TWO_STEPS = """
def m():
    k ~ flip(0.4)
    z ~ flip(0.7 if k else 0.2)
    observe True ~ bernoulli(0.9 if z else 0.3)
    observe False ~ bernoulli(0.4 if z else 0.1)
    return z
"""


@pytest.fixture(scope="module")
def model():
    return ppl.model(MODEL)


def test_pmmh_leaves_the_exact_posterior_invariant(model):
    kc = pmmh_kernel_check(model, ["k"], particles=2)
    assert kc.invariance_error <= EXACT and kc.row_sum_error <= EXACT, kc
    assert kc.marginal_error <= EXACT, kc
    assert kc.ok(), kc
    assert len(kc.pi) == 8  # 2 parameters x 2 trajectories x 2 values of Z_hat
    assert abs(sum(kc.pi.values()) - 1) <= EXACT  # E[Z_hat] = Z: the extended target is normalised
    # the marginal of theta: p(k = 1 | y) from the exact posterior
    p_k1 = sum(p for key, p in kc.marginal.items() if dict(key)["k"] == 1)
    assert abs(p_k1 - (0.75 * 0.76) / (0.25 * 0.41 + 0.75 * 0.76)) <= EXACT


def test_pmmh_with_two_resampling_steps():
    kc = pmmh_kernel_check(ppl.model(TWO_STEPS), ["k"], particles=2)
    assert len(kc.pi) == 10 and kc.ok(), kc


def _reestimating_step(estimate, state, rnd):
    """Monte Carlo within Metropolis: Z_hat(theta) of the current state drawn afresh."""
    fresh = estimate(state.theta, rnd)
    return pmmh_mod.pmmh_step(estimate, dataclasses.replace(state, log_z=fresh.log_z), rnd, kernel="prior")


def test_reestimating_the_current_evidence_is_caught(model):
    # one particle: Z_hat is the likelihood of one draw of z, still random (and cheaper to enumerate)
    kc = pmmh_kernel_check(model, ["k"], particles=1, step=_reestimating_step)
    assert kc.row_sum_error <= EXACT  # still a Markov kernel ...
    assert kc.invariance_error > 1e-3 and not kc.ok(), kc  # ... that does not keep pi


def _symmetric_prior_step(estimate, state, rnd):
    """theta' ~ p(theta), accepted with Z_hat' p(theta') / (Z_hat p(theta)): the prior
    proposal's q(theta) / q(theta') is forgotten."""
    new = estimate({a: None for a in state.theta}, rnd)
    log_alpha = (new.log_z + new.log_prior) - (state.log_z + state.log_prior)
    if bool(rnd.accept(torch.tensor([log_alpha], dtype=torch.float64))[0]):
        return new, True
    return state, False


def test_a_missing_hastings_term_is_caught(model):
    kc = pmmh_kernel_check(model, ["k"], particles=2, step=_symmetric_prior_step)
    assert kc.invariance_error > 1e-3 and not kc.ok(), kc


class _ForgetsResamplingEvidence(pmmh_mod._FixedParams):
    """SMC whose Z_hat drops the mean weight at each resampling step."""

    def _checkpoint(self, eff):
        super()._checkpoint(eff)
        self.log_z = 0.0


def test_an_evidence_without_the_resampling_factor_is_caught(model):
    interp, data = model.interpreter(), {}
    broken = partial(pmmh_mod.smc_estimate, interp, model.entry, data, particles=2,
                     handler=_ForgetsResamplingEvidence)
    kc = pmmh_kernel_check(model, ["k"], particles=2, estimate=broken)
    assert kc.invariance_error <= EXACT  # invariant for its own (wrong) target ...
    assert kc.marginal_error > 1e-2 and not kc.ok(), kc  # ... whose marginal is not the posterior


def test_the_random_walk_on_a_discrete_parameter_is_a_located_error(model):
    with pytest.raises(PPLError) as e:
        model.run("pmmh", {}, params=["k"], particles=4, samples=5, burn_in=1, chains=1, seed=0)
    assert "discrete parameter 'k'" in str(e.value) and "kernel='prior'" in str(e.value)
    assert ":3:" in str(e.value)  # the line of `k ~ ...`


def test_pmmh_with_the_prior_kernel_samples_the_posterior(model):
    r = model.run("pmmh", {}, params=["k"], kernel="prior", particles=4, samples=300, burn_in=20, chains=2,
                  seed=1)
    p = (0.75 * 0.76) / (0.25 * 0.41 + 0.75 * 0.76)
    mean = float(r.sites["k"].value.double().mean())
    se = (p * (1 - p) / r.ess_per_site["k"]) ** 0.5
    assert abs(mean - p) < 4.5 * se


# a choice inside a branch: a trajectory without it must not report a value for it
BRANCHY = """
def m():
    k ~ flip(0.5)
    b ~ flip(0.5)
    if b:
        c ~ flip(0.9)
    observe True ~ bernoulli(0.6 if k else 0.3)
    return b
"""


@pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning")  # 30 draws: the presence, not the quality
def test_pmmh_on_a_choice_in_a_branch_is_exact_and_marks_it_absent():
    m = ppl.model(BRANCHY)
    kc = pmmh_kernel_check(m, ["k"], particles=2)
    assert len(kc.pi) == 6 and kc.ok(), kc  # (k, b, c): c only where b
    r = m.run("pmmh", {}, params=["k"], kernel="prior", particles=4, samples=30, burn_in=0, chains=1, seed=0)
    b = r.sites["b"].value.bool()
    assert 0 < int(b.sum()) < 30
    assert torch.equal(r.sites["c"].present, b)  # was: every draw "had" c (a placeholder value where b is False)


def test_a_parameter_whose_prior_depends_on_a_latent_choice_is_a_located_error():
    """p(theta) must be one number for the whole population: a prior depending on a
    choice that is not a parameter (drawn per particle) would make PMMH's target wrong."""
    m = ppl.model("""
def m():
    x ~ normal(0, 1)
    mu ~ normal(x, 1)
    observe 0.5 ~ normal(mu, 1)
    return mu
""")
    with pytest.raises(PPLError) as e:
        m.run("pmmh", {}, params=["mu"], particles=4, samples=5, burn_in=0, chains=1, seed=0)
    assert "'mu' has a different prior in different particles" in str(e.value) and ":4:" in str(e.value)


def test_an_unknown_kernel_is_an_error_naming_the_kernels(model):
    with pytest.raises(PPLError, match="PMMH has no kernel 'gibbs'") as e:
        model.run("pmmh", {}, params=["k"], kernel="gibbs", particles=2, samples=5, burn_in=0, chains=1, seed=0)
    assert "rw, prior" in str(e.value)
