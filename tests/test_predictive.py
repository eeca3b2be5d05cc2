"""Model.predictive: prior and posterior predictive replications of every observed site,
checked against closed forms within Monte Carlo standard errors (fixed seeds), the check's
plot, and the predictive groups of to_arviz."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

import ppl
from ppl.semantics.errors import PPLError

pytestmark = pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning", "ignore::UserWarning",
                                        "ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
CONJUGATE = ppl.model("""
def conjugate(ys):
    mu ~ normal(0, 1)
    for y in ys:
        observe y ~ normal(mu, 1)
    return mu
""")
YS = [0.5, 1.2, -0.3, 2.0]
# posterior of mu: precision 1 + 4 = 5, so variance 1/5 and mean sum(ys)/5
POST_MEAN, POST_VAR = sum(YS) / 5, 1 / 5


def _within(estimate, truth, se, k=4.0):
    assert abs(estimate - truth) < k * se, (estimate, truth, se)


def _check_moments(x: np.ndarray, mean: float, var: float, cov: float | None = None):
    """Means, variances (and one covariance) of the columns of x [n, k] against the
    closed form, each within 4 Monte Carlo standard errors of n independent draws."""
    n = x.shape[0]
    for j in range(x.shape[1]):
        _within(x[:, j].mean(), mean, math.sqrt(var / n))
        _within(x[:, j].var(ddof=1), var, var * math.sqrt(2 / (n - 1)))
    if cov is not None:
        _within(np.cov(x[:, 0], x[:, 1])[0, 1], cov, math.sqrt((var * var + cov * cov) / n))


@pytest.fixture(scope="module")
def exact_posterior():
    # delayed sampling on a conjugate model: every particle's mu is an exact posterior draw
    # (drawn from its conditioned marginal at the end), all weights equal
    return CONJUGATE.run("importance", {"ys": YS}, particles=4000, seed=0, delayed=True)


def test_posterior_predictive_matches_the_closed_form(exact_posterior):
    pred = CONJUGATE.predictive(exact_posterior, seed=1)
    assert pred.kind == "posterior" and pred.names == ["y"]
    y = pred["y"]
    assert y.shape == (4000, 4)
    # y_rep[i] = mu + e_i: mean m, variance v + 1, covariance v between observations
    _check_moments(y.astype(np.float64), POST_MEAN, POST_VAR + 1, POST_VAR)
    np.testing.assert_allclose(pred.observed["y"], YS, rtol=1e-6)
    np.testing.assert_array_equal(pred["obs@5:9[2]"], y[:, 2])


def test_replications_are_drawn_given_each_draws_latent_values(exact_posterior):
    pred = CONJUGATE.predictive(exact_posterior, seed=2)
    noise = pred["y"].astype(np.float64) - pred.latents["mu"][:, None].astype(np.float64)
    _check_moments(noise, 0.0, 1.0, 0.0)  # y_rep - mu ~ normal(0, 1), independent


def test_posterior_predictive_of_weighted_draws_resamples_them():
    r = CONJUGATE.run("importance", {"ys": YS}, particles=20000, seed=3)
    pred = CONJUGATE.predictive(r, n=3000, seed=4)
    assert pred["y"].shape == (3000, 4)
    # the resampled draws are at most r.ess distinct ones: the mean's error is within the
    # standard error of min(n, ESS) draws
    n_eff = min(3000, r.ess)
    _within(pred["y"].mean(), POST_MEAN, math.sqrt((POST_VAR + 1 / 4) / n_eff))


def test_prior_predictive_matches_the_closed_form():
    m = ppl.model("""
def m(ys):
    mu ~ normal(0, 2)
    observe ys ~ normal(mu, 1)
    return mu
""")
    pred = m.predictive(None, {"ys": [9.0, 9.0, 9.0]}, n=4000, seed=0)
    assert pred.kind == "prior" and pred["ys"].shape == (4000, 3)
    _check_moments(pred["ys"].astype(np.float64), 0.0, 5.0, 4.0)  # var 2^2 + 1, cov 2^2
    np.testing.assert_array_equal(pred.observed["ys"], [9.0, 9.0, 9.0])


def test_prior_predictive_rejects_draws_that_fail_a_condition():
    m = ppl.model("""
def m(y):
    x ~ normal(0, 1)
    condition x > 0
    observe y ~ normal(x, 1)
    return x
