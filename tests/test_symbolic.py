"""Symbolic joint densities (``semantics/symbolic.py``, ``Model.density``/``Model.latex``).

The sympy density, evaluated (lambdify) at traces drawn from the prior, equals the
interpreter's ``Model.log_joint`` to 1e-9 in float64: on eight schools, the linear and
logistic regressions, and random conjugate programs. The form with symbolic data (sums over
i = 0..N-1) equals the unrolled one once the data are put in. Each formula of the table
equals the DSL's own distribution (torch) and, where sympy.stats has the family, sympy's
density. Programs outside the static fragment are located errors.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sympy as sp
import sympy.stats as ss
import torch
from hypothesis import HealthCheck, given, settings

import ppl
from ppl.semantics import symbolic
from ppl.semantics.errors import PPLError
from ppl.stdlib.distributions import DISTRIBUTIONS
from ppl.testing.density_check import prior_traces
from ppl.testing.strategies import conjugate_programs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _example(name):
    return ppl.model(str(EXAMPLES / f"{name}.ppl")), json.loads((EXAMPLES / f"{name}.json").read_text())


def _log_joints(model, data, traces):
    columns = {a: torch.tensor([t[a] for t in traces], dtype=torch.float64) for a in traces[0]}
    return model.log_joint(columns, **data).tolist()


def assert_density_is_log_joint(model, data, n=8, seed=0):
    d = symbolic.density(model.program, model.entry, data)
    f = d.function()
    traces = prior_traces(model, data, n, seed)
    ours = [f(t) for t in traces]
    theirs = _log_joints(model, data, traces)
    for a, b in zip(ours, theirs):
        assert math.isfinite(a)
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9)
    return d, traces


# ------------------------------------------------------------------ equals log_joint
def test_eight_schools_density_is_log_joint(float64):
    model, data = _example("eight_schools")
    d, _ = assert_density_is_log_joint(model, data)
    assert set(d.choices) == {"mu", "tau", "theta_tilde"}
    theta = sp.IndexedBase("theta_tilde", real=True)
    assert d.choices["theta_tilde"] == [theta[j] for j in range(8)]
    assert sp.Symbol("tau", positive=True) in d.expr.free_symbols  # half_cauchy: a positive symbol


@pytest.mark.parametrize("name", ["linear_regression", "logistic_regression"])
def test_regressions_density_is_log_joint(name, float64):
    model, data = _example(name)
    assert_density_is_log_joint(model, data)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conjugate_programs())
def test_conjugate_programs_density_is_log_joint(program):
    source, data, _ = program
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert_density_is_log_joint(ppl.model(source), data, n=4)
    finally:
        torch.set_default_dtype(previous)


def test_loop_sites_are_indexed_symbols(float64):
    model = ppl.model("def m(ys):\n    s ~ half_normal(2)\n    for i in range(len(ys)):\n"
                      "        x ~ normal(0, s)\n        observe ys[i] ~ normal(x, 1)\n    return s\n")
    data = {"ys": [0.5, -1.0, 2.0]}
    d, _ = assert_density_is_log_joint(model, data)
    x = sp.IndexedBase("x", real=True)
    assert [d.choices[f"x[{i}]"] for i in range(3)] == [x[0], x[1], x[2]]


def test_condition_is_an_indicator(float64):
    model = ppl.model("def m():\n    x ~ normal(0, 1)\n    condition x > 0\n    return x\n")
    f = symbolic.density(model.program, model.entry).function()
    assert f({"x": 0.7}) == pytest.approx(_log_joints(model, {}, [{"x": 0.7}] * 2)[0], rel=1e-12)
    assert f({"x": -0.7}) == -math.inf == _log_joints(model, {}, [{"x": -0.7}] * 2)[0]


# ------------------------------------------------------------------ symbolic data: sums
@pytest.mark.parametrize("name", ["eight_schools", "linear_regression"])
def test_symbolic_data_sum_equals_unrolled(name, float64):
    model, data = _example(name)
    unrolled = symbolic.density(model.program, model.entry, data)
    summed = symbolic.density(model.program, model.entry, data, symbolic_data=True)
    N = sp.Symbol("N", integer=True, positive=True)
    assert summed.expr.has(sp.Sum) and N in summed.expr.free_symbols
    assert summed.lengths == {N: len(next(v for v in data.values() if isinstance(v, list)))}
    difference = summed.substitute_data(data) - unrolled.expr
    for trace in prior_traces(model, data, 3, seed=1):
        assert abs(float(difference.xreplace(unrolled.values_of(trace)))) < 1e-9
    assert sp.simplify(sp.expand(difference)) == 0


def test_conjugate_normal_symbolic_data_is_a_sum():
    source = ("def model(ys, m0, s0, s):\n    mu ~ normal(m0, s0)\n    for y in ys:\n"
              "        observe y ~ normal(mu, s)\n    return mu\n")
    data = {"ys": [0.5, 1.5, -0.25], "m0": 0.0, "s0": 2.0, "s": 1.0}
    summed = symbolic.density(ppl.model(source).program, "model", data, symbolic_data=True)
    mu, s, m0, s0 = sp.symbols("mu s m0 s0", real=True)
    ys, i = sp.IndexedBase("ys", real=True), sp.Idx("i")
    N = sp.Symbol("N", integer=True, positive=True)
    expected = (-sp.log(s0) - sp.log(2 * sp.pi) / 2 - (mu - m0) ** 2 / (2 * s0 ** 2)
                + sp.Sum(-sp.log(s) - sp.log(2 * sp.pi) / 2 - (ys[i] - mu) ** 2 / (2 * s ** 2), (i, 0, N - 1)))
    assert sp.simplify(summed.expr - expected) == 0
    unrolled = symbolic.density(ppl.model(source).program, "model", data)
    assert sp.simplify(summed.substitute_data(data) - unrolled.expr) == 0


def test_latex_of_eight_schools():
    model, data = _example("eight_schools")
    text = model.latex(data)
    assert text.startswith(r"\log p(\mu, \tau, \theta_{tilde} \mid y, \sigma) = ")
    assert r"\sum_{i=0}^{N - 1}" in text
    assert isinstance(model.density(data), sp.Expr)
    assert model.density(data) == symbolic.density(model.program, model.entry, data).expr


# ------------------------------------------------------------------ the table
_CASES = {  # name: (params, value)
    "normal": ((0.3, 1.7), -0.4), "lognormal": ((0.2, 0.8), 1.3), "half_normal": ((1.5,), 0.9),
    "half_cauchy": ((2.0,), 1.1), "cauchy": ((0.5, 1.5), -2.0), "student_t": ((3.5, 0.5, 2.0), 1.7),
    "laplace": ((0.5, 1.5), -1.0), "exponential": ((1.7,), 0.6), "gamma": ((2.5, 1.5), 1.2),
    "inverse_gamma": ((2.5, 1.5), 0.7), "chi2": ((3.0,), 2.2), "beta": ((2.0, 3.5), 0.3),
    "uniform": ((-1.0, 2.0), 0.5), "bernoulli": ((0.3,), True), "flip": ((0.3,), False),
    "binomial": ((7, 0.35), 3), "poisson": ((2.5,), 4), "geometric": ((0.3,), 2),
    "categorical": (([0.2, 0.5, 0.3],), 1),
}


@pytest.mark.parametrize("name", sorted(n for n in symbolic.LOG_DENSITIES if "." not in n))
def test_table_equals_the_dsl_distribution(name, float64):
    params, value = _CASES[name]
    spec = DISTRIBUTIONS[name]
    x = sp.Symbol("x")
    args = dict(zip(spec.params, [symbolic._as_value(p) for p in params]))
    formula = symbolic.LOG_DENSITIES[name](x, **args)
    ours = float(formula.subs(x, int(value) if isinstance(value, bool) else value))
    torch_args = [torch.tensor(p, dtype=torch.float64) if not isinstance(p, int) else p for p in params]
    theirs = spec.make(*torch_args).log_prob(spec.from_value(torch.tensor(value))).item()
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_logits_variants_equal_the_dsl_distribution(float64):
    x = sp.Symbol("x")
    for name, kw, args, value in [("bernoulli", "logits", {"logits": 0.7}, 1),
                                  ("binomial", "logits", {"n": 5, "logits": -0.4}, 2),
                                  ("categorical", "logits", {"logits": [0.1, -1.0, 2.0]}, 2)]:
        formula = symbolic.LOG_DENSITIES[f"{name}.{kw}"](x, **{k: symbolic._as_value(v) for k, v in args.items()})
        spec = DISTRIBUTIONS[name].keyword_variants[kw][1]
        params = [v if isinstance(v, int) else torch.tensor(v, dtype=torch.float64) for v in args.values()]
        theirs = spec.make(*params).log_prob(spec.from_value(torch.tensor(value))).item()
        assert float(formula.subs(x, value)) == pytest.approx(theirs, rel=1e-12)


@pytest.mark.parametrize("name, stats", [
    ("normal", lambda: ss.Normal("X", sp.Rational(3, 10), sp.Rational(17, 10))),
    ("lognormal", lambda: ss.LogNormal("X", sp.Rational(1, 5), sp.Rational(4, 5))),
    ("cauchy", lambda: ss.Cauchy("X", sp.Rational(1, 2), sp.Rational(3, 2))),
    ("student_t", None), ("laplace", lambda: ss.Laplace("X", sp.Rational(1, 2), sp.Rational(3, 2))),
    ("exponential", lambda: ss.Exponential("X", sp.Rational(17, 10))),
    ("gamma", lambda: ss.Gamma("X", sp.Rational(5, 2), 1 / sp.Rational(3, 2))),
    ("beta", lambda: ss.Beta("X", 2, sp.Rational(7, 2))),
])
def test_table_equals_sympy_stats(name, stats):
    if stats is None:  # sympy's StudentT has no location/scale: the standard one
        formula = symbolic.LOG_DENSITIES[name](sp.Rational(17, 10), sp.Rational(7, 2), 0, 1)
        expected = sp.log(ss.density(ss.StudentT("X", sp.Rational(7, 2)))(sp.Rational(17, 10)))
    else:
        params, value = _CASES[name]
        value = sp.nsimplify(value)
        formula = symbolic.LOG_DENSITIES[name](value, *[sp.nsimplify(p) for p in params])
        expected = sp.log(ss.density(stats())(value))
    assert float(formula) == pytest.approx(float(expected), rel=1e-12)


# ------------------------------------------------------------------ errors, located
def test_control_flow_on_a_random_value_is_a_located_error():
    model = ppl.model("def m():\n    z ~ flip(0.5)\n    if z:\n        x ~ normal(0, 1)\n    return z\n")
    with pytest.raises(PPLError) as e:
        model.density()
    assert "`if` on a random value" in e.value.message
    assert e.value.span.line == 3 and "<model>:3:5" in str(e.value)


def test_unsupported_distribution_is_named():
    model = ppl.model("def m():\n    p ~ dirichlet([1.0, 2.0])\n    return p\n")
    with pytest.raises(PPLError) as e:
        model.density()
    assert "dirichlet" in e.value.message and e.value.span.line == 2


def test_symbolic_loop_that_carries_state_is_an_error():
    model = ppl.model("def m(ys):\n    t = 0.0\n    for y in ys:\n        t = t + y\n"
                      "    x ~ normal(t, 1)\n    return x\n")
    with pytest.raises(PPLError) as e:
        model.density({"ys": [1.0, 2.0]}, symbolic_data=True)
    assert "cannot be written as a Sum" in e.value.message and e.value.span.line == 3
    assert model.density({"ys": [1.0, 2.0]}) is not None  # unrolled: fine


def test_conditional_expression_on_a_choice(float64):
    """On a coin z: b + (a - b) z; on another condition: a Piecewise."""
    model = ppl.model("def m(y):\n    mu ~ normal(0, 3)\n    z ~ flip(0.3)\n"
                      "    observe y ~ normal(mu if z else -mu, 1)\n    observe y ~ normal(1 if mu > 0 else 2, 1)\n"
                      "    return mu\n")
    d = symbolic.density(model.program, model.entry, {"y": 1.1})
    mu, z = sp.Symbol("mu", real=True), sp.Symbol("z", integer=True, nonnegative=True)
    assert d.expr.has(sp.Piecewise) and d.expr.has(mu * z)
    f = d.function()
    for trace in ({"mu": 0.4, "z": True}, {"mu": 0.4, "z": False}, {"mu": -0.3, "z": True}):
        assert f(trace) == pytest.approx(_log_joints(model, {"y": 1.1}, [trace] * 2)[0], rel=1e-12)


def test_hmm_density_is_log_joint_and_twists_add_nothing(float64):
    model, data = _example("twisted_hmm")
    d, _ = assert_density_is_log_joint(model, data)
    assert len(d.choices) == 1 + len(data["ys"])  # z, z[0..11]
    z = sp.IndexedBase("z", integer=True, nonnegative=True)
    assert not d.expr.has(sp.Piecewise) and z[3] in d.expr.free_symbols  # `3 if z else 0` is 3 z
    assert r"\sum" not in model.latex(data)  # the loop carries z: unrolled, not a Sum


def test_draw_densities_writes_png(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("draw_densities", EXAMPLES / "draw_densities.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = module.main(tmp_path)
    assert [p.name for p in paths] == ["eight_schools_density.png", "twisted_hmm_density.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_a_choice_outside_its_support_scores_minus_infinity(float64):
    model = ppl.model("def m():\n    s ~ half_normal(1)\n    p ~ beta(2, 2)\n    u ~ uniform(-1, 1)\n    return s\n")
    f = symbolic.density(model.program, model.entry).function()
    good = {"s": 0.5, "p": 0.3, "u": 0.2}
    assert f(good) == pytest.approx(_log_joints(model, {}, [good] * 2)[0], rel=1e-12)
    for bad in ({"s": -0.5}, {"p": 1.3}, {"u": 1.5}):
        trace = {**good, **bad}
        assert f(trace) == -math.inf == _log_joints(model, {}, [trace] * 2)[0]
