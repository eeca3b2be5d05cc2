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
from ..stdlib.progress import progress_bar, ticking
from . import hmc as kernels
from .adaptation import WindowedAdaptation
from .compiled import NATIVE
from .diagnostics import site_diagnostics
from .discrete_gibbs import GraphSiteMoves
from .mh import initial_state
from .population import Chains
from .potential import Potential, RandomStructure, build_potential
from .randomness import TorchRandomness

KERNELS = ("nuts", "hmc")
DENSE_AUTO_MAX_DIM = 10  # dense_mass="auto": a dense mass matrix up to this many unconstrained dimensions
# compile="auto" (``compile_decision``): TorchInductor at the start iff a run's iterations x the
# graph's operations x SAVED_PER_OP_ITERATION exceed its compile cost COMPILE_FIXED +
# COMPILE_PER_OP x operations: a pure function of the graph and the run's options, never of
# timings or of what Inductor's disk cache holds (the cache only makes a chosen compile cheap).
# A cache miss measured (one thread, load 9-11, graphs new to the cache; CPU seconds of the
# process, then of its gcc children): eight schools (164 operations) 3.3 + 3.3, logistic
# regression (157) 3.2 + 2.9, a marginal mixture (284) 4.2 + 3.0, a hierarchical regression
# (836) 13.9 + 4.4, GARCH (4,115) 31.5 + 7.3; the line below lies between the process's own
# time and the total (a cache hit costs ~0.3-1.5 s, but the rule must not ask the cache).
# Re-measured for the native library (AOTInductor, ``compiled.build_native`` with ``FAST_BUILD``;
# ``bench/cold_build.py``, load 1.5-5; a model new to a machine whose caches are otherwise warm):
# eight schools 11.8-14.4 s, logistic 12.4-12.5, AR ~11-16, mixture ~14-17, calendar ~15-16,
# GARCH ~58, GP ~66: Inductor's Python ~2.5 s + ~9-20 ms an operation, gcc ~6-7 s on the C++
# wrapper whatever the graph, ~1-9 s on the kernels; a machine's first build adds ~2-3 s of ISA
# checks and its precompiled headers (~10-15 s each, once per compiler flags). So this line
# underprices a cold build ~2x on small graphs. It is kept as an amortised price: priced as a
# cold build (~10 s + ~12 ms an operation) Stan's 1000 + 1000 would leave logistic regression
# (break-even ~2,100 iterations) and calendar regression (~2,800) on TorchScript on every run,
# warm ones included, where a later run of the model (the same data shapes) loads the library
# in milliseconds.
COMPILE_FIXED = 4.0        # seconds
COMPILE_PER_OP = 0.008     # seconds per graph operation
# TorchScript spends ~1.3-1.7 us per operation and evaluation on the 4-chain graphs of the
# bench models, Inductor ~0.2 (GARCH, the GP, calendar: ~1.1 against ~0.15): ~0.9-1.5 us saved;
# NUTS makes 8-39 evaluations per iteration on them (calendar: ~900, at the maximum depth), so
# 11-57 us per operation and iteration (logistic 10.8, GP 12.6, mixture 14.6, AR 18.9, eight
# schools 26.4, GARCH 35.0, hierarchical regression 57.1): their median
SAVED_PER_OP_ITERATION = 19e-6  # seconds
# That median is ~MEDIAN_EVALUATIONS evaluations an iteration of ~1.5 us per operation (TorchScript
# measured at 1.1-1.6 us per operation and evaluation; the native library's ~0.01-0.05 us is left
# out). NUTS (``compile_decision(..., nuts_chains=C)``) scales it by its own estimated evaluations:
# a batch of 4 chains makes about NUTS_EVALUATIONS_PER_SQRT_DIM x sqrt(D) an iteration, warm-up
# included (measured, eager, 150 + 150 iterations: logistic regression D = 3: 8.1; AR(2) and the
# mixture D = 4: 15.0 and 12.0; eight schools D = 10: 17.9; a 60-step stochastic-volatility model
# D = 63: ~48: trees deepen as the step size shrinks with the dimension), times (1 +
# LOOP_SAVED_PER_DOUBLING_OF_CHAINS x log2 C) / 2 for C chains (the batch runs as long as its
# longest tree); and where the potential is compiled natively, so that NUTS runs its compiled
# transition (``hmc._fuse_now``), each evaluation also saves the eager leaf's Python
# (EAGER_LEAF_SECONDS; measured 0.26-0.39 ms). Eager (TorchScript) CPU per iteration predicted
# against measured: logistic 5.6 vs 6.0 ms, eight schools 10.4 vs 10.0, AR(2) 7.0 vs 10.3, mixture
# 8.7 vs 9.8, stochastic volatility (1,622 operations) 130 vs 110; the median with
# ``hmc.loop_saving`` predicted 4.9, 5.1, 5.5, 7.5 and 34 ms: a model of many dimensions was
# counted as a median model (a 60-step model at 100 + 100 iterations ran 50 s on TorchScript
# where a ~25 s compile would have paid; it now breaks even at ~125 iterations).
MEDIAN_EVALUATIONS = 12.7
NUTS_EVALUATIONS_PER_SQRT_DIM = 6.0
EAGER_LEAF_SECONDS = 0.3e-3  # seconds


