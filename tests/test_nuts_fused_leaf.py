"""NUTS's fused leaf (inference/hmc.py ``_FusedLeaf``): the leapfrog step, the potential's
recorded graph, the log weight, the U-turn checks and the bookkeeping of one leaf recorded
into one graph. It must make exactly the draws of the eager leaf, be refused when it
disagrees with the eager leaf at fresh points, and hand a leaf with an invalid parameter
back to the eager leaf (whose potential finds the bad rows)."""
from __future__ import annotations

import json

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ppl
from ppl.inference import hmc
from ppl.inference.hmc import Metric, init_state, nuts_step
from ppl.inference.randomness import TorchRandomness

F64 = torch.float64


class RecordedGaussian:
    """N(0, diag(scales^2)) offering a recorded graph as ``inference.potential.Potential``
    does: (z, *graph_inputs) -> (log pi, gradient, parameters valid?). ``graph_scale``
    scales the recorded log density (1: the same function; else a wrong graph);
    ``graph_valid``: the flag the graph reports."""

    def __init__(self, scales, graph_scale=1.0, graph_valid=True):
        self.scales = torch.as_tensor(scales, dtype=F64)
        self.graph_scale, self.graph_valid = graph_scale, graph_valid
        self.graph_calls = 0
        C, D = 3, self.scales.numel()
        def graph(z, beta):
            return self._graph(z, beta)
        self.gm = make_fx(graph)(torch.zeros(C, D, dtype=F64), torch.tensor(1.0, dtype=F64))

    def value_and_grad(self, z):
        grad = -z / self.scales.square()
        return 0.5 * (z * grad).sum(-1), grad

    def _graph(self, z, beta):
        logp, grad = self.value_and_grad(z)
        ok = torch.full((), self.graph_valid)
        return beta * self.graph_scale * logp, beta * self.graph_scale * grad, ok

    def recorded_graph(self):
        return self.gm, "jit"

    def graph_inputs(self, beta=1.0):
        return (torch.tensor(beta, dtype=F64),)

    def count_graph_call(self, seconds):
        self.graph_calls += 1


def _draws(target, *, fused: bool, steps=12, seed=3):
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randn(3, target.scales.numel(), dtype=F64, generator=gen)
    rand = TorchRandomness(torch.Generator().manual_seed(seed))
    metric = Metric(torch.ones(3, target.scales.numel(), dtype=F64))
    state = init_state(target, z0)
    eps = torch.tensor([0.05, 0.4, 1.1], dtype=F64)
    out, depth = [], []
    for _ in range(steps):
        if fused:
            state, info = nuts_step(target, state, eps, metric, rand, max_tree_depth=6)
        else:
            state, info = nuts_step(_Plain(target), state, eps, metric, rand, max_tree_depth=6)
        out.append(state.z), depth.append(info.tree_depth)
    return torch.stack(out), torch.stack(depth)


class _Plain:
    """The same potential without a recorded graph (the eager leaf)."""

    def __init__(self, target):
        self.target = target

    def value_and_grad(self, z):
        return self.target.value_and_grad(z)


@pytest.fixture(autouse=True)
def _fuse_torchscript_graphs_too(monkeypatch):
    """Fuse TorchScript potentials as well (by default only TorchInductor ones are fused):
    the same graph, ready at once."""
    monkeypatch.setenv("PPL_NUTS_FUSED", "1")


def test_the_fused_leaf_makes_exactly_the_eager_leafs_draws():
    target = RecordedGaussian([1.0, 3.0, 0.2])
    fused, depth = _draws(target, fused=True)
    assert target.graph_calls > 100  # the fused graph ran the leaves
    eager, eager_depth = _draws(RecordedGaussian([1.0, 3.0, 0.2]), fused=False)
    assert depth.max() >= 4 and torch.equal(depth, eager_depth)
    assert torch.allclose(fused, eager, rtol=0, atol=1e-12)


