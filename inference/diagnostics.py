"""Diagnostics: MCMC draws laid out per chain, split R-hat and effective sample size;
and the rules that turn any result's diagnostics into warnings.

R-hat and ESS are ``pyro.ops.stats``'s split Gelman-Rubin and Geyer's initial monotone
sequence ESS (``split_r_hat``, ``mcmc_ess``: the same formulas, computed in one pass of
contiguous tensor operations with one inverse FFT per site instead of one per chain, so
diagnosing 1000 chains costs a few FFTs), on [chains, draws] arrays of each scalar
numeric site that every draw has.

Warnings (``PPLDiagnosticWarning``; the messages are also a result's ``warnings``):

* MCMC: split R-hat above ``R_HAT_MAX`` = 1.01 at any site (the chains disagree), or an
  effective sample size below ``MCMC_ESS_MIN`` = 100 at any site.
* HMC/NUTS, besides: any divergent transition after warm-up, more than 1% of the draws at
  the maximum tree depth, an energy BFMI below ``BFMI_MIN`` = 0.3 in some chain (Stan's
  rules).
* Weighted populations: an ESS below ``ess_floor(N)`` = 1% of N, at least 10 (N/10 when
  N < 100) and at most 100 -- for resampling methods the ESS measured *before* the last
  resampling (the ESS after it reads N whatever happened); a Pareto k above
  ``PARETO_K_MAX`` = 0.7 (importance weights with too heavy a tail: the estimates are
  unreliable, Vehtari et al. 2015/2024); a collapsed population: fewer distinct particles
  than ``ess_floor(N)`` (the number of distinct particles bounds the effective sample
  size), or, for methods whose MH moves should make particles distinct again
  (``tempering``, ``resample_move``), less than ``UNIQUE_MIN_FRACTION`` = 1/4 of them
  distinct. Distinct particles are counted by their continuous choices only (discrete
  choices repeat in any healthy population; a model without one is not counted).
"""
from __future__ import annotations

import math
import warnings

import torch
from pyro.ops.tensor_utils import next_fast_len

from ..semantics.errors import PPLDiagnosticWarning

R_HAT_MAX = 1.01
MCMC_ESS_MIN = 100.0
PARETO_K_MAX = 0.7
UNIQUE_MIN_FRACTION = 0.25
BFMI_MIN = 0.3
MAX_DEPTH_FRACTION = 0.01
MOVING_METHODS = ("tempering", "resample_move")


def ess_floor(n: int) -> float:
    """The smallest acceptable ESS of a weighted population of ``n`` particles: 1% of n,
    at least 10 (n / 10 when n < 100), at most 100."""
    return min(100.0, max(min(10.0, n / 10.0), 0.01 * n))


def ess_before_last_resampling(history: list, final_ess: float) -> float:
    """The ESS that a resampled population had before its last resampling: from the last
    synchronisation checkpoint's record when it resampled (the smaller of that and the
    final ESS, which weights added after it may lower), else the final ESS."""
    if history and history[-1].resampled:
        return min(float(history[-1].ess), float(final_ess))
    return float(final_ess)


def weighted_warnings(method: str, n: int, ess: float, *, resampled: bool = False,
                      pareto_k: float | None = None, unique: int | None = None) -> list[str]:
    """The warnings for a weighted population of ``n`` particles (see the module
    docstring). ``ess``: the ESS to judge (for a resampled population, the one before the
    last resampling); ``unique``: the number of distinct particles (None: not counted)."""
    out = []
    floor = ess_floor(n)
    if resampled and ess < floor:
        out.append(f"{method}: the effective sample size before the last resampling is {ess:.1f} "
                   f"of {n} particles (below {floor:g}): the population rests on a few particles; the ESS after "
                   "resampling hides this. Use more particles, a lower ess_threshold, or tempering")
    elif not resampled and ess < floor:
        out.append(f"{method}: the effective sample size is {ess:.1f} of {n} particles (below {floor:g}): the "
                   "estimates rest on a few particles. Use more particles or a better proposal (smc, tempering, "
                   "a guide)")
    if pareto_k is not None and math.isfinite(pareto_k) and pareto_k > PARETO_K_MAX:
        out.append(f"{method}: Pareto k = {pareto_k:.2f} (above {PARETO_K_MAX}): the importance weights have too "
                   "heavy a tail, the estimates (and the ESS) are unreliable. Use a better proposal (smc, "
                   "tempering, a guide)")
    if unique is not None:
        fraction = unique / n
        if unique < floor or (method in MOVING_METHODS and fraction < UNIQUE_MIN_FRACTION):
            out.append(f"{method}: the population has collapsed: only {unique} of {n} particles are distinct "
                       f"({fraction:.1%}). Use more particles" +
                       (" or more moves (-o moves=...)" if method in MOVING_METHODS else
                        ", a lower ess_threshold, or resample_move/tempering (MH moves)"))
    return out


