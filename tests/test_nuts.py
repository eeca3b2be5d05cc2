"""method="nuts"/"hmc" on programs (inference/gradient_mcmc.py): posterior moments
against closed forms within Monte Carlo standard errors (MCSE = sd / sqrt(ESS), ESS the
bulk ESS of the draws), Stan's diagnostics reported and warned about, discrete choices
moved by MH in a Gibbs sweep, random structure refused with a located error."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import ppl

Z = 4.5  # tolerance in Monte Carlo standard errors


def _check_moment(result, name, mean, sd, z=Z):
    """The posterior mean within z MCSE of ``mean``, the sd within z of its own MCSE
    (sd / sqrt(2 ESS) for a near-Gaussian marginal)."""
    v = result.samples[name].double()
    ess = result.ess_per_site[name]
    assert abs(float(v.mean()) - mean) < z * sd / math.sqrt(ess), (name, float(v.mean()), mean, ess)
    assert abs(float(v.std()) - sd) < z * sd / math.sqrt(2 * ess), (name, float(v.std()), sd, ess)


NORMAL = """
def normal_mean(ys, sigma):
    mu ~ normal(0, 2)
    for y in ys:
        observe y ~ normal(mu, sigma)
    return mu
"""


def test_conjugate_normal_mean():
    ys = [1.2, 0.4, 2.1, 1.7, 0.9, 1.4, 2.5, 0.2]
    r = ppl.model(NORMAL).run("nuts", {"ys": ys, "sigma": 1.5}, particles=4, samples=500, burn_in=300, seed=1)
    prec = 1 / 4 + len(ys) / 1.5 ** 2
    _check_moment(r, "mu", (sum(ys) / 1.5 ** 2) / prec, prec ** -0.5)
    assert r.extra["traced"] and r.extra["divergences"] == 0 and not r.warnings
    assert r.chains == 4 and r.draws == 500 and min(r.extra["bfmi"]) > 0.3


def test_constrained_site_gamma_poisson():
    src = """
def rates(counts):
    lam ~ gamma(2, 1)
    for c in counts:
        observe c ~ poisson(lam)
"""
    counts = [3, 5, 2, 4, 6, 3]
    r = ppl.model(src).run("nuts", {"counts": counts}, particles=4, samples=500, burn_in=300, seed=2)
    a, b = 2 + sum(counts), 1 + len(counts)
    _check_moment(r, "lam", a / b, math.sqrt(a) / b)
    assert bool((r.samples["lam"] > 0).all())


def test_bayesian_linear_regression_with_known_noise():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 3))
    w = np.array([1.0, -2.0, 0.5])
    y = X @ w + 0.5 * rng.normal(size=30)
    src = """
def blr(X, y, sigma):
    w ~ normal(zeros(3), 1)
    for i in range(len(y)):
        observe y[i] ~ normal(dot(X[i], w), sigma)
"""
    r = ppl.model(src).run("nuts", {"X": X.tolist(), "y": y.tolist(), "sigma": 0.5}, particles=4, samples=400,
                           burn_in=300, seed=3)
    P = np.eye(3) + X.T @ X / 0.25
    cov = np.linalg.inv(P)
    mean = cov @ X.T @ y / 0.25
    v = r.samples["w"].double()
    for k in range(3):
        ess = r.ess_per_site[f"w[{k}]"]
        sd = math.sqrt(cov[k, k])
        assert abs(float(v[:, k].mean()) - mean[k]) < Z * sd / math.sqrt(ess)
        assert abs(float(v[:, k].std()) - sd) < Z * sd / math.sqrt(2 * ess)


def test_correlated_gaussian_with_different_scales():
    """Correlation 0.99 and scales 1 and 10: the adapted diagonal mass handles the
    scales, NUTS's long trajectories the correlation."""
    src = """
def corr():
    x ~ mv_normal([1.0, -3.0], [[1.0, 9.9], [9.9, 100.0]])
"""
    r = ppl.model(src).run("nuts", {}, particles=4, samples=400, burn_in=300, seed=4)
    v = r.samples["x"].double()
    for k, (m, sd) in enumerate([(1.0, 1.0), (-3.0, 10.0)]):
        ess = r.ess_per_site[f"x[{k}]"]
        assert abs(float(v[:, k].mean()) - m) < Z * sd / math.sqrt(ess)
        assert abs(float(v[:, k].std()) - sd) < Z * sd / math.sqrt(2 * ess)
    corr = float(torch.corrcoef(v.T)[0, 1])
    assert abs(corr - 0.99) < 0.01
    assert r.extra["divergences"] == 0


FUNNEL_CENTRED = """
def funnel():
    v ~ normal(0, 3)
    x ~ normal(zeros(9), exp(v / 2))
"""
FUNNEL_NON_CENTRED = """
def funnel():
    v ~ normal(0, 3)
    x_raw ~ normal(zeros(9), 1)
    x = x_raw * exp(v / 2)
    return v
"""


