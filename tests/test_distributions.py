"""Tests of the distribution registry (ppl.stdlib.distributions)."""
from __future__ import annotations

import math
from fractions import Fraction as F

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ppl
from ppl.semantics.errors import InfiniteSupportError, PPLCheckError, PPLRuntimeError
from ppl.stdlib import distributions as D
from ppl.stdlib.distributions import DISTRIBUTIONS, DistSpec, get

# name -> (scalar params as python values); vectors/matrices as nested lists
PARAMS = {
    "normal": (0.5, 2.0),
    "lognormal": (0.0, 0.5),
    "half_normal": (1.5,),
    "student_t": (3.0, 1.0, 2.0),
    "cauchy": (0.0, 1.0),
    "laplace": (1.0, 0.5),
    "uniform": (-1.0, 2.0),
    "beta": (2.0, 3.0),
    "gamma": (2.0, 1.5),
    "inverse_gamma": (3.0, 2.0),
    "exponential": (1.5,),
    "dirichlet": ([1.0, 2.0, 3.0],),
    "mv_normal": ([0.0, 1.0], [[2.0, 0.5], [0.5, 1.0]]),
    "bernoulli": (0.3,),
    "flip": (0.3,),
    "binomial": (10.0, 0.3),
    "beta_binomial": (10.0, 2.0, 3.0),
    "categorical": ([0.2, 0.3, 0.5],),
    "uniform_draw": ([10.0, 20.0, 30.0, 40.0],),
    "delta": (1.5,),
    "poisson": (3.0,),
    "geometric": (0.3,),
    "negative_binomial": (5.0, 0.4),
    "half_cauchy": (2.0,),
    "half_student_t": (3.0, 2.0),
    "truncated_normal": (0.5, 2.0, -1.0, 3.0),
    "lkj_cholesky": (3.0, 2.0),
    "von_mises": (1.0, 2.0),
    "weibull": (2.0, 1.5),
    "pareto": (1.0, 3.0),
    "chi2": (3.0,),
    "multinomial": (4.0, [0.2, 0.3, 0.5]),
    "zero_inflated_poisson": (2.0, 0.3),
}

DTYPES = {"float": torch.float32, "long": torch.int64, "bool": torch.bool}


def test_every_distribution_has_test_params():
    assert set(PARAMS) == set(DISTRIBUTIONS)


def tensors(name, batch=(), dtype=torch.float32):
    spec = get(name)
    out = []
    for p, ev in zip(PARAMS[name], spec.param_event_dims):
        t = torch.tensor(p, dtype=dtype)
        assert t.dim() == ev
        out.append(t.expand(batch + t.shape).clone())
    return out


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_spec_fields(name):
    spec = get(name)
    assert isinstance(spec, DistSpec) and spec.name == name
    assert len(spec.param_event_dims) == len(spec.params)
    assert set(spec.defaults) <= set(spec.params)
    # optional parameters are trailing
    assert all(p in spec.defaults for p in spec.params[spec.n_required:])
    assert spec.value_dtype in DTYPES
    assert spec.support_kind in {"real", "positive", "unit_interval", "interval", "simplex", "integer", "boolean", "finite",
                                 "lower_bounded", "corr_cholesky"}
    assert spec.doc and "\n" not in spec.doc
    assert spec.finite_support == (spec.support_kind in {"finite", "boolean"})
    if not spec.discrete:
        assert not spec.finite_support


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_shapes_dtypes_and_log_prob(name):
    spec = get(name)
    event = {"mv_normal": (2,), "dirichlet": (3,), "multinomial": (3,), "lkj_cholesky": (3, 3)}.get(name, ())
    # scalar parameters, sample((7,))
    d = spec.make(*tensors(name))
    assert isinstance(d, torch.distributions.Distribution)
    assert tuple(d.event_shape) == event and len(event) == spec.value_event_dim
    x = d.sample((7,))
    assert tuple(x.shape) == (7,) + event
    v = spec.to_value(x)
    assert v.dtype == DTYPES[spec.value_dtype]
    lp = d.log_prob(spec.from_value(v))
    assert lp.shape == (7,) and torch.isfinite(lp).all()
    # batched parameters ([5] leading batch dim)
    d = spec.make(*tensors(name, (5,)))
    assert tuple(d.batch_shape) == (5,)
    x = d.sample()
    assert tuple(x.shape) == (5,) + event
    v = spec.to_value(x)
    assert v.dtype == DTYPES[spec.value_dtype]
    lp = d.log_prob(spec.from_value(v))
    assert lp.shape == (5,) and torch.isfinite(lp).all()
    # samples over particles and batch
    assert tuple(d.sample((7,)).shape) == (7, 5) + event


