"""Single-site trace Metropolis-Hastings (``inference/mh.py``).

Exact checks (finite programs): ``ppl.testing.validity.mh_kernel_check`` builds the
kernel's transition matrix K by enumerating every draw of one MH step (site choice,
proposal, accept/reject) from every trace of the program, and the exact posterior pi by
enumerating the program. Then pi K = pi (invariance), pi(x) K(x, y) = pi(y) K(y, x)
(detailed balance) and every row of K sums to one must hold to float64 rounding
(1e-12): they are finite sums, not estimates. Programs cover a fixed trace shape, random
control flow that samples different addresses on different branches, recursion and
loops with a random number of choices, ``mem``, every finite distribution, observes,
conditions and factors, plus generated programs (``finite_programs()``). Kernels that
are wrong (no Hastings correction, always accepting, a site choice among the wrong
number of sites) must fail the same check by a wide margin.

Statistical checks, for the prior kernel and the random-walk kernel: MH posterior means
against closed forms (Beta-Bernoulli, lopsided so that a missing Jacobian of the logit
walk shows; Normal-mean; Gamma-Poisson, a log walk; the conditioned geometric recursion)
and against quadrature (a continuous choice that decides whether another exists) or a
grid (the mixture example), within Z = 4.5 Monte Carlo standard errors with
MCSE = posterior sd / sqrt(ESS), ESS the autocorrelation-aware MCMC effective sample
size (``pyro.ops.stats``, over all chains) that the result reports. A posterior
variance is checked as the mean of g = (x - exact mean)^2, with SE = sd(g) / sqrt(ESS
of g). A probability p is checked within Z * sqrt(p (1 - p) / ESS of the indicator).
Seeds are fixed, so every test is deterministic. Plus: acceptance rates, split R-hat,
the burn-in/thinning layout (checked draw for draw against an unthinned run),
reproducibility, and the command line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from scipy.integrate import quad
from scipy.stats import norm

import ppl
from ppl import cli
from ppl.inference import mh as mh_mod
from ppl.testing.montecarlo import describe, mcmc_chains, mcmc_ess

# short or deliberately poor runs (checked for correctness, not efficiency) trip the diagnostic
# warnings; their own tests are in tests/test_diagnostics.py
pytestmark = pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning")
from ppl.testing.strategies import finite_programs
from ppl.testing.validity import mh_kernel_check

torch.set_num_threads(1)
# the interpreter raises the recursion limit on first use; do it before hypothesis runs
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
Z = 4.5       # standard errors allowed
EXACT = 1e-12  # the exact kernel checks: float64 rounding of finite sums


# =========================================================================== exact checks
FINITE = {
    # a fixed trace shape: every trace has the addresses a, b, c
    "fixed_shape": """
def model():
    a ~ flip(0.3)
    b ~ categorical([1, 2, 3])
    c ~ binomial(2, 0.6 if a else 0.2)
    observe (b + c) % 3 ~ categorical([3, 1, 2])
    return a
""",
    # random control flow: the branches sample different addresses (2 or 3 choices)
    "branches": """
def model():
    a ~ flip(0.4)
    if a:
        b ~ categorical([1, 2, 3])
        observe b ~ categorical([3, 2, 1])
    else:
        c ~ binomial(2, 0.3)
        d ~ flip(0.5)
        observe c > 0 ~ bernoulli(0.8)
    return a
""",
    # recursion with a varying number of choices: a geometric bounded at depth 4,
    # conditioned away from 0 (the address of each flip is its call path)
    "bounded_geometric": """
def geom(p, depth):
    b ~ flip(p)
    if b or depth >= 4:
        return 0
    return 1 + geom(p, depth + 1)

def model():
    n = geom(0.4, 0)
    condition n >= 1
    return n
""",
    # a for loop whose length is random
    "random_loop_length": """
def model():
    k ~ binomial(2, 0.5)
    s = 0
    for i in range(k + 1):
        x ~ flip(0.3)
        s = s + (1 if x else 0)
    observe s ~ binomial(3, 0.4)
    return s
""",
    # a while loop: the number of rolls is random, and a condition rejects overshoots
    "while_condition": """
