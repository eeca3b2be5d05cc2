"""Resample-move SMC: SMC whose particles are rejuvenated by MH after each resampling.

After the population is resampled at its k-th checkpoint, every particle's trace (its
choices so far) is moved by ``moves`` single-site MH steps whose target is the program
*truncated after its k-th checkpoint* — the prior times the first k likelihood factors,
which is exactly the distribution the resampled population represents. Then the
population's suspended execution is rebuilt from the moved traces (the program is
replayed up to checkpoint k) and SMC carries on.

Invariant: each MH step leaves the k-th SMC target invariant, so the moves change
neither the weights nor the properness of the population (E[Z_hat f] is unchanged); they
only restore diversity lost to resampling. Rebuilding costs a replay of the prefix, so a
run is O(T^2) in the number of checkpoints (as in other PPLs that rejuvenate by
re-execution).

Restriction: every checkpoint must be reached by the whole population together (no
``observe`` inside a branch that only some particles take); otherwise the truncated
targets would differ between particles. This is checked, with a clear error.
"""
from __future__ import annotations

import torch

from ..semantics.errors import PPLError, PPLRuntimeError
from ..semantics.interpreter import ConditionEffect, FactorEffect, ObserveEffect, SampleEffect, TwistEffect
from ..semantics.sampling import Trace, column
from ..semantics.values import Batched, Lineage, Particles, set_lineage
from . import mh as mh_mod
from ..stdlib.progress import NO_BAR, progress_bar
from .smc import SMCHandler

_CHECKPOINTS = (ObserveEffect, FactorEffect, ConditionEffect)


def resample_move(interp, entry: str, data: dict, particles: int, device="cpu", *, resampling="systematic",
                  ess_threshold: float = 1.0, moves: int = 1, kernel: str = "prior", scale: float = 0.5,
                  randomness=None, progress: bool | None = None):
    """Run resample-move SMC: returns (sites, log_weights, handler, acceptance rates).
    ``randomness`` (default: torch) serves both the SMC and the MH draws. ``progress``: a
    counter of synchronisation checkpoints with the ESS, as for ``smc``."""
    randomness = randomness or mh_mod.TorchMHRandomness()
    N = particles
    ctx = Particles.all(N, device)
    lineage = Lineage(ctx.idx)
    h = SMCHandler(N, device, lineage, resampling=resampling, ess_threshold=ess_threshold, randomness=randomness)
    dispatch = {SampleEffect: h.sample, ObserveEffect: h.observe, FactorEffect: h.factor,
                ConditionEffect: h.condition, TwistEffect: h.twist}
    acceptance = []
    old_lineage = set_lineage(lineage)
    bar = h.bar = progress_bar(progress, desc="resample_move", unit=" checkpoints")
    try:
        gen = interp.run(entry, data, ctx)
        checkpoints = 0
        try:
            eff = next(gen)
            while True:
                reply = _answer(dispatch, eff)
                if isinstance(eff, _CHECKPOINTS):
                    if eff.ctx.M != N:
                        raise PPLRuntimeError(
                            "resample-move needs every observe/factor/condition to be reached by all "
                            "particles together", eff.span,
                            "this checkpoint is inside a branch taken by only some particles: use method='smc'")
                    checkpoints += 1
                    if moves > 0 and h.history and h.history[-1].resampled:
                        gen, ctx, rates = _rejuvenate(interp, entry, data, h, checkpoints, N, device, moves,
                                                      kernel, scale, randomness)
                        acceptance.append(rates)
                eff = gen.send(reply)
        except StopIteration as stop:
            ret = stop.value
        h.finish()  # the last twist's potential out again (the measure is the untwisted one)
        sites = {"return": (column(ret, ctx), None)}
        sites.update(h.trace.sites())
    finally:
        set_lineage(old_lineage)
        bar.close()
        h.bar = NO_BAR
    return sites, h.log_weights + h.log_z, h, acceptance


def _answer(dispatch: dict, eff):
    """The handler's reply to an effect; a value it cannot use is a located error (as in
    ``semantics.sampling.drive``), never a raw Python exception."""
    try:
        return dispatch[type(eff)](eff)
    except PPLError as err:
        raise err.with_span(eff.span)
    except (TypeError, ValueError, RuntimeError, IndexError, ZeroDivisionError, OverflowError) as err:
        msg = str(err).splitlines()[0] if str(err) else ""
        raise PPLRuntimeError(f"{type(err).__name__}: {msg}", eff.span) from err


def _rejuvenate(interp, entry, data, h: SMCHandler, k: int, N: int, device, moves, kernel, scale, randomness):
    """MH-move the population's traces (target: the program up to checkpoint k), then
    rebuild its suspended execution at checkpoint k. Returns (generator, ctx, rate)."""
    sites = h.trace.sites()
    values = {a: (v if isinstance(v, torch.Tensor) else _not_numeric(a)) for a, (v, _) in sites.items()}
    present = {a: (p if p is not None else torch.ones(N, dtype=torch.bool, device=device))
               for a, (_, p) in sites.items()}
    old = mh_mod.MHState(values, present, {}, torch.zeros(N, dtype=torch.float64, device=device), None)
    state = mh_mod._run(interp, entry, data, N, device, old, {}, mh_mod.TorchMHRandomness(), "prior", 1.0, k)
    accepted = 0.0
    for _ in range(moves):
        state, acc = mh_mod.mh_step(interp, entry, data, state, device, kernel=kernel, scale=scale, stop_after=k,
                                    randomness=randomness)
        accepted += float(acc.double().mean())
    # rebuild: replay the moved traces up to checkpoint k, and suspend there
    lineage = Lineage(torch.arange(N, device=device))
    set_lineage(lineage)
    h.lineage = lineage
    ctx = Particles(lineage.full_idx, N, device)
    h.trace = Trace(N, device)
    h._twist = None  # rebuilt by the replay's twists (the moved particles' own potentials)
    gen = interp.run(entry, data, ctx)
    seen = 0
    eff = next(gen)
    while True:
        if isinstance(eff, TwistEffect):
            _replay_twist(h, eff)
            eff = gen.send(None)
            continue
        if isinstance(eff, SampleEffect):
            col, pres = state.values.get(eff.addr), state.present.get(eff.addr)
            if col is None or not bool(pres[eff.ctx.idx].all()):
                raise PPLRuntimeError(f"resample-move: replay reached a choice '{eff.addr}' the moved trace "
                                      "does not have (internal error)", eff.span)
            value = Batched(col[eff.ctx.idx], eff.ctx.idx)
            h.trace.record(eff.addr, eff.ctx, value)
            eff = gen.send(value)
            continue
        seen += 1
        if seen == k:
            return gen, ctx, accepted / max(1, moves)
        eff = gen.send(None)


def _replay_twist(h: SMCHandler, eff: TwistEffect) -> None:
    """Set the moved particles' SMC potential to the replayed ``twist(phi)``, leaving
    their weights alone: the MH moves targeted the twisted truncated program (``mh._Run``
    counts the potential reached at the truncation point), which is what the resampled,
    equally weighted population represents."""
    weights = h.log_weights
    h.twist(eff)
    h.log_weights = weights


def _not_numeric(addr):
    raise PPLRuntimeError(f"resample-move supports numeric choices only ('{addr}' is not)",
                          hint="use method='smc' for models with string-valued choices")
