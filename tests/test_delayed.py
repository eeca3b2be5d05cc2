"""Delayed sampling / automatic conjugacy under importance and SMC (issue 12, item 4 and
its part of item 7): ``delayed=True`` marginalises conjugate choices, so a
linear-Gaussian state-space model under SMC with one particle is the Kalman filter, and
conjugate models give their exact evidence with one particle."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from scipy.special import betaln, gammaln

import ppl
from ppl.inference import delayed as delayed_mod
from ppl.inference.delayed import delayed_smc
from ppl.semantics import delayed as nodes
from ppl.testing.strategies import conjugate_programs, finite_programs
from ppl.testing.validity import check_proper, checkable

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

EPS_FORM = """
def lgssm(ys, a, q, r, x0_sd):
    x ~ normal(0, x0_sd)
    for y in ys:
        eps ~ normal(0, q)
        x = a * x + eps
        observe y ~ normal(x, r)
    return x
"""

CHAIN_FORM = """
def lgssm(ys, a, q, r, x0_sd):
    x0 ~ normal(0, x0_sd)
    x = x0
    for t in range(len(ys)):
        x ~ normal(a * x + 0.1, q)
        observe ys[t] ~ normal(2 * x - 0.3, r)
    return x
"""


def kalman(ys, a, q, r, x0_sd, b=0.0, c=1.0, d=0.0):
    """Hand-written Kalman filter for x_t = a x_{t-1} + b + N(0, q^2), y_t = c x_t + d + N(0, r^2):
    (log evidence, filtering means, filtering variances)."""
    m, v, ll, means, variances = 0.0, x0_sd ** 2, 0.0, [], []
    for y in ys:
        m, v = a * m + b, a * a * v + q * q
        s = c * c * v + r * r
        ll += -0.5 * (math.log(2 * math.pi * s) + (y - c * m - d) ** 2 / s)
        k = v * c / s
        m, v = m + k * (y - c * m - d), v * r * r / s
        means.append(m)
        variances.append(v)
    return ll, means, variances


def _data(T=25):
    data = json.loads((EXAMPLES / "state_space.json").read_text())
    data["ys"] = torch.tensor(data["ys"][:T], dtype=torch.float32).double().tolist()  # the values ppl reads
    return data


@pytest.mark.parametrize("source, affine", [(EPS_FORM, {}), (CHAIN_FORM, {"b": 0.1, "c": 2.0, "d": -0.3})])
def test_lgssm_smc_with_one_particle_is_the_kalman_filter(source, affine):
    data = _data()
    model = ppl.model(source)
    want_ll, want_means, want_vars = kalman(data["ys"], data["a"], data["q"], data["r"], data["x0_sd"], **affine)
    res = model.run("smc", data, particles=1, delayed=True, seed=1)
    assert abs(res.log_evidence - want_ll) < 1e-6
    # the filtering mean and variance at every t: the return value's marginal on each prefix
    for t in (1, 2, 10, 25):
        pop = model.run("smc", {**data, "ys": data["ys"][:t]}, particles=1, delayed=True, seed=t)
        got = pop.extra["delayed"]
        assert abs(float(got["return_mean"][0]) - want_means[t - 1]) < 1e-6
        assert abs(float(got["return_var"][0]) - want_vars[t - 1]) < 1e-6
        assert abs(pop.log_evidence - kalman(data["ys"][:t], data["a"], data["q"], data["r"], data["x0_sd"],
                                             **affine)[0]) < 1e-6


def test_lgssm_without_delay_is_unchanged_and_far_worse_at_one_particle():
    data = _data()
    model = ppl.model(EPS_FORM)
    plain = model.run("smc", data, particles=1, seed=1)
    assert abs(plain.log_evidence - kalman(data["ys"], data["a"], data["q"], data["r"], data["x0_sd"])[0]) > 1e-3
    assert "delayed" not in plain.extra


def test_importance_with_many_particles_has_equal_weights_and_filtering_draws():
    """Likelihood weighting with delay: every particle's weight is the exact evidence and
    the returned x_T are draws from the filtering distribution (mean within 4 MCSE)."""
    data = _data()
    want_ll, means, variances = kalman(data["ys"], data["a"], data["q"], data["r"], data["x0_sd"])
    res = ppl.model(EPS_FORM).run("importance", data, particles=4000, delayed=True, seed=3)
    assert torch.allclose(res.log_weights, torch.full_like(res.log_weights, want_ll), atol=1e-6)
    mcse = math.sqrt(variances[-1] / 4000)
    assert abs(res.mean("return") - means[-1]) < 4 * mcse
    assert abs(res.sd("return") / math.sqrt(variances[-1]) - 1) < 4 / math.sqrt(2 * 4000)  # (sd of a normal sd)


def test_every_choice_of_the_eps_form_is_an_exact_smoothing_draw():
    """At the end of a run every node is realised backwards (each state conditioned on
    the next), and each absorbed eps is read through its alias (x_t - a x_{t-1}): with
    every weight equal to the evidence, the draws of (x0, eps_1..T) are exact joint
    posterior draws: their means match Gaussian conditioning within 4.5 MCSE."""
    import numpy as np
    data = _data(T=6)
    ys, a, q, r, x0_sd = data["ys"], data["a"], data["q"], data["r"], data["x0_sd"]
    T = len(ys)
    A = np.zeros((T, T + 1))  # x_t = a^t x0 + sum_{s<=t} a^(t-s) eps_s
    for t in range(1, T + 1):
        A[t - 1, 0] = a ** t
        for s_ in range(1, t + 1):
            A[t - 1, s_] = a ** (t - s_)
    prior = np.diag([x0_sd ** 2] + [q ** 2] * T)
    gain = prior @ A.T @ np.linalg.inv(A @ prior @ A.T + r ** 2 * np.eye(T))
    mean, cov = gain @ np.asarray(ys), prior - gain @ A @ prior
    N = 4000
    res = ppl.model(EPS_FORM).run("importance", data, particles=N, delayed=True, seed=11)
    assert float(res.log_weights.max() - res.log_weights.min()) < 1e-9
    for k, addr in enumerate(["x"] + [f"eps[{t}]" for t in range(T)]):
        assert abs(res.mean(addr) - mean[k]) < 4.5 * math.sqrt(cov[k, k] / N), addr
        assert abs(res.sd(addr) / math.sqrt(cov[k, k]) - 1) < 4.5 / math.sqrt(2 * N), addr  # (sd of a normal sd)


# ------------------------------------------------------------ the other conjugate pairs
BETA_BERNOULLI = """
def coin(flips, a, b):
    p ~ beta(a, b)
    for f in flips:
        observe f ~ bernoulli(p)
    return p
