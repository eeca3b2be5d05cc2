"""A distribution's parameter invalid at some particles only: density zero there.

``observe y ~ normal(mu, sigma)`` where some particles drew ``sigma`` = 0.0 (an underflow),
or computed a scale of 0 or below, has no density at those particles. This holds for the
scale-like constraints (``stdlib.distributions.SCALE_LIKE``: positive, non-negative,
positive definite), the edge of a continuous parameter space; a per-particle value outside
another constraint (a probability of 1.5 on some paths) stays an error, as a bug is. The measure the
program denotes gives such a point density zero (as Stan rejects such a proposal), so
those particles get weight zero (log weight -inf) and the others are scored as usual: the
result is the posterior of the model restricted to the points where it is defined. The
run goes on with one warning per site, naming the site, the parameter and the number of
particles concerned (the largest count of one evaluation).

A parameter invalid at *every* particle that reaches the statement, or invalid for a
reason that is the same at every particle (a constant, the data), stays the located error
it was: that is a bug in the model, not a region of its parameter space. (MCMC's chains,
re-executed by ``semantics.gfi``, are the exception to the first half: a proposal or a
starting point whose own parameters are invalid has density zero and is rejected or
redrawn, even when every chain's is.)

``recording()`` opens the collection for one inference run (``ppl.registry`` wraps each
method in it and adds ``warnings(notes)`` to the result's warnings); outside it, the
particles still get weight zero and nothing is recorded.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

from .errors import PPLRuntimeError
from .values import Particles

_NOTES: contextvars.ContextVar = contextvars.ContextVar("invalid_parameter_notes", default=None)


@contextlib.contextmanager
def recording():
    """Collect the notes of one run: yields the dict they go to (see ``warnings``)."""
    notes: dict = {}
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def valid_part(dist, ctx: Particles, error: PPLRuntimeError, site=None, anywhere: bool = False) -> Particles | None:
    """The particles of ctx whose parameters of ``dist`` are valid, when only some are not
    (recording a note for ``site``, the effect); else ``error`` is raised (none valid, or
    the parameters cannot be checked particle by particle). ``anywhere``: also when none
    is valid, as long as each particle's own parameters are the invalid ones (the chains
    of MCMC, whose proposals and starting points are rejected there, not the model)."""
    check = getattr(dist, "invalid_particles", None)
    bad = check(ctx) if check is not None else None
    if bad is None or not bool(bad.any()) or (bool(bad.all()) and not anywhere):
        raise error
    _note(site, error, int(bad.sum()), ctx.M)
    return ctx.subset(~bad.to(ctx.idx.device))  # (None: none valid)


def _note(site, error: PPLRuntimeError, count: int, of: int) -> None:
    notes = _NOTES.get()
    if notes is None:
        return
    span = getattr(site, "span", None)
    where = f"{span.filename}:{span.line}:{span.col}" if span is not None else None
    what = error.message.split(" (got ")[0]
    key = (where, what)
    notes[key] = max(notes.get(key, (0, of)), (count, of))


def warnings(notes: dict) -> list[str]:
    """One warning per (site, parameter) of the run's notes."""
    return [f"{where + ': ' if where else ''}{what} at {count} of {of} particles: the model has density zero "
            f"there, so they get weight zero (the result is the posterior where the model is defined); if those "
            f"points should not be reachable, constrain the parameter (e.g. a positive prior for a scale)"
            for (where, what), (count, of) in notes.items()]


def invalid_log_prob(dist, value, ctx: Particles, error: PPLRuntimeError, site=None,
                     anywhere: bool = False) -> torch.Tensor:
    """``dist.log_prob`` on the particles whose parameters are valid, -inf at the others
    (``valid_part``'s rule; ``error`` when it does not apply)."""
    valid = valid_part(dist, ctx, error, site, anywhere)
    lp = torch.full((ctx.M,), -float("inf"), dtype=torch.float64, device=ctx.device)
    if valid is not None:
        lp[ctx.positions(valid.idx)] = torch.as_tensor(dist.log_prob(value, valid)).to(torch.float64)
    return lp
