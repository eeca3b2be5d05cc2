"""The trace interface: Gen's generative function interface for a program, batched.

A *traced state* (``TracedState``) holds the traces of C chains (or particles) of one
program: per address a value column [C, ...], a presence mask [C] (random control flow:
a choice may exist in some chains only) and the log prior density of the value [C]; the
log joint (choices and likelihood factors) and the return value per chain. A
``ModelRun`` is the program with its data and its *target*: the whole program (the
default), the program truncated after its k-th checkpoint (``stop_after=k``:
resample-move's k-th SMC target, twist potential included), and/or with its likelihood
tempered (``beta``: prior * L^beta, tempering's target). Inference algorithms are
compositions of five operations (named as in Gen, Cusumano-Towner et al. 2019):

* ``simulate(model, C, randomness)`` -> state: C traces drawn from the prior.
* ``generate(model, choices, randomness)`` -> (state, log weight): the given choices
  where they exist, prior draws elsewhere; the weight is the log density of the given
  part (log joint minus the prior densities of the drawn choices). With
  ``randomness=None`` every choice must be given (an error names the first missing one).
* ``assess(model, choices)`` -> [C] log joint density of complete choices.
* ``regenerate(model, state, selection, randomness, proposal=, scale=)`` -> (state', log
  acceptance term): re-propose the selected addresses (per chain: ``selection[addr]`` is
  a bool [C]) from the prior (``proposal="prior"``) or by a random walk in unconstrained
  space (``"rw"``, ``unconstrained_walk``), reuse every other choice, draw choices the
  new run reaches for the first time (*fresh*) from the prior and drop those it no longer
  reaches (*stale*). The term is

      log p(x')/p(x) + log q(x_sel | x') - log q(x'_sel | x) + sum_stale log p - sum_fresh log p,

  the Metropolis-Hastings log ratio of that move for a fixed selection (single-site MH
  adds the log |x|/|x'| of choosing the site).
* ``update(model, state, constraints, randomness)`` -> (state', log weight change): the
  constrained addresses take the constraints' values, every other choice is reused,
  fresh ones drawn from the prior, stale ones dropped; the weight is log p(x')/p(x) -
  sum_fresh log p + sum_stale log p. Without constraints, a change of ``beta`` alone
  rescales the likelihood in closed form (no re-run): tempering's incremental weight.

Plus the population plumbing: ``select(mask, new, old)`` (per chain, keep one of two
states), ``reindex(state, ancestors)`` (after resampling) and ``metropolis(state, new,
log_alpha, randomness)`` (accept per chain with probability min(1, alpha)).

Every random number comes from the ``randomness`` object passed in (``sample(dist,
ctx)``, ``normal(shape, device)``, ``accept(log_alpha)``: ``inference.randomness``
draws with the run's generators, the exact checker (testing/validity.py) enumerates
them), so anything composed from these operations can be checked exactly on finite
programs (``tests/test_gfi.py`` checks the laws).

Chains of weight zero never raise (``semantics.sampling``): a proposal outside the
support, of a choice or of a ``condition``, has log joint -inf and is rejected.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import torch

from .errors import PPLRuntimeError
from .interpreter import Interpreter
from .sampling import Suspended, _WeightAccumulator, column, drive, spread
from .values import Batched, Particles, batch_rows, rows


# ------------------------------------------------------------------------ the two types
@dataclass
class Choices:
    """Values of C chains' choices: per address a value column [C, ...] and a presence
    mask [C] (where the mask is False the value is ignored)."""
    values: dict
    present: dict

    @classmethod
    def of(cls, values: dict, chains: int | None = None, device="cpu") -> "Choices":
        """Choices from columns (every chain has every address) or, with ``chains``, from
        one value per address shared by all chains."""
        if chains is not None:
            values = {a: batch_rows(v, Particles.all(chains, device)).clone() for a, v in values.items()}
        present = {a: torch.ones(v.shape[0], dtype=torch.bool, device=v.device) for a, v in values.items()}
        return cls(values, present)


@dataclass
class TracedState:
    """Traces of C chains: per address a value column [C, ...], a presence mask [C], and
    the log prior density of the value at that site [C] (needed for stale terms); the
    log joint [C] under the target (``beta``, ``stop_after``) the state was scored for."""
    values: dict
    present: dict
    site_lp: dict
    log_joint: torch.Tensor   # [C]
    ret: Any                  # the return value column (tensor [C, ...] or list)
    log_lik: Any = None       # [C]: the likelihood part of log_joint, unscaled by beta
    beta: float = 1.0         # the tempering of the target log_joint was computed for
    stop_after: int | None = None

    @property
    def sizes(self) -> torch.Tensor:
        """Number of choices in each chain's trace."""
        total = torch.zeros_like(self.log_joint)
        for m in self.present.values():
            total = total + m.to(total.dtype)
        return total

    @property
    def chains(self) -> int:
        return self.log_joint.shape[0]


