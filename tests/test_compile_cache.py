"""TorchInductor's on-disk cache for the potential's graph (issue 11, warm-up cost).

``inference.compiled.replay(..., "inductor")`` used to call ``compile_fx`` without a shape
environment, so Inductor bypassed its FX graph cache ("No shape env") and every process
compiled the graph afresh (eight schools: ~2.4 s CPU per run, cached: ~0.35 s). Now the
cache is used, a marker records which graphs were compiled on this machine
(``compiled.compiled_before``, a hint for benchmarks). NUTS with ``compile="auto"`` does
not ask it: which backend runs (hence a seeded run's draws) is decided from the graph and
the run's length alone (``gradient_mcmc.compile_decision``); the cache only makes a chosen
compile cheap."""
import shutil
import uuid

import pytest
import torch
from torch._dynamo.utils import counters

import ppl
from ppl.inference import compiled, gradient_mcmc
from ppl.inference import potential as potential_module

torch.set_num_threads(1)

needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="TorchInductor needs a C++ compiler")

SOURCE = """
def model(ys):
    mu ~ normal(0, 10)
    sigma ~ half_normal(2)
    observe ys ~ normal(mu, sigma)
    return mu
"""


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    return tmp_path


def _graph(constant=2.5):
    def f(x, y):
        return ((x.sin() * y).exp().sum(-1), x * constant)
    example = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    return compiled.record(f, example), example


@needs_compiler
def test_the_compiled_graph_goes_through_inductors_disk_cache():
    # Inductor's own cache directory (a fresh one would rebuild its CPU probes: tens of
    # seconds under load); a constant of this run's own makes the graph new to it
    constant = 2.0 + uuid.uuid4().int % 10 ** 9 / 10 ** 9
    gm, example = _graph(constant)
    assert not compiled.compiled_before(gm, example)
    before = dict(counters["inductor"])
    fast = compiled.replay(gm, example, "inductor")
    assert counters["inductor"]["fxgraph_cache_bypass"] == before.get("fxgraph_cache_bypass", 0)
    assert counters["inductor"]["fxgraph_cache_miss"] == before.get("fxgraph_cache_miss", 0) + 1
    assert compiled.compiled_before(gm, example)
    # the same graph recorded again (as a new process would) is loaded, not compiled
    gm2, _ = _graph(constant)
    assert compiled.compiled_before(gm2, example)
    again = compiled.replay(gm2, example, "inductor")
    assert counters["inductor"]["fxgraph_cache_hit"] == before.get("fxgraph_cache_hit", 0) + 1
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for a, b, c in zip(fast(x, y), again(x, y), gm(x, y)):
        assert torch.allclose(a, c, rtol=1e-12) and torch.allclose(b, c, rtol=1e-12)


def test_the_marker_depends_on_the_graphs_constants_and_input_shapes(fresh_cache):
    gm, example = _graph()
    compiled._mark_compiled(gm, example, True)
    assert compiled.compiled_before(gm, example)
    assert not compiled.compiled_before(gm, example, size_asserts=False)
    wider = (torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64))
    assert not compiled.compiled_before(gm, wider)

    def g(x, y):
        return ((x.sin() * y).exp().sum(-1), x * 3.5)  # another constant
    assert not compiled.compiled_before(compiled.record(g, example), example)


def _counting_compiles(monkeypatch):
    """Record each graph handed to Inductor; run it on TorchScript instead (the decision
    only: Inductor itself is tested above). Returns the list and the potentials built."""
    compiles, potentials = [], []

    def replay(gm, example_inputs, backend="jit", **kwargs):
        if backend == "inductor":
            compiles.append(gm)
            return compiled.replay(gm, example_inputs, "jit")
        return compiled.replay(gm, example_inputs, backend, **kwargs)

    def build_potential(*args, **kwargs):
        potentials.append(build(*args, **kwargs))
        return potentials[-1]
    build = gradient_mcmc.build_potential
    monkeypatch.setattr(potential_module, "replay", replay)
    monkeypatch.setattr(gradient_mcmc, "build_potential", build_potential)
    return compiles, potentials


