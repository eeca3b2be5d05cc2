"""Simulation-based calibration (``ppl.testing.sbc``).

What is checked:

* The observe-rewriting model is exact: with the observations that ``prior_predictive``
  simulated, ``observing(model, sim)`` has the same exact posterior (enumeration: equal
  Fractions), the same evidence and the same log joint (torch.equal) as the model given
  those values as data; sampling methods run through it give bit-identical results to
  the same methods on the data (same seed), so every method in METHODS sees the data.
* A correct inference passes SBC: exact enumeration on a discrete model (ties broken at
  random), importance sampling on a conjugate normal model.
* A wrong inference is caught: importance sampling of the tempered target prior x L^4 (a
  posterior with about half the right sd: the noise sd halved) gives U-shaped ranks.
* A known blind spot, kept visible: an "inference" that returns the prior passes SBC (its
  draws are exchangeable with the truth; Talts et al. 2018), so SBC alone cannot
  certify an algorithm.
* Errors (PPLError with a hint): no observe, an unknown parameter, factor statements,
  observes whose value is random, observes that the simulation did not reach.

How the thresholds are derived (chosen before looking at the test's own p-values):

* Under a correct posterior with independent draws the rank is exactly uniform on 0..L,
  so the chi-square p-value is (up to the chi-square approximation, with >= 10 expected
  counts per bin here) uniform on (0, 1): a test "p > 1e-3" fails for 1 seed in 1000.
  The seeds are fixed, so the tests are deterministic. (Importance sampling is only
  asymptotically exact; with N = 2000 particles and a median ESS in the hundreds its
  O(1/ESS) deviation from uniform ranks is far below what S = 200 simulations resolve.)
* For the wrong inference the threshold is "p < 1e-6". Its power was computed before
  the test was written: for prior normal(0, 1), 5 observations with noise sd 1, and L^4,
  the binned rank probabilities q_b (from 2e6 Monte Carlo ranks) give the chi-square
  non-centrality lambda = S sum_b (q_b - 1/B)^2 B = 108 for S = 200, B = 10, so
  P(p < 1e-6) > 0.9999 (non-central chi-square with 9 df).
"""
import math
import sys
import warnings

import numpy as np
import pytest
import torch

import ppl
from ppl.result import MCMCResult, Site, WeightedResult
from ppl.semantics.errors import PPLError
from ppl.testing.sbc import SBCResult, observing, posterior_draws, prior_predictive, sbc

torch.set_num_threads(1)

NORMAL = """
def model(ys):
    mu ~ normal(0, 1)
    observe ys ~ normal(mu, 1)
    return mu
"""

# observes reached through a call in a loop (addresses obs[i]/obs@...), and a vector one
DISCRETE = """
def obs(y, p):
    observe y ~ bernoulli(p)

def model(ys, zs):
    p ~ uniform_draw([0.2, 0.5, 0.8])
    k ~ categorical([0.3, 0.7])
    for y in ys:
        obs(y, p)
    observe zs ~ bernoulli(0.1 + 0.5 * k)
    return p
"""

LOOP = """
def model(ys, s):
    mu ~ normal(0, 2)
    tau ~ gamma(2, 2)
    for y in ys:
        observe y ~ normal(mu, s / tau)
    return mu
"""

PLACEHOLDER = {"ys": [False] * 4, "zs": [False] * 3}


def as_data(sim):
    """The simulated observations of DISCRETE as the model's data."""
    obs = sim.observations
    ys = sorted((a for a in obs if a.startswith("obs[")), key=lambda a: int(a[4:a.index("]")]))
    (zs,) = [a for a in obs if a.startswith("obs@")]
    return {"ys": [bool(obs[a]) for a in ys], "zs": [bool(v) for v in obs[zs].tolist()]}


# ---------------------------------------------------------------------- (c) exactness
def test_rewritten_observations_equal_the_data_exactly():
    d = ppl.model(DISCRETE)
    sims = prior_predictive(d, PLACEHOLDER, simulations=6, seed=3)
    differs = False
    for sim in sims:
        assert len(sim.observations) == 5
        data = as_data(sim)
        rewritten = observing(d, sim.observations)
        a = rewritten.run("enumerate", PLACEHOLDER)
        b = d.run("enumerate", data)
        assert a.evidence == b.evidence  # Fractions: exactly equal
        assert a.marginal("p") == b.marginal("p") and a.marginal("k") == b.marginal("k")
        differs |= a.evidence != d.run("enumerate", PLACEHOLDER).evidence
        # the log joint of every trace (all 6 at once, batched)
        trace = {"p": torch.tensor([0.2, 0.5, 0.8] * 2), "k": torch.tensor([0, 0, 0, 1, 1, 1])}
        lj_a = rewritten.log_joint(trace, **PLACEHOLDER)
        lj_b = d.log_joint(trace, **data)
        assert torch.equal(lj_a, lj_b)
    assert differs, "the placeholder data should have been replaced"