"""

BETA_BINOMIAL = """
def trials(ks, n, a, b):
    p ~ beta(a, b)
    observe ks ~ binomial(n, p)
    return p
"""

GAMMA_POISSON = """
def counts(cs, k, r):
    lam ~ gamma(k, r)
    for c in cs:
        observe c ~ poisson(lam)
    return lam
"""

DIRICHLET_CATEGORICAL = """
def dice(rolls, alpha):
    w ~ dirichlet(alpha)
    for x in rolls:
        observe x ~ categorical(w)
    return w[0]
"""


def _evidence(source, data, method="smc"):
    res = ppl.model(source).run(method, data, particles=1, delayed=True, seed=0)
    return res.log_evidence, res


def test_beta_bernoulli_evidence_with_one_particle_is_exact():
    flips = [True, False, True, True, False, True]
    got, res = _evidence(BETA_BERNOULLI, {"flips": flips, "a": 2.0, "b": 3.5})
    h = sum(flips)
    assert got == pytest.approx(betaln(2.0 + h, 3.5 + len(flips) - h) - betaln(2.0, 3.5), abs=1e-12)
    assert res.extra["delayed"]["marginal_observes"] == len(flips)


def test_beta_binomial_evidence_with_one_particle_is_exact():
    ks, n, a, b = [3, 0, 5], 5, 1.5, 2.0
    got, _ = _evidence(BETA_BINOMIAL, {"ks": ks, "n": n, "a": a, "b": b}, "importance")
    log_choose = sum(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1) for k in ks)
    want = log_choose + betaln(a + sum(ks), b + n * len(ks) - sum(ks)) - betaln(a, b)
    assert got == pytest.approx(want, abs=1e-12)


def test_gamma_poisson_evidence_with_one_particle_is_exact():
    cs, k, r = [3, 0, 7, 2], 2.5, 1.5
    got, _ = _evidence(GAMMA_POISSON, {"cs": cs, "k": k, "r": r})
    k2, r2 = k + sum(cs), r + len(cs)
    want = k * math.log(r) - gammaln(k) + gammaln(k2) - k2 * math.log(r2) - sum(gammaln(c + 1) for c in cs)
    assert got == pytest.approx(want, abs=1e-12)


def test_dirichlet_categorical_evidence_with_one_particle_is_exact():
    rolls, alpha = [0, 2, 2, 1, 2, 0], [1.0, 0.5, 2.0]
    got, res = _evidence(DIRICHLET_CATEGORICAL, {"rolls": rolls, "alpha": alpha})
    counts = [rolls.count(i) for i in range(3)]
    want = (gammaln(sum(alpha)) - gammaln(sum(alpha) + len(rolls))
            + sum(gammaln(a + c) - gammaln(a) for a, c in zip(alpha, counts)))
    assert got == pytest.approx(want, abs=1e-12)
    assert res.extra["delayed"]["marginal_observes"] == len(rolls)


# ------------------------------------------------------------ item 7: a proper weighting
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conjugate_programs())
def test_random_conjugate_programs_give_the_closed_form_evidence_with_one_particle(case):
    source, data, answer = case
    data = {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, list) and isinstance(v[0], float) else v
            for k, v in data.items()}  # the data in float64, as the closed form reads it
    for method in ("importance", "smc"):
        res = ppl.model(source).run(method, data, particles=1, delayed=True, seed=0)
        assert res.log_evidence == pytest.approx(answer["log_evidence"], abs=1e-9)


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(conjugate_programs())
def test_posterior_of_random_conjugate_programs_within_mcse(case):
    """One-particle-exact evidence is not enough: the returned values must be posterior
    draws (4,000 particles, all of equal weight; mean within 4 MCSE)."""
    source, data, answer = case
    res = ppl.model(source).run("importance", data, particles=4000, delayed=True, seed=7)
    assert abs(res.mean("return") - answer["mean"]) < 4 * answer["sd"] / math.sqrt(4000)


def _delayed_smc_algorithm(particles):
    def run(interp, entry, data, rnd):
        return delayed_smc(interp, entry, data, particles, "cpu", randomness=rnd)
    return checkable(run, particles)


@settings(max_examples=5, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(finite_programs(max_statements=3))
def test_delayed_smc_is_proper_on_random_finite_programs(source):
    """Finite programs have no conjugate prior: the delayed handler must leave them a
    proper weighting (exactly, by enumerating every draw)."""
    check = check_proper(ppl.model(source), _delayed_smc_algorithm(2))
    assert check.ok, check


DISCRETE_CHILDREN = """
def m(flips):
    p ~ beta(2, 3)
    z ~ flip(p)
    k ~ binomial(2, p)
    for f in flips:
        observe f ~ flip(p)
    return 2 * k + (1 if z else 0)