def model():
    total = 0
    n = 0
    while total < 4:
        r ~ uniform_draw([1, 2, 3])
        total = total + r
        n = n + 1
    condition total == 4
    return n
""",
    # mem: the same key reuses one choice; which keys exist is random
    "mem": """
def model():
    bias = mem(lambda k: sample(categorical([1, 2, 1])))
    total = 0
    for i in range(2):
        k ~ uniform_draw([0, 1])
        total = total + bias(k)
    observe total % 3 ~ categorical([1, 2, 3])
    return total
""",
    # uniform_draw of numbers, a factor, a condition with an escape, and data
    "data_factor_condition": """
def model(obs):
    v ~ uniform_draw([-1, 0, 2])
    m ~ binomial(2, 0.5)
    factor 0.5 if v > 0 else -0.25
    ok ~ flip(0.75)
    condition v + m >= 1 or ok
    for o in obs:
        observe o ~ bernoulli(0.8 if m >= 1 else 0.3)
    return v + m
""",
}
DATA = {"data_factor_condition": {"obs": [True, False, True]}}
SHAPE_CHANGING = ["branches", "bounded_geometric", "random_loop_length", "while_condition", "mem"]


def kernel_report(kc) -> str:
    return (f"invariance {kc.invariance_error:.3g}, detailed balance {kc.balance_error:.3g}, "
            f"row sums {kc.row_sum_error:.3g} over {len(kc.pi)} traces")


def assert_exact_kernel(kc, what=""):
    assert kc.invariance_error <= EXACT, f"{what}: pi K != pi: {kernel_report(kc)}"
    assert kc.row_sum_error <= EXACT, f"{what}: rows of K do not sum to 1: {kernel_report(kc)}"
    assert kc.balance_error <= EXACT, f"{what}: detailed balance fails: {kernel_report(kc)}"
    assert kc.ok(EXACT)
    # the check is not vacuous: the posterior has several traces and the chain moves
    assert len(kc.pi) >= 2
    assert abs(sum(kc.pi.values()) - 1) <= EXACT
    assert any(x != y and k > 0 for (x, y), k in kc.K.items()), f"{what}: the kernel never moves"


@pytest.mark.parametrize("name", list(FINITE))
def test_kernel_exact(name):
    m = ppl.model(FINITE[name])
    kc = mh_kernel_check(m, DATA.get(name))
    assert_exact_kernel(kc, name)
    shapes = {tuple(a for a, _ in key) for key in kc.pi}
    if name in SHAPE_CHANGING:
        assert len(shapes) > 1, f"{name} should have traces of different shapes"
    else:
        assert len(shapes) == 1


def test_kernel_exact_on_the_dice_example():
    """The shipped example with a random-length while loop, with a small target."""
    m = ppl.model(str(EXAMPLES / "dice.ppl"))
    assert_exact_kernel(mh_kernel_check(m, {"target": 4}), "dice.ppl")


@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(finite_programs())
def test_kernel_exact_generated(src):
    m = ppl.model(src)
    exact = m.run("enumerate")
    traces = {tuple(sorted((a, repr(v)) for a, v in vals.items() if a != "return")) for _, vals in exact.paths}
    assume(max(len(t) for t in traces) > 0)  # some random choice survives
    assume(len(traces) <= 40)               # the enumeration of K stays quick
    kc = mh_kernel_check(m)
    assert kc.invariance_error <= EXACT and kc.row_sum_error <= EXACT and kc.balance_error <= EXACT, \
        f"{kernel_report(kc)}\n{src}"


# ------------------------------------------------------------------ broken kernels fail
class _Delegate:
    """A randomness that forwards everything to the enumerating one it wraps."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _AlwaysAccept(_Delegate):
    def accept(self, log_alpha):
        return torch.ones(log_alpha.shape, dtype=torch.bool, device=log_alpha.device)


class _OneSiteTooMany(_Delegate):
    """Picks a site among |x| + 1 (the extra one: no site, the chain stays), while the
    acceptance ratio assumes a choice among |x|."""

    def choose(self, sizes):
        return self.inner.choose(sizes + 1)


def _step_with(randomness_cls):
    def step(interp, entry, data, state, rnd):
        new, _ = mh_mod.mh_step(interp, entry, data, state, "cpu", randomness=randomness_cls(rnd))
        return new
    return step


