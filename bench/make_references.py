"""Reference posteriors of the NUTS benchmark's models (bench/nuts_models.py), written to
bench/references.json: for every scalar column (each scalar site, each element of a
vector site, the return value) its posterior mean and sd, with their Monte Carlo
standard errors.

    JAX_PLATFORMS=cpu .venv/bin/python bench/make_references.py [--only NAME] [--quick]

How each reference is computed:
* closed form: the calendar-year regression (Gaussian posterior, computed in exact
  rational arithmetic: with years ~2000 the correlation is ~ -1 and float64 would lose
  digits to cancellation);
* quadrature over one scale, the rest Gaussian given it: eight schools (given tau, the
  non-centred (mu, theta_tilde) are a linear-Gaussian model) and AR(2) (given sigma,
  (alpha, beta) are); a trapezoid rule on log tau / log sigma, checked against a grid half
  as fine (the change is printed and must be below 1e-6 posterior sds);
  their MCSEs are 0;
* otherwise a long NumPyro NUTS run (float64, target acceptance 0.95, 8 chains x 25,000
  draws after 2,000 warm-up draws, chains vectorised, fixed seed); MCSEs of mean and sd
  from ArviZ (``az.mcse``); the run's maximum split R-hat, minimum bulk ESS and
  divergences are stored with it.
Every closed-form/quadrature reference is also checked against a NumPyro NUTS run of the
same twin (4 chains x 5,000 draws; every mean within 5 MCSEs), which checks the twins and
the quadrature at once; before any run, ppl's, NumPyro's and Pyro's log joints are
compared at 3 points. One thread (as ../shared/BENCHMARKING.md says); about 8 minutes of
CPU time in all.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from fractions import Fraction  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nuts_models import MODELS, NutsModel  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "references.json"
SEED = 20261205
TARGET_ACCEPT = 0.95   # small steps: few divergences (the GP's noise sd near 0 is a mild funnel)


# ------------------------------------------------------------------- Gaussian helpers
def _moments(weights: np.ndarray, means: np.ndarray, variances: np.ndarray) -> tuple[float, float]:
    """Mean and sd of a mixture: sum_k w_k N(means_k, variances_k) (weights sum to 1)."""
    mean = float(np.sum(weights * means))
    second = float(np.sum(weights * (variances + means ** 2)))
    return mean, math.sqrt(max(second - mean ** 2, 0.0))


def _entry(mean: float, sd: float, mcse_mean: float = 0.0, mcse_sd: float = 0.0) -> dict:
    return {"mean": mean, "sd": sd, "mcse_mean": mcse_mean, "mcse_sd": mcse_sd}


def _trapezoid_weights(u: np.ndarray, log_density: np.ndarray) -> np.ndarray:
    """Normalised trapezoid weights on the grid u for an unnormalised log density."""
    w = np.exp(log_density - log_density.max())
    w[0] *= 0.5
    w[-1] *= 0.5
    return w / w.sum()


def _linear_gaussian(prior_var: np.ndarray, A: np.ndarray, noise_var: np.ndarray, y: np.ndarray):
    """v ~ N(0, diag(prior_var)), y ~ N(A v, diag(noise_var)): (posterior mean, posterior
    cov, log p(y)), by the precision form (no n x n determinant)."""
    P = np.diag(1 / prior_var) + A.T @ (A / noise_var[:, None])
    C = np.linalg.inv(P)
    b = A.T @ (y / noise_var)
    m = C @ b
    n = y.size
    _, logdet_p = np.linalg.slogdet(P)
    log_py = (-0.5 * n * math.log(2 * math.pi) - 0.5 * np.sum(np.log(noise_var)) - 0.5 * np.sum(np.log(prior_var))
              - 0.5 * logdet_p - 0.5 * (np.sum(y ** 2 / noise_var) - b @ m))
    return m, C, log_py


def _quadrature(log_scale_grid: np.ndarray, conditional, log_prior_scale, linear_columns: dict) -> dict:
    """Posterior moments by quadrature over a positive scale s = exp(u) with everything
    else Gaussian given it. ``conditional(s) -> (mean, cov, log p(y | s))`` of the Gaussian
    vector v; ``linear_columns``: name -> function s -> coefficient vector c (column = c . v).
    The scale's own column is named by the key "__scale__"."""
    scales = np.exp(log_scale_grid)
    log_post = np.empty_like(scales)
    means = {k: np.empty_like(scales) for k in linear_columns}
    variances = {k: np.empty_like(scales) for k in linear_columns}
    for i, s in enumerate(scales):
        m, C, log_py = conditional(s)
        log_post[i] = log_py + log_prior_scale(s) + log_scale_grid[i]   # ds = s du
        for k, coef in linear_columns.items():
            c = coef(s)
            means[k][i] = c @ m
            variances[k][i] = c @ C @ c
    w = _trapezoid_weights(log_scale_grid, log_post)
    out = {k: _moments(w, means[k], variances[k]) for k in linear_columns}
    out["__scale__"] = _moments(w, scales, np.zeros_like(scales))
    return out


