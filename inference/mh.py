"""Single-site trace Metropolis-Hastings, with many chains as one batch.

A state is a trace: address -> value, per chain. One step (``mh_step``), per chain:
pick one of the trace's choices uniformly, propose a new value for it (from its prior,
or by a symmetric random walk for real-valued choices), and re-run the program with
every other choice reused where it still exists; choices the new run reaches for the
first time are drawn from their priors ("fresh"), choices of the old trace it no longer
reaches are dropped ("stale"). The proposal is accepted with probability min(1, alpha),

    alpha = p(x') / p(x) * |x| / |x'| * [q_s(x_s) prod_stale p(x_stale)]
                                      / [q_s(x'_s) prod_fresh p(x'_fresh)]

(Wingate, Stuhlmueller & Goodman 2011), where p is the joint density of choices and
likelihood factors and q_s the proposal at the chosen site (its prior, or a symmetric
walk for which the q terms cancel). The |x|/|x'| and fresh/stale terms are the Hastings
correction for traces that change shape under random control flow.

A proposal outside the support (of a choice, or of a ``condition``) has joint density
zero and is rejected; the run that scores it never raises for the parameters such a
proposal makes invalid (``semantics.sampling``: chains of weight zero never raise).

Invariant: the kernel leaves the posterior invariant (pi K = pi), and satisfies detailed
balance. ``ppl.testing.validity.mh_transition_matrix`` builds K exactly for finite
programs, enumerating every site choice, proposal and accept/reject outcome.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..semantics.errors import PPLRuntimeError
from ..semantics.interpreter import Interpreter
from ..semantics.sampling import _WeightAccumulator, column, drive, spread
from ..semantics.values import Batched, Particles, PerParticle, batch_rows, is_batched, rows
from ..stdlib.progress import progress_bar
from .importance import impossible_site
from .randomness import TorchRandomness


@dataclass
class MHState:
    """Traces of C chains: per address a value column [C, ...], a presence mask [C], and
    the log prior density of the value at that site [C] (needed for stale terms)."""
    values: dict
    present: dict
    site_lp: dict
    log_joint: torch.Tensor   # [C]
    ret: Any                  # the return value column (tensor [C, ...] or list)
    log_lik: Any = None       # [C]: the likelihood part of log_joint, unscaled by beta

    @property
    def sizes(self) -> torch.Tensor:
        """Number of choices in each chain's trace."""
        total = torch.zeros_like(self.log_joint)
        for m in self.present.values():
            total = total + m.to(total.dtype)
        return total


