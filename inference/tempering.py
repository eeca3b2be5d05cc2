"""Tempered SMC: an SMC sampler for static models (a Feynman-Kac reweighting).

The program's measure prior(x) * L(x) (L: the product of every observe/factor/condition)
is reached through the path of intermediate targets

    gamma_beta(x) = prior(x) * L(x)^beta,     0 = beta_0 < beta_1 < ... < beta_K = 1,

(hard ``condition``s are kept at every beta), as a composition of the trace interface
(``semantics.gfi``): ``simulate`` at beta = 0; then per step choose the next beta (by
bisection, so that the ESS of the incremental weights L(x)^(beta' - beta) is
``target_ess`` * N, or from a fixed ``schedule``), ``update`` the population to beta' (its
log weight change *is* the incremental weight), resample it, and move it at beta' with
the rejuvenation kernel (``rejuvenation.MoveKernel``: ``moves`` single-site MH steps, or
with ``adapt=True`` the population's adaptive moves), which leaves gamma_beta' invariant.
Default moves: max(2, S) for S choices (the prior draws' mean trace size), so every choice
is updated about once per temperature (a fixed 2 left a 42-choice mixture with ~55
distinct particles of 500 and a posterior 0.8 sd off).

Invariant: the final target is the program's posterior, unchanged by the tempering; the
population weighted by the product over steps of the mean incremental weight is proper
for the program's measure, and that product is an unbiased estimate of the evidence Z for
a fixed schedule (the adaptive one is the standard, slightly biased but consistent
choice; testing/validity.py's ``tempering_algorithm`` checks the fixed one exactly). The
moves let particles cross between modes that likelihood weighting would leave unbalanced.
"""
from __future__ import annotations

import math

import torch

from ..semantics import gfi
from ..semantics.enumerate_sites import Enumerating
from ..semantics.errors import PPLRuntimeError, ZeroEvidenceError
from ..semantics.gfi import ModelRun
from ..stdlib.progress import progress_bar
from . import rejuvenation
from .importance import impossible_site, rng_state
from .population import Population
from .randomness import TorchRandomness
from .rejuvenation import MoveKernel
from .resampling import ess, is_weighted, log_mean_exp


def _ess_fraction(log_w: torch.Tensor) -> float:
    m = log_w.max()
    if not torch.isfinite(m):
        return 0.0
    w = torch.exp(log_w - m)
    return float(w.sum() ** 2 / (w * w).sum()) / log_w.shape[0]


def next_beta(beta: float, log_lik: torch.Tensor, target: float, tol: float = 1e-6) -> float:
    """The largest beta' in (beta, 1] whose incremental weights keep ESS >= target * N."""
    if _ess_fraction((1.0 - beta) * log_lik) >= target:
        return 1.0
    lo, hi = beta, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if _ess_fraction((mid - beta) * log_lik) >= target:
            lo = mid
        else:
            hi = mid
    return max(lo, beta + tol)


def default_moves(sites: float) -> int:
    """MH moves per temperature for a model with ``sites`` choices: max(2, sites)."""
    return max(2, int(math.ceil(sites)))


