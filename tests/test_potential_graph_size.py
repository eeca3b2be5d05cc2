"""Graph building that scales with a loop over data (issue 11: GARCH(1,1) and the GP spent
~78 s of a 118 s NUTS run recording and compiling long unrolled graphs):

* a loop's repeated observes are scored as one vectorised term (``inference.observe_groups``):
  the recorded graph of ``for t: observe ys[t] ~ normal(mu, sigma)`` has the same number of
  operations for 20 and for 200 data points, and a GARCH recursion's graph per time step
  shrinks; the density and gradient equal the per-observe ones and a closed form;
* the recording uses one fake-tensor mode (``compiled.record``; each mode captured the
  Python stack: ~2/3 of GARCH's recording time);
* ``compile="auto"`` estimates Inductor's cost and savings from the graph's size
  (``gradient_mcmc.compile_decision``), so a long graph in a short run stays on TorchScript
  and says why.
"""
import math

import numpy as np
import pytest
import torch

import ppl
from ppl.inference import gradient_mcmc, potential as potential_module
from ppl.inference.mh import initial_state
from ppl.inference.potential import build_potential
from ppl.semantics.gfi import ModelRun

torch.set_num_threads(1)

LOOP = """
def loop(ys):
    mu ~ normal(0, 2)
    sigma ~ half_normal(1)
    for t in range(len(ys)):
        observe ys[t] ~ normal(mu, sigma)
    return mu
"""

GARCH = """
def garch(rs, sigma1):
    mu ~ normal(0, 2)
    alpha0 ~ half_normal(1)
    alpha1 ~ uniform(0, 1)
    beta1 ~ uniform(0, 1 - alpha1)
    sigma = sigma1
    observe rs[0] ~ normal(mu, sigma)
    for t in range(1, len(rs)):
        sigma = sqrt(alpha0 + alpha1 * (rs[t - 1] - mu) ** 2 + beta1 * sigma ** 2)
        observe rs[t] ~ normal(mu, sigma)
    return sigma
"""


def _potential(src, data, chains=3, traced="auto", seed=0):
    m = ppl.model(src)
    d = m.prepare_data(data, "cpu")
    interp = m.interpreter()
    with ppl.api.seeded(seed):
        state = initial_state(interp, m.entry, d, chains)
        return build_potential(ModelRun(interp, m.entry, d), state, traced=traced)


def _ops(p) -> int:
    return len(p._recorded[0].graph.nodes)


def _ys(n, seed=0):
    return np.random.default_rng(seed).normal(0.5, 1.3, size=n).round(3).tolist()


def test_a_loop_of_observes_records_a_graph_of_the_same_size_for_any_length():
    short, long = _potential(LOOP, {"ys": _ys(10)}), _potential(LOOP, {"ys": _ys(60)})
    assert short.traced and long.traced
    assert _ops(long) == _ops(short) < 250, (_ops(short), _ops(long))  # one by one: ~15 more a point
    # and it is the right density: log pi(z) by hand (sigma = exp(z1), Jacobian z1)
    ys = torch.tensor(_ys(60), dtype=torch.float32).double()  # the data as ppl holds it
    z = torch.tensor([[0.3, -0.2], [1.1, 0.4], [-0.7, 0.0]], dtype=torch.float64)
    lp, g = long.value_and_grad(z)
    N = torch.distributions.Normal
    mu, s = z[:, 0], z[:, 1].exp()
    want = N(0.0, 2.0).log_prob(mu) + torch.distributions.HalfNormal(1.0).log_prob(s) + z[:, 1] \
        + N(mu.unsqueeze(1), s.unsqueeze(1)).log_prob(ys).sum(1)
    assert torch.allclose(lp, want, rtol=1e-12, atol=1e-9)
    zz = z.clone().requires_grad_(True)
    mu, s = zz[:, 0], zz[:, 1].exp()
    (N(0.0, 2.0).log_prob(mu) + torch.distributions.HalfNormal(1.0).log_prob(s) + zz[:, 1]
     + N(mu.unsqueeze(1), s.unsqueeze(1)).log_prob(ys).sum(1)).sum().backward()
    assert torch.allclose(g, zz.grad, rtol=1e-10, atol=1e-9)


