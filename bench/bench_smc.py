"""SMC: ppl vs a hand-written vectorised torch particle filter vs Pyro's SMCFilter.

Model: the 1-D linear-Gaussian state-space model of ``bench_importance`` (x_0 ~ N(0, 1),
x_t = 0.9 x_{t-1} + N(0, 1), y_t ~ N(x_t, 1)), T = 100, the same data, at N = 1,000 and
N = 10,000. Every contender runs the bootstrap filter (the prior transition as the
proposal) with systematic resampling after every observation, and returns its estimate
of log p(y_1..T), compared with the exact Kalman value.

Every contender runs with distribution argument validation off, as ppl does (it builds
its torch distributions with ``validate_args=False`` and makes its own parameter checks,
which count in its time): ``validate_args=False`` in the hand-written filter, Pyro under
``pyro.validation_enabled(False)``.

* hand-written torch: what a torch user would write: torch.distributions.Normal for the
  transition and the likelihood (``validate_args=False``), log-weights in float64,
  systematic resampling by ``searchsorted`` on the cumulative weights (uniforms scaled by
  the total, clamped: never out of range), the log-evidence accumulated as a tensor (no
  sync per step).
* ppl smc: ``inference.smc.smc`` on the compiled model (the interpreter entry point; it
  also keeps every site's full resampled trajectory, which the filters above do not);
  "ppl Model.run (+result)" adds the result object.
* Pyro SMCFilter: ``pyro.infer.SMCFilter`` with model/guide objects (``init``/``step``),
  the guide proposing from the transition, ``ess_threshold=1.0`` (Pyro resamples when
  ESS < threshold * N, i.e. at every step after an observation). Pyro keeps only
  normalised log-weights and exposes no evidence estimate, so the subclass below runs
  Pyro's own ``_update_weights`` code with one addition: the log-sum-exp of the weights
  just before Pyro subtracts their maximum, minus the one before the step's update
  (one extra logsumexp per step). Pyro's systematic resampler can index one past the end
  when the float32 cumulative sum of the weights ends below 1; such a crash is caught,
  counted, and the run is repeated (its time counts in that sample).
"""
from __future__ import annotations

import functools
import math
import statistics

import torch

import ppl
from ppl.inference.smc import smc
from ppl.inference.resampling import log_mean_exp

from bench_importance import SSM, kalman_log_evidence
from common import report, time_interleaved

A, Q, R = 0.9, 1.0, 1.0


# ------------------------------------------------------------------ hand-written torch
def hand_pf(ys: torch.Tensor, n: int, a=A, q=Q, r=R) -> float:
    """Bootstrap particle filter, systematic resampling at every step; returns log Z."""
    Normal = functools.partial(torch.distributions.Normal, validate_args=False)
    x = Normal(0.0, 1.0).sample((n,))
    log_z = torch.zeros((), dtype=torch.float64)
    offsets = torch.arange(n, dtype=torch.float64)
    for t in range(ys.shape[0]):
        x = Normal(a * x, q).sample()
        lw = Normal(x, r).log_prob(ys[t]).double()
        m = lw.max()
        w = torch.exp(lw - m)
        cdf = torch.cumsum(w, 0)
        log_z = log_z + m + torch.log(cdf[-1] / n)
        u = (offsets + torch.rand((), dtype=torch.float64)) * (cdf[-1] / n)
        x = x[torch.searchsorted(cdf, u, right=True).clamp_(max=n - 1)]
    return float(log_z)


# ------------------------------------------------------------------------------ Pyro
def _pyro():
    """Pyro's pieces, imported when the benchmark runs (pyro is slow to import)."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SMCFilter
    from pyro.infer.smcfilter import SMCFailed
    from pyro.poutine.util import prune_subsample_sites

    class Model:
        def __init__(self, a=A, q=Q, r=R):
            self.a, self.q, self.r = a, q, r

        def init(self, state):
            state["x"] = pyro.sample("x_init", dist.Normal(0.0, 1.0))

        def step(self, state, y):
            state["x"] = pyro.sample("x", dist.Normal(self.a * state["x"], self.q))
            pyro.sample("y", dist.Normal(state["x"], self.r), obs=y)

    class Guide:  # bootstrap: propose from the transition
        def __init__(self, model):
            self.model = model

        def init(self, state):
            pyro.sample("x_init", dist.Normal(0.0, 1.0))

        def step(self, state, y):
            pyro.sample("x", dist.Normal(self.model.a * state["x"], self.model.q))

    class EvidenceSMCFilter(SMCFilter):
        """SMCFilter that also accumulates log Z (see the module docstring)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.log_evidence = torch.zeros((), dtype=torch.float64)

        @torch.no_grad()
        def _update_weights(self, model_trace, guide_trace):
            before = self.state._log_weights.logsumexp(-1)
            # --- pyro.infer.smcfilter.SMCFilter._update_weights (pyro 1.9), verbatim ---
            model_trace = prune_subsample_sites(model_trace)
            guide_trace = prune_subsample_sites(guide_trace)
            model_trace.compute_log_prob()
            guide_trace.compute_log_prob()
            for name, guide_site in guide_trace.nodes.items():
                if guide_site["type"] == "sample":
                    model_site = model_trace.nodes[name]
                    log_p = model_site["log_prob"].reshape(self.num_particles, -1).sum(-1)
                    log_q = guide_site["log_prob"].reshape(self.num_particles, -1).sum(-1)
                    self.state._log_weights += log_p - log_q
                    if not (self.state._log_weights.max() > -math.inf):
                        raise SMCFailed("Failed to find feasible hypothesis after site {}".format(name))
            for site in model_trace.nodes.values():
                if site["type"] == "sample" and site["is_observed"]:
                    log_p = site["log_prob"].reshape(self.num_particles, -1).sum(-1)
                    self.state._log_weights += log_p
                    if not (self.state._log_weights.max() > -math.inf):
                        raise SMCFailed("Failed to find feasible hypothesis after site {}".format(site["name"]))
            # --- the one addition: the step's evidence factor, before the max is removed ---
            self.log_evidence += (self.state._log_weights.logsumexp(-1) - before).double()
            self.state._log_weights -= self.state._log_weights.max()

    def run(ys: torch.Tensor, n: int) -> float:
        with pyro.validation_enabled(False):  # ppl's setting (restored on exit)
            model = Model()
            f = EvidenceSMCFilter(model, Guide(model), num_particles=n, max_plate_nesting=0, ess_threshold=1.0)
            f.init()
            for t in range(ys.shape[0]):
                f.step(ys[t])
            return float(f.log_evidence)

    return run


