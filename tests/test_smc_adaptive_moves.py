"""Issue 11, item 4: adaptive moves in tempered SMC and resample-move (``adapt=True``,
``inference.population_moves``).

The old moves (one random-walk scale 0.5 for every choice, a fixed number of moves) are
silently wrong where the posterior's scales are not ~0.5: a regression on calendar years
(intercept and slope correlated at -0.999995), a concentrated regression (posterior sds
~1e-3), a mixture with many assignments (default moves). The adaptive moves (a block walk
with the population's covariance, repeated until the particles decorrelate) get every
posterior mean within 0.1 posterior sd and the evidence right.

Tolerances: each model's replicate spread (R independent seeds) is measured in the test
itself; the replicates' average mean is checked within 0.1 posterior sd, which must be at
least 3 replicate SEs (asserted), and log Z within a Student-t quantile (R - 1
degrees of freedom, two-sided level 1e-3) of the replicate SE, after the -s^2/2 of a
log-normal Z_hat (as in tests/test_conjugate_programs.py)."""
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import ppl
from ppl.inference import population_moves
from ppl.inference.tempering import tempered_smc
from ppl.testing.validity import check_proper, checkable

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
REPLICATES = 6

REGRESSION = """
def reg(xs, ys, sigma, sd_a, sd_b):
    a ~ normal(0, sd_a)
    b ~ normal(0, sd_b)
    observe ys ~ normal(a + b * xs, sigma)
    return b
"""

LOOPED_REGRESSION = """
def reg(xs, ys, sigma, sd_a, sd_b):
    a ~ normal(0, sd_a)
    b ~ normal(0, sd_b)
    for x, y in zip(xs, ys):
        observe y ~ normal(a + b * x, sigma)
    return b
"""


def _closed_form(data: dict) -> dict:
    """The Bayesian linear regression's exact posterior (means, sds, correlation) and log Z."""
    xs, ys, s = np.array(data["xs"]), np.array(data["ys"]), data["sigma"]
    X = np.stack([np.ones_like(xs), xs], 1)
    prior = np.diag([data["sd_a"] ** 2, data["sd_b"] ** 2])
    cov = np.linalg.inv(np.linalg.inv(prior) + X.T @ X / s ** 2)
    mean = cov @ (X.T @ ys / s ** 2)
    marginal = s ** 2 * np.eye(len(ys)) + X @ prior @ X.T  # ys ~ normal(0, marginal)
    log_z = -0.5 * ys @ np.linalg.solve(marginal, ys) - 0.5 * np.linalg.slogdet(marginal)[1] \
        - 0.5 * len(ys) * math.log(2 * math.pi)
    return {"a": mean[0], "b": mean[1], "sd_a": math.sqrt(cov[0, 0]), "sd_b": math.sqrt(cov[1, 1]),
            "corr": cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1]), "log_z": float(log_z)}


def calendar_year_data() -> dict:
    """21 yearly points 2000..2020, y = -100 + 0.05 year + noise(0.5); vague priors."""
    rng = np.random.default_rng(1)
    xs = np.arange(2000, 2021).astype(float)
    ys = (-100 + 0.05 * xs + rng.normal(0, 0.5, xs.size)).round(3)
    return {"xs": xs.tolist(), "ys": ys.tolist(), "sigma": 0.5, "sd_a": 1000.0, "sd_b": 10.0}


def concentrated_data() -> dict:
    """50 points on [-1, 1] with noise sd 0.005: posterior sds 7e-4 and 1.2e-3."""
    rng = np.random.default_rng(2)
    xs = np.linspace(-1, 1, 50)
    ys = (0.3 + 1.7 * xs + rng.normal(0, 0.005, xs.size)).round(5)
    return {"xs": xs.tolist(), "ys": ys.tolist(), "sigma": 0.005, "sd_a": 10.0, "sd_b": 10.0}


def _quiet_run(model, method, data, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ppl.PPLDiagnosticWarning)  # the adaptive runs must not warn
        return model.run(method, data, **options)


def _check_against_closed_form(method: str, src: str, data: dict, particles: int, replicates: int = REPLICATES,
                               **options):
    """R replicates at ``particles``: their average (R N particles in all) within 0.1
    posterior sd of each mean, which is at least 3 replicate SEs (sd_r / sqrt(R),
    asserted); every replicate's sds within 10%; log Z within the replicate tolerance."""
    ref = _closed_form(data)
    m = ppl.model(src)
    runs = [_quiet_run(m, method, data, particles=particles, seed=s, adapt=True, **options)
            for s in range(replicates)]
    for site in ("a", "b"):
        sd = ref["sd_" + site]
        means = np.array([r.mean(site) for r in runs])
        se = float(means.std(ddof=1)) / math.sqrt(replicates)
        assert 0.1 * sd >= 3 * se, (site, se / sd)
        assert abs(means.mean() - ref[site]) < 0.1 * sd, (site, (means.mean() - ref[site]) / sd)
        for r in runs:
            assert r.sd(site) == pytest.approx(sd, rel=0.1)
    log_zs = np.array([r.log_evidence for r in runs])
    s = float(log_zs.std(ddof=1))
    t = float(stats.t.ppf(1 - 1e-3 / 2, replicates - 1))
    assert abs(log_zs.mean() + s * s / 2 - ref["log_z"]) <= t * s / math.sqrt(replicates), (log_zs, ref["log_z"])
    return ref, runs


