"""Particle marginal Metropolis-Hastings (Andrieu, Doucet & Holenstein 2010).

The user names some of the model's random choices as *parameters* (``params=["q"]``).
PMMH runs a Markov chain on them: propose theta' by a Gaussian random walk in the
unconstrained space of each parameter's support, run SMC on the rest of the model with
theta' fixed, and accept with probability

    min(1, [Z_hat(theta') p(theta') |J(theta')|] / [Z_hat(theta) p(theta) |J(theta)|])

where Z_hat is SMC's unbiased estimate of p(data | theta) and J the Jacobian of the map
from the unconstrained space. With each accepted theta, one trajectory is drawn from
SMC's final weighted population.

Invariant: because Z_hat is unbiased and positive, the chain leaves the exact joint
posterior p(theta, x | data) invariant for any number of particles (more particles only
make it mix better).
"""
from __future__ import annotations

import math

import torch

from ..semantics.errors import PPLRuntimeError
from ..stdlib import rng
from ..stdlib.progress import progress_bar
from ..semantics.sampling import column, drive
from ..semantics.values import Batched, Lineage, Particles, set_lineage, rows
from .resampling import resample
from .smc import SMCHandler


class _FixedParams(SMCHandler):
    """SMC in which the parameter choices take given values (their prior log density and
    support are recorded, not weighted)."""

    def __init__(self, *args, params: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.params = params          # address -> float (or None: draw it, for initialisation)
        self.log_prior = 0.0
        self.supports: dict = {}

    def sample(self, eff):
        if eff.addr not in self.params:
            return super().sample(eff)
        if eff.ctx.M != self.N:
            raise PPLRuntimeError(f"PMMH parameter '{eff.addr}' must be drawn by every particle (not inside a "
                                  "random branch)", eff.span)
        given = self.params[eff.addr]
        if given is None:  # initialisation: draw from the prior, the same for all particles
            one = Particles(eff.ctx.idx[:1], eff.ctx.N, eff.ctx.device, eff.ctx.full)
            given = rows(eff.dist.sample(one), one)[0]
            self.params[eff.addr] = given.double()
        value = Batched(torch.as_tensor(given, device=eff.ctx.device).expand(eff.ctx.M).clone(), eff.ctx.idx)
        lp = eff.dist.log_prob(value, eff.ctx)
        lp = lp[0] if lp.dim() else lp
        self.log_prior += float(lp)
        self.supports[eff.addr] = eff.dist.torch_dist(
            Particles(eff.ctx.idx[:1], eff.ctx.N, eff.ctx.device, eff.ctx.full)).support
        self.trace.record(eff.addr, eff.ctx, value)
        return value


def _smc_given(interp, entry, data, N, device, params, resampling, ess_threshold):
    ctx = Particles.all(N, device)
    lineage = Lineage(ctx.idx)
    h = _FixedParams(N, device, lineage, resampling=resampling, ess_threshold=ess_threshold, params=dict(params))
    old = set_lineage(lineage)
    try:
        ret = drive(interp.run(entry, data, ctx), h)
        lw = h.log_weights + h.log_z
        missing = [a for a in params if a not in h.supports]
        if missing:
            raise PPLRuntimeError(f"PMMH: the model has no random choice at address '{missing[0]}'",
                                  hint="name top-level choices, e.g. params=['q'] for `q ~ gamma(1, 1)`")
        # one trajectory, drawn in proportion to the final weights
        j = int(resample(lw, "multinomial", 1)[0])
        sites = {"return": column(ret, ctx)}
        sites.update({a: v for a, (v, _) in h.trace.sites().items()})
        pick = {a: (v[j] if isinstance(v, torch.Tensor) else v[j]) for a, v in sites.items()}
    finally:
        set_lineage(old)
    log_z = float(torch.logsumexp(lw.double(), 0) - math.log(N))
    return log_z, h, pick


def pmmh(interp, entry: str, data: dict, params: list, *, particles: int = 100, samples: int = 500,
         burn_in: int = 100, scale: float = 0.2, device="cpu", resampling="systematic", ess_threshold=1.0,
         progress: bool | None = None):
    """Run one PMMH chain: returns (draws: list of dicts address -> value, acceptance rate)."""
    if not params:
        raise PPLRuntimeError("PMMH needs params=[...]: the addresses of the choices to run MH on")
    theta = {a: None for a in params}
    log_z, h, pick = _smc_given(interp, entry, data, particles, device, theta, resampling, ess_threshold)
    theta, supports, log_prior = h.params, h.supports, h.log_prior
    for _ in range(100):  # start where the estimate is positive
        if math.isfinite(log_z) and math.isfinite(log_prior):
            break
        log_z, h, pick = _smc_given(interp, entry, data, particles, device, {a: None for a in params},
                                    resampling, ess_threshold)
        theta, supports, log_prior = h.params, h.supports, h.log_prior
    maps = {a: torch.distributions.biject_to(supports[a]) for a in params}
    draws, accepted = [], 0
    with progress_bar(progress, desc="PMMH", unit=" steps", total=burn_in + samples) as bar:
        for i in range(burn_in + samples):
            y = {a: maps[a].inv(torch.as_tensor(theta[a], dtype=torch.float64)) for a in params}
            y2 = {a: y[a] + scale * rng.randn_like(y[a]) for a in params}
            theta2 = {a: maps[a](y2[a]) for a in params}
            jac = sum(float(maps[a].log_abs_det_jacobian(y[a], theta[a] if isinstance(theta[a], torch.Tensor)
                                                         else torch.as_tensor(theta[a])).sum()) for a in params)
            jac2 = sum(float(maps[a].log_abs_det_jacobian(y2[a], theta2[a]).sum()) for a in params)
            try:
                log_z2, h2, pick2 = _smc_given(interp, entry, data, particles, device, theta2, resampling,
                                               ess_threshold)
                log_prior2 = h2.log_prior
            except PPLRuntimeError:
                log_z2, log_prior2 = -math.inf, -math.inf
            log_alpha = (log_z2 + log_prior2 + jac2) - (log_z + log_prior + jac)
            if math.isfinite(log_alpha) and math.log(max(1e-300, float(rng.rand(())))) < log_alpha:
                theta, log_z, log_prior, pick = theta2, log_z2, log_prior2, pick2
                accepted += i >= burn_in
            if i >= burn_in:
                draws.append(pick)
            bar.update(1)
    return draws, accepted / max(1, samples)