@dataclass(frozen=True)
class ModelRun:
    """A program with its data and device, and the target its traces are scored under:
    ``stop_after`` = k truncates it after its k-th checkpoint (observe/factor/condition;
    the last twist potential reached counts), ``beta`` tempers its likelihood factors
    (an impossible one stays impossible)."""
    interp: Interpreter
    entry: str
    data: dict
    device: Any = "cpu"
    stop_after: int | None = None
    beta: float = 1.0

    def at(self, **target) -> "ModelRun":
        """The same program with another target (``stop_after=``, ``beta=``)."""
        return dataclasses.replace(self, **target)


Selection = dict  # address -> bool [C]: the chains that re-propose that address


# --------------------------------------------------------------------- the operations
def simulate(model: ModelRun, chains: int, randomness) -> TracedState:
    """``chains`` traces of the program drawn from its prior."""
    return _execute(model, chains, None, {}, randomness).state()


def generate(model: ModelRun, choices, randomness=None) -> tuple[TracedState, torch.Tensor]:
    """Traces with the given ``choices`` (a ``Choices`` or a ``TracedState``) where they
    have them and prior draws elsewhere; the log weight is the density of the given part
    (log joint - the prior log densities of the drawn choices). ``randomness`` None:
    every choice the program reaches must be given."""
    run = _execute(model, _chains(choices), choices, {}, randomness)
    state = run.state()
    return state, state.log_joint - run.fresh_lp


def assess(model: ModelRun, choices) -> torch.Tensor:
    """The log joint density [C] of complete ``choices`` under the model's target."""
    return generate(model, choices)[0].log_joint


def regenerate(model: ModelRun, state: TracedState, selection: Selection, randomness, *, proposal: str = "prior",
               scale: "float | Mapping[str, float]" = 0.5, walks: dict | None = None) \
        -> tuple[TracedState, torch.Tensor]:
    """Re-propose the selected addresses (see the module docstring): (new state, log
    acceptance term). ``proposal`` "prior" or "rw" (a walk of ``scale`` in
    unconstrained space, for real-valued choices; prior draws for the others).
    ``scale`` is one number for every site or a mapping address -> scale (per-site
    scales, e.g. adapted ones: ``inference.mh_adapt``; ``scale_at`` reads it).
    ``walks``, if given, receives address -> number of unconstrained dimensions of one
    chain's value for every site that some chain moved by a random walk."""
    run = _execute(model, state.chains, state, selection, randomness, proposal, scale)
    if walks is not None:
        walks.update(run.walks)
    new = run.state()
    log_w = new.log_joint - state.log_joint + run.rev_q + stale_lp(state, new) - run.fwd_q - run.fresh_lp
    return new, log_w


def update(model: ModelRun, state: TracedState, constraints=None, randomness=None) \
        -> tuple[TracedState, torch.Tensor]:
    """The constraints' values (``Choices``-like: ``values``, ``present``) where they have
    them, the state's elsewhere, prior draws for fresh choices: (new state, log p(x') -
    log p(x) - fresh + stale). ``constraints`` None: ``model`` must be the state's own
    program; at the state's ``stop_after`` only its ``beta`` can differ, and the
    likelihood is rescaled in closed form (a zero likelihood keeps weight -inf), else
    the program is re-run with every choice reused."""
    if constraints is None and model.stop_after == state.stop_after:
        return _retemper(state, model.beta)
    run = _execute(model, state.chains, state, {}, randomness, constraints=constraints or Choices({}, {}))
    new = run.state()
    return new, new.log_joint - state.log_joint + stale_lp(state, new) - run.fresh_lp


