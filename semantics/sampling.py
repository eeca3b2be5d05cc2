"""A program as a weighted sampler over particles: the run kit.

``drive(gen, handler)`` runs an interpreter generator, answering each effect with the
handler. A handler is made of two independent pieces:

* **what value a choice gets** (a *chooser*, ``choose(h, eff) -> value``, which may add a
  weight correction to ``h``): ``prior(randomness)`` draws from the prior through a
  pluggable randomness (a user proposal ``propose(target, q)`` draws from q and adds
  log target - log q); ``replay(given)`` reads a given trace and adds the log density;
  ``fixed(columns)`` takes row i of a column per address for particle i, unweighted.
  (A guide is one more chooser: ``inference.amortized``.)
* **what happens to the weight at a checkpoint** (a *rule*, ``at_checkpoint(h, eff)``,
  called after each observe/factor/condition has been weighted): ``accumulate`` (nothing
  more: importance weights), ``truncate(k)`` (suspend the run at its k-th checkpoint:
  ``drive`` raises ``Suspended`` and a later ``drive(gen, h)`` carries on from there),
  or SMC's resampling (``inference.smc``).

``Weighting(N, device, choose=..., at_checkpoint=...)`` puts them together, accumulates the
log weights (observe/factor/condition/twist) and records the ``Trace``. The two basic
meanings of a run are compositions:

* ``LikelihoodWeighting``: ``Weighting(choose=prior())``: draw every choice from its prior
  and multiply the weight by every likelihood factor. For a program denoting the
  unnormalised measure ``gamma(dx) = prior(dx) * L(x)`` this yields particles x_i ~ prior
  with weights w_i = L(x_i), so that ``E[w f(x)] = Z * E_post[f]``: a *proper* weighting,
  the contract every later inference transformation builds on.
* ``Replay``: ``Weighting(choose=replay(trace))``: read every choice from a given trace and
  sum all log densities: the log joint density ``log p(trace, data)`` (NaN-free: -inf
  where the trace is impossible).

The trace maps address -> per-particle values, with a presence mask for choices that only
some particles make. Rewriting effects before they reach a handler (conditioning,
substituted observations) is ``semantics.middleware``.

Particles of weight zero never raise. The population runs as one batch, so a particle
that a ``condition`` (or an impossible observation) has already killed still reaches the
later statements, where its values may be invalid parameters (``s ~ cauchy(0, 2.5);
condition s > 0; observe y ~ normal(mu, s)``). A handler scores and draws through
``log_prob`` and ``draw``: when the distribution raises and some particles of the effect
have weight zero, it is evaluated again on the live particles only; the dead ones score
-inf and get a placeholder value (never used: their weight is zero).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .errors import PPLError, PPLRuntimeError
from .dist_values import ProposedDist
from .interpreter import ConditionEffect, FactorEffect, ObserveEffect, SampleEffect, TwistEffect
from .invalid_parameters import invalid_log_prob
from .trace import Trace, column, consolidate  # noqa: F401  (re-exported: the run kit's recorder)
from .values import Batched, Particles, PerParticle, describe, rows, to_bool_rows


class Suspended(Exception):
    """Raised by a checkpoint rule to stop ``drive`` with the generator suspended at that
    checkpoint (``truncate``); ``drive(gen, handler)`` carries on from there."""


def drive(gen, handler) -> Any:
    """Run an interpreter generator to the end, answering its effects with ``handler``;
    then ``handler.finish()`` (if it has one). ``gen`` may be fresh or suspended at a
    checkpoint (whose reply is None: see ``Suspended``)."""
    dispatch = {SampleEffect: handler.sample, ObserveEffect: handler.observe,
                FactorEffect: handler.factor, ConditionEffect: handler.condition,
                TwistEffect: getattr(handler, "twist", _ignore)}
    try:
        eff = gen.send(None)  # = next(gen) for a fresh generator
        while True:
            try:
                reply = dispatch[type(eff)](eff)
            except PPLError as err:
                raise err.with_span(eff.span)
            except (TypeError, ValueError, RuntimeError, IndexError, ZeroDivisionError, OverflowError) as err:
                # a user value the handler cannot use; never a raw Python error
                msg = str(err).splitlines()[0] if str(err) else ""
                raise PPLRuntimeError(f"{type(err).__name__}: {msg}", eff.span) from err
            eff = gen.send(reply)
    except StopIteration as stop:
        finish = getattr(handler, "finish", None)
        if finish is not None:
            finish()
        return stop.value


def _ignore(eff):
    return None


def spread(value: Any, live: Particles, ctx: Particles) -> Any:
    """A value over ctx from a batched one over its part ``live``: the other particles
    (of weight zero) get the first live particle's value."""
    src = torch.zeros(ctx.M, dtype=torch.long, device=ctx.device)
    src[ctx.positions(live.idx)] = torch.arange(live.M, device=ctx.device)
    if isinstance(value, Batched):
        return Batched(rows(value, live).index_select(0, src), ctx.idx)
    if isinstance(value, PerParticle):
        items = rows(value, live)
        return PerParticle([items[i] for i in src.tolist()], ctx.idx)
    return value


