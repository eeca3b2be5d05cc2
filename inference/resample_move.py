"""Resample-move SMC: SMC whose particles are rejuvenated by MH after each resampling.

After the population is resampled at its k-th checkpoint, every particle's trace (its
choices so far) is moved by the rejuvenation kernel (``rejuvenation.MoveKernel``:
``moves`` single-site MH steps, or with ``adapt=True`` the population's adaptive moves)
whose target is the program *truncated after its k-th checkpoint* — the prior times the
first k likelihood factors, which is exactly the distribution the resampled population
represents. Then the
population's suspended execution is rebuilt from the moved traces (the program is
replayed up to checkpoint k) and SMC carries on.

Invariant: each move leaves the k-th SMC target invariant, so the moves change
neither the weights nor the properness of the population (E[Z_hat f] is unchanged); they
only restore diversity lost to resampling. Rebuilding costs a replay of the prefix, so a
run is O(T^2) in the number of checkpoints (as in other PPLs that rejuvenate by
re-execution).

Restriction: every checkpoint must be reached by the whole population together (no
``observe`` inside a branch that only some particles take); otherwise the truncated
targets would differ between particles. This is checked, with a clear error.

As a composition of the run kit (``semantics.sampling``): SMC's handler whose checkpoint
rule, after a resampling, suspends the run (``Suspended``); the moves; then the moved
population replayed up to that checkpoint (chooser ``fixed``, rule ``truncate(k)``) and
driven on with the same SMC handler. Twists: the replay sets the moved particles' own
potentials (the MH target counts the potential reached before the truncation point).
"""
from __future__ import annotations

import torch

from ..semantics import gfi
from ..semantics.errors import PPLRuntimeError
from ..semantics.sampling import Suspended, Weighting, column, drive, fixed, truncate
from ..semantics.values import Lineage, Particles, lineage_scope
from ..stdlib.progress import NO_BAR, progress_bar
from . import mh as mh_mod
from . import rejuvenation, token_moves
from .population import Population
from .rejuvenation import MoveKernel
from .smc import SMCHandler


class _SuspendAfterResampling(SMCHandler):
    """SMC that stops the driver at each checkpoint where it resampled (for the moves),
    and refuses checkpoints that only some particles reach."""

    checkpoints = 0
    moves = 1

    def _checkpoint(self, eff):
        if eff.ctx.M != self.N:
            raise gfi.unsynchronised_checkpoint(eff)
        self.checkpoints += 1
        super()._checkpoint(eff)
        if self.moves and self.history[-1].resampled:
            raise Suspended(eff)


def resample_move(interp, entry: str, data: dict, particles: int, device="cpu", *, resampling="systematic",
                  ess_threshold: float = 1.0, moves: int | None = None, kernel: str = "prior", scale: float = 0.5,
                  randomness=None, progress: bool | None = None, adapt: bool = False, max_moves: int = 100,
                  decorrelation: float = 0.1):
    """Run resample-move SMC: a ``Population`` (it unpacks to (sites, log_weights, handler,
    acceptance rates)). ``randomness`` (default: torch) serves both the SMC and the MH
    draws. ``progress``: a counter of synchronisation checkpoints with the ESS, as for ``smc``.
    ``moves``: MH steps per rejuvenation (None: 1).

    ``adapt=True``: the rejuvenation moves are ``inference.population_moves``' (a block
    random walk on the continuous choices every particle has, with the population's
    covariance and a scale adapted from one rejuvenation to the next, plus single-site
    prior moves on the other choices), repeated until the particles decorrelate from
    where they started (correlation below ``decorrelation``) or ``max_moves`` (a
    warning); a given ``moves`` fixes the count. ``extra["moves"]`` is then the list of
    moves per rejuvenation, ``extra["acceptance"]`` the block walk's acceptance (the
    single-site moves' where there is no block), ``extra["correlation"]`` and
    ``extra["proposal_scale"]`` per rejuvenation."""
    randomness = randomness or mh_mod.TorchMHRandomness()
    move = MoveKernel("resample_move", adapt=adapt, kernel=kernel, moves=1 if moves is None and not adapt else moves,
                      scale=scale, max_moves=max_moves, decorrelation=decorrelation)
    N = particles
    h = _SuspendAfterResampling(N, device, None, resampling=resampling, ess_threshold=ess_threshold,
                                randomness=randomness)
    h.moves = move.active

    def rejuvenated():  # resampled at checkpoint k: move the traces at the k-th target
        model = gfi.ModelRun(interp, entry, data, device, stop_after=h.checkpoints)
        if kernel in token_moves.KERNELS:  # moves on language-model choices (``inference.token_moves``)
            moved, rate = token_moves.rejuvenate(model, h.trace.sites(), N, move.moves, randomness)
            move.acceptance.append(rate)
            return moved
        state = move.begin(model, _traces(h, N, device), randomness, scored=False)
        return move(model, state, randomness, label=f"resample_move (checkpoint {h.checkpoints})").values

    with progress_bar(progress, desc="resample_move", unit=" checkpoints") as h.bar:
        sites = drive_rebuilding(interp, entry, data, h, N, device, rejuvenated)
    h.bar = NO_BAR
    lw = h.log_weights + h.log_z
    extra = {"history": h.history, "acceptance": move.acceptance, **move.extra()}
    return Population("resample_move", sites, lw, extra, legacy=(sites, lw, h, move.acceptance))


