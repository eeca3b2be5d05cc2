"""Gradient-based Markov kernels on an unconstrained space: leapfrog, HMC, MALA and the
No-U-Turn sampler, for C chains as ONE batch, plus the warm-up driver ``sample_nuts``.

A *potential* is any object with ``value_and_grad(z) -> (logp [C], grad [C, D])`` on
z [C, D] (float64): the log density of the target (up to a constant) and its gradient. A
row whose logp is not finite is a point of density zero: kernels reject it (NUTS counts
it as a divergence) and never raise. Nothing here knows about models
(``inference/potential.py`` turns a program into a potential).

Invariants (for a fixed step size and metric, i.e. after warm-up):

* ``hmc_step`` / ``mala_step``: leapfrog trajectory + Metropolis-Hastings test on the
  Hamiltonian H(z, p) = -logp(z) + p' M^-1 p / 2; reversible and volume preserving, so
  exp(logp) is invariant. MALA is the one-step case (its Langevin proposal density is
  exactly the MH ratio of the Hamiltonian).
* ``nuts_step``: the multinomial No-U-Turn sampler as Stan, NumPyro and BlackJAX run it
  (Betancourt 2017, appendix A): the trajectory doubles in a random direction until the
  U-turn criterion on the (generalised) momentum sum fails for the whole trajectory or
  for any of its sub-trees (Stan's criterion including the checks across each pair of
  merged sub-trees), a leaf diverges (energy error > 1000) or the depth reaches
  ``max_tree_depth``. Within a new sub-tree a state is drawn in proportion to its weight
  exp(-H) (one multinomial draw once the sub-tree is complete: the same distribution as
  Stan's progressive uniform sampling); at the top level the new sub-tree's state
  replaces the current one with probability min(1, W_new / W_old) (biased progressive
  sampling). A sub-tree that fails a check or diverges is discarded whole.

Batching: every chain takes its leapfrog steps in lockstep (tensor ops on [C, D]); a chain
whose tree has terminated is masked (its state frozen, its statistics no longer counted)
while the others continue, and the loop runs until every chain is done (it asks "is any
chain still going?" once per doubling, and within a sub-tree after every leaf on a CPU,
where that costs nothing, or every 8 leaves on an accelerator, where it is a sync). Each transition
draws a fixed set of random numbers per chain (the momentum, and for NUTS 3 uniforms per
possible doubling: the direction, the choice within the sub-tree, the top-level choice),
so a chain's draws do not depend on which other chains share its batch.

Speed (NUTS): where the potential offers its recorded graph and runs on TorchInductor, the
whole transition -- every doubling and leaf of every chain -- can run as ONE compiled C++
program (``inference.nuts_loop``, ``PPL_NUTS_LOOP``: auto / 1 / 0; built only where it pays:
``_fuse_now``); its kernel is this one, with the state within a sub-tree chosen
progressively (same law, other random numbers). Failing that, one leaf -- leapfrog,
potential, log weight, U-turn checks, bookkeeping -- is one compiled call (``_FusedLeaf``; ``PPL_NUTS_FUSED``: auto / 1 / 0); the merge of a sub-tree
into the trajectory is one TorchScript call (``_merge``). Both compute what the
operation-by-operation code computes, from the same random numbers.
"""
from __future__ import annotations

import functools
import math
import os
import time
import weakref
from dataclasses import dataclass, field

import torch

from ..semantics.errors import PPLRuntimeError
from ..stdlib.progress import NO_BAR, progress_bar
from .adaptation import WindowedAdaptation

#: an energy error above this is a divergence (Stan's max_deltaH)
MAX_DELTA_ENERGY = 1000.0

#: ``sample_nuts`` builds NUTS's whole transition as one compiled program (``inference.nuts_loop``:
#: ``nuts_native``'s C++ loops around the potential compiled by AOTInductor), or failing that the
#: fused leaf (``_FusedLeaf``), iff the transitions left x the estimated saving per transition
#: exceed the estimated build cost (``_fuse_now``): a static cost model of the graph's operations
#: and the run's chains, never of timings or of what the compile cache holds, so that a seeded
#: run's draws do not depend on them. Measured by loop11 (bench/nuts_models.py, 4 chains unless
#: said, one thread, load 4-8 on 2 cores, CPU from getrusage of the process and of its children):
#: - build, a cache miss (fresh TORCHINDUCTOR_CACHE_DIR): the process's CPU + its gcc children's
#:   (the potential's AOTInductor compile): eight schools (164 operations) 2.1 + 6.6 s (1 chain:
#:   1.7 + 6.1; 16 chains: 2.4 + 7.5), logistic regression (157) 2.2 + 6.9, AR(2) (187)
#:   2.0 + 7.0, marginal mixture (284) 4.1 + 6.5; a cache hit costs 0.02-0.1 s, but the rule
#:   must not ask the cache, so it prices a miss. NOT counted: the C++ operator
#:   (``nuts_native``, ~40 s wall / ~11 s gcc CPU), built once per machine and source version
#:   and loaded in ms afterwards -- amortised over every run.
#: - saving: CPU per transition eager (potential on Inductor) -> compiled, sampling phase: eight
#:   schools 2.5-3.2 -> 0.17-0.31 ms (1 chain: 1.3 -> 0.1; 16 chains: 3.3-4.0 -> 0.36), logistic
#:   1.7-1.9 -> 0.22-0.31, AR(2) 2.5-2.6 -> 0.20-0.22, mixture 1.7-2.1 -> 0.22-0.29; warm-up
#:   transitions save a little more. Most of it is the eager leaf's Python (~0.3 ms a leaf
#:   whatever the graph), so
#:   the estimate is mostly per transition, growing with the chains (the batch runs as long as
#:   its longest tree: x1, x2.3, x2.8 at 1, 4, 16 chains on eight schools) and a little with the
#:   graph (Inductor's Python wrapper, per evaluation). The line below is near the models' median
#:   at 4 chains (~2 ms): eight schools and logistic regression break even at ~4,300 transitions
#:   (4 chains; ~2,900 with 16) when the transition is built from scratch (the potential not compiled
#:   natively): Stan's 1000 + 1000 then stays eager. Built around the potential's own library, below.
LOOP_BUILD_FIXED = 6.0        # seconds (process + gcc CPU, a cache miss)
LOOP_BUILD_PER_OP = 0.015     # seconds per graph operation
#: Re-measured after the potential's library kept its buffers on the stack (its call: GARCH
#: 178 -> 26 us, eight schools ~10 -> 4 us), 4 chains, 1000 + 1000, CPU per transition eager
#: (PPL_NUTS_LOOP=0, the native potential) -> compiled: eight schools sampling 2.78 -> 0.16 ms,
#: warm-up 3.56 -> 0.30; GARCH sampling 3.78 -> 0.60, warm-up 5.31 -> 0.95 (was 0.9 ms + 0.5 us
#: per operation: GARCH's saving overestimated 1.8x, eight schools' underestimated 1.4x).
LOOP_SAVED_FIXED = 1.4e-3     # seconds per transition, one chain
LOOP_SAVED_PER_OP = 0.05e-6   # seconds per graph operation and transition, one chain
LOOP_SAVED_PER_DOUBLING_OF_CHAINS = 0.5  # saving x (1 + this x log2(chains))
#: Where the potential is compiled natively (``Potential.native_library``: compile="auto" decides
#: so for Stan's 1000 + 1000 on every benchmark model), the compiled transition calls the
#: potential's own AOTInductor library (its finite mapping done in the C++ operator): nothing is
#: recorded or compiled, the build is its check against the eager transition (two transitions
#: from the chains' state, run both ways) and loading the library. Measured (CPU, one thread,
#: 4 chains, load 5): eight schools 0.09 s, logistic 0.06, GARCH 0.06, AR(2) 0.007, mixture
#: 0.008, GP (a package) 0.03, calendar regression (diagonal metric: 1023-leaf trees) 0.07. Priced at
#: 0.25 s: built from ~125 transitions at 4 chains (eight schools), ~280 with one chain.
LOOP_NATIVE_BUILD = 0.25      # seconds

_F64 = torch.float64


# -- the metric (inverse mass matrix) ---------------------------------------------------