def test_batch_broadcasting_between_params():
    d = get("normal").make(torch.zeros(4, 1), torch.ones(3))
    assert tuple(d.batch_shape) == (4, 3)
    with pytest.raises(PPLRuntimeError, match="normal"):
        get("normal").make(torch.zeros(4), torch.ones(3))


def test_defaults_and_param_conversion():
    d = get("student_t").make(torch.tensor(4.0))
    assert float(d.loc) == 0.0 and float(d.scale) == 1.0
    d = get("flip").make()
    assert float(d.probs) == 0.5
    # bool / int parameters and python numbers are accepted
    assert float(get("bernoulli").make(torch.tensor(True)).probs) == 1.0
    assert float(get("binomial").make(torch.tensor(3), 0.5).total_count) == 3.0
    assert get("normal").make(0, torch.tensor(1.0, dtype=torch.float64)).loc.dtype == torch.float64


def test_value_conversion():
    assert get("bernoulli").from_value(torch.tensor([True, False])).dtype == torch.get_default_dtype()
    assert get("binomial").from_value(torch.tensor([1, 2])).is_floating_point()
    assert get("categorical").from_value(torch.tensor([1, 2])).dtype == torch.int64
    assert get("poisson").to_value(torch.tensor([2.0])).tolist() == [2]
    assert get("flip").to_value(torch.tensor([1.0, 0.0])).tolist() == [True, False]


def test_log_prob_outside_support_is_minus_inf():
    cases = {
        "exponential": (tensors("exponential"), -1.0),
        "uniform": (tensors("uniform"), 5.0),
        "beta": (tensors("beta"), 1.5),
        "binomial": (tensors("binomial"), 11.0),
        "beta_binomial": (tensors("beta_binomial"), -1.0),
        "poisson": (tensors("poisson"), 2.5),
        "bernoulli": (tensors("bernoulli"), 0.5),
        "categorical": (tensors("categorical"), 3),
        "delta": (tensors("delta"), 2.0),
        "geometric": (tensors("geometric"), -2.0),
    }
    for name, (ps, bad) in cases.items():
        spec = get(name)
        d = spec.make(*ps)
        lp = d.log_prob(spec.from_value(torch.tensor(bad)))
        assert lp.item() == -math.inf, name
    # mixed batch: only the out-of-support entries are -inf
    spec = get("binomial")
    d = spec.make(torch.tensor(3.0), torch.tensor(0.5))
    lp = d.log_prob(spec.from_value(torch.tensor([-1, 0, 3, 4])))
    assert lp[0] == -math.inf and lp[3] == -math.inf and torch.isfinite(lp[1:3]).all()
    # an expanded distribution keeps the behaviour
    lp = get("exponential").make(torch.tensor(1.0)).expand((2,)).log_prob(torch.tensor([-1.0, 1.0]))
    assert lp[0] == -math.inf and lp[1].item() == pytest.approx(-1.0)
    # dirichlet: a vector off the simplex
    d = get("dirichlet").make(torch.tensor([1.0, 2.0, 3.0]))
    lp = d.log_prob(torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.5, 0.5]]))
    assert torch.isfinite(lp[0]) and lp[1] == -math.inf


# ------------------------------------------------------------------------- exact


FINITE = [n for n in sorted(DISTRIBUTIONS) if get(n).finite_support]
INFINITE = [n for n in sorted(DISTRIBUTIONS) if get(n).discrete and not get(n).finite_support]
CONTINUOUS = [n for n in sorted(DISTRIBUTIONS) if not get(n).discrete]