"""


def _children_measure(flips):
    """The exact measure of DISCRETE_CHILDREN's return value (beta integrals)."""
    h, n = sum(flips), len(flips)
    out = {}
    for z in (0, 1):
        for k in (0, 1, 2):
            ones, zeros = h + z + k, (n - h) + (1 - z) + (2 - k)
            out[2 * k + z] = math.comb(2, k) * math.exp(betaln(2 + ones, 3 + zeros) - betaln(2, 3))
    return out


def _delayed_measure(flips, particles, base=None):
    """E[Z_hat sum_i w_i 1{ret_i = v}] of delayed SMC, by enumerating every draw (the
    predictive draws of z and k and the resampling) with the exact checker's randomness."""
    from ppl.testing.validity import _float64, enumerate_outcomes
    model = ppl.model(DISCRETE_CHILDREN)
    interp, entry = model.interpreter(), model.entry
    measure: dict = {}
    with _float64():
        data = model.prepare_data({"flips": flips}, "cpu")
        outcomes = enumerate_outcomes(lambda rnd: delayed_smc(interp, entry, data, particles, "cpu", randomness=rnd,
                                                              realise_at_end=False, handler_base=base))
        for prob, pop in outcomes:
            values = pop.sites["return"][0].tolist()
            for v, lw in zip(values, pop.log_weights.tolist()):
                measure[int(v)] = measure.get(int(v), 0.0) + prob * math.exp(lw) / particles
    return measure