def _checked_quadrature(make_grid, run) -> dict:
    """``run(grid)`` on a grid and on one half as fine; every moment must agree to 1e-6 sd."""
    fine, coarse = run(make_grid(40001)), run(make_grid(20001))
    worst = max(abs(fine[k][j] - coarse[k][j]) / fine[k][1] for k in fine for j in (0, 1))
    print(f"  quadrature: largest change from halving the grid = {worst:.2e} posterior sds")
    assert worst < 1e-6, worst
    return fine


# ------------------------------------------------------------------- eight schools (quadrature over tau)
def eight_schools_reference(spec: NutsModel) -> dict:
    d = spec.data()
    y, sigma = np.asarray(d["y"]), np.asarray(d["sigma"])
    J = y.size
    prior_var = np.concatenate([[25.0], np.ones(J)])

    def conditional(tau):
        A = np.concatenate([np.ones((J, 1)), tau * np.eye(J)], axis=1)
        return _linear_gaussian(prior_var, A, sigma ** 2, y)

    def log_half_cauchy(tau, scale=5.0):
        return math.log(2 / (math.pi * scale)) - math.log1p((tau / scale) ** 2)

    def unit(k):
        return lambda tau: np.eye(J + 1)[k]

    columns = {"mu": unit(0)}
    for j in range(J):
        columns[f"theta_tilde[{j}]"] = unit(j + 1)
        columns[f"return[{j}]"] = (lambda j: lambda tau: np.eye(J + 1)[0] + tau * np.eye(J + 1)[j + 1])(j)
    res = _checked_quadrature(lambda n: np.linspace(-14.0, 9.0, n),
                              lambda grid: _quadrature(grid, conditional, log_half_cauchy, columns))
    res["tau"] = res.pop("__scale__")
    return {"method": "quadrature over log tau (trapezoid, 40001 points on [-14, 9]); Gaussian given tau",
            "columns": {k: _entry(*res[k]) for k in spec.column_names()}}


# ------------------------------------------------------------------- AR(K) (quadrature over sigma)
def ar_reference(spec: NutsModel) -> dict:
    d = spec.data()
    ys, K = np.asarray(d["ys"]), int(d["K"])
    T = ys.size
    X = np.concatenate([np.ones((T - K, 1))] + [ys[K - 1 - k:T - 1 - k, None] for k in range(K)], axis=1)
    prior_var = np.concatenate([[4.0], np.ones(K)])
    tail = ys[::-1][:K]

    def conditional(s):
        return _linear_gaussian(prior_var, X, np.full(T - K, s * s), ys[K:])

    def log_half_normal(s, scale=1.0):
        return 0.5 * math.log(2 / math.pi) - math.log(scale) - 0.5 * (s / scale) ** 2

    def unit(k):
        return lambda s: np.eye(K + 1)[k]

    columns = {"return": lambda s: np.concatenate([[1.0], tail]), "alpha": unit(0)}
    for k in range(K):
        columns[f"beta[{k}]"] = unit(k + 1)
    res = _checked_quadrature(lambda n: np.linspace(math.log(0.05), math.log(20.0), n),
                              lambda grid: _quadrature(grid, conditional, log_half_normal, columns))
    res["sigma"] = res.pop("__scale__")
    return {"method": "quadrature over log sigma (trapezoid, 40001 points on [log 0.05, log 20]); Gaussian given sigma",
            "columns": {k: _entry(*res[k]) for k in spec.column_names()}}