def stale_lp(old: TracedState, new: TracedState, without=None) -> torch.Tensor:
    """Sum over the choices of ``old`` that ``new`` no longer has (and ``without``, a
    ``Choices``-like store, does not have either) of their prior log densities."""
    stale = torch.zeros_like(old.log_joint, dtype=torch.float64)
    for a in old.values:
        gone = old.present[a] & ~new.present.get(a, torch.zeros_like(old.present[a]))
        if without is not None and a in without.present:
            gone = gone & ~without.present[a]
        if a in old.site_lp and bool(gone.any()):
            stale = stale + torch.where(gone, old.site_lp[a].double(), torch.zeros_like(stale))
    return stale


def metropolis(state: TracedState, new: TracedState, log_alpha: torch.Tensor, randomness):
    """Accept ``new`` per chain with probability min(1, exp(log_alpha)) (NaN: reject; a
    new trace of density zero: reject): (resulting state, accepted mask)."""
    log_alpha = torch.where(torch.isnan(log_alpha), torch.full_like(log_alpha, -math.inf), log_alpha)
    accept = randomness.accept(log_alpha) & torch.isfinite(new.log_joint)
    return select(accept, new, state), accept


def _retemper(state: TracedState, beta: float) -> tuple[TracedState, torch.Tensor]:
    """The state rescored at ``beta``: log_joint + (beta - state.beta) * log_lik (an
    impossible likelihood stays impossible), and that change as the weight."""
    lik = state.log_lik
    change = torch.where(torch.isneginf(lik), lik, (beta - state.beta) * lik)
    log_joint = torch.where(torch.isneginf(lik), state.log_joint, state.log_joint + (beta - state.beta) * lik)
    return dataclasses.replace(state, log_joint=log_joint, beta=beta), change


# ----------------------------------------------------------------- the re-execution
def unsynchronised_checkpoint(eff) -> PPLRuntimeError:
    """The error for a truncated target (resample-move's) at a checkpoint that only some
    particles reach: the k-th target would differ between particles."""
    return PPLRuntimeError("resample-move needs every observe/factor/condition to be reached by all particles "
                           "together", eff.span,
                           "this checkpoint is inside a branch taken by only some particles: use method='smc'")


def _chains(choices) -> int:
    lj = getattr(choices, "log_joint", None)
    if lj is not None:
        return lj.shape[0]
    for m in choices.present.values():
        return m.shape[0]
    raise PPLRuntimeError("generate: give at least one choice (or use simulate)")


def _execute(model: ModelRun, C: int, old, selection, randomness, proposal="prior", scale=0.5,
             constraints=None) -> "ReExecution":
    """One run of the program for C chains with a ``ReExecution`` handler."""
    ctx = Particles.all(C, model.device)
    h = ReExecution(C, model.device, old, selection, randomness, proposal, scale, model.stop_after, model.beta,
                    constraints)
    try:
        h.ret = column(drive(model.interp.run(model.entry, model.data, ctx), h), ctx)
    except Suspended:  # the end of the truncated program (the target of an SMC step)
        h.ret = torch.zeros(C)
    return h