def test_calendar_year_regression_closed_form():
    """The reference the tests below use: intercept and slope correlate at -0.999995."""
    ref = _closed_form(calendar_year_data())
    assert ref["corr"] < -0.99999
    assert ref["a"] == pytest.approx(-69.464, abs=1e-3) and ref["b"] == pytest.approx(0.034817, abs=1e-6)


def test_tempering_adaptive_moves_on_the_calendar_year_regression():
    """The adaptive moves: every mean within 0.1 sd, sds and log Z right. The old fixed
    walk (scale 0.5, 2 moves) is 5.4 posterior sds off with seed 0 (and its log Z 15
    nats low), with no warning."""
    data = calendar_year_data()
    ref, runs = _check_against_closed_form("tempering", REGRESSION, data, particles=500)
    assert all(1 <= k <= 100 for r in runs for k in r.extra["moves"])
    old = ppl.model(REGRESSION).run("tempering", data, particles=1000, seed=0)
    assert abs(old.mean("a") - ref["a"]) > 3 * ref["sd_a"]
    assert old.log_evidence < ref["log_z"] - 5


def test_tempering_adaptive_moves_on_the_concentrated_regression():
    """Posterior sds ~1e-3: the old walk (scale 0.5) is off by 1.7 sd and 4 nats with
    seeds 0 and 1; the adaptive one's walk shrinks with the population."""
    data = concentrated_data()
    ref, runs = _check_against_closed_form("tempering", REGRESSION, data, particles=500)
    assert all(0.1 < acc < 0.6 for acc in runs[0].extra["acceptance"])  # the walk's size follows the population
    m = ppl.model(REGRESSION)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl.PPLDiagnosticWarning)  # seed 1 warns of a collapse, seed 0 not
        old = [m.run("tempering", data, particles=1000, seed=s) for s in (0, 1)]
    assert max(abs(r.mean("a") - ref["a"]) / ref["sd_a"] for r in old) > 1.0
    assert max(abs(r.log_evidence - ref["log_z"]) for r in old) > 2.0


