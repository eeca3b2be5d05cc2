"""Importance sampling with the prior as proposal (likelihood weighting).

Invariant: the weighted particles are *proper* for the program's unnormalised measure
gamma: for every f, E[(1/N) sum_i w_i f(x_i)] = integral f dgamma = Z * E_post[f]. In
particular exp(log_evidence) is an unbiased estimate of Z, and the self-normalised
estimates converge to the posterior as N grows. All N particles run as one batch.
"""
from __future__ import annotations

import torch

from ..semantics.interpreter import Interpreter
from ..semantics.sampling import LikelihoodWeighting, column, drive
from ..semantics.values import Particles


def likelihood_weighting(interp: Interpreter, entry: str, data: dict, particles: int, device="cpu"):
    """Run ``entry(**data)`` for ``particles`` particles: returns (sites, log_weights),
    sites mapping "return" and each choice address to (values, present)."""
    ctx = Particles.all(particles, device)
    h = LikelihoodWeighting(particles, device)
    ret = drive(interp.run(entry, data, ctx), h)
    sites = {"return": (column(ret, ctx), None)}
    sites.update(h.trace.sites())
    return sites, h.log_weights
