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
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

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

    def freeze(self) -> SiteScales:
        """One fixed scale per site for the kept chain: the median over chains of the
        adapted scales (a chain still far out in a tail at the end of burn-in, with its
        large scale, does not set it). From now on ``update`` refuses."""
        self.frozen = SiteScales(self.initial, {a: math.exp(float(torch.median(ls)))
                                                for a, ls in self.log_scales.items()})
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