RATIONAL = {
    "bernoulli": (F(1, 3),),
    "flip": (F(2, 7),),
    "binomial": (7, F(2, 5)),
    "beta_binomial": (6, F(3, 2), F(5, 3)),
    "categorical": ([1, F(1, 2), 0, 3],),
    "uniform_draw": (["a", "b", "a", 3],),
    "delta": (F(3, 4),),
    "multinomial": (3, [1, F(1, 2), 0, F(3, 2)]),
}


def test_finite_list_is_as_expected():
    assert set(FINITE) == set(RATIONAL)
    assert set(INFINITE) == {"poisson", "geometric", "negative_binomial", "zero_inflated_poisson"}


@pytest.mark.parametrize("name", FINITE)
def test_exact_support_rational_sums_to_one(name):
    spec = get(name)
    support = spec.exact_support(*RATIONAL[name])
    assert all(isinstance(p, F) and p > 0 for _, p in support)
    assert sum(p for _, p in support) == 1
    keys = [D._merge_key(v) for v, _ in support]
    assert len(keys) == len(set(keys))  # merged
    for v, p in support:
        assert spec.exact_prob(v, *RATIONAL[name]) == p


def test_exact_support_examples():
    assert get("bernoulli").exact_support(F(1, 3)) == [(True, F(1, 3)), (False, F(2, 3))]
    assert get("bernoulli").exact_support(1) == [(True, F(1))]
    assert get("flip").exact_support() == [(True, F(1, 2)), (False, F(1, 2))]
    b = get("binomial").exact_support(3, F(1, 2))
    assert b == [(0, F(1, 8)), (1, F(3, 8)), (2, F(3, 8)), (3, F(1, 8))]
    assert all(type(v) is int for v, _ in b)
    # integral float n does not make the result inexact
    assert get("binomial").exact_support(3.0, F(1, 2)) == b
    assert get("categorical").exact_support([1, 0, 3]) == [(0, F(1, 4)), (2, F(3, 4))]
    assert get("uniform_draw").exact_support(["a", "b", "a"]) == [("a", F(2, 3)), ("b", F(1, 3))]
    # true and 1 are different DSL values
    assert len(get("uniform_draw").exact_support([True, 1])) == 2
    # beta_binomial(n, 1, 1) is uniform on 0..n
    assert get("beta_binomial").exact_support(4, 1, 1) == [(k, F(1, 5)) for k in range(5)]
    assert get("delta").exact_support(2) == [(2, F(1))]


def test_exact_prob_outside_support_is_zero():
    assert get("binomial").exact_prob(4, 3, F(1, 2)) == 0
    assert get("binomial").exact_prob(-1, 3, F(1, 2)) == 0
    assert get("binomial").exact_prob(1.5, 3, F(1, 2)) == 0
    assert get("categorical").exact_prob(3, [1, 2, 3]) == 0
    assert get("bernoulli").exact_prob(2, F(1, 3)) == 0
    assert get("uniform_draw").exact_prob("z", ["a", "b"]) == 0
    assert get("delta").exact_prob(1, 2) == 0
    assert get("poisson").exact_prob(-1, 2.0) == 0
    assert get("exponential").exact_prob(-1.0, 1.0) == 0.0
    assert get("uniform").exact_prob(3.0, 0, 1) == 0.0


def torch_prob(name, value, params):
    spec = get(name)
    ts = [torch.tensor(p, dtype=torch.float64) for p in params]
    d = spec.make(*ts)
    v = torch.tensor(value)
    if v.is_floating_point():
        v = v.double()
    return math.exp(d.log_prob(spec.from_value(v)).item())


