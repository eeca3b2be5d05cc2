"""Monte Carlo error bars for testing weighted results against known truths.

Every function here works on a :class:`ppl.WeightedResult` (or its raw log weights)
in float64 and returns a standard error, so that tests can say "the estimate is within
``z`` standard errors of the truth" instead of picking an ad-hoc tolerance.

* Self-normalised importance sampling (SNIS): a posterior expectation is estimated by
  the ratio ``sum_i w_i g_i / sum_i w_i h_i`` (h = 1 for a plain mean, h = the presence
  mask for a site that exists only on some paths). Its delta-method standard error is
  ``sqrt(sum_i wbar_i^2 (g_i - r h_i)^2) / sum_i wbar_i h_i`` with ``wbar`` the
  normalised weights and r the ratio (the truth, when known, is the better centre).
  For h = 1 and a constant f this is ``sd / sqrt(ESS)`` with Kish's ESS = 1/sum wbar^2.
* The evidence: ``Zhat = mean_i W_i`` (W_i = exp(lw_i)) is unbiased for Z with standard
  error ``sd(W) / sqrt(N)``; the delta-method standard error of ``log Zhat`` is
  ``sd(W) / (sqrt(N) mean(W))``.

These estimates of the error are themselves random; they are reliable when the ESS is
in the hundreds or more, which the tests ensure by their choice of N.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch


def normalised_weights(result) -> torch.Tensor:
    """The normalised weights of a WeightedResult, float64 [N]."""
    return result.weights.to(torch.float64)


def as_float64(values: Any) -> torch.Tensor:
    """A site's values (tensor or list of numbers/bools) as a float64 tensor [N, ...]."""
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64)
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def ratio_se(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor | None = None,
             centre: float | None = None) -> tuple[float, float]:
    """(estimate, delta-method SE) of the SNIS ratio sum w g / sum w h (h defaults to 1).

    ``centre``: the value r to linearise around (default: the estimate itself)."""
    w = w.to(torch.float64)
    g = g.to(torch.float64)
    h = torch.ones_like(g) if h is None else h.to(torch.float64)
    denom = float((w * h).sum())
    if denom <= 0:
        return math.nan, math.nan
    est = float((w * g).sum()) / denom
    r = est if centre is None else float(centre)
    se = math.sqrt(float((w * w * (g - r * h) ** 2).sum())) / denom
    return est, se


def snis(result, f: Callable[[torch.Tensor], torch.Tensor] | None = None, name: str = "return",
         centre: float | None = None) -> tuple[float, float]:
    """(estimate, SE) of E_post[f(site)] from a WeightedResult, conditional on the site
    existing when it has a presence mask. ``f`` maps the float64 values [N] to [N]."""
    site = result.sites[name]
    x = as_float64(site.value)
    g = x if f is None else f(x)
    h = None if site.present is None else site.present.to(torch.float64)
    if h is not None:
        g = torch.where(h > 0, g, torch.zeros_like(g))  # absent entries are placeholders
    return ratio_se(normalised_weights(result), g, h, centre)


def evidence_se(log_weights: torch.Tensor) -> tuple[float, float]:
    """(log Zhat, delta-method SE of log Zhat) from raw log weights [N].

    The SE is ``sd(W) / (sqrt(N) mean(W))`` (W = exp(log_weights)): the standard error
    of Zhat relative to Zhat, so ``|Zhat / Z - 1| <= z * se`` is the matching test of
    the (unbiased) evidence itself."""
    lw = log_weights.detach().to("cpu", torch.float64)
    n = lw.shape[0]
    m = float(lw.max())
    if m == -math.inf:
        return -math.inf, math.nan
    W = torch.exp(lw - m)
    mean = float(W.mean())
    sd = float(W.std(unbiased=True)) if n > 1 else 0.0
    return m + math.log(mean), sd / (math.sqrt(n) * mean)


def describe(estimate: float, truth: float, se: float) -> str:
    """A one-line account of a comparison, for assertion messages."""
    zs = abs(estimate - truth) / se if se > 0 else math.inf
    return f"estimate {estimate:.6g} vs truth {truth:.6g}: |diff| = {abs(estimate - truth):.3g} = {zs:.2f} SE (SE {se:.3g})"


