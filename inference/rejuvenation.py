"""The moves that rejuvenate an SMC population after it is resampled: one building block,
``MoveKernel``, built from an algorithm's options (tempering and resample-move compose it).

* ``adapt=False``: ``moves`` single-site MH steps per particle (``mh.mh_step``,
  the prior as proposal or a random walk of size ``scale``);
* ``adapt=True``: the adaptive moves of ``population_moves``: a block random walk on the
  continuous choices with the population's covariance (kernel "rw"; resample-move's
  default "prior" means the same), or HMC/MALA on the tempered potential (kernels "hmc",
  "mala", tempering only), plus single-site prior moves on the other choices, repeated
  until the particles decorrelate (or ``moves`` times); the walk's scale or step size is
  carried and adapted from one SMC step to the next.

Use: ``kernel.begin(model, state, randomness)`` takes the population the moves start
from (the adaptive walk computes its coordinates there, a gradient kernel its potential);
then at each SMC step ``kernel(model_at_step, state, randomness, weights=, ancestors=)``
resamples ``state`` by ``ancestors`` (if given) and moves it at the step's target;
``weights`` (the step's incremental weights of ``state``, before resampling) shape the
walk's covariance. ``kernel.acceptance``: per step, the mean acceptance of its moves (the
block walk's or gradient kernel's, else the single-site moves'); ``kernel.extra()``: what
the moves did, for the population's ``extra``.

Invariant: given the population before the step (which sets the adaptive walk's
covariance, scale and step size), each move is an MH kernel that leaves the step's target
(a ``gfi.ModelRun``: tempered by beta or truncated after a checkpoint) invariant for every
particle, so the moves change neither the weights nor the properness of the population.
"""
from __future__ import annotations

import torch

from ..semantics import gfi
from ..semantics.errors import PPLRuntimeError
from ..semantics.gfi import ModelRun, TracedState
from . import population_moves as pm
from . import mh
from .potential import build_potential

#: per algorithm, the kernels of its adaptive moves ("prior" and "rw": the population walk)
ADAPTIVE_KERNELS = {"tempering": ("rw", "hmc", "mala"), "resample_move": ("prior", "rw")}


class MoveKernel:
    """The rejuvenation moves of ``method`` ("tempering" or "resample_move") from its
    options (see the module docstring); ``moves``: the single-site steps per SMC step
    (``adapt=False``), or the fixed number of adaptive moves (None: until decorrelated,
    at most ``max_moves``)."""

    def __init__(self, method: str, *, adapt: bool = False, kernel: str = "prior", moves: int | None = None,
                 scale: float = 0.5, max_moves: int = 100, decorrelation: float = 0.1):
        if adapt and kernel not in ADAPTIVE_KERNELS[method]:
            raise PPLRuntimeError(f"{method} with adapt=True moves by kernel "
                                  f"{' or '.join(repr(k) for k in ADAPTIVE_KERNELS[method])} "
                                  f"(a population random walk{', or HMC/MALA' if method == 'tempering' else ''}), "
                                  f"not '{kernel}'", hint="kernel='rw'")
        self.method, self.adapt, self.kernel, self.moves, self.scale = method, adapt, kernel, moves, scale
        self.max_moves, self.decorrelation = max_moves, decorrelation
        self.gradient = adapt and kernel in pm.GRADIENT_KERNELS
        self.tuning = pm.GradientTuning(kernel) if self.gradient else pm.Tuning()
        self.coords, self.potential = None, None
        self.acceptance: list = []  # per SMC step, the mean acceptance of its moves
        self.reports: list[pm.MoveReport] = []  # per SMC step (adapt=True)

    @property
    def active(self) -> bool:
        """Whether the kernel moves at all (``moves=0`` does not)."""
        return (self.max_moves if self.moves is None else self.moves) > 0 if self.adapt else self.moves > 0

    def begin(self, model: ModelRun, state: TracedState, randomness, *, scored: bool = True) -> TracedState:
        """The population the next moves start from, scored at ``model``'s target
        (``scored=False``: its values only, scored here)."""
        if self.gradient:
            self.potential = build_potential(model.at(beta=1.0), state)
        elif self.adapt:
            state, self.coords = pm.coordinates(model, state, randomness)
            return state
        return state if scored else gfi.generate(model, state)[0]

    def __call__(self, model: ModelRun, state: TracedState, randomness, *, weights: torch.Tensor | None = None,
                 ancestors: torch.Tensor | None = None, label: str = "") -> TracedState:
        """``state`` resampled by ``ancestors`` (None: as it is) and moved at ``model``'s
        target; ``weights``: ``state``'s incremental weights before resampling (the
        adaptive walk's covariance; None: the resampled population's own)."""
        if not self.adapt:
            return self._single_site(model, state if ancestors is None else gfi.reindex(state, ancestors),
                                     randomness)
        flat = self._unconstrained(state)
        covariance = pm.population_covariance(flat, weights) if weights is not None and flat.shape[1] else None
        if ancestors is not None:
            state = gfi.reindex(state, ancestors)
        options = dict(covariance=covariance, moves=self.moves, max_moves=self.max_moves,
                       decorrelation=self.decorrelation, label=label)
        if self.gradient:
            z = flat if ancestors is None else flat[ancestors]
            state, report = pm.gradient_moves(model, state, self.potential, randomness, self.tuning, z=z, **options)
        else:
            coords = self.coords if ancestors is None else self.coords.reindex(ancestors)
            state, self.coords, report = pm.move_population(model, state, coords, randomness, self.tuning, **options)
        self.reports.append(report)
        self.acceptance.append(report.block_acceptance if report.block_acceptance is not None
                               else report.site_acceptance)
        return state

    def _single_site(self, model: ModelRun, state: TracedState, randomness) -> TracedState:
        accepted = 0.0
        for _ in range(self.moves):
            state, acc = mh.mh_step(model.interp, model.entry, model.data, state, model.device, kernel=self.kernel,
                                    scale=self.scale, stop_after=model.stop_after, beta=model.beta,
                                    randomness=randomness)
            accepted += float(acc.double().mean())
        self.acceptance.append(accepted / self.moves if self.moves else None)
        return state

    def _unconstrained(self, state: TracedState) -> torch.Tensor:
        """The population's unconstrained continuous values [C, D] (the block's)."""
        if not self.gradient:
            return self.coords.flat()
        self.potential.set_given({a: state.values[a] for a in self.potential.discrete})
        return self.potential.unconstrain(state.values)

    def extra(self) -> dict:
        """What the moves did, for the population's ``extra``: "moves" (with ``adapt``, per
        step, and "adapt", "kernel", "acceptance", "site_acceptance", "correlation",
        "proposal_scale", "move_warnings"); ``acceptance`` is kept for every kernel."""
        if not self.adapt:
            return {"moves": self.moves}
        reports = self.reports
        return {"moves": [r.moves for r in reports], "adapt": True, "kernel": self.kernel,
                "acceptance": self.acceptance, "site_acceptance": [r.site_acceptance for r in reports],
                "correlation": [r.correlation for r in reports], "proposal_scale": [r.scale for r in reports],
                "move_warnings": pm.unmixed_warning(self.method, reports, self.max_moves)}
