"""HMC and NUTS on a program: the kernels of ``inference.hmc`` on the program's potential
(``inference.potential``), all chains as one batch, composed with single-site MH on the
discrete choices when the program has any (a Gibbs sweep).

    initial traces (prior draws of positive density)
      -> potential of the continuous choices on unconstrained space
      -> per iteration: [MH on each chain's discrete choices]; NUTS/HMC on the continuous
         ones given the discrete ones (Stan's windowed warm-up adapts the step size and
         mass matrix during ``warmup``; both are fixed afterwards)
      -> draws mapped back to the constrained space (one interpreter run for all draws)

Invariant: each kept transition leaves the posterior invariant: NUTS/HMC leaves pi(z | d)
invariant for fixed step size and mass (``inference.hmc``), and the MH move on the
discrete choices leaves p(d | z) invariant (``semantics.gfi``, single-site regeneration
from the prior with its Metropolis-Hastings ratio), so their composition leaves the joint
posterior invariant. A program whose continuous choices depend on its random path is an
error (``potential.RandomStructure``) naming the choice.
"""
from __future__ import annotations

import math
import time

import torch

from ..semantics import gfi
from ..semantics.errors import PPLRuntimeError
from ..semantics.gfi import Choices, ModelRun
from ..stdlib.progress import progress_bar
from . import hmc as kernels
from .adaptation import WindowedAdaptation
from .diagnostics import site_diagnostics
from .mh import initial_state
from .population import Chains
from .potential import Potential, build_potential
from .randomness import TorchRandomness

KERNELS = ("nuts", "hmc")


def gradient_mcmc(interp, entry: str, data: dict, *, kernel: str = "nuts", chains: int = 4, samples: int = 1000,
                  warmup: int = 1000, device="cpu", target_accept: float = 0.8, max_tree_depth: int = 10,
                  dense_mass: bool = False, num_steps: int | None = None, step_size: float | None = None,
                  traced: bool | str = "auto", progress: bool | None = None, randomness=None) -> Chains:
    """``chains`` chains of NUTS (``kernel="nuts"``) or HMC (``"hmc"``, ``num_steps``
    leapfrog steps, default 10) as one batch: ``Chains`` of ``samples`` draws each after
    ``warmup`` adaptation iterations. ``extra``: per-chain step size, divergences (warm-up
    and sampling), tree depths, E-BFMI, and whether the potential ran as a traced graph."""
    if kernel not in KERNELS:
        raise PPLRuntimeError(f"unknown gradient kernel {kernel!r}", hint=f"one of {', '.join(KERNELS)}")
    randomness = randomness or TorchRandomness()
    model = ModelRun(interp, entry, data, device)
    state = initial_state(interp, entry, data, chains, device, randomness)
    potential = build_potential(model, state, traced=traced)
    z0 = potential.initial(randomness)
    started = time.perf_counter()
    if potential.discrete:
        draws, given_draws = _gibbs(model, potential, z0, randomness, kernel=kernel, samples=samples, warmup=warmup,
                                    target_accept=target_accept, max_tree_depth=max_tree_depth,
                                    dense_mass=dense_mass, num_steps=num_steps, progress=progress)
    else:
        draws = kernels.sample_nuts(potential, z0, samples=samples, warmup=warmup, kernel=kernel,
                                    randomness=randomness, target_accept=target_accept,
                                    max_tree_depth=max_tree_depth, dense_mass=dense_mass, num_steps=num_steps,
                                    step_size=step_size, progress=progress)
        given_draws = None
    seconds = time.perf_counter() - started
    return _as_chains(kernel, potential, draws, given_draws, seconds)


def _as_chains(kernel: str, potential: Potential, draws, given_draws, seconds: float) -> Chains:
    """The draws as ``Chains``: every choice and the return value, chain-major."""
    C, S, D = draws.z.shape
    z = draws.z.reshape(C * S, D)
    given = None if given_draws is None else {a: v.reshape(C * S, *v.shape[2:]) for a, v in given_draws.items()}
    values, ret = potential.constrain(z, given if given is not None else _repeat(potential.given, S))
    sites = {"return": (ret, None)} if ret is not None else {}
    for s in potential.sites:
        sites[s.addr] = (values[s.addr], None)
    for a in potential.discrete:
        sites[a] = (values[a], None)
    r_hat, ess = site_diagnostics(sites, C, S, components=True)
    divergent = draws.divergences()
    extra = {
        "kernel": kernel,
        "step_size": draws.step_size.tolist(),
        "divergences": int(divergent.sum()),
        "divergences_per_chain": divergent.tolist(),
        "warmup_divergences": int(draws.warmup_divergences.sum()),
        "tree_depth_mean": float(draws.tree_depth.double().mean()),
        "max_tree_depth": draws.max_tree_depth,
        "hit_max_tree_depth": float(draws.hit_max_depth().mean()),
        "leapfrog_steps": int(draws.n_steps.sum()),
        "bfmi": draws.bfmi().tolist(),
        "traced": potential.traced,
        "seconds": seconds,
        "phase_seconds": draws.phase_seconds,
        **({"why_not_traced": potential.why_not_traced} if potential.why_not_traced else {}),
    }
    accept = float(draws.accept_stat.double().mean())
    return Chains(kernel, sites, C, S, accept, r_hat, ess, extra)


def _repeat(given: dict, S: int) -> dict:
    """Per-chain discrete values repeated for each of S draws (chain-major)."""
    return {a: v.repeat_interleave(S, 0) for a, v in given.items()}


def _gibbs(model: ModelRun, potential: Potential, z0, randomness, *, kernel, samples, warmup, target_accept,
           max_tree_depth, dense_mass, num_steps, progress):
    """Alternate single-site MH on the discrete choices with one NUTS/HMC transition on
    the continuous ones (see the module docstring)."""
    raise PPLRuntimeError("gradient-based MCMC on programs with discrete choices is not available yet",
                          hint="use mh or tempering")
