"""Handlers for the Bayesian workflow: the posterior predictive, and the pointwise
log-likelihood of given draws.

* ``PosteriorPredictive(columns, N, device)``: the prior-predictive handler
  (``semantics/prior_predictive.py``) with every choice replayed from ``columns`` (address
  -> one value per particle: a tensor [N, ...] or a list of N objects) instead of drawn:
  each ``observe v ~ d`` draws a fresh value from ``d`` shaped like ``v`` given the
  particle's choices and records it under the observe's address (``observed``). A
  ``factor`` reweights the latent values only, which are given: ignored. ``condition`` marks
  the particles that fail it in ``ok`` (posterior draws satisfy it).
* ``PointwiseLikelihood(columns, N, device)``: the same replay, scoring: ``log_weights`` is
  the log joint of each particle's trace (every choice's log prior, every observe, factor
  and condition), and ``pointwise`` records, per observe address, the log density of each
  observed *element* (a vector observe of 8 values gives 8 numbers per particle; their sum
  is the observe's term of the log joint); ``observed`` keeps the observed values.

Both are for complete traces of the same program on the same data (a result's draws): a
choice the columns lack is a located error.
"""
from __future__ import annotations

from typing import Any

import torch

from .errors import PPLRuntimeError
from .interpreter import FactorEffect, ObserveEffect, SampleEffect
from .prior_predictive import PriorPredictive
from .sampling import Weighting
from .trace import Trace
from .values import Batched, PerParticle, Particles, as_tensor, batch_rows, deep_batched

__all__ = ["MissingChoiceError", "ReplicatingPrior", "PosteriorPredictive", "PointwiseLikelihood", "replay_columns", "pointwise_log_prob"]


class MissingChoiceError(PPLRuntimeError):
    """The draws lack a choice the program makes (not kept by the run, or another model)."""


def replay_columns(columns: dict, eff: SampleEffect):
    """The value of the choice ``eff`` for the particles of its context, from ``columns``
    (address -> tensor [N, ...] or list of N objects). A missing address is an error."""
    col = columns.get(eff.addr)
    if col is None:
        raise MissingChoiceError(
            f"the draws have no value for the choice '{eff.addr}'", eff.span,
            "the result did not keep this choice (a long SMC run keeps only the last value of each choice "
            "by default: run with keep='all'), or it comes from another model or other data")
    idx = eff.ctx.idx
    if isinstance(col, torch.Tensor):
        return Batched(col.to(eff.ctx.device)[idx], idx)
    return PerParticle([col[i] for i in idx.tolist()], idx)


class ReplicatingPrior(PriorPredictive):
    """The prior-predictive handler that also keeps the values the program observes
    (``data_values``: address -> the first value seen), for comparison with the replicas."""

    def __init__(self, N: int, device, **messages):
        super().__init__(N, device, **messages)
        self.data_values: dict[str, Any] = {}

    def observe(self, eff: ObserveEffect):
        self.data_values.setdefault(eff.addr, eff.value)
        super().observe(eff)


class PosteriorPredictive(ReplicatingPrior):
    """Choices replayed from ``columns``, observed values simulated (module docstring)."""

    def __init__(self, columns: dict, N: int, device):
        super().__init__(N, device)
        self.columns = columns

    def sample(self, eff: SampleEffect):
        value = replay_columns(self.columns, eff)
        self.trace.record(eff.addr, eff.ctx, value)
        return value

    def factor(self, eff: FactorEffect):  # it reweights the given latent values: nothing to simulate
        return None


def pointwise_log_prob(dist, value, ctx: Particles) -> torch.Tensor:
    """The log density of each element of an observed ``value`` under ``dist``, per particle:
    a float64 tensor [M, K] (K observed elements; for a multivariate distribution an element
    is one event). Its sum over K is ``dist.log_prob(value, ctx)``; where the elements
    cannot be told apart (an item of a list, a ragged list, per-particle objects) K is 1."""
    dv = getattr(dist, "target", dist)
    total = torch.as_tensor(dist.log_prob(value, ctx), dtype=torch.float64)
    whole = total.expand(ctx.M).reshape(ctx.M, 1) if total.dim() == 0 else total.reshape(ctx.M, 1)
    if getattr(dv.spec, "index_valued", False) or isinstance(value, PerParticle):
        return whole
    vb = deep_batched(value)
    try:
        v = batch_rows(value, ctx) if vb else as_tensor(value, ctx.device)
    except Exception:  # (a ragged list, strings: one observation)
        return whole
    vrank = v.dim() - int(vb) - dv.spec.value_event_dim
    if vrank <= 0:
        return whole
    try:
        params, batched = dv._params(ctx, vrank)
        lp = dv._make(params).log_prob(dv.spec.from_value(v)).to(torch.float64)
        if not (vb or batched):
            lp = lp.expand(ctx.M, *lp.shape)
        lp = lp.reshape(ctx.M, -1)
    except (ValueError, RuntimeError, IndexError):  # shapes the elementwise reading does not cover
        return whole
    if not torch.allclose(lp.sum(1), whole[:, 0], rtol=1e-6, atol=1e-6, equal_nan=True):
        return whole  # (the elements must add up to the observe's term; else one observation)
    return lp


class PointwiseLikelihood(Weighting):
    """Replay ``columns``; log joint in ``log_weights``, per-element observe log densities in
    ``pointwise`` (address -> [N, K]), observed values in ``observed`` (module docstring)."""

    def __init__(self, columns: dict, N: int, device):
        super().__init__(N, device, choose=self._choose)
        self.columns = columns
        self.pointwise = Trace(N, device)
        self.observed: dict[str, Any] = {}

    def _choose(self, h, eff: SampleEffect):
        value = replay_columns(self.columns, eff)
        self.add(eff.ctx, self.log_prob(eff.dist, value, eff.ctx))
        return value

    def observe(self, eff: ObserveEffect):
        lp = pointwise_log_prob(eff.dist, eff.value, eff.ctx)
        self.pointwise.record(eff.addr, eff.ctx, Batched(lp, eff.ctx.idx))
        self.observed.setdefault(eff.addr, eff.value)
        self.add(eff.ctx, lp.sum(1))
