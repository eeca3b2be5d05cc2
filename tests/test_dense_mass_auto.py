"""``dense_mass="auto"`` for NUTS/HMC (issue 11: on the calendar-year regression, posterior
correlation -0.999995, a diagonal mass matrix sent 42-49% of the draws to the maximum tree
depth): a dense mass matrix for up to ``DENSE_AUTO_MAX_DIM`` unconstrained dimensions,
started from the inverse Hessian at each chain's initial point
(``gradient_mcmc.initial_inverse_mass``: exact for a Gaussian posterior), with the mass
estimates regularised towards it instead of the identity (``adaptation.Welford``). The
default stays the diagonal mass (existing seeded runs are unchanged); the tree-depth warning
suggests "auto"."""
import json
import math
from pathlib import Path

import pytest
import torch

import ppl
from ppl.inference.adaptation import Welford
from ppl.inference.gradient_mcmc import DENSE_AUTO_MAX_DIM, initial_inverse_mass
from ppl.inference.mh import initial_state
from ppl.inference.potential import build_potential
from ppl.semantics.gfi import ModelRun

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
Z = 4.5


def _calendar():
    m = ppl.model(str(ROOT / "examples" / "calendar_regression.ppl"))
    data = json.loads((ROOT / "examples" / "calendar_regression.json").read_text())
    return m, data


def _closed_form(data):
    """The Gaussian posterior's mean and covariance (the data rounded as ppl holds them)."""
    years = torch.tensor(data["years"], dtype=torch.float32).double()
    ys = torch.tensor(data["ys"], dtype=torch.float32).double()
    s2 = float(torch.tensor(data["sigma"], dtype=torch.float32)) ** 2
    X = torch.stack([torch.ones_like(years), years], 1)
    P = torch.diag(torch.tensor([1 / 1000 ** 2, 1 / 10 ** 2], dtype=torch.float64)) + X.T @ X / s2
    cov = torch.linalg.inv(P)
    return cov @ (X.T @ ys / s2), cov


def test_initial_inverse_mass_is_the_posterior_covariance_on_a_gaussian_posterior():
    m, data = _calendar()
    d = m.prepare_data(data, "cpu")
    interp = m.interpreter()
    with ppl.api.seeded(0):
        state = initial_state(interp, m.entry, d, 3)
        p = build_potential(ModelRun(interp, m.entry, d), state)
    z = torch.tensor([[0.5, -1.0], [1.5, 0.2], [-2.0, 1.9]], dtype=torch.float64)
    inv = initial_inverse_mass(p, z)
    _, cov = _closed_form(data)
    sd = cov.diagonal().sqrt()
    for c in range(3):
        got_sd = inv[c].diagonal().sqrt()
        assert torch.allclose(got_sd, sd, rtol=1e-4), (got_sd, sd)
        corr = inv[c, 0, 1] / (got_sd[0] * got_sd[1])
        assert abs(float(corr) - float(cov[0, 1] / (sd[0] * sd[1]))) < 1e-8


def test_nuts_with_dense_mass_auto_gets_the_calendar_regression_right_without_deep_trees():
    m, data = _calendar()
    r = m.run("nuts", data, chains=4, samples=200, burn_in=150, seed=0, dense_mass="auto")
    assert r.extra["dense_mass"] is True
    assert r.extra["hit_max_tree_depth"] == 0.0 and r.extra["tree_depth_mean"] < 4
    assert not r.warnings
    mean, cov = _closed_form(data)
    for k, name in enumerate(("intercept", "slope")):
        v = r.samples[name].double()
        sd = math.sqrt(float(cov[k, k]))
        ess = r.ess_per_site[name]
        assert ess > 200
        assert abs(float(v.mean()) - float(mean[k])) < Z * sd / math.sqrt(ess), (name, float(v.mean()), float(mean[k]))
        assert abs(float(v.std()) - sd) < Z * sd / math.sqrt(2 * ess), (name, float(v.std()), sd)


def test_dense_mass_auto_is_diagonal_above_the_dimension_limit():
    src = f"def m():\n    x ~ normal(zeros({DENSE_AUTO_MAX_DIM + 1}), 1)\n    return x\n"
    r = ppl.model(src).run("nuts", {}, chains=2, samples=20, burn_in=30, seed=0, dense_mass="auto")
    assert r.extra["dense_mass"] is False
    small = ppl.model(src.replace(str(DENSE_AUTO_MAX_DIM + 1), "2")).run(
        "nuts", {}, chains=2, samples=20, burn_in=30, seed=0, dense_mass="auto")
    assert small.extra["dense_mass"] is True


def test_dense_mass_option_values():
    m = ppl.model("def m():\n    x ~ normal(0, 1)\n    return x\n")
    with pytest.raises(ppl.PPLError) as e:
        m.run("nuts", {}, chains=2, samples=10, burn_in=10, dense_mass="sometimes")
    assert "dense_mass" in str(e.value)
    assert m.run("nuts", {}, chains=2, samples=10, burn_in=10, seed=0, dense_mass="false").extra["dense_mass"] is False


def test_welford_shrinks_towards_the_initial_metric():
    """Stan's rule without a target (identity), and the same rule scaled by the target."""
    z = torch.tensor([[[1.0, 2.0]], [[3.0, 1.0]], [[2.0, 4.0]]], dtype=torch.float64)  # 3 draws, 1 chain
    plain, scaled = Welford(1, 2, dense=True), Welford(1, 2, dense=True,
                                                      shrink_towards=torch.diag(torch.tensor([4.0, 1e-6]))[None])
    for w in (plain, scaled):
        for zi in z:
            w.update(zi)
    var = torch.cov(z[:, 0, :].T)
    shrink = 1e-3 * 5 / 8
    assert torch.allclose(plain.inverse_mass()[0], 3 / 8 * var + shrink * torch.eye(2, dtype=torch.float64))
    assert torch.allclose(scaled.inverse_mass()[0],
                          3 / 8 * var + shrink * torch.diag(torch.tensor([4.0, 1e-6], dtype=torch.float64)))
