"""Issue 12 bench (a): a Gaussian mixture with its assignments z summed out vs sampled, at
equal wall time: the posterior error of the component means.

The model is examples/mixture_marginal.ppl's (100 points; w ~ beta(2, 2), ordered means
mu1 < mu2 ~ normal(0, 5), sigma ~ half_normal(2)) written with a discrete assignment per
point, ``z ~ flip(w)``; "enumerated" marks it ``@enumerate`` (summed out inside the method,
``semantics.enumerate_sites``), "sampled" draws it from its prior. Both run the same method
(SMC resampling at every observation, likelihood weighting, and tempering: its MH moves
rejuvenate the continuous parameters, on the summed-out likelihood when z is enumerated); the sampled version gets
as many particles as fit in the enumerated run's median wall time (calibrated by doubling).
Error: the root mean square, over R seeds, of the posterior-mean error of mu1 and of mu2
against the long NumPyro reference of bench/references.json (mu1 -1.515, mu2 2.035; its
MCSE ~5e-4 is negligible here).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import ppl

from common import now

ROOT = Path(__file__).resolve().parent.parent
MODEL = """
def mixture(ys):
    w ~ beta(2, 2)
    mu1 ~ normal(0, 5)
    mu2 ~ normal(0, 5)
    condition mu1 < mu2
    sigma ~ half_normal(2)
    for i in range(len(ys)):
        z ~ flip(w){mark}
        observe ys[i] ~ normal(mu1 if z else mu2, sigma)
    return mu2 - mu1
"""
REFERENCE = {"mu1": -1.515, "mu2": 2.035}


def _reference() -> dict:
    try:
        refs = json.loads((ROOT / "bench" / "references.json").read_text())
        entry = refs.get("mixture_marginal", {}).get("columns", {})
        return {k: float(entry[k]["mean"]) for k in REFERENCE if isinstance(entry.get(k), dict) and "mean" in entry[k]} \
            or REFERENCE
    except (OSError, ValueError, KeyError, TypeError):
        return REFERENCE


def _run(model, data, method, n, seed):
    t0 = now()
    r = model.run(method, data, particles=n, seed=seed)
    seconds = now() - t0
    return seconds, {k: float(r.mean(k)) for k in REFERENCE}


def _rmse(estimates: list[dict], ref: dict) -> dict:
    return {k: math.sqrt(statistics.fmean((e[k] - ref[k]) ** 2 for e in estimates)) for k in ref}


def _equal_time_particles(model, data, method, seconds: float, start: int, cap: int) -> int:
    """The largest doubling of ``start`` whose run takes at most ``seconds`` (one run each)."""
    n = start
    while n * 2 <= cap:
        t, _ = _run(model, data, method, n * 2, seed=10_000)
        if t > seconds:
            break
        n *= 2
    return n


def run(repeats: int = 9, quick: bool = False) -> dict:
    data = json.loads((ROOT / "examples" / "mixture_marginal.json").read_text())
    enumerated = ppl.model(MODEL.format(mark=" @enumerate"))
    sampled = ppl.model(MODEL.format(mark=""))
    ref = _reference()
    seeds = range(3 if quick else max(3, repeats))
    results = {}
    for method, n_enum in (("smc", 500 if quick else 2000), ("importance", 2000 if quick else 20000),
                           ("tempering", 100 if quick else 500)):
        runs = [_run(enumerated, data, method, n_enum, s) for s in seeds]
        t_enum = statistics.median(t for t, _ in runs)
        n_samp = _equal_time_particles(sampled, data, method, t_enum, n_enum // 4 or 1, 1 << 20)
        runs_s = [_run(sampled, data, method, n_samp, s) for s in seeds]
        t_samp = statistics.median(t for t, _ in runs_s)
        e_enum, e_samp = _rmse([e for _, e in runs], ref), _rmse([e for _, e in runs_s], ref)
        print(f"\nmixture (100 points), {method}: z enumerated vs sampled at equal wall time "
              f"(RMSE over {len(seeds)} seeds of the posterior means; reference mu1 {ref['mu1']}, mu2 {ref['mu2']})")
        print(f"  {'contender':<22} {'particles':>10} {'median s':>9} {'RMSE mu1':>9} {'RMSE mu2':>9}")
        print(f"  {'z enumerated':<22} {n_enum:>10,} {t_enum:>9.3f} {e_enum['mu1']:>9.4f} {e_enum['mu2']:>9.4f}")
        print(f"  {'z sampled':<22} {n_samp:>10,} {t_samp:>9.3f} {e_samp['mu1']:>9.4f} {e_samp['mu2']:>9.4f}")
        ratio = max(e_samp.values()) / max(max(e_enum.values()), 1e-12)
        print(f"  error ratio (sampled / enumerated, worst mean): {ratio:.1f}x")
        results[f"enumerate_sites_{method}"] = {"enumerated": (n_enum, t_enum, e_enum),
                                                "sampled": (n_samp, t_samp, e_samp), "error_ratio": ratio}
    return results


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    run(args.repeats, args.quick)
