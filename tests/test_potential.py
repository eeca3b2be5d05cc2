"""The potential of a program on unconstrained space (inference/potential.py): its value
and gradient against closed forms, traced and eager evaluators agreeing, random
structure refused, points of density zero scored -inf instead of raising."""
import math

import pytest
import torch

import ppl
from ppl.inference.mh import initial_state
from ppl.inference.potential import RandomStructure, build_potential
from ppl.inference.randomness import TorchRandomness
from ppl.semantics.gfi import ModelRun


def _potential(src, data, chains=4, traced="auto", seed=0):
    m = ppl.model(src)
    d = m.prepare_data(data, "cpu")
    interp = m.interpreter()
    with ppl.api.seeded(seed):
        state = initial_state(interp, m.entry, d, chains)
        return build_potential(ModelRun(interp, m.entry, d), state, traced=traced)


HIER = """
def hier(y):
    s ~ half_normal(2)
    x ~ normal(1, s)
    p ~ beta(2, 3)
    observe y ~ normal(x, 1 + p)
"""


def _hier_closed_form(z, y):
    """log pi(z) written by hand: s = exp(z0), x = z1, p = sigmoid(z2), Jacobians included."""
    z0, x, z2 = z[:, 0], z[:, 1], z[:, 2]
    s, p = z0.exp(), torch.sigmoid(z2)
    D = torch.distributions
    lp = D.HalfNormal(2.0).log_prob(s) + z0
    lp = lp + D.Normal(1.0, s).log_prob(x)
    lp = lp + D.Beta(2.0, 3.0).log_prob(p) + torch.log(p) + torch.log1p(-p)
    return lp + D.Normal(x, 1 + p).log_prob(torch.tensor(y, dtype=torch.float64))


@pytest.mark.parametrize("traced", [True, False])
def test_value_and_gradient_match_the_closed_form(traced):
    p = _potential(HIER, {"y": 0.7}, traced=traced)
    assert [s.addr for s in p.sites] == ["s", "x", "p"] and p.D == 3 and p.traced is traced
    z = torch.tensor([[0.1, 0.5, -0.3], [-1.0, 2.0, 1.5], [0.7, -0.2, 0.0], [1.2, 1.1, -2.0]], dtype=torch.float64)
    lp, g = p.value_and_grad(z)
    zz = z.clone().requires_grad_(True)
    ref = _hier_closed_form(zz, 0.7)
    ref_g, = torch.autograd.grad(ref.sum(), zz)
    assert torch.allclose(lp, ref.detach(), rtol=1e-6, atol=1e-6)
    assert torch.allclose(g, ref_g, rtol=1e-5, atol=1e-6)
    # tempering: beta scales the likelihood only
    lp_half, _ = p.value_and_grad(z, beta=0.5)
    lik = torch.distributions.Normal(z[:, 1], 1 + torch.sigmoid(z[:, 2])).log_prob(torch.tensor(0.7).double())
    assert torch.allclose(lp - lp_half, 0.5 * lik, rtol=1e-6, atol=1e-6)


def test_constrain_maps_back_and_unconstrain_inverts_it():
    p = _potential(HIER, {"y": 0.7})
    z = torch.randn(4, 3, dtype=torch.float64)
    values, _ = p.constrain(z)
    assert torch.allclose(values["s"], z[:, 0].exp()) and torch.allclose(values["p"], torch.sigmoid(z[:, 2]))
    assert torch.allclose(p.unconstrain(values), z)
    many, _ = p.constrain(torch.randn(40, 3, dtype=torch.float64))  # any number of points at once
    assert many["x"].shape == (40,)


def test_a_simplex_site_has_one_coordinate_fewer():
    p = _potential("def m():\n    w ~ dirichlet([1.0, 2.0, 3.0])\n    observe 1 ~ categorical(w)\n", {})
    assert p.D == 2 and p.sites[0].value_shape == (3,)
    values, _ = p.constrain(torch.zeros(4, 2, dtype=torch.float64))
    assert torch.allclose(values["w"].sum(1), torch.ones(4, dtype=torch.float64))


def test_traced_and_eager_agree_and_a_branch_on_a_value_is_not_traced():
    src = """
def m():
    x ~ normal(0, 1)
    if x > 0:
        observe 1.0 ~ normal(x, 1)
    else:
        observe 1.0 ~ normal(2 * x, 1)
"""
    p = _potential(src, {})
    assert not p.traced and "random value" in p.why_not_traced
    z = torch.tensor([[-1.0], [0.5], [2.0], [-0.1]], dtype=torch.float64)
    lp, g = p.value_and_grad(z)
    x = z[:, 0]
    N = torch.distributions.Normal
    ref = N(0.0, 1.0).log_prob(x) + torch.where(x > 0, N(x, 1.0).log_prob(torch.tensor(1.0)),
                                                N(2 * x, 1.0).log_prob(torch.tensor(1.0)))
    assert torch.allclose(lp, ref)
    ref_g = -x + torch.where(x > 0, 1.0 - x, 2 * (1.0 - 2 * x))
    assert torch.allclose(g[:, 0], ref_g)
    with pytest.raises(ppl.PPLError, match="cannot be traced"):
        _potential(src, {}, traced=True)