@pytest.mark.parametrize("particles", [1, 2])
def test_discrete_children_of_a_node_are_drawn_from_the_predictive_exactly_properly(particles):
    """``z ~ flip(p)``, ``k ~ binomial(2, p)`` with p ~ beta delayed: z and k are drawn
    from their predictives and p conditioned on them, so every draw is discrete and the
    exact checker enumerates them all (with resampling for N = 2): E[Z_hat sum_i w_i
    1{ret_i = v}] equals the exact measure (beta integrals) to 1e-12."""
    flips = [True, False, True]
    want = _children_measure(flips)
    got = _delayed_measure(flips, particles)
    assert set(got) == set(want)
    for v in want:
        assert got[v] == pytest.approx(want[v], rel=1e-12, abs=1e-15)


def test_a_predictive_draw_that_forgets_to_condition_the_node_is_caught():
    class Forgetful(delayed_mod.DelayedSampling):
        def _predictive_child(self, dist, eff):
            node_update = nodes.Node.observe_conjugate
            nodes.Node.observe_conjugate = lambda *a, **k: None  # draws z but leaves p as it was
            try:
                return super()._predictive_child(dist, eff)
            finally:
                nodes.Node.observe_conjugate = node_update
    flips = [True, False, True]
    want = _children_measure(flips)
    got = _delayed_measure(flips, 1, base=Forgetful)
    assert max(abs(got[v] - want[v]) for v in want) > 1e-4


SWITCHING = """
def m(ys):
    x ~ normal(0, 1)
    ups = 0
    for y in ys:
        c ~ flip(0.3)
        if c:
            x ~ normal(0.9 * x + 0.5, 0.5)
            ups = ups + 1
        else:
            x ~ normal(-0.5 * x, 1.0)
        observe y ~ normal(x, 0.8)
    return ups
"""


STICKY = """
def m(ys):
    x ~ normal(0, 1)
    ups = 0
    for y in ys:
        c ~ flip(0.3)
        if c:
            x ~ normal(0.9 * x + 0.5, 0.5)
            ups = ups + 1
        observe y ~ normal(x, 0.8)
    return ups
"""