class Metric:
    """The Euclidean metric of C chains: ``inv_mass`` [C, D] (diagonal) or [C, D, D]
    (dense, symmetric positive definite). Momenta are p ~ N(0, M), M = inv_mass^-1."""

    def __init__(self, inv_mass: torch.Tensor):
        self.inv_mass = inv_mass.to(_F64)
        self.dense = self.inv_mass.dim() == 3
        if self.dense:
            self._chol_inv = torch.linalg.cholesky(self.inv_mass)  # inv_mass = L L'
        else:
            self._sqrt_mass = self.inv_mass.rsqrt()

    @classmethod
    def identity(cls, C: int, D: int, device=None, *, dense: bool = False) -> "Metric":
        if dense:
            return cls(torch.eye(D, dtype=_F64, device=device).expand(C, D, D).clone())
        return cls(torch.ones(C, D, dtype=_F64, device=device))

    @property
    def shape(self) -> tuple[int, int]:
        return self.inv_mass.shape[0], self.inv_mass.shape[1]

    def velocity(self, p: torch.Tensor) -> torch.Tensor:
        """dH/dp = M^-1 p (Stan's p_sharp)."""
        if self.dense:
            return torch.matmul(self.inv_mass, p.unsqueeze(-1)).squeeze(-1)
        return self.inv_mass * p

    def kinetic(self, p: torch.Tensor) -> torch.Tensor:
        """p' M^-1 p / 2 per chain [C]."""
        return 0.5 * torch.linalg.vecdot(p, self.velocity(p))

    def sample_momentum(self, randomness) -> torch.Tensor:
        """p ~ N(0, M) per chain [C, D]."""
        eps = randomness.normal(self.shape, self.inv_mass.device)
        if self.dense:  # M = L^-T L^-1: p = L^-T eps
            return torch.linalg.solve_triangular(self._chol_inv.transpose(-1, -2), eps.unsqueeze(-1),
                                                 upper=True).squeeze(-1)
        return eps * self._sqrt_mass


# -- states and one leapfrog step -------------------------------------------------------

@dataclass
class State:
    """Positions of C chains with their log density and its gradient (float64)."""
    z: torch.Tensor      # [C, D]
    logp: torch.Tensor   # [C]
    grad: torch.Tensor   # [C, D]


@dataclass
class StepInfo:
    """What one transition did, per chain ([C] each)."""
    accept_stat: torch.Tensor  # mean Metropolis acceptance probability (for dual averaging)
    divergent: torch.Tensor    # bool: an energy error > MAX_DELTA_ENERGY or a non-finite one
    energy: torch.Tensor       # the Hamiltonian at the state kept
    n_steps: torch.Tensor      # int64: leapfrog steps taken
    tree_depth: torch.Tensor   # int64: NUTS doublings (0 for HMC / MALA)
    accepted: torch.Tensor     # bool: the chain moved


class Tempered:
    """The potential ``potential`` at inverse temperature ``beta``: its
    ``value_and_grad(z, beta=beta)`` (for a potential that takes ``beta``, as
    ``inference.potential.Potential`` does)."""

    def __init__(self, potential, beta):
        self.potential, self.beta = potential, beta

    def value_and_grad(self, z):
        return self.potential.value_and_grad(z, beta=self.beta)


