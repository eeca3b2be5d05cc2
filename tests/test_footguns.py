"""Issue 9, items 1, 2, 8, 9, 10: programs that gave silently wrong answers, or failed
under one method while running under another.

* a distribution used as a value (a condition, an operand, the model's result) is an
  error, statically where the checker sees the call, at run time otherwise;
* ``y ~ d`` on a parameter (a datum) of the model is an error;
* particles of weight zero (killed by a ``condition``) never raise: the half-Cauchy
  written as ``s ~ cauchy(0, 2.5); condition s > 0`` runs under importance, SMC, MH
  (an out-of-support proposal is rejected) and tempering, and ``log_joint`` is -inf;
* nested lists of per-particle numbers (a covariance matrix built with ``map``) are
  one batched tensor;
* ``uniform_draw`` of a range, and of per-particle lists of different lengths, means
  the same under every method.

Answers are checked against closed forms or quadrature, with tolerances from the Monte
Carlo standard error (``ppl.testing.montecarlo``) at fixed seeds.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import ppl
from ppl import PPLCheckError, PPLRuntimeError
from ppl.testing.montecarlo import describe, evidence_se, mcmc_chains, mcmc_ess, snis, table_discrepancies

torch.set_num_threads(1)

FILE = "model.ppl"
Z = 4.5  # standard errors allowed


def compile_error(src: str) -> PPLCheckError:
    with pytest.raises(PPLCheckError) as info:
        ppl.model(src, filename=FILE)
    return info.value


def run_error(src: str, method: str, data=None) -> PPLRuntimeError:
    m = ppl.model(src, filename=FILE)
    with pytest.raises(PPLRuntimeError) as info:
        m.run(method, data or {}, particles=64, seed=0)
    return info.value


def assert_located(err, line: int, col: int, source_line: str, hint: str | None = None):
    """``file:line:col``, the source line, a caret under column ``col``, and the hint."""
    lines = str(err).splitlines()
    assert lines[0].startswith(f"{FILE}:{line}:{col}: "), str(err)
    assert lines[1].endswith(source_line), str(err)
    assert lines[2].index("^") == lines[1].index("|") + 1 + col, str(err)
    if hint is not None:
        assert any(line.startswith("hint: ") and hint in line for line in lines), str(err)


DRAW_FLIP = "draw it: `x ~ flip(0.1)` or `sample(flip(0.1))`"


# ------------------------------------------------------------ 1. distributions as values
@pytest.mark.parametrize("body, line, col, use", [
    ("    return 1 if flip(0.1) else 0\n", 2, 17, "as a condition"),
    ("    n = 0\n    while flip(0.1):\n        n = n + 1\n    return n\n", 3, 11, "as a condition"),
    ("    if flip(0.1):\n        return 1\n    return 0\n", 2, 8, "as a condition"),
    ("    if b and flip(0.1):\n        return 1\n    return 0\n", 2, 14, "as a condition"),
    ("    return b if (flip(0.1) or True) else 0\n", 2, 18, "as a condition"),
    ("    return not flip(0.1)\n", 2, 16, "as a condition"),
    ("    condition flip(0.1)\n    return 1\n", 2, 15, "as a condition"),
    ("    return flip(0.1) + 1\n", 2, 12, "in arithmetic"),
    ("    return flip(0.1) == True\n", 2, 12, "in a comparison"),
    ("    return -flip(0.1)\n", 2, 13, "in arithmetic"),
    ("    factor flip(0.1)\n    return 1\n", 2, 12, "as a factor"),
    ("    return flip(0.1)\n", 2, 12, "as the model's result"),
])
def test_distribution_as_value_is_a_static_error(body, line, col, use):
    src = "def m(b=1):\n" + body
    err = compile_error(src)
    assert f"flip(0.1) is a distribution, not a value: it cannot be used {use}" in str(err)
    assert_located(err, line, col, src.splitlines()[line - 1], DRAW_FLIP)


@pytest.mark.parametrize("method", ["enumerate", "importance", "smc"])
@pytest.mark.parametrize("body, line, col, use", [
    ("    c = flip(0.1)\n    return 1 if c else 0\n", 3, 17, "as a condition"),
    ("    c = flip(0.1)\n    n = 0\n    while c:\n        n = n + 1\n    return n\n", 4, 11, "as a condition"),
    ("    c = flip(0.1)\n    condition c\n    return 1\n", 3, 5, "as a condition"),
    ("    c = flip(0.1)\n    return c + 1\n", 3, 12, "in arithmetic"),
    ("    c = flip(0.1)\n    return c == True\n", 3, 12, "in a comparison"),
    ("    c = flip(0.1)\n    factor c\n    return 1\n", 3, 5, "as a factor"),
    ("    c = flip(0.1)\n    return c\n", 3, 5, "as the model's result"),
    ("    c = [flip(0.1)]\n    return c\n", 3, 5, "as the model's result"),
])
def test_distribution_as_value_is_a_runtime_error(body, line, col, use, method):
    src = "def m():\n" + body
    err = run_error(src, method)
    assert f"flip(0.1) is a distribution, not a value: it cannot be used {use}" in str(err)
    assert_located(err, line, col, src.splitlines()[line - 1], DRAW_FLIP)


def test_distribution_per_particle_as_condition_is_an_error():
    src = "def m():\n    b ~ flip(0.5)\n    d = flip(0.1) if b else flip(0.9)\n    if d:\n        return 1\n    return 0\n"
    err = run_error(src, "importance")
    assert "is a distribution, not a value: it cannot be used as a condition" in str(err)
    assert_located(err, 4, 8, "    if d:")


def test_x_equals_normal_then_return_x():
    src = "def m():\n    x = normal(0, 1)\n    return x\n"
    for method in ("importance", "smc"):
        err = run_error(src, method)
        assert_located(err, 3, 5, "    return x", "draw it: `x ~ normal(0, 1)` or `sample(normal(0, 1))`")


def test_distributions_drawn_or_passed_to_tilde_stay_legal():
    # helpers returning a distribution for a later `~`, `sample(...)` as a value, and a
    # data parameter that shadows a distribution's name
    src = """