@pytest.mark.parametrize("method,options", [
    ("importance", {"particles": 500}),
    ("smc", {"particles": 300}),
    ("resample_move", {"particles": 200, "kernel": "rw"}),
    ("tempering", {"particles": 200}),
    ("mh", {"chains": 4, "samples": 30, "burn_in": 10, "kernel": "rw"}),                   # traced kernel
    ("mh", {"chains": 4, "samples": 30, "burn_in": 10, "kernel": "rw", "traced": False}),  # interpreter
    ("pmmh", {"particles": 20, "params": ["mu", "tau"], "samples": 20, "burn_in": 5, "chains": 1}),
])
@pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning")  # tiny runs: the data, not their quality
def test_every_method_sees_the_simulated_data(method, options):
    """Same seed, same draws: through the rewriter or given as data, bit for bit."""
    m = ppl.model(LOOP)
    (sim,) = prior_predictive(m, {"ys": [0.0] * 3, "s": 1.5}, simulations=1, seed=1)
    ys = [float(sim.observations[f"obs@6:9[{i}]"]) for i in range(3)]
    a = observing(m, sim.observations).run(method, {"ys": [0.0] * 3, "s": 1.5}, seed=5, **options)
    b = m.run(method, {"ys": ys, "s": 1.5}, seed=5, **options)
    c = m.run(method, {"ys": [0.0] * 3, "s": 1.5}, seed=5, **options)
    for name in ("mu", "tau", "return"):
        assert torch.equal(a.sites[name].value, b.sites[name].value), name
    assert torch.equal(torch.as_tensor(a.log_weights), torch.as_tensor(b.log_weights))
    # and the placeholder data would have given another result (weights or draws)
    assert not (torch.equal(a.sites["mu"].value, c.sites["mu"].value)
                and torch.equal(torch.as_tensor(a.log_weights), torch.as_tensor(c.log_weights)))


# ---------------------------------------------------------------- (a) correct methods
def test_exact_enumeration_passes():
    r = sbc(ppl.model(DISCRETE), "enumerate", PLACEHOLDER, simulations=200, draws=19, bins=10,
            parameters=["p", "k", "return"], seed=0, progress=False)
    for name in ("p", "k", "return"):
        assert r.ranks[name].min() >= 0 and r.ranks[name].max() <= 19
        assert r.counts(name).sum() == 200
        assert r.p_values[name] > 1e-3, r.summary()


def test_importance_passes_on_conjugate_normal():
    r = sbc(ppl.model(NORMAL), "importance", {"ys": [0.0] * 5}, simulations=200, draws=19, bins=10,
            particles=2000, seed=0, progress=False)
    assert r.parameters == ["mu"]  # the return value is mu itself: not ranked twice
    assert r.p_values["mu"] > 1e-3, r.summary()
    assert np.median(r.ess.astype(float)) > 100


# ------------------------------------------------------------------ (b) wrong methods
def tempered_importance(power):
    """Importance sampling of prior x L^power: for power 4 and a normal likelihood, the
    posterior of the model with the noise sd halved (too narrow by about 1/2)."""
    def method(model, data, *, particles, device, **_):
        res = model.run("importance", data, particles=particles, device=device)
        return WeightedResult("tempered", res.sites, power * res.log_weights)
    method.__name__ = f"importance_L^{power}"
    return method


def test_overconfident_posterior_is_caught():
    r = sbc(ppl.model(NORMAL), tempered_importance(4.0), {"ys": [0.0] * 5}, simulations=200, draws=19,
            bins=10, particles=2000, seed=0, progress=False)
    assert r.p_values["mu"] < 1e-6, r.summary()
    # too narrow: the truth falls outside the draws too often (U-shaped ranks)
    counts, expected = r.counts("mu"), r.bin_probabilities() * r.simulations
    assert counts[0] + counts[-1] > 2 * (expected[0] + expected[-1])
    assert r.method == "importance_L^4.0"


def test_the_prior_passes_sbc_a_known_blind_spot():
    r = sbc(ppl.model(NORMAL), "prior", {"ys": [0.0] * 5}, simulations=200, draws=19, bins=10,
            particles=2000, seed=0, progress=False)
    assert r.p_values["mu"] > 1e-3, r.summary()


# -------------------------------------------------------------------------- the API
def test_seeds_make_runs_reproducible():
    m = ppl.model(NORMAL)
    kw = dict(simulations=20, draws=9, particles=300, progress=False)
    a = sbc(m, "importance", {"ys": [0.0] * 3}, seed=7, **kw)
    b = sbc(m, "importance", {"ys": [0.0] * 3}, seed=7, **kw)
    c = sbc(m, "importance", {"ys": [0.0] * 3}, seed=8, **kw)
    assert np.array_equal(a.ranks["mu"], b.ranks["mu"]) and np.array_equal(a.truths["mu"], b.truths["mu"])
    assert not np.array_equal(a.truths["mu"], c.truths["mu"])