class _CountsOneMore(mh_mod.MHState):
    """A state whose site count is off by one: used for the site choice and for the
    |x| / |x'| term alike."""

    @property
    def sizes(self):
        return super().sizes + 1


def _overcounting_step(interp, entry, data, state, rnd):
    bad = _CountsOneMore(**{f.name: getattr(state, f.name) for f in dataclasses.fields(state)})
    new, _ = mh_mod.mh_step(interp, entry, data, bad, "cpu", randomness=rnd)
    return new


def test_missing_hastings_correction_is_caught():
    m = ppl.model(FINITE["branches"])
    assert_exact_kernel(mh_kernel_check(m), "control")
    kc = mh_kernel_check(m, hastings=False)
    assert kc.row_sum_error <= EXACT  # still a Markov kernel ...
    assert kc.invariance_error > 1e-3, kernel_report(kc)  # ... with the wrong stationary law
    assert kc.balance_error > 1e-3 and not kc.ok()
    # also on the recursion, where the trace length changes
    kc = mh_kernel_check(ppl.model(FINITE["bounded_geometric"]), hastings=False)
    assert kc.invariance_error > 1e-3, kernel_report(kc)


def test_always_accepting_kernel_is_caught():
    m = ppl.model(FINITE["fixed_shape"])
    kc = mh_kernel_check(m, step=_step_with(_AlwaysAccept))
    assert kc.row_sum_error <= EXACT
    assert kc.invariance_error > 1e-2, kernel_report(kc)  # it samples the prior, not the posterior
    assert not kc.ok()


@pytest.mark.parametrize("step", [_step_with(_OneSiteTooMany), _overcounting_step],
                         ids=["proposal-only", "proposal-and-ratio"])
def test_wrong_site_count_is_caught(step):
    m = ppl.model(FINITE["branches"])  # traces of 2 and of 3 choices
    kc = mh_kernel_check(m, step=step)
    assert kc.row_sum_error <= EXACT
    assert kc.invariance_error > 1e-4, kernel_report(kc)
    assert kc.balance_error > 1e-4 and not kc.ok()


def test_wrong_site_count_is_harmless_on_a_fixed_shape():
    """Control for the test above: with a constant |x| the off-by-one only makes the
    kernel lazier, which keeps pi invariant; the check must not cry wolf."""
    m = ppl.model(FINITE["fixed_shape"])
    assert_exact_kernel(mh_kernel_check(m, step=_step_with(_OneSiteTooMany)), "lazy kernel")


# ====================================================================== statistical checks


def check_mean(r, name, mean, sd, what=""):
    """|E_MH[x] - mean| <= Z * sd / sqrt(ESS), ESS the result's own for this site."""
    ess = r.ess_per_site[name]
    assert ess > 100, f"{what}: ESS {ess:.0f} is too small to trust the check"
    mcse = sd / math.sqrt(ess)
    est = r.mean(name)
    assert est == pytest.approx(float(mcmc_chains(r, name).mean()), rel=1e-9, abs=1e-12)
    assert abs(est - mean) <= Z * mcse, f"{what} mean: {describe(est, mean, mcse)} (ESS {ess:.0f})"


def check_var(r, name, mean, sd, what=""):
    """The mean of g = (x - mean)^2 against sd^2, SE = sd(g) / sqrt(ESS of g)."""
    g = (mcmc_chains(r, name) - mean) ** 2
    ess = mcmc_ess(g)
    se = float(g.std()) / math.sqrt(ess)
    est = float(g.mean())
    assert abs(est - sd ** 2) <= Z * se, f"{what} variance: {describe(est, sd ** 2, se)} (ESS {ess:.0f})"


def check_prob(r, name, value, p, what=""):
    ind = (mcmc_chains(r, name) == value).double()
    ess = mcmc_ess(ind)
    se = math.sqrt(p * (1 - p) / ess)
    est = float(ind.mean())
    assert abs(est - p) <= Z * se, f"{what}: {describe(est, p, se)} (ESS {ess:.0f})"


