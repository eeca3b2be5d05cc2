"""MCMC diagnostics: draws laid out per chain, split R-hat and effective sample size.

R-hat and ESS come from ``pyro.ops.stats`` (split Gelman-Rubin; Geyer's initial
monotone sequence ESS), computed on [chains, draws] arrays of each scalar numeric site
that every draw has.
"""
from __future__ import annotations

import torch
from pyro.ops.stats import effective_sample_size, split_gelman_rubin


def chain_diagnostics(kept: list):
    """From the kept MH states (a list over draws of states over chains): (sites, r_hat,
    ess) where sites maps "return" and every address to (values, present) laid out
    chain-major ([chains * draws, ...])."""
    S = len(kept)
    C = kept[0].log_joint.shape[0]
    sites = {}
    rets = [k.ret for k in kept]
    if all(isinstance(r, torch.Tensor) for r in rets):
        stacked = torch.stack(rets, 1)  # [C, S, ...]
        sites["return"] = (stacked.reshape(C * S, *stacked.shape[2:]), None)
    else:
        cols = [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in rets]
        sites["return"] = ([cols[s][c] for c in range(C) for s in range(S)], None)
    addrs = []
    for k in kept:
        for a in k.values:
            if a not in addrs:
                addrs.append(a)
    for a in addrs:
        ref = next(k.values[a] for k in kept if a in k.values)
        vals = torch.stack([k.values.get(a, torch.zeros_like(ref)) for k in kept], 1)
        pres = torch.stack([k.present.get(a, torch.zeros(C, dtype=torch.bool, device=ref.device)) for k in kept], 1)
        present = pres.reshape(C * S)
        sites[a] = (vals.reshape(C * S, *vals.shape[2:]), None if bool(present.all()) else present)
    r_hat, ess = {}, {}
    for name, (v, present) in sites.items():
        if present is not None or not isinstance(v, torch.Tensor) or v.dim() != 1:
            continue
        x = v.reshape(C, S).double()
        if S < 4:
            continue
        if bool((x == x[0, 0]).all()):
            continue  # a constant site has no variance to diagnose
        ess[name] = float(effective_sample_size(x, chain_dim=0, sample_dim=1))
        if C >= 2:
            r_hat[name] = float(split_gelman_rubin(x, chain_dim=0, sample_dim=1))
    return sites, r_hat, ess


def draw_diagnostics(chains: list):
    """Like ``chain_diagnostics``, from chains given as lists of draws (dicts address ->
    value, with "return"): (sites, r_hat, ess)."""
    C, S = len(chains), len(chains[0])
    sites, r_hat, ess = {}, {}, {}
    for name in chains[0][0]:
        col = [[d[name] for d in ch] for ch in chains]
        try:
            x = torch.stack([torch.stack([torch.as_tensor(v) for v in ch]) for ch in col])  # [C, S, ...]
        except (TypeError, RuntimeError):
            sites[name] = ([v for ch in col for v in ch], None)
            continue
        sites[name] = (x.reshape(C * S, *x.shape[2:]), None)
        if x.dim() == 2 and S >= 4 and not bool((x == x[0, 0]).all()):
            xd = x.double()
            ess[name] = float(effective_sample_size(xd, chain_dim=0, sample_dim=1))
            if C >= 2:
                r_hat[name] = float(split_gelman_rubin(xd, chain_dim=0, sample_dim=1))
    return sites, r_hat, ess
