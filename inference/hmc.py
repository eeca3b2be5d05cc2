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
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..semantics.errors import PPLRuntimeError
from ..stdlib.progress import progress_bar
from .adaptation import WindowedAdaptation

#: an energy error above this is a divergence (Stan's max_deltaH)
MAX_DELTA_ENERGY = 1000.0

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
    v = torch.stack((a_far_v, b_far_v, a_far_v, b_near_v, a_near_v, b_far_v))
    rho = torch.stack((whole, whole, a_ext, a_ext, b_ext, b_ext))
    return (torch.linalg.vecdot(v, rho) > 0).all(0)


def nuts_step(potential, state: State, step_size: torch.Tensor, metric: Metric, randomness, *,
              max_tree_depth: int = 10):
    """One multinomial NUTS transition per chain (all chains one batch). Returns
    (State, StepInfo) with Stan's per-draw statistics: accept_stat = mean over the tree's
    leaves of min(1, exp(H0 - H)), tree_depth = doublings, n_steps = leapfrog steps,
    divergent, energy = H at the kept state (its own momentum)."""
    C, D = state.z.shape
    K = max_tree_depth
    device = state.z.device
    p0 = metric.sample_momentum(randomness)
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

    for d in range(K):
        if d and not bool(active.any()):
            break
        depth = depth + active
        z_near, p_near, g_near, v_near = ends[chain, near_at[d]].unbind(1)
        valid, last, v_last, v_first, p_first, rho_s, zg, lw, building = _subtree(
            potential, metric, H0, active, d, eps_at[d], half_at[d], sync_every, z_near, p_near, g_near, v_near)
        n = building.shape[0]
        weights = lw[n:]
        all_weights.append(weights), all_building.append(building)
        # the sub-tree's multinomial choice, then the biased progressive choice at the top
        log_w_s = torch.logsumexp(weights, 0)
        leaf = _choose_leaf(weights, log_w_s, u_sub[d])
        take = valid & _biased_take(log_w_s, log_w, u_top[d])
        rows = torch.stack((leaf, leaf + n))
        prop_zg = torch.where(take.unsqueeze(-1), zg[rows, chain], prop_zg)
        prop_lw = torch.where(take, lw[rows, chain], prop_lw)
        moved = moved | take
        log_w = torch.where(valid, torch.logaddexp(log_w, log_w_s), log_w)
        # the U-turn checks of the merged trajectory: old part (far .. near), new sub-tree
        whole = rho + rho_s
        ok = _merged_no_uturn(ends[chain, far_at[d], 3], v_near, p_near, rho, v_first, p_first, v_last,
                              rho_s, whole)
        rho = torch.where(valid.unsqueeze(-1), whole, rho)
        ends = torch.where((grows_at[d] & valid.unsqueeze(-1))[:, :, None, None], last.unsqueeze(1), ends)
        active = valid & ok

    weights, building = torch.cat(all_weights), torch.cat(all_building)
    n_steps = building.sum(0)
    accept_stat = torch.where(building, weights.clamp(max=0.0).exp(), 0.0).sum(0) / n_steps.clamp(min=1)
    divergent = (building & (weights < -MAX_DELTA_ENERGY)).any(0)
    new = State(prop_zg[0], prop_lw[0], prop_zg[1])
    return new, StepInfo(accept_stat, divergent, H0 - prop_lw[1], n_steps, depth, moved)


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