class ReExecution(_WeightAccumulator):
    """Runs the program once for all chains, reusing the old trace where it can: per
    choice the constraint's value (``update``), else the old value unless the chain
    re-proposes the address (``regenerate``: a prior draw or a walk), else a prior draw
    (a fresh choice, its log prior summed in ``fresh_lp``). ``fwd_q``/``rev_q`` sum the
    proposal terms of the re-proposed choices. A chain whose own parameters of a
    likelihood are invalid has density zero there (``semantics.invalid_parameters``)."""

    invalid_anywhere = True

    def __init__(self, C, device, old, chosen: dict, randomness, kernel: str = "prior", scale: float = 0.5,
                 stop_after: int | None = None, beta: float = 1.0, constraints=None):
        super().__init__(C, device, dtype=torch.float64)
        self.C = C
        self.beta = beta  # the target is prior * likelihood^beta (tempering)
        self.log_lik = torch.zeros(C, dtype=torch.float64, device=device)
        self.stop_after = stop_after  # truncate the program after this many checkpoints
        self.checkpoints = 0
        self.old = old
        self.chosen = chosen          # address -> bool [C]: this chain re-proposes that site
        self.constraints = constraints
        self.randomness = randomness
        self.kernel = kernel
        self.scale = scale
        self.values: dict = {}
        self.present: dict = {}
        self.site_lp: dict = {}
        self.ret = None
        self.fresh_lp = torch.zeros(C, dtype=torch.float64, device=device)
        self.fwd_q = torch.zeros(C, dtype=torch.float64, device=device)
        self.rev_q = torch.zeros(C, dtype=torch.float64, device=device)
        self.walks: dict = {}         # address -> unconstrained dimension, for the sites walked

    def state(self) -> TracedState:
        """The traced state this run made."""
        return TracedState(self.values, self.present, self.site_lp, self.log_weights, self.ret, self.log_lik,
                           self.beta, self.stop_after)

    def _col(self, store, addr, ctx, value_rows, fill=0):
        if addr not in store:
            store[addr] = torch.full((self.C, *value_rows.shape[1:]), fill, dtype=value_rows.dtype,
                                     device=value_rows.device)
        col = store[addr]
        if col.dtype != value_rows.dtype:
            col = col.to(torch.promote_types(col.dtype, value_rows.dtype))
            store[addr] = col
        col[ctx.idx] = value_rows.to(col.dtype)

    def sample(self, eff):
        ctx = eff.ctx
        try:
            site = self._propose(eff.dist, ctx, eff)
        except PPLRuntimeError as err:
            live = self.live(ctx)
            if live is ctx:
                raise
            site = self._propose_live(eff, live, err)
        value_rows, lp, fresh, fwd, rev = site
        _WeightAccumulator.add(self, ctx, lp)  # a prior term: never tempered
        self.fresh_lp.index_add_(0, ctx.idx, fresh)
        if fwd is not None:
            self.fwd_q.index_add_(0, ctx.idx, fwd)
            self.rev_q.index_add_(0, ctx.idx, rev)
        self._record(eff.addr, ctx, value_rows, lp)
        return Batched(value_rows, ctx.idx)

    def _propose_live(self, eff, live, err):
        """``_propose`` when it raised and some chains have weight zero (their proposal is
        already rejected): the live chains propose; the dead ones score -inf, with a
        placeholder value and no proposal terms."""
        ctx = eff.ctx
        lp = torch.full((ctx.M,), -math.inf, dtype=torch.float64, device=ctx.device)
        fresh = torch.zeros(ctx.M, dtype=torch.float64, device=ctx.device)
        if live is None:
            placeholder = getattr(eff.dist, "placeholder", None)
            value = placeholder(ctx) if placeholder is not None else None
            if value is None:
                raise err
            return rows(value, ctx), lp, fresh, None, None
        value_rows, live_lp, live_fresh, fwd, rev = self._propose(eff.dist, live, eff)
        pos = ctx.positions(live.idx)
        lp[pos] = live_lp
        fresh[pos] = live_fresh
        if fwd is not None:
            fwd, rev = (torch.zeros_like(fresh).index_put_((pos,), t) for t in (fwd, rev))
        value_rows = rows(spread(Batched(value_rows, live.idx), live, ctx), ctx)
        return value_rows, lp, fresh, fwd, rev

    def _propose(self, dist, ctx, eff):
        """This run's value at the choice for the chains of ctx, without recording it:
        (value rows, log prior density, its part for fresh choices, forward and reverse
        proposal terms or None)."""
        if self.constraints is not None:
            return self._constrained(dist, ctx, eff)
        idx = ctx.idx
        addr = eff.addr
        old = self.old
        if old is not None and addr in old.values:
            has = old.present[addr][idx]
            old_rows = old.values[addr][idx]
            chosen = self.chosen.get(addr)
            chosen = chosen[idx] & has if chosen is not None else torch.zeros_like(has)
            reuse = has & ~chosen
            walked = self._walk(dist, ctx, old_rows, chosen, addr) if self.kernel == "rw" and \
                old_rows.is_floating_point() and bool(chosen.any()) else None
            walk, walk_rev, walk_fwd = walked if walked is not None else (None, None, None)
            # draw only when some chain needs a prior draw here: not when every other chain
            # reuses its value and the chosen ones walk (this also keeps the enumerated
            # version of the kernel free of irrelevant branches)
            needs_draw = ~reuse if walk is None else ~has
            new_rows = self._draw(dist, ctx, eff) if bool(needs_draw.any()) else old_rows
            if walk is not None:
                proposal = torch.where(_bcast(chosen, walk), walk, new_rows)
                prior_proposal = chosen & False
            else:
                proposal = new_rows
                prior_proposal = chosen
            value_rows = torch.where(_bcast(reuse, old_rows), old_rows.to(new_rows.dtype), proposal)
        else:
            has = torch.zeros(ctx.M, dtype=torch.bool, device=idx.device)
            chosen = prior_proposal = has
            new_rows = self._draw(dist, ctx, eff)
            value_rows, old_rows = new_rows, None
            walk_rev = walk_fwd = None
        value = Batched(value_rows, idx)
        lp = _as_rows(dist.log_prob(value, ctx), ctx).double()
        fresh = torch.where(~has, lp, torch.zeros_like(lp))
        fwd, rev = walk_fwd, walk_rev
        if bool(prior_proposal.any()):
            old_lp = _as_rows(dist.log_prob(Batched(old_rows, idx), ctx), ctx).double()
            zero = torch.zeros_like(lp)
            fwd = torch.where(prior_proposal, lp, zero) + (0 if fwd is None else fwd)
            rev = torch.where(prior_proposal, old_lp, zero) + (0 if rev is None else rev)
        return value_rows, lp, fresh, fwd, rev

    def _constrained(self, dist, ctx, eff):
        """``update``'s value: the constraint's, else the old trace's, else a fresh draw."""
        addr, idx = eff.addr, ctx.idx
        forced, forced_rows = rows_at(self.constraints, addr, idx)
        has, old_rows = rows_at(self.old, addr, idx)
        reuse = has & ~forced
        fresh = ~has & ~forced
        new_rows = self._draw(dist, ctx, eff) if bool(fresh.any()) else None
        value_rows = combine([(forced, forced_rows), (reuse, old_rows), (fresh, new_rows)])
        lp = _as_rows(dist.log_prob(Batched(value_rows, idx), ctx), ctx).double()
        return value_rows, lp, torch.where(fresh, lp, torch.zeros_like(lp)), None, None

    def _record(self, addr, ctx, value_rows, lp):
        """Store this run's value and log prior density at ``addr`` for ctx's chains."""
        self._col(self.values, addr, ctx, value_rows)
        if addr not in self.present:
            self.present[addr] = torch.zeros(self.C, dtype=torch.bool, device=ctx.idx.device)
        self.present[addr][ctx.idx] = True
        self._col(self.site_lp, addr, ctx, lp)

    def add(self, ctx, lp):
        """A likelihood term (observe/factor/condition): counted in full in ``log_lik``
        and to the power beta in the target (an impossible one stays impossible)."""
        lp = torch.as_tensor(lp, dtype=torch.float64, device=self.log_lik.device).expand(ctx.M)
        self.log_lik.index_add_(0, ctx.idx, lp)
        if self.beta != 1.0:
            lp = torch.where(torch.isneginf(lp), lp, self.beta * lp)
        _WeightAccumulator.add(self, ctx, lp)

    _phi = None  # [C] the SMC potential of each chain (truncated runs only)

    def twist(self, eff):
        """``twist(phi)``: the full program's measure does not depend on it, but the
        target truncated after checkpoint k (resample-move's k-th SMC target) includes the
        last potential reached before k (``inference.resample_move``)."""
        if self.stop_after is None:
            return None
        ctx, v = eff.ctx, eff.value
        phi = rows(v, ctx).double() if isinstance(v, Batched) else \
            torch.full((ctx.M,), float(v), dtype=torch.float64, device=self.log_lik.device)
        if self._phi is None:
            self._phi = torch.zeros(self.C, dtype=torch.float64, device=self.log_lik.device)
        _WeightAccumulator.add(self, ctx, phi - self._phi[ctx.idx])
        self._phi = self._phi.index_copy(0, ctx.idx, phi)
        return None

    def finish(self):
        """A truncated run that ended before its truncation point: the potential out again."""
        if self._phi is not None:
            _WeightAccumulator.add(self, Particles.all(self.C, self._phi.device), -self._phi)

    def _checkpoint(self, eff):
        if self.stop_after is None:
            return
        if eff.ctx.M != self.C:
            raise unsynchronised_checkpoint(eff)
        self.checkpoints += 1
        if self.checkpoints >= self.stop_after:
            raise Suspended(eff)

    def _draw(self, dist, ctx, eff):
        if self.randomness is None:
            raise PPLRuntimeError(f"the given choices have no value for the choice '{eff.addr}'", eff.span,
                                  "assess and generate without randomness need every choice the program makes")
        draw = self.randomness.sample(dist, ctx)
        if isinstance(draw, (int, float, bool, torch.Tensor)):  # every chain drew the same plain item
            return batch_rows(draw, ctx).clone()
        if not isinstance(draw, Batched):
            raise PPLRuntimeError("MH supports numeric random choices only (this one is not)", eff.span,
                                  "use kernel='suffix' (moves on language-model choices), or importance sampling or "
                                  "SMC, for models with string-valued choices")
        return rows(draw, ctx)

    def _walk(self, dist, ctx, old_rows, chosen, addr):
        """The random-walk proposal at this site (see ``unconstrained_walk``), of this
        site's scale (``scale_at``)."""
        shapes = []

        def normal(shape, device):
            shapes.append(shape)
            return self.randomness.normal(shape, device)

        scale = scale_at(self.scale, addr)
        if isinstance(scale, torch.Tensor) and scale.dim() == 1:  # one per chain: this run's rows
            scale = scale[ctx.idx]
        walk = unconstrained_walk(dist, ctx, old_rows, chosen, normal, scale)
        if shapes:
            self.walks[addr] = math.prod(shapes[0][1:])
        return walk


