"""Diagnostics: MCMC draws laid out per chain, split R-hat and effective sample size.

R-hat and ESS are ``pyro.ops.stats``'s split Gelman-Rubin and Geyer's initial monotone
sequence ESS (``split_r_hat``, ``mcmc_ess``: the same formulas, computed in one pass of
contiguous tensor operations with one inverse FFT per site instead of one per chain, so
diagnosing 1000 chains costs a few FFTs), on [chains, draws] arrays of each scalar
numeric site that every draw has. The ESS the diagnostics report (``site_diagnostics``,
``draw_diagnostics``) is ``mcmc_ess(x, bounded=True)``: with Stan's and ArviZ's bound tau
>= 1 / log10(N), so antithetic chains get an ESS of at most N log10 N, never a negative one.

The rules that turn a result's diagnostics into warnings for people belong to the face
(``results/diagnostics.py`` of the Python face); ``ess_floor``, the ESS a weighted
population needs, is here.
"""
from __future__ import annotations

import math

import torch
from pyro.ops.tensor_utils import next_fast_len


def ess_floor(n: int) -> float:
    """The smallest acceptable ESS of a weighted population of ``n`` particles: 1% of n,
    at least 10 (n / 10 when n < 100), at most 100."""
    return min(100.0, max(min(10.0, n / 10.0), 0.01 * n))


def site_diagnostics(sites: dict, C: int, S: int, *, components: bool = False) -> tuple[dict, dict]:
    """(split R-hat, bulk ESS) per scalar numeric site that every draw has (``sites``: name
    -> (values [C * S, ...] chain-major, present)); with ``components``, also per
    component of a vector or matrix site, named like its summary row (``"eta[0]"``,
    ``"L[1,0]"``; a name that is already a site is skipped). Sites with fewer than 4 draws
    per chain, and constant ones, have neither."""
    r_hat, ess = {}, {}
    if S < 4:
        return r_hat, ess
    for name, (v, present) in sites.items():
        if present is not None or not isinstance(v, torch.Tensor):
            continue
        if v.dim() == 1:
            x = v.reshape(C, S).double()
            if bool((x == x[0, 0]).all()):
                continue  # a constant site has no variance to diagnose
            ess[name] = float(mcmc_ess(x, bounded=True))
            if C >= 2:
                r_hat[name] = float(split_r_hat(x))
        elif components and v.dim() > 1 and v.dtype != torch.bool:
            shape = tuple(v.shape[1:])
            x = v.reshape(C, S, -1).double().permute(2, 0, 1)  # [K, C, S]
            varies = ~(x == x[:, :1, :1]).reshape(x.shape[0], -1).all(1)
            e = mcmc_ess(x, bounded=True).tolist()
            r = split_r_hat(x).tolist() if C >= 2 else None
            for k in range(x.shape[0]):
                label = f"{name}[{','.join(str(int(i)) for i in _unravel(k, shape))}]"
                if label in sites or not bool(varies[k]):
                    continue
                ess[label] = e[k]
                if r is not None:
                    r_hat[label] = r[k]
    return r_hat, ess


def _unravel(k: int, shape: tuple) -> tuple:
    index = []
    for n in reversed(shape):
        index.append(k % n)
        k //= n
    return tuple(reversed(index))


def split_r_hat(x: torch.Tensor) -> torch.Tensor:
    """Split R-hat of draws ``x`` [..., chains, draws] (at least 4 draws, float64): each
    chain cut into its first and last half (the middle draw left out when the number is
    odd), then Gelman-Rubin's sqrt(var+ / W) over the 2 * chains halves, as
    ``pyro.ops.stats.split_gelman_rubin``. Returns [...]."""
    half = x.shape[-1] // 2
    halves = torch.cat([x[..., :half], x[..., -half:]], -2)  # [..., 2C, half]
    means = halves.mean(-1)
    within = (halves - means.unsqueeze(-1)).square().sum(-1).mean(-1) / (half - 1)
    return (((half - 1) / half * within + means.var(-1)) / within).sqrt()