def tempered_smc(interp, entry: str, data: dict, particles: int, device="cpu", *, target_ess: float = 0.5,
                 moves: int | None = None, kernel: str = "rw", scale: float = 0.5, resampling: str = "systematic",
                 max_steps: int = 1000, schedule: list | None = None, randomness=None,
                 progress: bool | None = None, adapt: bool = False, max_moves: int = 100,
                 decorrelation: float = 0.1) -> Population:
    """The final population, each particle weighted by the log-evidence estimate (it
    unpacks to (final MH state, log-evidence estimate, schedule)); ``extra``: "schedule",
    "moves" (the number used), "ess_history" (per step, the ESS of the incremental
    weights, before resampling).

    ``moves``: MH steps per temperature; None: ``default_moves`` of the prior draws' mean
    number of choices.

    ``schedule``: fixed betas 0 < b_1 < ... < b_K = 1 instead of the adaptive choice (with
    a fixed schedule the evidence estimate is exactly unbiased, and the population is a
    proper weighting: testing/validity.py's ``tempering_algorithm`` checks it exactly).
    ``randomness`` (default: torch) serves the prior draws, the resampling and the moves.
    ``progress`` (``stdlib.progress``): a bar over beta in [0, 1], with the current beta
    and the number of steps so far.

    ``adapt=True``: the moves are ``inference.population_moves``' (``rejuvenation.MoveKernel``):
    a block random walk on the continuous choices with the covariance of the population
    (weighted by the step's incremental weights, before resampling) and a scale adapted
    from step to step, plus single-site prior moves on the other choices, repeated until
    the particles have decorrelated from the step's start (correlation below
    ``decorrelation``) or ``max_moves`` (a warning); a given ``moves`` fixes the count.
    ``extra`` then also has "moves" as the list of moves per step, "acceptance" (the block
    walk's, per step; the single-site moves' where there is no block), "site_acceptance",
    "correlation" and "proposal_scale" per step. ``kernel="hmc"`` or ``"mala"`` with
    ``adapt=True``: the continuous choices move by HMC (10 leapfrog steps) or MALA
    (``inference.hmc``) on the tempered potential (``inference.potential``), the
    population's covariance as inverse mass matrix, the step size adapted from step to
    step (programs whose continuous choices are the same in every run)."""
    schedule = _checked(target_ess, schedule)
    if is_weighted(resampling):  # the tempered population carries no weights to put them in
        raise PPLRuntimeError(f"tempering needs an unweighted resampling scheme ('{resampling}' returns weights)",
                              hint="use smc or resample_move with it")
    fixed = iter(schedule) if schedule is not None else None
    randomness = randomness or TorchRandomness()
    interp, recovering = _moves_interpreter(interp)
    model = ModelRun(interp, entry, data, device)
    state = _prior_draws(model, particles, randomness)
    if moves is None and not adapt:
        moves = default_moves(float(state.sizes.mean()) if particles > 0 else 0.0)
    move = MoveKernel("tempering", adapt=adapt, kernel=kernel, moves=moves, scale=scale, max_moves=max_moves,
                      decorrelation=decorrelation)
    state = move.begin(model.at(beta=0.0), state, randomness)
    log_z, schedule, ess_history = 0.0, [0.0], []
    with progress_bar(progress, desc="tempering", total=1.0, bar_format=_BAR_FORMAT) as bar:
        for _ in range(max_steps):
            beta = state.beta
            if beta >= 1.0:
                break
            b = next(fixed) if fixed is not None else next_beta(beta, state.log_lik, target_ess)
            state, inc = gfi.update(model.at(beta=b), state)  # the incremental weights L^(b - beta)
            step_z = log_mean_exp(inc)
            if step_z == -math.inf:  # only possible with a fixed schedule: every weight is zero
                raise ZeroEvidenceError("tempering: every particle has zero weight")
            log_z += step_z
            ess_history.append(ess(inc))
            ancestors = randomness.resample(inc, resampling, particles)
            bar.set_postfix_str(f"beta={b:.4g}, step {len(schedule)}", refresh=False)
            bar.update(b - beta)
            schedule.append(b)  # resampled, then moved at the new target
            state = move(model.at(beta=b), state, randomness, weights=inc, ancestors=ancestors,
                         label=f"tempering (step {len(schedule) - 1}, beta={b:.3g})")
        else:
            raise PPLRuntimeError(f"tempering did not reach beta = 1 in {max_steps} steps")
    if recovering is not None:  # the summed-out choices drawn back at beta = 1 (the weights are unchanged)
        state, _ = gfi.generate(ModelRun(recovering, entry, data, device), state, randomness)
    extra = {"schedule": schedule, "moves": moves, "ess_history": ess_history}
    extra.update(move.extra())
    return _population(state, particles, log_z, schedule, extra)


def _moves_interpreter(interp):
    """(the interpreter the path of targets and the moves run, the one that draws the
    summed-out choices back or None). With choices summed out (``Enumerating``), the
    targets are prior * (marginal likelihood)^beta on the remaining choices: the moves'
    re-executions must not draw the summed-out choices back (a drawn-back z in the trace
    would be held fixed while the other choices move: the sampled model's moves again),
    so they run without recovery, and the final population draws them once at the end."""
    if isinstance(interp, Enumerating) and interp.recover:
        return interp.without_recovery(), interp
    return interp, None


def _population(state: gfi.TracedState, particles: int, log_z: float, schedule: list, extra: dict) -> Population:
    """The final population, each particle weighted by the evidence estimate."""
    sites = {"return": (state.ret, None)}
    for a, v in state.values.items():
        sites[a] = (v, None if bool(state.present[a].all()) else state.present[a])
    return Population("tempering", sites, torch.full((particles,), float(log_z), dtype=torch.float64), extra,
                      legacy=(state, log_z, schedule))


#: the kernels of the adaptive moves' block (``adapt=True``): the population walk, HMC or MALA
ADAPTIVE_KERNELS = rejuvenation.ADAPTIVE_KERNELS["tempering"]


def _checked(target_ess: float, schedule: list | None) -> list | None:
    """The schedule as floats; an error for a target ESS outside (0, 1) or a schedule
    that does not increase strictly from above 0 to exactly 1."""
    if not 0.0 < target_ess < 1.0:
        raise PPLRuntimeError("target_ess must be in (0, 1)")
    if schedule is None:
        return None
    schedule = [float(b) for b in schedule]
    if not schedule or schedule[-1] != 1.0 or any(not 0.0 < b <= 1.0 for b in schedule) or \
            any(b2 <= b1 for b1, b2 in zip(schedule, schedule[1:])):
        raise PPLRuntimeError("a tempering schedule must increase strictly from above 0 to exactly 1",
                              hint="e.g. schedule=[0.1, 0.3, 1.0]")
    return schedule


def _prior_draws(model: ModelRun, particles: int, randomness) -> gfi.TracedState:
    """The population at beta = 0 (no redrawing: particles of zero likelihood get weight 0
    at the first step); an error naming the site when every draw has zero likelihood."""
    before = rng_state(model.device)
    state = gfi.simulate(model.at(beta=0.0), particles, randomness)
    if not bool(torch.isfinite(state.log_lik).any()):  # where? replay these draws (or, failing that, draw more)
        args = (model.interp, model.entry, model.data)
        site = impossible_site(*args, particles, model.device, before) or \
            impossible_site(*args, max(particles, 100), model.device)
        raise ZeroEvidenceError("tempering: every prior draw has zero likelihood"
                                + (f" ({site.message})" if site is not None else ""),
                                site.span if site is not None else None,
                                "the data or conditions may be impossible under the prior")
    return state


#: tempering's bar: the fraction of the way to beta = 1, then "beta=..., step k"
_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]"
