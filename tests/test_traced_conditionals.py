"""Conditionals on per-particle values without splitting the particles
(semantics/branchless.py), and what that buys: the change-point model's potential is a
traced graph, its discrete choice moved through that graph (inference/discrete_gibbs.py).

* a branch-free ``a if c else b`` / assign-only ``if``: the same values at every particle
  as the split (bit-identical, random conditions), errors only from rows that take the
  failing branch;
* the potential of a program with a per-chain conditional traces and equals the eager one
  (value and gradient);
* NUTS + MH on the change-point model within MCSE of the closed-form posterior.
"""
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import ppl
from ppl.inference import discrete_gibbs
from ppl.inference.mh import initial_state
from ppl.inference.potential import build_potential
from ppl.semantics import branchless, ir
from ppl.semantics.errors import PPLError, PPLRuntimeError
from ppl.semantics.gfi import ModelRun
from ppl.semantics.interpreter import Interpreter
from ppl.testing.strategies import finite_programs

EXPRESSION = """
def cp(counts):
    n = len(counts)
    tau ~ uniform_draw(range(1, n))
    early ~ exponential(1.0)
    late ~ exponential(1.0)
    for t in range(n):
        rate = early if t < tau else late
        observe counts[t] ~ poisson(rate)
    return tau
"""

STATEMENT = """
def cp(counts):
    n = len(counts)
    tau ~ uniform_draw(range(1, n))
    early ~ exponential(1.0)
    late ~ exponential(1.0)
    for t in range(n):
        if t < tau:
            rate = early
        else:
            rate = late
        observe counts[t] ~ poisson(rate)
    return tau
"""

COUNTS = [4, 5, 4, 1, 0, 4, 3, 4, 1, 0, 1, 1, 0, 0, 2, 1]


@pytest.fixture
def split_only(monkeypatch):
    """Switch the branch-free path off: every conditional splits (the reference)."""
    def off():
        monkeypatch.setattr(Interpreter, "_select_plan", lambda self, node: None)
    return off


def _importance(src, data, n=256, seed=3):
    r = ppl.model(src).run("importance", data, particles=n, seed=seed)
    return r.log_weights.clone(), {k: torch.as_tensor(v).clone() for k, v in r.samples.items()}


MIXED = """
def m(xs):
    k ~ uniform_draw(range(5))
    a ~ normal(0, 1)
    b ~ normal(a, 2)
    v = -a + 2 * b if k < 2 else (b - a if k == 2 else a * 3)
    if k > 1:
        w = v + b
        u = a
    else:
        w = v - 1.5 * a
    z = xs[k] if k < 3 else a
    observe 0.3 ~ normal(v + w + z, 1)
    return [v, w, z]
"""


def test_branch_free_values_are_those_of_the_split(split_only):
    data = {"xs": [0.5, -1.0, 2.0]}
    lw, samples = _importance(MIXED, data)
    split_only()
    lw_ref, samples_ref = _importance(MIXED, data)
    assert torch.equal(lw, lw_ref)
    for k in samples_ref:
        assert torch.equal(samples[k], samples_ref[k]), k


def test_the_change_point_statement_and_expression_forms_agree_with_the_split(split_only):
    runs = [_importance(src, {"counts": COUNTS}) for src in (EXPRESSION, STATEMENT)]
    split_only()
    ref = _importance(EXPRESSION, {"counts": COUNTS})
    for lw, _ in runs:
        assert torch.equal(lw, ref[0])


FAILING = """
def m(xs):
    k ~ uniform_draw(range(LIMIT))
    a ~ normal(0, 1)
    z = xs[k] if k < 3 else a
    observe 0.3 ~ normal(z, 1)
    return z
"""


def test_a_branch_that_fails_only_for_rows_that_do_not_take_it_is_no_error():
    # xs[k] is out of range for k = 3, 4, which take the other branch
    r = ppl.model(FAILING.replace("LIMIT", "5")).run("importance", {"xs": [0.5, -1.0, 2.0]}, particles=64, seed=1)
    assert torch.isfinite(torch.as_tensor(r.log_weights)).all()