# ------------------------------------------------------------ the random-walk proposal
_IDENTITY = torch.distributions.transforms.identity_transform


def scale_at(scale, addr: str):
    """The random-walk scale of the site ``addr``: ``scale`` itself when it is a number,
    else ``scale[addr]`` (a mapping address -> scale; a ``defaultdict``-like mapping
    gives sites it does not list a default). A scale is a number, or a float64 tensor
    [C] of one scale per chain (adaptation during burn-in)."""
    if isinstance(scale, Mapping):
        try:
            return scale[addr]
        except KeyError:
            raise PPLRuntimeError(f"no random-walk scale for the site '{addr}'",
                                  hint="give per-site scales for every real-valued choice") from None
    return scale


def support_bijection(dist, ctx):
    """The bijection from unconstrained space onto the support of ``dist`` (torch's
    ``biject_to``), or None if there is none."""
    try:
        return torch.distributions.biject_to(dist.torch_dist(ctx).support)
    except (NotImplementedError, KeyError, PPLRuntimeError):
        return None


def unconstrained_walk(dist, ctx, old_rows, chosen, normal, scale):
    """A Gaussian random walk in the unconstrained space of the choice's support:
    y = T^-1(x), y' = y + scale * noise, x' = T(y'), with ``noise = normal(y.shape,
    device)``. The walk is symmetric in y, so its Hastings ratio is the ratio of the
    Jacobians |dT/dy| at y' and y: returned as (x', reverse term, forward term) with
    the terms -log|dT/dy| at y and at y' on the ``chosen`` rows (0 elsewhere; both None
    when T is the identity). None if the support has no bijection. ``scale``: a number,
    or a tensor [M] of one scale per row."""
    T = support_bijection(dist, ctx)
    if T is None:
        return None
    if T == _IDENTITY:  # a real-valued choice: a plain walk, no Jacobian terms (None)
        x = old_rows.double()
        return (x + _per_row(scale, x) * normal(x.shape, x.device)).to(old_rows.dtype), None, None
    x = old_rows.double()
    y = T.inv(x)
    y2 = y + _per_row(scale, y) * normal(y.shape, y.device)
    x2 = T(y2)

    def logdet(yy, xx):
        j = T.log_abs_det_jacobian(yy, xx)
        return j.reshape(j.shape[0], -1).sum(1) if j.dim() > 1 else j.expand(yy.shape[0]) if j.dim() == 0 else j

    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    rev = torch.where(chosen, -logdet(y, x), zero)
    fwd = torch.where(chosen, -logdet(y2, x2), zero)
    return x2.to(old_rows.dtype), rev, fwd


