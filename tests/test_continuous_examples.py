"""The continuous model families of issue 11 (examples/eight_schools.ppl,
calendar_regression, ar, garch, gp_regression, logistic_regression, mixture_marginal),
their reference posteriors (bench/references.json, from bench/make_references.py) and
their NumPyro/Pyro twins (bench/nuts_models.py).

* each twin is the same model as the ppl program: the Pyro twin's log joint equals ppl's
  ``log_joint`` at random points in float64 (the NumPyro twin's is checked the same way
  by bench/make_references.py before each reference run: eager JAX takes seconds a model);
* each example runs under a method that needs no gradients (tempering), with the
  latent sites the twins name;
* the calendar-year regression's posterior is the closed form its header states: ppl's
  log joint minus the closed-form log posterior is the same number (log evidence) at
  every point, and the reference (exact rational arithmetic) equals a float64 solve;
* the references cover every column, and each header states its reference, its run
  command (valid for the CLI; the logistic regression's, shortened, is run) and the
  README lists it;
* eight schools under importance sampling (20,000 particles) agrees with its
  quadrature reference within 4.5 Monte Carlo standard errors (sd / sqrt(ESS));
* ppl ``nuts`` agrees with the references within 4.5 combined MCSEs (ppl's from its
  per-site bulk ESS, the reference's from its own run; 0 for a closed form) on the
  models where it is fast enough for a test.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ppl
from ppl import cli

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from nuts_models import MODELS, ppl_draws  # noqa: E402

REFERENCES = json.loads((ROOT / "bench" / "references.json").read_text())
Z = 4.5  # standard errors allowed
NAMES = list(MODELS)

torch.set_num_threads(1)


@pytest.fixture
def float64():
    """torch's default dtype float64 for the test (ppl's values, the Pyro twin's data), so
    that log densities agree to 1e-9 rather than float32's 1e-7."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _load(name):
    spec = MODELS[name]
    return spec, ppl.model(str(spec.ppl_file)), spec.data()


def _pyro_prior_points(spec, n=3, seed=0):
    """n draws of the latent sites from the Pyro twin's prior (float64), the mixture's
    means put in order (the condition)."""
    import pyro
    from pyro import poutine
    pyro.set_rng_seed(seed)
    data = spec.pyro_data(dtype=torch.float64)
    points = []
    for _ in range(n):
        tr = poutine.trace(spec.pyro_model).get_trace(**data)
        pt = {k: tr.nodes[k]["value"].to(torch.float64) for k in spec.sites}
        if "mu1" in pt and pt["mu1"] > pt["mu2"]:
            pt["mu1"], pt["mu2"] = pt["mu2"], pt["mu1"]
        points.append(pt)
    return points


def _ppl_log_joint(model, spec, points):
    trace = {k: torch.stack([pt[k] for pt in points]) for k in spec.sites}
    return model.log_joint(trace, **spec.data()).tolist()


# ------------------------------------------------------------------ the twins are the same model
@pytest.mark.parametrize("name", NAMES)
def test_pyro_twin_has_the_ppl_log_density(name, float64):
    from pyro import poutine
    spec, model, _ = _load(name)
    points = _pyro_prior_points(spec)
    data = spec.pyro_data(dtype=torch.float64)
    ours = _ppl_log_joint(model, spec, points)
    theirs = [float(poutine.trace(poutine.condition(spec.pyro_model, data=pt)).get_trace(**data).log_prob_sum())
              for pt in points]
    assert all(math.isfinite(v) for v in ours)
    assert np.allclose(ours, theirs, rtol=1e-9, atol=1e-9), (ours, theirs)


def test_a_violated_condition_is_impossible_in_every_twin(float64):
    """The ordered mixture: mu1 > mu2 has log density -inf in ppl and in the Pyro twin."""
    from pyro import poutine
    spec, model, _ = _load("mixture_marginal")
    pt = _pyro_prior_points(spec)[0]
    pt["mu1"], pt["mu2"] = pt["mu2"] + 1.0, pt["mu1"]
    data = spec.pyro_data(dtype=torch.float64)
    assert _ppl_log_joint(model, spec, [pt, pt]) == [-math.inf, -math.inf]
    tr = poutine.trace(poutine.condition(spec.pyro_model, data=pt)).get_trace(**data)
    assert float(tr.log_prob_sum()) == -math.inf


