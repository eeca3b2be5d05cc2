"""Delayed sampling for importance sampling and SMC (``delayed=True``).

A choice with a conjugate prior (normal, beta, gamma, dirichlet) is answered with a lazy
value (``semantics.delayed.Affine`` over a node of the run's ``DelayedGraph``) instead
of a draw: the node holds the choice's marginal given the observations so far. Then:

* ``x ~ normal(c * node + d, s)`` makes x a Gaussian child node (linear-Gaussian chains;
  ``x = a * x + eps`` with ``eps ~ normal(0, q)`` too, by absorbing the fresh eps);
* ``observe y ~ normal(c * node + d, s)``, ``observe y ~ bernoulli/flip/binomial(n, node)``
  (beta node), ``poisson(node)`` (gamma), ``categorical(node)`` (dirichlet) add the log
  *predictive* density of y to the particle's weight and condition the node;
* every other use of the value (control flow, a nonlinear operation, an index, another
  distribution's parameter, the return value) realises the node: a draw from its
  current marginal, after which its parent is conditioned on the drawn value;
* at the end of the run every node still delayed is realised, so the trace and the
  return value are concrete; ``extra["delayed"]["return_mean"/"return_var"]`` keep the
  marginal of a Gaussian return value just before that, given the observations and the
  particle's realised values (with one particle on a linear-Gaussian state-space model
  returning its last state: the Kalman filter's mean and variance).

Invariant (``semantics.delayed``): each particle's weight is the product of predictive
densities, and its values are drawn from the conditional law given them, so the weighted
population is proper for the program's measure, E[w f(x)] = Z E_post[f], as without
delay; SMC's evidence estimate stays unbiased. A model without conjugate structure runs
exactly as it would without the option (every lazy value is realised where it is used).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..semantics.delayed import F64, PRIOR_FAMILIES, Affine, DelayedGraph, Node, _constant_rows
from ..semantics.dist_values import DistValue
from ..semantics.errors import PPLRuntimeError, ZeroEvidenceError
from ..semantics.interpreter import ConditionEffect, FactorEffect, ObserveEffect, SampleEffect, TwistEffect
from ..semantics.lazy import Lazy, live_run
from ..semantics.sampling import Weighting, column, drive
from ..semantics.values import Batched, Particles, rows
from ..stdlib import distributions as _dists
from ..stdlib import rng
from .population import Population
from .randomness import TorchRandomness
from .smc import SMCHandler, smc

#: observation families whose parameter may be a node: (name, params) -> (kind, the node's family,
#: position of the node's parameter)
OBSERVED = {("normal", ("loc", "scale")): ("normal", "normal", 0),
            ("bernoulli", ("p",)): ("bernoulli", "beta", 0), ("flip", ("p",)): ("bernoulli", "beta", 0),
            ("binomial", ("n", "p")): ("binomial", "beta", 1),
            ("poisson", ("rate",)): ("poisson", "gamma", 0),
            ("categorical", ("probs",)): ("categorical", "dirichlet", 0)}


class DelayedSampling:
    """Mixin for a ``Weighting`` handler (importance or SMC): conjugate choices delayed
    (module docstring). Call ``start_delayed`` from the constructor."""

    #: realise every node at the end of the run (so the trace holds every choice); the exact
    #: checker turns it off: those draws are continuous and change neither the weights nor a
    #: concrete return value
    realise_at_end = True

    def start_delayed(self, N: int, device, full_idx: torch.Tensor):
        """The run's (empty) graph of nodes, and what the result will report."""
        self.graph = DelayedGraph(N, device, self._draw_rows, full_idx)
        self.delayed_sites: list[tuple[str, Node]] = []
        self.delayed_summary: dict = {"delayed": 0, "marginal_observes": 0}

    def _draw_rows(self, dist, ctx: Particles) -> torch.Tensor:
        """A realisation: one draw per particle of ctx from a node's marginal ``dist``
        (float64 rows), through the handler's randomness."""
        randomness = getattr(self, "randomness", None)
        if dist.spec.name == "normal" and (randomness is None or type(randomness) is TorchRandomness):
            # a node's marginal (valid float64 rows): one standard normal draw per particle from
            # the run's generator, without building a distribution object
            gen = rng.generator(ctx.device) if randomness is None else randomness.gen(ctx.device)
            m, sd = dist.args[0].t, dist.args[1].t
            return m + sd * torch.randn(m.shape, dtype=F64, device=ctx.device, generator=gen)
        v = self.draw(dist, ctx, None if randomness is None else randomness.sample)
        return rows(v, ctx) if isinstance(v, Batched) else torch.as_tensor(v).expand(ctx.M)

    # ---------------------------------------------------------------- choices
    def sample(self, eff: SampleEffect):
        dist = eff.dist
        if type(dist) is DistValue:
            value = self._delayed_choice(dist, eff)
            if value is not None:
                return value
            child = self._predictive_child(dist, eff)
            if child is not None:
                return child
            concrete = _concrete_dist(dist, eff.ctx)
            if concrete is not dist:
                eff = SampleEffect(eff.addr, concrete, eff.ctx, eff.span)
        return super().sample(eff)

    def _predictive_child(self, dist: DistValue, eff):
        """``z ~ bernoulli/flip/binomial(n, p)`` with p a beta node, ``poisson(lam)`` with
        lam a gamma node, or ``categorical(w)`` with w a Dirichlet node: z drawn from its
        predictive (the node's marginal integrated out: beta-binomial, negative binomial,
        categorical(alpha / sum alpha)) and the node conditioned on it; the node stays
        delayed. None when the choice is not one of these."""
        entry = OBSERVED.get((dist.spec.name, dist.spec.params))
        if entry is None or entry[0] == "normal":
            return None
        kind, family, pos = entry
        param = dist.args[pos]
        if not isinstance(param, Affine) or any(isinstance(a, Lazy) for i, a in enumerate(dist.args) if i != pos):
            return None
        ctx, r = eff.ctx, eff.ctx.idx
        terms, _ = param.at(ctx)
        if len(terms) != 1 or terms[0][0].family != family:
            return None
        node = terms[0][0]
        n = _constant_rows(dist.args[0], ctx) if kind == "binomial" else None
        if kind == "binomial" and (n is None or not bool((n >= 0).all() & (n == n.round()).all())):
            return None
        if node.any_realised and bool(node.rows()["realised"][r].any()):
            return None  # (a realised parameter: drawn the usual way)
        predictive = _predictive_dist(kind, dist, node.marginal(r), n, r)
        value = self.choose(self, SampleEffect(eff.addr, predictive, ctx, eff.span))
        y = rows(value, ctx).to(F64).reshape(ctx.M, -1)
        node.observe_conjugate(kind, r, y[:, 0], n)
        self.trace.record(eff.addr, ctx, value)
        self.delayed_summary["predictive_draws"] = self.delayed_summary.get("predictive_draws", 0) + 1
        return value

    def _delayed_choice(self, dist: DistValue, eff) -> Affine | None:
        """The lazy value of a choice with a conjugate prior (its new nodes noted as the
        choice's), or None (drawn as usual)."""
        family = PRIOR_FAMILIES.get((dist.spec.name, dist.spec.params))
        if family is None:
            return None
        ctx, r = eff.ctx, eff.ctx.idx
        if family != "normal":
            if any(isinstance(a, Lazy) for a in dist.args):
                return None
            params = _torch_params(dist, ctx, family)
            if params is None:
                return None
            return self._delayed(eff, [(torch.arange(ctx.M, device=ctx.device),
                                        self.graph.node(family, params, r, eff.addr))])
        loc, scale = dist.args
        if isinstance(scale, Lazy):
            return None
        s2 = _variance(dist.spec, scale, ctx)
        if s2 is None:
            return None
        if isinstance(loc, Affine) and loc.gaussian:
            made = []
            for pos, node, c, d in loc.groups(ctx):  # a child of the node each particle's mean depends on
                if node is None:
                    made.append((pos, self.graph.node("normal", {"m": d, "v": s2[pos]}, r[pos], eff.addr)))
                else:
                    made.append((pos, node.child_normal(r[pos], c, d, s2[pos], eff.addr)))
            return self._delayed(eff, made)
        if isinstance(loc, Lazy):
            return None
        loc_rows = _constant_rows(loc, ctx)
        if loc_rows is None:
            return None
        return self._delayed(eff, [(torch.arange(ctx.M, device=ctx.device),
                                    self.graph.node("normal", {"m": loc_rows, "v": s2}, r, eff.addr))])

    def _delayed(self, eff, made: list) -> Affine:
        """The lazy value of a choice whose particles got the nodes ``made`` [(positions, node)]."""
        ctx = eff.ctx
        for _, node in made:
            self.delayed_sites.append((eff.addr, node))
        self.delayed_summary["delayed"] += 1
        if len(made) == 1:
            return Affine.of(made[0][1], ctx)
        terms = [(node, torch.zeros(ctx.M, dtype=F64, device=ctx.device).index_fill(0, pos, 1.0)) for pos, node in made]
        return Affine(terms, torch.zeros(ctx.M, dtype=F64, device=ctx.device), ctx.idx)

    # ---------------------------------------------------------------- likelihood sites
    def observe(self, eff: ObserveEffect):
        dist = eff.dist
        value = eff.value
        if isinstance(value, Lazy):
            value = value.force(eff.ctx, "as an observed value")
        lp = self._marginal_observe(dist, value, eff) if type(dist) is DistValue else None
        if lp is None:
            concrete = _concrete_dist(dist, eff.ctx) if type(dist) is DistValue else dist
            if concrete is not dist or value is not eff.value:
                eff = ObserveEffect(eff.addr, concrete, value, eff.ctx, eff.span)
            return super().observe(eff)
        self.delayed_summary["marginal_observes"] += 1
        if bool(torch.isnan(lp).any()):
            lp = self._nan_observation(lp, eff)
        self.add(eff.ctx, lp)
        self._checkpoint(eff)

    def _marginal_observe(self, dist: DistValue, value, eff) -> torch.Tensor | None:
        """The predictive log density of an observation whose parameter is a node (the
        node conditioned on it), or None when it is not one."""
        entry = OBSERVED.get((dist.spec.name, dist.spec.params))
        if entry is None:
            return None
        kind, family, pos = entry
        param = dist.args[pos]
        if not isinstance(param, Affine):
            return None
        others = [a for i, a in enumerate(dist.args) if i != pos]
        if any(isinstance(a, Lazy) for a in others):
            return None
        ctx, r = eff.ctx, eff.ctx.idx
        y = _observed_rows(value, ctx)
        if y is None:
            return None
        if kind == "normal":
            if not param.gaussian:
                return None
            s2 = _variance(dist.spec, others[0], ctx)
            if s2 is None:
                return None
            groups = param.groups(ctx)
            if all(node is None for _, node, _, _ in groups):
                return None  # nothing delayed any more: a plain observation
            lp = torch.zeros(ctx.M, dtype=F64, device=ctx.device)
            for pos, node, c, d in groups:  # the particles whose mean depends on one node (or none)
                v, part = s2[pos], torch.zeros(pos.shape[0], dtype=F64, device=ctx.device)
                for k in range(y.shape[1]):
                    if node is None:
                        part = part - 0.5 * (math.log(2 * math.pi) + torch.log(v) + (y[pos, k] - d) ** 2 / v)
                    else:
                        part = part + node.observe_normal(r[pos], c, d, v, y[pos, k])
                lp = lp.index_copy(0, pos, part) if len(groups) > 1 else part
            return lp
        terms, const = param.at(ctx)
        if len(terms) != 1 or terms[0][0].family != family:
            return None
        node = terms[0][0]
        n = None
        if kind == "binomial":
            n = _constant_rows(others[0], ctx)
            if n is None:
                return None
        outside = _outside_support(kind, y, n, node)
        if outside is not None:  # density zero there, as without delay (a placeholder value is used)
            y = torch.where(outside.unsqueeze(-1), torch.zeros_like(y), y)
        lp = torch.zeros(ctx.M, dtype=F64, device=ctx.device)
        for k in range(y.shape[1]):
            lp = lp + node.observe_conjugate(kind, r, y[:, k], n)
        return lp if outside is None else torch.where(outside, torch.full_like(lp, -math.inf), lp)

    def factor(self, eff: FactorEffect):
        return super().factor(_forced(eff))

    def condition(self, eff: ConditionEffect):
        return super().condition(_forced(eff))

    def twist(self, eff: TwistEffect):
        return super().twist(_forced(eff))

    # ---------------------------------------------------------------- end of the run
    def complete(self, ret: Any, ctx: Particles) -> Any:
        """The end of the run: the return value's marginal noted, every node realised,
        the delayed choices recorded in the trace; the concrete return value."""
        if isinstance(ret, Affine) and ret.gaussian:
            self.delayed_summary["return_mean"], self.delayed_summary["return_var"] = _marginal_of(ret, ctx)
        if not self.realise_at_end:
            return ret
        self.graph.realise_all()
        full = self.graph.full_idx
        for addr, node in self.delayed_sites:
            t = node.rows()
            have = full[t["exists"]]
            if have.shape[0] == 0:
                continue
            value = t["value"][have].to(torch.get_default_dtype())
            self.trace.record(addr, Particles(have, self.graph.N, self.graph.device, ctx.full), Batched(value, have))
        return _concrete(ret, ctx)


