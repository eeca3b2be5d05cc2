"""Every guide family on constrained sites (issue 9, item 20).

A guide proposes a constrained value x = T(u) (exp for positive sites, a sigmoid for the
unit interval, stick-breaking for the simplex; ``inference/guides.py``), so its density on
x is q_u(u) / |det dT/du|. Dropping that log-det leaves every family running with finite,
plausible-looking weights and a wrong answer. For each family (``normal``: mean-field,
``lowrank``, ``flow``) and each kind of support, trained briefly with the ELBO:

* (i) q integrates to 1 on the constrained space: trapezoid rule over x on a grid that
  is uniform in u = T^-1(x) (1-D sites; 2-D for the joint model, where the low-rank
  correlation and the flow's autoregressive layer act; not for the simplex, whose 2-D
  support (ii) and (iii) cover), through ``Guide.log_prob``;
* (ii) the proposal path and the scoring path agree: the log weights of guide-IS are
  log p(x, y) - log q(x), so ``Model.log_joint(x) - log w`` must equal
  ``Guide.log_prob(x)`` particle by particle;
* (iii) guide-IS against closed forms (gamma-Poisson, beta-binomial, both at once,
  Dirichlet-categorical): posterior means within 4.5 Monte Carlo SEs (sd / sqrt(ESS)),
  and the evidence identity E_q[(p / q) 1{x in A}] = Z P_post(A) (A: the box of the
  central 95% posterior intervals, where the weights are bounded) within 4.5 SEs of the
  truncated weights' own sd.

Then the checks are shown to catch the bug: with the constraint transform's log-det
replaced by zeros (monkeypatched: the guide is trained correctly, then used broken), (i)
and (iii) fail for every family; with it dropped from the proposal path only, (ii) and
(iii) fail. Before these tests only the mean-field family was checked this way
(``tests/test_amortized.py::test_constrained_sites``).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from scipy import stats
from torch.distributions import biject_to

import ppl
from ppl.inference import amortized, guides

torch.set_num_threads(1)
# guides on constrained sites (Pareto k of log-normal-like tails) and deliberately broken variants
# trip the diagnostic warnings; their own tests are in tests/test_diagnostics.py
pytestmark = pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning")

FAMILIES = ("normal", "lowrank", "flow")
N = 4000          # importance-sampling particles
Z_CRIT = 4.5      # |z| bound for a Monte Carlo estimate against its closed form
QUAD_TOL = 1e-3   # the quadrature's own error is ~1e-5 (h = 0.01 sd of q_u; see _grid)

# ------------------------------------------------------------------ the models
GAMMA_POISSON = """
def gp(ks):
    rate ~ gamma(2, 1)
    for k in ks:
        observe k ~ poisson(rate)
    return rate
"""
BETA_BINOMIAL = """
def bb(ns, ks):
    p ~ beta(2, 3)
    for i in range(len(ns)):
        observe ks[i] ~ binomial(ns[i], p)
    return p
"""
JOINT = """
def both(ks, ns, hs):
    rate ~ gamma(2, 1)
    p ~ beta(2, 3)
    for k in ks:
        observe k ~ poisson(rate)
    for i in range(len(ns)):
        observe hs[i] ~ binomial(ns[i], p)
    return rate
"""
DIRICHLET = """
def dc(cs):
    theta ~ dirichlet([1.0, 2.0, 3.0])
    for c in cs:
        observe c ~ categorical(theta)
    return theta