@pytest.mark.parametrize("name", FINITE)
def test_exact_support_float_matches_torch(name):
    spec = get(name)
    params = PARAMS[name]
    support = spec.exact_support(*params)
    assert sum(p for _, p in support) == pytest.approx(1.0, abs=1e-12)
    for v, p in support:
        if name == "uniform_draw":
            assert isinstance(p, F)  # 1/K is always exact
            idx = params[0].index(v)
            assert float(p) == pytest.approx(torch_prob(name, idx, params), abs=1e-6)
            continue
        if name == "delta":
            assert p == 1 and isinstance(p, F)  # a point mass is exact whatever its value
        else:
            assert isinstance(p, float)
        assert p == pytest.approx(torch_prob(name, v, params), abs=1e-6)
        assert spec.exact_prob(v, *params) == pytest.approx(p, abs=1e-12)


@pytest.mark.parametrize("name", INFINITE)
def test_infinite_support(name):
    spec = get(name)
    with pytest.raises(InfiniteSupportError) as e:
        spec.exact_support(*PARAMS[name])
    assert "importance sampling" in str(e.value)
    total = 0.0
    for k in range(200):
        p = spec.exact_prob(k, *PARAMS[name])
        if k < 15:
            assert p == pytest.approx(torch_prob(name, float(k), PARAMS[name]), abs=1e-9)
        total += p
    assert total == pytest.approx(1.0, abs=1e-9)


def test_exact_prob_rational_infinite_support():
    assert get("geometric").exact_prob(2, F(1, 3)) == F(4, 27)
    # integer total_count, rational p: exact. P(k=1 | r=2, p=1/2) = C(2,1) (1/2)^2 (1/2) = 1/4
    assert get("negative_binomial").exact_prob(1, 2, F(1, 2)) == F(1, 4)
    assert isinstance(get("negative_binomial").exact_prob(1, F(3, 2), F(1, 2)), float)
    assert get("poisson").exact_prob(0, 0) == 1
    assert isinstance(get("poisson").exact_prob(1, 2), float)


@pytest.mark.parametrize("name", CONTINUOUS)
def test_continuous_exact(name):
    spec = get(name)
    with pytest.raises(InfiniteSupportError, match="continuous"):
        spec.exact_support(*PARAMS[name])
    d = spec.make(*tensors(name, dtype=torch.float64))
    x = d.sample()
    p = spec.exact_prob(x.tolist(), *PARAMS[name])
    assert isinstance(p, float)
    assert p == pytest.approx(math.exp(d.log_prob(x).item()), rel=1e-9)


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "name, params, pname",
    [
        ("normal", (0.0, -1.0), "scale"),
        ("normal", (float("nan"), 1.0), "loc"),
        ("bernoulli", (1.5,), "p"),
        ("beta", (0.0, 1.0), "a"),
        ("dirichlet", ([1.0, -2.0, 3.0],), "alpha"),
        ("categorical", ([0.5, -0.1],), "probs"),
        ("categorical", ([0.0, 0.0],), "probs"),
        ("binomial", (-1.0, 0.5), "n"),
        ("binomial", (2.5, 0.5), "n"),
        ("uniform", (1.0, 1.0), "high"),
        ("mv_normal", ([0.0, 0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]]), "cov"),
        ("mv_normal", ([0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]]), "cov"),
        ("geometric", (0.0,), "p"),
        ("negative_binomial", (2.0, 1.0), "p"),
        ("gamma", (1.0, -3.0), "rate"),
    ],
)
def test_invalid_params_make(name, params, pname):
    with pytest.raises(PPLRuntimeError) as e:
        get(name).make(*[torch.tensor(p) for p in params])
    assert f"{name}: parameter '{pname}'" in str(e.value)


def test_invalid_params_messages():
    with pytest.raises(PPLRuntimeError) as e:
        get("normal").make(torch.tensor(0.0), torch.tensor([1.0, -1.0, -2.0]))
    assert "normal: parameter 'scale' must be positive (got -1.0)" in str(e.value)
    with pytest.raises(PPLRuntimeError) as e:
        get("binomial").make(torch.tensor(-1.0), torch.tensor(0.5))
    assert "must be a non-negative integer (got -1" in str(e.value)
    with pytest.raises(PPLRuntimeError, match="vector"):
        get("dirichlet").make(torch.tensor(1.0))
    with pytest.raises(PPLRuntimeError) as e:
        get("uniform").make(torch.tensor([0.0, 2.0]), torch.tensor(1.0))
    assert "uniform: parameter 'high' must be greater than 'low' (got low=2.0, high=1.0)" in str(e.value)