class _WeightAccumulator:
    """Sums log weights per particle. Log weights, log densities and evidences always
    accumulate in float64 (``dtype`` defaults to it), whatever the model's dtype: a
    float32 sum of 1e6 log densities of size ~1 is off by tens of nats."""

    def __init__(self, N: int, device, dtype=None):
        self.log_weights = torch.zeros(N, device=device, dtype=dtype or torch.float64)

    def add(self, ctx: Particles, lp):
        lw = self.log_weights
        # (ctx.is_full and ctx.M, without property calls)
        if ctx.idx is ctx.full.idx and ctx.idx.shape[0] == lw.shape[0] and type(lp) is torch.Tensor and lp.device == lw.device \
                and (lp.dtype == lw.dtype or (lp.dtype == torch.float32 and lw.dtype == torch.float64)):
            # the common case: float32 -> float64 is exact, so the add's own type promotion
            # gives the same bits as converting first, without the extra copy
            self.log_weights = lw + lp
            return
        lp = torch.as_tensor(lp, device=self.log_weights.device, dtype=self.log_weights.dtype)
        if ctx.is_full and ctx.M == self.log_weights.shape[0]:
            self.log_weights = self.log_weights + lp
        else:
            self.log_weights = self.log_weights.index_add(0, ctx.idx, lp.expand(ctx.M))

    _twist = None  # the current potential of each particle (a batched value: it follows resampling)

    def twist(self, eff: TwistEffect):
        """Replace the particle's potential: weight * exp(phi - previous phi)."""
        ctx = eff.ctx
        v = eff.value
        try:
            phi = rows(v, ctx).to(self.log_weights.dtype) if isinstance(v, Batched) else \
                torch.full((ctx.M,), float(v), dtype=self.log_weights.dtype, device=self.log_weights.device)
        except (TypeError, ValueError, RuntimeError):
            phi = None
        if phi is None or phi.shape != (ctx.M,):
            raise PPLRuntimeError(f"twist needs one number per particle, got {describe(v)}", eff.span)
        phi = self._valid_potential(phi, eff)
        full = Particles(ctx.full.idx, ctx.N, ctx.device, ctx.full)
        current = rows(self._twist, full) if self._twist is not None else \
            torch.zeros(ctx.N, dtype=self.log_weights.dtype, device=self.log_weights.device)
        self.add(ctx, _without_dead(phi - current[ctx.idx], current[ctx.idx]))
        current = current.clone()
        current[ctx.idx] = phi
        self._twist = Batched(current, ctx.full.idx)
        self._twist_ctx = full

    def _valid_potential(self, phi: torch.Tensor, eff) -> torch.Tensor:
        """A twist potential: a number or -inf per particle (-inf kills the particle); NaN
        or +inf is an error at the twist, unless only on particles of weight zero."""
        bad = torch.isnan(phi) | torch.isposinf(phi)
        if not bool(bad.any()):
            return phi
        dead = torch.isneginf(self.log_weights[eff.ctx.idx])
        if bool((bad & ~dead).any()):
            what = "NaN" if bool((torch.isnan(phi) & ~dead).any()) else "+inf"
            raise PPLRuntimeError(f"twist received {what}", eff.span,
                                  "a potential is a log value: a number, or -inf for a particle that cannot "
                                  "continue; check the expression for 0/0, inf - inf or log of a negative")
        return torch.where(bad, torch.full_like(phi, -math.inf), phi)

    def finish(self):
        """End of the run: take the last potential out again (the telescoping correction)."""
        if self._twist is not None:
            last = rows(self._twist, self._twist_ctx)
            self.add(self._twist_ctx, _without_dead(-last, last))

    #: a parameter invalid at every particle's own values is density zero too, not an
    #: error (``semantics.invalid_parameters``; MCMC's re-execution sets it)
    invalid_anywhere = False

    # ------------------------------------------------- particles of weight zero never raise
    def live(self, ctx: Particles) -> Particles | None:
        """The particles of ctx whose weight is not zero: ctx itself when all are, None
        when none is."""
        dead = torch.isneginf(self.log_weights[ctx.idx])
        if not bool(dead.any()):
            return ctx
        return ctx.subset(~dead)

    def log_prob(self, dist, value, ctx: Particles, site=None) -> torch.Tensor:
        """``dist.log_prob(value, ctx)``; where that raises only because of particles of
        weight zero, -inf for them and the log density for the others; where the
        distribution's parameters are invalid at some live particles only, -inf for those
        too (density zero there, noted for ``site``: ``semantics.invalid_parameters``)."""
        try:
            return dist.log_prob(value, ctx)
        except PPLRuntimeError as err:
            live = self.live(ctx)
            if live is ctx:
                return invalid_log_prob(dist, value, ctx, err, site, self.invalid_anywhere)
        lp = torch.full((ctx.M,), -math.inf, dtype=torch.float64, device=ctx.device)
        if live is not None:
            try:
                live_lp = dist.log_prob(value, live)
            except PPLRuntimeError as err:
                live_lp = invalid_log_prob(dist, value, live, err, site, self.invalid_anywhere)
            lp[ctx.positions(live.idx)] = torch.as_tensor(live_lp).to(torch.float64)
        return lp

    def draw(self, dist, ctx: Particles, draw=None):
        """``draw(dist, ctx)`` (default ``dist.sample(ctx)``): a value per particle; where
        that raises only because of particles of weight zero, the others draw and the dead
        ones get a placeholder (a live particle's value, or ``dist.placeholder``)."""
        draw = draw or (lambda d, c: d.sample(c))
        try:
            return draw(dist, ctx)
        except PPLRuntimeError as err:
            live = self.live(ctx)
            if live is ctx:
                raise
            error = err
        if live is not None:
            return spread(draw(dist, live), live, ctx)
        placeholder = getattr(dist, "placeholder", None)
        value = placeholder(ctx) if placeholder is not None else None
        if value is None:
            raise error
        return value

    def factor(self, eff: FactorEffect):
        self.add(eff.ctx, self._factor_log_weight(eff))
        self._checkpoint(eff)

    def _factor_log_weight(self, eff: FactorEffect) -> torch.Tensor:
        """A factor's value as a log weight (in the weights' dtype), checked: NaN, or +inf,
        is an error at the factor unless only on particles of weight zero (-inf there)."""
        v = eff.value
        if isinstance(v, Batched):
            lp = rows(v, eff.ctx)
            if lp.dim() != 1:
                raise PPLRuntimeError("factor needs one number per particle", eff.span)
        elif isinstance(v, PerParticle):
            raise PPLRuntimeError("factor needs a number", eff.span)
        else:
            try:
                lp = torch.as_tensor(float(v))
            except (TypeError, ValueError):
                raise PPLRuntimeError(f"factor needs a number, got {v!r}", eff.span) from None
        if torch.isnan(lp).any():
            lp = self._nan_on_dead(lp, eff)
        if torch.isposinf(lp).any() and not getattr(getattr(self, "at_checkpoint", None), "reports_infinite", False):
            # (+inf is no log weight: it would turn every weight into NaN; a checkpoint rule
            # with ``reports_infinite`` set, best_of_n's, says so in its own words)
            lp = self._nan_on_dead(torch.where(torch.isposinf(lp), math.nan, lp), eff, "factor received +inf",
                                   "a factor is a log weight: a number, or -inf to rule the particle out; "
                                   "check the expression for log(0) under a minus sign or a division by zero")
        return lp.to(self.log_weights.dtype)

    def _nan_on_dead(self, lp: torch.Tensor, eff, message: str = "factor received NaN",
                     hint: str = "check the expression for 0/0 or log of a negative") -> torch.Tensor:
        """A factor (or log density) that is NaN only for particles of weight zero: -inf
        there (else an error at ``eff``)."""
        nan = torch.isnan(lp)
        if lp.dim() == 1 and lp.shape[0] == eff.ctx.M:
            dead = torch.isneginf(self.log_weights[eff.ctx.idx])
            if not bool((nan & ~dead).any()):
                return torch.where(nan, torch.full_like(lp, -math.inf), lp)
        raise PPLRuntimeError(message, eff.span, hint)

    def condition(self, eff: ConditionEffect):
        c = to_bool_rows(eff.value, eff.ctx)
        if isinstance(c, bool):
            if not c:
                self.add(eff.ctx, torch.tensor(-math.inf))
        else:
            self.add(eff.ctx, torch.where(c, 0.0, -math.inf).to(self.log_weights.dtype))
        self._checkpoint(eff)

    def observe(self, eff: ObserveEffect):
        self.add(eff.ctx, self.log_prob(eff.dist, eff.value, eff.ctx, eff))
        self._checkpoint(eff)

    def _checkpoint(self, eff) -> None:
        """Called after every observe/factor/condition has been weighted: the hook where
        SMC resamples, MH truncates, and the zero-evidence locator looks."""


