"""The traced random-walk MH kernel (``inference/mh_traced.py``).

Its claim is that it *is* ``mh_step(kernel="rw")`` for static programs: so the main test
runs both from one seed and requires identical chains, draw for draw (values, log
joints, acceptances), on hand-picked programs whose choices exercise every part of the
walk (real line, positive and bounded supports with their Jacobians, a support that
depends on another choice, vector choices on the simplex), and on generated conjugate
programs. Every posterior check of ``test_mh.py`` for the rw kernel then carries over.
The other half: programs that are not static (a branch or loop bound on a random value,
a discrete choice) must fall back to the interpreter, and ``traced=True`` must then
say so instead of running a wrong trace.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import ppl
from ppl.inference.mh import initial_state, mh
from ppl.inference.mh_traced import TracedRandomWalk
from ppl.semantics.errors import PPLError
from ppl.testing.strategies import conjugate_programs

# short chains (checked for correctness, not efficiency) trip the diagnostic warnings; their own
# tests are in tests/test_diagnostics.py
pytestmark = pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning")

torch.set_num_threads(1)
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))

STATIC = {
    "real line, condition, vector factor": ("""
def m(ys):
    a ~ normal(0, 3)
    b ~ normal(0, 3)
    condition a < b
    factor sum(logsumexp([-0.5 * (ys - a) ** 2, -0.5 * (ys - b) ** 2]))
    return b - a
""", {"ys": [-2.0, -1.5, 1.0, 2.5, 3.0]}),
    "positive and unit-interval supports (Jacobians)": ("""
def m(ys, k):
    s ~ gamma(2, 1)
    p ~ beta(2, 3)
    for y in ys:
        observe y ~ normal(0, s)
    observe k ~ binomial(10, p)
    return s * p
""", {"ys": [0.5, -1.2, 2.0], "k": 7}),
    "support that depends on another choice": ("""
def m(y):
    b ~ gamma(3, 1)
    x ~ uniform(0, b)
    observe y ~ normal(x, 0.5)
    return x
""", {"y": 1.3}),
    "vector choices (simplex, real vector)": ("""
def m(counts):
    w ~ dirichlet([1.0, 2.0, 3.0])
    mu ~ mv_normal([0.0, 0.0], [[1.0, 0.5], [0.5, 2.0]])
    factor sum(counts * log(w))
    factor -0.5 * sum((mu - 1) ** 2)
    return w[0] + mu[1]
""", {"counts": [2, 4, 6]}),
    "data-dependent loop and branch (not on a choice)": ("""
def m(ys, flag):
    mu ~ normal(0, 1)
    for i in range(len(ys)):
        if flag and i > 0:
            observe ys[i] ~ normal(mu, 1)
    return mu
""", {"ys": [0.1, 0.9, 1.4], "flag": True}),
}

NOT_STATIC = {
    "branch on a choice": """
def m(y):
    x ~ normal(0, 1)
    if x > 0:
        observe y ~ normal(x, 1)
    return x
""",
    "loop bound from a choice": """
def m(y):
    n ~ poisson(3)
    s = 0
    for i in range(n):
        s = s + 1
    observe y ~ normal(s, 1)
    return n
""",
    "a discrete choice": """
def m(y):
    z ~ flip(0.5)
    mu ~ normal(0, 1)
    observe y ~ normal(mu if z else -mu, 1)
    return mu