def test_default_parameters():
    m = ppl.model("""
def model(ys):
    mu ~ normal(0, 1)
    k ~ poisson(3)
    observe ys ~ normal(mu, 1 + k)
    return 2 * mu
""")
    r = sbc(m, "importance", {"ys": [0.0] * 2}, simulations=10, draws=4, particles=200, progress=False)
    assert r.parameters == ["mu", "return"]  # k is discrete: ranked only on request
    r = sbc(m, "importance", {"ys": [0.0] * 2}, simulations=10, draws=4, particles=200, parameters="k",
            progress=False)
    assert r.parameters == ["k"] and r.ranks["k"].max() <= 4
    assert "chi2" in r.summary() and "k" in repr(r)


def test_conditions_are_honoured_by_rejection():
    m = ppl.model("""
def model(ys):
    mu ~ normal(0, 1)
    condition mu > 0.5
    observe ys ~ normal(mu, 1)
    return mu
""")
    sims = prior_predictive(m, {"ys": [0.0] * 2}, simulations=50, seed=0)
    assert len(sims) == 50 and all(float(s.latents["mu"]) > 0.5 for s in sims)


def test_mcmc_draws_are_thinned_evenly():
    res = MCMCResult("mh", {"x": Site(torch.arange(100.0)), "return": Site(torch.arange(100.0))}, 2, 50,
                     acceptance_rate=0.5, r_hat={}, ess_per_site={})
    got = posterior_draws(res, ["x"], 10, np.random.default_rng(0))
    assert got["x"].tolist() == list(range(0, 100, 10))
    with pytest.raises(PPLError, match="fewer than the 200") as e:
        posterior_draws(res, ["x"], 200, np.random.default_rng(0))
    assert "samples" in e.value.hint


def test_plot():
    r = sbc(ppl.model(NORMAL), "importance", {"ys": [0.0] * 2}, simulations=20, draws=9, particles=200,
            progress=False)
    fig = r.plot()
    assert len([a for a in fig.axes if a.get_visible()]) == 1
    assert "chi-square p" in fig.axes[0].get_title()
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_plot_without_matplotlib(monkeypatch):
    r = sbc(ppl.model(NORMAL), "importance", {"ys": [0.0] * 2}, simulations=20, draws=9, particles=200,
            progress=False)
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.warns(UserWarning, match="needs matplotlib"):
        assert r.plot() is None


# ------------------------------------------------------------------------- errors
def test_model_without_observes():
    m = ppl.model("def model():\n    x ~ normal(0, 1)\n    factor -x\n    return x\n")
    with pytest.raises(PPLError) as e:
        sbc(m, "importance", simulations=10, draws=4, progress=False)
    assert "factor" in str(e.value)  # a factor is found first: it is not data
    m = ppl.model("def model():\n    x ~ normal(0, 1)\n    condition x > 0\n    return x\n")
    with pytest.raises(PPLError, match="observes nothing") as e:
        sbc(m, "importance", simulations=10, draws=4, progress=False)
    assert "observe" in e.value.hint


def test_unknown_parameter():
    with pytest.raises(PPLError, match="no choice 'mu_'") as e:
        sbc(ppl.model(NORMAL), "importance", {"ys": [0.0]}, parameters=["mu_"], simulations=10, draws=4,
            progress=False)
    assert e.value.hint == "did you mean 'mu'?"


def test_unknown_method():
    with pytest.raises(PPLError, match="unknown inference method") as e:
        sbc(ppl.model(NORMAL), "importanse", {"ys": [0.0]}, simulations=10, draws=4, progress=False)
    assert "importance" in e.value.hint


def test_observed_value_that_is_random():
    m = ppl.model("def model():\n    mu ~ normal(0, 1)\n    observe mu ~ normal(0, 2)\n    return mu\n")
    with pytest.raises(PPLError, match="depends on the model's random choices") as e:
        sbc(m, "importance", simulations=10, draws=4, progress=False)
    assert e.value.hint


def test_observe_the_simulation_did_not_reach():
    m = ppl.model("""
def model(y):
    z ~ bernoulli(0.5)
    mu ~ normal(0, 1)
    if z:
        observe y ~ normal(mu, 1)
    else:
        observe y ~ normal(mu, 2)
    return mu
""")
    with pytest.raises(PPLError, match="has no simulated value") as e:
        sbc(m, "importance", {"y": 0.0}, simulations=10, draws=4, particles=100, progress=False)
    assert "branch" in e.value.hint