def _per_row(scale, like):
    """A scale per row [M] shaped to broadcast against ``like`` [M, ...]; a number as it is."""
    if isinstance(scale, torch.Tensor) and scale.dim() == 1:
        return scale.reshape(scale.shape + (1,) * (like.dim() - 1))
    return scale


# ------------------------------------------------------------- population plumbing
def select(mask: torch.Tensor, new: TracedState, old: TracedState) -> TracedState:
    """Per chain: the new state where mask holds, else the old one."""
    values, present, site_lp = {}, {}, {}
    for a in dict.fromkeys([*old.values, *new.values]):  # a fixed order: seeded runs repeat
        nv, ov = new.values.get(a), old.values.get(a)
        np_ = new.present.get(a, torch.zeros_like(mask))
        op = old.present.get(a, torch.zeros_like(mask))
        present[a] = torch.where(mask, np_, op)
        ref = nv if nv is not None else ov
        nv = nv if nv is not None else torch.zeros_like(ref)
        ov = ov if ov is not None else torch.zeros_like(ref)
        dtype = torch.promote_types(nv.dtype, ov.dtype)
        values[a] = torch.where(_bcast(mask, ref), nv.to(dtype), ov.to(dtype))
        nl = new.site_lp.get(a, torch.zeros_like(new.log_joint))
        ol = old.site_lp.get(a, torch.zeros_like(old.log_joint))
        site_lp[a] = torch.where(mask, nl.double(), ol.double())
    log_joint = torch.where(mask, new.log_joint, old.log_joint)
    ret = _select_column(mask, new.ret, old.ret)
    log_lik = None if new.log_lik is None or old.log_lik is None else torch.where(mask, new.log_lik, old.log_lik)
    return TracedState(values, present, site_lp, log_joint, ret, log_lik, new.beta, new.stop_after)