@pytest.mark.parametrize("source, other", [(SWITCHING, (-0.5, 0.0, 1.0)), (STICKY, (1.0, 0.0, 0.0))])
def test_a_switching_state_space_model_is_exactly_rao_blackwellised(source, other):
    """A state assigned on both branches of an ``if`` (or on one: the other keeps the
    previous node) stays delayed (the join is one affine value with a node per branch),
    so given the switches c_1..T every particle is
    an exact Kalman filter: enumerating the switches' draws (N = 1, and SMC with N = 2 and
    its resampling), E[Z_hat sum_i w_i 1{ups_i = v}] equals the sum over switch sequences
    of P(c) times that sequence's Kalman evidence, to 1e-12."""
    import itertools
    from ppl.testing.validity import _float64, enumerate_outcomes
    ys = [0.4, -0.9, 1.3]
    want: dict = {}
    for cs in itertools.product((0, 1), repeat=len(ys)):
        m, v, ll = 0.0, 1.0, 0.0
        for c, y in zip(cs, ys):
            a, b, q = (0.9, 0.5, 0.5) if c else other
            m, v = a * m + b, a * a * v + q * q
            s_ = v + 0.64
            ll += -0.5 * (math.log(2 * math.pi * s_) + (y - m) ** 2 / s_)
            m, v = m + v * (y - m) / s_, v * 0.64 / s_
        p = math.prod(0.3 if c else 0.7 for c in cs)
        want[sum(cs)] = want.get(sum(cs), 0.0) + p * math.exp(ll)
    model = ppl.model(source)
    interp, entry = model.interpreter(), model.entry
    for particles in (1, 2):
        got: dict = {}
        with _float64():
            data = model.prepare_data({"ys": ys}, "cpu")
            for prob, pop in enumerate_outcomes(lambda rnd: delayed_smc(interp, entry, data, particles, "cpu",
                                                                        randomness=rnd, realise_at_end=False)):
                assert pop.extra["delayed"]["marginal_observes"] == len(ys)
                for v, lw in zip(pop.sites["return"][0].tolist(), pop.log_weights.tolist()):
                    got[int(v)] = got.get(int(v), 0.0) + prob * math.exp(lw) / particles
        assert set(got) == set(want)
        for v in want:
            assert got[v] == pytest.approx(want[v], rel=1e-12), (particles, v)


def test_a_broken_delayed_observe_is_caught(monkeypatch):
    """Conditioning the node but adding the density of the observation at the node's mean
    instead of the predictive density (Poisson at E[lam] instead of the negative binomial):
    the one-particle evidence is then wrong, which the closed form catches (so the checks
    above can fail). (For a bernoulli observation the two coincide: P(y = 1) = E[p].)"""
    cs, k, r = [3, 0, 7, 2], 2.5, 1.5
    k2, r2 = k + sum(cs), r + len(cs)
    want = k * math.log(r) - gammaln(k) + gammaln(k2) - k2 * math.log(r2) - sum(gammaln(c + 1) for c in cs)

    def at_the_mean(kind, p, y, n):
        mean = p["k"] / p["r"]
        return y * torch.log(mean) - mean - torch.lgamma(y + 1)

    good, _ = _evidence(GAMMA_POISSON, {"cs": cs, "k": k, "r": r})
    assert good == pytest.approx(want, abs=1e-12)
    monkeypatch.setattr(nodes.Node, "_predictive", staticmethod(at_the_mean))  # (the node is still conditioned)
    broken, _ = _evidence(GAMMA_POISSON, {"cs": cs, "k": k, "r": r})
    assert abs(broken - want) > 1e-2


# ------------------------------------------------------------ realisation
BRANCH = """
def branch(ys):
    mu ~ normal(0, 1)
    observe ys[0] ~ normal(mu, 1)
    if mu > 0:
        s = 0.5
    else:
        s = 2.0
    observe ys[1] ~ normal(mu, s)
    return mu
"""