class _Crashes:
    def __init__(self):
        self.count = 0
        self.runs = 0


def _pyro_contender(run, ys, n, crashes: _Crashes, max_tries: int = 20):
    def fn():
        for _ in range(max_tries):
            crashes.runs += 1
            try:
                return run(ys, n)
            except (IndexError, RuntimeError) as e:  # the resampler's index one past the end
                if "index" not in str(e) or "out of" not in str(e):
                    raise
                crashes.count += 1
        raise RuntimeError(f"Pyro's SMCFilter crashed {max_tries} times in a row")
    return fn


# ------------------------------------------------------------------------------- run
def _err_note(estimates: list[float], exact: float) -> str:
    errs = [e - exact for e in estimates]
    sd = statistics.stdev(errs) if len(errs) > 1 else float("nan")
    return f"log Z error {statistics.mean(errs):+.3f} (sd {sd:.3f})"


def run(repeats: int = 9, quick: bool = False) -> dict:
    torch.manual_seed(0)  # the same data as bench_importance, which draws its 20 coin flips first
    torch.rand(20)
    x, ys = 0.0, []
    for _ in range(100):
        x = A * x + torch.randn(()).item()
        ys.append(x + torch.randn(()).item())
    ys = torch.tensor(ys)
    exact = kalman_log_evidence(ys, A, Q, R)

    model = ppl.model(SSM)
    interp = model.interpreter()
    data = model.prepare_data(model.bind((), {"ys": ys}), "cpu")
    pyro_run = _pyro()

    def ppl_smc(n):
        _, lw, _ = smc(interp, "ssm", data, n, "cpu", resampling="systematic", ess_threshold=1.0)
        return log_mean_exp(lw)

    def ppl_model_run(n):
        return model.run("smc", {"ys": ys}, particles=n, resampling="systematic", ess_threshold=1.0).log_evidence

    targets = {1_000: 1.5, 10_000: 1.2}
    sizes = [1_000] if quick else [1_000, 10_000]
    results = {}
    for n in sizes:
        crashes = _Crashes()
        contenders = {
            "hand-written torch": lambda: hand_pf(ys, n),
            "ppl smc": lambda: ppl_smc(n),
            "ppl Model.run (+result)": lambda: ppl_model_run(n),
            "Pyro SMCFilter": _pyro_contender(pyro_run, ys, n, crashes),
        }
        estimates: dict[str, list] = {}
        times = time_interleaved(contenders, repeats, results=estimates)
        notes = {name: _err_note([float(e) for e in est], exact) for name, est in estimates.items()}
        notes["Pyro SMCFilter"] += (f"; crashed {crashes.count} of {crashes.runs} runs "
                                    "(incl. warm-up; a crashed run is rerun and its time counts)")
        out = report(f"SMC (bootstrap, systematic resampling every step), state-space model T = 100, N = {n:,} "
                     f"(Kalman log Z = {exact:.4f}; error = estimate - Kalman, mean and sd over {repeats} runs)",
                     times, "hand-written torch", extra=notes)
        print("  Pyro exposes no evidence: its log Z is the log-sum-exp of its log-weights just before it "
              "subtracts their maximum, per step (an SMCFilter subclass)")
        target = targets[n]
        ratio = out["ppl smc"][1]
        print(f"  target: ppl smc within {target:.1f}x of hand-written torch: "
              f"{'OK' if ratio <= target else 'MISSED'} ({ratio:.2f}x)")
        out["pyro_crashes"] = (crashes.count, crashes.runs)
        results[f"smc_ssm_{n}"] = out
    return results
