"""result.to_arviz(): the posterior round-trips, az.summary agrees with result.summary(),
the pointwise log-likelihood is the model's (az.loo/az.waic/az.compare run on it), NUTS's
per-draw statistics, weighted results resampled with a seeded generator, ArviZ's plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ppl
from ppl.result import Site, WeightedResult
from ppl.results.draws import posterior_draws
from ppl.semantics.errors import PPLError

az = pytest.importorskip("arviz")
pytestmark = pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning", "ignore::UserWarning")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REGRESSION = ppl.model(str(EXAMPLES / "linear_regression.ppl"))
REGRESSION_DATA = json.loads((EXAMPLES / "linear_regression.json").read_text())
INTERCEPT_ONLY = ppl.model("""
def intercept_only(xs, ys, sigma):
    w0 ~ normal(0, 2)
    for y in ys:
        observe y ~ normal(w0, sigma)
    return w0
""")


@pytest.fixture(scope="module")
def nuts_regression():
    return REGRESSION.run("nuts", REGRESSION_DATA, particles=4, samples=200, burn_in=150, seed=2)


def _normal_logpdf(x, mean, sd):
    return -0.5 * math.log(2 * math.pi) - math.log(sd) - 0.5 * ((x - mean) / sd) ** 2


def test_nuts_posterior_round_trips_with_chain_and_draw(nuts_regression):
    r = nuts_regression
    idata = r.to_arviz()
    assert set(idata.groups()) >= {"posterior", "sample_stats", "log_likelihood", "observed_data"}
    assert dict(idata.posterior.sizes)["chain"] == 4 and dict(idata.posterior.sizes)["draw"] == 200
    for name in ("w0", "w1", "return"):
        expected = r.sites[name].value.numpy().reshape(4, 200)  # chain-major rows
        np.testing.assert_array_equal(idata.posterior[name].values, expected)


def test_nuts_sample_stats_are_the_per_draw_statistics(nuts_regression):
    r = nuts_regression
    stats = r.to_arviz().sample_stats
    for name in ("lp", "diverging", "acceptance_rate", "tree_depth", "n_steps", "energy", "step_size"):
        assert stats[name].shape == (4, 200), name
    assert int(stats["diverging"].sum()) == r.extra["divergences"]
    assert float(stats["tree_depth"].mean()) == pytest.approx(r.extra["tree_depth_mean"], rel=1e-12)
    assert float(stats["acceptance_rate"].mean()) == pytest.approx(r.acceptance_rate, rel=1e-12)
    assert int(stats["n_steps"].sum()) == r.extra["leapfrog_steps"]
    np.testing.assert_allclose(stats["step_size"].values[:, 0], r.extra["step_size"])
    assert stats.attrs["acceptance_rate"] == pytest.approx(r.acceptance_rate)


def test_az_summary_agrees_with_result_summary(nuts_regression):
    """Means equal; ArviZ's sd divides by n - 1 (ours by n); ArviZ's split R-hat
    (method="split") is ours exactly; its default R-hat is rank-normalised and the larger of
    the bulk and folded ones (Vehtari et al. 2021), and its bulk ESS is rank-normalised on
    split chains, where ours (pyro's) is Geyer's on whole chains: close, not equal."""
    r = nuts_regression
    idata = r.to_arviz()
    table = az.summary(idata, var_names=["w0", "w1"], round_to="none")
    n = r.n
    for name in ("w0", "w1"):
        assert table.loc[name, "mean"] == pytest.approx(r.mean(name), rel=1e-12, abs=1e-12)
        assert table.loc[name, "sd"] == pytest.approx(r.sd(name) * math.sqrt(n / (n - 1)), rel=1e-9)
        split = float(az.rhat(idata, var_names=[name], method="split")[name])
        assert split == pytest.approx(r.r_hat[name], abs=1e-9)
        assert abs(table.loc[name, "r_hat"] - r.r_hat[name]) < 0.03
        assert table.loc[name, "ess_bulk"] == pytest.approx(r.ess_per_site[name], rel=0.10)


def test_pointwise_log_likelihood_is_the_normal_density_and_loo_runs(nuts_regression):
    r = nuts_regression
    idata = r.to_arviz()
    ll = idata.log_likelihood["y"].values
    assert ll.shape == (4, 200, 20)
    xs, ys, sigma = REGRESSION_DATA["xs"], REGRESSION_DATA["ys"], REGRESSION_DATA["sigma"]
    c, d = 2, 117
    w0, w1 = float(idata.posterior["w0"][c, d]), float(idata.posterior["w1"][c, d])
    hand = [_normal_logpdf(y, w0 + w1 * x, sigma) for x, y in zip(xs, ys)]
    np.testing.assert_allclose(ll[c, d], hand, rtol=1e-5, atol=1e-5)
    prior = _normal_logpdf(w0, 0, 2) + _normal_logpdf(w1, 0, 2)
    assert float(idata.sample_stats["lp"][c, d]) == pytest.approx(prior + sum(hand), abs=1e-4)
    np.testing.assert_allclose(idata.observed_data["y"].values, ys, rtol=1e-6)
    loo = az.loo(idata, pointwise=True)
    assert loo.n_data_points == 20 and np.isfinite(loo.elpd_loo)
    assert loo.elpd_loo < float(np.log(np.exp(ll).mean(axis=(0, 1))).sum())  # elpd_loo below lppd
    assert np.isfinite(az.waic(idata).elpd_waic)


def test_az_compare_prefers_the_regression_to_an_intercept_only_model(nuts_regression):
    other = INTERCEPT_ONLY.run("importance", REGRESSION_DATA, particles=4000, seed=0)
    table = az.compare({"regression": nuts_regression.to_arviz(), "intercept": other.to_arviz()})
    assert list(table.index) == ["regression", "intercept"]
    assert table.loc["intercept", "elpd_diff"] > 2 * table.loc["intercept", "dse"]  # (26.9 vs se 9.3)


def test_vector_observe_is_pointwise_per_element():
    es = ppl.model(str(EXAMPLES / "eight_schools.ppl"))
    data = json.loads((EXAMPLES / "eight_schools.json").read_text())
    r = es.run("importance", data, particles=500, seed=0)
    idata = r.to_arviz(draws=50)
    ll = idata.log_likelihood["y"].values
    assert ll.shape == (1, 50, 8)
    post = idata.posterior
    assert post["theta_tilde"].shape == (1, 50, 8)
    d = 7
    theta = float(post["mu"][0, d]) + float(post["tau"][0, d]) * post["theta_tilde"].values[0, d]
    hand = [_normal_logpdf(y, t, s) for y, t, s in zip(data["y"], theta, data["sigma"])]
    np.testing.assert_allclose(ll[0, d], hand, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(idata.observed_data["y"].values, data["y"])


def test_weighted_result_is_resampled_by_weight_with_a_seeded_generator():
    r = REGRESSION.run("importance", REGRESSION_DATA, particles=3000, seed=1)
    idata = r.to_arviz(draws=400, seed=5)
    again = r.to_arviz(draws=400, seed=5)
    np.testing.assert_array_equal(idata.posterior["w0"].values, again.posterior["w0"].values)
    d = posterior_draws(r, 400, 5)
    assert d.chains == 1 and d.draws == 400
    np.testing.assert_array_equal(idata.posterior["w1"].values[0], r.sites["w1"].value.numpy()[d.index])
    expected = np.random.default_rng(5).choice(r.n, size=400, p=(r.weights / r.weights.sum()).numpy())
    np.testing.assert_array_equal(d.index, expected)
    assert "resampled" in idata.posterior.attrs["draws"]
    assert idata.sample_stats.attrs["log_evidence"] == pytest.approx(r.log_evidence)


def test_equal_weights_are_taken_as_they_are():
    m = ppl.model("""
def m(ys):
    mu ~ normal(0, 1)
    for y in ys:
        observe y ~ normal(mu, 1)
    return mu
""")
    r = m.run("importance", {"ys": [0.5, 1.2]}, particles=300, seed=0, delayed=True)  # exact draws, equal weights
    idata = r.to_arviz()
    np.testing.assert_array_equal(idata.posterior["mu"].values[0], r.sites["mu"].value.numpy())


def test_mh_layout_and_acceptance():
    r = REGRESSION.run("mh", REGRESSION_DATA, particles=2, samples=60, burn_in=20, seed=0)
    idata = r.to_arviz()
    assert idata.posterior["w0"].shape == (2, 60)
    np.testing.assert_array_equal(idata.posterior["w0"].values.reshape(-1), r.sites["w0"].value.numpy())
    assert idata.sample_stats.attrs["acceptance_rate"] == pytest.approx(r.acceptance_rate)
    assert "diverging" not in idata.sample_stats


def test_exact_result_draws_paths_by_probability():
    m = ppl.model("""
def m(obs):
    a ~ flip(0.5)
    b ~ flip(0.3)
    observe obs ~ bernoulli(0.9 if a or b else 0.1)
    return a
""")
    r = m.run("enumerate", {"obs": 1})
    idata = r.to_arviz(draws=4000, seed=0)
    p = float(r.mean("a"))
    assert abs(float(idata.posterior["a"].mean()) - p) < 4 * math.sqrt(p * (1 - p) / 4000)
    assert idata.log_likelihood["obs"].shape == (1, 4000)
    a = idata.posterior["a"].values[0].astype(bool)
    b = idata.posterior["b"].values[0].astype(bool)
    expected = np.where(a | b, math.log(0.9), math.log(0.1))
    np.testing.assert_allclose(idata.log_likelihood["obs"].values[0], expected, rtol=1e-6)


def test_loop_choices_become_one_variable_and_absent_sites_are_nan():
    m = ppl.model("""
def m(ys):
    for i in range(3):
        z ~ normal(0, 1)
    c ~ flip(0.5)
    if c:
        extra ~ normal(0, 1)
    for y in ys:
        observe y ~ normal(z, 1)
    return c
""")
    r = m.run("importance", {"ys": [0.1, 0.2]}, particles=200, seed=0)
    idata = r.to_arviz(draws=100)
    post = idata.posterior
    assert post["z"].shape == (1, 100, 3)
    np.testing.assert_array_equal(post["z"].values[0, :, 1], post["z[1]"].values[0])
    has = post["c"].values[0].astype(bool)
    assert np.isnan(post["extra"].values[0][~has]).all() and not np.isnan(post["extra"].values[0][has]).any()


def test_a_result_without_its_model():
    r = WeightedResult("custom", {"x": Site(torch.tensor([1.0, 2.0, 3.0]))}, torch.zeros(3))
    idata = r.to_arviz()
    assert list(idata.groups()) == ["posterior"]
    with pytest.raises(PPLError, match="needs the model"):
        r.to_arviz(log_likelihood=True)


def test_best_of_n_has_no_posterior():
    m = ppl.model("""
def m():
    x ~ normal(0, 1)
    factor -x * x
    return x
""")
    r = m.run("best_of_n", {}, particles=10, seed=0)
    with pytest.raises(PPLError, match="not a posterior"):
        r.to_arviz()


def test_trace_rank_and_pair_plots(nuts_regression):
    import matplotlib.pyplot as plt
    for plot in (nuts_regression.plot_trace, nuts_regression.plot_rank):
        fig = plot()
        assert len(fig.axes) >= 3  # return, w0, w1
        plt.close(fig)
    fig = nuts_regression.plot_pair(var_names=["w0", "w1"])
    assert len(fig.axes) == 1
    plt.close(fig)


def test_smc_population_and_sites_the_run_did_not_keep(monkeypatch):
    lgssm = ppl.model(str(EXAMPLES / "lgssm.ppl"))
    data = json.loads((EXAMPLES / "lgssm.json").read_text())
    r = lgssm.run("smc", data, particles=200, seed=0)
    idata = r.to_arviz()
    assert idata.posterior["x[5]"].shape == (1, 200) and idata.log_likelihood["y"].shape == (1, 200, 100)
    assert "equal weights" in idata.posterior.attrs["draws"]  # resampled at the last observe
    kept = lgssm.run("smc", data, particles=200, seed=0, keep=["return", "x[99]"])
    with pytest.warns(ppl.PPLDiagnosticWarning, match="no value for the choice"):
        idata = kept.to_arviz()
    assert list(idata.groups()) == ["posterior"]
    with pytest.raises(PPLError, match="no value for the choice"):
        kept.to_arviz(log_likelihood=True)
    from ppl.semantics import trace
    monkeypatch.setattr(trace, "KEEP_ALL_LIMIT", 1000)  # a long run: the "auto" rule drops old states
    dropped = lgssm.run("smc", data, particles=200, seed=0)
    assert dropped.extra.get("dropped_sites")
    with pytest.warns(ppl.PPLDiagnosticWarning, match="did not keep"):
        assert "log_likelihood" not in dropped.to_arviz().groups()


def test_observed_variables_are_named_after_what_they_observe():
    m = ppl.model("""
def obs(y, mu):
    observe y ~ normal(mu, 1)

def m(ys, zs):
    mu ~ normal(0, 1)
    for i in range(len(ys)):
        observe ys[i] ~ normal(mu, 1)
    for z in zs:
        obs(z, mu)
    observe zs ~ normal(mu, 2)
    return mu
""")
    r = m.run("importance", {"ys": [1.0, 2.0], "zs": [0.5, 0.7, 0.9]}, particles=200, seed=0)
    idata = r.to_arviz(draws=10)
    shapes = {k: v.shape for k, v in idata.log_likelihood.data_vars.items()}
    assert shapes == {"ys": (1, 10, 2), "obs/y": (1, 10, 3), "zs": (1, 10, 3)}
    np.testing.assert_allclose(idata.observed_data["obs/y"].values, [0.5, 0.7, 0.9], rtol=1e-6)
    mu = idata.posterior["mu"].values[0]
    np.testing.assert_allclose(idata.log_likelihood["zs"].values[0, :, 1],
                               [_normal_logpdf(0.7, u, 2) for u in mu], rtol=1e-5)
    with pytest.raises(Exception, match="several log likelihood arrays|var_name"):
        az.loo(idata)  # ArviZ's rule with several observed variables: name one
    assert np.isfinite(az.loo(idata, var_name="zs").elpd_loo)