def test_points_of_density_zero_score_minus_inf_and_never_raise():
    # a scale that is negative in some chains: those chains have density zero there
    src = "def m():\n    a ~ normal(0, 1)\n    condition a > 0\n    observe 0.5 ~ normal(0, a)\n"
    p = _potential(src, {})
    z = torch.tensor([[-1.0], [0.5], [2.0], [-0.1]], dtype=torch.float64)
    lp, g = p.value_and_grad(z)
    assert torch.isneginf(lp[[0, 3]]).all() and torch.isfinite(lp[[1, 2]]).all()
    assert (g[[0, 3]] == 0).all()
    ref = torch.distributions.Normal(0.0, z[[1, 2], 0]).log_prob(torch.tensor(0.5)) + \
        torch.distributions.Normal(0.0, 1.0).log_prob(z[[1, 2], 0])
    assert torch.allclose(lp[[1, 2]], ref)
    # outside a condition
    p = _potential("def m():\n    x ~ normal(0, 1)\n    condition x < 1\n", {})
    lp, g = p.value_and_grad(torch.tensor([[0.0], [2.0], [0.5], [3.0]], dtype=torch.float64))
    assert torch.isneginf(lp[[1, 3]]).all() and torch.isfinite(lp[[0, 2]]).all() and (g[[1, 3]] == 0).all()


def test_a_continuous_choice_some_chains_make_is_refused():
    src = """
def m():
    b ~ flip(0.5)
    if b:
        x ~ normal(0, 1)
    observe 1.0 ~ normal(0, 1)
"""
    with pytest.raises(RandomStructure, match="'x'.*only some chains"):
        _potential(src, {}, chains=64)


def test_no_continuous_choice_is_an_error():
    with pytest.raises(ppl.PPLError, match="no continuous choice"):
        _potential("def m():\n    b ~ flip(0.5)\n    observe b ~ bernoulli(0.9)\n", {})


def test_initial_points_have_finite_density():
    p = _potential("def m():\n    x ~ normal(0, 1)\n    condition x > 1.5\n", {}, chains=16)
    z = p.initial(TorchRandomness(torch.Generator().manual_seed(0)))
    assert bool((z[:, 0] > 1.5).all()) and bool((z.abs() < 2).all())
    with pytest.raises(ppl.PPLError, match="no initial point"):
        _potential("def m():\n    x ~ normal(0, 1)\n    condition x > 2.2\n", {}, chains=2).initial(
            TorchRandomness(torch.Generator().manual_seed(0)), tries=3)