@pytest.mark.parametrize(
    "name, params, pname",
    [
        ("bernoulli", (F(3, 2),), "p"),
        ("binomial", (-1, F(1, 2)), "n"),
        ("binomial", (F(5, 2), F(1, 2)), "n"),
        ("beta_binomial", (3, 0, 1), "a"),
        ("categorical", ([1, -1],), "probs"),
        ("categorical", ([0, 0],), "probs"),
        ("categorical", ([],), "probs"),
        ("uniform_draw", ([],), "items"),
        ("poisson", (-1,), "rate"),
        ("bernoulli", ("x",), "p"),
    ],
)
def test_invalid_params_exact(name, params, pname):
    with pytest.raises(PPLRuntimeError) as e:
        get(name).exact_support(*params) if get(name).finite_support else get(name).exact_prob(0, *params)
    assert not isinstance(e.value, InfiniteSupportError)
    assert f"parameter '{pname}'" in str(e.value)


def test_arity():
    with pytest.raises(PPLCheckError, match="normal takes 2 parameters"):
        get("normal").make(torch.tensor(0.0))
    with pytest.raises(PPLCheckError, match="1 to 3"):
        get("student_t").exact_prob(0.0, 1, 2, 3, 4)


def test_unknown_distribution():
    with pytest.raises(PPLCheckError) as e:
        get("nromal")
    assert "did you mean 'normal'" in str(e.value)
    assert not isinstance(e.value, KeyError)


# -------------------------------------------------------------------- properties

fractions = st.fractions(min_value=0, max_value=1, max_denominator=50)
positive = st.fractions(min_value=F(1, 20), max_value=20, max_denominator=30)


@st.composite
def rational_case(draw):
    kind = draw(st.sampled_from(["binomial", "beta_binomial", "categorical"]))
    if kind == "binomial":
        return kind, (draw(st.integers(0, 25)), draw(fractions))
    if kind == "beta_binomial":
        return kind, (draw(st.integers(0, 25)), draw(positive), draw(positive))
    ws = draw(st.lists(st.fractions(min_value=0, max_value=10, max_denominator=20), min_size=1, max_size=8))
    if sum(ws) == 0:
        ws[0] = F(1)
    return kind, (ws,)


@settings(max_examples=50, deadline=None)
@given(rational_case())
def test_exact_support_sums_to_one_property(case):
    name, params = case
    support = get(name).exact_support(*params)
    assert all(isinstance(p, F) and p > 0 for _, p in support)
    assert sum(p for _, p in support) == 1


# ------------------------------------------------- validate_args=False (issue 9 item 22)

BAD_NUMBERS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 0.5, 1.0, 1.5, 2.5]


def _torch_rejects(spec, params) -> bool:
    """Whether torch's own validation (validate_args=True) rejects these parameters."""
    saved = D._build
    D._build = lambda cls, *a, **kw: D._SAFE[cls](*a, validate_args=True, **kw)
    try:
        spec._builder(*spec._to_tensors(params))
        return False
    except (ValueError, RuntimeError, OverflowError):  # (lkj_cholesky's dim must become a Python int)
        return True
    finally:
        D._build = saved


# Parameters ppl accepts on purpose where torch/pyro would not: (distribution, parameter, value)
MORE_PERMISSIVE = {
    ("zero_inflated_poisson", "rate", 0.0),  # like poisson(0): a point mass at 0 (pyro requires rate > 0)
}


def test_zero_inflated_poisson_with_rate_zero_is_a_point_mass_at_zero():
    d = get("zero_inflated_poisson").make(torch.tensor(0.0), torch.tensor(0.3))
    assert d.log_prob(torch.tensor([0.0, 1.0, 2.0])).tolist() == [0.0, -math.inf, -math.inf]
    assert d.sample((50,)).eq(0).all()
    assert get("zero_inflated_poisson").exact_prob(0, 0, F(3, 10)) == 1