def _without_dead(change: torch.Tensor, potential: torch.Tensor) -> torch.Tensor:
    """A change of log weight after a twist, 0 where the previous potential was -inf:
    that particle's weight is already -inf and stays so (-inf + inf would make it NaN)."""
    return torch.where(torch.isneginf(potential), torch.zeros_like(change), change)


# --------------------------------------------------------------- what value a choice gets
def _own_draw(dist, ctx):
    return dist.sample(ctx)


def prior(randomness=None):
    """Chooser: a draw from the choice's prior through ``randomness.sample(dist, ctx)``
    (None: ``dist.sample(ctx)``, the run's generator); a user proposal draws from its
    proposal and adds log target - log proposal."""
    draw = _own_draw if randomness is None else randomness.sample

    def choose(h, eff):
        if isinstance(eff.dist, ProposedDist):
            value, correction = eff.dist.propose(eff.ctx, draw)
            h.add(eff.ctx, correction)
            return value
        return h.draw(eff.dist, eff.ctx, draw)  # (particles of weight zero never raise)
    return choose


def replay(given: dict, rows: bool = False):
    """Chooser: the value of ``given[addr]`` (a tensor with one row per particle, or one
    value for all), weighted by its log density; a choice it lacks is an error.

    ``rows=False``: a tensor whose leading dimension is N > 1 holds one row per particle;
    anything else is one value for all (with N = 1 a tensor is the one particle's value).
    ``rows=True`` (``Model.log_joint``'s rule, no guessing): every tensor with at least one
    dimension holds one row per particle, also when N = 1, and each value (a row, or a
    value for all) must have the choice's own shape, else a located error."""
    def choose(h, eff):
        if eff.addr not in given:
            raise PPLRuntimeError(f"the trace has no value for the choice '{eff.addr}'", eff.span)
        value = given[eff.addr]
        N = h.log_weights.shape[0]
        batched = isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == N
        if rows:
            _check_value_shape(eff, value, batched)
        if batched and (N > 1 or rows):
            value = Batched(value.to(eff.ctx.device)[eff.ctx.idx], eff.ctx.idx)
        h.add(eff.ctx, h.log_prob(eff.dist, value, eff.ctx))
        return value
    return choose


