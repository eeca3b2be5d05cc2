"""Adaptive random-walk MH: per-site scales tuned during burn-in, then frozen.

The random-walk kernel of ``inference.mh`` moves one site at a time by
y' = y + s_a * noise in the site's unconstrained space. One scale for every site is
wrong for most models: a posterior sd of 1e-3 next to one of 100 needs scales five
orders of magnitude apart. During burn-in ``ScaleAdaptation`` tunes one scale per site
so that the moves of that site are accepted at the rate that is optimal for a Gaussian
target (Roberts, Gelman & Gilks 1997; Roberts & Rosenthal 2001): 0.44 for a site of one
unconstrained dimension, 0.234 for a vector-valued site (a block move).

The rule is Robbins-Monro on the log scale (Andrieu & Thoms 2008, sec. 5): after each
burn-in step, every chain c that moved site a updates its own scale of that site,

    log s_ac <- log s_ac + gain * t_a^-0.6 * (accepted_c - target_a)     (gain 2)

where t_a counts the steps in which some chain moved a, and accepted_c is the 0/1
outcome (not min(1, alpha): outcomes are the same bits on the traced and the interpreted
kernel, so both adapt to the same scales and give the same chains from one seed).

Per chain during burn-in, pooled at the end. A chain still far out in a tail accepts a
small walk about half the time (> 0.44), so its own scale stays large and it comes in
geometrically; with one pooled scale the chains already in the bulk would shrink it and
leave the stragglers stranded (measured: 2 of 64 chains of the concentrated regression
of the tests stuck 100-300 posterior sds away after 500 burn-in steps). At the end of
burn-in each site's scale is *pooled over chains*: the median of the chains' scales, one
fixed scale per site for every chain (``Chains.extra["scales"]``).

Invariance: adaptation stops at the end of burn-in. The kept draws come from the MH
kernel with the fixed per-site scales reached then: a symmetric walk in unconstrained
space with the Jacobian terms, single-site selection with |x|/|x'| (``mh.single_site_move``),
exactly invariant. (An adaptation that went on during sampling would make the kernel
depend on the chain's own history: ``tests/test_mh_adaptive.py`` shows the exact checker
catching a state-dependent scale.)

Per-site scales cannot cross a posterior whose coordinates are strongly correlated (a
regression on calendar years: a ridge 1/300 as wide as it is long). ``PopulationBlock``
(``mh(..., block=True)``) adds a block walk shaped by the chains' population covariance,
tuned during burn-in and frozen after it (``block_step`` is its kept kernel).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..semantics import gfi
from .chain_pool import pooled_log_scales, refuse_when_shared
from .population_moves import block_move, coordinates, population_covariance, proposal_factor

#: the acceptance rate targeted for a site of one unconstrained dimension
TARGET_SCALAR = 0.44
#: the acceptance rate targeted for a vector-valued site (all its dimensions move together)
TARGET_BLOCK = 0.234
#: adaptation by default needs at least this many burn-in steps (as Stan's warm-up
#: windows): fewer cannot estimate an acceptance rate
MIN_ADAPT_BURN_IN = 20
#: the scale every site starts from (and the fixed scale of ``mh`` without adaptation)
DEFAULT_SCALE = 0.5

_GAIN, _DECAY = 2.0, 0.6          # about 1 / |d acceptance / d log s| at the optimum of a Gaussian
_LOG_MIN, _LOG_MAX = math.log(1e-12), math.log(1e6)


class SiteScales(dict):
    """Address -> random-walk scale, with ``default`` for the sites it does not list
    (a choice that a run reaches for the first time takes it)."""

    def __init__(self, default: float, items=()):
        super().__init__(items)
        self.default = float(default)

    def __missing__(self, addr):
        return self.default


def target_acceptance(dims: int) -> float:
    """The acceptance rate targeted for a site of ``dims`` unconstrained dimensions."""
    return TARGET_SCALAR if dims <= 1 else TARGET_BLOCK


class ScaleAdaptation:
    """Per-site, per-chain scales tuned by Robbins-Monro on the log scale toward each
    site's target acceptance during burn-in (see the module docstring); ``freeze``
    pools them into one scale per site for the kept chain. ``scales`` maps an address
    to its scales, a float64 tensor [C] (a site not seen yet: all ``initial``)."""

    def __init__(self, chains: int, initial: float = DEFAULT_SCALE, device="cpu"):
        self.log_scales: dict = {}    # address -> float64 [C]
        self.updates: dict = {}       # address -> number of steps in which some chain moved it
        self.initial = float(initial)
        self.C, self.device = chains, device
        self.scales = _LogScales(self)
        self.frozen: SiteScales | None = None

    def _log(self, addr: str) -> torch.Tensor:
        if addr not in self.log_scales:
            self.log_scales[addr] = torch.full((self.C,), math.log(self.initial), dtype=torch.float64,
                                               device=self.device)
        return self.log_scales[addr]

    def update(self, selection: dict, accepted: torch.Tensor, walks: dict) -> None:
        """One burn-in step's outcome: ``selection`` address -> bool [C] (the chains that
        moved that site), ``accepted`` bool [C], ``walks`` address -> unconstrained
        dimension of the sites moved by a walk (others, e.g. discrete choices, have no
        scale). Each chain that moved a site moves that site's log scale by
        gain * t^-0.6 * (accepted - target)."""
        if self.frozen is not None:
            raise RuntimeError("the scales are frozen: adapting after burn-in breaks invariance")
        for addr, dims in walks.items():
            moved = selection.get(addr)
            if moved is None or not bool(moved.any()):
                continue
            t = self.updates.get(addr, 0) + 1
            self.updates[addr] = t
            step = _GAIN * t ** -_DECAY * (accepted.double() - target_acceptance(dims))
            log_s = self._log(addr) + torch.where(moved, step, torch.zeros_like(step))
            self.log_scales[addr] = torch.clamp(log_s, _LOG_MIN, _LOG_MAX)

    def reindex(self, ancestors: torch.Tensor) -> None:
        """Chain j takes chain ancestors[j]'s scales (after ``PopulationBlock.replace_outliers``)
        and the adaptation starts a new window (gains from the start again, as Stan
        restarts its step size adaptation per window): the scales learnt while chains
        were far out need not fit the bulk."""
        self.log_scales = {a: ls[ancestors] for a, ls in self.log_scales.items()}
        self.updates = {}

    def freeze(self) -> SiteScales:
        """One fixed scale per site for the kept chain: the median over chains of the
        adapted scales (a chain still far out in a tail at the end of burn-in, with its
        large scale, does not set it). From now on ``update`` refuses. With chains shared by
        ranks (``chain_pool``), the median over every rank's chains."""
        pooled = pooled_log_scales(self.log_scales, self.C, self.initial)
        self.frozen = SiteScales(self.initial, {a: math.exp(float(torch.median(ls))) for a, ls in pooled.items()})
        return self.frozen


