"""``Model.to_pyro()``: a DSL model as a Pyro model function (``ppl/pyro_interop.py``).

Checks: the Pyro function has the DSL's sites and addresses, and its log joint equals
``Model.log_joint`` on the same values, on models with continuous and discrete choices,
conditions, factors and a random number of choices (traces drawn by Pyro itself, several
seeds, to float32 rounding); Pyro's NUTS on it agrees with the closed-form posterior of
Bayesian linear regression and with ppl's own SMC on it (within 4.5 Monte Carlo standard
errors, MCSE = sd / sqrt(ESS), ESS from ``pyro.ops.stats`` for NUTS and the weights'
ESS for SMC); Predictive draws prior samples; SVI with an AutoNormal guide finds the
Normal-mean posterior.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.ops.stats import effective_sample_size

import ppl

torch.set_num_threads(1)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
Z = 4.5


def load(name):
    return ppl.model((EXAMPLES / f"{name}.ppl").read_text()), json.loads((EXAMPLES / f"{name}.json").read_text())


EXTRA = {
    "branching": ("""
def m(y):
    a ~ flip(0.4)
    if a:
        x ~ normal(0, 1)
    else:
        x ~ gamma(2, 2)
        k ~ poisson(x)
        factor -0.1 * k
    condition x > -1.5
    observe y ~ normal(x, 1)
    return x
""", {"y": 0.3}),
    "geometric": ("""
def geometric(p):
    b ~ flip(p)
    return 0 if b else 1 + geometric(p)

def m(p):
    n = geometric(p)
    observe n ~ poisson(2.0)
    return n
""", {"p": 0.4}),
}


@pytest.mark.parametrize("name", ["linear_regression", "gaussian_mean", "coin", "mixture", "branching", "geometric"])
def test_log_joint_equals_ppl(name):
    if name in EXTRA:
        src, data = EXTRA[name]
        model = ppl.model(src)
    else:
        model, data = load(name)
    f = model.to_pyro()
    for seed in range(5):
        pyro.set_rng_seed(seed)
        tr = poutine.trace(f).get_trace(**data)
        latent = {k: v["value"] for k, v in tr.nodes.items()
                  if v.get("type") == "sample" and not v["is_observed"]}
        assert latent, "the Pyro model has the DSL's choices as sample sites"
        pyro_lp = float(tr.log_prob_sum())
        ppl_lp = float(model.log_joint(latent, **data))
        if math.isinf(ppl_lp):
            assert pyro_lp == ppl_lp
        else:
            assert pyro_lp == pytest.approx(ppl_lp, rel=1e-5, abs=1e-4), (seed, latent)


def test_addresses_are_the_dsl_addresses():
    model, data = load("mixture")
    tr = poutine.trace(model.to_pyro()).get_trace(**data)
    names = [k for k, v in tr.nodes.items() if v.get("type") == "sample" and not v["is_observed"]]
    assert names[:3] == ["mu1", "mu2", "z[0]"]
    observed = [k for k, v in tr.nodes.items() if v.get("type") == "sample" and v["is_observed"]]
    assert observed[0].startswith("cond@") and any(k.startswith("obs@") for k in observed)
    res = model.run("importance", data, particles=10, seed=0)
    assert set(res.sites) - {"return"} <= set(names)


def regression_posterior(xs, ys, sigma, prior_sd=2.0):
    X = np.stack([np.ones(len(xs)), np.asarray(xs)], 1)
    prec = X.T @ X / sigma ** 2 + np.eye(2) / prior_sd ** 2
    cov = np.linalg.inv(prec)
    return cov @ X.T @ np.asarray(ys) / sigma ** 2, np.sqrt(np.diag(cov))


def test_nuts_on_the_dsl_model_matches_the_closed_form_and_smc():
    model, data = load("linear_regression")
    mean, sd = regression_posterior(data["xs"], data["ys"], data["sigma"])
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model.to_pyro()), num_samples=300, warmup_steps=150, num_chains=1, disable_progbar=True)
    mcmc.run(**data)
    draws = mcmc.get_samples()
    for k, name in enumerate(["w0", "w1"]):
        x = draws[name].double()
        ess = float(effective_sample_size(x.reshape(1, -1), chain_dim=0, sample_dim=1))
        assert ess > 50
        assert abs(float(x.mean()) - mean[k]) < Z * sd[k] / math.sqrt(ess), name
    smc = model.run("smc", data, particles=20_000, seed=0)
    for k, name in enumerate(["w0", "w1"]):
        se = sd[k] / math.sqrt(smc.ess) + float(draws[name].std()) / math.sqrt(50)
        assert abs(smc.mean(name) - float(draws[name].mean())) < Z * se


def test_predictive_draws_from_the_prior():
    model, data = load("gaussian_mean")
    pred = Predictive(model.to_pyro(), num_samples=4000)
    pyro.set_rng_seed(1)
    s = pred(**{**data, "ys": data["ys"][:2]})
    mu = s["mu"].double()
    assert mu.shape == (4000,)
    assert abs(float(mu.mean())) < Z * 5 / math.sqrt(4000)        # prior normal(0, 5)
    assert abs(float(mu.std()) - 5) < Z * 5 / math.sqrt(2 * 4000)


def test_svi_with_an_autoguide_finds_the_posterior():
    model, data = load("gaussian_mean")
    ys, sigma = np.asarray(data["ys"]), data["sigma"]
    prec = 1 / 25 + len(ys) / sigma ** 2
    mean, sd = ys.sum() / sigma ** 2 / prec, prec ** -0.5
    f = model.to_pyro()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(f)
    svi = SVI(f, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(600):
        svi.step(**data)
    loc = float(pyro.param("AutoNormal.locs.mu").detach())
    scale = float(pyro.param("AutoNormal.scales.mu").detach())
    # a stochastic optimiser: its last iterate wanders by about lr-sized steps around the optimum
    assert abs(loc - mean) < 0.2 * sd + 0.05
    assert abs(scale - sd) < 0.3 * sd


def test_unsupported_choices_are_clear_errors():
    m = ppl.model("def m():\n    x ~ uniform_draw(['a', 'b'])\n    return x\n")
    with pytest.raises(ppl.PPLError, match="no Pyro counterpart"):
        poutine.trace(m.to_pyro()).get_trace()