def gradient_mcmc(interp, entry: str, data: dict, *, kernel: str = "nuts", chains: int = 4, samples: int = 1000,
                  warmup: int = 1000, device="cpu", target_accept: float = 0.8, max_tree_depth: int = 10,
                  dense_mass: bool | str = False, num_steps: int | None = None, step_size: float | None = None,
                  traced: bool | str = "auto", compile: bool | str = "auto", progress: bool | None = None,
                  randomness=None) -> Chains:
    """``chains`` chains of NUTS (``kernel="nuts"``) or HMC (``"hmc"``, ``num_steps``
    leapfrog steps, default 10) as one batch: ``Chains`` of ``samples`` draws each after
    ``warmup`` adaptation iterations. ``extra``: per-chain step size, divergences (warm-up
    and sampling), tree depths, E-BFMI, and whether the potential ran as a traced graph
    (``traced``) compiled by TorchInductor (``compile``: True, False, or "auto" = when the
    static cost model of ``compile_decision`` says it pays for this graph and run length;
    else ``why_not_compiled`` says why). ``dense_mass``: True, False, or "auto" = a
    dense mass matrix when the potential has at most ``DENSE_AUTO_MAX_DIM`` dimensions,
    starting from each chain's ``initial_inverse_mass`` (the inverse curvature at its
    initial point) instead of the identity.

    Reproducibility: a seeded run's draws depend only on the seed, the model, the data and
    the options (and the machine's floating-point behaviour, including whether it has a C++
    compiler for TorchInductor): under ``compile="auto"`` (and ``PPL_NUTS_LOOP=auto``) every
    backend choice -- TorchScript or TorchInductor for the potential, the whole NUTS
    transition compiled (``hmc._fuse_now``) -- is a function of the model's graph and the
    run's options, never of timings, machine load or what the compile cache holds; the
    cache only makes a chosen compile cheap. ``compile=True``/``False`` select a backend
    explicitly: the same posterior law, but other numbers (the backends round differently)."""
    if kernel not in KERNELS:
        raise PPLRuntimeError(f"unknown gradient kernel {kernel!r}", hint=f"one of {', '.join(KERNELS)}")
    randomness = randomness or TorchRandomness()
    model = ModelRun(interp, entry, data, device)
    state = initial_state(interp, entry, data, chains, device, randomness)
    rule = (compile_decision(warmup + samples, nuts_chains=chains if kernel == "nuts" else 0)
            if compile == "auto" else compile is True)
    with ticking(progress, desc=f"{kernel.upper()}: preparing the log density (a model's first run on this "
                                "machine compiles it; later runs load it)"):
        potential = build_potential(model, state, traced=traced, compile=rule)
    z0 = potential.initial(randomness)
    dense_mass, inverse_mass = _mass_matrix(potential, z0, dense_mass)
    started = time.perf_counter()
    if potential.discrete:
        draws, given_draws = _gibbs(model, potential, z0, randomness, kernel=kernel, samples=samples, warmup=warmup,
                                    target_accept=target_accept, max_tree_depth=max_tree_depth,
                                    dense_mass=dense_mass, num_steps=num_steps, progress=progress,
                                    inverse_mass=inverse_mass)
    else:
        draws = kernels.sample_nuts(potential, z0, samples=samples, warmup=warmup, kernel=kernel,
                                    randomness=randomness, target_accept=target_accept,
                                    max_tree_depth=max_tree_depth, dense_mass=dense_mass, num_steps=num_steps,
                                    step_size=step_size, progress=progress, inverse_mass=inverse_mass)
        given_draws = None
    seconds = time.perf_counter() - started
    out = _as_chains(kernel, potential, draws, given_draws, seconds)
    out.extra["dense_mass"] = bool(dense_mass)
    return out


def _mass_matrix(potential: Potential, z0: torch.Tensor, dense_mass):
    """(dense?, the initial inverse mass matrix or None for the identity) for the option
    ``dense_mass`` (True, False or "auto")."""
    if dense_mass != "auto":
        return bool(dense_mass), None
    if potential.D > DENSE_AUTO_MAX_DIM:
        return False, None
    return True, initial_inverse_mass(potential, z0)