#: the kernels ``adapt=True`` accepts ("prior", the default, and "rw": the population walk)
ADAPTIVE_KERNELS = rejuvenation.ADAPTIVE_KERNELS["resample_move"]


def _traces(h: SMCHandler, N: int, device) -> gfi.TracedState:
    """The population's traces so far (values and presence; scores to be computed)."""
    sites = h.trace.sites()
    values = {a: (v if isinstance(v, torch.Tensor) else _not_numeric(a)) for a, (v, _) in sites.items()}
    present = {a: (p if p is not None else torch.ones(N, dtype=torch.bool, device=device))
               for a, (_, p) in sites.items()}
    return gfi.TracedState(values, present, {}, torch.zeros(N, dtype=torch.float64, device=device), None)


class _Replayed(Weighting):
    """The moved traces replayed: likelihoods are not weighted again (the resampled
    population's weights stand); twists set each particle's potential."""

    def observe(self, eff):
        self._checkpoint(eff)

    factor = condition = observe


def drive_rebuilding(interp, entry, data, h: SMCHandler, N: int, device, rebuild) -> dict:
    """Run the program under ``h`` with N particles to its end and return the sites
    (``"return"`` included). Whenever ``h`` suspends the run (raises ``Suspended`` at a
    checkpoint), ``rebuild()`` gives the population's new traces (address -> values [N]),
    and a fresh run replays them up to that checkpoint and goes on from there. Invariant:
    the run that ends is the program run on exactly the traces ``rebuild`` last gave,
    with ``h``'s weights. Resample-move (rebuild = the moved traces) and distributed SMC
    (rebuild = the particles that arrived from other ranks) are this loop."""
    moved = None
    while True:
        ctx = Particles.all(N, device)
        with lineage_scope(Lineage(ctx.idx)) as h.lineage:
            gen = interp.run(entry, data, ctx)
            if moved is not None:
                _replay_moved(gen, h, moved, h.checkpoints)
            try:
                ret = drive(gen, h)
                return {"return": (column(ret, ctx), None), **h.trace.sites()}
            except Suspended:
                moved = rebuild()


def _replay_moved(gen, h: SMCHandler, values: dict, k: int) -> None:
    """Run ``gen`` (a fresh run of the program) on the moved values up to its k-th
    checkpoint and leave it suspended there; ``h`` gets the replay's trace and twist
    potentials."""
    replay = _Replayed(h.N, h.log_weights.device, choose=fixed(values), at_checkpoint=truncate(k))
    try:
        drive(gen, replay)
    except Suspended:
        h.trace, h._twist = replay.trace, replay._twist
        h._twist_ctx = getattr(replay, "_twist_ctx", None)
        return
    raise PPLRuntimeError("resample-move: the replay of the moved traces ended before its checkpoint "
                          "(internal error)")


def _not_numeric(addr):
    raise PPLRuntimeError(f"resample-move supports numeric choices only ('{addr}' is not)",
                          hint="kernel='suffix' moves language-model choices; or use method='smc'")
