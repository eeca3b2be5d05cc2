"""Resampling: choose N ancestors in proportion to the weights.

Invariant (unbiasedness): every scheme draws ancestor counts C_i with E[C_i] = N w_i
(w normalised), so replacing the weighted population by the equally weighted resampled
one preserves the measure in expectation: E[(1/N) sum_j f(x_{a_j})] = sum_i w_i f(x_i).
The exact checker (``ppl.testing.validity``) verifies this by enumerating every outcome
of every scheme on small populations.

Numerics: cumulative sums are taken in float64 and the uniforms are scaled by the actual
total, so a float32 cumulative sum that ends below 1 can never produce an index out of
range; and an index is never given to a particle of zero weight (a search for u returns
the first i with cdf_i > u, and any overshoot is clamped to the last particle of positive
weight).
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def normalised(log_weights: torch.Tensor) -> torch.Tensor:
    """Normalised weights (float64) from log weights; raises if all are -inf."""
    lw = log_weights.double()
    m = lw.max()
    if not torch.isfinite(m):
        raise ValueError("cannot resample: every weight is zero")
    w = torch.exp(lw - m)
    return w / w.sum()


def ess(log_weights: torch.Tensor) -> float:
    """Effective sample size 1 / sum(w^2) of normalised weights."""
    w = normalised(log_weights)
    return float(1.0 / (w * w).sum())


def _search(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices i with cdf_{i-1} <= u < cdf_i for uniforms u in [0, 1)."""
    cdf = torch.cumsum(w, 0)
    idx = torch.searchsorted(cdf, u * cdf[-1], right=True)
    # the last particle of positive weight (usually the last one: no search needed)
    last = w.shape[0] - 1 if float(w[-1]) > 0 else int(torch.nonzero(w > 0).max())
    return idx.clamp_(max=last)


_ARANGE: dict = {}


def _arange(n: int, device) -> torch.Tensor:
    """torch.arange(n) in float64 on ``device``, cached (never written to)."""
    key = (n, str(device))
    t = _ARANGE.get(key)
    if t is None:
        if len(_ARANGE) >= 16:
            _ARANGE.clear()
        t = _ARANGE[key] = torch.arange(n, dtype=torch.float64, device=device)
    return t


def multinomial(w: torch.Tensor, n: int) -> torch.Tensor:
    """n independent draws from the categorical distribution w."""
    u = torch.rand(n, dtype=torch.float64, device=w.device)
    return torch.sort(_search(w, u)).values


def stratified(w: torch.Tensor, n: int) -> torch.Tensor:
    """One uniform in each stratum [k/n, (k+1)/n)."""
    u = (_arange(n, w.device) + torch.rand(n, dtype=torch.float64, device=w.device)) / n
    return _search(w, u)


def systematic(w: torch.Tensor, n: int) -> torch.Tensor:
    """One shared uniform offset: u_k = (k + U) / n."""
    u = (_arange(n, w.device) + torch.rand((), dtype=torch.float64, device=w.device)) / n
    return _search(w, u)


def residual(w: torch.Tensor, n: int) -> torch.Tensor:
    """floor(n w_i) copies of each i, the remaining R draws multinomial on the residuals."""
    counts = torch.floor(n * w).long()
    r = n - int(counts.sum())
    base = torch.repeat_interleave(torch.arange(w.shape[0], device=w.device), counts)
    if r > 0:
        res = n * w - counts.to(w.dtype)
        res = res.clamp_(min=0)
        extra = multinomial(res / res.sum(), r)
        base = torch.cat([base, extra])
    return torch.sort(base).values


SCHEMES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def resample(log_weights: torch.Tensor, scheme: str = "systematic", n: int | None = None) -> torch.Tensor:
    """Ancestor indices (long, on the weights' device) drawn by ``scheme``."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling scheme '{scheme}' (choose from {', '.join(SCHEMES)})")
    w = normalised(log_weights)
    return SCHEMES[scheme](w, n if n is not None else w.shape[0])


def log_mean_exp(log_weights: torch.Tensor) -> float:
    lw = log_weights.double()
    m = lw.max()
    if not torch.isfinite(m):
        return -math.inf
    return float(m + torch.log(torch.exp(lw - m).mean()))
