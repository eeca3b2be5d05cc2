"""The Python around one NUTS transition (issue 11): ``sample_nuts``'s loops, the warm-up
adaptation and the compiled transition's call.

* Load-independent budgets: with the compiled transition's C++ operator stubbed out (a
  fixed answer), a transition makes a bounded number of calls into torch (functions, tensor
  methods and properties: a ``TorchFunctionMode``) and of Python functions (cProfile), never
  timed. Before the cut (same stub): 26 torch calls and 52 Python calls per sampling
  transition, 41 and 67 per warm-up transition; after: 12.5 and 33, 22 and 54.
* The cheaper bookkeeping gives the same bits: the adaptation's numpy arithmetic against
  the tensor arithmetic it replaced, the uniforms drawn in one call against two calls, the
  draws recorded a chunk at a time against the states the kernel returned.
"""
from __future__ import annotations

import cProfile
import math
import pstats
import types

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ppl.inference import hmc
from ppl.inference.adaptation import DualAveraging, Welford, WindowedAdaptation
from ppl.inference.nuts_loop import CompiledTransition
from ppl.inference.randomness import TorchRandomness

F64 = torch.float64


class Gaussian:
    """N(0, diag(scales^2)), offering a recorded graph as a compiled potential does (the
    compiled transition built for it is a stub: ``stubbed``)."""

    def __init__(self, scales):
        self.scales = torch.as_tensor(scales, dtype=F64)
        self.inputs = (torch.tensor(1.0, dtype=F64),)
        self.graph = types.SimpleNamespace(graph=types.SimpleNamespace(nodes=[None] * 100))

    def value_and_grad(self, z):
        grad = -z / self.scales.square()
        return 0.5 * (z * grad).sum(-1), grad

    def recorded_graph(self):
        return self.graph, "inductor"

    def graph_inputs(self):
        return self.inputs


