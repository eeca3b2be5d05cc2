"""MH moves adapted to a particle population: what tempered SMC and resample-move use to
rejuvenate their particles when ``adapt=True``.

One *move* of the population is the composition of two MH kernels, each leaving the
current target (a ``gfi.ModelRun``: tempered by ``beta`` or truncated after a checkpoint)
invariant for every particle on its own:

* a **block random walk** on the *block*: the continuous choices that every particle has
  at the start of the SMC step (a floating value with a bijection from the real line onto
  its support, ``gfi.support_bijection``). Each particle's block is mapped to unconstrained
  coordinates y (site by site, y_k = T_k^-1(x_k) with T_k from the particle's own values of
  the earlier choices), moved by y' = y + L eps (eps standard normal), mapped back and the
  program re-run (choices outside the block reused, choices it reaches for the first time
  drawn from their prior). L L^T = s^2 Sigma, Sigma the weighted covariance of the
  population's y, s = 2.38 / sqrt(D) to begin with and then adapted from step to step
  towards an acceptance of 0.234 (as PyMC's and BlackJAX's SMC samplers do). The
  acceptance ratio is

      pi(x') |dT/dy|(y') q(fresh of x) / (pi(x) |dT/dy|(y) q(fresh of x'))

  (the walk is symmetric in y); a particle whose new trace lacks a block choice, or whose
  trace lacked one at the start, stays where it is.
* a **single-site move** on the other choices (discrete ones, and continuous ones only
  some particles have): one of them, chosen uniformly, regenerated from its prior
  (``mh.single_site_move``'s kernel with the site chosen among the non-block sites; the
  Hastings factor counts those).

**Invariant.** L and s are fixed for the whole step: they depend on the population
*before* the step's moves (and on earlier steps), never on the moves' outcomes, so given
them every move is an exact MH kernel of the current target and the moves change neither
the weights nor the target of the SMC population. (Each particle's own value enters the
covariance with weight ~1/N: the usual O(1/N) approximation of adaptive SMC samplers,
consistent as N grows; with an exact check on a finite program -- no block -- the kernel
is exact.) The number of moves is
chosen by the population (stop once every coordinate's correlation between the start of
the step and now is below ``decorrelation`` and 90% of the particles have accepted a
move, or at ``max_moves`` with a warning): the usual,
consistent heuristic of adaptive SMC samplers (PyMC's correlation rule); a fixed
``moves`` keeps the count fixed.

A proposal at which the program raises (a likelihood whose parameters are invalid there,
e.g. a covariance that is not positive definite) is rejected like one outside the support;
the particles concerned are found by bisection.

``gradient_moves`` replaces the block walk by HMC or MALA (``inference.hmc``) on the
tempered potential of the continuous choices (``inference.potential``), with the
population's covariance as inverse mass matrix and a step size adapted from step to step
(the same invariant: the metric and step size are fixed within a step).

Every random number comes from the ``randomness`` object (``normal``, ``choose``,
``accept``, ``sample``, ``uniform``), as in ``semantics.gfi``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..semantics.gfi import ModelRun, ReExecution, TracedState, metropolis, select, stale_lp, support_bijection
from ..semantics.errors import PPLRuntimeError
from ..semantics.sampling import Suspended, column, drive
from ..semantics.values import Batched, Particles, rows

#: the acceptance rate the block walk's scale is adapted towards (Roberts, Gelman & Gilks 1997)
TARGET_ACCEPTANCE = 0.234

#: the moves go on until at least this fraction of the particles has accepted a move
#: (what decides when the population started without spread, so that no correlation
#: with the start can be measured)
MOVED_FRACTION = 0.9


# --------------------------------------------------------------- unconstrained coordinates
@dataclass
class Coordinates:
    """Per block choice, each particle's unconstrained coordinates y [C, *shape] (float64)
    and log |dT/dy| at y [C] (T from that particle's own earlier choices); ``ok`` [C]: the
    particle has every block choice (only those move in the block walk)."""
    y: dict
    logj: dict
    ok: torch.Tensor

    @property
    def block(self) -> tuple:
        return tuple(self.y)

    def flat(self) -> torch.Tensor:
        """All block coordinates side by side: [C, D] float64."""
        C = self.ok.shape[0]
        if not self.y:
            return torch.zeros(C, 0, dtype=torch.float64, device=self.ok.device)
        return torch.cat([v.reshape(C, -1) for v in self.y.values()], 1)

    def split(self, flat: torch.Tensor) -> dict:
        """A [C, D] matrix cut back into the block's coordinate shapes."""
        out, start = {}, 0
        for a, v in self.y.items():
            d = int(math.prod(v.shape[1:]))
            out[a] = flat[:, start:start + d].reshape(flat.shape[0], *v.shape[1:])
            start += d
        return out

    def choose(self, mask: torch.Tensor, other: "Coordinates") -> "Coordinates":
        """Per particle, these coordinates where ``mask`` holds, else ``other``'s (on
        ``other``'s block; an address these lack keeps ``other``'s values)."""
        def pick(mine, theirs):
            if mine is None:
                return theirs
            return torch.where(mask.reshape(-1, *([1] * (theirs.dim() - 1))), mine, theirs)
        return Coordinates({a: pick(self.y.get(a), v) for a, v in other.y.items()},
                           {a: pick(self.logj.get(a), v) for a, v in other.logj.items()},
                           torch.where(mask, self.ok, other.ok))

    def reindex(self, ancestors: torch.Tensor) -> "Coordinates":
        return Coordinates({a: v[ancestors] for a, v in self.y.items()},
                           {a: v[ancestors] for a, v in self.logj.items()}, self.ok[ancestors])


class _CoordinateRun(ReExecution):
    """``gfi``'s re-execution that also records the unconstrained coordinates of the
    block choices and, with ``walk`` set, proposes the block by the walk y' = y + delta
    (``walk``: (moving [C], the old ``Coordinates``, delta per block address))."""

    def __init__(self, *args, block: tuple = (), walk=None, tolerant: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.block = frozenset(block)
        self.walk = walk
        self.y: dict = {}
        self.logj: dict = {}
        self.seen: dict = {}
        self.unmapped: set = set()   # block candidates without a bijection (not continuous)
        self.broken = torch.zeros(self.C, dtype=torch.bool, device=self.log_lik.device)
        # the particles that propose something in this run (their errors reject the proposal)
        self.proposing_rows = walk[0] if walk is not None else torch.zeros_like(self.broken)
        for m in (self.chosen or {}).values():
            self.proposing_rows = self.proposing_rows | m
        if tolerant:  # every particle's values are proposed ones (``gradient_moves``)
            self.proposing_rows = torch.ones_like(self.broken)
        self.proposing = bool(self.proposing_rows.any())

    def log_prob(self, dist, value, ctx, site=None):
        """The likelihood's log density; where it raises (an invalid parameter, e.g. a
        covariance that is not positive definite) at some proposed particles, those score
        -inf (the proposal is rejected, as a proposal outside the support is), found by
        bisection. An error at a particle that proposes nothing is the model's: raised."""
        try:
            return super().log_prob(dist, value, ctx, site)
        except PPLRuntimeError:
            if not self.proposing:
                raise
        lp = torch.full((ctx.M,), -math.inf, dtype=torch.float64, device=ctx.device)
        self._score_rows(dist, value, ctx, torch.arange(ctx.M, device=ctx.device), lp)
        return lp

    def _score_rows(self, dist, value, ctx, pos: torch.Tensor, lp: torch.Tensor) -> None:
        sub = ctx.subset(torch.zeros(ctx.M, dtype=torch.bool, device=ctx.device).index_fill_(0, pos, True))
        try:
            lp[pos] = torch.as_tensor(dist.log_prob(value, sub)).to(torch.float64).expand(pos.shape[0])
        except PPLRuntimeError:
            if pos.shape[0] > 1:
                half = pos.shape[0] // 2
                self._score_rows(dist, value, ctx, pos[:half], lp)
                self._score_rows(dist, value, ctx, pos[half:], lp)
            elif not bool(self.proposing_rows[ctx.idx[pos]].all()):
                raise

    def sample(self, eff):
        out = super().sample(eff)
        if eff.addr in self.block:
            self._coordinates(eff, out)
        return out

    def _coordinates(self, eff, out):
        """Record y = T^-1(x) and log |dT/dy| at this block choice for the particles of
        non-zero weight (T from their own distribution here); the others are marked
        ``broken`` (their move is rejected anyway). A choice with no bijection onto its
        support is ``unmapped`` (not continuous: out of the block)."""
        ctx, addr = eff.ctx, eff.addr
        live = self.live(ctx)
        if live is None:
            self.broken[ctx.idx] = True
            return
        x = rows(out, ctx).double()
        if live is not ctx:
            self.broken[ctx.idx] = True  # the live ones are cleared below
            x = x[ctx.positions(live.idx)]
        T = support_bijection(eff.dist, live)
        if T is None:
            if live is ctx:
                self.unmapped.add(addr)
            return
        y = T.inv(x)
        logj = _logdet(T, y, x)
        if addr not in self.y:
            self.y[addr] = torch.zeros((self.C, *y.shape[1:]), dtype=torch.float64, device=y.device)
            self.logj[addr] = torch.zeros(self.C, dtype=torch.float64, device=y.device)
            self.seen[addr] = torch.zeros(self.C, dtype=torch.bool, device=y.device)
        if tuple(y.shape[1:]) != tuple(self.y[addr].shape[1:]):
            self.unmapped.add(addr)
            return
        self.y[addr][live.idx] = y
        self.logj[addr][live.idx] = logj
        self.seen[addr][live.idx] = True
        if live is not ctx:
            self.broken[live.idx] = False

    def _propose(self, dist, ctx, eff):
        addr = eff.addr
        if self.walk is None or addr not in self.block or addr not in self.old.values:
            return super()._propose(dist, ctx, eff)
        moving, old_coords, delta = self.walk
        idx = ctx.idx
        has = self.old.present[addr][idx]
        moving = moving[idx] & has
        old_rows = self.old.values[addr][idx]
        new_rows = self._draw(dist, ctx, eff) if bool((~has).any()) else old_rows
        T = support_bijection(dist, ctx)
        if T is None and self.live(ctx) is not ctx:  # invalid parameters of dead particles: the live ones walk
            raise PPLRuntimeError(f"no bijection onto the support of '{addr}' for every particle", eff.span)
        zero = torch.zeros(ctx.M, dtype=torch.float64, device=idx.device)
        y2 = old_coords.y[addr][idx] + delta[addr][idx]
        try:
            x2 = T(y2)
            logj2 = _logdet(T, y2, x2)
            if tuple(x2.shape) != tuple(old_rows.shape):
                raise ValueError("shape")
        except (TypeError, ValueError, RuntimeError):  # another kind of choice here now: no walk
            self.broken[idx[moving]] = True
            x2, logj2, moving = old_rows, zero, moving & False
        value = torch.where(_bcast(moving, old_rows), x2.to(old_rows.dtype),
                            torch.where(_bcast(has, old_rows), old_rows, new_rows.to(old_rows.dtype)))
        lp = dist.log_prob(Batched(value, idx), ctx)
        lp = (lp.expand(ctx.M) if lp.dim() == 0 else lp).double()
        fresh = torch.where(~has, lp, zero)
        fwd = torch.where(moving, -logj2, zero)
        rev = torch.where(moving, -old_coords.logj[addr][idx], zero)
        return value, lp, fresh, fwd, rev

    def coordinates(self, block: tuple) -> Coordinates:
        """The recorded coordinates of ``block`` (a particle lacking one is not ``ok``)."""
        ok = ~self.broken
        y, logj = {}, {}
        for a in block:
            if a not in self.seen:  # no particle recorded it in this run
                ok = ok & False
                continue
            ok = ok & self.seen[a]
            y[a], logj[a] = self.y[a], self.logj[a]
        return Coordinates(y, logj, ok)


def _logdet(T, y, x) -> torch.Tensor:
    """log |dT/dy| per row, summed over the value's elements."""
    j = T.log_abs_det_jacobian(y, x)
    if j.dim() == 0:
        return j.expand(y.shape[0]).double()
    return (j.reshape(j.shape[0], -1).sum(1) if j.dim() > 1 else j).double()


def _bcast(mask, like):
    return mask.reshape(mask.shape + (1,) * (like.dim() - 1))


def _execute(model: ModelRun, state: TracedState, randomness, *, block: tuple, selection=None, walk=None,
             tolerant: bool = False) -> _CoordinateRun:
    """One run of the program for every particle, reusing ``state`` (as ``gfi``'s own
    re-execution does), recording the block's coordinates."""
    C = state.chains
    ctx = Particles.all(C, model.device)
    h = _CoordinateRun(C, model.device, state, selection or {}, randomness, "prior", 0.5, model.stop_after,
                       model.beta, None, block=block, walk=walk, tolerant=tolerant)
    try:
        h.ret = column(drive(model.interp.run(model.entry, model.data, ctx), h), ctx)
    except Suspended:  # the end of the truncated program (resample-move's target)
        h.ret = torch.zeros(C)
    return h


def block_candidates(state: TracedState) -> tuple:
    """The choices every particle has with a floating value: the block, unless one has no
    bijection onto its support (``coordinates`` drops those)."""
    return tuple(a for a, v in state.values.items()
                 if v.is_floating_point() and bool(state.present[a].all()))


def coordinates(model: ModelRun, state: TracedState, randomness=None, pool=None) -> tuple[TracedState, Coordinates]:
    """The population re-run unchanged, with its block's coordinates: (state, coordinates).
    ``pool`` (``ONE_PROCESS``: this process's particles are the population): where the
    population is shared with other processes, the block they all agree on."""
    pool = pool or ONE_PROCESS
    h = _execute(model, state, randomness, block=pool.block(block_candidates(state)))
    block = pool.block(tuple(a for a in h.y if a not in h.unmapped and bool(h.seen[a].all())))
    return h.state(), h.coordinates(block)


# ------------------------------------------------------------------ the proposal
@dataclass
class Tuning:
    """The block walk's scale, s = ``factor`` x 2.38 / sqrt(D) (times the population's
    covariance), carried from one SMC step to the next (D may change between steps) and
    adapted towards ``TARGET_ACCEPTANCE``."""
    factor: float = 1.0

    def scale(self, D: int) -> float:
        return self.factor * 2.38 / math.sqrt(max(D, 1))

    def adapt(self, acceptance: float) -> None:
        """factor <- factor exp(acceptance - 0.234), kept within [0.01, 3]."""
        self.factor = min(3.0, max(0.01, self.factor * math.exp(acceptance - TARGET_ACCEPTANCE)))


def population_covariance(flat: torch.Tensor, log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted covariance [D, D] of the rows of ``flat`` (rows of weight zero or with
    non-finite coordinates left out)."""
    C = flat.shape[0]
    lw = torch.zeros(C, dtype=torch.float64, device=flat.device) if log_weights is None else log_weights.double()
    good = torch.isfinite(flat).all(1) & torch.isfinite(lw)
    if not bool(good.any()):
        return torch.eye(flat.shape[1], dtype=torch.float64, device=flat.device)
    x, lw = flat[good], lw[good]
    w = torch.exp(lw - lw.max())
    w = w / w.sum()
    mean = (w[:, None] * x).sum(0)
    dx = x - mean
    return (w[:, None] * dx).T @ dx


def proposal_factor(cov: torch.Tensor, scale: float, *, ridge: float = 1e-9, floor: float = 1e-12) -> torch.Tensor:
    """L with L L^T = scale^2 S (R + ridge I) S, where cov = S R S (S the sds, R the
    correlations): a ridge relative to each coordinate's own variance, so that a
    correlation of -0.99999 between coordinates of very different scales survives it;
    a coordinate of variance zero gets ``floor`` times the largest variance, and a
    failing Cholesky falls back to the diagonal."""
    D = cov.shape[0]
    var = torch.diagonal(cov).clone()
    top = float(var.max()) if D else 0.0
    least = max(floor * top, 1e-300) if math.isfinite(top) and top > 0 else 1.0
    sd = torch.sqrt(torch.clamp(var, min=least))
    corr = cov / (sd[:, None] * sd[None, :])
    corr = torch.where(torch.isfinite(corr), corr, torch.zeros_like(corr))
    corr = corr.clamp(-1.0, 1.0)
    corr.fill_diagonal_(1.0)
    try:
        chol = torch.linalg.cholesky(corr + ridge * torch.eye(D, dtype=cov.dtype, device=cov.device))
    except RuntimeError:
        chol = torch.eye(D, dtype=cov.dtype, device=cov.device)
    return scale * sd[:, None] * chol


# ------------------------------------------------------------------ the two kernels
def block_move(model: ModelRun, state: TracedState, coords: Coordinates, factor: torch.Tensor, randomness):
    """One block random walk y' = y + factor eps on every particle that has the whole
    block: (state, coordinates, accepted [C])."""
    C = state.chains
    eps = randomness.normal((C, factor.shape[0]), state.log_joint.device)
    delta = coords.split(eps @ factor.T)
    h = _execute(model, state, randomness, block=coords.block, walk=(coords.ok, coords, delta))
    new = h.state()
    new_coords = h.coordinates(coords.block)
    log_alpha = new.log_joint - state.log_joint + h.rev_q - h.fwd_q + stale_lp(state, new) - h.fresh_lp
    log_alpha = torch.where(coords.ok & new_coords.ok, log_alpha, torch.full_like(log_alpha, -math.inf))
    state2, accepted = metropolis(state, new, log_alpha, randomness)
    return state2, new_coords.choose(accepted, coords), accepted


def other_sites(state: TracedState, block: tuple) -> torch.Tensor:
    """Per particle, the number of its choices outside the block."""
    n = torch.zeros_like(state.log_joint)
    for a, m in state.present.items():
        if a not in block:
            n = n + m.to(n.dtype)
    return n


def site_move(model: ModelRun, state: TracedState, coords: Coordinates, randomness):
    """One single-site MH step on the choices outside the block (a site chosen uniformly
    among the particle's own, regenerated from its prior): (state, coordinates, accepted).
    A particle with no such choice stays."""
    block = coords.block
    sizes = other_sites(state, block)
    pick = randomness.choose(sizes)
    selection, rank = {}, torch.zeros_like(pick)
    for a, m in state.present.items():
        if a in block:
            continue
        selection[a] = m & (rank == pick)
        rank = rank + m.long()
    h = _execute(model, state, randomness, block=block, selection=selection)
    new = h.state()
    log_alpha = new.log_joint - state.log_joint + h.rev_q - h.fwd_q + stale_lp(state, new) - h.fresh_lp \
        + torch.log(sizes.double()) - torch.log(other_sites(new, block).double())
    log_alpha = torch.where(sizes > 0, log_alpha, torch.full_like(log_alpha, -math.inf))
    state2, accepted = metropolis(state, new, log_alpha, randomness)
    return state2, h.coordinates(block).choose(accepted, coords), accepted


# ------------------------------------------------------------- the stopping rule
def features(state: TracedState, coords: Coordinates) -> torch.Tensor:
    """What the stopping rule watches: the block's coordinates and the numeric values of
    the other choices every particle has, [C, F] float64."""
    cols = [coords.flat()]
    for a, v in state.values.items():
        if a not in coords.y and bool(state.present[a].all()):
            cols.append(v.reshape(v.shape[0], -1).double())
    return torch.cat(cols, 1) if cols else torch.zeros(state.chains, 0, dtype=torch.float64)


def max_correlation(start: torch.Tensor, now: torch.Tensor) -> float:
    """The largest correlation over the particles, coordinate by coordinate, between the
    start of the moves and now (coordinates that do not vary in both are left out; 0.0
    when none varies)."""
    good = torch.isfinite(start).all(1) & torch.isfinite(now).all(1)
    a, b = start[good], now[good]
    if a.shape[0] < 3 or a.shape[1] == 0:
        return 0.0
    a = a - a.mean(0)
    b = b - b.mean(0)
    sa, sb = a.pow(2).sum(0).sqrt(), b.pow(2).sum(0).sqrt()
    tiny = 1e-12 * torch.maximum(a.abs().amax(0), b.abs().amax(0)).clamp(min=1e-300)
    varies = (sa > tiny * math.sqrt(a.shape[0])) & (sb > tiny * math.sqrt(a.shape[0]))
    if not bool(varies.any()):
        return 0.0
    r = (a * b).sum(0)[varies] / (sa[varies] * sb[varies])
    return float(r.max())


def noise_floor(particles: int, dims: int) -> float:
    """The correlation that N independent pairs reach by chance in the largest of F
    coordinates (about (1.5 + sqrt(2 log F)) / sqrt(N)): the stopping threshold is never
    set below it."""
    return (1.5 + math.sqrt(2 * math.log(max(dims, 1)))) / math.sqrt(max(particles, 1))


class _OneProcess:
    """The population is this process's particles: the statistics the moves pool over
    the population, computed here (a distributed run passes its own pool, with the same
    methods over every rank's particles: ``inference.distributed``)."""

    def particles(self, n: int) -> int:
        return n

    def mean(self, x: torch.Tensor) -> float:
        return float(x.double().mean())

    def any(self, flag: bool) -> bool:
        return flag

    def block(self, addresses: tuple) -> tuple:
        return addresses

    def max_correlation(self, start: torch.Tensor, now: torch.Tensor) -> float:
        return max_correlation(start, now)

    def covariance(self, flat: torch.Tensor, log_weights: torch.Tensor | None) -> torch.Tensor:
        return population_covariance(flat, log_weights)


ONE_PROCESS = _OneProcess()


class _Stopping:
    """The stopping rule of one step's moves (see the module docstring): from the
    features at the start, the particles that have accepted a move (``moved_by``), the
    correlation with the start now (``decorrelated``), and the warning when ``max_moves``
    did not suffice."""

    def __init__(self, start: torch.Tensor, decorrelation: float, moves: int | None, max_moves: int,
                 pool=None):
        self.pool = pool = pool or ONE_PROCESS
        self.start, self.fixed, self.r = start, moves is not None, 1.0
        self.floor = max(decorrelation, noise_floor(pool.particles(start.shape[0]), start.shape[1]))
        self.limit = max_moves if moves is None else moves
        self.moved = torch.zeros(start.shape[0], dtype=torch.bool, device=start.device)

    def moved_by(self, accepted: torch.Tensor) -> float:
        """Record a move's accepted mask; its mean acceptance."""
        self.moved = self.moved | accepted
        return self.pool.mean(accepted)

    def decorrelated(self, now: torch.Tensor) -> bool:
        self.r = self.pool.max_correlation(self.start, now)
        return self.r < self.floor and self._fraction() >= MOVED_FRACTION

    def _fraction(self) -> float:
        return self.pool.mean(self.moved)

    def warning(self, label: str, done: int) -> str | None:
        """What is wrong with a step whose moves stopped at ``max_moves`` (None: nothing)."""
        if self.fixed or done < self.limit or self.limit <= 0 or \
                (self.r < self.floor and self._fraction() >= MOVED_FRACTION):
            return None
        return (f"{label}: correlation {self.r:.2f} with the start (needed below {self.floor:.2f}), "
                f"{100 * self._fraction():.0f}% of the particles moved (needed {100 * MOVED_FRACTION:.0f}%)")


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def unmixed_warning(method: str, reports: list, max_moves: int) -> list[str]:
    """One warning for the steps whose moves stopped at ``max_moves`` before the particles
    decorrelated (none: [])."""
    bad = [r.warning for r in reports if r.warning]
    if not bad:
        return []
    return [f"{method}: at {len(bad)} of {len(reports)} steps the adaptive moves stopped at max_moves={max_moves} "
            f"before the particles decorrelated (first: {bad[0]}); the population may not have mixed and the "
            "estimates may be wrong: raise max_moves (-o max_moves=...)"]


@dataclass
class MoveReport:
    """What one step's moves did: the number of moves, the mean acceptance of the block
    walk and of the single-site moves (None: no such kernel), the final correlation with
    the start, the walk's scale factor (the gradient kernel's step size); ``warning``: the
    message when ``max_moves`` did not suffice (the SMC algorithm puts it in
    ``extra["move_warnings"]``, which the result's warnings include)."""
    moves: int
    block_acceptance: float | None
    site_acceptance: float | None
    correlation: float
    scale: float | None
    warning: str | None = None


def move_population(model: ModelRun, state: TracedState, coords: Coordinates, randomness, tuning: Tuning, *,
                    covariance: torch.Tensor | None = None, moves: int | None = None, max_moves: int = 100,
                    decorrelation: float = 0.1, label: str = "SMC",
                    pool=None) -> tuple[TracedState, Coordinates, MoveReport]:
    """Move every particle (block walk then single-site move, per move) until the
    population has decorrelated from where it started (or ``moves`` times exactly):
    (state, coordinates, report). The walk's covariance: ``covariance`` (e.g. the
    weighted population's before resampling: ``population_covariance``), else the
    population's as it is; ``report.warning`` says when ``max_moves`` did not suffice.
    ``pool``: where the population is shared with other processes, the statistics over
    all of it (``ONE_PROCESS`` by default)."""
    pool = pool or ONE_PROCESS
    flat = coords.flat()
    D = flat.shape[1]
    if D and covariance is None:
        covariance = pool.covariance(flat, None)
    factor = proposal_factor(covariance, tuning.scale(D)) if D else None
    has_others = pool.any(bool((other_sites(state, coords.block) > 0).any()))
    stop = _Stopping(features(state, coords), decorrelation, moves, max_moves, pool)
    block_acc, site_acc, done = [], [], 0
    for done in range(1, stop.limit + 1):
        if factor is not None:
            state, coords, acc = block_move(model, state, coords, factor, randomness)
            block_acc.append(stop.moved_by(acc))
        if has_others:
            state, coords, acc = site_move(model, state, coords, randomness)
            site_acc.append(stop.moved_by(acc))
        if factor is None and not has_others:
            break
        if moves is None and stop.decorrelated(features(state, coords)):
            break
    report = MoveReport(done, _mean(block_acc), _mean(site_acc), stop.r, tuning.scale(D) if D else None,
                        stop.warning(label, done))
    if D and block_acc:
        tuning.adapt(report.block_acceptance)
    return state, coords, report


# ------------------------------------------------------- gradient kernels (HMC, MALA)
#: per gradient kernel: (the trajectory length in the population's whitened coordinates,
#: None: one leapfrog step; the acceptance its step size is adapted to). pi/2 is a quarter
#: period of a unit-variance Gaussian (where a move decorrelates most); a trajectory near a
#: whole period would bring the particles back where they started
GRADIENT_KERNELS = {"hmc": (math.pi / 2, 0.65), "mala": (None, 0.574)}


@dataclass
class GradientTuning:
    """The gradient kernel's step size, ``factor`` x D^(-1/4) (HMC) or D^(-1/3) (MALA) in
    the population's whitened coordinates, carried from one SMC step to the next and
    adapted towards the kernel's target acceptance."""
    kernel: str
    factor: float = 1.0

    def step_size(self, D: int) -> float:
        """At most 1.2: the leapfrog integrator of a whitened (unit-variance) Gaussian is
        unstable from a step of 2 on."""
        return min(1.2, self.factor * max(D, 1) ** (-0.25 if self.kernel == "hmc" else -1 / 3))

    def adapt(self, acceptance: float) -> None:
        """factor <- factor exp(acceptance - target), kept within [0.001, 1.5]."""
        target = GRADIENT_KERNELS[self.kernel][1]
        self.factor = min(1.5, max(0.001, self.factor * math.exp(acceptance - target)))


def gradient_moves(model: ModelRun, state: TracedState, potential, randomness, tuning: GradientTuning, *,
                   covariance: torch.Tensor | None = None, z: torch.Tensor | None = None, moves: int | None = None,
                   max_moves: int = 100, decorrelation: float = 0.1, label: str = "SMC") \
        -> tuple[TracedState, MoveReport]:
    """``move_population`` with an HMC or MALA kernel (``inference.hmc``) on the continuous
    choices (all in z, ``potential``: ``inference.potential.Potential`` of the program,
    tempered at ``model.beta``), its inverse mass matrix the population's covariance of z
    (``covariance``, else the current population's), the step size from ``tuning``; the
    discrete choices (held by the potential) move by ``site_move`` after each gradient
    move. ``z``: the population's unconstrained values if known. Returns (state, report)."""
    from . import hmc  # the gradient kernels
    C = state.chains
    discrete = tuple(potential.discrete)
    potential.set_given({a: state.values[a] for a in discrete})
    z = potential.unconstrain(state.values) if z is None else z
    D = z.shape[1]
    cov = population_covariance(z) if covariance is None else covariance
    root = proposal_factor(cov, 1.0)
    metric = hmc.Metric((root @ root.T).expand(C, D, D).contiguous())
    target = hmc.Tempered(potential, model.beta)
    length, _ = GRADIENT_KERNELS[tuning.kernel]
    eps0 = tuning.step_size(D)
    current = hmc.init_state(target, z)
    stop = _Stopping(_gradient_features(current.z, state, discrete), decorrelation, moves, max_moves)
    grad_acc, site_acc, done = [], [], 0
    for done in range(1, stop.limit + 1):
        # each chain's step size jittered by U(0.8, 1.2) (drawn independently of its state,
        # so each move is a mixture of exact kernels): no trajectory stays periodic
        eps = eps0 * (0.8 + 0.4 * randomness.uniform((C,), z.device))
        if length is None:
            current, info = hmc.hmc_step(target, current, eps, metric, randomness, num_steps=1)
        else:
            current, info = hmc.hmc_step(target, current, eps, metric, randomness, trajectory_length=length)
        grad_acc.append(float(info.accept_stat.double().mean()))
        stop.moved_by(info.accepted)
        if discrete:
            state = _at(model, potential, current.z, state)
            coords = Coordinates({}, {}, torch.ones(C, dtype=torch.bool, device=z.device))
            state, _, acc = site_move(model, state, coords, randomness)
            site_acc.append(stop.moved_by(acc))
            potential.set_given({a: state.values[a] for a in discrete})
            current = hmc.init_state(target, potential.unconstrain(state.values))
        if moves is None and stop.decorrelated(_gradient_features(current.z, state, discrete)):
            break
    state = _at(model, potential, current.z, state)
    report = MoveReport(done, _mean(grad_acc), _mean(site_acc), stop.r, eps0, stop.warning(label, done))
    tuning.adapt(report.block_acceptance)
    return state, report


def _gradient_features(z: torch.Tensor, state: TracedState, discrete: tuple) -> torch.Tensor:
    cols = [z] + [state.values[a].reshape(state.chains, -1).double() for a in discrete]
    return torch.cat(cols, 1)


def _at(model: ModelRun, potential, z: torch.Tensor, before: TracedState) -> TracedState:
    """The traced state of the population at unconstrained values z (the potential's
    discrete choices as they are), scored under ``model``'s target. A particle whose
    values the interpreter finds impossible although the potential did not (a covariance
    at the edge of positive definiteness, decided by rounding) keeps its state
    ``before`` (as if every move of this step had been rejected; counted in the report)."""
    values, _ = potential.constrain(z)
    C = before.chains
    present = {a: torch.ones(C, dtype=torch.bool, device=z.device) for a in values}
    trial = TracedState(values, present, {}, torch.zeros(C, dtype=torch.float64, device=z.device), None)
    new = _execute(model, trial, None, block=(), tolerant=True).state()
    good = torch.isfinite(new.log_joint) | ~torch.isfinite(before.log_joint)
    return new if bool(good.all()) else select(good, new, before)