def test_grouped_observes_equal_the_per_observe_density_and_gradient_on_garch(monkeypatch):
    data = {"rs": _ys(15, seed=3), "sigma1": 1.0}
    grouped = _potential(GARCH, data)
    monkeypatch.setattr(potential_module, "GROUP_OBSERVES", False)
    single = _potential(GARCH, data)
    assert grouped.traced and single.traced
    # per time step: ~51 operations observed one by one, ~27 grouped
    assert _ops(grouped) < 0.7 * _ops(single), (_ops(grouped), _ops(single))
    z = torch.tensor([[0.1, -0.5, 0.3, -1.0], [0.4, 0.2, -1.2, 0.5], [-0.3, -1.5, 0.0, 0.0]],
                     dtype=torch.float64)
    lg, gg = grouped.value_and_grad(z)
    ls, gs = single.value_and_grad(z)
    assert torch.allclose(lg, ls, rtol=1e-12, atol=1e-10) and torch.allclose(gg, gs, rtol=1e-10, atol=1e-10)
    b = torch.tensor(1.0, dtype=torch.float64)
    le, ge, _ = grouped._value_and_grad(z, b)  # the interpreter itself (grouping in eager runs too)
    assert torch.allclose(le, ls, rtol=1e-12, atol=1e-10) and torch.allclose(ge, gs, rtol=1e-10, atol=1e-10)


def test_a_loop_of_count_observes_is_grouped_and_exact(monkeypatch):
    """Integer data (poisson counts) under a per-chain rate: the same density as observed
    one by one, and as scipy's (to float32's lgamma of the counts)."""
    import scipy.stats as ss
    src = """
def rates(counts):
    lam ~ gamma(2, 1)
    for c in counts:
        observe c ~ poisson(lam)
"""
    counts = [3, 5, 2, 4, 6, 3, 0, 7]
    p = _potential(src, {"counts": counts})
    monkeypatch.setattr(potential_module, "GROUP_OBSERVES", False)
    single = _potential(src, {"counts": counts})
    assert _ops(p) < _ops(single)
    z = torch.tensor([[0.2], [1.5], [-0.4]], dtype=torch.float64)
    (lp, g), (ls, gs) = p.value_and_grad(z), single.value_and_grad(z)
    assert torch.allclose(lp, ls, rtol=1e-13, atol=0) and torch.allclose(g, gs, rtol=1e-12, atol=1e-12)
    lam = z[:, 0].exp().numpy()
    want = [ss.gamma.logpdf(l, 2) + math.log(l) + ss.poisson.logpmf(counts, l).sum() for l in lam]
    assert np.allclose(lp.numpy(), want, rtol=1e-6, atol=0)


def test_recording_creates_one_fake_tensor_mode(monkeypatch):
    from torch._subclasses import fake_tensor
    made = []
    init = fake_tensor.FakeTensorMode.__init__

    def counting(self, *a, **k):
        made.append(1)
        init(self, *a, **k)
    monkeypatch.setattr(fake_tensor.FakeTensorMode, "__init__", counting)
    p = _potential(GARCH, {"rs": _ys(15, seed=1), "sigma1": 1.0})
    assert p.traced and _ops(p) > 300
    assert len(made) <= 2, len(made)  # one per recording, not one per recorded value (~500 here)


class _Graph:
    """What the compile decision reads of a recorded graph: its operations."""

    def __init__(self, ops):
        self.graph = type("G", (), {"nodes": range(ops)})()


def test_compile_auto_counts_the_graphs_size():
    # a 4,000-operation graph costs ~36 s to compile and saves ~76 ms an iteration: a run of
    # 300 iterations stays on TorchScript and says why, one of 1,000 compiles; a graph of 100
    # operations (~4.8 s) pays from ~2,500 iterations
    assert gradient_mcmc.compile_cost(type("P", (), {"_recorded": (_Graph(4000), None)})()) == pytest.approx(36.0)
    why = gradient_mcmc.compile_decision(300)(_Graph(4000))
    assert "cost ~36 s" in why and "save ~23 s" in why and "300 iterations" in why
    assert gradient_mcmc.compile_decision(1000)(_Graph(4000)) is None
    assert gradient_mcmc.compile_decision(2400)(_Graph(100)) is not None
    assert gradient_mcmc.compile_decision(2600)(_Graph(100)) is None