def _check_value_shape(eff, value, batched: bool) -> None:
    """A located error unless ``value`` (rows of a batch, or one value for all) has the
    shape of a draw of the choice ``eff`` (skipped where that shape is not known)."""
    place = eff.dist.placeholder(eff.ctx) if hasattr(eff.dist, "placeholder") else None
    want = getattr(place, "t", None)
    if not isinstance(want, torch.Tensor):
        return
    want = tuple(want.shape[1:])
    if batched:
        got = tuple(value.shape[1:])
    else:
        try:
            got = tuple(torch.as_tensor(value).shape)
        except (TypeError, ValueError, RuntimeError):
            return
    if got != want:
        shape = "a number" if not want else f"shape {list(want)}"
        gave = f"rows of shape {list(got)}" if batched else f"a value of shape {list(got)}"
        raise PPLRuntimeError(
            f"the trace's value for the choice '{eff.addr}' has {gave}, but the choice takes {shape}", eff.span,
            "every tensor with a leading dimension holds one row per trace (all the same number of rows): "
            f"for one trace give '{eff.addr}' as a list or a tensor of shape {[1, *want]}")


def fixed(columns: dict):
    """Chooser: row i of ``columns[addr]`` (a tensor over all N particles, or a list of N
    values such as tokens) for particle i, unweighted (a population rebuilt from moved
    traces)."""
    def choose(h, eff):
        if eff.addr not in columns:
            raise PPLRuntimeError(f"no value for the choice '{eff.addr}'", eff.span)
        col = columns[eff.addr]
        if isinstance(col, list):
            return PerParticle([col[i] for i in eff.ctx.idx.tolist()], eff.ctx.idx)
        return Batched(col[eff.ctx.idx], eff.ctx.idx)
    return choose


