"""Importance sampling with the prior as proposal (likelihood weighting).

Invariant: the weighted particles are *proper* for the program's unnormalised measure
gamma: for every f, E[(1/N) sum_i w_i f(x_i)] = integral f dgamma = Z * E_post[f]. In
particular exp(log_evidence) is an unbiased estimate of Z, and the self-normalised
estimates converge to the posterior as N grows. All N particles run as one batch.

As a composition of the run kit (``semantics.sampling``): ``Weighting`` with the ``prior``
chooser and the ``accumulate`` rule (``LikelihoodWeighting``). The zero-evidence locator
replays the same draws with the rule ``_no_particle_left`` (and, for the joint density,
the chooser ``_prior_scored``).
"""
from __future__ import annotations

import math

import torch

from ..semantics.errors import ZeroEvidenceError
from ..semantics.interpreter import FactorEffect, Interpreter, ObserveEffect
from ..semantics.sampling import Weighting, accumulate, column, drive, prior
from ..semantics.values import Particles
from ..stdlib.progress import NO_BAR, counted, progress_bar
from ..stdlib import rng
from .population import Population


def likelihood_weighting(interp: Interpreter, entry: str, data: dict, particles: int, device="cpu",
                         at_checkpoint=accumulate, progress: bool | None = None, label: str = "importance"):
    """Run ``entry(**data)`` for ``particles`` particles: a ``Population`` named ``label``
    (it unpacks to (sites, log_weights)) with "return" and every choice address.

    If every weight is zero, the run is repeated from the same random state to find the
    first likelihood site after which no particle survived, and a ``ZeroEvidenceError``
    pointing at it is raised. ``at_checkpoint``: the handler's checkpoint rule (e.g. one
    that checks the weights as they are made).

    ``progress`` (``stdlib.progress``): all particles run as one batch, in one pass
    through the program, so the bar (named ``label``) is a counter of the sites the batch
    has executed (choices and observe/factor/condition): it moves while a long loop runs."""
    state = rng_state(device)
    ctx = Particles.all(particles, device)
    h = Weighting(particles, device, at_checkpoint=at_checkpoint)
    with progress_bar(progress, desc=label, unit=" sites") as bar:
        gen = interp.run(entry, data, ctx)
        ret = drive(gen if bar is NO_BAR else counted(gen, bar), h)
    if particles > 0 and bool(torch.isneginf(h.log_weights).all()):
        _set_rng_state(device, state)
        drive(interp.run(entry, data, Particles.all(particles, device)),
              Weighting(particles, device, at_checkpoint=_no_particle_left))
        raise ZeroEvidenceError("every particle has weight zero (log evidence = -inf)",
                                hint="the observations/conditions may be impossible under the prior")
    sites = {"return": (column(ret, ctx), None), **h.trace.sites()}
    return Population(label, sites, h.log_weights, legacy=(sites, h.log_weights))


def impossible_site(interp: Interpreter, entry: str, data: dict, particles: int, device="cpu", start=None):
    """Run ``particles`` prior draws and return the ``ZeroEvidenceError`` located at the
    first random choice, observe, factor or condition after which none of them has a
    finite positive joint density, or None if one survived (for methods, such as MH,
    that found no trace of positive probability and want to say where). ``start`` (a
    ``rng_state``): the random state to start from, to replay a run's own prior draws."""
    if start is not None:
        _set_rng_state(device, start)
    try:
        drive(interp.run(entry, data, Particles.all(particles, device)),
              Weighting(particles, device, choose=_prior_scored, at_checkpoint=_no_particle_left))
    except ZeroEvidenceError as err:
        return err
    return None


def _no_particle_left(h, eff) -> None:
    """Rule: stop at the first checkpoint that leaves no particle alive."""
    if bool(torch.isneginf(h.log_weights).all()):
        what = {ObserveEffect: "observation", FactorEffect: "factor"}.get(type(eff), "condition")
        raise ZeroEvidenceError(
            f"every particle has weight zero after this {what}", eff.span,
            f"no particle satisfies it ({h.log_weights.shape[0]} particles tried): the data or "
            "condition may be impossible under the prior, or too unlikely; check it, or use more particles")


_prior = prior()


def _prior_scored(h, eff):
    """Chooser: a prior draw whose own log density counts too (a prior such as beta(inf,
    2) gives every draw density NaN, and NaN counts as zero); stops where none is left."""
    value = _prior(h, eff)
    lp = torch.as_tensor(h.log_prob(eff.dist, value, eff.ctx), dtype=torch.float64)
    h.add(eff.ctx, torch.where(torch.isnan(lp), torch.full_like(lp, -math.inf), lp))
    if bool(torch.isneginf(h.log_weights).all()):
        raise ZeroEvidenceError(
            "every draw of this random choice has density zero (or NaN) under its distribution", eff.span,
            "check the distribution's parameters (e.g. an infinite one)")
    return value


def rng_state(device):
    """The state of every generator a run on ``device`` draws from: the run's own
    (``ppl.stdlib.rng``) when there is one, and torch's global ones (so the replay that
    locates a zero-evidence site repeats the run exactly)."""
    own = rng.generator(device)
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(torch.device(device)) if str(device).startswith("cuda") else None
    return cpu, cuda, own, None if own is None else own.get_state()


def _set_rng_state(device, state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], torch.device(device))
    if state[2] is not None:
        state[2].set_state(state[3])
