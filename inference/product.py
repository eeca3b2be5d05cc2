"""Products of experts: the target p1(x)^a * p2(x)^b of two models over the same choices.

``ProductOfExperts(m1, m2, a, b)`` is a model transformation (a Feynman-Kac reweighting):
particles are drawn from m1's prior, and each trace x is weighted by

    w(x) = p1(x)^a * p2(x)^b / prior1(x)

where p1, p2 are the two models' joint densities (choices and likelihood factors) on the
same trace (``semantics.gfi``: x by ``simulate`` in m1, p2 by ``assess`` of x in m2).
Invariant: the weighting is proper for the product measure gamma(dx) = p1(x)^a p2(x)^b dx:
E[w f(x)] = integral f dgamma, provided m1's prior covers the product's support. ``exact`` computes gamma by enumeration for finite models.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any, Mapping

import torch

from ..semantics.devices import resolve_device
from ..semantics.errors import PPLError, PPLRuntimeError
from ..semantics import gfi
from ..semantics.gfi import ModelRun
from ..stdlib import rng
from .randomness import TorchRandomness
from .methods import check_options, run_enumerate
from .population import Population


class ProductOfExperts:
    """p1^a * p2^b over the choices of ``m1`` (which ``m2`` must also make)."""

    def __init__(self, m1, m2, a: float = 1.0, b: float = 1.0):
        self.m1, self.m2, self.a, self.b = m1, m2, float(a), float(b)

    def _weights(self, data1, data2, particles, device, randomness=None):
        """m1's prior draws (``gfi.simulate``) and their log weights, with p2 by
        ``gfi.assess`` of the same choices in m2."""
        m1, m2 = self.m1, self.m2
        expert1 = ModelRun(m1.interpreter(), m1.entry, m1.prepare_data(m1.bind((), data1 or {}), device), device)
        state = gfi.simulate(expert1, particles, randomness or TorchRandomness())
        log_p1 = state.log_joint
        log_prior1 = state.log_joint - state.log_lik
        if not all(bool(m.all()) for m in state.present.values()):
            raise PPLRuntimeError("products of experts need models whose traces have a fixed set of choices")
        expert2 = ModelRun(m2.interpreter(), m2.entry, m2.prepare_data(m2.bind((), data2 or {}), device), device)
        try:
            log_p2 = gfi.assess(expert2, state)
        except PPLError as err:
            raise PPLRuntimeError(f"the second expert cannot score the first's traces: {err.message}",
                                  err.span, "both models must make the same random choices") from None
        lw = torch.where(torch.isneginf(log_p1) | torch.isneginf(log_p2), torch.full_like(log_p1, -math.inf),
                         self.a * log_p1 + self.b * log_p2 - log_prior1)
        return state, lw

    #: the inference methods a product of experts runs (``run``'s ``method``)
    METHODS = ("importance", "enumerate")

    def run(self, method: str = "importance", data: Mapping[str, Any] | None = None, *, particles: int = 1000,
            seed: int | None = None, device: str = "cpu", data2: Mapping[str, Any] | None = None, **options):
        """Inference on the product, with ``Model.run``'s signature: ``method`` is
        "importance" (m1's prior draws weighted by p1^a p2^b / prior1: a
        ``WeightedResult``) or "enumerate" (the exact product by enumerating m1's paths:
        an ``ExactResult``, finite models only). ``data`` binds m1's parameters,
        ``data2`` m2's (default: none). ``run(data1, data2)`` with dicts, the old form,
        still works (deprecated). Returns the raw ``Population`` (or exact paths); ``ppl.product``
        wraps it into the result object."""
        if method is None or isinstance(method, Mapping):  # the old run(data1, data2, ...)
            warnings.warn("ProductOfExperts.run(data1, data2) is deprecated: use run(method, data, data2=...)",
                          DeprecationWarning, stacklevel=2)
            method, data, data2 = "importance", method, data if data2 is None else data2
        if method not in self.METHODS:
            raise PPLError(f"a product of experts cannot run the method {method!r}",
                           hint=f"ppl.product(...).run supports: {', '.join(self.METHODS)} (it weights the first "
                                "expert's prior draws; SMC, MCMC and the other methods need one model)")
        allowed = {"importance": (), "enumerate": ("max_paths",)}[method]
        for key in options:
            if key not in allowed:
                raise PPLError(f"method '{method}' of a product of experts has no option '{key}'",
                               hint=f"its options are: {', '.join(allowed)}" if allowed else "it takes no options")
        options = check_options(options)
        particles = check_options({"particles": particles})["particles"]
        if method == "enumerate":
            return self._enumerate(data, data2, **options)
        device = resolve_device(device)
        with rng.run(seed):
            state, lw = self._weights(data, data2, particles, device)
        sites = {"return": (state.ret, None)}
        sites.update({a: (v, None) for a, v in state.values.items()})
        return Population("product", sites, lw)

    def _enumerate(self, data1, data2, **options):
        """The product measure as exact paths: each of m1's paths x weighted by
        p1(x)^a p2(x)^b (float weights)."""
        paths = []
        for w, vals, lp2 in self._paths(data1, data2, **options):
            weight = float(w) ** self.a * math.exp(self.b * lp2) if lp2 > -math.inf and w > 0 else 0.0
            paths.append((weight, vals))
        return paths

    def _paths(self, data1, data2, **options):
        """(p1's weight, values, log p2) for each path of m1."""
        for w, vals in run_enumerate(self.m1, self.m1.bind((), data1 or {}), **options):
            trace = {k: v for k, v in vals.items() if k != "return"}
            yield w, vals, float(self.m2.log_joint(trace, **(data2 or {}))[0])

    def exact(self, data1=None, data2=None) -> dict:
        """The product measure on m1's return values, by enumerating m1's paths: value ->
        p1(x)^a p2(x)^b summed over the traces x with that value."""
        out: dict = defaultdict(float)
        for w, vals, lp2 in self._paths(data1, data2):
            out[vals["return"]] += float(w) ** self.a * math.exp(self.b * lp2) if lp2 > -math.inf else 0.0
        return dict(out)