@pytest.mark.parametrize("traced", ["auto", False])
def test_a_covariance_that_is_not_positive_definite_in_some_chain_is_density_zero_there(traced):
    src = """
def m():
    r ~ uniform(-2, 2)
    condition abs(r) < 1
    observe [0.5, -0.5] ~ mv_normal([0.0, 0.0], [[1.0, r], [r, 1.0]])
"""
    p = _potential(src, {}, chains=2, traced=traced)
    assert p.traced is (traced == "auto")  # the positive-definiteness check traces
    z = torch.tensor([[math.log(7.0)], [math.log(0.575 / 0.425)]], dtype=torch.float64)  # r = 1.5, 0.3
    lp, g = p.value_and_grad(z)
    assert torch.isneginf(lp[0]) and g[0, 0] == 0 and torch.isfinite(lp[1])
    cov = torch.tensor([[1.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    x = torch.tensor([0.5, -0.5], dtype=torch.float64)
    s = torch.sigmoid(z[1, 0])
    ref = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov).log_prob(x) + \
        math.log(1 / 4) + torch.log(4 * s * (1 - s))
    assert torch.allclose(lp[1], ref, atol=1e-5)


def test_a_compiled_graph_that_raises_falls_back_to_the_interpreter_chain_by_chain():
    """TorchInductor's Cholesky raises on a covariance that is not positive definite, where
    TorchScript's returns an error code: the potential then scores chain by chain, and
    the bad chain has density zero (examples/gp_regression.ppl, a chain with a huge
    length scale and amplitude and no noise)."""
    import json
    m = ppl.model(open("examples/gp_regression.ppl").read(), filename="examples/gp_regression.ppl")
    d = m.prepare_data(json.load(open("examples/gp_regression.json")), "cpu")
    interp = m.interpreter()
    with ppl.api.seeded(0):
        state = initial_state(interp, m.entry, d, 4)
    p = build_potential(ModelRun(interp, m.entry, d), state)
    z = p.unconstrain({"rho": torch.tensor([1.0, 1e6, 1.5, 2.0], dtype=torch.float64),
                       "alpha": torch.tensor([0.7, 30.0, 0.5, 1.0], dtype=torch.float64),
                       "sigma": torch.tensor([0.3, 1e-12, 0.2, 0.4], dtype=torch.float64)})

    def raising(*args):
        raise RuntimeError("linalg.cholesky: The factorization could not be completed")
    p._graph = raising  # what the compiled kernel does
    lp, g = p.value_and_grad(z)
    assert torch.isneginf(lp[1]) and bool(torch.isfinite(lp[[0, 2, 3]]).all()) and bool((g[1] == 0).all())
    eager = build_potential(ModelRun(interp, m.entry, d), state, traced=False)
    assert torch.allclose(lp[[0, 2, 3]], eager.value_and_grad(z)[0][[0, 2, 3]])


def _scaled(arg, u):
    """``arg`` as DSL text, times the random ``u`` where a real number (integers stay)."""
    if isinstance(arg, list):
        return "[" + ", ".join(_scaled(a, u) for a in arg) + "]"
    if isinstance(arg, float) and math.isfinite(arg) and u is not None:
        return f"{u} * {arg!r}"
    return "inf" if arg == math.inf else "-inf" if arg == -math.inf else repr(arg)


def _inside(case):
    """A value in the support of the scipy-like reference of a case of
    tests/test_distributions_scipy.py."""
    special = {"uniform_draw": 20, "half_student_t": 1.0, "zero_inflated_poisson": 1, "categorical": 1, "delta": 2}
    return special[case.name] if case.name in special else case.ref.median()


def test_every_distribution_with_parameters_from_a_random_value_is_traced():
    """A Python read of a parameter inside a distribution's constructor (torch's StudentT
    built its Chi2 with argument checks on) made every program using it untraceable: NUTS
    then ran it in the interpreter, ~100x slower, with nothing said but ``why_not_traced``.
    Every DSL distribution, each parameter depending on a random value, must trace."""
    from test_distributions_scipy import MULTIVARIATE, SCALAR_CASES
    seen, lines, data = set(), [], {}
    for case in SCALAR_CASES:
        if case.name in seen:
            continue
        seen.add(case.name)
        args = [_scaled(a, "u") for a in case.args] + [f"{k}={_scaled(v, 'u')}" for k, v in case.kwargs.items()]
        if case.name == "truncated_normal":  # (random bounds: its support is decided in Python: eager)
            args[2:] = [_scaled(a, None) for a in case.args[2:]]
        value = _inside(case)
        data[f"y{len(lines)}"] = int(value) if case.discrete else float(value)
        lines.append(f"    observe y{len(lines)} ~ {case.name}({', '.join(args)})")
    lines += ["    observe y_dir ~ dirichlet([u * 2.0, 3.0, 1.0])",
              "    observe y_mvn ~ mv_normal([u, 0.0], [[1.0, 0.5 * u], [0.5 * u, 2.0]])",
              "    observe y_mult ~ multinomial(5, [u * 0.2, 0.3, 0.5])",
              "    observe y_lkj ~ lkj_cholesky(2, u * 1.5)"]
    data.update(y_dir=[0.3, 0.5, 0.2], y_mvn=[0.1, -0.2], y_mult=[1, 2, 2], y_lkj=[[1.0, 0.0], [0.6, 0.8]])
    assert seen | MULTIVARIATE == set(ppl.stdlib.distributions.DISTRIBUTIONS)
    params = ", ".join(data)
    src = f"def every({params}):\n    u ~ uniform(0.95, 1.05)\n" + "\n".join(lines) + "\n"
    p = _potential(src, data, traced=True)  # (traced=True: an error naming why, if it cannot be traced)
    assert p.traced
    value, grad = p.value_and_grad(torch.zeros(4, 1, dtype=torch.float64))
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()


def test_constrain_computes_values_and_the_return_value_without_scoring(monkeypatch):
    """``Potential.constrain`` (every kept draw at once, after sampling) runs the program for
    its choices' values and return value only: no observe, factor or prior is scored (the
    scoring was a third of logistic regression's post-processing); the values are those of
    a scoring run."""
    from ppl.inference import mh_traced
    from ppl.inference import potential as potential_module
    src = """
def m(ys):
    mu ~ normal(0, 1)
    s ~ half_normal(1)
    observe ys ~ normal(mu, s)
    factor(-mu * mu)
    return mu + s
"""
    p = _potential(src, {"ys": [0.3, -0.2, 1.1]})
    z = torch.randn(7, p.D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, _, scored_values, scored_ret, _ = p._run(z, p.given, 7)
    scored = {a: v.clone() for a, v in scored_values.items()}

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored")
    monkeypatch.setattr(mh_traced.LikelihoodTerms, "observe", no_scoring)
    monkeypatch.setattr(potential_module, "factor_rows", no_scoring)
    values, ret = p.constrain(z)
    assert set(values) == set(scored)
    for a in scored:
        assert torch.equal(values[a], scored[a])
    assert torch.equal(torch.as_tensor(ret), torch.as_tensor(scored_ret))
