"""A resampling scheme of your own, checked exactly: power resampling.

    python examples/power_resampling.py

Power resampling draws the ancestors in proportion to p = w^alpha / sum_j w_j^alpha
(0 < alpha <= 1: flatter than w, so more particles survive a skewed step) and gives each
survivor a its compensating weight w_a / p_a = w_a^(1 - alpha) * sum_j w_j^alpha. It is
a *weighted* scheme (the contract of ``SMCHandler._resample``):

    E[(1/n) sum_k exp(lw'_k) f(x_{a_k})] = sum_i p_i (w_i / p_i) f(x_i) = sum_i w_i f(x_i).

A scheme is registered with its exact law (``ppl.register_resampling(name, draw, law,
weighted=True)``): ``law(w, n)`` lists every outcome (ancestors, new log weights) with its
probability, so the exact checker (``ppl.testing.validity.check_proper``) runs SMC on a
small finite program once per outcome of every draw and compares
E[Z_hat sum_i w_i 1{x_i = v}] with the program's exact measure, to float rounding.

1. "power" (ancestors by systematic resampling on p, with the compensating weights) is
   proper: the check passes to ~1e-16;
2. "power_unweighted", the same ancestors without the compensating weights (a common
   slip), is caught: the check is off by ~0.03;
3. ``check_resampling_draws`` ties the torch draw to the registered law (``check_proper``
   checks the law itself);
4. SMC with ``resampling="power"`` through ``Model.run``, against the exact posterior.

From the command line, ``--plugin`` imports a module that registers schemes:
``python -m ppl run model.ppl --plugin examples.power_resampling -o resampling=power``
(with the repository root on ``PYTHONPATH``).
"""
from __future__ import annotations

import math

import torch

import ppl
from ppl.inference.resampling import systematic, systematic_law
from ppl.testing.validity import check_proper, check_resampling_draws, smc_algorithm

ALPHA = 0.5


def power_draw(w: torch.Tensor, n: int):
    """(ancestors drawn systematically on p = w^alpha normalised, log(w_a / p_a))."""
    p = w ** ALPHA
    p = p / p.sum()
    ancestors = systematic(p, n)
    return ancestors, torch.log(w[ancestors]) - torch.log(p[ancestors])


def power_law(w: list[float], n: int) -> dict:
    """The exact law of ``power_draw``: systematic resampling's law on p, each outcome
    with its compensating log weights."""
    p = [x ** ALPHA for x in w]
    p = [x / math.fsum(p) for x in p]
    return {(anc, tuple(math.log(w[i]) - math.log(p[i]) for i in anc)): prob
            for anc, prob in systematic_law(p, n).items()}


def unweighted_draw(w: torch.Tensor, n: int) -> torch.Tensor:
    """BROKEN: the ancestors of power resampling, equally weighted afterwards."""
    p = w ** ALPHA
    return systematic(p / p.sum(), n)


def unweighted_law(w: list[float], n: int) -> dict:
    p = [x ** ALPHA for x in w]
    return systematic_law([x / math.fsum(p) for x in p], n)


def register() -> None:
    """Register both schemes (again: replacing earlier registrations of these names)."""
    ppl.register_resampling("power", power_draw, power_law, weighted=True, replace=True)
    ppl.register_resampling("power_unweighted", unweighted_draw, unweighted_law, replace=True)


# a finite program with a skewed first observation, so the resampling step matters
MODEL = ppl.model("""
def m():
    z ~ flip(0.3)
    observe True ~ bernoulli(0.9 if z else 0.1)
    k ~ flip(0.5)
    observe k ~ bernoulli(0.8 if z else 0.3)
    return z
""")


def check(scheme: str, particles: int = 2):
    """``check_proper`` of SMC with ``scheme`` on MODEL (every draw enumerated)."""
    return check_proper(MODEL, smc_algorithm(particles, resampling=scheme))


register()  # importing this module (e.g. with --plugin) makes the schemes available

if __name__ == "__main__":
    for name in ("power", "power_unweighted"):
        result = check(name)
        print(f"{name}: {'proper' if result.ok() else 'NOT PROPER'}\n{result}\n")
    draws = check_resampling_draws("power", [0.05, 0.15, 0.35, 0.45], 4)
    print(f"power's draws follow its law: {draws.ok()} (chi-square p = {draws.p_value:.3f})\n")
    exact = MODEL.run("enumerate", {})
    smc = MODEL.run("smc", {}, particles=4000, resampling="power", seed=0)
    print(f"P(z | data): exact {float(exact.mean('return')):.4f}, smc with power resampling "
          f"{smc.mean('return'):.4f}; log Z: exact {math.log(float(exact.evidence)):.4f}, "
          f"smc {smc.log_evidence:.4f}")
