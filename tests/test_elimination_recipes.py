"""``enumerate`` by elimination without running the program (issue 12, bench (c)).

For a static program whose every statement reads choices only through variables bound
to them (``dependencies.Recipe``), ``exact_elimination._direct_tables`` evaluates each
site's statement on its own for each value of the choices it reads, instead of running
the whole program on covering assignments; the elimination then runs on integer-scaled
tables (``elimination.exact_sum_product``) through a plan made once per structure
(``elimination.EliminationPlan``). The invariant is unchanged: the same Fractions as the
path sum. Checked here: the chain runs the program zero times and evaluates a number of
statements independent of its length; random programs where the recipes apply agree
with paths exactly; programs outside the recipes' reach fall back (a rebound variable,
a call numbered on some paths only); the integer arithmetic and the reusable plan equal
the plain sum-product.
"""
import itertools
import random
from fractions import Fraction as F

import pytest
from hypothesis import HealthCheck, given, settings

import ppl
from ppl.semantics import exact_elimination
from ppl.semantics.elimination import EliminationPlan, Factor, elimination_order, exact_sum_product, sum_product
from ppl.semantics.errors import PPLError
from ppl.testing.strategies import finite_programs

from test_elimination import CHAIN, _same_measure, forward_chain

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def _count_evaluations(monkeypatch) -> list:
    """Patches the recipe evaluator to count its statement evaluations (one entry each)
    and the runs of the program to fail the test."""
    calls = []
    real = exact_elimination._RecipeEvaluator._values

    def counted(self, recipe, assignment):
        calls.append(recipe.kind)
        return real(self, recipe, assignment)

    def no_run(self, assignment):
        raise AssertionError("the program was run")
    monkeypatch.setattr(exact_elimination._RecipeEvaluator, "_values", counted)
    monkeypatch.setattr(exact_elimination._Runner, "_run", no_run)
    return calls


@pytest.mark.parametrize("k", [12, 200])
def test_a_chain_is_tabulated_without_running_the_program(monkeypatch, k):
    """Elimination on the chain runs the program zero times; its k + 3 sites take 7
    statement evaluations whatever k (x; x[0] for each value of x, shared by every
    later x[i]; the observation and the return value for each value of x[k - 1]), and
    the answer is the forward algorithm's."""
    calls = _count_evaluations(monkeypatch)
    r = ppl.model(CHAIN).run("enumerate", {"k": k}, strategy="elimination")
    z, top = forward_chain(k)
    assert r.strategy == "elimination" and r.evidence == z and r.probs()[True] == top / z
    assert sorted(calls) == sorted(["choice"] * 3 + ["observe"] * 2 + ["return"] * 2)


def test_repeated_runs_reuse_the_structure_and_plans_but_evaluate_afresh(monkeypatch):
    """A second ``enumerate`` on the same model and data (strategy "auto") skips the
    analysis and its probe run, and evaluates the statements again (the numbers are not
    kept between runs, only the plans)."""
    m = ppl.model(CHAIN)
    first = m.run("enumerate", {"k": 40})
    calls = _count_evaluations(monkeypatch)
    again = m.run("enumerate", {"k": 40})
    assert again.strategy == first.strategy == "elimination"
    assert again.evidence == first.evidence and again.probs() == first.probs()
    assert len(calls) == 7


def test_random_programs_tabulated_from_recipes_agree_with_paths(monkeypatch):
    """On random finite programs, wherever the recipes give the tables (no program run),
    the measure, every marginal and the path count equal path enumeration's."""
    real = exact_elimination._direct_tables
    direct = []

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        direct.append(out)
        return out
    monkeypatch.setattr(exact_elimination, "_direct_tables", recording)
    agreed = []

    @settings(SETTINGS, max_examples=120)
    @given(finite_programs(factors=False))
    def check(src):
        m = ppl.model(src)
        before = len(direct)
        try:
            ve = m.run("enumerate", strategy="elimination")
        except PPLError as err:
            assert "does not apply" in str(err)
            return
        if len(direct) > before:
            paths = m.run("enumerate", strategy="paths")
            assert _same_measure(ve, paths), src
            agreed.append(src)
    check()
    assert len(agreed) >= 20, f"the recipes gave the tables of only {len(agreed)} programs"