def test_a_failing_branch_taken_by_some_rows_raises_the_splits_error(split_only):
    bad = FAILING.replace("k < 3", "k < 4").replace("LIMIT", "5")
    with pytest.raises(PPLRuntimeError) as got:
        ppl.model(bad).run("importance", {"xs": [0.5, -1.0, 2.0]}, particles=64, seed=1)
    split_only()
    with pytest.raises(PPLRuntimeError) as ref:
        ppl.model(bad).run("importance", {"xs": [0.5, -1.0, 2.0]}, particles=64, seed=1)
    assert str(got.value) == str(ref.value) and "index" in str(got.value)


def _expr(src):
    return ppl.model(f"def f(a, b, c, xs):\n    return {src}\n").program.functions[0].body[0].value


@pytest.mark.parametrize("src, safe", [
    ("a if c else b", True), ("a - 2 * b if c else -b", True), ("xs[a] if c else b", True),
    ("1.0 if c else b", False),            # a literal branch is not per-particle: the split decides its type
    ("a * b if c else b", False),          # 0 * inf in a gradient: not select-safe
    ("a / b if c else b", False), ("sqrt(a) if c else b", False), ("log(a) if c else b", False),
])
def test_which_branches_are_select_safe(src, safe):
    e = _expr(src)
    assert isinstance(e, ir.IfExp) and branchless.ifexp_plan(e) is safe


def _potential(src, counts, chains=4, traced="auto", seed=0):
    m = ppl.model(src)
    d = m.prepare_data({"counts": counts}, "cpu")
    interp = m.interpreter()
    with ppl.api.seeded(seed):
        state = initial_state(interp, m.entry, d, chains)
        return build_potential(ModelRun(interp, m.entry, d), state, traced=traced)


@pytest.mark.parametrize("src", [EXPRESSION, STATEMENT], ids=["expression", "statement"])
def test_the_change_point_potential_traces_and_equals_the_eager_one(src):
    traced = _potential(src, COUNTS)
    eager = _potential(src, COUNTS, traced=False)
    assert traced.traced and traced.why_not_traced is None and traced.discrete == ("tau",)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        z = torch.randn(4, 2, generator=g, dtype=torch.float64)
        tau = torch.randint(1, len(COUNTS), (4,), generator=g)
        for p in (traced, eager):
            p.set_given({"tau": tau})
        lp, grad = traced.value_and_grad(z)
        lp_ref, grad_ref = eager.value_and_grad(z)
        assert torch.allclose(lp, lp_ref, rtol=1e-12, atol=1e-12)
        assert torch.allclose(grad, grad_ref, rtol=1e-12, atol=1e-12)


def _closed_form(counts):
    """The exact posterior of tau (uniform on 1..n-1; early, late ~ exponential(1)
    integrated out: Gamma(S + 1) / (L + 1)^(S + 1) per segment) and E[early]."""
    n = len(counts)
    logs = {}
    for tau in range(1, n):
        s1, s2 = sum(counts[:tau]), sum(counts[tau:])
        logs[tau] = (math.lgamma(s1 + 1) - (s1 + 1) * math.log(tau + 1)
                     + math.lgamma(s2 + 1) - (s2 + 1) * math.log(n - tau + 1))
    top = max(logs.values())
    w = {t: math.exp(v - top) for t, v in logs.items()}
    total = sum(w.values())
    p = {t: v / total for t, v in w.items()}
    mean = sum(t * q for t, q in p.items())
    sd = math.sqrt(sum((t - mean) ** 2 * q for t, q in p.items()))
    early = sum(q * (sum(counts[:t]) + 1) / (t + 1) for t, q in p.items())
    return mean, sd, early


def test_nuts_on_the_change_point_model_matches_the_closed_form():
    mean, sd, early = _closed_form(COUNTS)
    r = ppl.model(STATEMENT).run("nuts", {"counts": COUNTS}, particles=4, samples=300, burn_in=150, seed=2,
                                 compile=False)
    assert r.extra["traced"] is True
    tau = torch.as_tensor(r.samples["tau"]).double()
    e = torch.as_tensor(r.samples["early"]).double()
    ess_tau = float(torch.as_tensor(r.ess_per_site["tau"]).min())
    ess_e = float(torch.as_tensor(r.ess_per_site["early"]).min())
    assert abs(float(tau.mean()) - mean) < 4 * sd / math.sqrt(ess_tau)
    assert abs(float(e.mean()) - early) < 4 * float(e.std()) / math.sqrt(ess_e)
    assert abs(float(tau.std()) - sd) < 0.25 * sd


