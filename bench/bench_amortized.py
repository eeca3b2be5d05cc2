"""Amortized inference: time to a posterior on a NEW data set, at equal accuracy.

Models: Bayesian linear regression, whose posterior is known in closed form:
examples/linear_regression.ppl (w0, w1 ~ N(0, 2), 20 points with fixed xs, sigma = 1),
and an 8-coefficient version (one vector choice w ~ N(0, 2 I), 40 points, a fixed random
design). New data sets are drawn from the model's prior predictive (a seed never used in
training).

Contenders, each producing a weighted posterior for one new data set from scratch:

* guide + IS: importance sampling with an amortized low-rank guide (rank 1 / 4; trained once,
  beforehand, with the forward KL on simulated data sets; its training time is reported
  separately, with the number of data sets after which it has paid for itself);
* SMC: ``model.run("smc")`` (prior proposal, systematic resampling at every observation);
* resample-move: SMC with one MH move per particle after each resampling;
* prior IS: likelihood weighting.

Accuracy is matched by the root-mean-square error of the posterior means of (w0, w1)
against the closed form, in units of the posterior sd, over R fresh data sets (one seed
each): for each contender the particle count N is the smallest on a doubling grid whose
RMSE is at most TARGET (0.05 sd: a Monte Carlo error a twentieth of the posterior's
width; with R = 16 data sets the RMSE itself is known to about 10%); the search stops at
the end of the grid or once one run takes over 3 s (1 s with --quick), and a contender
that misses the target is marked so (its time is then a lower bound). The timings run
every contender at its own N on the same data sets, interleaved, torch threads fixed (1
by default), medians and ratios to guide + IS. Each run is ``model.run`` from the data
(the guide's encoder pass included).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time

import torch

import ppl
from ppl.testing.sbc import prior_predictive

from common import report, time_interleaved

TARGET = 0.05
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

# a harder case: 8 coefficients (a vector choice), 40 points
REGRESSION_D = """
def reg(X, ys, sigma):
    w ~ normal(zeros(len(X[0])), 2.0)
    for i in range(len(ys)):
        observe ys[i] ~ normal(dot(w, X[i]), sigma)
    return w
"""


def _posterior(X, ys, sigma=1.0, prior_sd=2.0):
    X = torch.as_tensor(X, dtype=torch.float64)
    P = torch.eye(X.shape[1], dtype=torch.float64) / prior_sd ** 2 + X.T @ X / sigma ** 2
    C = torch.linalg.inv(P)
    return C @ X.T @ torch.tensor(ys, dtype=torch.float64) / sigma ** 2, C.diag().sqrt()


def _means(r, names):
    if len(names) == 1:  # a vector site
        return [float(x) for x in torch.as_tensor(r.mean(names[0])).flatten()]
    return [float(r.mean(a)) for a in names]


def _rmse(model, sets, truths, names, method, n, seed0, **opts):
    """(RMSE in posterior sds, seconds of the slowest run)."""
    se, slowest = [], 0.0
    for i, (d, (mean, sd)) in enumerate(zip(sets, truths)):
        t = time.perf_counter()
        r = model.run(method, d, particles=n, seed=seed0 + i, **opts)
        slowest = max(slowest, time.perf_counter() - t)
        for j, m in enumerate(_means(r, names)):
            se.append(((m - float(mean[j])) / float(sd[j])) ** 2)
    return math.sqrt(sum(se) / len(se)), slowest


def _match(model, sets, truths, names, method, grid, cap_s, **opts):
    """The smallest N of the grid reaching TARGET, with its RMSE; the search stops at the
    end of the grid or once one run takes more than cap_s seconds."""
    for n in grid:
        e, slowest = _rmse(model, sets, truths, names, method, n, 1000, **opts)
        if e <= TARGET or slowest > cap_s:
            return n, e
    return n, e


def _problem(title, model, template, X, names, family, rank, steps, R, grid, cap_s, repeats):
    sims = prior_predictive(model, template, simulations=R, seed=777)
    sets = [dict(template, ys=[float(v) for v in s.observations.values()]) for s in sims]
    truths = [_posterior(X, d["ys"]) for d in sets]

    t0 = time.perf_counter()
    guide = ppl.guide(model, template, family=family, rank=rank, encoder="auto")
    guide.fit(objective="forward_kl", steps=steps, seed=0, progress=False)
    train_s = time.perf_counter() - t0

    contenders = {
        "guide + IS": ("importance", {"proposal": guide}),
        "SMC": ("smc", {}),
        "resample-move": ("resample_move", {"moves": 1, "kernel": "rw", "scale": 0.3}),
        "prior IS": ("importance", {}),
    }
    sizes, errs = {}, {}
    for name, (method, opts) in contenders.items():
        sizes[name], errs[name] = _match(model, sets, truths, names, method, grid, cap_s, **opts)

    k = [0]

    def make(name):
        method, opts = contenders[name]

        def fn():
            d = sets[k[0] % len(sets)]
            k[0] += 1
            return model.run(method, d, particles=sizes[name], **opts)
        return fn

    times = time_interleaved({name: make(name) for name in contenders}, repeats, warmup=1)
    notes = {name: f"N = {sizes[name]:,}, RMSE {errs[name]:.3f} sd" +
             ("" if errs[name] <= TARGET else " (target missed: accuracy NOT matched)") for name in contenders}
    out = report(f"{title}: time to a posterior on a new data set; matched accuracy = RMSE of the posterior "
                 f"means <= {TARGET} posterior sd over {R} fresh data sets", times, "guide + IS", extra=notes)
    per_set = statistics.median(times["guide + IS"])
    for other in ("SMC", "resample-move"):
        saving = statistics.median(times[other]) - per_set
        ok = errs[other] <= TARGET
        print(f"  guide training (forward KL, {steps} steps, once): {train_s:.1f} s; against {other} it pays for "
              f"itself after {math.ceil(train_s / saving) if saving > 0 else 'no number of'} data sets"
              + ("" if ok else f" ({other} missed the target at N = {sizes[other]:,}: it would need more)"))
    out["training_s"] = train_s
    out["sizes"] = sizes
    out["rmse"] = errs
    return out


def run(repeats: int = 9, quick: bool = False) -> dict:
    R = 8 if quick else 16
    grid = [125 * 2 ** k for k in range(9 if quick else 11)]  # 125 .. 32,000 (128,000)
    cap_s = 1.0 if quick else 3.0
    results = {}

    model = ppl.model(os.path.join(EXAMPLES, "linear_regression.ppl"))
    with open(os.path.join(EXAMPLES, "linear_regression.json")) as fh:
        template = json.load(fh)
    X = [[1.0, x] for x in template["xs"]]
    results["regression_2"] = _problem("Linear regression, 2 coefficients, 20 points", model, template, X,
                                       ["w0", "w1"], "lowrank", 1, 800 if quick else 1500, R, grid, cap_s, repeats)

    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, 8, generator=g)
    X[:, 0] = 1.0
    model = ppl.model(REGRESSION_D)
    template = {"X": X.tolist(), "ys": [0.0] * 40, "sigma": 1.0}
    results["regression_8"] = _problem("Linear regression, 8 coefficients, 40 points", model, template, X.tolist(),
                                       ["w"], "lowrank", 4, 1000 if quick else 2000, R, grid, cap_s, repeats)
    return results


if __name__ == "__main__":
    import sys
    torch.set_num_threads(1)
    run(repeats=5, quick="--quick" in sys.argv)