def prior(c):
    return flip(0.9) if c else flip(0.2)

def pick():
    return prior

def m(normal):
    c ~ flip(0.5)
    d ~ prior(c)
    e = 1 if sample(flip(0.25)) else 0
    f = pick()
    g ~ f(d)
    return [d, e, g, normal + 1]
"""
    ex = ppl.model(src, filename=FILE).run("enumerate", {"normal": 1})
    p_d, p_e = Fraction(1, 2) * Fraction(9, 10) + Fraction(1, 2) * Fraction(2, 10), Fraction(1, 4)
    marg_d, marg_e = {}, {}
    for (d, e, g, n), p in ex.probs("return").items():
        assert n == 2
        marg_d[d] = marg_d.get(d, 0) + p
        marg_e[e] = marg_e.get(e, 0) + p
    assert marg_d[True] == p_d and marg_e[1] == p_e


def test_shadowed_distribution_name_is_not_flagged():
    src = "def m():\n    flip = lambda p: p > 0.5\n    return 1 if flip(0.7) else 0\n"
    assert ppl.model(src, filename=FILE).run("enumerate").probs("return") == {1: 1}


# --------------------------------------------------------------------- 2. ~ on the data
def test_tilde_on_a_data_parameter_is_an_error():
    src = "def m(y):\n    mu ~ normal(0, 1)\n    y ~ normal(mu, 1)\n    return mu\n"
    err = compile_error(src)
    assert "y is data; did you mean `observe y ~ ...`?" in str(err)
    assert_located(err, 3, 5, "    y ~ normal(mu, 1)")
    src = "def m(ys):\n    for i in range(2):\n        if i > 0:\n            ys ~ normal(0, 1)\n    return 0\n"
    assert_located(compile_error(src), 4, 13, "            ys ~ normal(0, 1)", "`observe ys ~ d` scores")


def test_tilde_on_helper_parameters_and_locals_stays_legal():
    src = """
def jitter(y):
    y ~ normal(y, 1)
    return y

def m(y):
    def again(y):
        y ~ normal(0, 1)
        return y
    mu ~ normal(0, 1)
    mu ~ normal(mu, 1)
    z = jitter(mu)
    w = again(0)
    observe y ~ normal(mu, 1)
    return mu