def initial_inverse_mass(potential: Potential, z: torch.Tensor, h: float = 1e-2) -> torch.Tensor:
    """Each chain's inverse mass matrix [C, D, D] to start adaptation from: the inverse of
    the negative Hessian of log pi at its point z [C, D] (central differences of the
    gradient, 2D evaluations of the batch; exact for a Gaussian posterior, whatever h),
    where that is finite and positive definite; the identity for the other chains. A
    strongly correlated posterior (a regression on calendar years: correlation -0.999995)
    is then nearly round from the first warm-up iteration instead of after the first
    window of maximum-depth trees."""
    C, D = z.shape
    hess = torch.empty(C, D, D, dtype=torch.float64, device=z.device)
    for i in range(D):
        step = torch.zeros_like(z)
        step[:, i] = h
        up, down = potential.value_and_grad(z + step)[1], potential.value_and_grad(z - step)[1]
        hess[:, :, i] = (up - down) / (2 * h)
    precision = -(hess + hess.transpose(1, 2)) / 2
    eye = torch.eye(D, dtype=torch.float64, device=z.device).expand(C, D, D)
    values, vectors = torch.linalg.eigh(torch.where(torch.isfinite(precision), precision, eye))
    good = torch.isfinite(precision).all(2).all(1) & (values > 0).all(1) & \
        (values.min(1).values > 1e-12 * values.max(1).values.abs())
    inverse = vectors @ torch.diag_embed(1 / values.clamp_min(1e-300)) @ vectors.transpose(1, 2)
    inverse = (inverse + inverse.transpose(1, 2)) / 2
    return torch.where(good.view(C, 1, 1), inverse, eye)


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
        "compiled": potential.compiled,
        **({"why_not_compiled": potential.why_not_compiled} if potential.why_not_compiled else {}),
        **({"transition": draws.transition} if getattr(draws, "transition", "") else {}),
        **({"why_not_compiled_transition": draws.why_not_compiled}
           if getattr(draws, "why_not_compiled", None) else {}),
        "seconds": seconds,
        "phase_seconds": draws.phase_seconds,
        **({"why_not_traced": potential.why_not_traced} if potential.why_not_traced else {}),
        "draw_stats": draw_stats(draws),
    }
    accept = float(draws.accept_stat.double().mean())
    return Chains(kernel, sites, C, S, accept, r_hat, ess, extra)


def draw_stats(draws) -> dict:
    """Stan's per-draw statistics, each [C, S] on the CPU (ArviZ's ``sample_stats``):
    diverging, accept_stat (the tree's mean acceptance probability), tree_depth, n_steps
    (leapfrog steps), energy (the Hamiltonian), step_size (fixed after warm-up)."""
    C, S = draws.divergent.shape
    return {"diverging": draws.divergent.cpu(), "accept_stat": draws.accept_stat.cpu(),
            "tree_depth": draws.tree_depth.cpu(), "n_steps": draws.n_steps.cpu(), "energy": draws.energy.cpu(),
            "step_size": draws.step_size.cpu().reshape(C, 1).expand(C, S)}


def compile_cost(potential: Potential) -> float:
    """Estimated CPU seconds TorchInductor takes to compile the potential's graph on a cache
    miss: ``COMPILE_FIXED`` + ``COMPILE_PER_OP`` per operation (a long graph, e.g. a loop of
    150 steps unrolled, costs seconds per thousand operations)."""
    recorded = getattr(potential, "_recorded", None)
    return _compile_cost(len(recorded[0].graph.nodes) if recorded else 0)


def _compile_cost(ops: int) -> float:
    return COMPILE_FIXED + COMPILE_PER_OP * ops


def compile_decision(iterations: int, nuts_chains: int = 0):
    """``compile="auto"``'s rule for a run of ``iterations`` (warm-up + draws), as
    ``build_potential`` takes it: a function of the recorded graph that returns None
    (compile it with TorchInductor now) when the time it would save, ``iterations`` x its
    operations x ``SAVED_PER_OP_ITERATION``, exceeds its compile cost (``compile_cost``),
    else why not (the potential's ``why_not_compiled``). ``nuts_chains``: a NUTS run of that
    many chains, whose saving counts NUTS's evaluations per iteration, which grow with the
    potential's dimension ``dims`` (``nuts_saving_per_iteration``; ``build_potential`` gives it, 1
    where a caller does not: the fewest evaluations), and, where the potential is
    compiled natively (AOTInductor: ``compiled.NATIVE``), the eager leaf's Python that the
    compiled transition around it saves for the price of a check (``hmc._fuse_now``; calendar
    regression, 118 operations, is compiled for Stan's 1000 + 1000 with 4 chains). A static
    cost model: the same graph, dimension and run length give the same backend on every run
    (compile or load alike)."""
    def decide(graph, dims: int = 1) -> str | None:
        ops = len(graph.graph.nodes)
        cost = _compile_cost(ops)
        if nuts_chains:
            saved = iterations * nuts_saving_per_iteration(ops, dims, nuts_chains, native=NATIVE["on"])
        else:
            saved = iterations * ops * SAVED_PER_OP_ITERATION
        if saved > cost:
            return None
        return (f"compile='auto': compiling this graph of {ops} operations would cost ~{cost:.0f} s and save "
                f"~{saved:.0f} s on the run's {iterations} iterations")
    return decide


