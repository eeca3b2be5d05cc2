"""The one result type of the inference layer: a weighted population, or MCMC chains.

Every particle algorithm (importance, SMC, resample-move, tempering, steering, the
guided and product variants) returns a ``Population``; every Markov chain algorithm (MH,
PMMH) returns ``Chains``. They hold numbers only — no tables, plots or printing:
the Python face wraps them into the objects people read (``as_result``, result.py of the face).

Invariant of a ``Population``: its log weights are *proper* for the program's
unnormalised measure gamma = Z * posterior, i.e. E[(1/N) sum_i exp(lw_i) f(x_i)] =
Z * E_post[f]; so ``log_evidence`` (log-mean-exp of the weights) estimates log Z and the
normalised weights give posterior expectations. Log weights are float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


class _Unpackable:
    """Algorithms returned tuples before they returned this type (``smc``: ``(sites,
    log_weights, handler)``, ``mh``: ``(kept states, acceptance rate)``, ...). Code written
    against those keeps working: unpacking the object gives the old tuple, kept in
    ``legacy`` (not part of the value: excluded from ``repr`` and ``==``); indexing
    (``smc(...)[0]``) too. New code reads the fields."""

    def __iter__(self):
        if self.legacy is None:
            raise TypeError(f"a {type(self).__name__} is not a tuple: read its fields")
        return iter(self.legacy)

    def __getitem__(self, i):
        return tuple(self)[i]


@dataclass
class Population(_Unpackable):
    """N weighted particles. ``sites``: address (and "return") -> (values, present):
    values a tensor [N, ...] or a list of N plain values, present a bool tensor [N] or
    None when every particle has that choice. ``extra``: what the algorithm adds
    (e.g. "history": per synchronisation checkpoint, the ESS and whether it resampled)."""

    method: str
    sites: dict
    log_weights: torch.Tensor
    extra: dict = field(default_factory=dict)
    legacy: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def n(self) -> int:
        return int(self.log_weights.shape[0])

    @property
    def log_evidence(self) -> float:
        lw = self.log_weights.double()
        if lw.numel() == 0 or not bool(torch.isfinite(lw).any()):
            return -math.inf
        return float(torch.logsumexp(lw, 0) - math.log(lw.shape[0]))


@dataclass
class Chains(_Unpackable):
    """C Markov chains of S kept draws each. ``sites``: address -> (values, present) with
    values [C * S, ...] in chain-major order (chain c's draws are rows c*S .. c*S+S-1);
    ``r_hat`` and ``ess`` per site (split R-hat and bulk ESS over the chains)."""

    method: str
    sites: dict
    chains: int
    draws: int
    acceptance_rate: float
    r_hat: dict = field(default_factory=dict)
    ess: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    legacy: tuple | None = field(default=None, repr=False, compare=False)


@dataclass
class Optimum:
    """The best of N candidates (an optimum, not a posterior): ``sites`` holds the one
    winning particle, ``score`` its log weight."""

    method: str
    sites: dict
    score: float
    candidates: int
    importance_log_evidence: float
    extra: dict = field(default_factory=dict)


Raw = Any  # a Population, Chains, Optimum, or the exact paths of ``semantics.exact``