# ------------------------------------------------------------------- calendar regression (closed form)
def calendar_regression_reference(spec: NutsModel) -> dict:
    """Exact rational arithmetic: precision P = diag(1/1000^2, 1/10^2) + X^T X / sigma^2."""
    d = spec.data()
    xs = [Fraction(str(x)) for x in d["years"]]
    ys = [Fraction(str(y)) for y in d["ys"]]
    s2 = Fraction(str(d["sigma"])) ** 2
    p00 = Fraction(1, 1000 ** 2) + len(xs) / s2
    p01 = sum(xs) / s2
    p11 = Fraction(1, 10 ** 2) + sum(x * x for x in xs) / s2
    b0, b1 = sum(ys) / s2, sum(x * y for x, y in zip(xs, ys)) / s2
    det = p00 * p11 - p01 * p01
    c00, c01, c11 = p11 / det, -p01 / det, p00 / det
    m0, m1 = c00 * b0 + c01 * b1, c01 * b0 + c11 * b1
    ret_mean = m0 + 2021 * m1
    ret_var = c00 + 2 * 2021 * c01 + 2021 ** 2 * c11
    cols = {"return": _entry(float(ret_mean), math.sqrt(ret_var)),
            "intercept": _entry(float(m0), math.sqrt(c00)), "slope": _entry(float(m1), math.sqrt(c11))}
    corr = float(c01) / math.sqrt(c00 * c11)
    print(f"  corr(intercept, slope) = {corr:.6f}")
    return {"method": "closed form (Gaussian posterior, exact rational arithmetic)", "columns": cols,
            "corr_intercept_slope": corr}


# ------------------------------------------------------------------- NumPyro NUTS
def numpyro_run(spec: NutsModel, *, chains: int, draws: int, warmup: int, seed: int) -> tuple[dict, dict]:
    """A long NumPyro NUTS run in float64: (column -> entry with ArviZ MCSEs, run facts)."""
    import arviz as az
    import jax
    from numpyro.infer import MCMC, NUTS
    jax.config.update("jax_enable_x64", True)
    t0 = time.perf_counter()
    mcmc = MCMC(NUTS(spec.numpyro_model, target_accept_prob=TARGET_ACCEPT), num_warmup=warmup, num_samples=draws,
                num_chains=chains, chain_method="vectorized", progress_bar=False)
    mcmc.run(jax.random.PRNGKey(seed), **spec.numpyro_data(), extra_fields=("diverging",))
    samples = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    cols = spec.columns(samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = az.from_dict(posterior=cols)
        mcse_mean = az.mcse(idata, method="mean")
        mcse_sd = az.mcse(idata, method="sd")
        ess = az.ess(idata, method="bulk")
        rhat = az.rhat(idata)
    entries = {k: _entry(float(v.mean()), float(v.std(ddof=1)), float(mcse_mean[k]), float(mcse_sd[k]))
               for k, v in cols.items()}
    facts = {"chains": chains, "draws": draws, "warmup": warmup, "seed": seed,
             "divergences": int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum()),
             "max_split_r_hat": max(float(rhat[k]) for k in cols),
             "min_bulk_ess": min(float(ess[k]) for k in cols),
             "seconds": round(time.perf_counter() - t0, 1)}
    return entries, facts


def check_against_nuts(name: str, exact: dict, nuts: dict, z: float = 5.0) -> dict:
    """Every NUTS mean within z MCSEs of the exact reference (else an AssertionError)."""
    scores = {k: (nuts[k]["mean"] - exact[k]["mean"]) / nuts[k]["mcse_mean"] for k in exact}
    worst = max(scores, key=lambda k: abs(scores[k]))
    print(f"  NUTS check: worst column {worst}: {scores[worst]:+.2f} MCSEs")
    assert abs(scores[worst]) < z, (name, worst, scores[worst])
    return {"worst_column": worst, "z": round(scores[worst], 2)}


EXACT = {"eight_schools": eight_schools_reference, "ar": ar_reference,
         "calendar_regression": calendar_regression_reference}