def _all_specs():
    for name in sorted(DISTRIBUTIONS):
        yield name, get(name), PARAMS[name]
        for key, (replaced, variant) in get(name).keyword_variants.items():
            i = get(name).params.index(replaced)
            value = [0.1, -0.5, 1.0] if variant.param_event_dims[i] else 0.3
            yield f"{name}({key}=)", variant, tuple(PARAMS[name][:i]) + (value,)


@pytest.mark.parametrize("label, spec, params", list(_all_specs()), ids=lambda x: x if isinstance(x, str) else "")
def test_parameters_torch_rejects_are_rejected_by_make(label, spec, params):
    """The distributions are built with validate_args=False because make() checks the
    parameters itself: every parameter value torch's validation would reject (each
    parameter, or the first entry of a vector, set to nan, +-inf, -1, 0, 1/2, 1, 3/2, 5/2)
    is a PPLRuntimeError naming a parameter of the DSL."""
    if spec.index_valued:
        return  # uniform_draw: its parameter is a list of items, any values
    for i, (pname, ev) in enumerate(zip(spec.params, spec.param_event_dims)):
        for bad in BAD_NUMBERS:
            ps = [torch.tensor(p, dtype=torch.float64) for p in params]
            if ev == 0:
                ps[i] = torch.tensor(bad, dtype=torch.float64)
            else:
                ps[i] = ps[i].clone()
                ps[i].view(-1)[0] = bad
            if not _torch_rejects(spec, ps) or (spec.name, pname, bad) in MORE_PERMISSIVE:
                continue
            with pytest.raises(PPLRuntimeError, match=r"parameter '\w+'") as e:
                spec.make(*ps)
            assert any(f"'{p}'" in str(e.value) for p in spec.params), (label, pname, bad, str(e.value))


# ------------------------------------------------ infinite parameters (issue 9, fuzzing)
@pytest.mark.parametrize("call, param", [  # constants: an inf here is a typo or an overflow
    ("beta(1e400, 2)", "a"),            # 1e400 reads as inf: p was ~1e-38 under sampling
    ("normal(inf, 1)", "loc"),
    ("normal(0, inf)", "scale"),
    ("gamma(2, inf)", "rate"),
    ("uniform(0, inf)", "high"),
    ("student_t(inf, 0, 1)", "df"),
    ("poisson(inf)", "rate"),
    ("normal(0, 10 ** 400)", "scale"),  # an int too large for a float
])
@pytest.mark.parametrize("method", ["importance", "enumerate_or_log_joint"])
def test_an_infinite_parameter_is_a_located_error(call, param, method):
    m = ppl.model(f"def m(k):\n    p ~ {call}\n    return p\n")
    with pytest.raises(ppl.PPLError) as e:
        if method == "importance":
            m.run("importance", {"k": 1}, particles=10, seed=0)
        else:
            m.log_joint({"p": 1.0}, k=1)
    msg = str(e.value)
    assert ":2:5:" in msg and f"parameter '{param}' must be finite" in msg, msg


def test_per_particle_infinite_scale_scores_the_limit_density_zero():
    """exp(s) overflows for the particles with s > 88.7 (float32): their observation scores
    density 0 (the limit as the scale grows), the others are unaffected -- no error."""
    m = ppl.model("def m(y):\n    s ~ normal(80, 10)\n    observe y ~ normal(0, exp(s))\n    return s\n")
    r = m.run("importance", {"y": 1.0}, particles=4000, seed=0)
    s, lw = r.samples["s"], r.log_weights
    assert bool((s > 89).any()) and bool(torch.isneginf(lw[s > 89]).all())
    assert bool(torch.isfinite(lw[s < 88]).all())


def test_infinite_truncation_bounds_stay_legal():
    r = ppl.model("def m():\n    p ~ truncated_normal(0, 1, 0, inf)\n    return p\n").run(
        "importance", particles=20000, seed=0)
    # E[X | X > 0] for a standard normal is sqrt(2 / pi); the draws are exact (weights 1)
    assert abs(r.mean("p") - math.sqrt(2 / math.pi)) < 4 * math.sqrt(1 - 2 / math.pi) / math.sqrt(20000)
