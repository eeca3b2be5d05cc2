"""A DSL model as a Pyro model function: ``Model.to_pyro()``.

The interpreter runs the program for a single particle and answers its effects with
Pyro primitives, so Pyro's inference (NUTS, SVI with autoguides, Predictive) runs on DSL
models unchanged:

* ``x ~ d``            -> ``pyro.sample(addr, d)`` with the choice's address as the site name;
* ``observe v ~ d``    -> ``pyro.sample(addr, d, obs=v)`` (address ``obs@line:col...``);
* ``factor e``         -> ``pyro.factor(addr, e)``;
* ``condition c``      -> ``pyro.factor(addr, 0 or -inf)``;
* the return value     -> the function's return value (a tensor when numeric).

Invariant: for every trace, the log joint Pyro computes (``poutine.trace(...)
.log_prob_sum()``) equals ``Model.log_joint`` on the same values (the tests check it).
Sites have their natural shapes (a scalar choice is a 0-dim tensor), bools are Pyro's
float 0/1 for ``flip``/``bernoulli``. Limits: ``uniform_draw`` over arbitrary items and
string-valued choices have no Pyro counterpart (a clear error), and Pyro's HMC/NUTS need
continuous choices whose set does not depend on their values.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .semantics.dist_values import ProposedDist
from .semantics.errors import PPLRuntimeError
from .semantics.sampling import _WeightAccumulator, column, drive
from .semantics.values import Batched, Particles, PerParticle, as_tensor, batch_rows, is_batched, rows, to_bool_rows


def to_pyro(model, device: str = "cpu") -> Callable:
    """``model`` as a Pyro model function ``f(*args, **data)`` (see the module doc)."""
    import pyro  # noqa: F401  (fail early if pyro is missing)

    def pyro_model(*args, **data):
        prepared = model.prepare_data(model.bind(args, data), device)
        ctx = Particles.all(1, device)
        ret = drive(model.interpreter().run(model.entry, prepared, ctx), _PyroSites(device))
        out = column(ret, ctx)
        return out[0] if isinstance(out, torch.Tensor) else out[0]

    pyro_model.__name__ = model.entry
    pyro_model.__doc__ = f"Pyro version of the ppl model {model.entry}({', '.join(model.params)})."
    return pyro_model


class _PyroSites(_WeightAccumulator):
    """Answers the interpreter's effects (one particle) with Pyro sample/factor sites."""

    def __init__(self, device):
        super().__init__(1, device)

    def _dist(self, dist, ctx, eff):
        if isinstance(dist, ProposedDist):
            dist = dist.target
        if getattr(dist.spec, "index_valued", False):
            raise PPLRuntimeError(f"to_pyro: {dist.spec.name} has no Pyro counterpart", eff.span,
                                  "use categorical over indices instead")
        params, batched = dist._params(ctx)
        if batched:  # one particle: drop the particle dimension, for natural site shapes
            params = [p[0] if isinstance(p, torch.Tensor) and p.dim() > 0 else p for p in params]
        return dist, dist._make(params)

    def sample(self, eff):
        import pyro
        dist, d = self._dist(eff.dist, eff.ctx, eff)
        value = pyro.sample(eff.addr, d)
        return Batched(dist.spec.to_value(value).unsqueeze(0), eff.ctx.idx)

    def observe(self, eff):
        import pyro
        dist, d = self._dist(eff.dist, eff.ctx, eff)
        v = eff.value
        if isinstance(v, PerParticle):
            raise PPLRuntimeError("to_pyro: observed values must be numbers", eff.span)
        t = batch_rows(v, eff.ctx)[0] if is_batched(v) or (
            isinstance(v, (list, tuple)) and any(is_batched(x) for x in v)) else as_tensor(v, eff.ctx.device)
        obs = dist.spec.from_value(t)
        if not obs.is_floating_point():
            obs = obs.to(torch.get_default_dtype())
        pyro.sample(eff.addr, d, obs=obs)

    def factor(self, eff):
        import pyro
        v = eff.value
        lp = rows(v, eff.ctx)[0] if isinstance(v, Batched) else torch.as_tensor(float(v))
        pyro.factor(eff.addr, lp)

    def condition(self, eff):
        import pyro
        c = to_bool_rows(eff.value, eff.ctx)
        ok = torch.as_tensor(c if isinstance(c, bool) else c[0])
        pyro.factor(eff.addr, torch.where(ok, torch.tensor(0.0), torch.tensor(-float("inf"))))

    def twist(self, eff):  # a twist changes no target: nothing to tell Pyro
        return None