def test_a_fused_leaf_that_disagrees_with_the_eager_leaf_is_not_used():
    """The recorded graph is 2x the potential: caught at fresh points, the eager leaf runs,
    the draws are the right ones."""
    target = RecordedGaussian([1.0, 3.0, 0.2], graph_scale=2.0)
    draws, _ = _draws(target, fused=True, steps=5)
    assert target.graph_calls <= 2  # only the two check points
    assert "disagrees" in hmc._FusedLeaf.why_not["jit"]
    eager, _ = _draws(RecordedGaussian([1.0, 3.0, 0.2]), fused=False, steps=5)
    assert torch.allclose(draws, eager, rtol=0, atol=1e-12)


def test_a_leaf_with_an_invalid_parameter_goes_to_the_eager_leaf():
    """The graph's parameters-valid flag is False: every leaf is recomputed by the eager
    leaf, so the draws are the potential's own."""
    target = RecordedGaussian([1.0, 3.0, 0.2], graph_valid=False)
    draws, _ = _draws(target, fused=True, steps=5)
    eager, _ = _draws(RecordedGaussian([1.0, 3.0, 0.2]), fused=False, steps=5)
    assert torch.allclose(draws, eager, rtol=0, atol=1e-12)


def test_nuts_on_a_traced_program_runs_the_fused_leaf_with_the_same_draws(monkeypatch):
    """Eight schools (TorchScript graph): the fused leaf is built and gives the same draws
    as the per-operation leaf (``PPL_NUTS_FUSED=0``)."""
    m = ppl.model("examples/eight_schools.ppl")
    data = json.load(open("examples/eight_schools.json"))

    def run():
        r = m.run("nuts", data, particles=2, samples=20, burn_in=20, seed=4, compile=False)
        return r.extra, {k: torch.as_tensor(v) for k, v in r.samples.items()}

    monkeypatch.setattr(hmc, "LOOP_BUILD_FIXED", 0.0)  # (a short run: fuse anyway -- a build that
    monkeypatch.setattr(hmc, "LOOP_BUILD_PER_OP", 0.0)  # costs nothing always pays)
    built = []
    original = hmc._FusedLeaf.build.__func__

    def build(cls, *args):
        leaf = original(cls, *args)
        built.append(leaf)
        return leaf
    monkeypatch.setattr(hmc._FusedLeaf, "build", classmethod(build))
    fused_extra, fused = run()
    assert built and built[0] is not None
    monkeypatch.setenv("PPL_NUTS_FUSED", "0")
    eager_extra, eager = run()
    assert fused_extra["leapfrog_steps"] == eager_extra["leapfrog_steps"]
    for k in eager:
        assert torch.allclose(fused[k], eager[k], rtol=0, atol=1e-12), k


@pytest.mark.parametrize("d,n", [(0, 0), (2, 0), (2, 1), (2, 3), (3, 4), (3, 7)])
def test_level_masks_follow_the_blocks_of_the_tree(d, n):
    """Leaf n of a sub-tree of depth d starts the blocks of 2^k leaves with 2^k | n (every
    level at n = 0) and ends those with 2^k | n + 1 (k >= 1)."""
    set_at, check_at = hmc._level_masks(n, d, 5, "cpu")
    assert set_at.tolist() == [k <= d and n % 2 ** k == 0 for k in range(5)]
    assert check_at.tolist() == [1 <= k <= d and (n + 1) % 2 ** k == 0 for k in range(5)]


def test_a_short_run_does_not_build_the_fused_leaf(monkeypatch):
    """Too few transitions left for the build to pay (``hmc._fuse_now``): no fused leaf is
    built (its compilation would cost more than it saves); the eager leaf runs."""
    built = []
    monkeypatch.setattr(hmc._FusedLeaf, "build", classmethod(lambda cls, *args: built.append(args)))
    target = RecordedGaussian([1.0, 3.0, 0.2])
    z0 = torch.zeros(3, 3, dtype=F64)
    hmc.sample_nuts(target, z0, samples=5, warmup=5, randomness=TorchRandomness(torch.Generator().manual_seed(0)),
                    progress=False)
    assert not hmc._fuse_now(10, 1000, 3) and not built and target.graph_calls == 0