def particle_keys(site) -> list:
    """One hashable plain-Python key per particle of a Site (as ``marginal`` keys them:
    tensors to scalars/tuples, lists to tuples)."""
    from ppl.result import _to_key
    v = site.value
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        items = v.tolist()
    else:
        items = list(v)
    return [_to_key(x) for x in items]


def kish_se(w: torch.Tensor, h: torch.Tensor | None, p: float) -> float:
    """sqrt(p (1 - p) / ESS), ESS = (sum w h)^2 / sum w^2 h (Kish's, over the particles
    where h = 1): the binomial SE of a probability p from ESS equally weighted draws.

    It is a floor under the delta-method SE for table cells: a cell of tiny true
    probability that no particle hit has a delta-method SE (linearised at the truth) of
    only p / sqrt(ESS), while missing it is entirely expected when p * ESS is small."""
    w = w.to(torch.float64)
    if h is not None:
        w = w * h.to(torch.float64)
    s2 = float((w * w).sum())
    if s2 == 0:
        return math.inf
    ess = float(w.sum()) ** 2 / s2
    return math.sqrt(max(p * (1 - p), 0.0) / ess)


def table_discrepancies(weighted, exact, name: str = "return", z: float = 4.5) -> list[str]:
    """Compare a weighted result's marginal of ``name`` with an exact one, cell by cell.

    For every value v of either table, the SNIS estimate of P(name = v | name exists)
    must be within ``z`` SEs of the exact probability, the SE being the larger of the
    delta-method SE linearised at the exact value (right when the weights correlate with
    the value) and Kish's binomial SE ``kish_se`` (right for rare cells); a value
    of positive weight that the exact table lacks is an error at once. The presence
    probability of the site is compared the same way. Returns the failures as text
    (empty when everything agrees)."""
    out = []
    w = normalised_weights(weighted)
    truth = {k: float(p) for k, p in exact.probs(name).items()}
    site = weighted.sites.get(name)
    if site is None:
        return [f"{name}: the weighted result has no such site"]
    keys = particle_keys(site)
    h = None if site.present is None else site.present.to(torch.float64)
    pos = w > 0
    live = [k for k, ok, p in zip(keys, pos.tolist(), ([True] * len(keys) if h is None else h.bool().tolist()))
            if ok and p]
    extra = set(live) - set(truth)
    if extra:
        out.append(f"{name}: values {sorted(map(repr, extra))[:5]} have positive weight but probability 0")
    for v, p in truth.items():
        g = torch.tensor([1.0 if _same(k, v) else 0.0 for k in keys], dtype=torch.float64)
        if h is not None:
            g = g * h
        est, se = ratio_se(w, g, h, centre=p)
        se = max(se, kish_se(w, h, p))
        if not (abs(est - p) <= z * se):
            out.append(f"{name} = {v!r}: {describe(est, p, se)}")
    pres_true = float(exact.presence(name))
    if h is not None or pres_true != 1:
        hh = torch.ones_like(w) if h is None else h
        est, se = ratio_se(w, hh, centre=pres_true)
        if not (abs(est - pres_true) <= z * se or (se == 0 and est == pres_true)):
            out.append(f"presence of {name}: {describe(est, pres_true, se)}")
    return out


def _same(a, b) -> bool:
    """Equal values, with booleans kept apart from the numbers 0 and 1."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def mcmc_chains(result, name: str) -> torch.Tensor:
    """An MCMC result's draws of a site as float64 [chains, draws]."""
    v = result.samples[name]
    v = v if isinstance(v, torch.Tensor) else torch.tensor([float(x) for x in v])
    return v.to(torch.float64).reshape(result.chains, result.draws)


def mcmc_ess(x: torch.Tensor) -> float:
    """Effective sample size of draws [chains, draws] (``pyro.ops.stats``)."""
    from pyro.ops.stats import effective_sample_size
    return float(effective_sample_size(x, chain_dim=0, sample_dim=1))