def evaluate(potential, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [C], grad [C, D]) with a non-finite logp as -inf (density zero: rejected) and
    a non-finite gradient entry as 0. The kernels stay exact whatever the gradient is (a
    leapfrog step with any deterministic "gradient" is reversible and volume preserving);
    a NaN in it would only poison the trajectory."""
    logp, grad = potential.value_and_grad(z)
    if logp.dtype != _F64 or grad.dtype != _F64:
        logp, grad = logp.to(_F64), grad.to(_F64)
    return (torch.nan_to_num(logp, nan=-math.inf, posinf=-math.inf, neginf=-math.inf),
            torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0))


def init_state(potential, z: torch.Tensor) -> State:
    """The state at positions z [C, D] (recomputed, e.g. after the potential changed)."""
    z = z.to(_F64)
    logp, grad = evaluate(potential, z)
    return State(z, logp, grad)


def leapfrog(potential, z, p, grad, step_size: torch.Tensor, metric: Metric):
    """One leapfrog step of size ``step_size`` [C] (negative: backwards in time) for every
    chain: returns (z, p, logp, grad) at its end."""
    eps = step_size.to(_F64).unsqueeze(-1)
    return _leapfrog(potential, z, p, grad, eps, 0.5 * eps, metric)


def _leapfrog(potential, z, p, grad, eps, half, metric):
    p = torch.addcmul(p, half, grad)
    z = torch.addcmul(z, eps, metric.velocity(p))
    logp, grad = evaluate(potential, z)
    p = torch.addcmul(p, half, grad)
    return z, p, logp, grad


def _energy_error(metric, p, logp, H0):
    """(H, H - H0) with NaN as +inf."""
    H = torch.nan_to_num(metric.kinetic(p) - logp, nan=math.inf)
    return H, torch.nan_to_num(H - H0, nan=math.inf)


# -- HMC and MALA -----------------------------------------------------------------------

def hmc_step(potential, state: State, step_size: torch.Tensor, metric: Metric, randomness, *,
             num_steps: int | None = None, trajectory_length: float | None = None):
    """One HMC transition per chain: a fresh momentum, ``num_steps`` leapfrog steps (or
    ceil(trajectory_length / step_size) per chain), then the Metropolis-Hastings test on
    the energy. Returns (State, StepInfo)."""
    C, D = state.z.shape
    device = state.z.device
    step_size = step_size.to(_F64)
    if (num_steps is None) == (trajectory_length is None):
        raise ValueError("hmc_step needs exactly one of num_steps and trajectory_length")
    if num_steps is not None:
        steps = torch.full((C,), int(num_steps), dtype=torch.int64, device=device)
        most = int(num_steps)
    else:
        steps = torch.ceil(trajectory_length / step_size).clamp(min=1, max=2 ** 20).to(torch.int64)
        most = int(steps.max())
    p0 = metric.sample_momentum(randomness)
    u = randomness.uniform((C,), device)
    H0 = metric.kinetic(p0) - state.logp
    eps = step_size.unsqueeze(-1)
    half = 0.5 * eps
    z, p, logp, grad = state.z, p0, state.logp, state.grad
    impossible = torch.zeros(C, dtype=torch.bool, device=device)  # a step into density zero
    for i in range(most):
        z1, p1, logp1, grad1 = _leapfrog(potential, z, p, grad, eps, half, metric)
        reached = logp1 == -math.inf
        if num_steps is None:  # a chain whose trajectory is complete stays where it is
            going = i < steps
            reached = reached & going
            go = going.unsqueeze(-1)
            z1, p1, grad1 = torch.where(go, z1, z), torch.where(go, p1, p), torch.where(go, grad1, grad)
            logp1 = torch.where(going, logp1, logp)
        impossible = impossible | reached
        z, p, logp, grad = z1, p1, logp1, grad1
    H, delta = _energy_error(metric, p, logp, H0)
    # a trajectory through density zero is rejected (the event is symmetric under reversal)
    delta = torch.where(impossible, math.inf, delta)
    accept_prob = torch.exp(-delta).clamp(max=1.0)
    accepted = u < accept_prob
    keep = accepted.unsqueeze(-1)
    new = State(torch.where(keep, z, state.z), torch.where(accepted, logp, state.logp),
                torch.where(keep, grad, state.grad))
    info = StepInfo(accept_prob, delta > MAX_DELTA_ENERGY, torch.where(accepted, H, H0), steps,
                    torch.zeros(C, dtype=torch.int64, device=device), accepted)
    return new, info


def mala_step(potential, state: State, step_size: torch.Tensor, randomness, metric: Metric | None = None):
    """One Metropolis-adjusted Langevin transition per chain: the proposal
    z' = z + (eps^2/2) M^-1 grad + eps M^-1/2 xi, accepted by Metropolis-Hastings with the
    Langevin proposal densities; computed as one leapfrog step + the energy test (the
    same kernel). A move kernel for SMC: give it the tempered potential (``Tempered``) and
    a state from ``init_state`` under that potential. Returns (State, StepInfo)."""
    if metric is None:
        metric = Metric.identity(*state.z.shape, device=state.z.device)
    return hmc_step(potential, state, step_size, metric, randomness, num_steps=1)


# -- NUTS -------------------------------------------------------------------------------

def _merged_no_uturn(a_far_v, a_near_v, a_near_p, rho_a, b_near_v, b_near_p, b_far_v, rho_b, whole):
    """Stan's U-turn checks when two adjacent trajectories A and B are merged, per chain
    (``near``: the ends where they meet; the criterion is symmetric, so A may be before or
    after B in time): the whole (momentum sum ``whole`` = rho_a + rho_b between the far
    ends), A extended by B's near state, and B extended by A's near state. A check passes
    when both end velocities have a positive inner product with the momentum sum
    (Betancourt 2017, A.4.2)."""
    a_ext = rho_a + b_near_p
    b_ext = rho_b + a_near_p
    v = torch.stack([a_far_v, b_far_v, a_far_v, b_near_v, a_near_v, b_far_v])
    rho = torch.stack([whole, whole, a_ext, a_ext, b_ext, b_ext])
    return (torch.linalg.vecdot(v, rho) > 0).all(0)


#: ``nuts_step``'s ``whole`` when the caller has not looked the compiled transition up
_LOOK_UP = object()


def nuts_step(potential, state: State, step_size: torch.Tensor, metric: Metric, randomness, *,
              max_tree_depth: int = 10, fuse: bool = True, whole=_LOOK_UP, drawn=None):
    """One multinomial NUTS transition per chain (all chains one batch). Returns
    (State, StepInfo) with Stan's per-draw statistics: accept_stat = mean over the tree's
    leaves of min(1, exp(H0 - H)), tree_depth = doublings, n_steps = leapfrog steps,
    divergent, energy = H at the kept state (its own momentum). ``fuse``: build the whole
    transition as one compiled program (``_compiled_transition``), or failing that the fused
    leaf graph (``_FusedLeaf``), if the potential allows and none is built yet (one already
    built is used either way); ``fuse="loop"``: build the compiled transition only. ``whole``:
    the compiled transition (or None: none) where the caller has looked it up already
    (``_NutsTransitions``). ``drawn``: (momentum [C, D], uniforms [3K, C]) drawn already for a
    transition the compiled transition found invalid (``CompiledTransition.run_many``): the
    eager kernel makes it with them."""
    C, D = state.z.shape
    K = max_tree_depth
    device = state.z.device
    if drawn is not None:
        (p0, u), whole = drawn, None
    else:
        p0 = metric.sample_momentum(randomness)
        if whole is _LOOK_UP:
            whole = _compiled_transition(potential, metric, K, state, bool(fuse))
    if whole is not None:  # the whole transition as one compiled program (``inference.nuts_loop``)
        # per level: direction, sub-tree choice, top choice; drawn with the leaf uniforms
        u = whole.draw_uniforms(randomness, C, device)
        out = whole(state.z, state.logp, state.grad, p0, u, step_size.to(_F64), metric.inv_mass,
                    potential.graph_inputs(), randomness, leaves_drawn=True)
        if out is not None:
            z, logp, grad, energy, accept_stat, divergent, n_steps, depth, moved = out
            return State(z, logp, grad), StepInfo(accept_stat, divergent, energy, n_steps, depth, moved)
    if drawn is None and whole is None:
        u = randomness.uniform((C, 3 * K), device).T  # per level: direction, sub-tree choice, top choice
    go_right = u[:K] < 0.5  # [K, C]
    signed = torch.where(go_right, 1.0, -1.0).unsqueeze(-1) * step_size.to(_F64).unsqueeze(-1)
    eps_at, half_at = signed.unbind(0), (0.5 * signed).unbind(0)
    near_at = go_right.long().unbind(0)  # which end ([C, 2, ...]: 0 left, 1 right) grows
    far_at = (~go_right).long().unbind(0)
    grows_at = torch.stack((~go_right, go_right), -1).unbind(0)  # [C, 2] one-hot per level
    u_sub, u_top = u[K:2 * K].unbind(0), u[2 * K:].unbind(0)
    v0 = metric.velocity(p0)
    H0 = 0.5 * torch.linalg.vecdot(p0, v0) - state.logp
    chain = torch.arange(C, device=device)

    # the trajectory's two ends in time ([C, 2, 4, D]: left/right x z, p, grad, velocity),
    # momentum sum, log weight; the proposal (z, grad [2, C, D]; logp, log weight [2, C])
    start = torch.stack((state.z, p0, state.grad, v0), 1)
    ends = torch.stack((start, start), 1)
    rho = p0
    log_w = torch.zeros(C, dtype=_F64, device=device)
    prop_zg = torch.stack((state.z, state.grad))
    prop_lw = torch.stack((state.logp, log_w))
    moved = torch.zeros(C, dtype=torch.bool, device=device)
    active = torch.ones(C, dtype=torch.bool, device=device)
    depth = torch.zeros(C, dtype=torch.int64, device=device)
    all_weights, all_building = [], []
    sync_every = 1 if device.type == "cpu" else 8
    leaves = _Leaves(potential, metric, H0, K, state.z, fuse is True)

    for d in range(K):
        if d and not bool(active.any()):
            break
        depth = depth + active
        z_near, p_near, g_near, v_near = ends[chain, near_at[d]].unbind(1)
        valid, last, v_last, v_first, p_first, rho_s, zg, lw, building = _subtree(
            leaves, active, d, eps_at[d], half_at[d], sync_every, z_near, p_near, g_near, v_near)
        n = building.shape[0]
        weights = lw[n:]
        all_weights.append(weights), all_building.append(building)
        # the sub-tree's multinomial choice, then (``_merge``) the biased progressive choice
        # at the top and the U-turn checks of the merged trajectory
        log_w_s = torch.logsumexp(weights, 0)
        leaf = _choose_leaf(weights, log_w_s, u_sub[d])
        log_w, prop_zg, prop_lw, moved, rho, ends, active = _scripted(_merge)(
            valid, last, v_last, v_first, p_first, rho_s, zg, lw, leaf, log_w_s, u_top[d], far_at[d], grows_at[d],
            v_near, p_near, chain, log_w, prop_zg, prop_lw, moved, rho, ends)

    accept_stat, divergent, n_steps = _scripted(_statistics)(all_weights, all_building)
    new = State(prop_zg[0], prop_lw[0], prop_zg[1])
    return new, StepInfo(accept_stat, divergent, H0 - prop_lw[1], n_steps, depth, moved)


def _merge(valid, last, v_last, v_first, p_first, rho_s, zg, lw, leaf, log_w_s, u_top, far, grows, v_near, p_near,
           chain, log_w, prop_zg, prop_lw, moved, rho, ends):
    """A new sub-tree (``_subtree``'s outputs, its multinomial choice ``leaf`` [C] and its
    log weight ``log_w_s`` [C]) joins the trajectory: the biased progressive choice of the
    proposal (uniforms ``u_top`` [C]), the total log weight, the U-turn checks of the
    merged trajectory (old part: ``far`` .. the near end, v_near, p_near; new sub-tree),
    the momentum sum and the ends (``grows`` [C, 2]: the end the sub-tree extends). Run
    by TorchScript (``_scripted``: one call instead of ~35 from Python, the same
    operations). Returns (log_w, prop_zg, prop_lw, moved, rho, ends, still active)."""
    n = zg.shape[0] // 2
    take = valid & _biased_take(log_w_s, log_w, u_top)
    rows = torch.stack([leaf, leaf + n])
    prop_zg = torch.where(take.unsqueeze(-1), zg[rows, chain], prop_zg)
    prop_lw = torch.where(take, lw[rows, chain], prop_lw)
    moved = moved | take
    log_w = torch.where(valid, torch.logaddexp(log_w, log_w_s), log_w)
    whole = rho + rho_s
    ok = _merged_no_uturn(ends[chain, far, 3], v_near, p_near, rho, v_first, p_first, v_last, rho_s, whole)
    rho = torch.where(valid.unsqueeze(-1), whole, rho)
    ends = torch.where((grows & valid.unsqueeze(-1))[:, :, None, None], last.unsqueeze(1), ends)
    return log_w, prop_zg, prop_lw, moved, rho, ends, valid & ok


def _statistics(all_weights: list[torch.Tensor], all_building: list[torch.Tensor],
                max_delta_energy: float = MAX_DELTA_ENERGY):
    """Stan's per-draw statistics from the leaves' log weights H0 - H and building masks
    (one [n, C] tensor per sub-tree): (accept_stat: the mean of min(1, exp(H0 - H)) over
    the leaves, divergent, leapfrog steps) [C] each."""
    weights, building = torch.cat(all_weights), torch.cat(all_building)
    n_steps = building.sum(0)
    accept_stat = torch.where(building, weights.clamp(max=0.0).exp(), 0.0).sum(0) / n_steps.clamp(min=1)
    divergent = (building & (weights < -max_delta_energy)).any(0)
    return accept_stat, divergent, n_steps


_SCRIPTED: dict = {}


def _scripted(fn):
    """``fn`` compiled by TorchScript (``torch.jit.script``: its tensor operations run
    without Python's per-call overhead; CPU fusion is off, so they are the same kernels
    with the same results), or ``fn`` itself where it cannot be scripted."""
    out = _SCRIPTED.get(fn)
    if out is None:
        try:
            out = torch.jit.script(fn)
        except Exception:  # noqa: BLE001 - an unscriptable function runs as it is
            out = fn
        _SCRIPTED[fn] = out
    return out


def _choose_leaf(weights: torch.Tensor, log_total: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The multinomial choice within a sub-tree: leaf i with probability proportional to
    exp(weights[i]) ([n, C] log weights, their logsumexp [C]), by inverting the cumulative
    distribution at the uniform u [C]. Returns leaf indices [C]."""
    cdf = (weights - log_total).exp().cumsum(0)
    return (cdf < u).sum(0).clamp(max=weights.shape[0] - 1)