# ------------------------------------------------- what happens to the weight at a checkpoint
def accumulate(h, eff) -> None:
    """Rule: nothing beyond the weight already added (importance weights)."""


def truncate(k: int):
    """Rule: suspend the run at its k-th checkpoint (``drive`` raises ``Suspended``)."""
    seen = 0

    def rule(h, eff):
        nonlocal seen
        seen += 1
        if seen >= k:
            raise Suspended(eff)
    return rule


class Weighting(_WeightAccumulator):
    """A handler from a chooser and a checkpoint rule (see the module docstring): log
    weights accumulated in float64, the choices recorded in ``trace``."""

    def __init__(self, N: int, device, dtype=None, *, choose=None, at_checkpoint=accumulate):
        super().__init__(N, device, dtype)
        self.trace = Trace(N, device)
        self.choose = choose or prior()
        self.at_checkpoint = at_checkpoint

    def sample(self, eff: SampleEffect):
        value = self.choose(self, eff)
        self.trace.record(eff.addr, eff.ctx, value)
        return value

    def observe(self, eff: ObserveEffect):
        """Weight by the observation's log density; NaN there (a NaN or infinite observed
        value or parameter) is an error at the observe, not a NaN weight found later."""
        lp = self.log_prob(eff.dist, eff.value, eff.ctx, eff)
        # (a NaN makes the sum NaN: one reduction clears the common case; a NaN sum, which
        # +inf and -inf also give, goes to the elementwise test)
        if isinstance(lp, torch.Tensor) and math.isnan(float(lp.sum())) and bool(torch.isnan(lp).any()):
            lp = self._nan_observation(lp, eff)
        self.add(eff.ctx, lp)
        self._checkpoint(eff)

    def _nan_observation(self, lp: torch.Tensor, eff) -> torch.Tensor:
        """An observation's log density with a NaN: -inf where only particles of weight
        zero have it, else an error at the observe."""
        return self._nan_on_dead(lp, eff, "the observation's log density is NaN",
                                 "the observed value or a parameter of its distribution is NaN or "
                                 "infinite (e.g. inf - inf, 0 * inf); check them")

    def _checkpoint(self, eff) -> None:
        self.at_checkpoint(self, eff)


class LikelihoodWeighting(Weighting):
    """Prior proposal, likelihood weights (see the module docstring); ``randomness``: where
    the prior draws come from (default: the run's generator)."""

    def __init__(self, N: int, device, dtype=None, randomness=None):
        super().__init__(N, device, dtype, choose=prior(randomness))


class Replay(Weighting):
    """Score a given trace: ``log_weights`` becomes the log joint density."""

    observe = _WeightAccumulator.observe  # the log joint as it is (no NaN check)

    def __init__(self, trace: dict, N: int, device, dtype=None, rows: bool = False):
        super().__init__(N, device, dtype, choose=replay(trace, rows))
        self.given = trace
