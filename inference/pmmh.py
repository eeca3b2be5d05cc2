"""Particle marginal Metropolis-Hastings (Andrieu, Doucet & Holenstein 2010): SMC inside MH.

The user names some of the model's random choices as *parameters* (``params=["q"]``).
PMMH composes two pieces:

* ``smc_estimate(theta)``: SMC (``smc.smc``) on the rest of the model with the
  parameters fixed at theta, giving Z_hat(theta), an unbiased estimate of
  p(data | theta), and one trajectory drawn from its final weighted population;
* ``pmmh_step``: a Metropolis-Hastings step on theta with Z_hat in place of the
  likelihood. The proposal (``kernel``) is "rw" (the default, for continuous
  parameters): a Gaussian random walk of size ``scale`` in the unconstrained space of
  each parameter's support, accepted with probability
      min(1, [Z_hat(theta') p(theta') |J(theta')|] / [Z_hat(theta) p(theta) |J(theta)|]);
  or "prior" (any parameters, discrete ones included): an independent draw
  theta' ~ p(theta), accepted with probability min(1, Z_hat(theta') / Z_hat(theta)).

Invariant: the chain on (theta, trajectory x, Z_hat) leaves invariant the extended target
p(theta) P_theta(x, Z_hat) Z_hat / p(data), P_theta the law of SMC's output at theta.
Since Z_hat is unbiased and the trajectory pick is proper, its marginal on (theta, x) is
the exact posterior p(theta, x | data) for any number of particles (more particles only
make the chain mix better). Every draw (the parameters, SMC's prior draws and resampling,
the trajectory pick, the random walk, the accept test) goes through the ``randomness``
object, so the exact checker (testing/validity.py, ``pmmh_kernel_check``) builds this
kernel exactly on small finite programs and checks pi K = pi.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from ..semantics.errors import PPLRuntimeError, ZeroEvidenceError
from ..semantics.values import Batched, Particles, rows
from ..stdlib.progress import progress_bar
from .diagnostics import draw_diagnostics
from .population import Chains
from .randomness import TorchRandomness
from .smc import SMCHandler, smc

KERNELS = ("rw", "prior")


@dataclass
class PMMHState:
    """A state of the chain: theta, log p(theta), log Z_hat(theta) and the trajectory drawn."""
    theta: dict       # parameter address -> value (a tensor)
    log_prior: float
    log_z: float      # -inf when every particle died (then ``pick`` is empty)
    pick: dict        # "return" and every site of one particle -> its value
    supports: dict    # parameter address -> its distribution's support (a torch constraint)
    spans: dict       # parameter address -> source span of its choice


class _FixedParams(SMCHandler):
    """SMC in which the parameter choices take given values (None: drawn from the prior,
    once for all particles); their prior log density is recorded, not weighted."""

    def __init__(self, *args, params: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.params, self.log_prior, self.supports, self.spans = dict(params), 0.0, {}, {}

    def sample(self, eff):
        if eff.addr not in self.params:
            return super().sample(eff)
        ctx = eff.ctx
        if ctx.M != self.N:
            raise PPLRuntimeError(f"PMMH parameter '{eff.addr}' must be drawn by every particle (not inside a "
                                  "random branch)", eff.span)
        one = Particles(ctx.idx[:1], ctx.N, ctx.device, ctx.full)
        if self.params[eff.addr] is None:
            self.params[eff.addr] = rows(self.randomness.sample(eff.dist, one), one)[0]
        value = Batched(torch.as_tensor(self.params[eff.addr], device=ctx.device).expand(ctx.M).clone(), ctx.idx)
        lp = torch.as_tensor(self.log_prob(eff.dist, value, ctx), dtype=torch.float64).reshape(-1)
        if not bool((lp == lp[0]).all()):
            raise PPLRuntimeError(f"PMMH parameter '{eff.addr}' has a different prior in different particles",
                                  eff.span, "its distribution may depend only on data and other parameters")
        self.log_prior += float(lp[0])
        self.supports[eff.addr], self.spans[eff.addr] = eff.dist.torch_dist(one).support, eff.span
        self.trace.record(eff.addr, ctx, value)
        return value


def smc_estimate(interp, entry, data, theta: dict, randomness, *, particles: int, device="cpu",
                 resampling="systematic", ess_threshold=1.0, handler=_FixedParams) -> PMMHState:
    """SMC given theta: log Z_hat(theta) and one trajectory drawn in proportion to the final
    weights. Raises ``ZeroEvidenceError`` when every particle dies at a checkpoint.
    ``handler``: a subclass of ``_FixedParams`` (to check a modified algorithm)."""
    sites, lw, h = smc(interp, entry, data, particles, device, resampling=resampling, ess_threshold=ess_threshold,
                       randomness=randomness, handler_cls=partial(handler, params=theta), progress=False)
    missing = [a for a in theta if a not in h.supports]
    if missing:
        raise PPLRuntimeError(f"PMMH: the model has no random choice at address '{missing[0]}'",
                              hint="name top-level choices, e.g. params=['q'] for `q ~ gamma(1, 1)`")
    log_z, pick = float(torch.logsumexp(lw.double(), 0) - math.log(particles)), {}
    if math.isfinite(log_z):
        j = int(randomness.resample(lw, "multinomial", 1)[0])
        pick = {a: v[j] for a, (v, present) in sites.items() if present is None or bool(present[j])}
    return PMMHState(h.params, h.log_prior, log_z, pick, h.supports, h.spans)


def _random_walk(state: PMMHState, scale: float, randomness) -> tuple[dict, float]:
    """theta' = T(T^-1(theta) + scale * eps), T = biject_to(support), per parameter:
    (theta', log |J(theta')| - log |J(theta)|)."""
    theta2, log_jacobian = {}, 0.0
    for a, value in state.theta.items():
        if state.supports[a].is_discrete:
            raise PPLRuntimeError(f"PMMH's random walk cannot move the discrete parameter '{a}'", state.spans[a],
                                  "use kernel='prior' (independent draws from the prior)")
        T = torch.distributions.biject_to(state.supports[a])
        x = torch.as_tensor(value, dtype=torch.float64)
        y = T.inv(x)
        y2 = y + scale * randomness.normal(y.shape, y.device)
        theta2[a] = T(y2)
        log_jacobian += float(T.log_abs_det_jacobian(y2, theta2[a]).sum()) - float(T.log_abs_det_jacobian(y, x).sum())
    return theta2, log_jacobian


def pmmh_step(estimate, state: PMMHState, randomness, *, kernel: str = "rw", scale: float = 0.2):
    """One MH step on theta (``estimate(theta, randomness)``: ``smc_estimate`` with its
    setting bound): (new state, accepted)."""
    if kernel == "prior":  # theta' ~ p(theta): the prior cancels the proposal
        theta2, log_q_ratio = {a: None for a in state.theta}, None
    else:
        theta2, log_q_ratio = _random_walk(state, scale, randomness)
    try:
        new = estimate(theta2, randomness)
    except PPLRuntimeError:  # every particle died (Z_hat = 0), or theta' is impossible: reject
        return state, False
    if log_q_ratio is None:
        log_alpha = new.log_z - state.log_z
    else:
        log_alpha = (new.log_z + new.log_prior) - (state.log_z + state.log_prior) + log_q_ratio
    if math.isfinite(log_alpha) and bool(randomness.accept(torch.tensor([log_alpha], dtype=torch.float64))[0]):
        return new, True
    return state, False


def initial_state(estimate, params: list, randomness, tries: int = 100) -> PMMHState:
    """theta drawn from the prior (and SMC run given it) until Z_hat(theta) p(theta) > 0."""
    error = None
    for _ in range(tries):
        try:
            state = estimate({a: None for a in params}, randomness)
        except ZeroEvidenceError as err:
            error = err
            continue
        if math.isfinite(state.log_z) and math.isfinite(state.log_prior):
            return state
    raise error or PPLRuntimeError(f"PMMH found no starting point: Z_hat(theta) was 0 for {tries} prior draws "
                                   "of the parameters", hint="the data may be impossible under the model")


def pmmh(interp, entry: str, data: dict, params: list, *, particles: int = 100, samples: int = 500,
         burn_in: int = 100, chains: int = 1, scale: float = 0.2, kernel: str = "rw", device="cpu",
         resampling="systematic", ess_threshold=1.0, progress: bool | None = None, randomness=None) -> Chains:
    """Run ``chains`` PMMH chains one after the other: ``Chains`` (one chain unpacks to
    (draws: list of dicts address -> value, acceptance rate))."""
    if not params:
        raise PPLRuntimeError("PMMH needs params=[...]: the addresses of the choices to run MH on")
    if kernel not in KERNELS:
        raise PPLRuntimeError(f"PMMH has no kernel '{kernel}'", hint=f"choose from: {', '.join(KERNELS)}")
    randomness = randomness or TorchRandomness()
    estimate = partial(smc_estimate, interp, entry, data, particles=particles, device=device,
                       resampling=resampling, ess_threshold=ess_threshold)
    runs, rates = [], []
    for _ in range(chains):
        state = initial_state(estimate, params, randomness)
        draws, accepted = [], 0
        with progress_bar(progress, desc="PMMH", unit=" steps", total=burn_in + samples) as bar:
            for i in range(burn_in + samples):
                state, ok = pmmh_step(estimate, state, randomness, kernel=kernel, scale=scale)
                if i >= burn_in:
                    accepted += ok
                    draws.append(state.pick)
                bar.update(1)
        runs.append(draws)
        rates.append(accepted / max(1, samples))
    sites, r_hat, ess = draw_diagnostics(runs)
    return Chains("pmmh", sites, chains, samples, sum(rates) / len(rates), r_hat, ess,
                  {"params": params, "particles": particles}, legacy=(draws, rates[0]) if chains == 1 else None)