def test_the_centred_funnel_reports_divergences_and_the_non_centred_does_not():
    """16 chains (one batch) so that some reach the funnel's neck within 200 draws; trees
    at most 2^6 steps (the centred chains would take the maximum 2^10 in the neck)."""
    kw = dict(particles=16, samples=200, burn_in=200, max_tree_depth=6, seed=5)
    with pytest.warns(ppl.PPLDiagnosticWarning, match="divergent transition"):
        r = ppl.model(FUNNEL_CENTRED).run("nuts", {}, **kw)
    assert r.extra["divergences"] > 0
    assert any("divergent" in w for w in r.warnings)
    assert "divergences=" in r.summary()
    r = ppl.model(FUNNEL_NON_CENTRED).run("nuts", {}, **kw)
    assert r.extra["divergences"] == 0 and not any("divergent" in w for w in r.warnings)
    _check_moment(r, "v", 0.0, 3.0)


def test_hmc_with_fixed_leapfrog_steps():
    ys = [1.2, 0.4, 2.1, 1.7]
    r = ppl.model(NORMAL).run("hmc", {"ys": ys, "sigma": 1.0}, particles=4, samples=400, burn_in=200, seed=6,
                              num_steps=5)
    prec = 1 / 4 + len(ys)
    _check_moment(r, "mu", sum(ys) / prec, prec ** -0.5)
    assert r.method == "hmc" and r.extra["leapfrog_steps"] == 4 * 400 * 5


def test_discrete_choices_are_moved_by_mh_in_a_gibbs_sweep():
    """z ~ flip(0.3); mu ~ normal(0, 1); y ~ normal(mu + 2 z, 1), y = 1.5: the posterior
    of z and of mu (a two-component mixture) in closed form."""
    src = """
def shift(y):
    z ~ flip(0.3)
    mu ~ normal(0, 1)
    observe y ~ normal(mu + 2 * z, 1)
"""
    r = ppl.model(src).run("nuts", {"y": 1.5}, particles=4, samples=600, burn_in=200, seed=7)
    assert r.extra["traced"]
    # y | z ~ normal(2z, sqrt(2)); mu | z, y ~ normal((y - 2z)/2, sqrt(1/2))
    like = [0.7 * math.exp(-(1.5 - 0) ** 2 / 4), 0.3 * math.exp(-(1.5 - 2) ** 2 / 4)]
    p1 = like[1] / sum(like)
    mean = (1 - p1) * 0.75 + p1 * (-0.25)
    second = (1 - p1) * (0.5 + 0.75 ** 2) + p1 * (0.5 + 0.25 ** 2)
    sd = math.sqrt(second - mean ** 2)
    _check_moment(r, "mu", mean, sd)
    z = r.samples["z"].double()
    ess = r.ess_per_site["z"]
    assert abs(float(z.mean()) - p1) < Z * math.sqrt(p1 * (1 - p1) / ess)


def test_a_continuous_choice_on_a_random_path_is_a_located_error():
    src = """
def m():
    b ~ flip(0.5)
    if b:
        x ~ normal(0, 1)
    else:
        y ~ normal(0, 1)
    observe 1.0 ~ normal(0, 1)
"""
    with pytest.raises(ppl.PPLError, match="only some chains") as e:
        ppl.model(src).run("nuts", {}, particles=16, samples=10, burn_in=10, seed=0)
    assert "mh, tempering or smc" in str(e.value)


def test_cli_json_has_the_sampler_diagnostics(tmp_path):
    f = tmp_path / "m.ppl"
    f.write_text(NORMAL)
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"ys": [1.0, 2.0], "sigma": 1.0}))
    out = subprocess.run([sys.executable, "-m", "ppl", "run", str(f), "--data", str(d), "--method", "nuts",
                          "-n", "2", "--samples", "100", "--burn-in", "100", "--seed", "0", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    j = json.loads(out.stdout)
    for key in ("divergences", "step_size", "bfmi", "tree_depth_mean", "r_hat", "ess_per_site"):
        assert key in j, key
    assert j["chains"] == 2 and j["draws"] == 100


def test_the_json_says_how_the_run_was_executed():
    """``--json`` (``to_json``) carries whether the log density ran as a traced graph,
    compiled, and the NUTS transition compiled, with why not, and the phases' seconds."""
    src = """
def m(y):
    mu ~ normal(0, 5)
    observe y ~ normal(mu, 1)
    return mu
"""
    out = ppl.model(src).run("nuts", {"y": [0.3, 1.2, -0.4]}, particles=2, samples=20, burn_in=20, seed=0).to_json()
    assert out["traced"] is True and out["compiled"] is False and out["transition"] == "eager"
    assert "would cost" in out["why_not_compiled"]
    assert set(out["phase_seconds"]) == {"warmup", "sampling"}
    json.dumps(out)  # (JSON as it is)