def _subtree(potential, metric, H0, active, d, eps, half, sync_every, zc, pc, gc, vc):
    """Build a sub-tree of 2^d leapfrog steps of size ``eps`` [C, 1] from (zc, pc, gc, vc)
    for the ``active`` chains. A chain stops building at a divergence or when a block of
    2^k leaves ending at the current leaf (k = 1..d) fails Stan's merged U-turn checks;
    its position is then frozen. Returns (valid [C]: built whole without stopping, the
    last leaf [C, 4, D] (z, p, grad, v) and its v, the first leaf's v and p, the momentum
    sum [C, D], positions and gradients of the n leaves made [2n, C, D], their logp and
    log weight H0 - H [2n, C], whether each chain was building when each leaf was made
    [n, C])."""
    building = active
    rho_s = torch.zeros_like(pc)
    v_prev, p_prev = vc, pc
    starts: dict[int, tuple] = {}  # level -> (v, p at the block's first leaf, v, p before it, rho before it)
    zs, gs, logps, ws, masks = [], [], [], [], []
    n_leaves = 1 << d
    for n in range(n_leaves):
        z1, p1, logp1, g1 = _leapfrog(potential, zc, pc, gc, eps, half, metric)
        v1 = metric.velocity(p1)
        w1 = torch.sub(logp1 + H0, torch.linalg.vecdot(p1, v1), alpha=0.5)  # H0 - H
        zs.append(z1), gs.append(g1), logps.append(logp1), ws.append(w1), masks.append(building)
        ok = w1 >= -MAX_DELTA_ENERGY  # not a divergence (a NaN is one)
        for level in range(d + 1):
            if n % (1 << level):
                break
            starts[level] = (v1, p1, v_prev, p_prev, rho_s)
        rho_s = rho_s + p1
        level = 1
        while level <= d and (n + 1) % (1 << level) == 0:
            vb, _, _, _, rho_b = starts[level]
            vm, pm, vmp, pmp, rho_m = starts[level - 1]
            ok = ok & _merged_no_uturn(vb, vmp, pmp, rho_m - rho_b, vm, pm, v1, rho_s - rho_m, rho_s - rho_b)
            level += 1
        building = building & ok
        keep = building.unsqueeze(-1)
        zc = torch.where(keep, z1, zc)
        pc = torch.where(keep, p1, pc)
        gc, vc = g1, v1
        v_prev, p_prev = v1, p1
        if n + 1 < n_leaves and (n + 1) % sync_every == 0 and not bool(building.any()):
            break
    return (building, torch.stack((zc, pc, gc, vc), 1), vc, starts[d][0], starts[d][1], rho_s,
            torch.stack(zs + gs), torch.nan_to_num(torch.stack(logps + ws), nan=-math.inf), torch.stack(masks))


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


def _transition(kernel: str, *, max_tree_depth: int, num_steps: int | None, trajectory_length: float | None):
    """The kernel as a function (potential, state, step_size, metric, randomness)."""
    if kernel == "nuts":
        return lambda pot, s, eps, m, r: nuts_step(pot, s, eps, m, r, max_tree_depth=max_tree_depth)
    if kernel == "hmc":
        if num_steps is None and trajectory_length is None:
            num_steps = 10
        return lambda pot, s, eps, m, r: hmc_step(pot, s, eps, m, r, num_steps=num_steps,
                                                  trajectory_length=trajectory_length)
    if kernel == "mala":
        return lambda pot, s, eps, m, r: hmc_step(pot, s, eps, m, r, num_steps=1)
    raise ValueError(f"unknown kernel {kernel!r} (nuts, hmc, mala)")


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
    starts (default: Stan's step size search, the identity). ``between``: a function
    State -> State called before every transition (warm-up and sampling), e.g. the other
    half of a Gibbs sweep (it may change the potential; it returns the state re-scored)."""
    z0 = z0.to(_F64)
    C, D = z0.shape
    device = z0.device
    transition = _transition(kernel, max_tree_depth=max_tree_depth, num_steps=num_steps,
                             trajectory_length=trajectory_length)
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
                               adapt_mass=adapt_mass, device=device)
    warm_div = torch.zeros(C, dtype=torch.int64, device=device)
    out_z = torch.empty(samples, C, D, dtype=_F64, device=device)
    stats = {k: torch.empty(samples, C, dtype=t, device=device)
             for k, t in [("logp", _F64), ("divergent", torch.bool), ("tree_depth", torch.int64),
                          ("n_steps", torch.int64), ("accept_stat", _F64), ("energy", _F64)]}
    phases = {}
    with progress_bar(progress, desc=kernel.upper(), unit=" draws", total=warmup + samples) as bar:
        start = _clock()
        for i in range(warmup):
            if between is not None:
                state = between(state)
            state, info = transition(potential, state, step, metric, randomness)
            warm_div += info.divergent
            step, inv_mass = adapt.update(i, state.z, info.accept_stat)
            if inv_mass is not None:
                metric = Metric(inv_mass)
                step = find_reasonable_step_size(potential, state, metric, randomness, step)
                adapt.restart_step_size(step)
            bar.update(1)
        if warmup:
            step = adapt.final_step_size()
        phases["warmup"] = _since(start)
        start = _clock()
        for s in range(samples):
            if between is not None:
                state = between(state)
            state, info = transition(potential, state, step, metric, randomness)
            out_z[s] = state.z
            stats["logp"][s] = state.logp
            stats["divergent"][s] = info.divergent
            stats["tree_depth"][s] = info.tree_depth
            stats["n_steps"][s] = info.n_steps
            stats["accept_stat"][s] = info.accept_stat
            stats["energy"][s] = info.energy
            bar.update(1)
        phases["sampling"] = _since(start)
    per_chain = {k: v.transpose(0, 1).contiguous() for k, v in stats.items()}
    return NUTSResult(out_z.transpose(0, 1).contiguous(), step_size=step, inverse_mass=metric.inv_mass,
                      warmup_divergences=warm_div, kernel=kernel, max_tree_depth=max_tree_depth,
                      phase_seconds=phases, **per_chain)