class TorchMHRandomness(TorchRandomness):
    """Draws for MH with torch generators (the run's: see ``TorchRandomness``;
    ``ppl.testing.validity`` enumerates them)."""

    def choose(self, sizes: torch.Tensor) -> torch.Tensor:
        """A uniform index in [0, sizes[c]) per chain."""
        u = torch.rand(sizes.shape, dtype=torch.float64, device=sizes.device, generator=self.gen(sizes.device))
        return torch.minimum((u * sizes).floor().long(), (sizes - 1).clamp(min=0).long())

    def normal(self, shape, device) -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=torch.float64, generator=self.gen(device))

    def uniform(self, shape, device) -> torch.Tensor:
        return torch.rand(shape, dtype=torch.float64, device=device, generator=self.gen(device))

    def accept(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return torch.log(self.uniform(log_alpha.shape, log_alpha.device)) < log_alpha


class _Run(_WeightAccumulator):
    """Runs the program once for all chains, reusing the old trace where it can."""

    def __init__(self, C, device, old: MHState | None, chosen: dict, randomness, kernel: str, scale: float,
                 stop_after: int | None = None, beta: float = 1.0):
        super().__init__(C, device, dtype=torch.float64)
        self.C = C
        self.beta = beta  # the target is prior * likelihood^beta (tempering)
        self.log_lik = torch.zeros(C, dtype=torch.float64, device=device)
        self.stop_after = stop_after  # truncate the program after this many checkpoints
        self.checkpoints = 0
        self.old = old
        self.chosen = chosen          # address -> bool [C]: this chain re-proposes that site
        self.randomness = randomness
        self.kernel = kernel
        self.scale = scale
        self.values: dict = {}
        self.present: dict = {}
        self.site_lp: dict = {}
        self.fresh_lp = torch.zeros(C, dtype=torch.float64, device=device)
        self.fwd_q = torch.zeros(C, dtype=torch.float64, device=device)
        self.rev_q = torch.zeros(C, dtype=torch.float64, device=device)

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
        idx = ctx.idx
        addr = eff.addr
        old = self.old
        if old is not None and addr in old.values:
            has = old.present[addr][idx]
            old_rows = old.values[addr][idx]
            chosen = self.chosen.get(addr)
            chosen = chosen[idx] & has if chosen is not None else torch.zeros_like(has)
            reuse = has & ~chosen
            walked = self._walk(dist, ctx, old_rows, chosen) if self.kernel == "rw" and \
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
            raise PPLRuntimeError(
                "resample-move needs every observe/factor/condition to be reached by all particles together",
                eff.span, "this checkpoint is inside a branch taken by only some particles: use method='smc'")
        self.checkpoints += 1
        if self.checkpoints >= self.stop_after:
            raise _Truncated()

    def _draw(self, dist, ctx, eff):
        draw = self.randomness.sample(dist, ctx)
        if isinstance(draw, (int, float, bool, torch.Tensor)):  # every chain drew the same plain item
            return batch_rows(draw, ctx).clone()
        if not isinstance(draw, Batched):
            raise PPLRuntimeError("MH supports numeric random choices only (this one is not)", eff.span,
                                  "use importance sampling or SMC for models with string-valued choices")
        return rows(draw, ctx)

    def _walk(self, dist, ctx, old_rows, chosen):
        """The random-walk proposal at this site (see ``unconstrained_walk``): (x', its
        Jacobian terms for the reverse and forward proposal terms, or None and None).
        None if the support has no bijection to the real line."""
        return unconstrained_walk(dist, ctx, old_rows, chosen, self.randomness.normal, self.scale)


_IDENTITY = torch.distributions.transforms.identity_transform


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
    when T is the identity). None if the support has no bijection."""
    T = support_bijection(dist, ctx)
    if T is None:
        return None
    if T == _IDENTITY:  # a real-valued choice: a plain walk, no Jacobian terms (None)
        x = old_rows.double()
        return (x + scale * normal(x.shape, x.device)).to(old_rows.dtype), None, None
    x = old_rows.double()
    y = T.inv(x)
    y2 = y + scale * normal(y.shape, y.device)
    x2 = T(y2)

    def logdet(yy, xx):
        j = T.log_abs_det_jacobian(yy, xx)
        return j.reshape(j.shape[0], -1).sum(1) if j.dim() > 1 else j.expand(yy.shape[0]) if j.dim() == 0 else j

    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    rev = torch.where(chosen, -logdet(y, x), zero)
    fwd = torch.where(chosen, -logdet(y2, x2), zero)
    return x2.to(old_rows.dtype), rev, fwd


def _bcast(mask, like):
    return mask.reshape(mask.shape + (1,) * (like.dim() - 1))


def _as_rows(lp, ctx):
    return lp.expand(ctx.M) if lp.dim() == 0 else lp


def initial_state(interp: Interpreter, entry: str, data: dict, chains: int, device="cpu", randomness=None,
                  tries: int = 100) -> MHState:
    """Draw each chain's first trace from the prior, redrawing chains whose joint density
    is zero (so that every chain starts inside the support of the posterior)."""
    randomness = randomness or TorchMHRandomness()
    state = _run(interp, entry, data, chains, device, None, {}, randomness, "prior", 1.0)
    for _ in range(tries):
        bad = ~torch.isfinite(state.log_joint)
        if not bool(bad.any()):
            return state
        again = _run(interp, entry, data, chains, device, None, {}, randomness, "prior", 1.0)
        state = _select(bad, again, state)
    if not bool(torch.isfinite(state.log_joint).any()):
        site = _blame(interp, entry, data, chains, device)
        raise PPLRuntimeError(f"MH: no chain found a trace of positive probability in {tries} prior draws"
                              + (f" ({site.message})" if site is not None else ""),
                              site.span if site is not None else None,
                              "the data may be impossible under the prior")
    return state


def _blame(interp, entry, data, chains, device, tries: int = 10):
    """The ``ZeroEvidenceError`` naming the site where ``chains`` fresh prior draws all
    died (tried ``tries`` times, then with 100 draws), or None if some draw survived
    every time (the error then has no location)."""
    for n in [chains] * tries + [max(chains, 100)]:
        site = impossible_site(interp, entry, data, n, device)
        if site is not None:
            return site
    return None


class _Truncated(Exception):
    """Stops a run at the end of a truncated program (the target of an SMC step)."""


def _run(interp, entry, data, C, device, old, chosen, randomness, kernel, scale, stop_after=None, beta=1.0):
    ctx = Particles.all(C, device)
    h = _Run(C, device, old, chosen, randomness, kernel, scale, stop_after, beta)
    try:
        ret = column(drive(interp.run(entry, data, ctx), h), ctx)
    except _Truncated:
        ret = torch.zeros(C)
    state = MHState(h.values, h.present, h.site_lp, h.log_weights, ret, h.log_lik)
    state._run = h
    return state


def mh_step(interp: Interpreter, entry: str, data: dict, state: MHState, device="cpu", *, randomness=None,
            kernel: str = "prior", scale: float = 0.5, hastings: bool = True, stop_after: int | None = None,
            beta: float = 1.0):
    """One single-site MH step for every chain: returns (new state, accepted mask).
    With ``stop_after`` = k the target is the program truncated after its k-th
    checkpoint (prior times the first k likelihood factors): SMC's k-th target."""
    randomness = randomness or TorchMHRandomness()
    C = state.log_joint.shape[0]
    addrs = list(state.values)
    sizes = state.sizes
    pick = randomness.choose(sizes)  # per chain: the k-th present address (in trace order)
    chosen = {}
    rank = torch.zeros(C, dtype=torch.long, device=pick.device)
    for a in addrs:
        m = state.present[a]
        chosen[a] = m & (rank == pick)
        rank = rank + m.long()
    new = _run(interp, entry, data, C, device, state, chosen, randomness, kernel, scale, stop_after, beta)
    h = new._run
    log_alpha = new.log_joint - state.log_joint
    if hastings:
        stale = torch.zeros(C, dtype=torch.float64, device=pick.device)
        for a in addrs:
            gone = state.present[a] & ~new.present.get(a, torch.zeros_like(state.present[a]))
            if bool(gone.any()):
                stale = stale + torch.where(gone, state.site_lp[a].double(), torch.zeros_like(stale))
        log_alpha = log_alpha + torch.log(sizes.double()) - torch.log(new.sizes.double()) \
            + h.rev_q + stale - h.fwd_q - h.fresh_lp
    log_alpha = torch.where(torch.isnan(log_alpha), torch.full_like(log_alpha, -math.inf), log_alpha)
    accept = randomness.accept(log_alpha) & torch.isfinite(new.log_joint)
    return _select(accept, new, state), accept


