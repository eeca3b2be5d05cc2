"""The discrete half of a Gibbs sweep through the potential's recorded graph: single-site
MH on discrete choices whose prior depends on no other choice, without running the
interpreter.

``gradient_mcmc._gibbs`` alternates MH on each chain's discrete choices with a NUTS/HMC
transition on the continuous ones. Its general discrete move re-executes the program
(``gfi.generate`` + ``gfi.regenerate`` per site: three interpreter runs a sweep, which
for the change-point model over 60 years was ~80% of the run once the potential itself
was a graph). When the potential is traced, the discrete values are inputs of its graph,
so the joint density at other discrete values is one graph evaluation:

    target      pi(z, d) = the potential at z with the discrete choices held at d
                (``inference.potential``; it includes each discrete choice's log prior)
    proposal    d'_a ~ p_a, the prior of site a: the same distribution at every point,
                because the dependency analysis (``semantics.dependencies``) finds that
                it depends on no choice (no parent: data and constants only)
    acceptance  log alpha = [log pi(z, d') - log p_a(d'_a)] - [log pi(z, d) - log p_a(d_a)]

with z held fixed. This is a Metropolis-Hastings kernel for pi(z, d) (an independence
proposal whose support is the prior's, which covers the posterior's), so it leaves the
joint invariant; with the NUTS/HMC transition on pi(z | d) the composition leaves pi(z, d)
invariant, and its image under z -> x = T(z) is the posterior. (The interpreter's sweep
holds x fixed instead of z; where a continuous choice's support does not depend on d the
two are the same move.) A proposal of density zero is rejected; NaN is a rejection.

Used only when every discrete choice qualifies (``build`` returns None otherwise, and the
interpreter's sweep runs as before).
"""
from __future__ import annotations

import math

import torch

from ..semantics.dependencies import analyse
from ..semantics.dist_values import DistValue
from ..semantics.sampling import drive
from ..semantics.values import Batched, Particles, is_batched, rows
from .hmc import State, evaluate
from .potential import Potential, _AtPoint


class _Recording(_AtPoint):
    """A run of the potential's program that also keeps each discrete choice's distribution."""

    def __init__(self, *args):
        super().__init__(*args)
        self.dists: dict = {}

    def sample(self, eff):
        if eff.addr in self.given:
            self.dists[eff.addr] = eff.dist
        return super().sample(eff)


class GraphSiteMoves:
    """Single-site MH on the discrete choices of a traced potential (module docstring)."""

    def __init__(self, potential: Potential, dists: dict):
        self.potential, self.dists = potential, dists
        self.ctx = Particles.all(potential.C, potential.device)
        self.proposed = 0
        self.accepted = 0

    @classmethod
    def build(cls, model, potential: Potential, z: torch.Tensor) -> "GraphSiteMoves | None":
        """The moves for ``potential`` (its continuous part at z [C, D]), or None unless it
        runs as a traced graph and every discrete choice has a prior that depends on no
        choice, is the same for every chain, and draws values of the held values' dtype
        and shape."""
        if not potential.traced or not potential.discrete:
            return None
        roots = _root_choices(model)
        if roots is None or not set(potential.discrete) <= roots:
            return None
        ctx = Particles.all(potential.C, potential.device)
        h = _Recording(potential.C, potential.device, potential.by_addr, z.detach(), potential.given)
        h.full_idx = ctx.idx
        try:
            with torch.no_grad():
                drive(model.interp.run(model.entry, model.data, ctx), h)
        except Exception:  # noqa: BLE001 - the interpreter's sweep decides (and reports) instead
            return None
        dists = {}
        for addr in potential.discrete:
            d = h.dists.get(addr)
            if type(d) is not DistValue or any(is_batched(a) for a in d.args):
                return None
            dists[addr] = d
        return cls(potential, dists)

    def sweep(self, state: State, randomness) -> State:
        """One systematic scan over the discrete choices at ``state.z`` [C, D] (whose
        ``logp``/``grad`` are log pi and its gradient there at the current values); leaves
        the potential holding the new values and returns the state there (log pi and
        gradient of the accepted proposals: no evaluation more)."""
        p, ctx = self.potential, self.ctx
        z, logp, grad = state.z, state.logp, state.grad
        for addr in p.discrete:
            d, current = self.dists[addr], p.given[addr]
            proposed = rows(randomness.sample(d, ctx), ctx)
            if proposed.dtype != current.dtype or proposed.shape != current.shape:
                proposed = proposed.to(current.dtype).reshape(current.shape)
            lq_new = _log_prior(d, proposed, ctx)
            lq_old = _log_prior(d, current, ctx)
            p.set_given({**p.given, addr: proposed})
            lp_new, grad_new = evaluate(p, z)
            log_alpha = (lp_new - lq_new) - (logp - lq_old)
            log_alpha = torch.where(torch.isnan(log_alpha), torch.full_like(log_alpha, -math.inf), log_alpha)
            accept = randomness.accept(log_alpha) & torch.isfinite(lp_new)
            keep = accept.reshape(-1, *([1] * (current.dim() - 1)))
            p.set_given({**p.given, addr: torch.where(keep, proposed, current)})
            logp = torch.where(accept, lp_new, logp)
            grad = torch.where(accept.unsqueeze(1), grad_new, grad)
            self.proposed += accept.numel()
            self.accepted += int(accept.sum())
        return State(z, logp, grad)


def _log_prior(d: DistValue, value: torch.Tensor, ctx: Particles) -> torch.Tensor:
    """log p_a(value) per chain (float64): the term the potential adds for the choice."""
    lp = d.log_prob(Batched(value, ctx.idx), ctx).double()
    return lp.expand(ctx.M) if lp.dim() == 0 else lp.reshape(ctx.M, -1).sum(1) if lp.dim() > 1 else lp


def _root_choices(model) -> set | None:
    """The addresses of the choices that depend on no choice (data and constants only), by
    the dependency analysis of the program on its data; None when it cannot tell."""
    interp = model.interp
    try:
        deps = analyse(interp.program, model.data, entry=model.entry, builtins=interp._purity_inputs[0], shapes=False)
    except Exception:  # noqa: BLE001 - no analysis: the interpreter's sweep
        return None
    if deps.from_traces:
        return None
    return {s.address for s in deps.sites if s.kind == "choice" and s.static and not s.parents}