def mcmc_ess(x: torch.Tensor, *, bounded: bool = False) -> torch.Tensor:
    """The effective sample size of draws ``x`` [..., chains, draws] (float64), as
    ``pyro.ops.stats.effective_sample_size`` (Stan's multi-chain autocorrelation, Geyer's
    initial monotone sequence): C * S / tau with tau = -1 + 2 sum of the monotone,
    positive sums of pairs of autocorrelations. The mean over chains of their
    autocovariances at lag k, sum_c sum_s x_cs x_c(s+k) / (C (S - k)) on centred chains, is
    one inverse FFT of the chains' summed power spectra. ``bounded``: tau is kept at least
    1 / log10(C * S), as Stan and ArviZ keep it (pyro does not): for antithetic chains (HMC
    with a few leapfrog steps on a near-Gaussian target: lag-1 autocorrelation near -1) the
    first pair sums to nearly 0 and tau alone is negative or tiny (an ESS of -1,900 or
    1,500 from 100 draws; -5 from 4 independent draws); the bound caps the ESS at
    C S log10(C S). Returns [...]."""
    C, S = x.shape[-2:]
    means = x.mean(-1)
    centred = x - means.unsqueeze(-1)
    n_fft = 2 * next_fast_len(S)
    spectrum = torch.fft.rfft(centred, n=n_fft)
    power = (spectrum.real.square() + spectrum.imag.square()).sum(-2)  # summed over chains
    lags = torch.arange(S, 0, -1, dtype=x.dtype, device=x.device)
    autocov = torch.fft.irfft(power, n=n_fft)[..., :S] / (C * lags)  # [..., S]
    within = centred.square().sum(-1).mean(-1, keepdim=True) / (S - 1)  # mean of the chains' variances
    if C > 1:
        estimator = (S - 1) / S * within + means.var(-1).unsqueeze(-1)
    else:
        within = estimator = (S - 1) / S * within
    rho = (estimator - within + autocov) / estimator
    rho[..., 0] = 1.0
    pairs = rho[..., :2 * (S // 2)].reshape(*rho.shape[:-1], S // 2, 2).sum(-1)
    tau = -1 + 2 * pairs[..., 0]
    if pairs.shape[-1] > 1:
        tau = tau + 2 * pairs[..., 1:].clamp(min=0).cummin(-1).values.sum(-1)
    if bounded and C * S > 1:
        tau = tau.clamp(min=1 / math.log10(C * S))
    return C * S / tau


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
        absent, nowhere = torch.zeros_like(ref), torch.zeros(C, dtype=torch.bool, device=ref.device)
        vals = torch.stack([k.values[a] if a in k.values else absent for k in kept], 1)
        pres = torch.stack([k.present[a] if a in k.present else nowhere for k in kept], 1)
        present = pres.reshape(C * S)
        sites[a] = (vals.reshape(C * S, *vals.shape[2:]), None if bool(present.all()) else present)
    r_hat, ess = site_diagnostics(sites, C, S)
    return sites, r_hat, ess


def draw_diagnostics(chains: list):
    """Like ``chain_diagnostics``, from chains given as lists of draws (dicts address ->
    value, with "return"; an address a draw lacks is absent there): (sites, r_hat, ess)."""
    C, S = len(chains), len(chains[0])
    sites, r_hat, ess = {}, {}, {}
    for name in dict.fromkeys(a for ch in chains for d in ch for a in d):
        filler = next(d[name] for ch in chains for d in ch if name in d)
        col = [[d.get(name, filler) for d in ch] for ch in chains]
        present = torch.tensor([name in d for ch in chains for d in ch])
        present = None if bool(present.all()) else present
        try:
            x = torch.stack([torch.stack([torch.as_tensor(v) for v in ch]) for ch in col])  # [C, S, ...]
        except (TypeError, RuntimeError):
            sites[name] = ([v for ch in col for v in ch], present)
            continue
        sites[name] = (x.reshape(C * S, *x.shape[2:]), present)
        if present is None and x.dim() == 2 and S >= 4 and not bool((x == x[0, 0]).all()):
            xd = x.double()
            ess[name] = float(mcmc_ess(xd, bounded=True))
            if C >= 2:
                r_hat[name] = float(split_r_hat(xd))
    return sites, r_hat, ess