def nuts_evaluations_per_iteration(dims: int, chains: int) -> float:
    """Estimated potential evaluations per NUTS iteration of a batch of ``chains`` chains on a
    potential of ``dims`` dimensions, warm-up included (``NUTS_EVALUATIONS_PER_SQRT_DIM``)."""
    batch = kernels.batch_factor(chains) / 2
    return NUTS_EVALUATIONS_PER_SQRT_DIM * math.sqrt(max(dims, 1)) * batch


def nuts_saving_per_iteration(ops: int, dims: int, chains: int, native: bool) -> float:
    """Estimated CPU seconds per NUTS iteration that compiling a potential graph of ``ops``
    operations and ``dims`` dimensions saves over TorchScript and the eager transition, per
    evaluation: TorchScript's time per operation (``SAVED_PER_OP_ITERATION`` per
    ``MEDIAN_EVALUATIONS``), and where the compiled potential is ``native`` (NUTS then runs its
    compiled transition) the eager leaf's Python."""
    per_evaluation = ops * SAVED_PER_OP_ITERATION / MEDIAN_EVALUATIONS + (EAGER_LEAF_SECONDS if native else 0.0)
    return nuts_evaluations_per_iteration(dims, chains) * per_evaluation


def _repeat(given: dict, S: int) -> dict:
    """Per-chain discrete values repeated for each of S draws (chain-major)."""
    return {a: v.repeat_interleave(S, 0) for a, v in given.items()}


def _gibbs(model: ModelRun, potential: Potential, z0, randomness, *, kernel, samples, warmup, target_accept,
           max_tree_depth, dense_mass, num_steps, progress, inverse_mass=None):
    """Alternate a systematic scan of single-site MH on the discrete choices (each
    regenerated from its prior, accepted with its Metropolis-Hastings ratio) with one
    NUTS/HMC transition on the continuous ones given the discrete ones. Returns the
    continuous draws and the discrete values of each kept draw ([C, S, ...])."""
    kept: list = []
    calls = 0
    through_graph = GraphSiteMoves.build(model, potential, z0)  # (None: the interpreter's sweep)
    potential.discrete_moves = "graph" if through_graph is not None else "interpreter"

    def discrete_sweep(hstate):
        nonlocal calls
        if through_graph is not None:
            moved = through_graph.sweep(hstate, randomness)
        else:
            values, _ = potential.constrain(hstate.z)
            present = {a: torch.ones(potential.C, dtype=torch.bool, device=potential.device) for a in values}
            state, _ = gfi.generate(model, Choices(values, present))
            for addr in potential.discrete:
                new, log_alpha = gfi.regenerate(model, state, {addr: state.present[addr]}, randomness)
                state, _ = gfi.metropolis(state, new, log_alpha, randomness)
            _check_structure(potential, state)
            potential.set_given({a: state.values[a] for a in potential.discrete})
            moved = None
        if calls >= warmup:
            kept.append(dict(potential.given))
        calls += 1
        return moved if moved is not None else kernels.init_state(potential, hstate.z)

    draws = kernels.sample_nuts(potential, z0, samples=samples, warmup=warmup, kernel=kernel, randomness=randomness,
                                target_accept=target_accept, max_tree_depth=max_tree_depth, dense_mass=dense_mass,
                                num_steps=num_steps, progress=progress, between=discrete_sweep,
                                inverse_mass=inverse_mass)
    given = {a: torch.stack([g[a] for g in kept], 1) for a in potential.discrete}  # [C, S, ...]
    return draws, given


def _check_structure(potential: Potential, state) -> None:
    """The discrete moves kept every chain's choices the ones the potential knows:
    every continuous choice in every chain, no new choice."""
    known = set(potential.by_addr) | set(potential.discrete)
    for addr, present in state.present.items():
        if addr not in known and bool(present.any()):
            raise RandomStructure(f"after a move of the discrete choices some chain makes the choice '{addr}', "
                                  "which the first trace did not make: gradient-based kernels need a fixed set of "
                                  "continuous choices", hint="use mh or tempering for this program")
        if addr in potential.by_addr and not bool(present.all()):
            raise RandomStructure(f"after a move of the discrete choices the continuous choice '{addr}' is made by "
                                  "only some chains: gradient-based kernels need every chain to make it",
                                  hint="use mh or tempering for this program")
