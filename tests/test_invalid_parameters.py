"""A distribution parameter invalid at SOME particles only (issue 11's leftover, a trust
bug): those particles have density zero (weight zero) and the run warns once, naming the
site, the parameter and the count (``semantics.invalid_parameters``); a parameter invalid
at every particle, or a constant, stays the located error it was.

The truncated model ``s ~ uniform(0, 1); observe y ~ normal(0, s - 0.5)`` has half of its
prior draws invalid; its posterior is the one of s restricted to (0.5, 1), checked against
numerical integration (scipy.integrate.quad) within 4.5 Monte Carlo standard errors, and a
discrete analogue against its exact posterior and evidence."""
import math
import re
import warnings

import pytest
import torch
from scipy import integrate, stats

import ppl

torch.set_num_threads(1)

Y = 0.3
TRUNCATED = """
def m(y):
    s ~ uniform(0, 1)
    observe y ~ normal(0, s - 0.5)
    return s
"""


def _truncated_posterior():
    """(E[s | y], sd[s | y], log Z) of the truncated model, by quadrature."""
    density = (lambda s: stats.norm.pdf(Y, 0, s - 0.5))
    z = integrate.quad(density, 0.5, 1, limit=200)[0]
    mean = integrate.quad(lambda s: s * density(s), 0.5, 1, limit=200)[0] / z
    second = integrate.quad(lambda s: s * s * density(s), 0.5, 1, limit=200)[0] / z
    return mean, math.sqrt(second - mean * mean), math.log(z)


def _run(src, method, data, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ppl.model(src).run(method, data, **options)


@pytest.mark.parametrize("method", ["importance", "smc"])
def test_particles_with_an_invalid_scale_get_weight_zero_and_one_warning(method):
    r = _run(TRUNCATED, method, {"y": Y}, particles=4000, seed=0)
    mean, sd, log_z = _truncated_posterior()
    s = r.samples["s"]
    assert bool((r.weights[s <= 0.5] == 0).all())  # the invalid particles have weight zero
    se = sd / math.sqrt(r.ess)
    assert abs(r.mean("s") - mean) < 4.5 * se, (r.mean("s"), mean, se)
    mine = [w for w in r.warnings if "must be positive" in w]
    assert len(mine) == 1, r.warnings
    found = re.match(r"<model>:4:5: normal: parameter 'scale' must be positive at (\d+) of 4000 particles", mine[0])
    assert found, mine[0]
    if method == "importance":  # (SMC's population is resampled after the observe)
        assert int(found.group(1)) == int((s <= 0.5).sum())
    assert abs(int(found.group(1)) - 2000) < 4.5 * math.sqrt(4000 * 0.25)  # binomial(4000, 1/2)
    # log Z: the unbiased importance estimate of Z, relative error sd(w)/(mean(w) sqrt(N))
    if method == "importance":
        w = torch.exp(r.log_weights.double())
        rel_se = float(w.std() / w.mean()) / math.sqrt(4000)
        assert abs(math.exp(r.log_evidence - log_z) - 1) < 4.5 * rel_se


DISCRETE = """
def m(y):
    k ~ categorical([0.25, 0.25, 0.25, 0.25])
    observe y ~ normal(0, k - 1.5)
    return k
"""


def test_a_discrete_analogue_matches_the_truncated_model_exactly():
    """k uniform on {0, 1, 2, 3}: k = 0, 1 give a negative scale (density zero); the
    posterior is P(k) ∝ N(y; 0, k - 1.5) on {2, 3}, and Z = (N(y; 0, .5) + N(y; 0, 1.5)) / 4."""
    r = _run(DISCRETE, "importance", {"y": Y}, particles=4000, seed=1)
    w2, w3 = stats.norm.pdf(Y, 0, 0.5), stats.norm.pdf(Y, 0, 1.5)
    p2 = w2 / (w2 + w3)
    k = r.samples["k"]
    assert float(r.weights[k < 2].sum()) == 0.0
    got = float(r.weights[k == 2].sum())
    se = math.sqrt(p2 * (1 - p2) / r.ess)
    assert abs(got - p2) < 4.5 * se, (got, p2, se)
    w = torch.exp(r.log_weights.double())
    rel_se = float(w.std() / w.mean()) / math.sqrt(4000)
    assert abs(math.exp(r.log_evidence) / ((w2 + w3) / 4) - 1) < 4.5 * rel_se
    assert any("at <model>" not in x and x.startswith("<model>:4:5: normal: parameter 'scale'") for x in r.warnings)


@pytest.mark.parametrize("method,options", [("importance", {"particles": 100}), ("smc", {"particles": 100}),
                                            ("tempering", {"particles": 50}), ("mh", {"samples": 20, "burn_in": 5})])
def test_a_parameter_invalid_at_every_particle_stays_a_located_error(method, options):
    src = TRUNCATED.replace("uniform(0, 1)", "uniform(0, 0.5)")
    with pytest.raises(ppl.PPLError, match="must be positive") as e:
        _run(src, method, {"y": Y}, seed=0, **options)
    assert "<model>:4:5" in str(e.value)


def test_a_constant_invalid_parameter_stays_a_located_error():
    src = TRUNCATED.replace("normal(0, s - 0.5)", "normal(s, -1)")
    for method in ("importance", "smc"):
        with pytest.raises(ppl.PPLError, match="must be positive") as e:
            _run(src, method, {"y": Y}, particles=100, seed=0)
        assert "<model>:4:5" in str(e.value)


def test_invalid_at_the_live_particles_after_a_condition_stays_an_error():
    """Particles a condition killed never raise; if every live one is invalid, the error stands."""
    src = """
def m(y):
    s ~ uniform(0, 1)
    condition s < 0.5
    observe y ~ normal(0, s - 0.5)
    return s
"""
    with pytest.raises(ppl.PPLError, match="must be positive"):
        _run(src, "importance", {"y": Y}, particles=100, seed=0)


def test_mh_rejects_the_invalid_points():
    """MH starts its chains where the density is positive and rejects proposals into the
    invalid region (density zero): its draws stay above 0.5 and match the truncated
    posterior's mean within a generous MCMC tolerance (effective sample size from the result)."""
    r = _run(TRUNCATED, "mh", {"y": Y}, samples=1500, burn_in=300, chains=4, kernel="rw", seed=2)
    assert bool((r.samples["s"] > 0.5).all())
    mean, sd, _ = _truncated_posterior()
    assert abs(r.mean("s") - mean) < 4.5 * sd / math.sqrt(r.ess)