def check_mixing(r, name, what=""):
    assert 0 < r.acceptance_rate < 1, f"{what}: acceptance rate {r.acceptance_rate}"
    assert r.r_hat[name] < 1.05, f"{what}: split R-hat {r.r_hat[name]:.3f}"


# ------------------------------------------------------------------------ Beta-Bernoulli
COIN = """
def coin(flips):
    p ~ beta(2, 3)
    for f in flips:
        observe f ~ bernoulli(p)
    return p
"""
FLIPS = [1, 1, 1, 1, 0, 1, 1, 1, 1, 1]  # lopsided: Beta(11, 4), where a missing Jacobian shows


@pytest.mark.parametrize("kernel, scale, seed", [("prior", 0.5, 0), ("rw", 1.0, 1)])
def test_beta_bernoulli(kernel, scale, seed):
    r = ppl.model(COIN).run("mh", {"flips": FLIPS}, particles=16, samples=400, burn_in=100, kernel=kernel,
                            scale=scale, seed=seed)
    a, b = 2 + sum(FLIPS), 3 + len(FLIPS) - sum(FLIPS)
    mean, sd = a / (a + b), math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    assert r.ess == r.ess_per_site["return"]
    check_mean(r, "p", mean, sd, kernel)
    check_var(r, "p", mean, sd, kernel)
    check_mixing(r, "p", kernel)
    assert r.log_evidence is None and r.extra["kernel"] == kernel


# -------------------------------------------------------------- Normal mean, known variance
@pytest.mark.parametrize("kernel, scale, seed", [("prior", 0.5, 0), ("rw", 0.8, 1)])
def test_normal_mean(kernel, scale, seed):
    m0, s0, s = 1.0, 2.0, 1.5
    ys = np.array([2.3, 3.1, 1.7, 2.9, 2.2])
    model = ppl.model(f"""
def normal_mean(ys):
    mu ~ normal({m0}, {s0})
    for y in ys:
        observe y ~ normal(mu, {s})
    return mu
""")
    r = model.run("mh", {"ys": ys.tolist()}, particles=16, samples=400, burn_in=100, kernel=kernel,
                  scale=scale, seed=seed)
    prec = 1 / s0 ** 2 + len(ys) / s ** 2
    mean, sd = (m0 / s0 ** 2 + ys.sum() / s ** 2) / prec, math.sqrt(1 / prec)
    check_mean(r, "mu", mean, sd, kernel)
    check_var(r, "mu", mean, sd, kernel)
    check_mixing(r, "mu", kernel)


# ----------------------------------------- Gamma-Poisson (rw on a positive support: Jacobian)
@pytest.mark.parametrize("kernel", ["prior", "rw"])
def test_gamma_poisson(kernel):
    counts = [3, 5, 2, 4, 6, 3]
    model = ppl.model("""
def rate(counts):
    lam ~ gamma(2, 0.5)
    for c in counts:
        observe c ~ poisson(lam)
    return lam
""")
    r = model.run("mh", {"counts": counts}, particles=16, samples=400, burn_in=100, kernel=kernel, scale=0.5,
                  seed=2)
    shape, rate = 2 + sum(counts), 0.5 + len(counts)
    check_mean(r, "lam", shape / rate, math.sqrt(shape) / rate, kernel)
    check_var(r, "lam", shape / rate, math.sqrt(shape) / rate, kernel)
    check_mixing(r, "lam", kernel)