def test_resample_move_adaptive_moves_on_a_looped_regression():
    """Resample-move (a checkpoint per observe) with the population walk: means within
    0.1 sd, log Z right; its fixed random walk (scale 0.5, one move) is 1.3 posterior
    sds and 1.4 nats off with seed 1, silently."""
    rng = np.random.default_rng(3)
    xs = np.linspace(-1, 1, 20)
    data = {"xs": xs.tolist(), "ys": (0.5 - 0.8 * xs + rng.normal(0, 0.05, xs.size)).round(4).tolist(),
            "sigma": 0.05, "sd_a": 1.0, "sd_b": 1.0}
    ref, runs = _check_against_closed_form("resample_move", LOOPED_REGRESSION, data, particles=400)
    assert len(runs[0].extra["moves"]) == 20 and runs[0].extra["adapt"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error", ppl.PPLDiagnosticWarning)
        old = ppl.model(LOOPED_REGRESSION).run("resample_move", data, particles=1000, seed=1, kernel="rw")
    assert abs(old.mean("a") - ref["a"]) > 1.0 * ref["sd_a"]
    assert abs(old.log_evidence - ref["log_z"]) > 1.0


def _mixture_grid(data: dict, k: int = 801) -> dict:
    """examples/mixture.ppl's posterior means and sds of mu1, mu2 and its log Z by
    quadrature on a k x k grid over [-12, 12]^2 (the assignments summed out exactly)."""
    g = np.linspace(-12.0, 12.0, k)
    h = g[1] - g[0]
    m1, m2 = np.meshgrid(g, g, indexing="ij")
    w, s = data["w"], data["sigma"]
    lp = stats.norm.logpdf(m1, 0, 3) + stats.norm.logpdf(m2, 0, 3)
    for y in data["ys"]:
        lp = lp + np.logaddexp(math.log(w) + stats.norm.logpdf(y, m1, s), math.log(1 - w) + stats.norm.logpdf(y, m2, s))
    lp = np.where(m1 < m2, lp, -np.inf)
    top = lp.max()
    p = np.exp(lp - top)
    log_z = top + math.log(p.sum() * h * h)
    p /= p.sum()
    out = {"log_z": log_z}
    for name, m in (("mu1", m1), ("mu2", m2)):
        out[name] = float((p * m).sum())
        out["sd_" + name] = math.sqrt(float((p * (m - out[name]) ** 2).sum()))
    return out


def test_mixture_grid_matches_the_example_header():
    """The quadrature reproduces examples/mixture.ppl's figures (2401-point grid there)."""
    ref = _mixture_grid(json.loads((ROOT / "examples/mixture.json").read_text()))
    assert ref["mu1"] == pytest.approx(-2.6004, abs=2e-4) and ref["sd_mu1"] == pytest.approx(0.5970, abs=2e-4)
    assert ref["mu2"] == pytest.approx(1.3281, abs=2e-4) and ref["sd_mu2"] == pytest.approx(0.6052, abs=2e-4)


def test_tempering_adaptive_moves_on_the_mixture_example():
    """examples/mixture.ppl (continuous means, discrete assignments, a condition): the
    block walk moves the means, single-site prior moves the assignments. One run (N =
    1000; a replicate takes ~2 s): the means within 0.1 sd of the grid, which is 4
    replicate sds (measured over seeds 0-5: sd 0.025 posterior sds, every seed within
    0.06), log Z within 0.3 of the grid's -15.135 (replicates: sd 0.06). The old moves
    (scale 0.5, moves=2), averaged over seeds 0-5, are 0.35 sd off mu2 (replicate SE
    0.09), silently."""
    data = json.loads((ROOT / "examples/mixture.json").read_text())
    ref = _mixture_grid(data)
    m = ppl.model((ROOT / "examples/mixture.ppl").read_text())
    r = _quiet_run(m, "tempering", data, particles=1000, seed=0, adapt=True)
    assert r.extra["site_acceptance"][0] > 0.5  # the assignments moved too
    for site in ("mu1", "mu2"):
        assert abs(r.mean(site) - ref[site]) < 0.1 * ref["sd_" + site], (site, r.mean(site), ref[site])
        assert r.sd(site) == pytest.approx(ref["sd_" + site], rel=0.1)
    assert abs(r.log_evidence - ref["log_z"]) < 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error", ppl.PPLDiagnosticWarning)
        old = [m.run("tempering", data, particles=1000, seed=s, moves=2).mean("mu2") for s in range(6)]
    assert np.mean(old) < ref["mu2"] - 0.2 * ref["sd_mu2"]


@pytest.mark.parametrize("kernel", ["hmc", "mala"])
def test_tempering_gradient_moves_on_the_calendar_year_regression(kernel):
    """``kernel="hmc"``/``"mala"`` with ``adapt=True``: gradient moves on the tempered
    potential, the population's covariance as inverse mass matrix. Means within 0.1 sd,
    sds and log Z right, as for the population walk."""
    _, runs = _check_against_closed_form("tempering", REGRESSION, calendar_year_data(), particles=300, replicates=4,
                                         kernel=kernel)
    assert all(r.extra["kernel"] == kernel and 0.5 < r.extra["acceptance"][-1] <= 1.0 for r in runs)


def test_adaptive_tempering_reports_its_moves_and_warns_at_max_moves():
    """``extra`` records the moves per step; a cap too low to decorrelate the particles
    warns (a result that may be wrong says so)."""
    m = ppl.model(REGRESSION)
    with pytest.warns(ppl.PPLDiagnosticWarning, match="stopped at max_moves=1 before the particles decorrelated"):
        r = m.run("tempering", calendar_year_data(), particles=200, seed=0, adapt=True, max_moves=1)
    assert r.extra["moves"] == [1] * (len(r.extra["schedule"]) - 1)
    assert len(r.warnings) == 1 + any("collapsed" in w for w in r.warnings)
    r = m.run("tempering", calendar_year_data(), particles=200, seed=0, adapt=True, moves=3)
    assert r.extra["moves"] == [3] * (len(r.extra["schedule"]) - 1)
    assert len(r.extra["acceptance"]) == len(r.extra["correlation"]) == len(r.extra["proposal_scale"])


def test_adapt_option_from_the_cli_text_and_bad_kernels():
    """``-o adapt=true`` arrives as text; a kernel the adaptive moves do not have is an error."""
    m = ppl.model(REGRESSION)
    r = m.run("tempering", concentrated_data(), particles=100, seed=0, adapt="true", moves=1)
    assert r.extra["adapt"] is True
    with pytest.raises(ppl.PPLError, match="adapt=True"):
        m.run("tempering", concentrated_data(), particles=100, seed=0, adapt=True, kernel="prior")
    with pytest.raises(ppl.PPLError, match="max_moves"):
        m.run("tempering", concentrated_data(), particles=100, seed=0, adapt=True, max_moves=0)


CORRELATION = """
def corr(ys):
    a ~ normal(0, 0.2)
    observe ys ~ mv_normal(zeros(2), [[1.0, a], [a, 1.0]])
    return a
"""


def test_a_walk_into_invalid_parameters_is_rejected_not_an_error():
    """The walk may propose a correlation a > 1 (the covariance is then not positive
    definite; the prior puts 6e-7 there, so its draws never do): such a proposal is
    rejected (the likelihood's error found row by row), the run goes on. Posterior by
    quadrature over a in (-1, 1); N = 200, the mean within 0.3 sd (3 SEs at an ESS of 100)."""
    rng = np.random.default_rng(5)
    ys = rng.multivariate_normal([0, 0], [[1, 0.8], [0.8, 1]], size=20).round(3)
    g = np.linspace(-0.999999, 0.999999, 200001)
    det = 1 - g ** 2
    lp = stats.norm.logpdf(g, 0, 0.2) + sum(-0.5 * np.log(det) - 0.5 * (y0 * y0 - 2 * g * y0 * y1 + y1 * y1) / det
                                            for y0, y1 in ys)
    p = np.exp(lp - lp.max())
    p /= p.sum()
    mean = (p * g).sum()
    sd = math.sqrt((p * (g - mean) ** 2).sum())
    r = ppl.model(CORRELATION).run("tempering", {"ys": ys.tolist()}, particles=200, seed=0, adapt=True)
    assert abs(r.mean("a") - mean) < 0.3 * sd and r.sd("a") == pytest.approx(sd, rel=0.15)


STRUCTURE = """
def m():
    a ~ flip(0.3)
    if a:
        b ~ flip(0.5)
    observe True ~ bernoulli(0.9 if a else 0.2)
    return a
"""


def _adaptive_tempering(particles: int, schedule: list):
    """Adaptive tempering with one move per step as ``check_proper`` wants it."""
    def run(interp, entry, data, rnd):
        return tempered_smc(interp, entry, data, particles, "cpu", moves=1, schedule=schedule, randomness=rnd,
                            adapt=True)
    return checkable(run, particles)


def test_adaptive_site_moves_are_exactly_proper_under_random_structure():
    """The single-site moves of the choices outside the block (here all: the program is
    finite), on a trace whose shape changes (b exists only when a): every prior draw,
    resampling, site pick, proposal and accept test enumerated, E[Z_hat f] = gamma(f) to
    float64 rounding."""
    c = check_proper(ppl.model(STRUCTURE), _adaptive_tempering(2, [1.0]))
    assert c.ok(), c


def test_exact_check_catches_adaptive_moves_without_the_stale_term(monkeypatch):
    """The broken variant: the prior density of a choice the new trace drops (b, when a
    turns false) left out of the acceptance ratio. The population is no longer proper."""
    monkeypatch.setattr(population_moves, "stale_lp", lambda old, new, without=None: torch.zeros_like(old.log_joint))
    c = check_proper(ppl.model(STRUCTURE), _adaptive_tempering(2, [1.0]))
    assert not c.ok() and c.max_error > 1e-3, c


DEPENDENT_SUPPORT = """
def m(ys):
    u ~ uniform(0, 1)
    v ~ uniform(0, 1 - u)
    observe ys ~ normal(u + 2 * v, 0.1)
    return v
"""


def test_block_walk_with_a_support_that_depends_on_another_choice():
    """v's support (0, 1 - u) moves with u (as GARCH's beta1 ~ uniform(0, 1 - alpha1)):
    each particle's coordinates of v use its own u, before and after the walk. Means of
    6 replicates within 0.1 sd of a quadrature (over u and t = v / (1 - u), where the
    prior is uniform), at least 3 replicate SEs."""
    ys = [0.9, 1.0, 0.95]
    g = (np.arange(2001) + 0.5) / 2001
    u, t = np.meshgrid(g, g, indexing="ij")
    v = t * (1 - u)
    lp = sum(stats.norm.logpdf(y, u + 2 * v, 0.1) for y in ys)
    p = np.exp(lp - lp.max())
    p /= p.sum()
    m = ppl.model(DEPENDENT_SUPPORT)
    runs = [_quiet_run(m, "tempering", {"ys": ys}, particles=1000, seed=s, adapt=True) for s in range(REPLICATES)]
    for name, x in (("u", u), ("v", v)):
        mean = (p * x).sum()
        sd = math.sqrt((p * (x - mean) ** 2).sum())
        means = np.array([r.mean(name) for r in runs])
        se = float(means.std(ddof=1)) / math.sqrt(REPLICATES)
        assert 0.1 * sd >= 3 * se and abs(means.mean() - mean) < 0.1 * sd, (name, (means - mean) / sd)
