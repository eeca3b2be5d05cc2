"""Delayed sampling (issue 12, bench (b)): a linear-Gaussian state-space model, T = 100,
filtered by ppl's SMC with delayed sampling and ONE particle against bootstrap SMC with
N = 10,000 particles: time, and the error of the log-evidence estimate against the
Kalman filter.

Model and data: those of ``bench_smc`` (x_0 ~ N(0, 1), x_t = 0.9 x_{t-1} + N(0, 1),
y_t ~ N(x_t, 1), the same 100 observations). Contenders:

* "ppl smc delayed, N = 1": ``inference.delayed.delayed_smc`` on the compiled model (what
  ``model.run("smc", ..., delayed=True)`` runs, without the result object); every
  observe adds the exact predictive density, so the estimate is the Kalman value;
* "ppl Model.run delayed, N = 1": the same through ``Model.run`` (+ result object);
* "ppl smc bootstrap, N = 10,000": ``inference.smc.smc`` (prior proposal, systematic
  resampling after every observation); the reference of the ratios;
* "hand-written torch PF, N = 10,000": ``bench_smc.hand_pf``, the same bootstrap filter
  written as a torch user would;
* "hand-written Kalman filter": the exact answer in Python floats, for scale.
"""
from __future__ import annotations

import statistics

import torch

import ppl
from ppl.inference.delayed import delayed_smc
from ppl.inference.resampling import log_mean_exp
from ppl.inference.smc import smc

from bench_importance import SSM, kalman_log_evidence
from bench_smc import A, Q, R, hand_pf
from common import report, time_interleaved


def _data() -> torch.Tensor:
    torch.manual_seed(0)  # the data of bench_smc (which draws bench_importance's 20 flips first)
    torch.rand(20)
    x, ys = 0.0, []
    for _ in range(100):
        x = A * x + torch.randn(()).item()
        ys.append(x + torch.randn(()).item())
    return torch.tensor(ys)


def _err_note(estimates: list, exact: float) -> str:
    errs = [float(e) - exact for e in estimates]
    sd = statistics.stdev(errs) if len(errs) > 1 else float("nan")
    worst = max(abs(e) for e in errs)
    return f"log Z error {statistics.mean(errs):+.2e} (sd {sd:.2e}, max |err| {worst:.2e})"


def run(repeats: int = 9, quick: bool = False) -> dict:
    ys = _data()
    exact = kalman_log_evidence(ys, A, Q, R)
    model = ppl.model(SSM)
    interp = model.interpreter()
    data = model.prepare_data(model.bind((), {"ys": ys}), "cpu")
    n_boot = 1_000 if quick else 10_000

    def delayed_one():
        pop = delayed_smc(interp, "ssm", data, 1, "cpu", resampling="systematic", ess_threshold=1.0)
        return log_mean_exp(pop.log_weights)

    def delayed_model_run():
        return model.run("smc", {"ys": ys}, particles=1, delayed=True).log_evidence

    def bootstrap():
        pop = smc(interp, "ssm", data, n_boot, "cpu", resampling="systematic", ess_threshold=1.0)
        return log_mean_exp(pop.log_weights)

    contenders = {
        "ppl smc bootstrap": bootstrap,
        "ppl smc delayed, N = 1": delayed_one,
        "ppl Model.run delayed, N = 1": delayed_model_run,
        "hand-written torch PF": lambda: hand_pf(ys, n_boot),
        "hand-written Kalman filter": lambda: kalman_log_evidence(ys, A, Q, R),
    }
    estimates: dict[str, list] = {}
    times = time_interleaved(contenders, repeats, results=estimates)
    notes = {name: _err_note(est, exact) for name, est in estimates.items()}
    out = report(f"Delayed sampling: LGSSM T = 100, SMC with N = 1 (delayed) vs bootstrap N = {n_boot:,} "
                 f"(Kalman log Z = {exact:.4f}; error = estimate - Kalman over {repeats} runs)",
                 times, "ppl smc bootstrap", extra=notes)
    worst = max(abs(float(e) - exact) for e in estimates["ppl smc delayed, N = 1"])
    print(f"  target: delayed N = 1 equals the Kalman filter to 1e-6: {'OK' if worst < 1e-6 else 'MISSED'} "
          f"(max |error| {worst:.1e}); faster than bootstrap N = {n_boot:,}: "
          f"{'OK' if out['ppl smc delayed, N = 1'][1] < 1 else 'MISSED'} ({out['ppl smc delayed, N = 1'][1]:.2f}x)")
    return {"delayed_lgssm": out, "delayed_errors": notes}
