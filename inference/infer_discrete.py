"""The summed-out discrete choices of MCMC draws, drawn back afterwards (Pyro's ``infer_discrete``).

NUTS runs on a potential in which the choices marked ``@enumerate`` (or named in
``enumerate=[...]``) are summed out (``semantics.enumerate_sites``), so its draws hold the
continuous choices only. ``recover_discrete`` runs the program once more for all C * S draws
as particles: each continuous choice takes its drawn value (``fixed``), and every enumerated
choice is drawn from its conditional given them (the enumerating interpreter's recovery), so
each kept draw (theta, z) has theta from the marginal chain and z ~ p(z | theta, data): a draw
from the joint posterior. The weights of that run are not used (the factors it reports are
the marginal likelihood at theta, already accounted for by the chain).
"""
from __future__ import annotations

import dataclasses

import torch

from ..semantics.enumerate_sites import Enumerating
from ..semantics.sampling import Weighting, column, drive, fixed, prior
from ..semantics.values import Particles, lineage_scope
from .diagnostics import site_diagnostics
from .population import Chains


def recover_discrete(chains: Chains, interp, entry: str, data: dict, device="cpu", randomness=None) -> Chains:
    """``chains`` with the enumerated choices (and a return value that depends on them)
    drawn per kept draw from their conditional given the draw's continuous values."""
    if not isinstance(interp, Enumerating):
        return chains
    n = chains.chains * chains.draws
    columns = {a: v for a, (v, _) in chains.sites.items() if a != "return" and isinstance(v, torch.Tensor)}
    given, draw = fixed(columns), prior(randomness)

    def choose(h, eff):
        return given(h, eff) if eff.addr in columns else draw(h, eff)

    h = Weighting(n, device, choose=choose)
    ctx = Particles.all(n, device)
    with lineage_scope(None):
        ret = drive(interp.with_recovery().run(entry, data, ctx), h)
    new = {a: s for a, s in h.trace.sites().items() if a not in chains.sites}
    if not new:
        return chains
    sites = dict(chains.sites)
    sites.update(new)
    sites["return"] = (column(ret, ctx), None)  # (it may depend on the drawn choices)
    r_hat, ess = site_diagnostics({a: sites[a] for a in new}, chains.chains, chains.draws, components=True)
    return dataclasses.replace(chains, sites=sites, r_hat={**chains.r_hat, **r_hat}, ess={**chains.ess, **ess},
                               extra={**chains.extra, "recovered": sorted(new)})