""")
    pred = m.predictive(None, {"y": 0.0}, n=4000, seed=0)
    y = pred["y"].astype(np.float64)
    assert y.shape == (4000,)
    # x half-normal: E = sqrt(2/pi), Var(y) = 1 + (1 - 2/pi)
    _check_moments(y[:, None], math.sqrt(2 / math.pi), 2 - 2 / math.pi)


def test_factor_is_an_error_for_the_prior_and_ignored_for_the_posterior():
    m = ppl.model("""
def m(y):
    mu ~ normal(0, 1)
    factor -mu * mu
    observe y ~ normal(mu, 1)
    return mu
""")
    with pytest.raises(PPLError, match="factor"):
        m.predictive(None, {"y": 1.0}, n=10)
    r = m.run("importance", {"y": 1.0}, particles=500, seed=0)
    pred = m.predictive(r, n=2000, seed=0)
    noise = pred["y"].astype(np.float64) - pred.latents["mu"].astype(np.float64)
    _check_moments(noise[:, None], 0.0, 1.0)


def test_errors_name_the_problem():
    m = ppl.model("""
def m():
    x ~ normal(0, 1)
    factor -x
    return x
""")
    with pytest.raises(PPLError, match="observes nothing"):
        m.predictive(m.run("importance", {}, particles=10, seed=0), n=5)
    pred = CONJUGATE.predictive(None, {"ys": YS}, n=20)
    with pytest.raises(PPLError, match="unknown statistic"):
        pred.p_value("average")
    with pytest.raises(PPLError, match="no observed variable"):
        pred["ysx"]


def test_to_arviz_puts_replications_in_the_predictive_groups():
    r = CONJUGATE.run("mh", {"ys": YS}, particles=2, samples=50, burn_in=10, seed=0)
    post = CONJUGATE.predictive(r, seed=0)
    prior = CONJUGATE.predictive(None, {"ys": YS}, n=100, seed=0)
    assert (post.chains, post.draws) == (2, 50)
    idata = r.to_arviz(predictive=[post, prior])
    np.testing.assert_array_equal(idata.posterior_predictive["y"].values, post["y"].reshape(2, 50, 4))
    assert idata.prior_predictive["y"].shape == (1, 100, 4)
    np.testing.assert_allclose(idata.observed_data["y"].values, YS, rtol=1e-6)
    np.testing.assert_array_equal(post.latents["mu"], r.sites["mu"].value.numpy())


def test_statistics_and_the_plot():
    pred = CONJUGATE.predictive(None, {"ys": YS}, n=500, seed=0)
    t_rep, t_obs = pred.statistic("sd", "y")
    assert t_obs == pytest.approx(float(np.std(YS)), rel=1e-6)
    np.testing.assert_allclose(t_rep, pred["y"].std(axis=1), rtol=1e-6)
    assert pred.p_value("mean") == pytest.approx(float(np.mean(pred["y"].mean(axis=1) >= np.mean(YS))))
    fig = pred.plot(stat=("mean", "sd", lambda x: x.max(axis=1)))
    assert len(fig.axes) == 3
    lines = fig.axes[0].get_lines()
    assert lines and lines[0].get_xdata()[0] == pytest.approx(float(np.mean(YS)), rel=1e-6)


def test_eight_schools_posterior_predictive_check_figure(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from ppc_eight_schools import check
    finally:
        sys.path.remove(str(ROOT / "examples"))
    result, pred, fig, idata = check(tmp_path, samples=150, burn_in=150)
    assert (tmp_path / "ppc_eight_schools.png").stat().st_size > 10_000
    assert (tmp_path / "ppc_eight_schools_arviz.png").stat().st_size > 10_000
    assert (tmp_path / "trace_eight_schools.png").stat().st_size > 10_000
    y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    assert pred["y"].shape == (600, 8)
    assert [ax.get_lines()[0].get_xdata()[0] for ax in fig.axes] == pytest.approx([y.mean(), y.std(), y.max()])
    assert idata.posterior_predictive["y"].shape == (4, 150, 8)
    # y_rep[j] - theta[j] ~ normal(0, sigma[j]): standardised, mean 0 and variance 1
    z = (pred["y"] - pred.latents["return"]) / np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    _check_moments(z.reshape(-1, 1).astype(np.float64), 0.0, 1.0)