# ------------------------------------------------------------------ the examples run
@pytest.mark.parametrize("name", NAMES)
def test_example_runs_under_tempering_with_the_twins_sites(name):
    spec, model, data = _load(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # 30 particles: the ESS warnings are expected
        r = model.run("tempering", data, particles=30, seed=0)
    assert set(r.samples) == set(spec.sites) | {"return"}
    for site, shape in spec.sites.items():
        assert tuple(r.samples[site].shape[1:]) == shape, site
    draws = {k: r.samples[k].unsqueeze(0) for k in spec.sites}
    cols = spec.columns(draws)
    assert list(cols) == spec.column_names()
    ret = r.samples["return"].reshape(1, r.samples["return"].shape[0], -1).double().numpy()
    mine = np.stack([cols[c] for c in cols if c.startswith("return")], axis=-1)
    assert np.allclose(ret, mine, rtol=1e-5, atol=1e-5), "the twins' return value is the program's"


# ------------------------------------------------------------------ headers, commands, README
def _header(spec) -> str:
    return "\n".join(line for line in spec.ppl_file.read_text().splitlines() if line.startswith("#"))


def _header_command(spec) -> list[str]:
    """The argv (after `python -m ppl`) of the header's run command."""
    cmds = [shlex.split(m.group(1)) for m in re.finditer(r"#\s+python -m ppl (run .*)", _header(spec))]
    assert len(cmds) == 1, spec.name
    return cmds[0]


@pytest.mark.parametrize("name", NAMES)
def test_example_has_header_command_and_readme_entry(name):
    spec, model, data = _load(name)
    header = _header(spec)
    assert "Expected answer" in header and "Run:" in header
    argv = _header_command(spec)
    assert argv[:4] == ["run", f"examples/{name}.ppl", "--data", f"examples/{name}.json"]
    args = cli.build_parser().parse_args(argv)
    assert args.method == "nuts"
    assert f"({name}.ppl)" in (ROOT / "examples" / "README.md").read_text()
    assert set(data) <= set(model.params)


def test_header_command_runs_through_the_cli(monkeypatch):
    """The logistic regression's header command, shortened (2 chains x 30 draws), runs
    through the CLI and its --json names the columns the references name."""
    spec = MODELS["logistic_regression"]
    argv = _header_command(spec)
    for flag, value in (("-n", "2"), ("--samples", "30"), ("--burn-in", "30")):
        argv[argv.index(flag) + 1] = value
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.simplefilter("ignore")    # 30 draws: R-hat/ESS warnings expected
        assert cli.main(argv + ["--json"]) == 0
    result = json.loads(out.getvalue())
    assert result["method"] == "nuts" and result["chains"] == 2 and result["draws"] == 30
    assert set(result["ess_per_site"]) == set(spec.column_names())


# ------------------------------------------------------------------ calendar-year regression: closed form
def _calendar_closed_form(d):
    """Posterior N(m, C) of (intercept, slope) in float64, and its precision P."""
    x = np.asarray(d["years"])
    y = np.asarray(d["ys"])
    s2 = d["sigma"] ** 2
    X = np.stack([np.ones_like(x), x], axis=1)
    P = np.diag([1 / 1000.0 ** 2, 1 / 10.0 ** 2]) + X.T @ X / s2
    C = np.linalg.inv(P)
    m = np.linalg.solve(P, X.T @ y / s2)
    return m, C, P


def test_calendar_regression_posterior_is_the_closed_form(float64):
    spec, model, data = _load("calendar_regression")
    m, C, P = _calendar_closed_form(data)
    ref = REFERENCES["calendar_regression"]["columns"]
    assert abs(ref["intercept"]["mean"] - m[0]) < 1e-6 * ref["intercept"]["sd"]
    assert abs(ref["slope"]["mean"] - m[1]) < 1e-6 * ref["slope"]["sd"]
    assert abs(ref["slope"]["sd"] - math.sqrt(C[1, 1])) < 1e-6 * ref["slope"]["sd"]
    corr = C[0, 1] / math.sqrt(C[0, 0] * C[1, 1])
    assert corr < -0.9999
    # ppl's log joint - log N(theta; m, C) is one number (the log evidence) everywhere
    L = np.linalg.cholesky(C)
    pts = m[None, :] + np.random.default_rng(0).normal(size=(4, 2)) @ L.T
    lj = np.asarray(model.log_joint({"intercept": torch.tensor(pts[:, 0]), "slope": torch.tensor(pts[:, 1])},
                                    **data).tolist())
    dev = pts - m
    log_post = -0.5 * np.einsum("ni,ij,nj->n", dev, P, dev) - math.log(2 * math.pi) + 0.5 * np.linalg.slogdet(P)[1]
    diff = lj - log_post
    assert np.ptp(diff) < 1e-6, diff


# ------------------------------------------------------------------ references and headers
@pytest.mark.parametrize("name", NAMES)
def test_reference_covers_every_column_and_the_header_states_it(name):
    spec = MODELS[name]
    ref = REFERENCES[name]
    assert list(ref["columns"]) == spec.column_names()
    header = _header(spec)
    for col, e in ref["columns"].items():
        assert e["sd"] > 0 and e["mcse_mean"] >= 0 and e["mcse_sd"] >= 0
        if spec.closed_form:
            assert e["mcse_mean"] == 0 and e["mcse_sd"] == 0
        else:
            assert e["mcse_mean"] < 0.02 * e["sd"], "a long reference run"
        assert header_line(col, e) in header, f"{spec.ppl_file.name} should state {header_line(col, e)!r}"
    assert f"--data examples/{name}.json" in header


def header_line(col: str, e: dict) -> str:
    """How a header states one column's reference (bench/make_references.py --header)."""
    return f"{col} {e['mean']:.4g} (sd {e['sd']:.4g})"


def test_eight_schools_importance_matches_the_quadrature_reference():
    spec, model, data = _load("eight_schools")
    r = model.run("importance", data, particles=20000, seed=0)
    ref = REFERENCES["eight_schools"]["columns"]
    cols = spec.columns({k: r.samples[k].unsqueeze(0) for k in spec.sites})
    lw = r.log_weights.numpy()
    w = np.exp(lw - lw.max())
    w /= w.sum()
    for col in ("mu", "tau", "theta_tilde[0]", "return[0]"):
        est = float(np.sum(w * cols[col][0]))
        se = ref[col]["sd"] / math.sqrt(r.ess)
        assert abs(est - ref[col]["mean"]) <= Z * se, (col, est, ref[col]["mean"], se)


# ------------------------------------------------------------------ ppl nuts against the references
# The models where 4 chains x (200 warm-up + 300 draws) take a few seconds; GARCH (a loop
# of 150 observes), the GP (a nested map) and the calendar regression (dense mass) are
# left to bench/bench_nuts.py, which compares every contender with the references.
NUTS_MODELS = ["eight_schools", "ar", "logistic_regression", "mixture_marginal"]


def _sd_se(x: np.ndarray, ess: float) -> float:
    """Standard error of a sample sd from ess effective draws: sd sqrt((kurtosis - 1) / (4 ess))."""
    c = x - x.mean()
    kurtosis = float((c ** 4).mean() / (c ** 2).mean() ** 2)
    return float(x.std()) * math.sqrt(max(kurtosis - 1, 0.0) / (4 * ess))


@pytest.mark.parametrize("name", NUTS_MODELS)
def test_nuts_matches_the_reference(name):
    spec, model, data = _load(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ppl.PPLDiagnosticWarning)   # converged: no R-hat/ESS/divergence warning
        r = model.run("nuts", data, chains=4, samples=300, burn_in=200, seed=0)
    assert r.extra["divergences"] == 0
    ref = REFERENCES[name]["columns"]
    cols = spec.columns(ppl_draws(r))
    assert set(cols) == set(r.ess_per_site)
    for col, draws in cols.items():
        x = draws.reshape(-1)
        ess = float(r.ess_per_site[col])
        e = ref[col]
        se_mean = math.hypot(e["sd"] / math.sqrt(ess), e["mcse_mean"])
        assert abs(x.mean() - e["mean"]) <= Z * se_mean, (col, x.mean(), e["mean"], se_mean)
        se_sd = math.hypot(_sd_se(x, ess), e["mcse_sd"])
        assert abs(x.std() - e["sd"]) <= Z * se_sd, (col, x.std(), e["sd"], se_sd)
