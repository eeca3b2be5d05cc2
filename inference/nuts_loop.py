"""One whole NUTS transition -- every leaf of every doubling, all chains -- as ONE compiled
program: ``transition`` writes the tree-building loops with
``torch._higher_order_ops.while_loop`` (a loop over doublings around a loop over the leaves
of a sub-tree, per-chain masks); ``CompiledTransition`` runs the same loops in C++
(``inference.nuts_native``) around the potential compiled by AOTInductor, so Python is
entered once per transition (as XLA runs NumPyro's iterative NUTS). (The loops compiled
by AOTInductor as ``while_loop`` cost 3-4x more per leaf: the generated code allocates
every carried tensor at every leaf.) ``inference.hmc`` uses it for a potential that offers
its recorded ATen graph and runs on Inductor (``PPL_NUTS_FUSED``).

The kernel is ``hmc.nuts_step``'s: the same trajectory from the same momentum and
directions, the same U-turn checks (Stan's, with the checks across merged sub-trees), the
same divergence rule, the same biased progressive choice at the top level with the same
uniforms, the same per-draw statistics. One part differs in *how*, not in law: the choice
of a state within a new sub-tree. ``nuts_step`` keeps every leaf of the sub-tree and
inverts the cumulative distribution of the leaves' weights at one uniform; a compiled loop
cannot keep a growing list (a fixed buffer of 2^(K-1) leaves would be copied at every
leaf), so here each new leaf n >= 1 of a sub-tree replaces the sub-tree's candidate with
probability w_n / (w_0 + ... + w_n) (progressive sampling, as NumPyro's iterative NUTS
does), with one fresh uniform per leaf. Both choose leaf i with probability
w_i / sum w, independently of everything else given the trajectory, so the transition
kernel is the same. The uniforms per leaf, ``u_leaf`` [L, C], are shared by the sub-trees of
one transition (only the last sub-tree taken at the top level supplies the new state, so
the choices of different sub-trees never meet); a sub-tree longer than the uniforms
supplied stops the program with a flag and the caller runs it again with more (same
momentum, directions and the first uniforms: the same transition).

Invariant: ``transition`` (run eagerly, as plain Python loops, or compiled) returns, for
every chain, what ``nuts_step`` returns except for the state chosen within a sub-tree,
which has the same distribution; tests/test_nuts_loop.py checks the statistics
draw-by-draw and the choice in law.
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import torch
from torch._higher_order_ops.while_loop import while_loop

from ..semantics.randomness import TorchRandomness
from .compiled import lift_constants, pack_constants, unpack_constants, vector_width

#: an energy error above this is a divergence (Stan's max_deltaH; hmc.MAX_DELTA_ENERGY)
MAX_DELTA_ENERGY = 1000.0


def _vecdot(a, b):
    return (a * b).sum(-1)


def _merged_no_uturn(a_far_v, a_near_v, a_near_p, rho_a, b_near_v, b_near_p, b_far_v, rho_b, whole):
    """``hmc._merged_no_uturn``: Stan's three U-turn checks of two merged trajectories
    (written as six separate inner products, which the compiler fuses without building
    the stacked operands)."""
    a_ext = rho_a + b_near_p
    b_ext = rho_b + a_near_p
    return ((_vecdot(a_far_v, whole) > 0) & (_vecdot(b_far_v, whole) > 0)
            & (_vecdot(a_far_v, a_ext) > 0) & (_vecdot(b_near_v, a_ext) > 0)
            & (_vecdot(a_near_v, b_ext) > 0) & (_vecdot(b_far_v, b_ext) > 0))


def python_loop(cond, body, carried):
    """``while_loop``'s meaning as a plain Python loop."""
    while bool(cond(*carried)):
        carried = body(*carried)
    return carried


def _at(x, i):
    """x[i] for a 0-d integer tensor i (an index the compiled loop reads in place)."""
    return x.index_select(0, i.reshape(1)).squeeze(0)