"""
    m = ppl.model(src, filename=FILE)
    m.run("importance", {"y": 1.0}, particles=10, seed=0)
    # the corrected program is the right posterior: mu1 ~ N(0,1), mu ~ N(mu1, 1), y ~ N(mu, 1)
    r = m.run("importance", {"y": 1.0}, particles=20000, seed=1)
    est, se = snis(r)
    truth = 2.0 / 3.0  # prior var 2, likelihood var 1: posterior mean y * 2/3
    assert abs(est - truth) <= Z * se, describe(est, truth, se)


# ------------------------------------------------------- 8. particles killed by a condition
HALF_CAUCHY = """
def m(y):
    mu ~ normal(0, 1)
    s ~ cauchy(0, 2.5)
    condition s > 0
    observe y ~ normal(mu, s)
    return s
"""
Y = 1.5


def _half_cauchy_truth(y: float = Y, n: int = 400_000):
    """Quadrature (midpoint rule) of the evidence and of P(s < 1 | y), with mu
    integrated out (y | s ~ N(0, 1 + s^2)) and s = 2.5 tan(pi u / 2), under which the
    cauchy(0, 2.5) density on s > 0 is the constant 1/2 on u in (0, 1)."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    s = 2.5 * torch.tan(u * math.pi / 2)
    var = 1 + s ** 2
    f = 0.5 * torch.exp(-y * y / (2 * var)) / torch.sqrt(2 * math.pi * var)
    z = float(f.mean())
    return z, float((f * (s < 1)).mean()) / z


def test_half_cauchy_by_condition_under_importance():
    m = ppl.model(HALF_CAUCHY, filename=FILE)
    z, p_below = _half_cauchy_truth()
    r = m.run("importance", {"y": Y}, particles=40_000, seed=0)
    est, se = snis(r, lambda s: (s < 1).double(), centre=p_below)
    assert abs(est - p_below) <= Z * se, describe(est, p_below, se)
    log_z, log_se = evidence_se(r.log_weights)
    assert abs(math.exp(log_z) / z - 1) <= Z * log_se, describe(math.exp(log_z), z, log_se * z)


def test_half_cauchy_by_condition_under_smc():
    m = ppl.model(HALF_CAUCHY, filename=FILE)
    z, p_below = _half_cauchy_truth()
    r = m.run("smc", {"y": Y}, particles=20_000, seed=0)
    est, se = snis(r, lambda s: (s < 1).double(), centre=p_below)
    assert abs(est - p_below) <= Z * se, describe(est, p_below, se)


def test_half_cauchy_by_condition_under_mh():
    m = ppl.model(HALF_CAUCHY, filename=FILE)
    z, p_below = _half_cauchy_truth()
    # proposals of s <= 0 are rejected: no chain ever holds one, whatever the kernel
    for options in ({"kernel": "rw"}, {"kernel": "rw", "traced": False}, {"kernel": "prior", "chains": 1}):
        r = m.run("mh", {"y": Y}, seed=0, samples=150, burn_in=0, **options)
        assert bool((mcmc_chains(r, "s") > 0).all()), options
    # the prior kernel mixes well here (the random walk is slow in the cauchy tail, where
    # its ESS estimate is not to be trusted): its answer within its MC SE
    r = m.run("mh", {"y": Y}, seed=0, chains=16, samples=400, burn_in=100, kernel="prior")
    x = (mcmc_chains(r, "s") < 1).double()
    se = math.sqrt(p_below * (1 - p_below) / mcmc_ess(x))
    assert abs(float(x.mean()) - p_below) <= Z * se, describe(float(x.mean()), p_below, se)


def test_half_cauchy_by_condition_under_tempering():
    m = ppl.model(HALF_CAUCHY, filename=FILE)
    z, p_below = _half_cauchy_truth()
    r = m.run("tempering", {"y": Y}, particles=4000, seed=0)
    s = torch.as_tensor(r.sites["s"].value)
    assert bool((s > 0).all())
    # a run check with a loose bound: the moved population's error has no simple SE
    assert abs(float((s < 1).double().mean()) - p_below) < 0.05
    assert abs(r.log_evidence - math.log(z)) < 0.1


