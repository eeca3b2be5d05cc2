"""The observes of a loop scored as one vectorised term: a loop over data
(``for t in range(T): observe ys[t] ~ normal(mu, sigma)``) yields T observe effects at one
source site; scoring each on its own puts T small log densities, T parameter checks and
their T backward passes into the recorded graph of the potential (GARCH(1,1): ~51 of its
~51 operations per time step were the observe's and the recursion's). Here the second and
later observes of a site are collected and scored together at the end of the run: their
parameters are stacked to [C, K] and the distribution's ``log_prob`` runs once, with one
parameter check.

Invariant: the sum of the grouped log densities equals the sum of the per-observe ones
(the same density of each observed value under the same parameters, summed in float64;
only the order of the floating-point additions differs). Only observes that keep that
exactly checkable are grouped: a ``DistValue`` of a scalar distribution whose parameters
are numbers or one float64 number per chain (at least one of them per chain), an observed
number (or one per chain), made by every chain; everything else is scored at once, as
before. The first observe of each site is scored at once too, so a program without loops
over observes computes exactly what it did.
"""
from __future__ import annotations

import torch

from ..semantics.dist_values import DistValue
from ..semantics.values import Batched, rows


class ObserveGroups:
    """The repeated observes of one run, grouped by source site and distribution."""

    def __init__(self, C: int):
        self.C = C
        self.seen: set = set()
        self.groups: dict = {}  # (line, col, spec name) -> (spec, [param columns], [values])

    def add(self, eff, full_idx) -> bool:
        """Collect ``eff`` (an observe effect) if it can be grouped and its site has been
        observed before in this run; whether it was collected (else: score it now)."""
        d, ctx, span = eff.dist, eff.ctx, eff.span
        if type(d) is not DistValue or span is None or ctx.idx is not full_idx or ctx.M != self.C:
            return False
        spec = d.spec
        if getattr(spec, "index_valued", False) or spec.value_event_dim != 0 or any(spec.param_event_dims):
            return False
        key = (getattr(span, "line", None), getattr(span, "col", None), spec.name)
        if key not in self.seen:
            self.seen.add(key)
            return False
        params = [self._column(a, ctx) for a in d.args]
        value = self._column(eff.value, ctx, observed=True)
        if value is None or any(p is None for p in params) or not any(isinstance(p, torch.Tensor) and p.dim() == 1
                                                                     for p in params):
            return False
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = (spec, [[] for _ in params], [])
        elif len(group[1]) != len(params):
            return False
        for column, p in zip(group[1], params):
            column.append(p)
        group[2].append(value)
        return True

    def _column(self, x, ctx, observed: bool = False):
        """x as a number, a 0-d tensor (floating; any dtype for an ``observed`` value: counts,
        flags) or a float64 tensor [C]; None if it is none of them."""
        if type(x) is float or type(x) is int:
            return float(x)
        if type(x) is Batched:
            t = rows(x, ctx)
            return t if t.dtype == torch.float64 and t.shape == (self.C,) else None
        if isinstance(x, torch.Tensor) and x.dim() == 0 and (observed or x.is_floating_point()):
            return x
        return None

    def log_densities(self):
        """The summed log density [C] (float64) of each group, one ``log_prob`` a group."""
        for spec, params, values in self.groups.values():
            try:
                lp = spec.make(*[self._stack(column) for column in params]).log_prob(
                    spec.from_value(self._stack_values(values)))
            except (TypeError, ValueError, RuntimeError):  # a spec that wants its parameters otherwise:
                yield from self._one_by_one(spec, params, values)  # score the entries as they came
                continue
            yield lp.reshape(self.C, -1).sum(1, dtype=torch.float64) if lp.dim() == 2 else \
                lp.sum(dtype=torch.float64).expand(self.C)
        self.groups.clear()

    def _one_by_one(self, spec, params, values):
        """Each collected observe's log density [C] on its own."""
        for k, value in enumerate(values):
            lp = spec.make(*[column[k] for column in params]).log_prob(
                spec.from_value(torch.as_tensor(value)))
            yield torch.as_tensor(lp, dtype=torch.float64).expand(self.C)

    def _stack_values(self, column: list) -> torch.Tensor:
        """The observed values: 0-d tensors of one dtype (data: counts stay integers, as a
        single observe scores them) as they are, else as ``_stack``."""
        first = column[0]
        if isinstance(first, torch.Tensor) and all(isinstance(x, torch.Tensor) and x.dim() == 0 and
                                                   x.dtype == first.dtype for x in column):
            return torch.stack(column)
        return self._stack(column)

    def _stack(self, column: list) -> torch.Tensor:
        """A column of K entries (numbers, 0-d tensors, tensors [C]) as a float64 [C, K]
        (or [K] when no entry is per chain); one tensor [C] repeated K times (a parameter
        the loop does not change) is [C, 1], which broadcasts (no K copies, and one term of
        the gradient instead of K)."""
        first = column[0]
        if isinstance(first, torch.Tensor) and first.dim() == 1 and all(x is first for x in column):
            return first.to(torch.float64).unsqueeze(1)
        if not any(isinstance(x, torch.Tensor) and x.dim() == 1 for x in column):
            return torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in column])
        cols = [x if isinstance(x, torch.Tensor) and x.dim() == 1 else
                torch.as_tensor(x, dtype=torch.float64).expand(self.C) for x in column]
        return torch.stack([c.to(torch.float64) for c in cols], 1)