def _stub_transition(C: int, D: int, K: int = 10) -> CompiledTransition:
    """A compiled transition whose C++ operator is replaced by a fixed answer (a tree of
    depth 3, 8 leaves): what is left is the Python around it."""
    g = torch.Generator().manual_seed(5)
    answer = [torch.randn(C, D, dtype=F64, generator=g), -torch.rand(C, dtype=F64, generator=g),
              torch.randn(C, D, dtype=F64, generator=g), torch.rand(C, dtype=F64, generator=g),
              torch.full((C,), 0.8, dtype=F64), torch.zeros(C, dtype=torch.bool), torch.full((C,), 8),
              torch.full((C,), 3), torch.ones(C, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    return CompiledTransition(lambda *args: answer, C, K, torch.device("cpu"))


class _CountOps(TorchFunctionMode):
    """Counts the calls from Python into torch (functions, tensor methods, properties)."""

    def __init__(self):
        super().__init__()
        self.ops: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _per_transition(run, n: int) -> tuple[float, float, dict]:
    """(torch operations, Python function calls) per transition of ``run()`` (n transitions)."""
    run()  # (first calls: caches)
    with _CountOps() as counted:
        run()
    profile = cProfile.Profile()
    profile.enable()
    run()
    profile.disable()
    calls = sum(row[1] for row in pstats.Stats(profile).stats.values())
    return sum(counted.ops.values()) / n, calls / n, counted.ops


@pytest.fixture
def stubbed(monkeypatch):
    C, D = 4, 10
    stub = _stub_transition(C, D)
    monkeypatch.setattr(hmc, "_build_transition", lambda *args, **kwargs: stub)
    monkeypatch.setattr(hmc, "LOOP_BUILD_FIXED", 0.0)  # (a build that costs nothing always pays)
    monkeypatch.setattr(hmc, "LOOP_BUILD_PER_OP", 0.0)
    target = Gaussian(torch.linspace(0.5, 3.0, D))
    z0 = torch.randn(C, D, dtype=F64, generator=torch.Generator().manual_seed(1))
    yield target, z0
    assert hmc._LOOP_CACHE[target]  # (the stub was used through the lookup)


def test_a_sampling_transition_costs_few_torch_ops_and_python_calls(stubbed):
    """Sampling with the compiled transition: the momentum (2 operations) and one draw of
    every uniform; the per-draw record is a stack per field every 64 transitions."""
    target, z0 = stubbed
    S = 256
    step, inverse = torch.full((4,), 0.3, dtype=F64), torch.ones(4, 10, dtype=F64)

    def run():
        hmc.sample_nuts(target, z0, samples=S, warmup=0, step_size=step, inverse_mass=inverse, progress=False,
                        randomness=TorchRandomness(torch.Generator().manual_seed(2)))
    ops, calls, which = _per_transition(run, S)
    assert ops <= 14, (ops, which)         # was 26 (7 copies of the record, the leaf uniforms' copy, ...)
    assert calls <= 37, calls              # was 52 (the compiled transition looked up at every transition)


def test_a_warmup_transition_costs_few_torch_ops_and_python_calls(stubbed):
    """Warm-up with the compiled transition: dual averaging and Welford on the host (one
    exp per transition), the mass matrix updates amortised over the windows."""
    target, z0 = stubbed
    W = 1024

    def run():
        hmc.sample_nuts(target, z0, samples=0, warmup=W, progress=False,
                        randomness=TorchRandomness(torch.Generator().manual_seed(3)))
    ops, calls, which = _per_transition(run, W)
    assert ops <= 25, (ops, which)         # was 41 (dual averaging and Welford as tensor operations)
    assert calls <= 60, calls              # was 67


# -- the same bits ------------------------------------------------------------------------

class _TensorDualAveraging:
    """The dual averaging as it was written on tensors (the reference)."""

    def __init__(self, step_size, target=0.8, gamma=0.05, t0=10.0, kappa=0.75):
        self.target, self.gamma, self.t0, self.kappa = target, gamma, t0, kappa
        self.restart(step_size)

    def restart(self, step_size):
        self.mu = torch.log(10 * step_size)
        self.counter = 0
        self.s_bar = torch.zeros_like(step_size)
        self.x_bar = torch.zeros_like(step_size)
        self.x = torch.log(step_size)

    def update(self, accept_stat):
        stat = torch.nan_to_num(accept_stat.to(F64), nan=0.0).clamp(max=1.0)
        self.counter += 1
        eta = 1.0 / (self.counter + self.t0)
        self.s_bar = (1 - eta) * self.s_bar + eta * (self.target - stat)
        self.x = self.mu - self.s_bar * (math.sqrt(self.counter) / self.gamma)
        x_eta = self.counter ** (-self.kappa)
        self.x_bar = (1 - x_eta) * self.x_bar + x_eta * self.x
        return self.x.exp()


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # (numpy's, for the infinite statistics)
def test_dual_averaging_on_the_host_gives_the_tensor_arithmetic_bits():
    """Also for statistics no kernel returns (infinite, negative, above 1)."""
    g = torch.Generator().manual_seed(0)
    C = 6
    step = torch.rand(C, generator=g, dtype=F64) + 0.01
    new, old = DualAveraging(step), _TensorDualAveraging(step)
    for i in range(300):
        stat = torch.rand(C, generator=g, dtype=F64)
        for value, p in ((math.nan, 0.1), (math.inf, 0.03), (-math.inf, 0.03), (-2.5, 0.03), (7.0, 0.03)):
            stat[torch.rand(C, generator=g) < p] = value
        assert torch.equal(new.update(stat), old.update(stat)), i
        if i % 100 == 49:
            restart = old.x.exp() * 1.7
            new.restart(restart), old.restart(restart)
    assert torch.equal(new.final(), old.x_bar.exp())


def test_dual_averaging_of_a_single_step_size():
    """A 0-d step size (numpy scalars on the host) gives 0-d step sizes, the reference's bits."""
    new, old = DualAveraging(torch.tensor(0.5, dtype=F64)), _TensorDualAveraging(torch.tensor(0.5, dtype=F64))
    for stat in (0.9, 0.2, math.nan, 0.7):
        step = new.update(torch.tensor(stat, dtype=F64))
        assert step.shape == () and torch.equal(step, old.update(torch.tensor(stat, dtype=F64)))
    assert torch.equal(new.final(), old.x_bar.exp())


@pytest.mark.parametrize("dense", [False, True])
def test_welford_on_the_host_gives_the_tensor_arithmetic_bits(dense):
    g = torch.Generator().manual_seed(1)
    C, D = 3, 4
    w = Welford(C, D, dense=dense)
    mean = torch.zeros(C, D, dtype=F64)
    m2 = torch.zeros((C, D, D) if dense else (C, D), dtype=F64)
    for n in range(1, 60):
        z = torch.randn(C, D, generator=g, dtype=F64) * torch.logspace(-3, 3, D, dtype=F64)
        w.update(z)
        delta = z - mean
        mean = mean + delta / n
        after = z - mean
        m2 = m2 + (delta.unsqueeze(-1) * after.unsqueeze(-2) if dense else delta * after)
    var = m2 / (n - 1)
    if dense:
        var = 0.5 * (var + var.transpose(-1, -2))
        expected = (n / (n + 5.0)) * var + 1e-3 * 5.0 / (n + 5.0) * torch.eye(D, dtype=F64)
    else:
        expected = (n / (n + 5.0)) * var + 1e-3 * 5.0 / (n + 5.0)
    assert torch.equal(w.inverse_mass(), expected)


def test_windowed_adaptation_takes_no_torch_op_but_the_exp_between_windows():
    """Outside a window's end, one warm-up iteration's adaptation is one exp (and the
    tensors' hand-over to numpy)."""
    C, D = 4, 10
    adapt = WindowedAdaptation(1000, torch.full((C,), 0.1, dtype=F64), C=C, D=D)
    z, stat = torch.randn(C, D, dtype=F64), torch.rand(C, dtype=F64)
    adapt.update(100, z, stat)
    with _CountOps() as counted:
        for i in range(101, 121):
            adapt.update(i, z, stat)
    assert counted.ops.pop("TensorBase.exp") == 20, counted.ops
    # the rest: hand-overs to numpy (and properties read), no arithmetic
    assert set(counted.ops) <= {"TensorBase.to", "TensorBase.numpy", "getset_descriptor.__get__"}, counted.ops


class _TwoCalls(TorchRandomness):
    """A TorchRandomness with ``uniform`` overridden (the transition then draws twice)."""

    def uniform(self, shape, device):
        return super().uniform(shape, device)


def test_the_uniforms_drawn_in_one_call_are_the_two_calls_numbers():
    C, K = 4, 10
    for fresh_depth in (1, 4, K):
        drawn = {}
        for kind in (TorchRandomness, _TwoCalls):
            stub = _stub_transition(C, 3, K)
            stub.recent_depths[:] = [fresh_depth]
            randomness = kind(torch.Generator().manual_seed(9))
            u = stub.draw_uniforms(randomness, C, "cpu").clone()
            fresh = stub._drawn
            drawn[kind] = (u, stub.u_leaf[:fresh].clone(), randomness.uniform((2,), "cpu"))
        g = torch.Generator().manual_seed(9)
        expected = (torch.rand((C, 3 * K), dtype=F64, generator=g).T, torch.rand((fresh, C), dtype=F64, generator=g),
                    torch.rand((2,), dtype=F64, generator=g))
        for got in drawn.values():
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), fresh_depth


def test_the_draws_recorded_a_chunk_at_a_time_are_the_kernels_states(monkeypatch):
    """The record (flushed every 64 transitions, and whenever a shown bar reads it) holds
    exactly the states and statistics the kernel returned, in order; a shown bar changes
    nothing."""
    target = Gaussian([1.0, 2.0])
    z0 = torch.zeros(3, 2, dtype=F64)
    seen = []
    real = hmc._NutsTransitions.__call__

    def spy(self, *args, **kwargs):
        state, info = real(self, *args, **kwargs)
        seen.append((state.z.clone(), state.logp.clone(), info.n_steps.clone(), info.accept_stat.clone()))
        return state, info
    monkeypatch.setattr(hmc._NutsTransitions, "__call__", spy)
    results = []
    for progress in (False, True):
        seen.clear()
        res = hmc.sample_nuts(target, z0, samples=150, warmup=30, progress=progress, max_tree_depth=4,
                              randomness=TorchRandomness(torch.Generator().manual_seed(4)))
        kept = seen[30:]
        assert torch.equal(res.z, torch.stack([s[0] for s in kept], 1))
        assert torch.equal(res.logp, torch.stack([s[1] for s in kept], 1))
        assert torch.equal(res.n_steps, torch.stack([s[2] for s in kept], 1))
        assert torch.equal(res.accept_stat, torch.stack([s[3] for s in kept], 1))
        results.append(res)
    for field in ("z", "energy", "divergent", "tree_depth", "step_size", "inverse_mass", "warmup_divergences"):
        assert torch.equal(getattr(results[0], field), getattr(results[1], field)), field