def test_the_discrete_moves_through_the_graph_are_those_of_the_interpreter(monkeypatch):
    """Same seed, same draws: the graph's MH step on tau proposes and accepts as the
    interpreter's regenerate/metropolis does (the same uniforms, the same ratio)."""
    def run():
        return ppl.model(EXPRESSION).run("nuts", {"counts": COUNTS}, particles=2, samples=30, burn_in=30, seed=4,
                                         compile=False)
    used = []
    build = discrete_gibbs.GraphSiteMoves.build.__func__

    def spy(cls, *args):
        moves = build(cls, *args)
        used.append(moves is not None)
        return moves
    monkeypatch.setattr(discrete_gibbs.GraphSiteMoves, "build", classmethod(spy))
    fast = run()
    monkeypatch.setattr(discrete_gibbs.GraphSiteMoves, "build", classmethod(lambda cls, *a: None))
    slow = run()
    assert used == [True]
    assert torch.equal(torch.as_tensor(fast.samples["tau"]), torch.as_tensor(slow.samples["tau"]))
    assert torch.allclose(torch.as_tensor(fast.samples["early"]).double(),
                          torch.as_tensor(slow.samples["early"]).double(), rtol=1e-9, atol=1e-12)



@pytest.mark.parametrize("items, values", [
    ("range(1, 7)", [1, 3, 6, 7, 0, 2]),
    ("[0.1, 0.2, 0.2, 3]", [0.1, 0.2, 3.0, 0.30000001192092896, 0.0, 3.0]),
    ("[1, 2, 2, 5]", [1, 2, 5, 3, 2, 2]),
])
def test_uniform_draw_scores_numbers_with_tensor_ops_as_before(items, values, monkeypatch):
    """uniform_draw over numbers scores a per-particle value without a Python read (what lets
    the change-point model trace), with the numbers of the item-by-item comparison."""
    from ppl.semantics.dist_values import DistValue
    from ppl.semantics.gfi import Choices, generate
    m = ppl.model(f"def m():\n    k ~ uniform_draw({items})\n    return k\n")
    run = ModelRun(m.interpreter(), m.entry, {})
    k = torch.tensor(values)
    choices = Choices({"k": k}, {"k": torch.ones(len(values), dtype=torch.bool)})
    tensor_path = DistValue._log_prob_number_items
    used = []
    monkeypatch.setattr(DistValue, "_log_prob_number_items",
                        lambda self, v, ctx: used.append(tensor_path(self, v, ctx)) or used[-1])
    fast = generate(run, choices)[0].log_joint
    assert used and used[-1] is not None
    monkeypatch.setattr(DistValue, "_log_prob_number_items", lambda self, v, ctx: None)
    slow = generate(run, choices)[0].log_joint
    assert torch.equal(fast, slow) and bool(torch.isinf(fast).any()) and bool(torch.isfinite(fast).any())


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(finite_programs(max_statements=6, max_depth=2))
def test_generated_programs_give_the_splits_values(src):
    """Random finite programs (int conditionals ``a if b else c``, ifs that assign, loops):
    importance sampling with and without the branch-free path, same seed: the same samples
    and log weights bit for bit, or the same error."""
    def run():
        try:
            r = ppl.model(src).run("importance", {}, particles=48, seed=7)
        except PPLError as err:
            return str(err)
        return r.log_weights.clone(), {k: torch.as_tensor(v).clone() for k, v in r.samples.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = run()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Interpreter, "_select_plan", lambda self, node: None)
            slow = run()
    if isinstance(slow, str):
        assert fast == slow
        return
    assert torch.equal(fast[0], slow[0])
    assert fast[1].keys() == slow[1].keys()
    for k in slow[1]:
        assert torch.equal(fast[1][k], slow[1][k]), k