def test_a_short_run_stays_on_torchscript_and_says_why(monkeypatch):
    """Through ``run``: a run of 20 iterations does not compile (Inductor is not even
    asked), and the result says why."""
    from ppl.inference import compiled

    def no_inductor(gm, example_inputs, backend="jit", **kwargs):
        assert backend != "inductor", "compiled"
        return compiled.replay(gm, example_inputs, backend, **kwargs)
    monkeypatch.setattr(potential_module, "replay", no_inductor)
    res = ppl.model(LOOP).run("nuts", {"ys": _ys(10)}, particles=2, samples=10, burn_in=10, seed=0)
    assert res.extra["traced"] and not res.extra["compiled"]
    assert "compile='auto'" in res.extra["why_not_compiled"] and "20 iterations" in res.extra["why_not_compiled"]


def test_a_group_that_cannot_be_stacked_is_scored_one_by_one(monkeypatch):
    """If a distribution refuses the stacked parameters, the collected observes are scored
    as they came: the same density as without grouping."""
    from ppl.inference import observe_groups
    data = {"ys": _ys(8, seed=2)}
    z = torch.tensor([[0.3, -0.2], [1.1, 0.4], [-0.7, 0.0]], dtype=torch.float64)
    monkeypatch.setattr(potential_module, "GROUP_OBSERVES", False)
    want = _potential(LOOP, data, traced=False).value_and_grad(z)
    monkeypatch.setattr(potential_module, "GROUP_OBSERVES", True)

    def refuse(self, column):
        raise RuntimeError("no stacking")
    monkeypatch.setattr(observe_groups.ObserveGroups, "_stack", refuse)
    got = _potential(LOOP, data, traced=False).value_and_grad(z)
    assert torch.allclose(got[0], want[0], rtol=1e-13, atol=0) and torch.allclose(got[1], want[1], rtol=1e-12)


CORRELATION = """
def corr(ys):
    r ~ normal(0, 0.3)
    observe ys ~ mv_normal(zeros(2), [[1.0, r], [r, 1.0]])
    return r
"""


def test_chains_at_invalid_points_are_found_through_the_graph_not_the_interpreter(monkeypatch):
    """A covariance that is not positive definite in some chains (|r| >= 1): those chains
    have density zero, the others their density, found by evaluating the recorded graph
    chain by chain (the interpreter's row-by-row runs took ~40% of a GP run's time)."""
    p = _potential(CORRELATION, {"ys": [0.3, -0.2]})
    assert p.traced
    p.value_and_grad(torch.tensor([[0.1], [-0.3], [0.5]], dtype=torch.float64))  # r = z, |r| < 1
    z = torch.tensor([[0.2], [1.4], [-0.4]], dtype=torch.float64)  # chain 1: not positive definite
    want = p._row_by_row(z, 1.0)

    def forbidden(*a, **k):
        raise AssertionError("the interpreter ran row by row")
    monkeypatch.setattr(p, "_row_by_row", forbidden)
    lp, g = p.value_and_grad(z)
    assert lp[1] == -math.inf and bool((g[1] == 0).all())
    assert torch.allclose(lp, want[0], rtol=1e-12, atol=0) and torch.allclose(g, want[1], rtol=1e-10, atol=1e-12)
    mvn = torch.distributions.MultivariateNormal
    ys = torch.tensor([0.3, -0.2], dtype=torch.float32).double()
    closed = [float(mvn(torch.zeros(2, dtype=torch.float64), torch.tensor([[1.0, r], [r, 1.0]], dtype=torch.float64))
                    .log_prob(ys)) + float(torch.distributions.Normal(0.0, 0.3).log_prob(torch.tensor(r)))
              for r in (0.2, -0.4)]
    assert np.allclose(lp[[0, 2]].numpy(), closed, rtol=1e-6)  # (0.3 is read as float32)