def mcmc_warnings(method: str, r_hat: dict, ess_per_site: dict) -> list[str]:
    """The warnings for MCMC draws: R-hat above R_HAT_MAX, ESS below MCMC_ESS_MIN (the
    worst site of each, naming it)."""
    out = []
    finite_r = {k: v for k, v in r_hat.items() if math.isfinite(v)}
    if finite_r:
        site, worst = max(finite_r.items(), key=lambda kv: kv[1])
        if worst > R_HAT_MAX:
            out.append(f"{method}: split R-hat is {worst:.3f} at '{site}' (above {R_HAT_MAX}): the chains disagree, "
                       "they have not converged. Run longer (--samples, --burn-in) or with more chains")
    finite_e = {k: v for k, v in ess_per_site.items() if math.isfinite(v)}
    if finite_e:
        site, least = min(finite_e.items(), key=lambda kv: kv[1])
        if least < MCMC_ESS_MIN:
            out.append(f"{method}: the effective sample size is {least:.1f} at '{site}' (below {MCMC_ESS_MIN:g}): "
                       "the draws are too autocorrelated for reliable estimates. Run longer or thin less")
    return out


def gradient_warnings(method: str, extra: dict) -> list[str]:
    """The warnings of HMC/NUTS draws (Stan's): divergent transitions after warm-up, draws
    that hit the maximum tree depth (more than ``MAX_DEPTH_FRACTION`` of them), a chain
    whose energy BFMI is below ``BFMI_MIN``."""
    out = []
    divergences = int(extra.get("divergences") or 0)
    if divergences > 0:
        out.append(f"{method}: {divergences} divergent transition{'s' if divergences != 1 else ''} after warm-up: "
                   "the sampler cannot follow the posterior's curvature there, so the draws may be biased. "
                   "Reparameterise (e.g. a non-centred hierarchical model) or raise target_accept "
                   "(-o target_accept=0.95)")
    hit = extra.get("hit_max_tree_depth")
    if hit is not None and hit > MAX_DEPTH_FRACTION:
        out.append(f"{method}: {hit:.1%} of the draws hit the maximum tree depth ({extra.get('max_tree_depth')}): "
                   "the trajectories were cut short, the chains explore slowly. For strongly correlated "
                   "parameters use a dense mass matrix (-o dense_mass=auto: dense for up to 10 parameters, "
                   "started from the posterior's curvature; or -o dense_mass=true); else raise max_tree_depth or "
                   "reparameterise")
    low = [(c, b) for c, b in enumerate(extra.get("bfmi") or ()) if math.isfinite(b) and b < BFMI_MIN]
    if low:
        c, b = min(low, key=lambda cb: cb[1])
        out.append(f"{method}: the energy BFMI of chain {c} is {b:.2f} (below {BFMI_MIN}): the momentum "
                   "resampling cannot move the energy enough; the chain may not explore the tails. "
                   "Reparameterise, or use a dense mass matrix (-o dense_mass=true)")
    return out


def count_distinct(sites: dict, present: dict | None = None) -> int | None:
    """The number of distinct particles by the values of their *continuous* choices
    (float sites, other than "return", with a value that is not a whole number; ``sites``:
    name -> [N, ...] values, ``present``: name -> mask or None), or None when there is no
    continuous choice. Independent draws of a continuous choice never coincide, so a
    repeated value is a copy made by resampling that no MH move has changed since;
    discrete choices repeat in any healthy population and are left out."""
    cols = []
    for name, v in sites.items():
        if name == "return" or not isinstance(v, torch.Tensor) or v.dim() == 0 or not v.is_floating_point():
            continue
        x = v.detach().reshape(v.shape[0], -1).to(torch.float64)
        mask = (present or {}).get(name)
        if mask is not None:  # absent values do not count; presence does
            m = torch.as_tensor(mask).reshape(-1, 1).to(x.device)
            x = torch.cat([torch.where(m, x, torch.zeros_like(x)), m.to(x.dtype)], 1)
            seen = x[:, :-1][m.expand(-1, x.shape[1] - 1)]
        else:
            seen = x
        seen = seen[torch.isfinite(seen)]
        if bool((seen != seen.round()).any()):
            cols.append(x.cpu())
    if not cols:
        return None
    return int(torch.unique(torch.cat(cols, 1), dim=0).shape[0])


def emit(messages: list[str], stacklevel: int = 3) -> None:
    """Each message as a ``PPLDiagnosticWarning``."""
    for msg in messages:
        warnings.warn(msg, PPLDiagnosticWarning, stacklevel=stacklevel + 1)


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
            ess[name] = float(mcmc_ess(x))
            if C >= 2:
                r_hat[name] = float(split_r_hat(x))
        elif components and v.dim() > 1 and v.dtype != torch.bool:
            shape = tuple(v.shape[1:])
            x = v.reshape(C, S, -1).double().permute(2, 0, 1)  # [K, C, S]
            varies = ~(x == x[:, :1, :1]).reshape(x.shape[0], -1).all(1)
            e = mcmc_ess(x).tolist()
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


def mcmc_ess(x: torch.Tensor) -> torch.Tensor:
    """The effective sample size of draws ``x`` [..., chains, draws] (float64), as
    ``pyro.ops.stats.effective_sample_size`` (Stan's multi-chain autocorrelation, Geyer's
    initial monotone sequence): C * S / tau with tau = -1 + 2 sum of the monotone,
    positive sums of pairs of autocorrelations. The mean over chains of their
    autocovariances at lag k, sum_c sum_s x_cs x_c(s+k) / (C (S - k)) on centred chains, is
    one inverse FFT of the chains' summed power spectra. Returns [...]."""
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
            ess[name] = float(mcmc_ess(xd))
            if C >= 2:
                r_hat[name] = float(split_r_hat(xd))
    return sites, r_hat, ess