def _quadrature(ys):
    """The evidence and posterior mean of BRANCH by quadrature on a fine grid."""
    x = torch.linspace(-8, 8, 200001, dtype=torch.float64)
    def npdf(v, m, s):
        return torch.exp(-0.5 * ((v - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    s = torch.where(x > 0, 0.5, 2.0)
    dens = npdf(x, 0.0, 1.0) * npdf(ys[0], x, 1.0) * npdf(ys[1], x, s)
    dx = float(x[1] - x[0])
    z = float(dens.sum()) * dx
    return z, float((x * dens).sum()) * dx / z, float((x * x * dens).sum()) * dx / z


def test_control_flow_realises_a_delayed_value_and_posteriors_stay_right():
    ys = [0.8, 1.3]
    z, mean, second = _quadrature(ys)
    sd = math.sqrt(second - mean ** 2)
    N = 20000
    res = ppl.model(BRANCH).run("importance", {"ys": ys}, particles=N, delayed=True, seed=5)
    assert res.extra["delayed"]["marginal_observes"] == 1  # the first, before the branch realises mu
    w = torch.exp(res.log_weights - res.log_weights.max())
    w = w / w.sum()
    ess = 1 / float((w * w).sum())
    assert abs(res.mean("return") - mean) < 4 * sd / math.sqrt(ess)
    lw = res.log_weights
    rel_sd = float(torch.exp(lw - lw.max()).std() / torch.exp(lw - lw.max()).mean()) / math.sqrt(N)
    assert abs(math.exp(res.log_evidence) / z - 1) < 4 * rel_sd


def test_smc_with_a_realisation_inside_a_branch_on_some_particles():
    """A delayed state read by control flow on some particles only (the others keep it
    delayed): the evidence estimate stays unbiased (the mean of 40 independent SMC runs'
    Z_hat within 4 standard errors of the quadrature evidence)."""
    src = """
def m(ys):
    x ~ normal(0, 1)
    c ~ flip(0.5)
    if c:
        if x > 0:
            factor 0.0
    for y in ys:
        x ~ normal(0.8 * x, 0.5)
        observe y ~ normal(x, 1)
    return x
"""
    ys = [0.3, -0.4, 1.1]
    want = kalman(ys, 0.8, 0.5, 1.0, 1.0)[0]
    zs = [math.exp(ppl.model(src).run("smc", {"ys": ys}, particles=20, delayed=True, seed=s).log_evidence)
          for s in range(40)]
    mean = sum(zs) / len(zs)
    se = math.sqrt(sum((z - mean) ** 2 for z in zs) / (len(zs) - 1) / len(zs))
    assert abs(mean - math.exp(want)) < 4 * se + 1e-12


def test_a_vector_observation_on_a_delayed_mean_is_the_sum_of_its_elements():
    src = """
def m(ys):
    mu ~ normal(1, 2)
    observe ys ~ normal(mu, 0.5)
    return mu
"""
    ys = [0.5, 1.5, 1.0]
    got = ppl.model(src).run("smc", {"ys": ys}, particles=1, delayed=True, seed=0)
    # closed form: ys ~ MVN(1, 0.25 I + 4 11^T)
    cov = torch.eye(3, dtype=torch.float64) * 0.25 + 4.0
    mvn = torch.distributions.MultivariateNormal(torch.ones(3, dtype=torch.float64), cov)
    assert got.log_evidence == pytest.approx(float(mvn.log_prob(torch.tensor(ys, dtype=torch.float64))), abs=1e-9)


def test_delayed_with_a_proposal_is_a_located_error():
    with pytest.raises(ppl.PPLError, match="delayed=True cannot be combined"):
        ppl.model(BETA_BERNOULLI).run("smc", {"flips": [True], "a": 1.0, "b": 1.0}, particles=2, delayed=True,
                                      proposal=object())


def test_delayed_with_enumerated_choices_is_an_error():
    src = """
def m(ys):
    mu ~ normal(2, 3)
    for y in ys:
        z ~ flip(0.3) @enumerate
        observe y ~ normal(mu, 1.0 if z else 2.0)
    return mu
"""
    with pytest.raises(ppl.PPLError, match="cannot be combined with enumerated choices"):
        ppl.model(src).run("importance", {"ys": [1.0]}, particles=2, delayed=True)
    with pytest.raises(ppl.PPLError, match="cannot be combined with enumerated choices"):
        ppl.model(BETA_BERNOULLI).run("smc", {"flips": [True], "a": 1.0, "b": 1.0}, particles=2, delayed=True,
                                      enumerate=["p"])


def test_the_lgssm_example_states_its_answer():
    text = (EXAMPLES / "lgssm.ppl").read_text()
    data = json.loads((EXAMPLES / "lgssm.json").read_text())
    res = ppl.model(text).run("smc", data, particles=1, delayed=True, seed=0)
    ys = torch.tensor(data["ys"], dtype=torch.float32).double().tolist()
    want_ll, means, _ = kalman(ys, data["a"], data["q"], data["r"], data["x0_sd"])
    assert abs(res.log_evidence - want_ll) < 1e-6
    assert f"log evidence = {want_ll:.4f}" in text
    assert f"E[x_T | ys] = {means[-1]:.4f}" in text


def test_the_cli_takes_delayed_as_an_option(capsys):
    from ppl import cli
    code = cli.main(["run", str(EXAMPLES / "lgssm.ppl"), "--data", str(EXAMPLES / "lgssm.json"), "--method", "smc",
                     "-n", "1", "--option", "delayed=true", "--seed", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    data = json.loads((EXAMPLES / "lgssm.json").read_text())
    ys = torch.tensor(data["ys"], dtype=torch.float32).double().tolist()
    assert code == 0
    assert abs(out["log_evidence"] - kalman(ys, data["a"], data["q"], data["r"], data["x0_sd"])[0]) < 1e-6


@pytest.mark.parametrize("prior, observe", [("beta(2, 2)", "observe 3 ~ bernoulli(p)"),
                                            ("dirichlet([1.0, 1.0])", "observe 2 ~ categorical(p)"),
                                            ("gamma(2, 1)", "observe 1.5 ~ poisson(p)")])
def test_an_observation_outside_the_support_has_density_zero_as_without_delay(prior, observe):
    src = f"def m():\n    p ~ {prior}\n    {observe}\n    return 1\n"
    for delayed in (False, True):
        with pytest.raises(ppl.PPLError, match="every particle has weight zero"):
            ppl.model(src).run("smc", {}, particles=4, delayed=delayed, seed=0)


def test_an_invalid_scale_is_the_usual_located_error():
    src = "def m():\n    x ~ normal(0, 1)\n    observe 1.0 ~ normal(x, -1)\n    return x\n"
    with pytest.raises(ppl.PPLError, match="parameter 'scale' must be positive") as err:
        ppl.model(src).run("importance", {}, particles=4, delayed=True)
    assert ":3:" in str(err.value)


def test_a_builtin_that_cannot_take_a_delayed_value_in_a_list_gets_it_realised():
    """``max([a, b])``, ``logsumexp([a, b])``: the built-in fails on the lazy values inside
    the list, and is called again with them realised (semantics.lazy.forced_in_containers);
    the evidence estimate then matches plain importance sampling's within 4 standard errors."""
    src = """
def m():
    a ~ normal(0, 1)
    b ~ normal(1, 1)
    observe 0.5 ~ normal(max([a, b]) + logsumexp([a, b]), 1)
    return a
"""
    N = 20000
    res = ppl.model(src).run("importance", {}, particles=N, delayed=True, seed=2)
    ref = ppl.model(src).run("importance", {}, particles=N, seed=3)
    w = torch.exp(ref.log_weights - ref.log_weights.max())
    se = float(w.std() / w.mean()) / math.sqrt(N)
    assert abs(res.log_evidence - ref.log_evidence) < 4 * math.sqrt(2) * se


def test_a_node_made_on_some_particles_is_realised_on_their_descendants_after_resampling():
    """A delayed choice made inside a branch, never used, then resampled (the weights
    depend on the branch): at the end every particle that has it, by descent, holds a
    draw from its law (a stale ``exists`` mask once left copies at 0)."""
    src = """
def m():
    c ~ flip(0.5)
    if c:
        x ~ normal(5, 1)
    observe 2.0 ~ normal(3.0 if c else 0.0, 1)
    observe 2.0 ~ normal(3.0 if c else 0.0, 1)
    return c
"""
    res = ppl.model(src).run("smc", {}, particles=400, delayed=True, seed=1)
    assert res.mean("return") > 0.8  # most particles descend from c = true ones
    assert abs(res.mean("x") - 5) < 4.5 / math.sqrt(300)
    assert res.quantile(0.001, "x") > 1.0


def test_a_poisson_child_of_a_gamma_node_is_drawn_from_the_negative_binomial_predictive():
    """``z ~ poisson(lam)`` with lam ~ gamma(3, 2) delayed: z from the negative binomial,
    lam conditioned on it. E[z | cs] = E[lam | cs] = 8/5, Var = 8/5 + 8/25: the weighted
    mean within 4 MCSE."""
    src = """
def m(cs):
    lam ~ gamma(3, 2)
    z ~ poisson(lam)
    for c in cs:
        observe c ~ poisson(lam)
    return z
"""
    res = ppl.model(src).run("importance", {"cs": [2, 0, 3]}, particles=20000, delayed=True, seed=4)
    assert res.extra["delayed"]["predictive_draws"] == 1 and res.extra["delayed"]["marginal_observes"] == 3
    w = torch.exp(res.log_weights - res.log_weights.max())
    ess = float(w.sum() ** 2 / (w * w).sum())
    assert abs(res.mean("return") - 1.6) < 4 * math.sqrt((1.6 + 0.32) / ess)


def test_the_return_marginal_of_a_switching_model_is_the_kalman_filter_given_the_switches():
    src = SWITCHING.replace("return ups", "return x")
    ys = [0.4, -0.9, 1.3, 0.2]
    for seed in range(3):
        res = ppl.model(src).run("importance", {"ys": ys}, particles=1, delayed=True, seed=seed)
        cs = [bool(res.mean(f"c[{t}]")) for t in range(len(ys))]
        m, v, ll = 0.0, 1.0, 0.0
        for c, y in zip(cs, torch.tensor(ys, dtype=torch.float32).double().tolist()):  # (the data as ppl reads it)
            a, b, q = (0.9, 0.5, 0.5) if c else (-0.5, 0.0, 1.0)
            m, v = a * m + b, a * a * v + q * q
            s_ = v + 0.64
            ll += -0.5 * (math.log(2 * math.pi * s_) + (y - m) ** 2 / s_)
            m, v = m + v * (y - m) / s_, v * 0.64 / s_
        got = res.extra["delayed"]
        assert float(got["return_mean"][0]) == pytest.approx(m, abs=1e-9)
        assert float(got["return_var"][0]) == pytest.approx(v, abs=1e-9)
        assert res.log_evidence == pytest.approx(ll, abs=1e-9)


def test_the_result_shows_and_exports_the_kalman_filtering_marginal():
    """The Rao-Blackwellised return marginal is shown in the header and the JSON, not
    only stored: with one particle on the LGSSM it is the Kalman filtering mean and sd."""
    data = _data()
    _, means, variances = kalman(data["ys"], data["a"], data["q"], data["r"], data["x0_sd"])
    res = ppl.model(EPS_FORM).run("smc", data, particles=1, delayed=True, seed=2)
    summary = res.delayed_summary()
    assert abs(summary["return_mean"] - means[-1]) < 1e-6
    assert abs(summary["return_sd"] - variances[-1] ** 0.5) < 1e-6
    assert summary["marginal_observes"] == len(data["ys"])
    assert f"mean={means[-1]:.4g}" in str(res) and "delayed sampling" in str(res)
    assert res.to_json()["delayed"]["return_sd"] == pytest.approx(variances[-1] ** 0.5, abs=1e-6)
    # mixed over particles by their weights (law of total variance): many particles, same answer
    many = ppl.model(EPS_FORM).run("importance", data, particles=50, delayed=True, seed=2)
    assert abs(many.delayed_summary()["return_mean"] - means[-1]) < 1e-6
    assert ppl.model(EPS_FORM).run("smc", data, particles=5, seed=2).delayed_summary() is None