def check_twins(spec: NutsModel, points: int = 3) -> None:
    """The NumPyro and Pyro twins have ppl's log joint (float64, to 1e-9) at draws from the
    Pyro twin's prior (the mixture's means put in order): the same model, the same sites."""
    import jax
    import pyro
    import torch
    from numpyro.infer.util import log_density
    from pyro import poutine

    import ppl
    jax.config.update("jax_enable_x64", True)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pyro.set_rng_seed(0)
        data = spec.pyro_data()
        pts = []
        for _ in range(points):
            tr = poutine.trace(spec.pyro_model).get_trace(**data)
            pt = {k: tr.nodes[k]["value"] for k in spec.sites}
            if "mu1" in pt and pt["mu1"] > pt["mu2"]:
                pt["mu1"], pt["mu2"] = pt["mu2"], pt["mu1"]
            pts.append(pt)
        ours = ppl.model(str(spec.ppl_file)).log_joint({k: torch.stack([p[k] for p in pts]) for k in spec.sites},
                                                       **spec.data()).tolist()
        pyro_lp = [float(poutine.trace(poutine.condition(spec.pyro_model, data=p)).get_trace(**data).log_prob_sum())
                   for p in pts]
        np_data = spec.numpyro_data(dtype=np.float64)
        numpyro_lp = [float(log_density(spec.numpyro_model, (), np_data, {k: v.numpy() for k, v in p.items()})[0])
                      for p in pts]
    finally:
        torch.set_default_dtype(old)
    assert np.allclose(ours, pyro_lp, rtol=1e-9, atol=1e-9), (spec.name, ours, pyro_lp)
    assert np.allclose(ours, numpyro_lp, rtol=1e-9, atol=1e-9), (spec.name, ours, numpyro_lp)
    print(f"  twins: ppl, Pyro and NumPyro log joints agree at {points} points")


def reference(spec: NutsModel, quick: bool) -> dict:
    chains, draws, warmup = (2, 2000, 500) if quick else (4, 5000, 1000) if spec.name in EXACT else (8, 25000, 2000)
    seed = SEED + sorted(MODELS).index(spec.name)
    print(f"{spec.name}:")
    check_twins(spec)
    entries, facts = numpyro_run(spec, chains=chains, draws=draws, warmup=warmup, seed=seed)
    print(f"  numpyro NUTS: {facts}")
    if spec.name in EXACT:
        ref = EXACT[spec.name](spec)
        ref["nuts_check"] = {**check_against_nuts(spec.name, ref["columns"], entries), **facts}
        return ref
    return {"method": f"NumPyro NUTS (float64, target_accept {TARGET_ACCEPT}), {chains} chains x {draws} draws after "
                      f"{warmup} warm-up, seed {seed}; MCSEs from ArviZ", "columns": entries, "run": facts}


def header_line(col: str, e: dict) -> str:
    """How an example's header states one column's reference (tests/test_continuous_examples.py
    checks every header with the same format)."""
    return f"{col} {e['mean']:.4g} (sd {e['sd']:.4g})"


def print_headers(only: str | None) -> int:
    refs = json.loads(OUT.read_text())
    for name, ref in refs.items():
        if only and only not in name:
            continue
        print(f"{name}: {ref['method']}")
        for col, e in ref["columns"].items():
            mcse = f", MCSE {e['mcse_mean']:.2g}" if e["mcse_mean"] else ""
            print(f"#     {header_line(col, e)}{mcse}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="only the models whose name contains this")
    ap.add_argument("--quick", action="store_true", help="short runs, printed only (references.json untouched)")
    ap.add_argument("--header", action="store_true",
                    help="print each model's reference as its example's header states it (no runs)")
    args = ap.parse_args()
    if args.header:
        return print_headers(args.only)
    refs = json.loads(OUT.read_text()) if OUT.exists() else {}
    for name, spec in MODELS.items():
        if args.only and args.only not in name:
            continue
        refs[name] = reference(spec, args.quick)
        for col, e in refs[name]["columns"].items():
            print(f"    {col:<16} mean {e['mean']:+.5g} (mcse {e['mcse_mean']:.2g})  sd {e['sd']:.5g}")
    if not args.quick:
        OUT.write_text(json.dumps({k: refs[k] for k in MODELS if k in refs}, indent=1) + "\n")
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