def _biased_take(log_w_new: torch.Tensor, log_w_old: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The top-level (biased progressive) choice: the new sub-tree's state replaces the
    current proposal with probability min(1, W_new / W_old) [C]."""
    return u < torch.exp(log_w_new - log_w_old)


def _subtree(leaf, active, d, eps, half, sync_every, zc, pc, gc, vc):
    """Build a sub-tree of 2^d leapfrog steps of size ``eps`` [C, 1] from (zc, pc, gc, vc)
    for the ``active`` chains, one ``leaf`` (``_Leaves``) call per step. A chain stops
    building at a divergence or when a block of 2^k leaves ending at the current leaf
    (k = 1..d) fails Stan's merged U-turn checks; its position is then frozen. Returns
    (valid [C]: built whole without stopping, the last leaf [C, 4, D] (z, p, grad, v) and
    its v, the first leaf's v and p, the momentum sum [C, D], positions and gradients of
    the n leaves made [2n, C, D], their logp and log weight H0 - H [2n, C], whether each
    chain was building when each leaf was made [n, C])."""
    zc, pc, gc, vc, eps, half, building = leaf.inputs(zc, pc, gc, vc, eps, half, active)
    rho_s = torch.zeros_like(pc)
    marks = leaf.marks(d, pc)
    zs, gs, logps, ws, masks = [], [], [], [], []
    n_leaves = 1 << d
    for n in range(n_leaves):
        masks.append(building)
        (z1, g1, logp1, w1, building, zc, pc, vc, marks, rho_s), going = leaf(
            zc, pc, gc, vc, eps, half, building, marks, rho_s, n, d)
        gc = g1
        zs.append(z1), gs.append(g1), logps.append(logp1), ws.append(w1)
        if n + 1 < n_leaves and (n + 1) % sync_every == 0 and not (bool(building.any()) if going is None else going):
            break
    return (building, torch.stack((zc, pc, gc, vc), 1), vc, marks[d][0], marks[d][1], rho_s,
            torch.stack(zs + gs), torch.nan_to_num(torch.stack(logps + ws), nan=-math.inf), torch.stack(masks))


# -- one leaf of a sub-tree: eager, or as one recorded graph ------------------------------
#
# Both forms keep, per level k of the sub-tree, the values at the first leaf of the current
# block of 2^k leaves (its v and p, the v and p of the leaf before it, the momentum sum
# before it: "marks"), and at a leaf that ends blocks of 2^k leaves (k >= 1) run Stan's
# merged U-turn checks of their two halves. The eager form keeps the marks in a dict and
# runs only the checks due (the fewest operations); the recorded form keeps them in one
# tensor [L, 5, C, D] and runs every level's check, masked (one graph for every leaf).
# (v, p "before" a leaf are vc, pc: the same as Stan's wherever the chain still builds,
# and a chain that has stopped is no longer checked.)

def _eager_leaf(potential, metric: Metric, H0, zc, pc, gc, vc, eps, half, building, marks: dict, rho_s,
                n: int, d: int):
    """Leaf n of a sub-tree of depth d for every chain, operation by operation: a leapfrog
    step from (zc, pc, gc) of size ``eps`` [C, 1], its log weight H0 - H, the U-turn checks
    it completes, the bookkeeping. ``marks``: level -> (v, p at the block's first leaf, v,
    p before it, momentum sum before it), updated in place. Returns (z1, grad1, logp1, log
    weight (NaN as -inf), building, zc, pc (frozen where the chain stopped), v1, marks,
    momentum sum)."""
    z1, p1, logp1, g1 = _leapfrog(potential, zc, pc, gc, eps, half, metric)
    v1 = metric.velocity(p1)
    w1 = torch.sub(logp1 + H0, torch.linalg.vecdot(p1, v1), alpha=0.5)  # H0 - H
    ok = w1 >= -MAX_DELTA_ENERGY  # not a divergence (a NaN is one)
    for level in range(d + 1):
        if n % (1 << level):
            break
        marks[level] = (v1, p1, vc, pc, rho_s)
    rho_s = rho_s + p1
    level = 1
    while level <= d and (n + 1) % (1 << level) == 0:
        vb, _, _, _, rho_b = marks[level]
        vm, pm, vmp, pmp, rho_m = marks[level - 1]
        ok = ok & _merged_no_uturn(vb, vmp, pmp, rho_m - rho_b, vm, pm, v1, rho_s - rho_m, rho_s - rho_b)
        level += 1
    building = building & ok
    keep = building.unsqueeze(-1)
    zc, pc = torch.where(keep, z1, zc), torch.where(keep, p1, pc)
    return z1, g1, logp1, w1, building, zc, pc, v1, marks, rho_s


def _leaf_step(evaluate_at, zc, pc, gc, vc, eps, half, inv_mass, H0, building, marks, rho_s, set_at, check_at):
    """``_eager_leaf`` in the form that is recorded into one graph: ``marks`` [L, 5, C, D]
    (level k: the five values), ``set_at`` [L] (bool): the levels whose block starts at
    this leaf, ``check_at`` [L]: the levels whose block ends at it (every level's check
    is computed, those not due are masked). ``evaluate_at(z) -> (logp, grad)``. Returns
    what ``_eager_leaf`` returns, with the marks tensor."""
    dense = inv_mass.dim() == 3

    def velocity(p):
        return torch.matmul(inv_mass, p.unsqueeze(-1)).squeeze(-1) if dense else inv_mass * p

    p = torch.addcmul(pc, half, gc)
    z1 = torch.addcmul(zc, eps, velocity(p))
    logp1, g1 = evaluate_at(z1)
    p1 = torch.addcmul(p, half, g1)
    v1 = velocity(p1)
    w1 = torch.sub(logp1 + H0, torch.linalg.vecdot(p1, v1), alpha=0.5)  # H0 - H
    ok = w1 >= -MAX_DELTA_ENERGY  # not a divergence (a NaN is one)
    marks = torch.where(set_at[:, None, None, None], torch.stack((v1, p1, vc, pc, rho_s)), marks)
    rho_s = rho_s + p1
    vm, pm, vmp, pmp, rho_m = marks[:-1].unbind(1)  # level k - 1: the second half's start
    vb, rho_b = marks[1:, 0], marks[1:, 4]          # level k: the block's start
    v1s, rho_ss = v1.expand_as(vb), rho_s.expand_as(vb)
    passed = _merged_no_uturn(vb, vmp, pmp, rho_m - rho_b, vm, pm, v1s, rho_ss - rho_m, rho_ss - rho_b)
    ok = ok & (passed | ~check_at[1:, None]).all(0)
    building = building & ok
    keep = building.unsqueeze(-1)
    zc, pc = torch.where(keep, z1, zc), torch.where(keep, p1, pc)
    return (z1, g1, logp1, w1, building, zc, pc, v1, marks, rho_s)


class _Leaves:
    """The leaf step of one NUTS transition, with the potential, metric and H0 bound:
    ``_eager_leaf``, or -- for a potential that offers its recorded graph
    (``recorded_graph()``, as ``inference.potential.Potential`` does for a static
    program) -- the leapfrog step, the potential and the bookkeeping recorded into ONE
    graph (``_FusedLeaf``), one call per leaf. A leaf the graph hands back (an invalid
    parameter, a kernel that raises) is made again by ``_leaf_step`` with the potential's
    own ``value_and_grad``. A call returns (the leaf's outputs, whether any chain still
    builds: a bool where the fused graph says so, else None)."""

    def __init__(self, potential, metric: Metric, H0, max_tree_depth: int, z: torch.Tensor, build: bool = True):
        self.potential, self.metric, self.H0 = potential, metric, H0
        self.fused = _fused_leaf(potential, metric, max_tree_depth, z, build)
        if self.fused is not None:  # (its inputs: contiguous, as its compiled code reads them)
            self.size = max_tree_depth
            self.inv_mass, self.H0 = metric.inv_mass.contiguous(), H0.contiguous()
            self.args = tuple(a.contiguous() for a in potential.graph_inputs())

    def inputs(self, *tensors) -> tuple:
        """Tensors a sub-tree starts from, as the leaf takes them (contiguous for the fused
        graph, whose compiled code reads them so)."""
        return tensors if self.fused is None else tuple(t.contiguous() for t in tensors)

    def marks(self, d: int, pc: torch.Tensor):
        """Empty level marks for a sub-tree of depth d: a dict (eager) or a tensor
        [L, 5, C, D] (the fused graph's fixed L)."""
        return {} if self.fused is None else pc.new_zeros((self.size, 5, *pc.shape))

    def __call__(self, zc, pc, gc, vc, eps, half, building, marks, rho_s, n: int, d: int):
        if self.fused is None:
            return _eager_leaf(self.potential, self.metric, self.H0, zc, pc, gc, vc, eps, half, building, marks,
                               rho_s, n, d), None
        inputs = (zc, pc, gc, vc, eps, half, self.inv_mass, self.H0, building, marks, rho_s,
                  *_level_masks(n, d, self.size, zc.device))
        out = self.fused(self.potential, inputs, self.args)
        if out is not None:
            return out
        return _leaf_step(self._evaluate, *inputs), None

    def _evaluate(self, z):
        return evaluate(self.potential, z)


_LEVEL_MASKS: dict = {}


def _level_masks(n: int, d: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(set_at, check_at) [size] for leaf n of a sub-tree of depth d: the levels k <= d
    whose block of 2^k leaves starts at leaf n (all, at n = 0), and the levels 1 <= k <= d
    whose block ends at it."""
    key = (n, d, size, device)
    masks = _LEVEL_MASKS.get(key)
    if masks is None:
        set_at = [k <= d and n % (1 << k) == 0 for k in range(size)]
        check_at = [1 <= k <= d and (n + 1) % (1 << k) == 0 for k in range(size)]
        masks = _LEVEL_MASKS[key] = (torch.tensor(set_at, device=device), torch.tensor(check_at, device=device))
    return masks


#: potential -> {graph key: nuts_loop.CompiledTransition, or None where it could not be built}
_LOOP_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled_transition(potential, metric: Metric, max_tree_depth: int, state: State, build: bool = True):
    """The whole NUTS transition as one compiled program (``inference.nuts_loop``) for this
    potential, metric shape and depth (built on first use where ``build``, then cached), or
    None: the potential offers no recorded graph, none is built yet and ``build`` is False,
    or it could not be built or disagreed with the eager transition. ``PPL_NUTS_LOOP``:
    "auto" (default: where the potential runs on TorchInductor), "1" (also a TorchScript
    potential), "0" (never). Its kernel is ``nuts_step``'s; the state chosen within a
    sub-tree is drawn progressively (same law, other random numbers: see nuts_loop)."""
    if os.environ.get("PPL_NUTS_FUSED") == "0":
        return None
    recorded = _offered_graph(potential, os.environ.get("PPL_NUTS_LOOP", "auto"))
    if recorded is None:
        return None
    gm, backend = recorded
    args = potential.graph_inputs()
    key = (id(gm), tuple(metric.inv_mass.shape), max_tree_depth, tuple((tuple(a.shape), a.dtype) for a in args))
    return _cached(_LOOP_CACHE, potential, key, build,
                   lambda: _build_transition(potential, gm, metric, max_tree_depth, state))


def _offered_graph(potential, mode: str):
    """(graph, backend) the potential records, where ``mode`` allows it ("auto": a graph
    TorchInductor runs; "1": any; "0": none), else None."""
    offer = getattr(potential, "recorded_graph", None)
    if offer is None or mode == "0":
        return None
    recorded = offer()
    if recorded is None or (recorded[1] != "inductor" and mode != "1"):
        return None
    return recorded


def _cached(caches: "weakref.WeakKeyDictionary", potential, key, build: bool, make):
    """``caches[potential][key]``, made by ``make()`` on first use where ``build``; None
    where it is not made yet and ``build`` is False, or the potential is not weakly
    referenceable."""
    try:
        cache = caches.setdefault(potential, {})
    except TypeError:  # not weakly referenceable
        return None
    if key not in cache:
        if not build:
            return None
        cache[key] = make()
    return cache[key]


def _fuse_now(left: int, ops: int, chains: int, native: bool = False):
    """``nuts_step``'s ``fuse`` with ``left`` transitions to go, for a potential graph of
    ``ops`` operations (0: none offered) and ``chains`` chains; ``native``: the potential runs
    natively compiled (``Potential.native_library``), so the compiled transition calls its
    library and costs only its check to build. True: build the compiled transition (or failing
    that the fused leaf) -- ``left`` x ``loop_saving(ops, chains)`` exceeds
    ``loop_build_cost(ops)``, a build from scratch; "loop": build the compiled transition only
    (not the fused leaf, which would compile) -- the saving exceeds ``loop_build_cost(ops,
    native=True)``; else False. A function of the graph and the run's options only -- never of
    what the compile cache holds or of timings -- so that a seeded run's draws do not depend on
    them (the compiled transition picks a sub-tree's state progressively: the same law as the
    eager kernel, other draws). The first transition has the most left, so the transition is
    built there or not at all."""
    if ops <= 0:
        return False
    saving = left * loop_saving(ops, chains)
    if saving > loop_build_cost(ops):
        return True
    return "loop" if native and saving > loop_build_cost(ops, native=True) else False


def loop_build_cost(ops: int, native: bool = False) -> float:
    """Estimated CPU seconds (the process's and its gcc children's) of building the compiled
    transition for a potential graph of ``ops`` operations: from scratch on a compile-cache
    miss (the potential's graph recorded and compiled again), or, ``native``, around the
    potential's own AOTInductor library (only the check against the eager transition). The C++
    operator's once-per-machine build is amortised (not counted)."""
    return LOOP_NATIVE_BUILD if native else LOOP_BUILD_FIXED + LOOP_BUILD_PER_OP * ops


def loop_saving(ops: int, chains: int) -> float:
    """Estimated CPU seconds the compiled transition saves per transition over the eager one,
    for a graph of ``ops`` operations and ``chains`` chains."""
    return (LOOP_SAVED_FIXED + LOOP_SAVED_PER_OP * ops) * batch_factor(chains)


def batch_factor(chains: int) -> float:
    """How much longer a transition of ``chains`` chains as one batch runs than one chain's
    (the batch runs as long as its longest tree): 1 + ``LOOP_SAVED_PER_DOUBLING_OF_CHAINS``
    per doubling."""
    return 1 + LOOP_SAVED_PER_DOUBLING_OF_CHAINS * math.log2(max(chains, 1))


def _graph_ops(potential) -> int:
    """The number of operations of the graph the potential offers (0: none)."""
    offer = getattr(potential, "recorded_graph", None)
    recorded = offer() if offer is not None else None
    return 0 if recorded is None else len(recorded[0].graph.nodes)


def _native_library(potential):
    """The AOTInductor library the potential's graph runs in (``compiled.NativeLibrary``), or
    None (not compiled natively, or a potential that does not say)."""
    offer = getattr(potential, "native_library", None)
    return None if offer is None else offer()


def _build_transition(potential, gm, metric: Metric, max_tree_depth: int, state: State):
    """The compiled transition (``nuts_loop.CompiledTransition``) around the potential's own
    AOTInductor library where it has one, else around its graph compiled for it; None where it
    cannot be built or disagrees with the eager transition."""
    from .nuts_loop import CompiledTransition

    def evaluate_graph(z, *args):
        logp, grad, ok = gm(z, *args)
        return _finite_logp(logp), _finite_grad(grad), ok
    try:
        return CompiledTransition.build(evaluate_graph, potential.graph_inputs(), lambda z: evaluate(potential, z),
                                        state.z, state.logp, state.grad, metric.inv_mass, max_tree_depth,
                                        potential_graph=gm, native=_native_library(potential))
    except Exception as e:  # noqa: BLE001 - any failure keeps the eager transition
        _FusedLeaf.why_not["loop"] = (str(e).splitlines() or [type(e).__name__])[0]
        return None


#: potential -> {graph key: _FusedLeaf, or None where it could not be built}
_FUSED_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fused_leaf(potential, metric: Metric, max_tree_depth: int, z: torch.Tensor, build: bool = True):
    """The fused leaf graph for this potential, metric shape and depth (built on first use
    where ``build``, then cached), or None: the potential offers no recorded graph, none is
    built yet and ``build`` is False, or the graph could not be built or disagreed with
    the eager leaf. ``PPL_NUTS_FUSED``: "auto" (default: fuse
    where the potential runs on TorchInductor; a TorchScript replay of the fused graph is
    no faster than the eager leaf around the TorchScript potential), "1" (fuse also a
    TorchScript potential), "0" (never)."""
    recorded = _offered_graph(potential, os.environ.get("PPL_NUTS_FUSED", "auto"))
    if recorded is None:
        return None
    gm, backend = recorded
    args = potential.graph_inputs()
    key = (id(gm), backend, tuple(metric.inv_mass.shape), max_tree_depth,
           tuple((tuple(a.shape), a.dtype) for a in args))
    return _cached(_FUSED_CACHE, potential, key, build,
                   lambda: _FusedLeaf.build(potential, gm, backend, metric, max_tree_depth, z))


class _FusedLeaf:
    """``_leaf_step`` with the potential's recorded graph inside, recorded once with
    ``make_fx`` into one ATen graph (``inference.compiled.record``) and replayed by the
    potential's own backend (TorchScript, or TorchInductor's fused native code). Checked
    against the eager leaf at fresh points before use. A call returns None where the
    graph reports an invalid parameter or its kernel raises: the caller then runs the
    eager leaf (whose potential handles those rows)."""

    why_not: dict = {}  # backend -> the last reason a fused leaf could not be built (for diagnosis)

    def __init__(self, run, gm, nodes: int, timed: bool):
        self.run, self.gm, self.nodes = run, gm, nodes
        self.timed = timed  # count the potential's evaluations and time on TorchScript (measurements only)

    @classmethod
    def build(cls, potential, gm, backend: str, metric: Metric, max_tree_depth: int, z: torch.Tensor):
        from .compiled import record, replay
        try:
            example = _leaf_example(potential, metric, max_tree_depth, z)
            recorded = record(_with_flag(gm), example)
            # no size and stride checks on every call (a third of its time on eight schools):
            # the inputs are contiguous by construction (``_subtree``, ``_Leaves``), and the
            # outputs fed back are checked contiguous here (``_check``)
            run = replay(recorded, example, backend, size_asserts=False)
            leaf = cls(run, recorded, len(recorded.graph.nodes), backend != "inductor")
            leaf._check(potential, metric, max_tree_depth, z)
            return leaf
        except Exception as e:  # noqa: BLE001 - any failure keeps the eager leaf
            cls.why_not[backend] = (str(e).splitlines() or [type(e).__name__])[0]
            return None

    def __call__(self, potential, inputs, args):
        """(the leaf's outputs, whether any chain still builds), or None: the eager leaf
        must make this leaf."""
        started = time.perf_counter() if self.timed else 0.0
        try:
            out = self.run(*inputs, *args)
        except (RuntimeError, AssertionError):  # a compiled kernel that raises (e.g. a Cholesky; an
            return None                          # input of other strides): the eager leaf
        if self.timed:
            potential.count_graph_call(time.perf_counter() - started)
        valid, going = out[-1].tolist()  # (one read of the graph's flags)
        if not valid:  # an invalid parameter in some chain: the eager leaf finds which
            return None
        return tuple(out[:-1]), going

    def _check(self, potential, metric, max_tree_depth, z) -> None:
        """ValueError unless the graph and the eager leaf agree at fresh points."""
        for seed in (1, 2):
            inputs = _leaf_example(potential, metric, max_tree_depth, z, seed)
            answer = self(potential, inputs[:13], inputs[13:])
            eager = _leaf_step(lambda z: evaluate(potential, z), *inputs[:13])
            if answer is None:
                raise ValueError("the fused leaf reports an invalid parameter at a check point")
            fused, going = answer
            if going != bool(eager[4].any()):
                raise ValueError("the fused leaf disagrees with the eager leaf")
            if not all(t.is_contiguous() for t in fused):
                raise ValueError("the fused leaf returns a tensor that is not contiguous")
            for f, e in zip(fused, eager):
                same = (torch.equal(f, e) if f.dtype == torch.bool else
                        f.shape == e.shape and torch.allclose(f, e, rtol=1e-9, atol=1e-12, equal_nan=True))
                if not same:
                    raise ValueError("the fused leaf disagrees with the eager leaf")


def _with_flag(gm):
    """The fused leaf as a function of (leaf inputs..., beta, *given) -> (the leaf's
    outputs..., flags [2]: the potential's parameters are valid, a chain still builds)."""
    def fused(*inputs):
        leaf_inputs, pot_args = inputs[:13], inputs[13:]
        flag = []

        def evaluate_at(z):
            logp, grad, ok = gm(z, *pot_args)
            flag.append(ok)
            return _finite_logp(logp), _finite_grad(grad)
        out = _leaf_step(evaluate_at, *leaf_inputs)
        return (*out, torch.stack([flag[0], out[4].any()]))
    return fused


def _finite_logp(logp):
    return torch.nan_to_num(logp.to(_F64), nan=-math.inf, posinf=-math.inf, neginf=-math.inf)


def _finite_grad(grad):
    return torch.nan_to_num(grad.to(_F64), nan=0.0, posinf=0.0, neginf=0.0)


def _leaf_example(potential, metric: Metric, max_tree_depth: int, z: torch.Tensor, seed: int = 0) -> tuple:
    """Leaf inputs at fresh points (positions near z, the chains' current positions; random
    momenta, marks and masks) followed by the potential's graph inputs."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    C, D = metric.shape
    device = metric.inv_mass.device

    def normal(*shape):
        return torch.randn(*shape, generator=g, dtype=_F64).to(device)

    def coin(*shape):
        return (torch.rand(*shape, generator=g) < 0.5).to(device)

    zc = z + 0.01 * normal(C, D)
    logp, gc = evaluate(potential, zc)
    pc = normal(C, D)
    eps = (0.05 + 0.1 * torch.rand(C, 1, generator=g, dtype=_F64).to(device)) * torch.where(coin(C, 1), 1.0, -1.0)
    H0 = metric.kinetic(pc) - logp + normal(C)
    return tuple(t.contiguous() for t in (
        zc, pc, gc, metric.velocity(pc), eps, 0.5 * eps, metric.inv_mass, H0, coin(C),
        normal(max_tree_depth, 5, C, D), normal(C, D), coin(max_tree_depth), coin(max_tree_depth),
        *potential.graph_inputs()))


# -- step size search -------------------------------------------------------------------

def find_reasonable_step_size(potential, state: State, metric: Metric, randomness,
                              initial: torch.Tensor | float = 1.0, *, max_iterations: int = 100) -> torch.Tensor:
    """Stan's heuristic per chain: from ``initial``, double (or halve) the step size while
    one leapfrog step's acceptance probability exp(H0 - H) stays above (below) 0.8; one
    momentum draw per chain serves every trial. Returns [C] (kept within [1e-10, 1e7])."""
    C, D = state.z.shape
    device = state.z.device
    step = torch.as_tensor(initial, dtype=_F64, device=device).expand(C).clone()
    p0 = metric.sample_momentum(randomness)
    H0 = metric.kinetic(p0) - state.logp
    log_target = math.log(0.8)

    def log_accept(eps):
        _, p, logp, _ = leapfrog(potential, state.z, p0, state.grad, eps, metric)
        H, _ = _energy_error(metric, p, logp, H0)
        return H0 - H

    up = log_accept(step) > log_target
    searching = torch.isfinite(H0)
    for _ in range(max_iterations):
        trial = torch.where(up, 2 * step, 0.5 * step)
        searching = searching & (trial <= 1e7) & (trial >= 1e-10)
        step = torch.where(searching, trial, step)
        delta = log_accept(trial)
        crossed = torch.where(up, ~(delta > log_target), delta >= log_target)
        searching = searching & ~crossed
        if not bool(searching.any()):
            break
    return step


# -- the driver: warm-up, then sampling -------------------------------------------------

@dataclass
class NUTSResult:
    """Draws of C chains after warm-up, with the per-draw statistics."""
    z: torch.Tensor             # [C, S, D] float64 (unconstrained)
    logp: torch.Tensor          # [C, S]
    divergent: torch.Tensor     # [C, S] bool
    tree_depth: torch.Tensor    # [C, S] int64
    n_steps: torch.Tensor       # [C, S] int64
    accept_stat: torch.Tensor   # [C, S]
    energy: torch.Tensor        # [C, S]
    step_size: torch.Tensor     # [C], fixed after warm-up
    inverse_mass: torch.Tensor  # [C, D] or [C, D, D]
    warmup_divergences: torch.Tensor  # [C] int64
    kernel: str = "nuts"
    max_tree_depth: int = 10
    phase_seconds: dict = field(default_factory=dict)
    #: "compiled": NUTS's transitions ran as one compiled program (``inference.nuts_loop``);
    #: "eager": step by step from Python (a potential without a compiled graph, a short run, or a
    #: build that failed: ``why_not_compiled``); "" for HMC and MALA
    transition: str = ""
    why_not_compiled: str | None = None

    def bfmi(self) -> torch.Tensor:
        """E-BFMI per chain [C] (Stan warns below 0.3)."""
        return bfmi(self.energy)

    def divergences(self) -> torch.Tensor:
        """Divergent transitions per chain after warm-up [C]."""
        return self.divergent.sum(-1)

    def hit_max_depth(self) -> torch.Tensor:
        """Fraction of draws per chain whose tree stopped at max_tree_depth [C]."""
        return (self.tree_depth >= self.max_tree_depth).to(_F64).mean(-1)


def bfmi(energy: torch.Tensor) -> torch.Tensor:
    """Energy Bayesian fraction of missing information per chain, from energies [C, S]:
    sum (E_n - E_{n-1})^2 / sum (E_n - mean E)^2."""
    energy = energy.to(_F64)
    num = energy.diff(dim=-1).square().sum(-1)
    den = (energy - energy.mean(-1, keepdim=True)).square().sum(-1)
    return num / den


def _transition(kernel: str, *, max_tree_depth: int, num_steps: int | None, trajectory_length: float | None,
                fixed_potential: bool = False):
    """The kernel as a function (potential, state, step_size, metric, randomness, fuse=True).
    ``fixed_potential``: the caller never changes the potential between transitions (NUTS
    then looks its compiled transition up once: ``_NutsTransitions``)."""
    if kernel == "nuts":
        return _NutsTransitions(max_tree_depth, fixed_potential)
    if kernel == "hmc":
        if num_steps is None and trajectory_length is None:
            num_steps = 10
        return lambda pot, s, eps, m, r, fuse=True: hmc_step(pot, s, eps, m, r, num_steps=num_steps,
                                                  trajectory_length=trajectory_length)
    if kernel == "mala":
        return lambda pot, s, eps, m, r, fuse=True: hmc_step(pot, s, eps, m, r, num_steps=1)
    raise ValueError(f"unknown kernel {kernel!r} (nuts, hmc, mala)")


class _NutsTransitions:
    """``nuts_step`` as ``sample_nuts`` calls it, transition after transition. Where the
    potential stays the same (``fixed_potential``: no ``between``), its compiled transition is
    looked up (or built) at the first transition only: the potential, the metric's shape and
    the depth never change within a run and ``fuse`` only turns False as fewer transitions
    are left, so every later lookup would give the same answer."""

    def __init__(self, max_tree_depth: int, fixed_potential: bool):
        self.max_tree_depth, self.fixed_potential = max_tree_depth, fixed_potential
        self.whole = _LOOK_UP

    def __call__(self, potential, state: State, step_size, metric: Metric, randomness, fuse=True, drawn=None):
        whole = self.whole
        if whole is _LOOK_UP and self.fixed_potential:
            whole = self.whole = _compiled_transition(potential, metric, self.max_tree_depth, state, bool(fuse))
        return nuts_step(potential, state, step_size, metric, randomness, max_tree_depth=self.max_tree_depth,
                         fuse=fuse, whole=whole, drawn=drawn)

    def in_runs(self, metric: Metric, randomness):
        """The compiled transition where it can make runs of transitions in C++ with the
        same draws (``CompiledTransition.run_many``), else None."""
        whole = self.whole
        if not self.fixed_potential or whole is None or whole is _LOOK_UP or not hasattr(whole, "run_many") \
                or os.environ.get("PPL_NUTS_RUNS") == "0":
            return None
        return whole if whole.can_run_many(randomness, metric.inv_mass) else None


#: a shown bar's acceptance and divergences are refreshed every this many iterations (one sync)
_POSTFIX_EVERY = 25


#: the sampling loop copies the latest transitions' draws and statistics into its [S, C, ...]
#: buffers this many at a time (one stack per field), instead of 7 copies per transition
_RECORD_EVERY = 64


class _Draws:
    """The per-draw record of ``sample_nuts``'s sampling phase: buffers [S, C, D] (z) and
    [S, C] (the statistics), filled ``_RECORD_EVERY`` transitions at a time. Until then it
    keeps the transitions' own tensors, which is safe because the kernels return fresh
    tensors and never write into one they returned."""

    FIELDS = (("z", _F64), ("logp", _F64), ("divergent", torch.bool), ("tree_depth", torch.int64),
              ("n_steps", torch.int64), ("accept_stat", _F64), ("energy", _F64))

    def __init__(self, samples: int, C: int, D: int, device):
        self.buffers = {name: torch.empty((samples, C, D) if name == "z" else (samples, C), dtype=dtype, device=device)
                        for name, dtype in self.FIELDS}
        self.pending: list[tuple] = []
        self.done = 0

    def add(self, state: State, info: StepInfo) -> None:
        self.pending.append((state.z, state.logp, info.divergent, info.tree_depth, info.n_steps, info.accept_stat,
                             info.energy))
        if len(self.pending) == _RECORD_EVERY:
            self._flush()

    def add_block(self, z, logp, energy, accept_stat, divergent, moved, n_steps, tree_depth) -> None:
        """Transitions recorded as blocks [k, C, ...] (``CompiledTransition.run_many``'s)."""
        self._flush()
        k = z.shape[0]
        for name, block in (("z", z), ("logp", logp), ("divergent", divergent), ("tree_depth", tree_depth),
                            ("n_steps", n_steps), ("accept_stat", accept_stat), ("energy", energy)):
            self.buffers[name][self.done:self.done + k] = block
        self.done += k

    def recorded(self) -> dict:
        """The buffers (name -> [S, C, ...]), every transition added so far written in."""
        self._flush()
        return self.buffers

    def _flush(self) -> None:
        if self.pending:
            n = len(self.pending)
            for buffer, column in zip(self.buffers.values(), zip(*self.pending)):
                buffer[self.done:self.done + n] = torch.stack(column)
            self.done += n
            self.pending = []


class _Divergences:
    """Warm-up divergences per chain [C] (int64), counted ``_RECORD_EVERY`` transitions at a time."""

    def __init__(self, C: int, device):
        self.count = torch.zeros(C, dtype=torch.int64, device=device)
        self.pending: list[torch.Tensor] = []

    def add(self, divergent: torch.Tensor) -> None:
        self.pending.append(divergent)
        if len(self.pending) == _RECORD_EVERY:
            self.total()

    def total(self) -> torch.Tensor:
        if self.pending:
            self.count += torch.stack(self.pending).sum(0)
            self.pending = []
        return self.count


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> dict:
    wall, cpu = _clock()
    return {"wall": wall - start[0], "cpu": cpu - start[1]}


def sample_nuts(potential, z0: torch.Tensor, *, samples: int, warmup: int, kernel: str = "nuts",
                randomness, target_accept: float = 0.8, max_tree_depth: int = 10,
                dense_mass: bool = False, num_steps: int | None = None,
                trajectory_length: float | None = None, step_size=None, inverse_mass=None,
                adapt_mass: bool = True, progress: bool | None = None, between=None) -> NUTSResult:
    """Run C chains from z0 [C, D]: ``warmup`` iterations of Stan's windowed adaptation
    (each chain its own step size and mass matrix), then ``samples`` draws with both
    fixed. ``kernel``: "nuts", "hmc" (``num_steps``, default 10, or
    ``trajectory_length``) or "mala". ``step_size`` / ``inverse_mass``: where adaptation
    starts (default: Stan's step size search, the identity; the mass estimates are
    regularised towards a small multiple of ``inverse_mass``, Stan's of the identity). ``between``: a function
    State -> State called before every transition (warm-up and sampling), e.g. the other
    half of a Gibbs sweep (it may change the potential; it returns the state re-scored).
    With NUTS's compiled transition, a diagonal metric and the adaptation's estimates on the
    host, runs of up to ``_RECORD_EVERY`` iterations are made in C++ (``CompiledTransition.
    run_many`` in sampling; ``warm_up`` in warm-up, up to each slow window's end, whose mass
    matrix and step size search stay here): the same draws as one transition at a time
    (``PPL_NUTS_RUNS=0`` turns that off)."""
    z0 = z0.to(_F64)
    C, D = z0.shape
    device = z0.device
    transition = _transition(kernel, max_tree_depth=max_tree_depth, num_steps=num_steps,
                             trajectory_length=trajectory_length, fixed_potential=between is None)
    state = init_state(potential, z0)
    bad = ~torch.isfinite(state.logp)
    if bool(bad.any()):
        raise PPLRuntimeError(f"{kernel}: the initial point of chain(s) {bad.nonzero().flatten().tolist()} "
                              "has log density -inf",
                              hint="start every chain where the density is positive")
    if inverse_mass is None:
        metric = Metric.identity(C, D, device, dense=dense_mass)
    else:
        metric = Metric(torch.as_tensor(inverse_mass, dtype=_F64, device=device).expand(
            (C, D, D) if dense_mass else (C, D)).clone())
    if step_size is None:
        step = find_reasonable_step_size(potential, state, metric, randomness)
    else:
        step = torch.as_tensor(step_size, dtype=_F64, device=device).expand(C).clone()
    adapt = WindowedAdaptation(warmup, step, C=C, D=D, target_accept=target_accept, dense=dense_mass,
                               adapt_mass=adapt_mass, device=device,
                               shrink_towards=None if inverse_mass is None else metric.inv_mass.clone())
    warm_div = _Divergences(C, device)
    draws = _Draws(samples, C, D, device)
    phases = {}
    ops = _graph_ops(potential)  # (the compiled transition's cost model: _fuse_now)
    fuse_now = functools.partial(_fuse_now, native=True) if _native_library(potential) is not None else _fuse_now
    with progress_bar(progress, desc=kernel.upper(), unit=" draws", total=warmup + samples) as bar:
        start = _clock()
        i, runs = 0, _LOOK_UP
        while i < warmup:
            if runs is _LOOK_UP:
                runs = _runs(transition, metric, randomness)
            drawn = None
            if runs is not None and runs is not _LOOK_UP:  # in C++ up to the next window's end, adaptation included
                n = min(adapt.next_stop(i) + 1 - i, _RECORD_EVERY)
                done, (z, logp, grad), step, drawn = runs.warm_up(
                    state.z, state.logp, state.grad, metric._sqrt_mass, step.to(_F64), metric.inv_mass,
                    potential.graph_inputs(), randomness, adapt, i, n, warm_div.count)
                state = State(z, logp, grad)
                if done:
                    i += done
                    inv_mass = adapt.window_end(i - 1)
                    if inv_mass is not None:
                        metric = Metric(inv_mass)
                        step = find_reasonable_step_size(potential, state, metric, randomness, step)
                        adapt.restart_step_size(step)
                    bar.update(done)
                    if bar is not NO_BAR:
                        bar.set_postfix_str(f"warm-up, divergences {int(warm_div.total().sum())}", refresh=False)
                if drawn is None:
                    continue
            if between is not None:
                state = between(state)
            state, info = transition(potential, state, step, metric, randomness,
                                     fuse=fuse_now(warmup + samples - i, ops, C),
                                     **({} if drawn is None else {"drawn": drawn}))
            warm_div.add(info.divergent)
            step, inv_mass = adapt.update(i, state.z, info.accept_stat)
            if inv_mass is not None:
                metric = Metric(inv_mass)
                step = find_reasonable_step_size(potential, state, metric, randomness, step)
                adapt.restart_step_size(step)
            bar.update(1)
            if bar is not NO_BAR and (i % _POSTFIX_EVERY == 0 or i == warmup - 1):
                bar.set_postfix_str(f"warm-up, divergences {int(warm_div.total().sum())}", refresh=False)
            i += 1
        if warmup:
            step = adapt.final_step_size()
        phases["warmup"] = _since(start)
        start = _clock()
        s, runs = 0, _LOOK_UP
        while s < samples:
            if runs is _LOOK_UP:
                runs = _runs(transition, metric, randomness)
            drawn = None
            if runs is not None and runs is not _LOOK_UP:  # up to _RECORD_EVERY transitions in C++
                done, (z, logp, grad), records, drawn = runs.run_many(
                    state.z, state.logp, state.grad, metric._sqrt_mass, step.to(_F64), metric.inv_mass,
                    potential.graph_inputs(), randomness, min(_RECORD_EVERY, samples - s))
                state = State(z, logp, grad)
                draws.add_block(*records)
                s = _advance(bar, draws, s, done, samples)
                if drawn is None:
                    continue
            if between is not None:
                state = between(state)
            state, info = transition(potential, state, step, metric, randomness, fuse=fuse_now(samples - s, ops, C),
                                     **({} if drawn is None else {"drawn": drawn}))
            draws.add(state, info)
            bar.update(1)
            if bar is not NO_BAR and (s % _POSTFIX_EVERY == 0 or s == samples - 1):
                stats = draws.recorded()
                bar.set_postfix_str(f"acceptance {float(stats['accept_stat'][:s + 1].mean()):.2f}, divergences "
                                    f"{int(stats['divergent'][:s + 1].sum())}", refresh=False)
            s += 1
        stats = draws.recorded()
        phases["sampling"] = _since(start)
    per_chain = {k: v.transpose(0, 1).contiguous() for k, v in stats.items()}
    used, why_not = _transition_used(transition)
    return NUTSResult(step_size=step, inverse_mass=metric.inv_mass, warmup_divergences=warm_div.total(),
                      kernel=kernel, max_tree_depth=max_tree_depth, phase_seconds=phases, transition=used,
                      why_not_compiled=why_not, **per_chain)


def _runs(transition, metric: Metric, randomness):
    """The compiled transition where ``sample_nuts`` can make runs of iterations with it in C++
    (``_NutsTransitions.in_runs``: a diagonal metric, so also the adaptation's estimates on the
    host), None where it cannot, ``_LOOK_UP`` until the transition has been looked up (at the
    first transition, warm-up's or sampling's)."""
    if not isinstance(transition, _NutsTransitions):
        return None
    if transition.whole is _LOOK_UP and transition.fixed_potential:
        return _LOOK_UP
    return transition.in_runs(metric, randomness)


def _advance(bar, draws: "_Draws", s: int, done: int, samples: int) -> int:
    """The sampling loop's count after ``done`` more draws from ``s``; the bar moved, and its
    acceptance and divergences refreshed every ``_POSTFIX_EVERY`` draws and at the last."""
    if done:
        bar.update(done)
        end = s + done
        if bar is not NO_BAR and ((end - 1) // _POSTFIX_EVERY != (s - 1) // _POSTFIX_EVERY or end == samples):
            stats = draws.recorded()
            bar.set_postfix_str(f"acceptance {float(stats['accept_stat'][:end].mean()):.2f}, divergences "
                                f"{int(stats['divergent'][:end].sum())}", refresh=False)
        s = end
    return s


def _transition_used(transition) -> tuple[str, str | None]:
    """("compiled" or "eager", why not compiled or None) for ``sample_nuts``'s NUTS
    transitions; ("", None) for the other kernels and where the potential changes between
    transitions (a Gibbs sweep)."""
    if not isinstance(transition, _NutsTransitions) or not transition.fixed_potential:
        return "", None  # (HMC, MALA; a potential that changes between transitions: looked up each time)
    if transition.whole is _LOOK_UP:  # (never looked up: not worth building for this run)
        return "eager", None
    if transition.whole is not None:
        return "compiled", None
    return "eager", _FusedLeaf.why_not.get("loop")  # (looked up and not built: the latest failure)
