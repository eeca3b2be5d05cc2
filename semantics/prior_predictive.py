"""The prior predictive as a handler: the model is its own simulator.

``PriorPredictive(N, device)`` answers a run's effects for N particles: every choice is
drawn from its prior (a custom proposal's target), and every ``observe v ~ d`` draws a
value from ``d`` shaped like ``v`` (the data only give the shapes) and records it under
the observe's address in ``observed`` instead of scoring ``v``. ``condition`` marks the
particles that fail it in ``ok`` (callers reject them); ``factor`` reweights the prior,
so a simulation cannot honour it: an error (``factor_message``/``factor_hint`` say why,
in the caller's words). Twisting does not change the program's measure.

Used by simulation-based calibration (``sbc`` of the testing package) and by amortized
training on simulated data sets (``inference.amortized``).
"""
from __future__ import annotations

import torch

from ..stdlib import rng
from .errors import PPLError, PPLRuntimeError
from .interpreter import ConditionEffect, FactorEffect, ObserveEffect, SampleEffect, TwistEffect
from .trace import Trace
from .values import Batched, Particles, PerParticle, as_tensor, is_batched, to_bool_rows


class PriorPredictive:
    """Handler: choices from their priors, observed values simulated and recorded."""

    factor_message = "SBC cannot simulate data from a model with `factor` statements"
    factor_hint = ("SBC draws the truth from the prior and the data from the observes; a factor "
                   "reweights the prior, so the prior draws would not come from the model. "
                   "Write the factor as `observe value ~ distribution` if it is a likelihood")

    def __init__(self, N: int, device, *, factor_message: str | None = None, factor_hint: str | None = None):
        self.N = N
        self.device = device
        self.trace = Trace(N, device)
        self.observed = Trace(N, device)
        self.ok = torch.ones(N, dtype=torch.bool, device=device)
        self.factor_message = factor_message or self.factor_message
        self.factor_hint = factor_hint or self.factor_hint

    def sample(self, eff: SampleEffect):
        dist = getattr(eff.dist, "target", eff.dist)  # a custom proposal: the prior is its target
        value = dist.sample(eff.ctx)
        self.trace.record(eff.addr, eff.ctx, value)
        return value

    def observe(self, eff: ObserveEffect):
        value = simulate_observation(eff.dist, eff.value, eff.ctx)
        self.observed.record(eff.addr, eff.ctx, value)

    def factor(self, eff: FactorEffect):
        raise PPLError(self.factor_message, eff.span, self.factor_hint)

    def condition(self, eff: ConditionEffect):
        c = to_bool_rows(eff.value, eff.ctx)
        if isinstance(c, bool):
            if not c:
                self.ok[eff.ctx.idx] = False
        else:
            self.ok[eff.ctx.idx] &= c

    def twist(self, eff: TwistEffect):  # twisting does not change the program's measure
        return None


def simulate_observation(dist, value, ctx: Particles):
    """One draw per particle of ctx from the observe's distribution, shaped like the
    observed ``value`` (a scalar distribution observed on a vector: one draw per entry).
    Raises PPLError if ``value`` depends on the particle (it is then not data)."""
    dv = getattr(dist, "target", dist)
    if is_batched(value) or isinstance(value, PerParticle) or \
            (isinstance(value, (list, tuple)) and any(is_batched(x) for x in value)):
        raise PPLError("SBC: the observed value depends on the model's random choices, so it is not data "
                       "that can be simulated",
                       hint="SBC needs every `observe v ~ d` to observe data (a value fixed by the inputs)")
    if getattr(dv.spec, "index_valued", False):  # uniform_draw: items of a list
        return dv.sample(ctx)
    try:
        v = as_tensor(value, ctx.device)
    except PPLRuntimeError:
        raise PPLError(f"SBC cannot simulate a non-numeric observed value ({type(value).__name__})",
                       hint="SBC simulates numeric observations") from None
    vrank = v.dim() - dv.spec.value_event_dim
    if vrank < 0:
        raise PPLError(f"SBC: the observed value has fewer dimensions than a {dv.spec.name} value")
    params, batched = dv._params(ctx, vrank)
    d = dv._make(params)
    vbatch = tuple(v.shape[:vrank])
    own = tuple(d.batch_shape[1:] if batched else d.batch_shape)
    try:
        target = tuple(torch.broadcast_shapes(own, vbatch))
    except RuntimeError:
        raise PPLError(f"SBC: cannot simulate a value of shape {tuple(v.shape)} from this {dv.spec.name} "
                       f"(its batch shape is {own})") from None
    if batched:
        s = rng.sample(d.expand(torch.Size((ctx.M, *target))) if own != target else d)
    else:
        s = rng.sample(d.expand(torch.Size(target)) if own != target else d, (ctx.M,))
    return Batched(dv.spec.to_value(s), ctx.idx)