def _select(mask: torch.Tensor, new: MHState, old: MHState) -> MHState:
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
    return MHState(values, present, site_lp, log_joint, ret, log_lik)


def reindex(state: MHState, ancestors: torch.Tensor) -> MHState:
    """The population after resampling: chain j takes the state of chain ancestors[j]."""
    def take(col):
        if isinstance(col, torch.Tensor):
            return col[ancestors]
        return [col[i] for i in ancestors.tolist()]
    return MHState({a: v[ancestors] for a, v in state.values.items()},
                   {a: m[ancestors] for a, m in state.present.items()},
                   {a: lp[ancestors] for a, lp in state.site_lp.items()},
                   state.log_joint[ancestors], take(state.ret),
                   None if state.log_lik is None else state.log_lik[ancestors])


def _select_column(mask, new, old):
    if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor) and new.shape == old.shape:
        dtype = torch.promote_types(new.dtype, old.dtype)
        return torch.where(_bcast(mask, new), new.to(dtype), old.to(dtype))
    n = new.tolist() if isinstance(new, torch.Tensor) else list(new)
    o = old.tolist() if isinstance(old, torch.Tensor) else list(old)
    return [a if m else b for a, b, m in zip(n, o, mask.tolist())]


def mh(interp: Interpreter, entry: str, data: dict, *, chains: int = 4, samples: int = 1000, burn_in: int = 500,
       thin: int = 1, device="cpu", kernel: str = "prior", scale: float = 0.5, progress: bool | None = None,
       traced: bool | str = "auto", info: dict | None = None):
    """Run ``chains`` chains: returns (kept states, acceptance rate).

    ``kernel`` is "prior", "rw", or the name of a proposal function of the model
    (``inference.mh_proposals``: custom kernels written in the DSL).

    With ``kernel="rw"`` and ``traced="auto"`` (the default) a static program (see
    ``inference.mh_traced``) runs the same kernel as a traced torch graph; ``traced=False``
    always re-runs the interpreter; ``traced=True`` requires the traced kernel. ``info``,
    if given, receives ``{"traced": bool}`` and, when tracing failed, ``"why_not_traced"``."""
    custom = None
    if kernel not in ("prior", "rw"):  # the name of a proposal function (``inference.mh_proposals``)
        from .mh_proposals import ProposalKernel
        custom = ProposalKernel(interp, entry, kernel)
    if traced not in (True, False, "auto"):
        raise PPLRuntimeError(f"traced must be True, False or 'auto', not {traced!r}")
    state = initial_state(interp, entry, data, chains, device)
    fast = None
    if kernel == "rw" and traced:
        from .mh_traced import TracedRandomWalk
        why: list = []
        fast = TracedRandomWalk.build(interp, entry, data, state, scale, device, why)
        if info is not None and why:
            info["why_not_traced"] = why[0]
        if fast is None and traced is True:
            raise PPLRuntimeError(f"traced=True: this program cannot be traced ({why[0] if why else 'unknown'})",
                                  hint="use traced='auto' to fall back to the interpreter")
    if kernel != "rw" and traced is True:
        raise PPLRuntimeError("traced=True needs kernel='rw'")
    if info is not None:
        info["traced"] = fast is not None
    kept: list[MHState] = []
    accepted = 0.0
    total = burn_in + samples * thin
    with progress_bar(progress, desc="MH", unit=" steps", total=total) as bar:
        for i in range(total):
            if fast is not None:
                state, acc = fast.step(state)
            elif custom is not None:
                state, acc = custom.step(data, state, device)
            else:
                state, acc = mh_step(interp, entry, data, state, device, kernel=kernel, scale=scale)
            if i >= burn_in:
                accepted += float(acc.double().mean())
                if (i - burn_in) % thin == 0:
                    kept.append(state)
            bar.update(1)
    rate = accepted / max(1, total - burn_in)
    return kept, rate