# ------------------------------- a continuous choice that decides which other choices exist
@pytest.mark.parametrize("kernel, seed", [("prior", 0), ("rw", 1)])
def test_continuous_choice_changes_trace_shape(kernel, seed):
    """x decides whether y exists: a walk on x adds or drops y (fresh/stale terms with a
    random-walk proposal). The truth by quadrature of the unnormalised density
    N(x; 0, 1) * (N(0.5; 1, sqrt 2) if x > 0 else N(0.5; x, 1)) (y integrated out)."""
    model = ppl.model("""
def shape(obs):
    x ~ normal(0, 1)
    if x > 0:
        y ~ normal(1, 1)
        observe obs ~ normal(y, 1)
    else:
        observe obs ~ normal(x, 1)
    return x
""")
    r = model.run("mh", {"obs": 0.5}, particles=16, samples=400, burn_in=100, kernel=kernel, scale=1.0, seed=seed)

    def f(x):
        return norm.pdf(x, 0, 1) * (norm.pdf(0.5, 1, math.sqrt(2)) if x > 0 else norm.pdf(0.5, x, 1))

    z = quad(f, -np.inf, 0)[0] + quad(f, 0, np.inf)[0]
    mean = (quad(lambda x: x * f(x), -np.inf, 0)[0] + quad(lambda x: x * f(x), 0, np.inf)[0]) / z
    second = (quad(lambda x: x * x * f(x), -np.inf, 0)[0] + quad(lambda x: x * x * f(x), 0, np.inf)[0]) / z
    p_pos = quad(f, 0, np.inf)[0] / z
    sd = math.sqrt(second - mean ** 2)
    check_mean(r, "x", mean, sd, kernel)
    check_var(r, "x", mean, sd, kernel)
    check_mixing(r, "x", kernel)
    # y exists exactly when x > 0, and with the posterior probability of x > 0
    x = mcmc_chains(r, "x")
    present = r.sites["y"].present.reshape(r.chains, r.draws)
    assert torch.equal(present, x > 0)
    ind = present.double()
    se = math.sqrt(p_pos * (1 - p_pos) / mcmc_ess(ind))
    assert abs(float(ind.mean()) - p_pos) <= Z * se, f"P(x > 0): {describe(float(ind.mean()), p_pos, se)}"


# ------------------------------------------------- the geometric recursion, conditioned
def test_geometric_recursion_conditioned():
    """examples/geometric.ppl: the number of choices is unbounded and changes with every
    accepted move; by memorylessness n - k | n >= k is geometric(p) again."""
    d = json.loads((EXAMPLES / "geometric.json").read_text())
    p, k = d["p"], d["k"]
    r = ppl.model(str(EXAMPLES / "geometric.ppl")).run("mh", d, particles=16, samples=300, burn_in=50, seed=0)
    mean, sd = k + (1 - p) / p, math.sqrt(1 - p) / p
    check_mean(r, "return", mean, sd, "E[n | n >= k]")
    check_var(r, "return", mean, sd, "Var[n | n >= k]")
    assert min(r.samples["return"].tolist()) == k  # the condition is never violated
    for j in range(k, k + 3):
        check_prob(r, "return", j, (1 - p) ** (j - k) * p, f"P(n = {j} | n >= {k})")
    assert 0 < r.acceptance_rate < 1
    # the trace length varies: the deeper flips exist only in some draws
    deep = "/".join(["geometric"] * (k + 2)) + "/b"
    assert r.sites[deep].present is not None and 0 < float(r.sites[deep].present.double().mean()) < 1


# ------------------------------------------------------- burn-in, thinning, reproducibility
def test_burn_in_and_thin_layout():
    """The draws kept are exactly the right steps of the same chain: with the same seed,
    burn-in B + S draws = the last S of B + S unburnt draws, and thin T = every T-th."""
    model, data = ppl.model(COIN), {"flips": FLIPS}
    C, B, S, T = 3, 7, 11, 3
    full = model.run("mh", data, particles=C, samples=B + S * T, burn_in=0, kernel="rw", seed=5)
    assert (full.chains, full.draws, full.n) == (C, B + S * T, C * (B + S * T))
    burnt = model.run("mh", data, particles=C, samples=S * T, burn_in=B, kernel="rw", seed=5)
    assert (burnt.draws, burnt.n) == (S * T, C * S * T)
    assert torch.equal(mcmc_chains(burnt, "p"), mcmc_chains(full, "p")[:, B:])
    thinned = model.run("mh", data, particles=C, samples=S, burn_in=B, thin=T, kernel="rw", seed=5)
    assert (thinned.chains, thinned.draws, thinned.n) == (C, S, C * S)
    assert torch.equal(mcmc_chains(thinned, "p"), mcmc_chains(full, "p")[:, B::T])
    assert thinned.extra["burn_in"] == B and thinned.extra["thin"] == T
    # the acceptance rate counts every step after burn-in, kept or not
    assert thinned.acceptance_rate == pytest.approx(burnt.acceptance_rate, abs=1e-12)