def transition(evaluate_at, z, logp, grad, p0, u, u_leaf, step, inv_mass, fresh, max_tree_depth: int,
               loop=while_loop):
    """One NUTS transition for C chains.

    ``evaluate_at(z) -> (logp [C], grad [C, D], parameters valid? [])``, with a non-finite
    logp as -inf and a non-finite gradient entry as 0 (``hmc.evaluate``). ``z``, ``grad``,
    ``p0`` (the momentum) [C, D]; ``logp`` [C]; ``u`` [3K, C]: per level the direction,
    the (unused here) sub-tree uniform and the top-level uniform, as ``nuts_step`` draws
    them; ``u_leaf`` [L, C]: the uniforms of leaves 1..L-1 of a sub-tree (row n for leaf
    n), of which the first ``fresh`` rows ([] int64) may be used; ``step`` [C];
    ``inv_mass`` [C, D] or [C, D, D].

    ``loop``: ``while_loop`` (recorded as one operation) or ``python_loop`` (plain Python,
    for any ``evaluate_at``).

    Returns (z, logp, grad, energy, accept_stat, divergent, n_steps, tree_depth, moved,
    flags [2] bool: every parameter valid, enough leaf uniforms)."""
    K = max_tree_depth
    C, D = z.shape
    dense = inv_mass.dim() == 3
    device, f64, i64 = z.device, z.dtype, torch.int64

    def velocity(p):
        return torch.matmul(inv_mass, p.unsqueeze(-1)).squeeze(-1) if dense else inv_mass * p

    chain = torch.arange(C, device=device)
    levels = torch.arange(K, device=device)
    blocks = torch.ones(K, dtype=i64, device=device) << levels  # 2^k leaves in a block of level k
    go_right = u[:K] < 0.5
    signed = torch.where(go_right, 1.0, -1.0).to(f64) * step  # [K, C]
    u_top = u[2 * K:]
    v0 = velocity(p0)
    H0 = 0.5 * _vecdot(p0, v0) - logp
    start = torch.stack((z, p0, grad, v0), 1)
    zero = torch.zeros(C, dtype=f64, device=device)
    no = torch.zeros(C, dtype=torch.bool, device=device)

    # What the loops carry, packed into few tensors (each carried tensor costs an allocation
    # and a copy per iteration in the compiled loop):
    #   doublings: ends [C, 2 (left, right), 4 (z, p, grad, v), D]; vectors [3, C, D]: the
    #   momentum sum rho, the proposal's z and grad; rows [6, C]: the trajectory's log
    #   weight, the proposal's logp and log weight H0 - H, the sum of the leaves' acceptance
    #   probabilities, the leapfrog steps, the tree depth; marks [3, C] bool: moved, still
    #   active, divergent; flags [2]: every parameter valid, enough leaf uniforms.
    doubling_state = (torch.zeros((), dtype=i64, device=device), torch.stack((start, start), 1),
                      torch.stack((p0, z, grad)), torch.stack((zero, logp, zero, zero, zero, zero)),
                      torch.stack((no, ~no, no)), torch.ones(2, dtype=torch.bool, device=device))

    def more_doublings(d, ends, vectors, rows, marks, flags):
        return (d < K) & marks[1].any() & flags.all()

    def doubling(d, ends, vectors, rows, marks, flags):
        rho, pz, pg = vectors.unbind(0)
        log_w, plp, pw, acc, steps, depth = rows.unbind(0)
        moved, active, div = marks.unbind(0)
        depth = depth + active.to(f64)
        right = _at(go_right, d)
        eps = _at(signed, d).unsqueeze(-1)
        half = 0.5 * eps
        near = ends[chain, right.to(i64)]
        z_near, p_near, g_near, v_near = near.unbind(1)
        n_leaves = _at(blocks, d)
        set_levels = levels <= d
        check_levels = (levels >= 1) & set_levels
        #   leaves: traj [7, C, D]: the current z, p, grad, v, the sub-tree's momentum sum,
        #   its candidate's z and grad; checks [K, 5, C, D]: per level k, the v and p of the
        #   first leaf of the current block of 2^k leaves, v and p before it, the momentum
        #   sum before it; rows [5, C]: the sub-tree's log weight, the candidate's logp and
        #   log weight, the acceptance sum, the steps; marks [2, C]: building, divergent.
        leaf_state = (torch.zeros((), dtype=i64, device=device),
                      torch.stack((z_near, p_near, g_near, v_near, torch.zeros_like(p_near), z_near, g_near)),
                      torch.zeros((K, 5, C, D), dtype=f64, device=device),
                      torch.stack((torch.full_like(zero, -math.inf), zero, zero, acc, steps)),
                      torch.stack((active, div)), flags.clone())

        def more_leaves(n, traj, checks, rows, marks, flags):
            return (n < n_leaves) & marks[0].any() & flags.all()

        def leaf(n, traj, checks, rows, marks, flags):
            zc, pc, gc, vc, rho_s, cz, cg = traj.unbind(0)
            lw_s, clp, cw, acc, steps = rows.unbind(0)
            building, div = marks.unbind(0)
            p = torch.addcmul(pc, half, gc)
            # a chain that has stopped building is evaluated where it stopped: its values are
            # not used, and a point further along a diverging trajectory could report an
            # invalid parameter, which hands the whole batch's transition to the eager kernel
            z1 = torch.where(building.unsqueeze(-1), torch.addcmul(zc, eps, velocity(p)), zc)
            logp1, g1, ok_par = evaluate_at(z1)
            p1 = torch.addcmul(p, half, g1)
            v1 = velocity(p1)
            w1 = torch.sub(logp1 + H0, _vecdot(p1, v1), alpha=0.5)  # H0 - H
            ok = w1 >= -MAX_DELTA_ENERGY  # not a divergence (a NaN is one)
            w1 = torch.nan_to_num(w1, nan=-math.inf)
            # Stan's statistics over the leaves made while the chain builds
            acc = acc + torch.where(building, w1.clamp(max=0.0).exp(), 0.0)
            steps = steps + building.to(f64)
            div = div | (building & (w1 < -MAX_DELTA_ENERGY))
            # the U-turn checks of the blocks of 2^k leaves that end here (``hmc._leaf_step``)
            set_at = set_levels & (n % blocks == 0)
            check_at = check_levels & ((n + 1) % blocks == 0)
            checks = torch.where(set_at[:, None, None, None], torch.stack((v1, p1, vc, pc, rho_s)), checks)
            rho_s = rho_s + p1
            vm, pm, vmp, pmp, rho_m = checks[:-1].unbind(1)
            vb, rho_b = checks[1:, 0], checks[1:, 4]
            v1s, rho_ss = v1.expand_as(vb), rho_s.expand_as(vb)
            passed = _merged_no_uturn(vb, vmp, pmp, rho_m - rho_b, vm, pm, v1s, rho_ss - rho_m, rho_ss - rho_b)
            ok = ok & (passed | ~check_at[1:, None]).all(0)
            # progressive choice within the sub-tree: leaf n replaces the candidate with
            # probability w_n / (w_0 + ... + w_n) (leaf 0 always)
            lw_new = torch.logaddexp(lw_s, w1)
            u_n = _at(u_leaf, n.clamp(max=u_leaf.shape[0] - 1))
            take = (n == 0) | (u_n < torch.exp(w1 - lw_new))
            tk = take.unsqueeze(-1)
            cz, cg = torch.where(tk, z1, cz), torch.where(tk, g1, cg)
            clp, cw = torch.where(take, logp1, clp), torch.where(take, w1, cw)
            building = building & ok
            keep = building.unsqueeze(-1)
            zc, pc = torch.where(keep, z1, zc), torch.where(keep, p1, pc)
            enough = flags[1] & ((n + 1 >= n_leaves) | (n + 1 < fresh) | ~building.any())
            return (n + 1, torch.stack((zc, pc, g1, v1, rho_s, cz, cg)), checks,
                    torch.stack((lw_new, clp, cw, acc, steps)), torch.stack((building, div)),
                    torch.stack((flags[0] & ok_par, enough)))

        n, traj, checks, leaf_rows, leaf_marks, flags = loop(more_leaves, leaf, leaf_state)
        zc, pc, gc, vc, rho_s, cz, cg = traj.unbind(0)
        lw_s, clp, cw, acc, steps = leaf_rows.unbind(0)
        building, div = leaf_marks.unbind(0)
        valid = building & (n >= n_leaves)
        v_first, p_first = _at(checks, d).unbind(0)[:2]
        last = torch.stack((zc, pc, gc, vc), 1)
        # the biased progressive choice at the top level and the merged U-turn checks (``hmc._merge``)
        take = valid & (_at(u_top, d) < torch.exp(lw_s - log_w))
        tk = take.unsqueeze(-1)
        pz, pg = torch.where(tk, cz, pz), torch.where(tk, cg, pg)
        plp, pw = torch.where(take, clp, plp), torch.where(take, cw, pw)
        moved = moved | take
        log_w = torch.where(valid, torch.logaddexp(log_w, lw_s), log_w)
        whole = rho + rho_s
        far_v = ends[chain, (~right).to(i64), 3]
        ok = _merged_no_uturn(far_v, v_near, p_near, rho, v_first, p_first, vc, rho_s, whole)
        rho = torch.where(valid.unsqueeze(-1), whole, rho)
        grows = torch.stack((~right, right), -1) & valid.unsqueeze(-1)
        ends = torch.where(grows[:, :, None, None], last.unsqueeze(1), ends)
        return (d + 1, ends, torch.stack((rho, pz, pg)), torch.stack((log_w, plp, pw, acc, steps, depth)),
                torch.stack((moved, valid & ok, div)), flags)

    d, ends, vectors, rows, marks, flags = loop(more_doublings, doubling, doubling_state)
    rho, pz, pg = vectors.unbind(0)
    log_w, plp, pw, acc, steps, depth = rows.unbind(0)
    moved, active, div = marks.unbind(0)
    accept_stat = acc / steps.clamp(min=1)
    return (pz, plp, pg, H0 - pw, accept_stat, div, steps.to(i64), depth.to(i64), moved, flags)


