"""The rules that turn a result's diagnostics into warnings for people (the numbers they
judge, split R-hat and ESS, are computed by ``inference.diagnostics``).

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

from ..inference.diagnostics import ess_floor
from ..semantics.errors import PPLDiagnosticWarning

R_HAT_MAX = 1.01
MCMC_ESS_MIN = 100.0
PARETO_K_MAX = 0.7
UNIQUE_MIN_FRACTION = 0.25
BFMI_MIN = 0.3
MAX_DEPTH_FRACTION = 0.01
MOVING_METHODS = ("tempering", "resample_move")


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
