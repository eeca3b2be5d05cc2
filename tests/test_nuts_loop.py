"""NUTS's whole transition as one compiled program (inference/nuts_loop.py): the same kernel
as ``hmc.nuts_step`` -- the same trajectory, U-turn checks, divergences and statistics from
the same momentum and uniforms, draw by draw -- with the state within a sub-tree chosen
progressively (same law: checked against nuts_step's exact multinomial choice), compiled by
AOTInductor, handing a transition with an invalid parameter back to the eager kernel, and
built by ``sample_nuts`` only where it pays (long runs, whatever the cache holds)."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ppl.inference import hmc, nuts_loop
from ppl.inference.hmc import Metric, init_state, nuts_step
from ppl.inference.randomness import TorchRandomness

F64 = torch.float64


def _precision(D: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, dtype=F64, generator=g) / math.sqrt(D)
    return A @ A.T + 0.2 * torch.eye(D, dtype=F64)


class Gaussian:
    """N(0, P^-1) offering a recorded graph (z, beta) -> (log pi, gradient, parameters
    valid?) as ``inference.potential.Potential`` does; the graph reports its parameters
    invalid where beta >= 2 (so a test can make it hand a transition back)."""

    def __init__(self, precision: torch.Tensor, C: int):
        self.P = precision
        self.beta = 1.0
        D = precision.shape[0]

        def graph(z, beta):
            return self._graph(z, beta)
        self.gm = make_fx(graph)(torch.zeros(C, D, dtype=F64), torch.tensor(1.0, dtype=F64))

    def value_and_grad(self, z):
        grad = -z @ self.P
        return 0.5 * (z * grad).sum(-1), grad

    def _graph(self, z, beta):
        logp, grad = self.value_and_grad(z)
        return logp, grad, beta < 2.0

    def recorded_graph(self):
        return self.gm, "jit"

    def graph_inputs(self, beta=1.0):
        return (torch.tensor(self.beta, dtype=F64),)


class Replay:
    """Randomness handing out given momenta and uniforms (as nuts_step draws them)."""

    def __init__(self, p0, u):
        self.p0, self.u = p0, u

    def normal(self, shape, device):
        return self.p0

    def uniform(self, shape, device):
        return self.u


def _eager(potential):
    def at(z):
        logp, grad = hmc.evaluate(potential, z)
        return logp, grad, torch.ones((), dtype=torch.bool)
    return at


@pytest.mark.parametrize("dense, scale", [(False, 1.0), (True, 1.0), (False, 12.0)])
def test_statistics_match_nuts_step_draw_by_draw(dense, scale):
    """From the same momentum and uniforms, the loop (run eagerly) makes nuts_step's tree:
    the same depth, leapfrog steps, divergences and acceptance statistic, on 12 transitions
    of 4 chains (a large step size: divergences)."""
    C, D, K = 4, 6, 6
    target = Gaussian(_precision(D), C)
    g = torch.Generator().manual_seed(1)
    inv = torch.rand(C, D, dtype=F64, generator=g) + 0.5
    metric = Metric(torch.diag_embed(inv) if dense else inv)
    state = init_state(target, torch.randn(C, D, dtype=F64, generator=g))
    step = scale * torch.tensor([0.3, 0.15, 0.5, 0.05], dtype=F64)
    L = 1 << (K - 1)
    divergent = 0
    for _ in range(12):
        eps = torch.randn(C, D, dtype=F64, generator=g)
        u = torch.rand(C, 3 * K, dtype=F64, generator=g)
        new, info = nuts_step(target, state, step, metric, Replay(eps, u), max_tree_depth=K, fuse=False)
        p0 = metric.sample_momentum(Replay(eps, u))
        out = nuts_loop.transition(_eager(target), state.z, state.logp, state.grad, p0, u.T.contiguous(),
                                   torch.rand(L, C, dtype=F64, generator=g), step, metric.inv_mass,
                                   torch.tensor(L), K, loop=nuts_loop.python_loop)
        z, logp, grad, energy, accept, div, n_steps, depth, moved, flags = out
        assert bool(flags.all())
        assert torch.equal(depth, info.tree_depth) and torch.equal(n_steps, info.n_steps)
        assert torch.equal(div, info.divergent)
        assert torch.allclose(accept, info.accept_stat, rtol=1e-12, atol=1e-15)
        divergent += int(div.sum())
        state = new
    assert (divergent > 0) == (scale > 1)


def test_state_chosen_within_a_sub_tree_has_nuts_steps_law():
    """One trajectory (the same momentum and directions in every column of a batch of 4000
    copies of one chain): nuts_step's choice, swept over a grid of its sub-tree uniforms,
    gives each state's exact probability (to 1/4000); the loop's progressive choice with
    fresh uniforms per column must match it within 4.5 binomial standard errors."""
    N, D, K = 4000, 3, 5
    target = Gaussian(_precision(D, seed=3), N)
    g = torch.Generator().manual_seed(5)
    z0 = torch.randn(1, D, dtype=F64, generator=g).expand(N, D).contiguous()
    state = init_state(target, z0)
    metric = Metric(torch.ones(N, D, dtype=F64))
    step = torch.full((N,), 0.35, dtype=F64)
    p0 = torch.randn(1, D, dtype=F64, generator=g).expand(N, D).contiguous()
    u = torch.rand(1, 3 * K, dtype=F64, generator=g).expand(N, 3 * K).clone()
    u[:, :K] = torch.tensor([0.7, 0.2, 0.9, 0.6, 0.1], dtype=F64)  # the directions
    u[:, 2 * K:] = 0.5                                            # the top-level uniforms
    u[:, K:2 * K] = ((torch.arange(N, dtype=F64) + 0.5) / N).unsqueeze(1)  # a grid: exact law
    exact, info = nuts_step(target, state, step, metric, Replay(p0, u), max_tree_depth=K, fuse=False)
    assert int(info.tree_depth[0]) >= 3  # (sub-trees of several leaves)
    L = 1 << (K - 1)
    out = nuts_loop.transition(_eager(target), state.z, state.logp, state.grad, p0, u.T.contiguous(),
                               torch.rand(L, N, dtype=F64, generator=g), step, metric.inv_mass,
                               torch.tensor(L), K, loop=nuts_loop.python_loop)
    chosen = out[0]
    states = torch.unique(torch.cat((exact.z, chosen)), dim=0)
    assert len(states) >= 3
    for s in states:
        p = float((exact.z == s).all(1).to(F64).mean())
        freq = float((chosen == s).all(1).to(F64).mean())
        assert abs(freq - p) <= 4.5 * math.sqrt(max(p * (1 - p), 1 / N) / N) + 1 / N, (freq, p)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A Gaussian target with its transition compiled (one build for the module: the C++
    library is cached across processes by its graph)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PPL_NUTS_LOOP", "1")  # (the target offers a TorchScript-replayed graph)
    C, D, K = 4, 5, 6
    target = Gaussian(_precision(D, seed=7), C)
    metric = Metric(torch.ones(C, D, dtype=F64))
    state = init_state(target, torch.randn(C, D, dtype=F64, generator=torch.Generator().manual_seed(2)))
    built = hmc._compiled_transition(target, metric, K, state)
    yield target, built, K
    mp.undo()


def test_compiled_transition_is_built_and_checked(compiled):
    target, built, K = compiled
    assert isinstance(built, nuts_loop.CompiledTransition), hmc._FusedLeaf.why_not.get("loop")


def test_compiled_nuts_gives_the_gaussians_moments(compiled, monkeypatch):
    """sample_nuts on the compiled transition: every mean and variance of the correlated
    5-d Gaussian within 4.5 Monte Carlo standard errors (from the chains' ESS)."""
    from ppl.inference.diagnostics import mcmc_ess
    target, built, K = compiled
    monkeypatch.setenv("PPL_NUTS_LOOP", "1")
    monkeypatch.setattr(hmc, "LOOP_BUILD_FIXED", 0.0)  # (a build that costs nothing always pays)
    monkeypatch.setattr(hmc, "LOOP_BUILD_PER_OP", 0.0)
    calls = []
    monkeypatch.setattr(nuts_loop.CompiledTransition, "_run",
                        lambda self, *a, _run=nuts_loop.CompiledTransition._run: calls.append(1) or _run(self, *a))

    def many(self, *a, _many=nuts_loop.CompiledTransition.run_many):  # (the sampling phase's runs)
        out = _many(self, *a)
        calls.extend([1] * out[0])
        return out
    monkeypatch.setattr(nuts_loop.CompiledTransition, "run_many", many)

    def warm(self, *a, _warm=nuts_loop.CompiledTransition.warm_up):  # (the warm-up's runs)
        out = _warm(self, *a)
        calls.extend([1] * out[0])
        return out
    monkeypatch.setattr(nuts_loop.CompiledTransition, "warm_up", warm)
    rand = TorchRandomness(torch.Generator().manual_seed(11))
    z0 = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    res = hmc.sample_nuts(target, z0, samples=1500, warmup=300, randomness=rand, max_tree_depth=K, progress=False)
    assert len(calls) >= 1800  # every transition compiled
    assert res.transition == "compiled" and res.why_not_compiled is None
    cov = torch.linalg.inv(target.P)
    draws = res.z  # [C, S, D]
    for j in range(5):
        x = draws[..., j]
        for f, truth in ((x, 0.0), (x.square(), float(cov[j, j]))):
            ess = float(mcmc_ess(f))
            se = float(f.std()) / math.sqrt(ess)
            assert abs(float(f.mean()) - truth) < 4.5 * se, (j, float(f.mean()), truth, se)


class Table:
    """Randomness handing out one fixed table of uniforms in order (the same values however
    a caller splits its requests)."""

    def __init__(self, values):
        self.values, self.at = values, 0

    def uniform(self, shape, device):
        n = math.prod(shape)
        out = self.values[self.at:self.at + n].reshape(shape)
        self.at += n
        return out


def test_too_few_leaf_uniforms_runs_the_same_transition_again(compiled):
    """A sub-tree longer than the uniforms drawn: the program stops and runs again with all
    of them -- the same transition as with all of them drawn at once."""
    target, built, K = compiled
    C, D = 4, 5
    g = torch.Generator().manual_seed(4)
    state = init_state(target, torch.randn(C, D, dtype=F64, generator=g))
    p0 = torch.randn(C, D, dtype=F64, generator=g)
    u = torch.rand(3 * K, C, dtype=F64, generator=g)
    step = torch.full((C,), 0.05, dtype=F64)  # small steps: deep trees
    table = torch.rand(built.L * C, dtype=F64, generator=g)
    args = (state.z, state.logp, state.grad, p0, u, step, torch.ones(C, D, dtype=F64), target.graph_inputs())
    built.recent_depths[:] = [1]  # two rows drawn first
    redone = built.redone
    short = built(*args, Table(table))
    assert built.redone == redone + 1
    built.recent_depths[:] = [K]  # all rows at once
    whole = built(*args, Table(table))
    assert built.redone == redone + 1
    for a, b in zip(short, whole):
        assert torch.equal(a, b)


def test_invalid_parameter_hands_the_transition_to_the_eager_kernel(compiled, monkeypatch):
    """The graph reports an invalid parameter: the compiled program returns None and
    nuts_step makes the transition eagerly, from the same momentum and uniforms."""
    target, built, K = compiled
    monkeypatch.setenv("PPL_NUTS_LOOP", "1")
    C, D = 4, 5
    state = init_state(target, torch.randn(C, D, dtype=F64, generator=torch.Generator().manual_seed(8)))
    metric = Metric(torch.ones(C, D, dtype=F64))
    step = torch.full((C,), 0.3, dtype=F64)
    target.beta = 3.0  # the graph now says "invalid"
    try:
        rand = TorchRandomness(torch.Generator().manual_seed(9))
        assert built(state.z, state.logp, state.grad, torch.zeros(C, D, dtype=F64),
                     torch.rand(3 * K, C, dtype=F64), step, metric.inv_mass, target.graph_inputs(), rand) is None
        loop_state, loop_info = nuts_step(target, state, step, metric, TorchRandomness(
            torch.Generator().manual_seed(9)), max_tree_depth=K)
    finally:
        target.beta = 1.0
    plain = type("Plain", (), {"value_and_grad": staticmethod(target.value_and_grad)})()
    eager_state, eager_info = nuts_step(plain, state, step, metric, TorchRandomness(
        torch.Generator().manual_seed(9)), max_tree_depth=K)
    assert torch.equal(loop_state.z, eager_state.z) and torch.equal(loop_info.n_steps, eager_info.n_steps)


def test_gate_builds_only_where_it_pays(monkeypatch):
    """The compiled transition is built iff the transitions left x the estimated saving per
    transition exceed the estimated build cost: a function of the graph's operations and the
    chains alone -- whatever the compile cache holds (a library compiled before does not
    lower the gate: the kernel, hence a seeded run's draws, would depend on it)."""
    ops, C = 164, 4  # (eight schools' graph)
    even = hmc.loop_build_cost(ops) / hmc.loop_saving(ops, C)  # transitions to break even
    assert 1000 < even < 20000  # (the measured constants: thousands of transitions)
    for before in (False, True):
        monkeypatch.setattr(nuts_loop, "compiled_before", lambda *a, before=before: before)
        assert hmc._fuse_now(math.ceil(even) + 1, ops, C) is True
        assert hmc._fuse_now(math.floor(even) - 1, ops, C) is False
        assert hmc._fuse_now(10 ** 6, 0, C) is False  # (no graph offered: nothing to build)
    # more chains save more per transition (longer batched trees): built from fewer transitions
    assert hmc.loop_saving(ops, 16) > hmc.loop_saving(ops, 4) > hmc.loop_saving(ops, 1) > 0
    assert hmc.loop_build_cost(2 * ops) > hmc.loop_build_cost(ops)
    # in sample_nuts: built at the first transition iff the run's length pays, never later
    D = 3
    target = Gaussian(_precision(D), C)
    target.recorded_graph = lambda: (target.gm, "inductor")
    monkeypatch.setattr(nuts_loop, "compiled_before", lambda *a: True)
    builds, asked = [], []
    monkeypatch.setattr(hmc, "_build_transition", lambda *a: builds.append(1))  # (None: the eager kernel)
    monkeypatch.setattr(hmc, "_fused_leaf", lambda *a: None)  # (nor a fused leaf: no compile here)
    rule = hmc._fuse_now
    monkeypatch.setattr(hmc, "_fuse_now",
                        lambda left, ops, chains: asked.append((ops, chains)) or rule(left, ops, chains))
    graph_ops = len(target.gm.graph.nodes)
    cost = hmc.loop_build_cost(graph_ops)
    # the break-even run length set to 5 transitions by the saving
    monkeypatch.setattr(hmc, "LOOP_SAVED_FIXED", cost / 4.5 / (1 + hmc.LOOP_SAVED_PER_DOUBLING_OF_CHAINS * 2))
    monkeypatch.setattr(hmc, "LOOP_SAVED_PER_OP", 0.0)
    z0 = torch.randn(C, D, dtype=F64, generator=torch.Generator().manual_seed(2))
    for samples, built in ((4, 0), (5, 1)):
        hmc.sample_nuts(target, z0, samples=samples, warmup=0, step_size=0.5, progress=False,
                        randomness=TorchRandomness(torch.Generator().manual_seed(1)))
        assert len(builds) == built
    assert set(asked) == {(graph_ops, C)}


def test_second_build_loads_the_library_without_recording(compiled, monkeypatch):
    """A build for a graph built before (a new process, here a cleared cache) loads the
    library named by its marker, with the potential's constants, without recording the
    transition again (its check against the eager loop passed before: not made again)."""
    import torch.fx.experimental.proxy_tensor as proxy_tensor
    target, built, K = compiled
    monkeypatch.setenv("PPL_NUTS_LOOP", "1")

    def no_recording(*a, **k):
        raise AssertionError("recorded again")
    monkeypatch.setattr(proxy_tensor, "make_fx", no_recording)
    hmc._LOOP_CACHE.pop(target, None)
    C, D = 4, 5
    metric = Metric(torch.ones(C, D, dtype=F64))
    state = init_state(target, torch.randn(C, D, dtype=F64, generator=torch.Generator().manual_seed(3)))
    again = hmc._compiled_transition(target, metric, K, state)
    assert isinstance(again, nuts_loop.CompiledTransition) and again is not built


def test_marker_changes_with_the_native_loops_and_the_graph(monkeypatch):
    """The cache marker a build is found by names the potential graph AND the C++ loops'
    source (``nuts_native.SOURCE``): changing either gives another marker, so that no
    process loads a library built for other code."""
    from ppl.inference import nuts_native
    C, D, K = 4, 3, 6
    target = Gaussian(_precision(D), C)
    inv = torch.ones(C, D, dtype=F64)
    key = nuts_loop._marker_path(target.gm, target.graph_inputs(), inv, K)
    assert nuts_loop._marker_path(target.gm, target.graph_inputs(), inv, K) == key
    monkeypatch.setattr(nuts_native, "SOURCE", nuts_native.SOURCE + "\n// changed")
    assert nuts_loop._marker_path(target.gm, target.graph_inputs(), inv, K) != key
    monkeypatch.undo()
    other = Gaussian(_precision(D, seed=1), C)
    other.gm = make_fx(lambda z, beta: (other._graph(z, beta)[0] * 2.0, *other._graph(z, beta)[1:]))(
        torch.zeros(C, D, dtype=F64), torch.tensor(1.0, dtype=F64))
    assert nuts_loop._marker_path(other.gm, other.graph_inputs(), inv, K) != key
    assert nuts_loop._marker_path(target.gm, target.graph_inputs(), torch.ones(C, D, D, dtype=F64), K) != key


def test_native_transition_matches_the_eager_loop(compiled):
    """The C++ loops (``nuts_native``) around the compiled potential give ``transition``'s
    outputs run eagerly from the same inputs, on fresh random numbers, with a diagonal and
    a dense metric, including deep trees (small steps) and divergent ones (large steps)."""
    target, built, K = compiled
    C, D = 4, 5
    g = torch.Generator().manual_seed(21)
    state = init_state(target, torch.randn(C, D, dtype=F64, generator=g))
    L = 1 << (K - 1)
    depths, divergent = [], []
    for step in (torch.full((C,), 0.02, dtype=F64), torch.tensor([0.3, 0.9, 3.0, 12.0], dtype=F64)):
        p0 = torch.randn(C, D, dtype=F64, generator=g)
        u = torch.rand(3 * K, C, dtype=F64, generator=g)
        u_leaf = torch.rand(L, C, dtype=F64, generator=g)
        diagonal = torch.rand(C, D, dtype=F64, generator=g) + 0.5
        A = torch.randn(C, D, D, dtype=F64, generator=g) / D
        for inv in (diagonal, torch.diag_embed(diagonal) + A @ A.transpose(1, 2)):  # (a dense metric too)
            args = (state.z, state.logp, state.grad, p0, u, u_leaf, step, inv, torch.tensor(L))
            fast = built.run(*args, *target.graph_inputs())
            slow = nuts_loop.transition(_eager(target), *args, K, loop=nuts_loop.python_loop)
            depths.append(int(fast[7].max())), divergent.append(bool(fast[5].any()))
            for f, e in zip(fast, slow):
                assert f.dtype == e.dtype and f.shape == e.shape
                assert (torch.equal(f, e) if f.dtype in (torch.bool, torch.int64)
                        else torch.allclose(f, e, rtol=1e-9, atol=1e-12))
    assert min(depths[:2]) >= 4 and divergent == [False, False, True, True]


class _NativeTarget:
    """The C-chain, 2-d potential of ``log_density`` as a graph ``(z, beta) -> (log density,
    gradient, parameters valid?)`` compiled by ``compiled.build_native``, offered as
    ``inference.potential.Potential`` offers it (``native_library``). Its raw outputs are not
    finite where 0.5 < z[:, 0] < 3 (log density NaN, gradient +inf: the C++ must map them as
    ``hmc.evaluate`` does); its parameters are invalid beyond |z| = 1e6 (where only a chain
    that stopped building would go)."""

    def __init__(self, log_density, C: int):
        from ppl.inference import compiled

        def graph(z, beta):
            grad = torch.func.grad(lambda w: log_density(w).sum())(z)
            bad = (z[:, 0] > 0.5) & (z[:, 0] < 3.0)
            logp = torch.where(bad, torch.nan, beta * log_density(z))
            return logp, torch.where(bad.unsqueeze(-1), torch.inf, beta * grad), (z.abs() < 1e6).all()
        example = (0.1 * torch.randn(C, 2, dtype=F64, generator=torch.Generator().manual_seed(0)),
                   torch.tensor(1.0, dtype=F64))
        self.gm = compiled.record(graph, example)
        self.run = compiled.build_native(self.gm, example)
        self.native = compiled.native_library(self.run)

    def value_and_grad(self, z):
        logp, grad, _ = self.run(z, *self.graph_inputs())
        return logp, grad

    def recorded_graph(self):
        return self.gm, "inductor"

    def native_library(self):
        return self.native

    def graph_inputs(self, beta=1.0):
        return (torch.tensor(beta, dtype=F64),)


class NativeGP(_NativeTarget):
    """A 2-d potential whose graph (a 3 x 3 covariance from z, its Cholesky factor, a
    triangular solve) is compiled by ``compiled.build_native`` into an AOTInductor PACKAGE (a
    Cholesky has no C shim), offered as ``inference.potential.Potential`` offers it
    (``native_library``)."""

    def __init__(self, C: int):
        x = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
        kernel = torch.exp(-(x[:, None] - x[None, :]).square())
        y = torch.tensor([0.3, -0.5, 1.1], dtype=F64)

        def log_density(z):
            cov = z[:, 0].exp()[:, None, None] * kernel + (0.1 + z[:, 1].exp())[:, None, None] * torch.eye(3, dtype=F64)
            chol = torch.linalg.cholesky(cov)
            a = torch.linalg.solve_triangular(chol, y.expand(z.shape[0], 3).unsqueeze(-1), upper=False).squeeze(-1)
            return -0.5 * a.square().sum(-1) - chol.diagonal(dim1=-2, dim2=-1).log().sum(-1) - 0.5 * z.square().sum(-1)
        super().__init__(log_density, C)
        self.non_finite = 0  # evaluations with a non-finite output (the eager side)

    def value_and_grad(self, z):
        logp, grad = super().value_and_grad(z)
        self.non_finite += int((~torch.isfinite(logp)).any())
        return logp, grad


@pytest.mark.skipif(os.environ.get("PPL_COMPILED_NATIVE") == "0", reason="PPL_COMPILED_NATIVE=0")
def test_the_transition_runs_the_potentials_own_package_and_maps_its_non_finite_values():
    """Around a potential compiled natively (here an AOTInductor package: the GP's Cholesky)
    the compiled transition calls the potential's own program -- nothing recorded or compiled
    again -- maps non-finite log densities to -inf and gradients to 0 in C++ (as
    ``hmc.evaluate``), and gives ``transition``'s outputs run eagerly on the potential; a chain
    that stopped building (a divergence) is evaluated where it stopped, so its further
    trajectory -- an overflowing covariance whose Cholesky raises, or |z| > 1e6: invalid
    parameters -- does not hand the batch back (it did in 3 of these 6 transitions)."""
    import torch.fx.experimental.proxy_tensor as proxy_tensor
    C, D, K = 4, 2, 6
    target = NativeGP(C)
    assert target.native is not None and target.native.package  # (a .pt2)
    g = torch.Generator().manual_seed(5)
    metric = Metric(torch.ones(C, D, dtype=F64))
    state = init_state(target, 0.3 * torch.randn(C, D, dtype=F64, generator=g))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(proxy_tensor, "make_fx", lambda *a, **k: pytest.fail("recorded again"))
        built = hmc._compiled_transition(target, metric, K, state)
    assert isinstance(built, nuts_loop.CompiledTransition), hmc._FusedLeaf.why_not.get("loop")
    L = 1 << (K - 1)
    divergent = []
    for step in (torch.full((C,), 0.1, dtype=F64), torch.tensor([0.1, 0.3, 4.0, 9.0], dtype=F64)):
        for _ in range(3):
            p0 = 2.0 * torch.randn(C, D, dtype=F64, generator=g)
            args = (state.z, state.logp, state.grad, p0, torch.rand(3 * K, C, dtype=F64, generator=g),
                    torch.rand(L, C, dtype=F64, generator=g), step, metric.inv_mass, torch.tensor(L))
            fast = built.run(*args, *target.graph_inputs())
            slow = nuts_loop.transition(_eager(target), *args, K, loop=nuts_loop.python_loop)
            assert fast[-1].all()  # (every parameter valid, enough uniforms)
            divergent.append(bool(fast[5].any()))
            for f, e in zip(fast, slow):
                assert f.dtype == e.dtype and f.shape == e.shape
                assert (torch.equal(f, e) if f.dtype in (torch.bool, torch.int64)
                        else torch.allclose(f, e, rtol=1e-9, atol=1e-12))
    assert target.non_finite > 0 and any(divergent)  # (the mapping and the stopped chains were exercised)


class NativeBanana(_NativeTarget):
    """A 2-d potential compiled by ``compiled.build_native`` into a plain library (every
    operation generated code: its buffers on the stack, with the minimal ArrayRef entry point),
    offered as ``inference.potential.Potential`` offers it."""

    def __init__(self, C: int):
        from ppl.inference import compiled

        def log_density(z):
            return -0.5 * z[:, 0].square() - 0.5 * (z[:, 1] - 0.5 * z[:, 0].square()).square() / 0.3
        super().__init__(log_density, C)
        assert compiled._buffer_options(self.gm)["aot_inductor.use_minimal_arrayref_interface"]


@pytest.mark.skipif(os.environ.get("PPL_COMPILED_NATIVE") == "0", reason="PPL_COMPILED_NATIVE=0")
def test_the_transition_calls_a_library_through_its_arrayref_entry_point_with_the_same_numbers():
    """A library whose buffers are on the stack is called by the C++ loops through its
    minimal ArrayRef entry point (plain array descriptors in, the library's own per-thread
    arrays out: no tensor made per call); the transitions are those the container's ``run``
    gives (``PPL_NATIVE_ARRAYREF=0``), bit for bit, and those of ``transition`` run eagerly."""
    import ctypes

    from ppl.inference import nuts_native
    C, D, K = 4, 2, 6
    target = NativeBanana(C)
    assert not target.native.package
    assert hasattr(ctypes.CDLL(target.native.path), "AOTInductorModelRunMinimalArrayrefInterfaceV2")
    g = torch.Generator().manual_seed(3)
    metric = Metric(torch.ones(C, D, dtype=F64))
    state = init_state(target, 0.3 * torch.randn(C, D, dtype=F64, generator=g))
    built = hmc._compiled_transition(target, metric, K, state)
    assert isinstance(built, nuts_loop.CompiledTransition), hmc._FusedLeaf.why_not.get("loop")
    L = 1 << (K - 1)
    before = nuts_native.use_arrayref(True)
    try:
        for step in (torch.full((C,), 0.2, dtype=F64), torch.tensor([0.1, 0.3, 2.0, 6.0], dtype=F64)):
            for _ in range(3):
                p0 = 2.0 * torch.randn(C, D, dtype=F64, generator=g)
                args = (state.z, state.logp, state.grad, p0, torch.rand(3 * K, C, dtype=F64, generator=g),
                        torch.rand(L, C, dtype=F64, generator=g), step, metric.inv_mass, torch.tensor(L))
                calls = nuts_native.arrayref_calls()
                direct = built.run(*args, *target.graph_inputs())
                assert nuts_native.arrayref_calls() > calls  # (through the entry point)
                nuts_native.use_arrayref(False)
                calls = nuts_native.arrayref_calls()
                through_run = built.run(*args, *target.graph_inputs())
                assert nuts_native.arrayref_calls() == calls  # (through the container's run)
                nuts_native.use_arrayref(True)
                eager = nuts_loop.transition(_eager(target), *args, K, loop=nuts_loop.python_loop)
                for a, b, e in zip(direct, through_run, eager):
                    assert torch.equal(a, b)
                    assert (torch.equal(a, e) if a.dtype in (torch.bool, torch.int64)
                            else torch.allclose(a, e, rtol=1e-9, atol=1e-12))
    finally:
        nuts_native.use_arrayref(before)


def test_the_build_check_shrinks_its_steps_where_random_trajectories_leave_the_valid_region():
    """The check compares the compiled transition with the eager one on random trajectories
    from the chains' unadapted state; a stiff model's first trajectories (steps 0.05-0.25,
    depth 10) overflow to invalid parameters (a stochastic-volatility model's exp(h / 2)),
    which the real call hands to the eager kernel. Those examples do not count, and later
    seeds shrink the steps until two can be compared (the SV model built no compiled
    transition before: "invalid parameter at most check points")."""
    C, D, K = 3, 4, 10
    z = torch.full((C, D), 0.5, dtype=torch.float64)

    def at(x):  # a standard normal, "valid" only within |x| < 1.5
        ok = (x.abs() < 1.5).all()
        return -0.5 * (x * x).sum(-1), -x, ok

    logp, grad, _ = at(z)
    inv_mass = torch.ones(C, D, dtype=torch.float64)
    steps_tried = []

    def run(z, logp, grad, p0, u, u_leaf, step, inv_mass, fresh):
        steps_tried.append(float(step.max()))
        return nuts_loop.transition(at, z, logp, grad, p0, u, u_leaf, step, inv_mass, fresh, K,
                                    loop=nuts_loop.python_loop)

    built = nuts_loop.CompiledTransition(run, C, K, z.device)
    built._check(lambda x: at(x)[:2], (), z, logp, grad, inv_mass)  # raises where it cannot compare two
    assert steps_tried[0] > 0.05 and min(steps_tried) < 0.25 * 0.25  # the first steps failed, small ones passed


def test_the_operator_is_built_without_fma_and_in_vex_encoding_where_the_cpu_has_avx(monkeypatch):
    """``nuts_native.compiler_flags``: never FMA contraction (the eager transition's arithmetic,
    bit for bit); ``-mavx`` exactly where torch reports AVX2/AVX-512 (legacy SSE code after the
    potential's AVX kernels paid a transition penalty: ~4.8 against ~0.9 us a leaf on logistic
    regression); the flags are part of the library's name."""
    from ppl.inference import nuts_native

    names = {}
    for capability, vex in (("AVX512", True), ("AVX2", True), ("DEFAULT", False), ("NO AVX", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        flags = nuts_native.compiler_flags()
        assert "-O3" in flags and "-ffp-contract=off" in flags
        assert ("-mavx" in flags) is vex
        names[vex] = nuts_native._name()
    assert names[True] != names[False]


def test_a_run_says_when_its_transitions_were_not_compiled_and_why(compiled, monkeypatch):
    """``NUTSResult.transition`` (``extra["transition"]``): "eager" where the compiled
    transition could not be built, with the build's error (a failed build is ~10x slower a
    transition on a small model, and said nothing)."""
    target, built, K = compiled
    monkeypatch.setenv("PPL_NUTS_LOOP", "1")
    monkeypatch.setattr(hmc, "LOOP_BUILD_FIXED", 0.0)
    monkeypatch.setattr(hmc, "LOOP_BUILD_PER_OP", 0.0)

    def broken(*args, **kwargs):
        raise RuntimeError("the C++ compiler failed (a test)")
    monkeypatch.setattr(nuts_loop.CompiledTransition, "build", broken)
    monkeypatch.setattr(hmc, "_LOOP_CACHE", type(hmc._LOOP_CACHE)())
    rand = TorchRandomness(torch.Generator().manual_seed(11))
    z0 = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    res = hmc.sample_nuts(target, z0, samples=20, warmup=20, randomness=rand, max_tree_depth=K, progress=False)
    assert res.transition == "eager" and "the C++ compiler failed" in res.why_not_compiled


def test_the_operators_place_is_cpp_extensions_build_directory(monkeypatch, tmp_path):
    """``nuts_native.library_path`` (found without importing ``torch.utils.cpp_extension``,
    which imports setuptools: ~30 ms a run) is where ``cpp_extension`` builds the operator, by
    default and under ``TORCH_EXTENSIONS_DIR``."""
    import os
    import sys

    from ppl.inference import nuts_native
    from torch.utils.cpp_extension import _get_build_directory

    def theirs():
        return os.path.join(_get_build_directory(nuts_native._name(), verbose=False), nuts_native._name() + ".so")
    assert nuts_native.library_path() == theirs()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    assert nuts_native.library_path() == theirs()
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    loaded = sys.modules.pop("torch.utils.cpp_extension")
    try:
        nuts_native.library_path()
        assert "torch.utils.cpp_extension" not in sys.modules
    finally:
        sys.modules["torch.utils.cpp_extension"] = loaded


def test_the_check_against_the_eager_loop_is_made_once_per_library_and_shapes(compiled, monkeypatch, tmp_path):
    """``CompiledTransition.build`` checks the C++ loops around a library against the eager
    transition (9-30 ms a run) where no earlier build passed that check for the same library,
    operator and shapes (``_checked_path``); a check that fails marks nothing."""
    import os
    target, built, K = compiled
    monkeypatch.setenv("PPL_NUTS_LOOP", "1")
    marker = nuts_loop._checked_path  # (markers in a fresh folder: the library's cache outlives a test run)
    monkeypatch.setattr(nuts_loop, "_checked_path", lambda *a: str(tmp_path / os.path.basename(marker(*a))))
    checks = []
    real = nuts_loop.CompiledTransition._check
    monkeypatch.setattr(nuts_loop.CompiledTransition, "_check",
                        lambda self, *a: checks.append(self.K) or real(self, *a))
    C, D = 4, 5
    metric = Metric(torch.ones(C, D, dtype=F64))
    state = init_state(target, torch.randn(C, D, dtype=F64, generator=torch.Generator().manual_seed(3)))
    for depth in (K, K, K - 1, K - 1):
        hmc._LOOP_CACHE.pop(target, None)
        assert isinstance(hmc._compiled_transition(target, metric, depth, state), nuts_loop.CompiledTransition)
    assert checks.count(K) == 1 and checks.count(K - 1) == 1

    def failing(self, *a):
        raise ValueError("the compiled transition disagrees with the eager one")
    monkeypatch.setattr(nuts_loop.CompiledTransition, "_check", failing)
    hmc._LOOP_CACHE.pop(target, None)
    assert hmc._compiled_transition(target, metric, K - 2, state) is None
    monkeypatch.setattr(nuts_loop.CompiledTransition, "_check",
                        lambda self, *a: checks.append(self.K) or real(self, *a))
    hmc._LOOP_CACHE.pop(target, None)
    assert isinstance(hmc._compiled_transition(target, metric, K - 2, state), nuts_loop.CompiledTransition)
    assert checks.count(K - 2) == 1  # (the failed check left no marker)


class Bounded(Gaussian):
    """The Gaussian whose graph says its parameters are invalid where some chain's first
    coordinate exceeds 1 (a transition that reaches there goes to the eager kernel)."""

    def _graph(self, z, beta):
        logp, grad = self.value_and_grad(z)
        return logp, grad, (beta < 2.0) & (z[:, 0] < 1.0).all()


def _sampled(target, monkeypatch, runs: str, seed: int, samples: int = 300):
    monkeypatch.setenv("PPL_NUTS_RUNS", runs)
    monkeypatch.setenv("PPL_NUTS_LOOP", "1")
    monkeypatch.setattr(hmc, "LOOP_BUILD_FIXED", 0.0)
    monkeypatch.setattr(hmc, "LOOP_BUILD_PER_OP", 0.0)
    calls = {"many": 0, "eager": 0, "warm": 0}
    many, warm = nuts_loop.CompiledTransition.run_many, nuts_loop.CompiledTransition.warm_up

    def counted_many(self, *a):
        calls["many"] += 1
        return many(self, *a)

    def counted_warm(self, *a):
        calls["warm"] += 1
        return warm(self, *a)
    monkeypatch.setattr(nuts_loop.CompiledTransition, "run_many", counted_many)
    monkeypatch.setattr(nuts_loop.CompiledTransition, "warm_up", counted_warm)
    step = hmc.nuts_step

    def counted_step(*a, drawn=None, **k):
        calls["eager"] += drawn is not None
        return step(*a, drawn=drawn, **k)
    monkeypatch.setattr(hmc, "nuts_step", counted_step)
    hmc._LOOP_CACHE.pop(target, None)  # (a transition of its own: the recent depths start afresh)
    rand = TorchRandomness(torch.Generator().manual_seed(seed))
    z0 = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 0.3
    res = hmc.sample_nuts(target, z0, samples=samples, warmup=100, randomness=rand, max_tree_depth=6, progress=False)
    monkeypatch.undo()
    return res, calls


def _same(a, b) -> None:
    for name in ("z", "logp", "divergent", "tree_depth", "n_steps", "accept_stat", "energy", "step_size"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_runs_of_transitions_in_cpp_give_the_per_transition_draws(compiled, monkeypatch):
    """The transitions made in runs in C++ (``CompiledTransition.run_many`` in sampling,
    ``warm_up`` in warm-up with the step size's dual averaging and the Welford estimate there
    too: momenta and uniforms drawn there, from the same generator, in the same order) give
    exactly the draws, statistics and step sizes of one ``nuts_step`` (and one
    ``WindowedAdaptation.update``) a transition."""
    target, built, K = compiled
    one, calls_one = _sampled(target, monkeypatch, "0", seed=5)
    runs, calls_runs = _sampled(target, monkeypatch, "1", seed=5)
    assert calls_one["many"] == calls_one["warm"] == 0 and calls_runs["many"] >= 300 // 64
    assert calls_runs["warm"] >= 100 // 64  # (warm-up too, its adaptation in C++)
    _same(one, runs)


def test_a_transition_found_invalid_in_a_run_is_made_eagerly_with_its_draws(monkeypatch):
    """Where a transition of a run is not valid (here: a chain leaves the region the graph
    calls valid), the run stops there and ``nuts_step`` makes that transition eagerly with
    the momentum and uniforms the run drew: the same draws as one transition at a time."""
    target = Bounded(_precision(5, seed=7), 4)
    one, calls_one = _sampled(target, monkeypatch, "0", seed=6, samples=200)
    runs, calls_runs = _sampled(target, monkeypatch, "1", seed=6, samples=200)
    assert calls_runs["many"] > 200 // 64 and calls_runs["eager"] >= 1
    _same(one, runs)