# -- the compiled program -------------------------------------------------------------

class CompiledTransition:
    """``transition``'s loops in C++ (``inference.nuts_native``) around the potential's
    recorded ATen graph compiled by AOTInductor: the potential's own library or package where
    it is compiled natively, else a library compiled for the transition. Built by
    ``build``, which checks it against ``transition`` run eagerly on the potential's own
    ``value_and_grad`` before it is used (once per library, operator and shapes on a machine:
    ``_checked_path`` marks a passed check). A call returns the transition's outputs, or None
    where the eager kernel must make this transition (an invalid parameter in some chain,
    a compiled kernel that raises)."""

    def __init__(self, run, C: int, max_tree_depth: int, device):
        self.run = run
        self.K = max_tree_depth
        self.L = 1 << (max_tree_depth - 1)  # the most leaves of one sub-tree
        # a transition's uniforms in one buffer: u as ``hmc.nuts_step`` draws them ([C, 3K], read
        # as [3K, C]), then the leaf uniforms [L, C] (``draw_uniforms``: one draw for both)
        n = C * 3 * max_tree_depth
        self._uniforms = torch.zeros(n + self.L * C, dtype=torch.float64, device=device)
        self._u = self._uniforms[:n].view(C, 3 * max_tree_depth).T
        self.u_leaf = self._uniforms[n:].view(self.L, C)
        self._drawn = 0                     # leaf rows ``draw_uniforms`` drew for the next call
        self._in_place = None               # the randomness ``draw_uniforms`` last found drawing in place
        self._draws: dict = {}              # fresh rows -> the buffer's view drawn for them
        self.recent_depths: list[int] = []  # the deepest tree of each recent transition
        self.redone = 0                     # transitions run again with more leaf uniforms
        self.library, self.packed = None, ()  # the potential's library and its constant inputs (``build``)

    @classmethod
    def build(cls, evaluate_graph, graph_args: tuple, evaluate_eager, z, logp, grad, inv_mass,
              max_tree_depth: int, potential_graph=None, native=None):
        """The transition for chains at (z, logp, grad) [C, D] and a metric of
        ``inv_mass``'s shape: ``transition``'s loops in C++ (``inference.nuts_native``)
        around the potential compiled by AOTInductor. ``native``: the potential's own
        compiled program (``inference.compiled.NativeLibrary``, called with ``(z,
        *graph_args, *native.constants)``; the C++ maps its non-finite values as
        ``hmc.evaluate`` does): nothing is recorded or compiled. Without it (a potential
        replayed by TorchScript or Inductor's Python wrapper): ``evaluate_graph(z,
        *graph_args) -> (logp, grad, valid)``, the potential's graph, is recorded with
        ``make_fx`` and compiled into a library of its own (``_own_library``; seconds of
        the C++ compiler on a cache miss). ``evaluate_eager(z) -> (logp, grad)``: the
        potential itself, for the check against ``transition`` run eagerly.
        ``potential_graph``: the potential's recorded graph, to mark a library compiled for
        it (``compiled_before``: the next build loads it without recording). Raises where
        it cannot be built or disagrees."""
        from . import nuts_native

        K = max_tree_depth
        if z.device.type != "cpu":
            raise ValueError("the compiled transition runs on the CPU only")
        mark = None
        if native is not None:
            nuts_native.load()  # (ms where built; the C++ compiler once per machine)
            library, packed = native.path, list(native.constants)
        else:
            library, packed, mark = _own_library(evaluate_graph, graph_args, z, inv_mass, K, potential_graph)

        def run(z, logp, grad, p0, u, u_leaf, step, inv_mass, fresh, *args):
            return nuts_native.transition_native(library, z, logp, grad, p0, u, u_leaf, step, inv_mass,
                                                 int(fresh), K, (*args, *packed))
        built = cls(run, z.shape[0], K, z.device)
        built.library, built.packed = library, tuple(packed)
        checked = _checked_path(library, z, inv_mass, graph_args, K)
        if not os.path.exists(checked):
            built._check(evaluate_eager, graph_args, z, logp, grad, inv_mass)
            _mark(checked, library, None)
        if mark is not None:
            mark()
        return built

    def _check(self, evaluate_eager, graph_args, z, logp, grad, inv_mass) -> None:
        """ValueError unless the compiled program and ``transition`` run eagerly on the
        potential's own evaluation agree on fresh random numbers."""
        def eager_at(x):
            lp, g = evaluate_eager(x)
            return lp, g, torch.ones((), dtype=torch.bool, device=x.device)

        compared = 0
        for seed in range(1, 9):  # two examples compared; one where some leaf's parameters are invalid
            # (the call returns None: the eager kernel) does not count, and every second seed
            # shrinks the steps 4x: a stiff model's random trajectories from an unadapted
            # state overflow to invalid parameters at the first steps tried
            example = _example(z, logp, grad, inv_mass, self.K, seed, step_scale=0.25 ** ((seed - 1) // 2))
            fast = self.run(*example, *graph_args)
            if not bool(fast[-1].all()):
                continue
            compared += 1
            slow = transition(eager_at, *example, self.K, loop=python_loop)
            for f, e in zip(fast[:-1], slow[:-1]):
                same = (torch.equal(f, e) if f.dtype in (torch.bool, torch.int64) else
                        f.shape == e.shape and torch.allclose(f, e, rtol=1e-9, atol=1e-12, equal_nan=True))
                if not same:
                    raise ValueError("the compiled transition disagrees with the eager one")
            if compared == 2:
                return
        raise ValueError("the compiled transition reports an invalid parameter at most check points")

    def fresh_rows(self) -> int:
        """How many leaf uniforms to draw: enough for one doubling more than the deepest
        tree of the recent transitions (a longer sub-tree makes the program stop and run
        again with all of them)."""
        deepest = max(self.recent_depths, default=self.K)
        return min(self.L, 1 << deepest)

    def draw_uniforms(self, randomness, C: int, device) -> torch.Tensor:
        """The uniforms u [3K, C] of ``hmc.nuts_step`` (the values of
        ``randomness.uniform((C, 3K), device).T``) followed, in the same stream, by the leaf
        uniforms the next call (``leaves_drawn=True``) would draw: ONE draw into this
        transition's buffer where ``randomness`` draws with ``torch.rand`` on a CPU generator
        (which draws one number per element, in order: a draw of n + m numbers is the draw of
        n followed by the draw of m), else two. The same numbers either way."""
        fresh = self.fresh_rows()
        self._drawn = fresh
        if randomness is not self._in_place:
            in_place = _rand_in_place(randomness, device) and self._uniforms.device == torch.device(device)
            self._in_place = randomness if in_place else None
        if randomness is self._in_place:
            draw = self._draws.get(fresh)
            if draw is None:
                draw = self._draws[fresh] = self._uniforms[:self._u.numel() + fresh * C]
            draw.uniform_(generator=randomness.gen(device))
            return self._u
        u = randomness.uniform((C, 3 * self.K), device).T
        self.u_leaf[:fresh] = randomness.uniform((fresh, C), device)
        return u

    def __call__(self, z, logp, grad, p0, u, step, inv_mass, graph_args: tuple, randomness, leaves_drawn=False):
        """(z, logp, grad, energy, accept_stat, divergent, n_steps, tree_depth, moved) of
        one transition from the momentum p0 [C, D] and the uniforms u [3K, C] (as
        ``hmc.nuts_step`` draws them; the leaf uniforms are drawn here, or were drawn with u
        by ``draw_uniforms`` where ``leaves_drawn``), or None: the eager kernel must make it."""
        C = z.shape[0]
        if leaves_drawn:
            fresh = self._drawn
        else:
            fresh = self.fresh_rows()
            self.u_leaf[:fresh] = randomness.uniform((fresh, C), z.device)
        inputs = [z, logp, grad, p0, u, self.u_leaf]  # (the operator makes them contiguous)
        rest = [step, inv_mass]
        out = self._run(inputs, rest, fresh, graph_args)
        if out is None:
            return None
        valid, enough = out[-1].tolist()
        if valid and not enough:  # a sub-tree longer than the uniforms drawn: the same
            # transition again (same momentum, directions, first uniforms) with all of them
            self.redone += 1
            self.u_leaf[fresh:] = randomness.uniform((self.L - fresh, C), z.device)
            out = self._run(inputs, rest, self.L, graph_args)
            if out is None:
                return None
            valid, enough = out[-1].tolist()
        if not (valid and enough):
            return None
        self.recent_depths.append(max(out[7].tolist()))  # (a list's max: no torch op)
        del self.recent_depths[:-50]
        return out[:-1]

    def can_run_many(self, randomness, inv_mass) -> bool:
        """Whether ``run_many`` draws exactly what ``hmc.nuts_step`` and ``__call__`` draw:
        a diagonal metric, a ``TorchRandomness`` drawing with ``torch.randn``/``torch.rand`` on
        a CPU generator, and a plain library (a package may call ATen code that raises,
        where the per-transition path hands that transition to the eager kernel)."""
        return (self.library is not None and not self.library.endswith(".pt2")
                and inv_mass.dim() == 2 and self._uniforms.device.type == "cpu"
                and _rand_in_place(randomness, self._uniforms.device)
                and type(randomness).normal is TorchRandomness.normal)

    def run_many(self, z, logp, grad, sqrt_mass, step, inv_mass, graph_args: tuple, randomness, n: int):
        """Up to ``n`` transitions in a row, all in C++ (``nuts_native.transitions_native``),
        with the same draws from ``randomness`` and the same outputs as ``n`` calls of
        ``hmc.nuts_step`` on this transition (``can_run_many`` must hold). Returns (done,
        (z, logp, grad) after them, their records (z [done, C, D], logp, energy,
        accept_stat, divergent, moved, n_steps, tree_depth [done, C]), None or the momentum
        and uniforms of transition ``done`` where it was not valid: the eager kernel must make
        it with them)."""
        from . import nuts_native

        out = nuts_native.transitions_native(self.library, z, logp, grad, sqrt_mass, step, inv_mass, self._uniforms,
                                             randomness.gen(z.device), n, self.K, self.recent_depths,
                                             (*graph_args, *self.packed))
        done, redone = out[0].tolist()
        self.redone += redone
        self.recent_depths = out[12].tolist()
        records = tuple(x[:done] for x in out[4:12])
        failed = (out[13], out[14]) if done < n else None
        return done, (out[1], out[2], out[3]), records, failed

    def warm_up(self, z, logp, grad, sqrt_mass, step, inv_mass, graph_args: tuple, randomness, adapt, first: int,
                n: int, divergences):
        """Up to ``n`` warm-up iterations from iteration ``first``, all in C++
        (``nuts_native.warmup_native``): each transition as ``run_many`` makes it, then the
        adaptation ``adapt.update`` makes (``adapt``: an ``adaptation.WindowedAdaptation`` with
        its Welford estimate on the host; its state is updated; a window's end is left to the
        caller), divergences added into ``divergences`` [C]. Returns (done, (z, logp, grad),
        the step size after them, None or the failed transition's momentum and uniforms: its
        transition and adaptation are the caller's)."""
        from . import nuts_native

        in_window = torch.tensor([adapt.in_window(i) for i in range(first, first + n)], dtype=torch.bool)
        out = nuts_native.warmup_native(self.library, z, logp, grad, sqrt_mass, step, inv_mass, self._uniforms,
                                        randomness.gen(z.device), n, self.K, self.recent_depths,
                                        (*graph_args, *self.packed), adapt.dual, adapt.welford, in_window, divergences)
        done, redone, adapt.dual.counter, adapt.welford.n = out[0].tolist()
        self.redone += redone
        self.recent_depths = out[5].tolist()
        return done, (out[1], out[2], out[3]), out[4], ((out[6], out[7]) if done < n else None)

    def _run(self, inputs, rest, fresh: int, graph_args):
        try:
            return self.run(*inputs, *rest, fresh, *graph_args)
        except (RuntimeError, AssertionError):  # a compiled kernel that raises (e.g. a Cholesky)
            return None


def _own_library(evaluate_graph, graph_args: tuple, z, inv_mass, K: int, potential_graph):
    """(the path of ``evaluate_graph`` compiled into a library of its own, its packed constants,
    a function writing the build's marker or None): for a potential that is not compiled
    natively. Loaded through the marker of an earlier build for ``potential_graph`` where
    there is one; else recorded and compiled (or loaded from the cache), while the C++ operator
    is built in a thread where it is not yet."""
    import threading

    from . import nuts_native

    native = threading.Thread(target=_quietly, args=(nuts_native.load,))  # (the C++ compiler, once
    native.start()                                    # per machine, while the potential compiles)
    marker = None if potential_graph is None else _marker_path(potential_graph, graph_args, inv_mass, K)
    library = constants = None
    try:
        if marker is not None:  # built before for this graph: load it without recording it again
            try:
                library, constants = _load_recorded(marker, potential_graph)
            except Exception:  # noqa: BLE001 - record and compile it as the first time
                library = None
        if library is None:
            library, constants = _compile_potential(evaluate_graph, z, graph_args)
    finally:
        native.join()
    nuts_native.load()  # (raises here where the thread's build failed)
    mark = None
    if marker is not None:
        def mark():
            _mark(marker, library, _constant_names(potential_graph, constants))
    return library, pack_constants(constants)[0], mark


def _rand_in_place(randomness, device) -> bool:
    """Whether ``randomness.uniform(shape, device)`` is ``torch.rand`` on ``randomness.gen(device)``
    (a ``TorchRandomness`` whose ``uniform`` is not overridden) with a CPU generator, so that
    ``tensor.uniform_(generator=randomness.gen(device))`` on a CPU tensor draws the same numbers."""
    return (isinstance(randomness, TorchRandomness) and type(randomness).uniform is TorchRandomness.uniform
            and torch.device(device).type == "cpu")


def _quietly(fn) -> None:
    """fn(), its exception dropped (a thread's: the caller calls fn again and sees it)."""
    try:
        fn()
    except Exception:  # noqa: BLE001
        pass


def _compile_potential(evaluate_graph, z, graph_args: tuple):
    """(the shared library of ``evaluate_graph(z, *graph_args, *constants)``, its constants):
    the potential recorded with ``make_fx`` (fake mode with a shape environment), its data
    lifted to inputs, compiled by AOTInductor (or loaded from the cache)."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    def program(z, *args):
        return evaluate_graph(z, *args)
    with tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True, shape_env=ShapeEnv()))):
        gm = make_fx(program)(z.contiguous(), *graph_args)
    constants = lift_constants(gm)
    packed, layout = pack_constants(constants)
    n_args = len(graph_args)

    def packed_program(z, *rest):  # the constants as views of one flat input per dtype
        return gm(z, *rest[:n_args], *unpack_constants(rest[n_args:], layout))
    with tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True, shape_env=ShapeEnv()))):
        flat = make_fx(packed_program)(z.contiguous(), *graph_args, *packed)
    return _load_or_compile(flat, (z.contiguous(), *graph_args, *packed)), constants


def _load_or_compile(gm: torch.fx.GraphModule, inputs: tuple) -> str:
    """The path of the graph compiled by AOTInductor into a shared library: from the cache
    (``_artifact_path``: a previous process compiled the same graph for inputs of the same
    shapes) or compiled now (seconds of Python, then the C++ compiler) and stored there."""
    import warnings

    import torch._inductor
    path = _artifact_path(gm, inputs)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.so"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = torch._inductor.aot_compile(gm, tuple(inputs), options={"aot_inductor.output_path": partial,
                                                                             **vector_width()})
        os.replace(built, path)  # (atomic: another process sees the whole library or none)
    return path


def compiled_before(potential_graph: torch.fx.GraphModule, graph_args: tuple, inv_mass, max_tree_depth: int) -> bool:
    """Whether a previous build compiled the transition around this potential graph (its
    code and its constants' shapes: the data's values do not matter) for these shapes:
    ``build`` then loads the library from the cache instead of compiling it (and the C++
    loops of ``inference.nuts_native`` are built on this machine)."""
    from . import nuts_native
    return os.path.exists(_marker_path(potential_graph, graph_args, inv_mass, max_tree_depth)) and nuts_native.built()


def _marker_path(potential_graph, graph_args, inv_mass, max_tree_depth: int) -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    digest = hashlib.sha256()
    digest.update(f"{torch.__version__}|{max_tree_depth}|{tuple(inv_mass.shape)}|".encode())
    with open(__file__, "rb") as source:
        digest.update(source.read())
    from . import nuts_native
    digest.update(nuts_native.SOURCE.encode())  # (a change of the loops or the graph: another marker)
    digest.update(potential_graph.code.encode())
    for node in potential_graph.graph.nodes:  # the shapes of the constants it reads
        if node.op == "get_attr":
            value = _attribute(potential_graph, node.target)
            if isinstance(value, torch.Tensor):
                digest.update(f"{node.target}{tuple(value.shape)}{value.dtype}|".encode())
    for x in graph_args:
        digest.update(f"{tuple(x.shape)}{x.dtype}|".encode())
    return os.path.join(cache_dir(), "ppl_nuts_loop", "built", digest.hexdigest())


def _checked_path(library: str, z, inv_mass, graph_args, max_tree_depth: int) -> str:
    """The marker of a passed ``CompiledTransition._check`` of the C++ loops around this
    library for these shapes: the check (2 transitions run eagerly, 9-30 ms) is made by the
    first process only. Keyed by the library (its path names its graph and shapes), the loops'
    operator (source, compiler flags, torch), the CPU's vector ISA, the package's source (the
    eager transition and potential it is checked against) and the shapes."""
    from . import graph_store, nuts_native
    digest = hashlib.sha256()
    digest.update(f"{library}|{nuts_native._name()}|{torch.backends.cpu.get_cpu_capability()}|".encode())
    digest.update(f"{graph_store.source_fingerprint()}|{max_tree_depth}|{tuple(z.shape)}|".encode())
    digest.update(f"{tuple(inv_mass.shape)}|{[(tuple(a.shape), a.dtype) for a in graph_args]}".encode())
    return os.path.join(os.path.dirname(library), "checked", digest.hexdigest())


def _mark(path: str, library: str, constants: list | None) -> None:
    """Write the marker of a build: the library and, where every constant of the recorded
    transition is a constant of the potential's graph, their names there (in input order),
    so that the next build for this graph loads the library without recording it."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}"
        with open(partial, "w") as out:
            json.dump({"library": library, "constants": constants}, out)
        os.replace(partial, path)
    except OSError:  # no marker only means the gate waits for a longer run next time
        pass


def _constant_names(potential_graph, constants: list) -> list | None:
    """The names in the potential's graph of the recorded transition's constants (the same
    tensors), or None where one is not the potential's."""
    by_id = {}
    for node in potential_graph.graph.nodes:
        if node.op == "get_attr":
            by_id.setdefault(id(_attribute(potential_graph, node.target)), node.target)
    names = [by_id.get(id(c)) for c in constants]
    return None if None in names else names


def _load_recorded(marker: str, potential_graph):
    """(the library's path, its constant inputs taken from the potential's graph) from a
    marker; raises where the marker does not name them (the caller records it again; a
    wrong library would also fail the check that follows)."""
    with open(marker) as f:
        entry = json.load(f)
    if entry.get("constants") is None or not os.path.exists(entry["library"]):
        raise LookupError("no library to load")
    constants = [_attribute(potential_graph, name) for name in entry["constants"]]
    return entry["library"], constants


def _attribute(module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _artifact_path(gm: torch.fx.GraphModule, inputs: tuple) -> str:
    """Where the compiled program for this graph (its code and its sub-graphs' code) and
    these input shapes lives: under Inductor's cache directory, keyed also by the torch
    version and this module's source."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    digest = hashlib.sha256()
    digest.update(f"{torch.__version__}|".encode())
    with open(__file__, "rb") as source:
        digest.update(source.read())
    digest.update(gm.print_readable(print_output=False).encode())
    for x in inputs:
        digest.update(f"{tuple(x.shape)}{x.dtype}{x.device}|".encode())
    return os.path.join(cache_dir(), "ppl_nuts_loop", digest.hexdigest() + ".so")


def _example(z, logp, grad, inv_mass, max_tree_depth: int, seed: int, step_scale: float = 1.0) -> tuple:
    """Inputs of ``transition`` (after ``evaluate_at``, before the depth) at the chains'
    state, with random momenta, directions, step sizes (in ``step_scale`` x [0.05, 0.25))
    and leaf uniforms."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    C, D = z.shape
    K = max_tree_depth
    L = 1 << (K - 1)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64).to(z.device)

    p0 = torch.randn(C, D, generator=g, dtype=torch.float64).to(z.device)
    step = step_scale * (0.05 + 0.2 * rand(C))
    return tuple(t.contiguous() for t in (z, logp, grad, p0, rand(3 * K, C), rand(L, C), step, inv_mass)) + (
        torch.tensor(L, dtype=torch.int64),)