def test_traced_mh_redoes_steps_with_dead_chains_identically():
    m = ppl.model(HALF_CAUCHY, filename=FILE)
    a = m.run("mh", {"y": Y}, seed=3, samples=100, burn_in=0, kernel="rw")
    b = m.run("mh", {"y": Y}, seed=3, samples=100, burn_in=0, kernel="rw", traced=False)
    assert a.extra["traced"] and not b.extra["traced"]
    assert torch.equal(mcmc_chains(a, "s"), mcmc_chains(b, "s"))


def test_choice_after_a_failed_condition_draws_for_live_particles_only():
    # t's scale is invalid exactly where the condition failed; every chain may be dead
    src = """
def m(y):
    s ~ cauchy(0, 2.5)
    condition s > 0
    t ~ half_normal(s)
    observe y ~ normal(0, t)
    factor log(s) - log(s)
    return t
"""
    m = ppl.model(src, filename=FILE)
    for method, options in [("importance", {"particles": 500}), ("smc", {"particles": 500}),
                            ("tempering", {"particles": 200}),
                            ("mh", {"chains": 1, "samples": 300, "burn_in": 0}),
                            ("mh", {"chains": 1, "samples": 300, "burn_in": 0, "kernel": "rw"})]:
        r = m.run(method, {"y": 1.0}, seed=0, **options)
        assert math.isfinite(r.mean("t")) and r.mean("t") > 0, method


def test_dead_particles_still_report_live_errors():
    src = "def m():\n    s ~ normal(0, 1)\n    condition s > 0\n    observe 1.0 ~ normal(0, s - 10)\n    return s\n"
    err = run_error(src, "importance")
    assert "parameter 'scale' must be positive" in str(err)
    assert_located(err, 4, 5, "    observe 1.0 ~ normal(0, s - 10)")
    src = "def m():\n    s ~ normal(0, 1)\n    condition s > 0\n    factor log(s - 10)\n    return s\n"
    assert "factor received NaN" in str(run_error(src, "importance"))


def test_log_joint_of_an_impossible_trace_is_minus_inf():
    m = ppl.model(HALF_CAUCHY, filename=FILE)
    assert m.log_joint({"mu": 0.0, "s": -1.0}, y=Y).tolist() == [-math.inf]
    lj = m.log_joint({"mu": torch.tensor([0.0, 0.5]), "s": torch.tensor([-1.0, 2.0])}, y=Y)
    normal = torch.distributions.Normal
    expected = (normal(0.0, 1.0).log_prob(torch.tensor(0.5, dtype=torch.float64))
                + torch.distributions.Cauchy(0.0, 2.5).log_prob(torch.tensor(2.0, dtype=torch.float64))
                + normal(0.5, 2.0).log_prob(torch.tensor(Y, dtype=torch.float64)))
    assert lj[0] == -math.inf
    assert abs(float(lj[1]) - float(expected)) < 1e-6


# ------------------------------------------------------- 9. nested lists of per-particle numbers
GP = """
def gp(x, y):
    ell ~ uniform_draw([0.5, 1.0, 2.0])
    s = 0.25
    n = len(x)
    cov = map(lambda i: map(lambda j: exp(-(x[i] - x[j]) ** 2 / (2 * ell * ell)) + (s if i == j else 0.0),
                            range(n)), range(n))
    observe y ~ mv_normal(zeros(n), cov)
    return ell
"""
GP_DATA = {"x": [0.0, 1.0, 2.5], "y": [0.3, 0.9, -0.4]}


def _gp_truth():
    """The closed form: p(y | ell) = N(y; 0, K_ell + s I), ell uniform on three values."""
    x = torch.tensor(GP_DATA["x"], dtype=torch.float64)
    y = torch.tensor(GP_DATA["y"], dtype=torch.float64)
    lik = {}
    for ell in (0.5, 1.0, 2.0):
        K = torch.exp(-(x[:, None] - x[None, :]) ** 2 / (2 * ell * ell)) + 0.25 * torch.eye(3, dtype=torch.float64)
        lik[ell] = float(torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), K).log_prob(y))
    log_z = math.log(sum(math.exp(v) for v in lik.values()) / 3)
    return {ell: math.exp(v - log_z) / 3 for ell, v in lik.items()}, log_z