def _predictive_dist(kind: str, dist: DistValue, p: dict, n, r) -> DistValue:
    """The predictive distribution of a child of a node with marginal parameters p."""
    if kind == "bernoulli":
        return DistValue(dist.spec, (Batched(p["a"] / (p["a"] + p["b"]), r),))
    if kind == "binomial":
        return DistValue(_dists.get("beta_binomial"), (Batched(n.long(), r), Batched(p["a"], r), Batched(p["b"], r)))
    if kind == "poisson":  # gamma(k, rate b) mixed: successes before k failures, success probability 1 / (b + 1)
        return DistValue(_dists.get("negative_binomial"), (Batched(p["k"], r), Batched(1.0 / (p["r"] + 1.0), r)))
    alpha = p["alpha"]
    return DistValue(dist.spec, (Batched(alpha / alpha.sum(-1, keepdim=True), r),))


def _marginal_of(value: Affine, ctx: Particles) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and variance rows of a Gaussian lazy value (per particle: c * node + d)."""
    mean = torch.zeros(ctx.M, dtype=F64, device=ctx.device)
    var = torch.zeros(ctx.M, dtype=F64, device=ctx.device)
    for pos, node, c, d in value.groups(ctx):
        if node is None:
            mean[pos] = d
        else:
            p = node.marginal(ctx.idx[pos])
            mean[pos], var[pos] = c * p["m"] + d, c * c * p["v"]
    return mean, var


def _forced(eff):
    if isinstance(eff.value, Lazy):
        return type(eff)(eff.addr, eff.value.force(eff.ctx, "here"), eff.ctx, eff.span)
    return eff


def _concrete(v: Any, ctx: Particles) -> Any:
    """v with every lazy value (also inside lists and tuples) realised."""
    if isinstance(v, Lazy):
        return v.force(ctx, "as the return value")
    if isinstance(v, list):
        return [_concrete(x, ctx) for x in v]
    if isinstance(v, tuple):
        return tuple(_concrete(x, ctx) for x in v)
    return v


def _concrete_dist(dist: DistValue, ctx: Particles) -> DistValue:
    """The distribution with its lazy parameters realised (itself when it has none)."""
    if not any(isinstance(a, Lazy) for a in dist.args):
        return dist
    args = tuple(a.force(ctx, f"as a parameter of {dist.spec.name}") if isinstance(a, Lazy) else a for a in dist.args)
    return DistValue(dist.spec, args, dist.defaulted)


def _variance(spec, scale, ctx: Particles) -> torch.Tensor | None:
    """The variance rows [M] of a normal's concrete scale, or None when it is not one
    valid number per particle (the choice or observation then goes the usual way, which
    reports an invalid scale, or ignores it on particles of weight zero)."""
    if type(scale) is float and 0 < scale < math.inf:  # the common constant: checked in Python
        return torch.full((ctx.M,), scale * scale, dtype=F64, device=ctx.device)
    s = _constant_rows(scale, ctx)
    if s is None:
        return None
    if not bool(((s > 0) & torch.isfinite(s)).all()):
        return None
    return s * s


def _torch_params(dist: DistValue, ctx: Particles, family: str) -> dict | None:
    """The prior's parameters as float64 rows (checked by the spec first), or None when
    they are not one number (a vector, for a Dirichlet) per particle."""
    try:
        dist.torch_dist(ctx)  # the spec's checks (a float32 copy: the values are read below)
    except PPLRuntimeError:
        return None  # (e.g. only particles of weight zero have invalid ones: drawn as usual)
    if family == "dirichlet":
        alpha = _float64_rows(dist.args[0], ctx)
        return {"alpha": alpha} if alpha is not None and alpha.dim() == 2 else None
    rows_ = [_constant_rows(a, ctx) for a in dist.args]
    if any(t is None for t in rows_):
        return None
    names = {"beta": ("a", "b"), "gamma": ("k", "r")}[family]
    return dict(zip(names, rows_))


def _float64_rows(v, ctx: Particles) -> torch.Tensor | None:
    """A (per-particle or shared) vector as float64 rows [M, K]."""
    if isinstance(v, Batched):
        t = rows(v, ctx).to(F64)
    elif isinstance(v, (list, tuple, torch.Tensor)):
        try:
            t = torch.as_tensor(v, dtype=F64, device=ctx.device)
        except (TypeError, ValueError, RuntimeError):
            return None
        t = t.expand(ctx.M, *t.shape)
    else:
        return None
    return t if t.dim() == 2 else None


def _observed_rows(value, ctx: Particles) -> torch.Tensor | None:
    """The observed value as float64 [M, K] (K observations per particle of a scalar
    distribution, observed one after the other), or None."""
    if isinstance(value, Batched):
        y = rows(value, ctx)
    elif isinstance(value, (bool, int, float, torch.Tensor)):
        y = torch.as_tensor(value, device=ctx.device)
        y = y.reshape(1, *y.shape).expand(ctx.M, *y.shape)
    else:
        return None
    if y.dtype == torch.bool or not y.is_floating_point():
        y = y.to(F64)
    return y.to(F64).reshape(ctx.M, -1)


def _outside_support(kind: str, y, n, node: Node) -> torch.Tensor | None:
    """The particles whose observed values lie outside the observation's support (bool
    [M]), or None when there are none."""
    ok = torch.isfinite(y) & (y >= 0) & (y == y.round())
    if kind == "bernoulli":
        ok = ok & (y <= 1)
    elif kind == "binomial":
        ok = ok & (y <= n.unsqueeze(-1))
    elif kind == "categorical":
        ok = ok & (y < node.rows()["alpha"].shape[-1])
    bad = ~ok.all(-1)
    return bad if bool(bad.any()) else None


class DelayedWeighting(DelayedSampling, Weighting):
    """Likelihood weighting with delayed sampling."""

    def __init__(self, N: int, device, full_idx: torch.Tensor):
        Weighting.__init__(self, N, device)
        self.start_delayed(N, device, full_idx)


def _ending(gen, handler, ctx):
    """The interpreter's generator, with ``handler.complete`` applied to its return value
    before the run ends (before ``drive`` calls ``finish``)."""
    ret = yield from gen
    return handler.complete(ret, ctx)


def delayed_importance(interp, entry: str, data: dict, particles: int, device="cpu") -> Population:
    """Likelihood weighting with delayed sampling: a ``Population`` ("importance")."""
    ctx = Particles.all(particles, device)
    h = DelayedWeighting(particles, device, ctx.idx)
    with live_run():
        ret = drive(_ending(interp.run(entry, data, ctx), h, ctx), h)
    if particles > 0 and bool(torch.isneginf(h.log_weights).all()):
        raise ZeroEvidenceError("every particle has weight zero (log evidence = -inf)",
                                hint="the observations/conditions may be impossible under the prior")
    sites = {"return": (column(ret, ctx), None), **h.trace.sites()}
    return Population("importance", sites, h.log_weights, {"delayed": h.delayed_summary},
                      legacy=(sites, h.log_weights))


class _EndingInterpreter:
    """An interpreter whose runs end with the delayed handler's ``complete``."""

    def __init__(self, interp):
        self.interp = interp
        self.handler = None

    def run(self, entry, data, ctx):
        return _ending(self.interp.run(entry, data, ctx), _Deferred(self), ctx)


class _Deferred:
    def __init__(self, owner):
        self.owner = owner

    def complete(self, ret, ctx):
        return self.owner.handler.complete(ret, ctx)


def delayed_smc(interp, entry: str, data: dict, particles: int, device="cpu", *, realise_at_end: bool = True,
                handler_base=None, **options) -> Population:
    """SMC (``inference.smc``) with delayed sampling: a ``Population`` ("smc").
    ``realise_at_end=False`` leaves the nodes unrealised at the end (their sites are then
    absent; for the exact checker); ``handler_base`` substitutes the mixin (to check a
    broken variant)."""
    wrapped = _EndingInterpreter(interp)

    class Handler(handler_base or DelayedSampling, SMCHandler):
        def __init__(self, N, dev, lineage, **kw):
            SMCHandler.__init__(self, N, dev, lineage, **kw)
            self.start_delayed(N, dev, lineage.full_idx)
            self.realise_at_end = realise_at_end
            wrapped.handler = self

    with live_run():
        pop = smc(wrapped, entry, data, particles, device, handler_cls=Handler, **options)
    pop.extra["delayed"] = wrapped.handler.delayed_summary
    return pop
