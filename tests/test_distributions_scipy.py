"""Every distribution of the DSL against scipy.stats (issue 9 item 19).

Each case is a DSL call (``student_t(3.0, 1.0, 2.0)``, ``bernoulli(logits=0.7)``) built
through the prelude's constructor (the ``DistValue`` a model gets, keyword
parameterisations included) and a scipy.stats reference written from the README's
parameterisation (``gamma(shape, rate)`` is ``stats.gamma(shape, scale=1 / rate)``;
``negative_binomial(r, p)`` counts successes of probability p before r failures, which
is ``stats.nbinom(r, 1 - p)``; ...). Compared on a small grid of parameters:

* ``log_prob`` (the batched path ``observe`` uses) at quantiles of the reference and at
  points outside its support (-inf there), in float64 to 1e-9 relative and in float32;
* the exact semantics: ``exact_prob`` (pmf, exact Fractions for rational parameters;
  densities for continuous ones) and, where finite, ``exact_support``: the same values
  as scipy's positive-mass points with the same masses, summing to one;
* the support: ``biject_to`` of the torch support maps the real line into scipy's
  support (what MH and the guides walk on), scipy's draws are inside it, points outside
  scipy's support are outside it, and ``support_kind`` names scipy's support;
* sampling (``DistValue.sample``, 20000 draws, fixed seed): the mean and variance within
  Z standard errors (the variance's SE from the reference's kurtosis; moments that do
  not exist are skipped), plus a Kolmogorov-Smirnov test (continuous) or a chi-square
  test on the frequencies (discrete) at p > 1e-4.

Swapping ``student_t``'s df and loc, or p and 1 - p in ``negative_binomial``'s exact pmf,
fails the log_prob / exact_prob checks by orders of magnitude.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction as F

import numpy as np
import pytest
import torch
from scipy import special, stats
from scipy.integrate import quad

from ppl.semantics.dist_values import DistValue
from ppl.semantics.values import Batched, Particles
from ppl.stdlib import prelude
from ppl.stdlib.distributions import DISTRIBUTIONS

torch.set_num_threads(1)
Z = 4.5        # standard errors allowed for moments
P_MIN = 1e-4   # goodness-of-fit p-value below which a sampler is wrong
N_DRAWS = 20_000
_BUILTINS = prelude.builtins()


def dist(name, *args, **kwargs) -> DistValue:
    """What ``name(*args, **kwargs)`` evaluates to in a model."""
    return _BUILTINS[name].fn(Particles.all(1), *args, **kwargs)


# ------------------------------------------------------------ references scipy lacks


class HalfT:
    """|t(df, 0, scale)|."""

    def __init__(self, df, scale):
        self.df, self.t = df, stats.t(df, scale=scale)

    def logpdf(self, x):
        x = np.asarray(x, dtype=float)
        return np.where(x >= 0, math.log(2) + self.t.logpdf(x), -np.inf)

    def cdf(self, x):
        return np.where(np.asarray(x) >= 0, 2 * self.t.cdf(x) - 1, 0.0)

    def ppf(self, q):
        return self.t.ppf((np.asarray(q) + 1) / 2)

    def rvs(self, size, random_state):
        return np.abs(self.t.rvs(size=size, random_state=random_state))

    def support(self):
        return 0.0, math.inf

    def stats(self, moments="mvk"):
        m = quad(lambda x: 2 * x * self.t.pdf(x), 0, math.inf)[0] if self.df > 1 else math.inf
        v = self.t.var() - m ** 2 if self.df > 2 else math.inf
        return m, v, math.nan  # kurtosis: not needed (the variance check is skipped)


def finite_pmf(values, probs):
    """A discrete reference with the given support points and masses."""
    probs = np.asarray(probs, dtype=float)
    return stats.rv_discrete(values=(np.asarray(values), probs / probs.sum()))


def zip_ref(rate, gate):
    ks = np.arange(0, 400)
    return finite_pmf(ks, np.where(ks == 0, gate, 0.0) + (1 - gate) * stats.poisson(rate).pmf(ks))


def softmax(v):
    v = np.asarray(v, dtype=float)
    e = np.exp(v - v.max())
    return e / e.sum()


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    args: tuple
    ref: object
    kwargs: dict = field(default_factory=dict)
    discrete: bool = False
    circular: bool = False
    rtol: float = 1e-9     # log_prob / exact_prob relative tolerance in float64

    @property
    def id(self):
        a = [repr(x) for x in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(a)})"

    def value(self) -> DistValue:
        return dist(self.name, *self.args, **self.kwargs)


def C(name, args, ref, **kw):
    extra = {k: kw.pop(k) for k in ("discrete", "circular", "rtol") if k in kw}
    return Case(name, tuple(args), ref, kw, **extra)


SCALAR_CASES = [
    C("normal", (0.5, 2.0), stats.norm(0.5, 2.0)),
    C("normal", (-3.0, 0.1), stats.norm(-3.0, 0.1)),
    C("lognormal", (0.3, 0.5), stats.lognorm(0.5, scale=math.exp(0.3))),
    C("lognormal", (-1.0, 1.5), stats.lognorm(1.5, scale=math.exp(-1.0))),
    C("half_normal", (1.5,), stats.halfnorm(scale=1.5)),
    C("student_t", (3.0, 1.0, 2.0), stats.t(3.0, 1.0, 2.0)),
    C("student_t", (7.5, -2.0, 0.5), stats.t(7.5, -2.0, 0.5)),
    C("student_t", (5.0,), stats.t(5.0)),  # loc = 0, scale = 1 by default
    C("cauchy", (1.0, 0.5), stats.cauchy(1.0, 0.5)),
    C("laplace", (1.0, 0.5), stats.laplace(1.0, 0.5)),
    C("laplace", (-2.0, 3.0), stats.laplace(-2.0, 3.0)),
    C("uniform", (-1.0, 2.0), stats.uniform(-1.0, 3.0)),
    C("beta", (2.0, 3.0), stats.beta(2.0, 3.0)),
    C("beta", (0.5, 0.7), stats.beta(0.5, 0.7)),
    C("gamma", (2.0, 1.5), stats.gamma(2.0, scale=1 / 1.5)),
    C("gamma", (0.7, 4.0), stats.gamma(0.7, scale=1 / 4.0)),
    C("inverse_gamma", (3.0, 2.0), stats.invgamma(3.0, scale=2.0)),
    C("inverse_gamma", (5.5, 0.5), stats.invgamma(5.5, scale=0.5)),
    C("exponential", (1.5,), stats.expon(scale=1 / 1.5)),
    C("half_cauchy", (2.0,), stats.halfcauchy(scale=2.0)),
    C("half_student_t", (3.0, 2.0), HalfT(3.0, 2.0)),
    C("half_student_t", (6.0,), HalfT(6.0, 1.0)),
    C("truncated_normal", (0.5, 2.0, -1.0, 3.0), stats.truncnorm(-0.75, 1.25, 0.5, 2.0)),
    C("truncated_normal", (1.0, 1.0, 2.5, math.inf), stats.truncnorm(1.5, math.inf, 1.0, 1.0)),
    C("truncated_normal", (0.0, 2.0, -math.inf, -7.0), stats.truncnorm(-math.inf, -3.5, 0.0, 2.0)),
    # torch evaluates log I0(kappa) by a polynomial approximation (relative error ~1e-8)
    C("von_mises", (0.0, 2.0), stats.vonmises_line(2.0), rtol=1e-7),
    C("von_mises", (2.5, 0.8), stats.vonmises(0.8, loc=2.5), circular=True, rtol=1e-7),
    C("weibull", (2.0, 1.5), stats.weibull_min(1.5, scale=2.0)),
    C("weibull", (0.5, 3.0), stats.weibull_min(3.0, scale=0.5)),
    C("pareto", (1.0, 3.0), stats.pareto(3.0, scale=1.0)),
    C("pareto", (2.5, 5.5), stats.pareto(5.5, scale=2.5)),
    C("chi2", (3.0,), stats.chi2(3.0)),
    C("chi2", (0.8,), stats.chi2(0.8)),
    # ---- discrete
    C("bernoulli", (0.3,), stats.bernoulli(0.3), discrete=True),
    C("bernoulli", (), stats.bernoulli(1 / (1 + math.exp(-0.7))), logits=0.7, discrete=True),
    C("flip", (0.8,), stats.bernoulli(0.8), discrete=True),
    C("flip", (), stats.bernoulli(0.5), discrete=True),
    C("binomial", (10, 0.3), stats.binom(10, 0.3), discrete=True),
    C("binomial", (7,), stats.binom(7, 1 / (1 + math.exp(1.2))), logits=-1.2, discrete=True),
    C("beta_binomial", (10, 2.0, 3.0), stats.betabinom(10, 2.0, 3.0), discrete=True),
    C("beta_binomial", (5, 0.5, 0.5), stats.betabinom(5, 0.5, 0.5), discrete=True),
    C("categorical", ([0.2, 0.3, 0.0, 0.5],), finite_pmf([0, 1, 2, 3], [0.2, 0.3, 0.0, 0.5]), discrete=True),
    C("categorical", ([1.0, 2.0, 5.0],), finite_pmf([0, 1, 2], [1, 2, 5]), discrete=True),  # weights
    C("categorical", (), finite_pmf([0, 1, 2], softmax([0.5, -1.0, 2.0])), logits=[0.5, -1.0, 2.0], discrete=True),
    C("uniform_draw", ([10, 20, 30, 40],), finite_pmf([10, 20, 30, 40], [1, 1, 1, 1]), discrete=True),
    C("delta", (2,), finite_pmf([2], [1.0]), discrete=True),
    C("poisson", (3.0,), stats.poisson(3.0), discrete=True),
    C("poisson", (0.4,), stats.poisson(0.4), discrete=True),
    C("geometric", (0.3,), stats.geom(0.3, loc=-1), discrete=True),  # failures before the first success
    C("geometric", (0.85,), stats.geom(0.85, loc=-1), discrete=True),
    C("negative_binomial", (5.0, 0.4), stats.nbinom(5.0, 0.6), discrete=True),  # successes (prob p) before r failures
    C("negative_binomial", (2.5, 0.15), stats.nbinom(2.5, 0.85), discrete=True),
    C("zero_inflated_poisson", (3.0, 0.3), zip_ref(3.0, 0.3), discrete=True),
    C("zero_inflated_poisson", (0.5, 0.1), zip_ref(0.5, 0.1), discrete=True),
]
MULTIVARIATE = {"dirichlet", "mv_normal", "multinomial", "lkj_cholesky"}


def test_every_distribution_and_parameterisation_is_covered():
    covered = {c.name for c in SCALAR_CASES} | MULTIVARIATE
    assert covered == set(DISTRIBUTIONS)
    variants = {(c.name, k) for c in SCALAR_CASES for k in c.kwargs}
    assert variants == {(n, k) for n, s in DISTRIBUTIONS.items() for k in s.keyword_variants}


# --------------------------------------------------------------------- grid helpers


def support_bounds(ref):
    lo, hi = ref.support()
    return float(lo), float(hi)


def scalar_grid(case: Case) -> list:
    """Quantiles of the reference, and points just outside its support."""
    ref = case.ref
    lo, hi = support_bounds(ref)
    if case.discrete:
        ks = sorted({int(k) for k in ref.ppf([0.001, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999]) if np.isfinite(k)})
        pts = ks + [ks[0] - 1, ks[-1] + 1, ks[0] + 0.5]
        if case.name == "uniform_draw":
            pts = [10, 20, 30, 40, 15, 50]
        return pts
    xs = list(ref.ppf([0.001, 0.05, 0.3, 0.5, 0.7, 0.95, 0.999]))
    if math.isfinite(lo):
        xs += [lo - 0.5, lo - 1e-3]
    if math.isfinite(hi):
        xs += [hi + 1e-3, hi + 0.5]
    return xs


def ref_logp(case: Case, x) -> float:
    ref = case.ref
    if case.discrete:
        if float(x) != int(x):
            return -math.inf
        return float(ref.logpmf(int(x)))
    if case.circular and not -math.pi <= x <= math.pi:
        return -math.inf
    return float(ref.logpdf(x))


def as_dsl_value(case: Case, x):
    """The grid point as the DSL value the distribution produces (bool / int / float)."""
    if case.name in ("bernoulli", "flip") and x in (0, 1):
        return bool(x)
    return x


def batched(values, dtype) -> Batched:
    if all(isinstance(v, bool) for v in values):
        t = torch.tensor(values, dtype=torch.bool)
    elif all(float(v) == int(v) for v in values) and not isinstance(values[0], float):
        t = torch.tensor(values, dtype=torch.long)
    else:
        t = torch.tensor([float(v) for v in values], dtype=dtype)
    return Batched(t, torch.arange(len(values)))


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ------------------------------------------------------------------------ log_prob


@pytest.mark.parametrize("case", SCALAR_CASES, ids=lambda c: c.id)
def test_log_prob_matches_scipy(case, float64):
    grid = scalar_grid(case)
    d = case.value()
    if case.discrete and case.name not in ("bernoulli", "flip", "uniform_draw"):
        # integral points as ints, the rest as floats: scored separately, as a model would
        groups = [[x for x in grid if float(x) == int(x)], [float(x) for x in grid if float(x) != int(x)]]
    elif case.name in ("bernoulli", "flip"):
        groups = [[as_dsl_value(case, x) for x in grid if x in (0, 1)], [float(x) for x in grid if x not in (0, 1)]]
    else:
        groups = [grid]
    for pts in groups:
        if not pts:
            continue
        lp = d.log_prob(batched(pts, torch.float64), Particles.all(len(pts))).tolist()
        for x, got in zip(pts, lp):
            want = ref_logp(case, float(x))
            if want == -math.inf:
                assert got == -math.inf, f"{case.id} at {x}: {got} (scipy: -inf)"
            else:
                assert got == pytest.approx(want, rel=case.rtol, abs=case.rtol), f"{case.id} at {x}"


@pytest.mark.parametrize("case", [c for c in SCALAR_CASES if not c.discrete], ids=lambda c: c.id)
def test_log_prob_float32(case):
    """The default dtype: the same densities to float32 precision."""
    xs = [x for x in scalar_grid(case) if np.isfinite(ref_logp(case, x))]
    lp = case.value().log_prob(batched(xs, torch.float32), Particles.all(len(xs)))
    assert lp.dtype in (torch.float32, torch.float64)
    want = np.array([ref_logp(case, float(np.float32(x))) for x in xs])
    np.testing.assert_allclose(lp.double().numpy(), want, rtol=2e-4, atol=2e-4, err_msg=case.id)


# ------------------------------------------------------------------ exact semantics


def _rational(a):
    """A float that spells a short decimal as that Fraction (as the exact semantics reads
    literals); lists elementwise; anything else unchanged."""
    if isinstance(a, list):
        return [_rational(x) for x in a]
    if isinstance(a, float) and math.isfinite(a) and a == round(a, 6):
        return F(repr(a))
    return a


def _exact_args(case: Case):
    return [_rational(a) for a in case.args]


@pytest.mark.parametrize("case", SCALAR_CASES, ids=lambda c: c.id)
def test_exact_prob_matches_scipy(case, float64):
    d = case.value()
    exact = DistValue(d.spec, tuple(_exact_args(case)) + d.args[len(case.args):], d.defaulted)
    for x in scalar_grid(case):
        for dv in (d, exact):
            p = dv.exact_prob(as_dsl_value(case, x))
            want = math.exp(ref_logp(case, float(x)))
            assert float(p) == pytest.approx(want, rel=case.rtol, abs=1e-12), f"{case.id} at {x}: {p} vs {want}"
    # rational parameters give exact Fractions where the pmf is rational (not Poisson's; not a
    # negative binomial with a non-integer total_count; logits never)
    rational_pmf = case.discrete and not case.kwargs and case.name not in ("poisson", "zero_inflated_poisson") \
        and not (case.name == "negative_binomial" and exact.args[0] != int(exact.args[0]))
    for x in scalar_grid(case):
        p = exact.exact_prob(as_dsl_value(case, x))
        assert isinstance(p, F) == rational_pmf or p == 0, f"{case.id} at {x}: {p!r}"  # an exact 0 off the support


@pytest.mark.parametrize("case", [c for c in SCALAR_CASES if c.discrete and DISTRIBUTIONS[c.name].finite_support],
                         ids=lambda c: c.id)
def test_exact_support_matches_scipy(case):
    d = case.value()
    got = {(int(v) if not isinstance(v, bool) else int(v)): float(p) for v, p in d.exact_support()}
    lo, hi = support_bounds(case.ref)
    lo, hi = (10, 40) if case.name == "uniform_draw" else (int(lo), int(hi))
    want = {k: float(case.ref.pmf(k)) for k in range(lo, hi + 1) if case.ref.pmf(k) > 0}
    assert set(got) == set(want), case.id
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-15), f"{case.id} at {k}"
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-12)


# -------------------------------------------------------------------------- supports

_KIND_BOUNDS = {"real": (-math.inf, math.inf), "positive": (0.0, math.inf), "unit_interval": (0.0, 1.0)}


@pytest.mark.parametrize("case", SCALAR_CASES, ids=lambda c: c.id)
def test_support_matches_scipy(case, float64):
    d = case.value()
    spec = d.spec
    support = d.torch_dist(Particles.all(1)).support
    lo, hi = support_bounds(case.ref)
    if case.circular:
        lo, hi = -math.pi, math.pi
    kind = spec.support_kind
    if kind in _KIND_BOUNDS:
        assert (lo, hi) == _KIND_BOUNDS[kind], case.id
    elif kind == "interval":
        assert math.isfinite(lo) or math.isfinite(hi), case.id
    elif kind == "lower_bounded":
        assert math.isfinite(lo) and hi == math.inf, case.id
    elif kind == "integer":
        assert lo == 0 and (hi == math.inf or case.name == "zero_inflated_poisson"), case.id  # (a finite table)
    else:
        assert kind in ("boolean", "finite") and math.isfinite(hi), case.id
    draws = np.asarray(case.ref.rvs(size=200, random_state=np.random.default_rng(0)), dtype=float)
    if case.circular:
        draws = np.mod(draws + math.pi, 2 * math.pi) - math.pi
    if spec.index_valued:  # torch's values are indices into the items
        draws = np.searchsorted(np.asarray(case.args[0], dtype=float), draws)
        lo, hi = 0, len(case.args[0]) - 1
    assert bool(support.check(torch.as_tensor(draws)).all()), f"{case.id}: scipy's draws outside the support"
    outside = [x for x in ([lo - 0.5] if math.isfinite(lo) else []) + ([hi + 0.5] if math.isfinite(hi) else [])]
    if outside and case.name != "delta":  # pyro's Delta says "real"; its log_prob is -inf off the point
        assert not bool(support.check(torch.tensor(outside)).any()), f"{case.id}: support too wide"
    if not support.is_discrete and case.name != "delta":  # what MH and the guides walk on: the real line onto the support
        x = torch.distributions.biject_to(support)(torch.linspace(-8, 8, 41, dtype=torch.float64))
        lp = np.array([ref_logp(case, float(v)) for v in x])
        assert np.isfinite(lp).all(), f"{case.id}: biject_to(support) leaves scipy's support"


# -------------------------------------------------------------------------- sampling


def _draws(case: Case, seed=0) -> np.ndarray:
    torch.manual_seed(seed)
    d = case.value()
    v = d.sample(Particles.all(N_DRAWS))
    return np.asarray(torch.as_tensor(v.t if hasattr(v, "t") else v).double().numpy())


@pytest.mark.parametrize("case", SCALAR_CASES, ids=lambda c: c.id)
def test_sampling_matches_scipy(case):
    x = _draws(case)
    assert x.shape == (N_DRAWS,)
    ref = case.ref
    if case.circular:  # E[cos(x - loc)] = I1(k) / I0(k), E[sin(x - loc)] = 0
        loc, kappa = case.args
        a = special.i1(kappa) / special.i0(kappa)
        c, s = np.cos(x - loc), np.sin(x - loc)
        assert abs(c.mean() - a) <= Z * c.std() / math.sqrt(N_DRAWS), case.id
        assert abs(s.mean()) <= Z * s.std() / math.sqrt(N_DRAWS), case.id
        assert ((x >= -math.pi) & (x <= math.pi)).all()
        return
    m, v, k = (float(t) for t in ref.stats(moments="mvk"))
    if math.isfinite(v) and v > 0:
        assert abs(x.mean() - m) <= Z * math.sqrt(v / N_DRAWS), f"{case.id} mean {x.mean()} vs {m}"
        if math.isfinite(k):  # Var of the unbiased sample variance: (mu4 - v^2 (N - 3) / (N - 1)) / N
            n = N_DRAWS
            se = math.sqrt(((k + 3) * v * v - v * v * (n - 3) / (n - 1)) / n)
            assert abs(x.var(ddof=1) - v) <= Z * se, f"{case.id} variance {x.var(ddof=1)} vs {v}"
    elif v == 0:
        assert (x == m).all(), case.id
    if case.discrete:
        ks, counts = np.unique(x, return_counts=True)
        pmf = ref.pmf(ks)
        assert (pmf > 0).all(), f"{case.id}: draws outside the support: {ks[pmf == 0]}"
        expected = N_DRAWS * pmf
        big = expected >= 5
        if big.sum() >= 2:  # chi-square over the well-populated values plus the rest pooled
            obs = np.append(counts[big], counts[~big].sum() + 0.0)
            exp = np.append(expected[big], N_DRAWS - expected[big].sum())
            keep = exp > 0
            p = stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue
            assert p > P_MIN, f"{case.id}: chi-square p = {p:.2g}"
    else:
        p = stats.kstest(x, ref.cdf).pvalue
        assert p > P_MIN, f"{case.id}: Kolmogorov-Smirnov p = {p:.2g}"


# ---------------------------------------------------------------------- multivariate


def _score(d: DistValue, values) -> list:
    t = torch.as_tensor(values, dtype=torch.get_default_dtype())
    if d.spec.value_dtype == "long":
        t = t.long() if bool((t == t.round()).all()) else t
    return d.log_prob(Batched(t, torch.arange(t.shape[0])), Particles.all(t.shape[0])).tolist()


def _sample_rows(d: DistValue, seed=0) -> np.ndarray:
    torch.manual_seed(seed)
    v = d.sample(Particles.all(N_DRAWS))
    return torch.as_tensor(v.t if hasattr(v, "t") else v).double().numpy()


def _check_mean_cov(x: np.ndarray, mean, cov, what):
    mean, cov = np.asarray(mean), np.asarray(cov)
    se = np.sqrt(np.diag(cov) / x.shape[0])
    assert (np.abs(x.mean(0) - mean) <= Z * se + 1e-12).all(), f"{what} mean {x.mean(0)} vs {mean}"
    # entries of the covariance: SE of a sample covariance ~ sqrt((s_ii s_jj + s_ij^2) / N) (Gaussian
    # approximation; 20000 draws and Z = 4.5 leave room for moderate excess kurtosis)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / x.shape[0])
    assert (np.abs(np.cov(x.T) - cov) <= 2 * Z * se_cov + 1e-12).all(), f"{what} covariance"


@pytest.mark.parametrize("alpha", [[1.0, 2.0, 3.0], [0.5, 0.5, 4.0, 1.5]])
def test_dirichlet(alpha, float64):
    d = dist("dirichlet", alpha)
    ref = stats.dirichlet(alpha)
    pts = stats.dirichlet(alpha).rvs(size=5, random_state=1)
    np.testing.assert_allclose(_score(d, pts), ref.logpdf(pts.T), rtol=1e-9)
    off = np.array(pts[:1]) * 1.1  # off the simplex
    assert _score(d, off) == [-math.inf]
    assert d.exact_prob(pts[0].tolist()) == pytest.approx(ref.pdf(pts[0]), rel=1e-9)
    x = _sample_rows(d)
    _check_mean_cov(x, ref.mean(), ref.cov() if hasattr(ref, "cov") else np.diag(ref.var()), "dirichlet")


@pytest.mark.parametrize("mean, cov", [([0.0, 1.0], [[2.0, 0.5], [0.5, 1.0]]),
                                       ([1.0, -1.0, 0.5], [[1.0, 0.3, 0.0], [0.3, 2.0, -0.4], [0.0, -0.4, 0.5]])])
def test_mv_normal(mean, cov, float64):
    d = dist("mv_normal", mean, cov)
    ref = stats.multivariate_normal(mean, cov)
    pts = ref.rvs(size=5, random_state=2)
    np.testing.assert_allclose(_score(d, pts), ref.logpdf(pts), rtol=1e-9)
    assert d.exact_prob(list(pts[0])) == pytest.approx(ref.pdf(pts[0]), rel=1e-9)
    _check_mean_cov(_sample_rows(d), mean, cov, "mv_normal")


@pytest.mark.parametrize("n, probs", [(4, [1, 2, 0, 1]), (6, [F(1, 5), F(3, 10), F(1, 2)])])
def test_multinomial(n, probs, float64):
    p = np.array([float(w) for w in probs]) / float(sum(probs))
    ref = stats.multinomial(n, p)
    exact = dist("multinomial", n, probs)
    support = exact.exact_support()
    want = {}
    for c in np.ndindex(*(n + 1,) * len(p)):
        if sum(c) == n and ref.pmf(c) > 0:
            want[tuple(int(k) for k in c)] = ref.pmf(c)
    got = {tuple(v): pr for v, pr in support}
    assert set(got) == set(want)
    assert sum(got.values()) == 1 and all(isinstance(pr, F) for pr in got.values())  # exact
    for c, pr in got.items():
        assert float(pr) == pytest.approx(want[c], rel=1e-12)
        assert exact.exact_prob(list(c)) == pr
    d = dist("multinomial", float(n), [float(w) for w in probs])
    vals = list(want) + [(n,) + (1,) * (len(p) - 1), (n - 1,) + (0,) * (len(p) - 1)]  # sums n + k - 1, n - 1
    lp = _score(d, vals)
    np.testing.assert_allclose(lp[:len(want)], np.log(list(want.values())), rtol=1e-9)
    assert lp[len(want):] == [-math.inf, -math.inf]  # sums other than n are outside the support
    assert exact.exact_prob(list(vals[-1])) == 0
    x = _sample_rows(d)
    assert (x.sum(1) == n).all()
    _check_mean_cov(x, ref.mean(), ref.cov(), "multinomial")


def test_lkj_cholesky_against_beta(float64):
    """d = 2: L[1][0] = r with (r + 1) / 2 ~ Beta(eta, eta), the density with respect to
    r. d = 3: each correlation R_ij has the marginal Beta(b, b) on [-1, 1], b = eta + 1/2."""
    eta = 2.5
    d = dist("lkj_cholesky", 2, eta)
    rs = np.array([-0.9, -0.3, 0.0, 0.4, 0.95])
    Ls = [[[1.0, 0.0], [r, math.sqrt(1 - r * r)]] for r in rs]
    np.testing.assert_allclose(_score(d, Ls), stats.beta(eta, eta).logpdf((rs + 1) / 2) - math.log(2), rtol=1e-9)
    assert _score(d, [[[1.0, 0.0], [0.5, 0.5]]]) == [-math.inf]  # rows must have unit norm
    assert d.exact_prob(Ls[1]) == pytest.approx(stats.beta(eta, eta).pdf((rs[1] + 1) / 2) / 2, rel=1e-9)
    r2 = _sample_rows(d)[:, 1, 0]
    assert stats.kstest((r2 + 1) / 2, stats.beta(eta, eta).cdf).pvalue > P_MIN
    L3 = torch.as_tensor(_sample_rows(dist("lkj_cholesky", 3, eta), seed=1))
    R = (L3 @ L3.transpose(-1, -2)).numpy()
    b = eta + 0.5
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert stats.kstest((R[:, i, j] + 1) / 2, stats.beta(b, b).cdf).pvalue > P_MIN, (i, j)
    support = dist("lkj_cholesky", 3, eta).torch_dist(Particles.all(1)).support
    u = torch.randn(50, 3, dtype=torch.float64)
    assert bool(support.check(torch.distributions.biject_to(support)(u)).all())