REBOUND = """
def main():
    a ~ flip(0.3)
    b ~ flip(0.6)
    x = a
    if b:
        x = b
    y ~ flip(0.8 if x else 0.1)
    observe y ~ bernoulli(0.75)
    return x
"""


def test_a_variable_rebound_under_a_branch_falls_back_to_covering_runs():
    """``x`` holds ``a`` or ``b`` depending on ``b``: no recipe reads it as one choice,
    so ``y``'s table comes from covering runs; the Fractions are the path sum's."""
    m = ppl.model(REBOUND)
    paths = m.run("enumerate", strategy="paths")
    ve = m.run("enumerate", strategy="elimination")
    assert ve.strategy == "elimination" and _same_measure(ve, paths)
    structure = exact_elimination._cached_structure(m, {}, m.interpreter(exact=True))
    assert "y" not in structure.recipes and "a" in structure.recipes


NUMBERED = """
def g(b):
    if b:
        x ~ flip(0.3)
        return x
    return False

def main():
    c ~ flip(0.5)
    y = g(False) if c else False
    z = g(True)
    w ~ flip(0.9 if z else 0.2)
    return w
"""


def test_a_call_numbered_on_some_paths_only_is_not_eliminated():
    """``g(True)`` is ``g#1`` where c made the first call and ``g`` elsewhere: no single
    address is right, and the covering runs need not meet both (they did not: the
    elimination's site names lacked ``g/x``). Elimination now declines; "auto" gives the
    path enumeration with both names."""
    m = ppl.model(NUMBERED)
    with pytest.raises(PPLError, match="numbered on some paths only"):
        m.run("enumerate", strategy="elimination")
    r = m.run("enumerate")
    assert r.strategy == "paths" and {"g/x", "g#1/x"} <= set(r.names)
    assert r.probs() == {False: F(59, 100), True: F(41, 100)}


def _random_factors(rng: random.Random, weights):
    names = [f"v{i}" for i in range(6)]
    domains = {v: tuple(range(rng.randint(1, 3))) for v in names}
    factors = []
    for _ in range(rng.randint(1, 6)):
        scope = tuple(rng.sample(names, rng.randint(0, 3)))
        table = {key: rng.choice(weights) for key in itertools.product(*(domains[v] for v in scope))
                 if rng.random() < 0.8}
        factors.append(Factor(scope, table))
    used = list(dict.fromkeys(v for f in factors for v in f.vars))
    return factors, domains, used


@pytest.mark.parametrize("weights", [
    [F(1, 3), F(2, 7), F(5, 4), 0, 1, 2],   # exact: integer-scaled arithmetic
    [F(1, 3), 0.25, 1],                     # a float: plain sum-product
])
def test_integer_scaled_sum_product_equals_the_plain_one(weights):
    """``exact_sum_product`` (and an ``EliminationPlan`` run on other tables over the same
    scopes) gives the same tables as ``sum_product``, with the same types (Fractions,
    or floats where a float weight enters)."""
    rng = random.Random(7)
    for _ in range(200):
        factors, domains, used = _random_factors(rng, weights)
        keep = tuple(rng.sample(used, min(len(used), rng.randint(0, 2))))
        order = elimination_order([f.vars for f in factors], last=keep)
        want = sum_product(factors, domains, order, keep)
        got = exact_sum_product(factors, domains, order, keep)
        assert got.vars == want.vars
        assert {k: w for k, w in got.table.items() if w} == {k: w for k, w in want.table.items() if w}
        assert all(type(got.table[k]) is type(w) for k, w in want.table.items() if w and isinstance(w, F))
        plan = EliminationPlan([f.vars for f in factors], order, keep)
        other = [Factor(f.vars, {k: rng.choice(weights) for k in f.table}) for f in factors]
        assert plan.run([f.table for f in other], domains).table == \
            sum_product(other, domains, order, keep).table