class _LogScales(Mapping):
    """The current per-chain scales of a ``ScaleAdaptation``, read as address -> [C]."""

    def __init__(self, adaptation: ScaleAdaptation):
        self.adaptation = adaptation

    def __getitem__(self, addr):
        return torch.exp(self.adaptation._log(addr))

    def __iter__(self):
        return iter(self.adaptation.log_scales)

    def __len__(self):
        return len(self.adaptation.log_scales)


class AcceptanceBySite:
    """Per-site acceptance of the kept steps: accepted moves / moves of each site."""

    def __init__(self):
        self.moves: dict = {}
        self.accepted: dict = {}

    def add(self, selection: dict, accepted: torch.Tensor) -> None:
        for addr, moved in selection.items():
            self.moves[addr] = self.moves.get(addr, 0) + moved.sum()
            self.accepted[addr] = self.accepted.get(addr, 0) + (moved & accepted).sum()

    def rates(self) -> dict:
        """Address -> acceptance rate (sites never moved are left out)."""
        return {a: float(self.accepted[a]) / float(m) for a, m in self.moves.items() if float(m) > 0}


class PopulationBlock:
    """A block random walk on every continuous choice all chains have, shaped by the
    chains' population (``mh(..., block=True)``): y' = y + L eps in unconstrained
    coordinates (``population_moves.block_move``: Jacobian terms, symmetric walk),
    L L^T = lambda (2.38^2 / D) Sigma. During burn-in, at every step, Sigma is the
    covariance of the chains at or above the median log joint (stragglers far out in a
    tail would dominate it) and lambda follows Robbins-Monro on log lambda toward an
    acceptance of 0.234 over those chains; a quarter and half way through burn-in,
    straggling chains restart from good ones (``replace_outliers``). At the end of
    burn-in L is frozen (``freeze``): the kept kernel, the single-site walk and then
    ``block_step`` with that L, both of fixed scales, is exactly invariant. For
    posteriors whose coordinates are strongly correlated (a regression on calendar
    years: correlation -0.999995), which single-site moves cannot cross."""

    def __init__(self, model):
        refuse_when_shared("mh's block=True", "leave block out (the per-site scales are pooled over every "
                                              "rank's chains), or run in one process")
        self.model = model
        self.log_lambda = 0.0
        self.updates = 0
        self.factor = None      # L, frozen at the end of burn-in
        self.block = None       # the addresses L is for
        self.moves = 0
        self.accepted = 0

    def move(self, state, randomness, adapting: bool):
        """One block move of every chain: during burn-in with L from the population (and
        lambda updated), after it ``block_step`` with the frozen L."""
        if not adapting:
            state, accepted, moved = block_step(self.model, state, self.factor, self.block, randomness)
            self.moves += int(moved.sum())
            self.accepted += int((accepted & moved).sum())
            return state
        state, coords, elite = self._population(state)
        D = coords.flat().shape[1]
        if D == 0:
            return state
        factor = walk_factor(population_covariance(coords.flat()[elite]), self._scale(D))
        state, _, accepted = block_move(self.model, state, coords, factor, randomness)
        self.updates += 1
        rate = float((accepted & elite).sum()) / max(1, int(elite.sum()))
        self.log_lambda += _GAIN * self.updates ** -_DECAY * (rate - TARGET_BLOCK)
        self.log_lambda = min(max(self.log_lambda, _LOG_MIN), _LOG_MAX)
        return state

    def _population(self, state):
        """(state, its block coordinates, the chains at or above the median log joint)."""
        state, coords = coordinates(self.model, state)
        elite = coords.ok & (state.log_joint >= torch.median(state.log_joint))
        return state, coords, elite

    def _scale(self, D: int) -> float:
        return math.exp(self.log_lambda / 2) * 2.38 / math.sqrt(D)

    def replace_outliers(self, state, randomness):
        """Burn-in only: a chain whose log joint is more than 25 + 5 D below the chains'
        median (a straggler far out in a tail, where walks sized for the bulk cannot
        bring it in; a chain in the bulk of a D-dimensional Gaussian posterior is that far
        below the median with probability ~e^-25) restarts from a chain drawn uniformly
        among those at or above the median (the outlier-chain rule of DREAM, Vrugt et al.
        2009). Returns (state, ancestors)."""
        lj = state.log_joint.double()
        C = lj.shape[0]
        D = sum(math.prod(v.shape[1:]) for v in state.values.values() if v.is_floating_point())
        median = torch.median(lj)
        good = torch.nonzero(lj >= median).flatten()
        outlier = ~(lj >= median - (25.0 + 5.0 * D))
        u = randomness.uniform((C,), lj.device)
        pick = good[torch.clamp_max((u * good.shape[0]).long(), good.shape[0] - 1)]
        ancestors = torch.where(outlier, pick, torch.arange(C, device=lj.device))
        self.updates = 0  # a new window for lambda too
        return gfi.reindex(state, ancestors), ancestors

    def freeze(self, state) -> None:
        """Fix L from the population at the end of burn-in."""
        state, coords, elite = self._population(state)
        self.block = coords.block
        D = coords.flat().shape[1]
        if D:
            self.factor = walk_factor(population_covariance(coords.flat()[elite]), self._scale(D))

    def acceptance(self) -> float | None:
        """The block walk's acceptance over the kept steps."""
        return self.accepted / self.moves if self.moves else None


def block_step(model, state, factor, block: tuple, randomness):
    """The kept block kernel: every chain whose block coordinates are ``block`` moves by
    y' = y + factor eps (a fixed factor: an exact MH kernel of the model's target):
    (state, accepted [C], moved [C])."""
    state, coords = coordinates(model, state)
    if factor is None or coords.block != block:
        none = torch.zeros_like(coords.ok)
        return state, none, none
    state, _, accepted = block_move(model, state, coords, factor, randomness)
    return state, accepted, coords.ok


def walk_factor(cov: torch.Tensor, scale: float) -> torch.Tensor:
    """``population_moves.proposal_factor`` with a tiny ridge (1e-14) and floor (1e-24) on
    purpose: chains spread far along a ridge of correlation 1 - 1e-12 (a calendar-year
    regression during burn-in) must keep its direction, or every block proposal steps
    off it."""
    return proposal_factor(cov, scale, ridge=1e-14, floor=1e-24)
