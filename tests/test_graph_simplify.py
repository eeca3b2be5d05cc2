"""``compiled.drop_constant_selects``: a ``where`` on a constant mask that is all true (all
false) is its first (second) branch, bit for bit, and the recorded log density of a model with
observed labels has no such select left (logistic regression: its labels' support check)."""
import numpy as np
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ppl
from ppl.inference import compiled
from ppl.inference.mh import initial_state
from ppl.inference.potential import build_potential
from ppl.semantics.gfi import ModelRun

torch.set_num_threads(1)
aten = torch.ops.aten


def _graph(fn, *inputs):
    gm = make_fx(fn)(*inputs)
    compiled.fold_constants(gm)
    return gm


def _selects(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.where.self)


def _selects_on_constants(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.where.self
               and n.args[0].op == "get_attr")


def _check(fn, inputs, replaced):
    gm = _graph(fn, *inputs)
    before = gm(*inputs)
    assert compiled.drop_constant_selects(gm) == replaced
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        fresh = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in inputs]
        after, expected = gm(*fresh), fn(*fresh)
        assert all(a.shape == e.shape and a.dtype == e.dtype and torch.equal(a, e) for a, e in zip(after, expected))
    return gm, before


def test_an_all_true_mask_selects_its_first_branch():
    mask = torch.ones(5, dtype=torch.bool)

    def fn(x):
        return (torch.where(mask, x.exp(), torch.full_like(x, -1.0)),)
    gm, _ = _check(fn, [torch.randn(3, 5, dtype=torch.float64)], 1)
    assert _selects(gm) == 0


def test_an_all_false_mask_selects_its_second_branch_broadcast_to_the_selects_shape():
    mask = torch.zeros(3, 5, dtype=torch.bool)

    def fn(x):
        return (torch.where(mask, x.sum(), x.exp()[0]),)  # the kept branch [5]; the select [3, 5]
    gm, _ = _check(fn, [torch.randn(3, 5, dtype=torch.float64)], 1)
    assert _selects(gm) == 0
    assert gm(torch.zeros(3, 5, dtype=torch.float64))[0].shape == (3, 5)


def test_a_mixed_mask_and_a_mask_that_depends_on_the_input_are_kept():
    mixed = torch.tensor([True, False, True, True, True])

    def fn(x):
        return (torch.where(mixed, x, -x), torch.where(x > 0, x, 0.0 * x))
    gm, _ = _check(fn, [torch.randn(3, 5, dtype=torch.float64)], 0)
    assert _selects(gm) == 2


def test_logistic_regressions_recorded_density_keeps_no_select_on_its_labels():
    src = """
def logistic(x, ys):
    alpha ~ normal(0, 2.5)
    beta ~ normal(0, 2.5)
    observe ys ~ bernoulli(logits=alpha + beta * x)
    return alpha
"""
    rng = np.random.default_rng(1)
    x = rng.normal(size=50)
    ys = (rng.random(50) < 1 / (1 + np.exp(0.5 - x))).astype(float)
    m = ppl.model(src)
    d = m.prepare_data({"x": x.tolist(), "ys": ys.tolist()}, "cpu")
    interp = m.interpreter()
    with ppl.api.seeded(0):
        state = initial_state(interp, m.entry, d, 4)
        p = build_potential(ModelRun(interp, m.entry, d), state, traced=True)
    gm = p._recorded[0]
    xs, labels = (torch.as_tensor(d[k]).double() for k in ("x", "ys"))  # (the data as the program holds it)
    assert _selects_on_constants(gm) == 0
    # the graph still computes the interpreter's log density and gradient
    z = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lp, grad = p.value_and_grad(z)[:2]
    logits = z[:, :1] + z[:, 1:] * xs
    exact = (torch.distributions.Normal(0.0, 2.5).log_prob(z).sum(1)
             + torch.distributions.Bernoulli(logits=logits).log_prob(labels).sum(1))
    torch.testing.assert_close(lp, exact, rtol=1e-12, atol=1e-10)
    z.requires_grad_(True)
    logits = z[:, :1] + z[:, 1:] * xs
    (torch.distributions.Normal(0.0, 2.5).log_prob(z).sum()
     + torch.distributions.Bernoulli(logits=logits).log_prob(labels).sum()).backward()
    torch.testing.assert_close(grad, z.grad, rtol=1e-12, atol=1e-10)


def test_record_generates_the_graphs_code_once_and_the_same_code(monkeypatch):
    """``compiled.record``'s passes run on a lazy graph module (its code generated when first
    needed, not at each pass's recompile); the graph returned is a plain GraphModule whose
    code is the one recompiling after every pass gives."""
    import contextlib

    import torch.fx

    data = torch.linspace(-1.0, 1.0, 9, dtype=torch.float64)

    def f(z):
        w = z * 1.0 + 0.0  # (identities the passes drop)
        lp = -0.5 * ((data - w[:, :1]) / w[:, 1:].exp()).square().sum(1)
        return lp, lp.exp() + torch.ones(()).double() * 2.0
    example = (torch.randn(3, 2, dtype=torch.float64),)
    generated = []
    original = torch.fx.graph.Graph.python_code
    monkeypatch.setattr(torch.fx.graph.Graph, "python_code",
                        lambda self, *a, **k: (generated.append(1), original(self, *a, **k))[1])
    lazy = compiled.record(f, example)
    lazy_generations = len(generated)
    monkeypatch.setattr(compiled, "_lazy_code", contextlib.nullcontext)
    generated.clear()
    eager = compiled.record(f, example)
    from torch.fx._lazy_graph_module import _LazyGraphModule
    assert isinstance(lazy, torch.fx.GraphModule) and not isinstance(lazy, _LazyGraphModule)
    assert lazy.code == eager.code
    assert lazy_generations < len(generated)
    for a, b in zip(lazy(*example), eager(*example)):
        assert torch.equal(a, b)