def reindex(state: TracedState, ancestors: torch.Tensor) -> TracedState:
    """The population after resampling: chain j takes the state of chain ancestors[j]."""
    def take(col):
        if isinstance(col, torch.Tensor):
            return col[ancestors]
        return [col[i] for i in ancestors.tolist()]
    return TracedState({a: v[ancestors] for a, v in state.values.items()},
                       {a: m[ancestors] for a, m in state.present.items()},
                       {a: lp[ancestors] for a, lp in state.site_lp.items()},
                       state.log_joint[ancestors], take(state.ret),
                       None if state.log_lik is None else state.log_lik[ancestors], state.beta, state.stop_after)


def _select_column(mask, new, old):
    if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor) and new.shape == old.shape:
        dtype = torch.promote_types(new.dtype, old.dtype)
        return torch.where(_bcast(mask, new), new.to(dtype), old.to(dtype))
    n = new.tolist() if isinstance(new, torch.Tensor) else list(new)
    o = old.tolist() if isinstance(old, torch.Tensor) else list(old)
    return [a if m else b for a, b, m in zip(n, o, mask.tolist())]


# ----------------------------------------------------------------------- small helpers
def rows_at(store, addr, idx):
    """(presence [M], value rows or None) of ``addr`` in a state or choices (None: none)."""
    if store is not None and addr in store.values:
        return store.present[addr][idx], store.values[addr][idx]
    return torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device), None


def combine(parts):
    """One value column from (mask, rows) parts with disjoint masks covering every row."""
    out = None
    for mask, r in parts:
        if r is None or not bool(mask.any()):
            continue
        if out is None:
            out = r
            continue
        if r.shape[1:] != out.shape[1:]:
            raise PPLRuntimeError(f"a proposed value has shape {tuple(r.shape[1:])} where the model's choice "
                                  f"has shape {tuple(out.shape[1:])}")
        dtype = torch.promote_types(out.dtype, r.dtype)
        out = torch.where(_bcast(mask, r), r.to(dtype), out.to(dtype))
    return out


def _bcast(mask, like):
    return mask.reshape(mask.shape + (1,) * (like.dim() - 1))


def _as_rows(lp, ctx):
    return lp.expand(ctx.M) if lp.dim() == 0 else lp