"""
KS = [3, 5, 2, 4, 6]
NS, HS = [10, 8, 12], [7, 5, 9]
CS = [0, 2, 2, 1, 2, 0, 2, 1]


def gamma_poisson(ks, a=2.0, b=1.0):
    """Posterior mean of the rate and log Z of the gamma(a, b)-Poisson model."""
    s, n = sum(ks), len(ks)
    log_z = (a * math.log(b) - math.lgamma(a) + math.lgamma(a + s) - (a + s) * math.log(b + n)
             - sum(math.lgamma(k + 1) for k in ks))
    return (a + s) / (b + n), log_z


def _lbeta(a, b):
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def beta_binomial(ns, hs, a=2.0, b=3.0):
    """Posterior mean of p and log Z of the beta(a, b)-binomial model."""
    h, n = sum(hs), sum(ns)
    log_choose = sum(math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) for m, k in zip(ns, hs))
    return (a + h) / (a + b + n), log_choose + _lbeta(a + h, b + n - h) - _lbeta(a, b)


def dirichlet_categorical(cs, alpha=(1.0, 2.0, 3.0)):
    """Posterior mean of theta and log Z of the Dirichlet-categorical model."""
    post = [a + sum(1 for c in cs if c == i) for i, a in enumerate(alpha)]
    log_z = (math.lgamma(sum(alpha)) - math.lgamma(sum(post))
             + sum(math.lgamma(p) - math.lgamma(a) for p, a in zip(post, alpha)))
    return [p / sum(post) for p in post], log_z


GP_MEAN, GP_LOGZ = gamma_poisson(KS)
BB_MEAN, BB_LOGZ = beta_binomial(NS, HS)
DC_MEAN, DC_LOGZ = dirichlet_categorical(CS)
GP_POST = stats.gamma(2 + sum(KS), scale=1 / (1 + len(KS)))
BB_POST = stats.beta(2 + sum(HS), 3 + sum(NS) - sum(HS))

# name -> (source, data, {address: [posterior mean per element]}, log Z,
#          {address: its posterior marginal (scipy) for the evidence check, or none})
CASES = {
    "positive": (GAMMA_POISSON, {"ks": KS}, {"rate": [GP_MEAN]}, GP_LOGZ, {"rate": GP_POST}),
    "unit_interval": (BETA_BINOMIAL, {"ns": NS, "ks": HS}, {"p": [BB_MEAN]}, BB_LOGZ, {"p": BB_POST}),
    "joint": (JOINT, {"ks": KS, "ns": NS, "hs": HS}, {"rate": [GP_MEAN], "p": [BB_MEAN]}, GP_LOGZ + BB_LOGZ,
              {"rate": GP_POST, "p": BB_POST}),
    "simplex": (DIRICHLET, {"cs": CS}, {"theta": DC_MEAN}, DC_LOGZ, {}),
}


@functools.lru_cache(maxsize=None)
def trained(case: str, family: str):
    """(model, data, guide): the guide fitted with the ELBO (300 steps; shared by the
    tests of this file, so each is trained once)."""
    src, data = CASES[case][:2]
    m = ppl.model(src)
    g = ppl.guide(m, data, family=family).fit(data, objective="elbo", steps=300, seed=0, progress=False)
    return m, data, g


# ------------------------------------------------------------------ the checks
def _grid(g, data, addr, n):
    """Points x on the support of a 1-D site, uniform in u = T^-1(x) over the guide's
    own draws' mean +- 10 sd (q_u is a trained, near-Gaussian density, so the mass
    outside is negligible), with spacing h = 20 sd / n."""
    t = biject_to(g.layout.by_addr[addr].support)
    u = t.inv(g.posterior(data, particles=2000, seed=7).samples[addr].double())
    u = u[torch.isfinite(u)]
    m, s = float(u.mean()), float(u.std())
    return t(torch.linspace(m - 10 * s, m + 10 * s, n, dtype=torch.float64))


def quadrature(g, data) -> float:
    """The integral of exp(log q(x)) over the constrained space (1-D or 2-D), by the
    trapezoid rule in x."""
    addrs = g.sites
    if len(addrs) == 1:
        x = _grid(g, data, addrs[0], 4001)
        dens = g.log_prob({addrs[0]: x.float()}, data).double().exp()
        return float(torch.trapezoid(dens, x))
    a, b = addrs
    xa, xb = _grid(g, data, a, 401), _grid(g, data, b, 401)
    ga, gb = torch.meshgrid(xa, xb, indexing="ij")
    dens = g.log_prob({a: ga.reshape(-1).float(), b: gb.reshape(-1).float()}, data).double().exp()
    return float(torch.trapezoid(torch.trapezoid(dens.reshape(401, 401), xb, dim=1), xa))


def path_mismatch(m, data, g, r) -> float:
    """max |(log p(x, y) - log w) - log q(x)| over the particles of guide-IS result r:
    the proposal path's log q against the scoring path's."""
    trace = {a: r.samples[a] for a in g.sites}
    log_q_proposal = m.log_joint(trace, **data).double() - r.log_weights.double()
    log_q_scored = g.log_prob(trace, data).double()
    return float((log_q_proposal - log_q_scored).abs().max())


def is_z_scores(r, means, log_z, posts) -> dict:
    """z-scores of guide-IS against the closed forms.

    Each posterior mean: SE sd / sqrt(ESS). The evidence: E_q[w 1{x in A}] = Z P_post(A)
    for the box A of the central 95% posterior interval of each site in ``posts``
    (independent under the posterior, so P_post(A) = 0.95^k), SE from the sd of the
    truncated weights. The truncation keeps the CLT honest at N = 4000: over the whole
    support the weights p/q of a Gaussian q_u against a gamma or beta posterior
    (exponential tails in u) have infinite variance, and an ELBO-fitted flow is light in
    the tails (weights up to 47x their mean inside the central 99.9%, skewing the mean
    low by up to 5 "SEs"); inside the 95% box the largest weight is below 2x the mean
    for every family here (10 seeds)."""
    z = {}
    w = torch.softmax(r.log_weights.double(), 0)
    for addr, mean in means.items():
        x = r.samples[addr].double().reshape(N, -1)
        for i, mu in enumerate(mean):
            est = float((w * x[:, i]).sum())
            sd = math.sqrt(float((w * (x[:, i] - est) ** 2).sum()))
            z[f"{addr}[{i}]"] = (est - mu) / (sd / math.sqrt(r.ess))
    if posts:
        inside = torch.ones(N, dtype=torch.bool)
        for addr, post in posts.items():
            lo, hi = post.ppf(0.025), post.ppf(0.975)
            x = r.samples[addr].double()
            inside &= (x >= lo) & (x <= hi)
        ratio = torch.exp(r.log_weights.double() - log_z) * inside   # E = P_post(A)
        se = float(ratio.std()) / math.sqrt(N)
        z["Z"] = (float(ratio.mean()) - 0.95 ** len(posts)) / se
    return z


def run_checks(case, family):
    """All checks of one trained guide: (integral or None, path mismatch, z-scores)."""
    _, _, means, log_z, posts = CASES[case]
    m, data, g = trained(case, family)
    integral = quadrature(g, data) if case != "simplex" else None
    r = m.run("importance", data, particles=N, seed=1, proposal=g)
    return integral, path_mismatch(m, data, g, r), is_z_scores(r, means, log_z, posts)


# -------------------------------------------------------------- correct guides
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_guide_family_on_constrained_sites(case, family):
    integral, mismatch, z = run_checks(case, family)
    print(f"\n{family:8s} {case:13s} integral {integral}, path mismatch {mismatch:.2e}, "
          f"z {', '.join(f'{k} {v:+.2f}' for k, v in z.items())}")
    if integral is not None:
        assert abs(integral - 1) < QUAD_TOL
    # float32 log densities of magnitude ~50: a few ulps
    assert mismatch < 1e-3
    assert all(abs(v) < Z_CRIT for v in z.values()), z


# ------------------------------------------------------ the bug, reintroduced
class _NoLogDet:
    """A constraint transform whose log |det dT/du| reads 0 (the bug of item 20)."""

    def __init__(self, t):
        self.t = t

    def __call__(self, u):
        return self.t(u)

    def inv(self, x):
        return self.t.inv(x)

    def log_abs_det_jacobian(self, u, x):
        return torch.zeros_like(self.t.log_abs_det_jacobian(u, x))


def _no_ldj(ldj, B=None):
    """``_sum_ldj`` returning zeros of its shape."""
    return torch.zeros_like(guides._sum_ldj(ldj, B))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["positive", "unit_interval"])
def test_checks_fail_without_the_log_det(case, family, monkeypatch):
    trained(case, family)  # trained with the correct density, then used broken
    monkeypatch.setattr(guides.SiteInfo, "transform", property(lambda s: _NoLogDet(biject_to(s.support))))
    integral, mismatch, z = run_checks(case, family)
    print(f"\nlog-det dropped: {family:8s} {case:13s} integral {integral:.3f}, "
          f"z {', '.join(f'{k} {v:+.1f}' for k, v in z.items())}")
    assert abs(integral - 1) > 0.1                         # no longer a density on x
    assert all(abs(v) > Z_CRIT for v in z.values()), z     # biased mean and evidence


@pytest.mark.parametrize("family", FAMILIES)
def test_checks_fail_without_the_log_det_in_the_proposal_only(family, monkeypatch):
    trained("joint", family)
    monkeypatch.setattr(amortized, "_sum_ldj", _no_ldj)    # the proposal path's log-det
    integral, mismatch, z = run_checks("joint", family)
    print(f"\nproposal log-det dropped: {family:8s} integral {integral:.4f}, mismatch {mismatch:.2f}, "
          f"z {', '.join(f'{k} {v:+.1f}' for k, v in z.items())}")
    assert abs(integral - 1) < QUAD_TOL                    # Guide.log_prob is still right ...
    assert mismatch > 0.1                                  # ... but the proposal disagrees with it
    assert abs(z["Z"]) > Z_CRIT and max(abs(v) for v in z.values()) > Z_CRIT