def test_gp_covariance_of_per_particle_entries_under_importance():
    post, log_z = _gp_truth()
    m = ppl.model(GP, filename=FILE)
    exact = m.run("enumerate", GP_DATA)
    for ell, p in post.items():
        assert abs(float(exact.probs("return")[Fraction(ell)]) - p) < 1e-9
    assert abs(exact.log_evidence - log_z) < 1e-9
    r = m.run("importance", GP_DATA, particles=4000, seed=0)
    assert not table_discrepancies(r, exact, z=Z)
    est, se = evidence_se(r.log_weights)
    assert abs(math.exp(est - log_z) - 1) <= Z * se, describe(est, log_z, se)


def test_matrix_mixing_per_particle_numbers_and_float_literals():
    src = """
def m(y):
    v ~ uniform_draw([1.0, 4.0])
    observe y ~ mv_normal([0.0, 0.0], [[v, 0.0], [0.0, v]])
    return v
"""
    y = [1.0, -2.0]
    lik = {v: math.exp(-(1.0 + 4.0) / (2 * v)) / (2 * math.pi * v) for v in (1.0, 4.0)}
    truth = lik[4.0] / (lik[1.0] + lik[4.0])
    r = ppl.model(src, filename=FILE).run("importance", {"y": y}, particles=4000, seed=0)
    est, se = snis(r, lambda v: (v == 4.0).double(), centre=truth)
    assert abs(est - truth) <= Z * se, describe(est, truth, se)
    log_z, log_se = evidence_se(r.log_weights)
    z = (lik[1.0] + lik[4.0]) / 2
    assert abs(math.exp(log_z) / z - 1) <= Z * log_se


# ------------------------------------------------------------- 10. the same under every method
def test_uniform_draw_of_a_range_under_every_method():
    src = "def m():\n    x ~ uniform_draw(range(3))\n    observe x ~ poisson(1.5)\n    return x\n"
    m = ppl.model(src, filename=FILE)
    exact = m.run("enumerate")
    w = [math.exp(-1.5) * 1.5 ** k / math.factorial(k) for k in range(3)]
    for k in range(3):
        assert abs(float(exact.probs("return")[k]) - w[k] / sum(w)) < 1e-12
    for method in ("importance", "smc"):
        assert not table_discrepancies(m.run(method, particles=4000, seed=0), exact, z=Z), method


HYPS = """
def m(d):
    hyps = [[1, 2], [1, 2, 3, 4], [2]]
    h ~ uniform_draw(range(3))
    for x in d:
        observe x ~ uniform_draw(hyps[h])
    return h
"""


@pytest.mark.parametrize("method", ["importance", "smc"])
def test_uniform_draw_of_per_particle_lists_of_different_lengths(method):
    m = ppl.model(HYPS, filename=FILE)
    exact = m.run("enumerate", {"d": [2, 1]})
    # P(h) ∝ prod over the data of 1{x in hyps[h]} / len(hyps[h]); hyps[2] lacks 1
    w = {0: Fraction(1, 4), 1: Fraction(1, 16)}
    assert exact.probs("return") == {k: v / sum(w.values()) for k, v in w.items()}
    r = m.run(method, {"d": [2, 1]}, particles=4000, seed=0)
    assert not table_discrepancies(r, exact, z=Z)
    # a batched table of per-particle lists of one length (a tensor row per particle)
    src = "def m(d):\n    hyps = [[1, 2], [2, 3]]\n    h ~ uniform_draw(range(2))\n    observe d ~ uniform_draw(hyps[h])\n    return h\n"
    m2 = ppl.model(src, filename=FILE)
    assert not table_discrepancies(m2.run(method, {"d": 1}, particles=2000, seed=0), m2.run("enumerate", {"d": 1}), z=Z)


@pytest.mark.parametrize("method", ["importance", "smc"])
def test_uniform_draw_of_a_per_particle_range(method):
    src = "def m():\n    n ~ categorical([1, 1, 1])\n    x ~ uniform_draw(range(n + 1))\n    return x\n"
    m = ppl.model(src, filename=FILE)
    exact = m.run("enumerate")
    assert exact.probs("return") == {0: Fraction(11, 18), 1: Fraction(5, 18), 2: Fraction(1, 9)}
    assert not table_discrepancies(m.run(method, particles=4000, seed=0), exact, z=Z)