def test_seed_reproduces_exactly():
    model, data = ppl.model(FINITE["branches"]), {}
    runs = [model.run("mh", data, particles=4, samples=30, burn_in=5, seed=s) for s in (3, 3, 4)]
    a, b, c = (r.samples["return"].tolist() for r in runs)
    assert a == b and runs[0].acceptance_rate == runs[1].acceptance_rate
    assert a != c
    for name in runs[0].names:
        sa, sb = runs[0].sites[name], runs[1].sites[name]
        assert torch.equal(torch.as_tensor(sa.value), torch.as_tensor(sb.value)), name
        assert (sa.present is None) == (sb.present is None)
        if sa.present is not None:
            assert torch.equal(sa.present, sb.present), name


# ------------------------------------------------------------------------ the command line
def run_cli(argv) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(list(argv))
    assert rc == 0, f"ppl {' '.join(argv)} exited with {rc}"
    return json.loads(out.getvalue())


def test_cli_mh_coin(monkeypatch):
    monkeypatch.chdir(ROOT)
    out = run_cli(["run", "examples/coin.ppl", "--data", "examples/coin.json", "--method", "mh", "-n", "4",
                   "--json"])
    assert out["method"] == "mh" and out["log_evidence"] is None
    assert out["chains"] == 4 and out["draws"] == 1000 and out["n"] == out["particles"] == 4000
    assert 0 < out["acceptance_rate"] < 1 and out["r_hat"]["p"] < 1.05
    flips = json.loads((EXAMPLES / "coin.json").read_text())["flips"]
    a, b = 2 + sum(flips), 2 + len(flips) - sum(flips)  # Beta(17, 7)
    mean, sd = a / (a + b), math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    post = out["posterior"]["p"]
    assert out["ess"] == pytest.approx(out["ess_per_site"]["return"]) and out["ess"] > 100
    assert abs(post["mean"] - mean) <= Z * sd / math.sqrt(out["ess"]), post