""",
}


def chains(src, data, traced, chains=6, steps=150, scale=0.7, seed=11):
    model = ppl.model(src)
    interp, prepared = model.interpreter(), model.prepare_data(data, "cpu")
    torch.manual_seed(seed)
    info = {}
    kept, rate = mh(interp, model.entry, prepared, chains=chains, samples=steps, burn_in=0, kernel="rw",
                    scale=scale, traced=traced, info=info)
    return kept, rate, info["traced"]


def assert_same_chains(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert list(sa.values) == list(sb.values)
        for k in sa.values:
            assert torch.equal(sa.values[k], sb.values[k]), k
            assert torch.allclose(sa.site_lp[k].double(), sb.site_lp[k].double(), rtol=1e-12, atol=1e-12), k
        assert torch.allclose(sa.log_joint, sb.log_joint, rtol=1e-12, atol=1e-12, equal_nan=True)
        assert torch.equal(torch.as_tensor(sa.ret).double(), torch.as_tensor(sb.ret).double())


@pytest.mark.parametrize("name", list(STATIC))
def test_traced_kernel_is_the_interpreted_kernel(name):
    src, data = STATIC[name]
    slow, rate_slow, used_slow = chains(src, data, traced=False)
    fast, rate_fast, used_fast = chains(src, data, traced="auto")
    assert not used_slow and used_fast, "a static program must take the traced path"
    assert 0.05 < rate_fast < 0.95, f"acceptance {rate_fast}: the chains should move"
    assert rate_fast == rate_slow
    assert_same_chains(slow, fast)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(conjugate_programs())
def test_traced_kernel_on_generated_conjugate_programs(case):
    src, data, _ = case
    slow, _, _ = chains(src, data, traced=False, chains=4, steps=60)
    fast, _, used = chains(src, data, traced=True, chains=4, steps=60)
    assert used
    assert_same_chains(slow, fast)


@pytest.mark.parametrize("name", list(NOT_STATIC))
def test_programs_that_are_not_static_fall_back(name):
    src = NOT_STATIC[name]
    _, _, used = chains(src, {"y": 0.7}, traced="auto", steps=20)
    assert not used
    model = ppl.model(src)
    state = initial_state(model.interpreter(), model.entry, model.prepare_data({"y": 0.7}, "cpu"), 4)
    assert TracedRandomWalk.build(model.interpreter(), model.entry, model.prepare_data({"y": 0.7}, "cpu"),
                                  state, 0.5) is None
    with pytest.raises(PPLError, match="cannot be traced"):
        chains(src, {"y": 0.7}, traced=True, steps=5)


def test_traced_posterior_matches_the_closed_form():
    """Normal mean, known noise: E[mu | ys] and sd from the closed form, within
    4.5 MCSE (MCSE = sd / sqrt(ESS) from the chains)."""
    from pyro.ops.stats import effective_sample_size
    ys = [1.2, 0.4, 2.2, 1.7]
    src = "def m(ys):\n    mu ~ normal(0, 2)\n    for y in ys:\n        observe y ~ normal(mu, 1)\n    return mu\n"
    prec = 1 / 4 + len(ys)
    mean, sd = (sum(ys)) / prec, prec ** -0.5
    kept, _, used = chains(src, {"ys": ys}, traced=True, chains=64, steps=1500, scale=1.0, seed=3)
    assert used
    draws = torch.stack([k.values["mu"] for k in kept], 1).double()  # [C, S]
    ess = float(effective_sample_size(draws, chain_dim=0, sample_dim=1))
    assert ess > 1000
    assert abs(float(draws.mean()) - mean) < 4.5 * sd / math.sqrt(ess)
    assert abs(float(draws.std()) - sd) < 0.05 * sd


def test_nan_factor_is_reported_at_its_source():
    src = "def m():\n    x ~ normal(0, 1)\n    factor log(x)\n    return x\n"
    # log of a negative x is NaN: the interpreter's error, with its location
    with pytest.raises(PPLError, match="NaN") as err:
        chains(src, {}, traced="auto", steps=50)
    assert "3:" in str(err.value) or "line 3" in str(err.value)


def test_result_reports_the_traced_path():
    src, data = STATIC["real line, condition, vector factor"]
    res = ppl.model(src).run("mh", data, kernel="rw", chains=4, samples=50, burn_in=10, seed=0)
    assert res.extra["traced"] is True
    res = ppl.model(src).run("mh", data, kernel="rw", chains=4, samples=50, burn_in=10, seed=0, traced=False)
    assert res.extra["traced"] is False
    res = ppl.model(NOT_STATIC["branch on a choice"]).run("mh", {"y": 0.7}, kernel="rw", chains=4, samples=20,
                                                          burn_in=0, seed=0)
    assert res.extra["traced"] is False and res.extra["why_not_traced"]