def test_an_interpreter_that_rewrites_observations_is_not_bypassed_by_recipes():
    """``observing`` (SBC) wraps the interpreter so that each observe sees a given value;
    the recipes evaluate the program's own statements, so they would ignore it (they did:
    a silent wrong answer). Elimination then tabulates by covering runs, which go through
    the wrapper: the same Fractions as the paths."""
    from ppl.testing.sbc import observing
    m = ppl.model(CHAIN)
    plain = m.run("enumerate", {"k": 6}, strategy="elimination")
    structure = exact_elimination._cached_structure(m, {"k": 6}, m.interpreter(exact=True))
    [site] = [a for a, kind in structure.sites.items() if kind == "likelihood"]
    observed = observing(m, {site: False})
    got = observed.run("enumerate", {"k": 6}, strategy="elimination")
    want = observed.run("enumerate", {"k": 6}, strategy="paths")
    assert got.strategy == "elimination" and got.evidence == want.evidence and got.probs() == want.probs()
    assert got.probs() != plain.probs()


def test_the_return_summary_from_integer_weights_equals_the_paths():
    """The return value's view of an eliminated result is made from the integer weights
    (``EliminationResult.scaled_returns``: one ``Fraction(w, total)`` per value): its
    table, presence, mean, sd, quantiles and type name are the path enumeration's."""
    tuple_return = CHAIN.replace("    return x", "    return (x, 2 if x else 5)")
    str_return = CHAIN.replace("    return x", "    return 'yes' if x else 'no'")
    for src in (CHAIN, tuple_return, str_return):
        m = ppl.model(src)
        ve = m.run("enumerate", {"k": 6}, strategy="elimination")
        paths = m.run("enumerate", {"k": 6}, strategy="paths")
        assert ve._raw.scaled_returns is not None
        assert ve._describe("return") == paths._describe("return"), src
        assert ve._view("return").typename == paths._view("return").typename
        assert type(ve._view("return").presence) is type(paths._view("return").presence)


def test_the_path_bound_is_skipped_only_where_it_exceeds_the_threshold(monkeypatch):
    """``strategy="auto"`` enumerates paths when the probe's path bound is at most the
    threshold; the tables' lower bound (``_Tables.fewest_paths``: each choice's fewest
    values in a row) skips computing it only where even the lower bound exceeds the
    threshold. On random programs the lower bound never exceeds the bound, and on the
    chain the decision flips exactly at 2^(k+1) > 1024."""
    real = exact_elimination._direct_tables
    seen = []

    def recording(*args, **kwargs):
        t = real(*args, **kwargs)
        seen.append((t.fewest_paths, exact_elimination._tables_path_bound(t)))
        return t
    monkeypatch.setattr(exact_elimination, "_direct_tables", recording)

    @settings(SETTINGS, max_examples=60)
    @given(finite_programs(factors=False))
    def check(src):
        try:
            ppl.model(src).run("enumerate", strategy="elimination")
        except PPLError:
            pass
    check()
    assert len(seen) >= 10 and all(1 <= low <= bound for low, bound in seen), seen
    m = ppl.model(CHAIN)
    assert [m.run("enumerate", {"k": k}).strategy for k in (8, 9, 10)] == ["paths", "paths", "elimination"]


def test_the_structure_key_keeps_the_data_types_and_runs_follow_the_data():
    """The cached structure is keyed by the data with their types (1, True and 1.0 are
    three keys; a list its elements'), and runs alternating between data give each its
    own exact answer (the numbers are evaluated afresh every run)."""
    m = ppl.model(CHAIN)
    interp = m.interpreter(exact=True)
    keys = [exact_elimination._structure_key(m, {"k": v}, interp) for v in (1, True, 1.0, 2, [1, 2])]
    assert None not in keys and len(set(keys)) == len(keys)
    assert exact_elimination._structure_key(m, {"k": 12}, interp) == exact_elimination._structure_key(m, {"k": 12}, interp)
    for k in (12, 13, 12, 14, 13):
        r = m.run("enumerate", {"k": k})
        z, top = forward_chain(k)
        assert r.strategy == "elimination" and r.evidence == z and r.probs()[True] == top / z