def test_cli_mh_options(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    base = ["run", "examples/coin.ppl", "--data", "examples/coin.json", "--method", "mh", "-n", "2"]
    out = run_cli(base + ["--samples", "20", "--burn-in", "3", "--thin", "2", "--kernel", "rw", "--scale",
                          "0.3", "--json", "--seed", "4"])
    assert (out["chains"], out["draws"], out["n"]) == (2, 20, 40)
    m = ppl.model(str(EXAMPLES / "coin.ppl"))
    r = m.run("mh", json.loads((EXAMPLES / "coin.json").read_text()), particles=2, samples=20, burn_in=3, thin=2,
              kernel="rw", scale=0.3, seed=4)
    assert out["posterior"]["p"]["mean"] == pytest.approx(r.mean("p"), rel=1e-12)
    for bad, msg in [(["--samples", "0"], "--samples must be at least 1"),
                     (["--burn-in", "-1"], "--burn-in must be at least 0"),
                     (["--thin", "0"], "--thin must be at least 1"),
                     (["--scale", "0"], "--scale must be a positive number")]:
        assert cli.main(base + bad) == 1
        assert msg in capsys.readouterr().err
    # a kernel is prior, rw, or a proposal function of the model: coin.ppl has no 'hmc'
    assert cli.main(base + ["--kernel", "hmc"]) == 1
    assert "unknown MH kernel 'hmc'" in capsys.readouterr().err
    # without --json: the summary's first line gives the chain layout
    assert cli.main(base + ["--samples", "10", "--burn-in", "0"]) == 0
    assert capsys.readouterr().out.startswith("mh: 2 chains x 10 draws")


# ------------------------------------------------------------------- the mixture example
def mixture_grid(ys, w, sigma, half_width=12.0, points=2401):
    """The posterior of the ordered means on a grid, the assignments summed out:
    p(mu1, mu2 | ys) ~ N(mu1; 0, 3) N(mu2; 0, 3) 1{mu1 < mu2} prod_i [w N(y_i; mu1, sigma)
    + (1 - w) N(y_i; mu2, sigma)]. Returns the means/sds of mu1, mu2, mu2 - mu1, and
    P(z[i] | ys) for every i."""
    g = np.linspace(-half_width, half_width, points)
    m1, m2 = np.meshgrid(g, g, indexing="ij")  # axis 0: mu1, axis 1: mu2

    def log_normal(x, mean, sd):
        return -0.5 * ((x - mean) / sd) ** 2 - math.log(sd * math.sqrt(2 * math.pi))

    lp = log_normal(g, 0, 3)[:, None] + log_normal(g, 0, 3)[None, :]

    def terms(y):  # each term depends on one mean only: broadcast a column and a row
        return (math.log(w) + log_normal(y, g, sigma))[:, None], (math.log(1 - w) + log_normal(y, g, sigma))[None, :]

    for y in ys:
        lp = lp + np.logaddexp(*terms(y))
    lp = np.where(m1 < m2, lp, -np.inf)
    p = np.exp(lp - lp.max())
    p /= p.sum()

    def moments(f):
        e = float((p * f).sum())
        return e, math.sqrt(float((p * (f - e) ** 2).sum()))

    pz = []
    for y in ys:  # P(z_i | ys) = E[w N(y_i; mu1) / (w N(y_i; mu1) + (1 - w) N(y_i; mu2)) | ys]
        l1, l2 = terms(y)
        pz.append(float((p * np.exp(l1 - np.logaddexp(l1, l2))).sum()))
    return {"mu1": moments(m1), "mu2": moments(m2), "return": moments(m2 - m1), "pz": pz}


def mixture_header() -> str:
    lines = []
    for line in (EXAMPLES / "mixture.ppl").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def test_mixture_example(monkeypatch):
    d = json.loads((EXAMPLES / "mixture.json").read_text())
    truth = mixture_grid(d["ys"], d["w"], d["sigma"])
    # the grid is converged: a coarser, wider one agrees far below the Monte Carlo error
    coarser = mixture_grid(d["ys"], d["w"], d["sigma"], half_width=15.0, points=1501)
    for k in ("mu1", "mu2", "return"):
        assert truth[k] == pytest.approx(coarser[k], abs=1e-5)
    # the header states the answer and the command
    h = mixture_header()
    assert "Expected answer" in h and "Run:" in h
    for k in ("mu1", "mu2", "return"):
        e, sd = truth[k]
        assert f"{e:.4f}" in h and f"{sd:.4f}" in h, f"the header should state {e:.4f} (sd {sd:.4f})"
    assert f"{truth['pz'][4]:.4f}" in h and f"{truth['pz'][2]:.4f}" in h
    assert "mixture.ppl" in (EXAMPLES / "README.md").read_text()
    cmds = [shlex.split(m.group(1)) for m in re.finditer(r"#\s+python -m ppl (run .*)", h)]
    assert cmds and cmds[0][:4] == ["run", "examples/mixture.ppl", "--data", "examples/mixture.json"]
    assert cmds[0][cmds[0].index("--method") + 1] == "mh"
    # run the header's command: MH's posterior means against the grid
    monkeypatch.chdir(ROOT)
    out = run_cli(cmds[0] + ["--json"])
    assert out["method"] == "mh" and 0 < out["acceptance_rate"] < 1
    assert out["warnings"] == [], out["warnings"]  # the documented command runs without a warning
    for k in ("mu1", "mu2", "return"):
        e, sd = truth[k]
        ess = out["ess_per_site"][k]
        assert ess > 100, f"{k}: ESS {ess:.0f}"
        assert out["r_hat"][k] < 1.01, f"{k}: split R-hat {out['r_hat'][k]:.3f} (the header says < 1.01)"
        est = out["posterior"][k]["mean"]
        assert abs(est - e) <= Z * sd / math.sqrt(ess), f"E[{k}]: {describe(est, e, sd / math.sqrt(ess))}"
    assert out["posterior"]["mu1"]["q95"] < out["posterior"]["mu2"]["q05"]  # the ordering holds
    # an assignment's probability (a boolean site: its mean is P(true), and its ESS is
    # that of the indicator)
    p4, ess = truth["pz"][4], out["ess_per_site"]["z[4]"]
    est, se = out["posterior"]["z[4]"]["mean"], math.sqrt(p4 * (1 - p4) / ess)
    assert abs(est - p4) <= Z * se, f"P(z[4]): {describe(est, p4, se)}"