def test_compile_auto_decides_the_same_whether_or_not_the_graph_was_compiled_before(fresh_cache, monkeypatch):
    """The cache makes a chosen compile cheap (above) but never chooses: a graph compiled on
    this machine before gets the backend the cost model gives it (``compile_decision``),
    like an unknown one, so a seeded run's draws do not depend on the cache."""
    compiles, potentials = _counting_compiles(monkeypatch)
    m = ppl.compile_source(SOURCE)
    data = {"ys": [0.3, 1.2, -0.4, 0.8, 2.1]}
    short = dict(particles=2, samples=10, burn_in=10, seed=3)
    first = m.run("nuts", data, **short)
    assert first.extra["traced"] and not first.extra["compiled"] and not compiles
    assert "20 iterations" in first.extra["why_not_compiled"]
    gm, example = potentials[-1]._recorded
    compiled._mark_compiled(gm, example(), True)  # as replay(..., "inductor") does
    assert compiled.compiled_before(gm, example())
    known = m.run("nuts", data, **short)
    assert not known.extra["compiled"] and not compiles  # (before: compiled at once)
    assert torch.equal(torch.as_tensor(known.samples["mu"]), torch.as_tensor(first.samples["mu"]))
    # a run the model says pays is compiled at the start, known graph or not
    monkeypatch.setattr(gradient_mcmc, "SAVED_PER_OP_ITERATION", 1.0)
    assert m.run("nuts", data, **short).extra["compiled"] and len(compiles) == 1
    other = m.run("nuts", {"ys": [0.3, 1.2, -0.4, 0.8, 2.0]}, **short)  # another graph, never compiled
    assert other.extra["compiled"] and "why_not_compiled" not in other.extra and len(compiles) == 2
    assert not m.run("nuts", data, compile=False, **short).extra["compiled"] and len(compiles) == 2


CORRELATED = """
def m(ys):
    a ~ normal(0, 1)
    observe ys ~ mv_normal(zeros(2), [[1.0, a], [a, 1.0]])
    return a
"""


def test_a_cholesky_check_is_the_graphs_validity_flag_not_a_side_effect():
    # a covariance that is not positive definite for |a| >= 1: the graph used to raise from
    # aten._linalg_check_errors, a side effect that kept it out of Inductor's disk cache; it
    # now clears the validity flag instead, and the chains there still get density zero
    from ppl.inference.mh import initial_state
    from ppl.inference.potential import build_potential
    from ppl.semantics.gfi import ModelRun
    m = ppl.compile_source(CORRELATED)
    d = m.prepare_data({"ys": [0.4, -0.2]}, "cpu")
    interp = m.interpreter()
    with ppl.api.seeded(0):
        state = initial_state(interp, m.entry, d, 4)
        p = build_potential(ModelRun(interp, m.entry, d), state)
    assert p.traced
    targets = [str(n.target) for n in p._aten.graph.nodes if n.op == "call_function"]
    assert any("cholesky" in t for t in targets) and not any("check_errors" in t for t in targets)
    valid = torch.tensor([[0.5], [-0.3], [0.1], [0.9]], dtype=torch.float64)
    p.value_and_grad(valid)  # an all-valid batch first (the background of the row-by-row search)
    z = torch.tensor([[0.5], [1.5], [-0.3], [-2.0]], dtype=torch.float64)
    lp, grad = p.value_and_grad(z)
    eager_lp, eager_grad = p._row_by_row(z, 1.0)
    assert torch.isneginf(lp[[1, 3]]).all() and torch.isfinite(lp[[0, 2]]).all()
    assert torch.allclose(lp[[0, 2]], eager_lp[[0, 2]], rtol=1e-12)
    assert torch.allclose(grad, eager_grad, rtol=1e-10, atol=1e-12)
