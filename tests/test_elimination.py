"""Variable elimination (``semantics.elimination``) and ``enumerate`` by dynamic
programming (``semantics.exact_elimination``), issue 12 items 5 and 7.

The transformation's invariant: the measure on return values (and Z) computed by
elimination equals the path sum of path enumeration, as IDENTICAL Fractions. Checked on
random factor tables against the brute-force sum, and on random finite programs against
``enumerate`` with ``strategy="paths"``; a broken elimination (a prior factor forgotten,
a condition dropped) is caught by the same comparison. A chain of k binary choices takes
time linear in k (k = 16 well under a second, where paths take ~40 s).
"""
import itertools
import math
import random
import sys
import time
from fractions import Fraction as F

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ppl
from ppl.result import EliminatedResult, ExactResult
from ppl.semantics import exact_elimination
from ppl.semantics.elimination import (BucketTree, Factor, elimination_order, induced_width, interaction_graph,
                                       sum_product)
from ppl.semantics.errors import PPLError
from ppl.testing.strategies import finite_programs

sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))

CHAIN = """
def chain(k):
    x ~ flip(1/2)
    for i in range(k):
        x ~ flip(0.9 if x else 0.2)
    observe x ~ bernoulli(0.7)
    return x
"""


def forward_chain(k):
    """The chain's (Z, P(return = True) * Z) by the forward algorithm in Fractions."""
    a = {False: F(1, 2), True: F(1, 2)}
    for _ in range(k):
        a = {v: sum(a[u] * (F(9, 10) if u else F(2, 10)) ** v * (1 - (F(9, 10) if u else F(2, 10))) ** (1 - v)
                    for u in a) for v in (False, True)}
    a = {False: a[False] * F(3, 10), True: a[True] * F(7, 10)}
    return a[False] + a[True], a[True]


# ------------------------------------------------------------------------ orders and tables
def test_chain_order_has_induced_width_one():
    scopes = [("x0",)] + [(f"x{i}", f"x{i + 1}") for i in range(30)]
    for heuristic in ("min_fill", "min_degree"):
        order = elimination_order(scopes, heuristic=heuristic)
        assert sorted(order) == sorted(interaction_graph(scopes).nodes)
        assert induced_width(scopes, order) == 1
    assert elimination_order(scopes, last=["x7", "x3"])[-2:] == ["x7", "x3"]


@st.composite
def factor_sets(draw):
    n = draw(st.integers(1, 5))
    domains = {f"v{i}": tuple(range(draw(st.integers(1, 3)))) for i in range(n)}
    factors = []
    for _ in range(draw(st.integers(1, 6))):
        scope = tuple(draw(st.lists(st.sampled_from(sorted(domains)), max_size=3, unique=True)))
        table = {key: F(draw(st.integers(0, 4)), draw(st.integers(1, 5)))
                 for key in itertools.product(*(domains[v] for v in scope))}
        factors.append(Factor(scope, table))
    keep = tuple(draw(st.lists(st.sampled_from(sorted(domains)), max_size=2, unique=True)))
    return domains, factors, keep


def brute_force(domains, factors, keep):
    """The sum over the variables the factors mention (and ``keep``'s) of their product."""
    names = sorted({v for f in factors for v in f.vars} | set(keep))
    out = {}
    for values in itertools.product(*(domains[v] for v in names)):
        x = dict(zip(names, values))
        w = math.prod((f.table.get(tuple(x[v] for v in f.vars), 0) for f in factors), start=F(1))
        key = tuple(x[v] for v in keep)
        out[key] = out.get(key, 0) + w
    return {k: w for k, w in out.items() if w != 0}


@SETTINGS
@given(factor_sets(), st.sampled_from(["min_fill", "min_degree"]))
def test_sum_product_equals_the_brute_force_sum(case, heuristic):
    domains, factors, keep = case
    order = elimination_order([f.vars for f in factors], last=keep, heuristic=heuristic)
    got = sum_product(factors, domains, order, keep)
    assert got.vars == keep
    assert {k: w for k, w in got.table.items() if w != 0} == brute_force(domains, factors, keep)
    tree = BucketTree(factors, domains, elimination_order([f.vars for f in factors]))
    z = sum(brute_force(domains, factors, ()).values())
    assert tree.total == z
    if z:
        for v in tree.order:
            want = {k: w / z for k, w in brute_force(domains, factors, (v,)).items()}
            assert {k: p for k, p in tree.marginal([v]).items() if p != 0} == want


# ------------------------------------------------------------------ programs: paths vs VE
def _both(src, data=None):
    """(elimination result or None where it does not apply, path result)."""
    m = ppl.model(src)
    paths = m.run("enumerate", data or {}, strategy="paths")
    try:
        ve = m.run("enumerate", data or {}, strategy="elimination")
    except PPLError as err:
        assert "does not apply" in str(err)
        return None, paths
    assert isinstance(ve, EliminatedResult) and ve.strategy == "elimination"
    return ve, paths


def _same_measure(ve, paths) -> bool:
    if ve.evidence != paths.evidence or type(ve.evidence) is not type(paths.evidence):
        return False
    if ve.probs() != paths.probs() or ve.n != paths.n or set(ve.names) != set(paths.names):
        return False
    return all(ve.marginal(name) == paths.marginal(name) for name in paths.names)


def test_random_finite_programs_give_identical_fractions():
    applied = []

    @SETTINGS
    @given(finite_programs(factors=False))
    def check(src):
        ve, paths = _both(src)
        if ve is not None:
            applied.append(src)
            assert isinstance(ve.evidence, F)
            assert _same_measure(ve, paths), src
    check()
    assert len(applied) >= 30, f"elimination applied to only {len(applied)} of 40 programs"


def test_random_finite_programs_with_factors_agree():
    applied = []

    @settings(SETTINGS, max_examples=25)
    @given(finite_programs())
    def check(src):
        ve, paths = _both(src)
        if ve is None:
            return
        applied.append(src)
        if isinstance(paths.evidence, F):
            assert _same_measure(ve, paths), src
        else:
            assert math.isclose(ve.evidence, paths.evidence, rel_tol=1e-12)
            want = paths.probs()
            got = ve.probs()
            assert set(got) == set(want) and all(math.isclose(got[v], want[v], rel_tol=1e-9) for v in want), src
    check()
    assert len(applied) >= 5


def _broken(drop, changed):
    """``_factors`` with the factors ``drop`` selects replaced by ones (forgotten);
    ``changed`` gets True when that altered a table."""
    right = exact_elimination._factors

    def factors(t, parents):
        out = []
        for a, f in zip(t.order, right(t, parents)):
            if drop(t, a):
                ones = Factor(f.vars, dict.fromkeys(itertools.product(*(t.domains[v] for v in f.vars)), 1))
                changed.append(ones != f)
                f = ones
            out.append(f)
        return out
    return factors


@pytest.mark.parametrize("what, drop", [
    ("a choice's prior", lambda t, a: t.kinds[a] == "choice"),
    ("the likelihood sites (conditions, observations)", lambda t, a: t.kinds[a] == "likelihood"),
])
def test_a_broken_elimination_is_caught(monkeypatch, what, drop):
    """Forgetting factors is caught by the comparison with the paths wherever it changed
    a table (a program without such a factor is the same program under both), or refused
    by the elimination's own checks (a weight on an assignment no run realised)."""
    caught, altered = [], []

    @settings(SETTINGS, max_examples=25)
    @given(finite_programs(factors=False))
    def check(src):
        m = ppl.model(src)
        paths = m.run("enumerate", strategy="paths")
        changed = []
        with monkeypatch.context() as mp:
            mp.setattr(exact_elimination, "_factors", _broken(drop, changed))
            try:
                ve = m.run("enumerate", strategy="elimination")
            except PPLError as err:
                if "never run" not in str(err):
                    return  # elimination does not apply to this program at all
                ve = None
        if any(changed):
            altered.append(src)
            if ve is None or not _same_measure(ve, paths):
                caught.append(src)
    check()
    assert len(altered) >= 3 and len(caught) >= 0.9 * len(altered), \
        f"{what}: caught {len(caught)} of {len(altered)}"


def test_a_correct_elimination_passes_the_same_comparison():
    src = CHAIN
    ve, paths = _both(src, {"k": 6})
    assert _same_measure(ve, paths)


# --------------------------------------------------------------------------------- chains
def test_chain_of_16_is_fast_and_exact():
    m = ppl.model(CHAIN)
    start = time.perf_counter()
    r = m.run("enumerate", {"k": 16})
    took = time.perf_counter() - start
    assert isinstance(r, EliminatedResult) and r.strategy == "elimination"
    z, true_mass = forward_chain(16)
    assert r.evidence == z and r.probs() == {True: true_mass / z, False: 1 - true_mass / z}
    assert r.n == 2 ** 17
    assert took < 1.0, f"{took:.2f} s"


def test_chain_of_200_matches_the_forward_algorithm():
    r = ppl.model(CHAIN).run("enumerate", {"k": 200})
    z, true_mass = forward_chain(200)
    assert r.evidence == z and r.probs()[True] == true_mass / z
    assert r.marginal("x[199]")[True] == true_mass / z  # the returned x is the last choice


def test_small_programs_keep_the_path_form():
    r = ppl.model(CHAIN).run("enumerate", {"k": 3})
    assert type(r) is ExactResult and r.strategy == "paths" and len(r.paths) == 16


def test_a_tree_shaped_model():
    src = """
def tree(depth):
    root ~ flip(0.3)
    level = [root]
    for d in range(depth):
        nxt = []
        for j in range(len(level) * 2):
            c ~ flip(0.8 if level[j // 2] else 0.1)
            nxt = append(nxt, c)
        level = nxt
    observe level[0] ~ bernoulli(0.9)
    return root
"""
    ve, paths = _both(src, {"depth": 2})  # 7 binary choices
    assert ve is not None and _same_measure(ve, paths)
    start = time.perf_counter()
    big = ppl.model(src).run("enumerate", {"depth": 6})  # 127 binary choices: 2^127 paths
    assert big.strategy == "elimination" and big.n == 2 ** 127 and time.perf_counter() - start < 2.0
    # the root's posterior: only the first leaf is observed, through its chain of ancestors
    prior = {True: F(3, 10), False: F(7, 10)}
    down = {True: F(8, 10), False: F(1, 10)}  # P(child | parent)

    def p_leaf_true(root, depth):
        p = F(1) if root else F(0)
        for _ in range(depth):
            p = p * down[True] + (1 - p) * down[False]
        return p
    like = {r: p_leaf_true(r, 6) * F(9, 10) + (1 - p_leaf_true(r, 6)) * F(1, 10) for r in (True, False)}
    z = sum(prior[r] * like[r] for r in (True, False))
    assert big.evidence == z and big.probs()[True] == prior[True] * like[True] / z


def test_sites_on_some_paths_only_are_eliminated_too():
    """A choice or an observation under a branch on a random value exists where its
    parents (which include the branch's condition) say so: ABSENT is one more value."""
    src = """
def m(k):
    a ~ flip(0.3)
    b = False
    if a:
        b ~ flip(0.6)
        observe b ~ bernoulli(0.8)
    else:
        observe True ~ bernoulli(0.25)
    for i in range(k):
        c ~ flip(0.5)
    if b:
        return 2
    return 1 if a else 0
"""
    ve, paths = _both(src, {"k": 3})
    assert ve is not None and _same_measure(ve, paths)
    assert ve.presence("b") == paths.presence("b") < 1


def _fallback(src, data=None):
    m = ppl.model(src)
    r = m.run("enumerate", data or {})
    assert type(r) is ExactResult and r.strategy == "paths"
    with pytest.raises(PPLError, match="does not apply"):
        m.run("enumerate", data or {}, strategy="elimination")
    return r


def test_undecided_structure_falls_back_to_paths(monkeypatch):
    monkeypatch.setattr(exact_elimination, "DEFAULT_PATH_THRESHOLD", 1)  # auto would eliminate if it could
    r = _fallback("""
def m():
    n ~ categorical([1, 1, 1])
    s = 0
    for i in range(n):
        c ~ flip(0.5)
        s = s + c
    return s
""")  # a loop bound that is random: the analysis falls back to traces
    assert r.probs()[0] == F(1, 3) + F(1, 3) * F(1, 2) + F(1, 3) * F(1, 4)


def test_memoised_site_on_some_paths_only_falls_back(monkeypatch):
    """Whether a memoised choice exists depends on every call of the memoised function,
    not only on its parents: not tabulated."""
    monkeypatch.setattr(exact_elimination, "DEFAULT_PATH_THRESHOLD", 1)
    r = _fallback("""
def m():
    f = mem(lambda i: sample(flip(0.5)))
    a ~ flip(0.5)
    x = f(1) if a else False
    return x
""")
    assert r.probs()[True] == F(1, 4) and r.presence("f(1)/sample") == F(1, 2)


def test_strategy_is_an_option_checked_like_the_others():
    with pytest.raises(PPLError, match="strategy"):
        ppl.model(CHAIN).run("enumerate", {"k": 2}, strategy="dp")


def test_values_equal_as_keys_keep_their_types():
    """True and 1 are equal dict keys; a choice's value keeps its own type in the runs."""
    src = """
def m(k):
    a ~ categorical([1, 1])
    b ~ flip(0.5)
    for i in range(k):
        c ~ flip(0.5)
    return str(a) + str(b)
"""
    ve, paths = _both(src, {"k": 2})
    assert ve is not None and ve.probs() == paths.probs() == {"0False": F(1, 4), "0True": F(1, 4),
                                                              "1False": F(1, 4), "1True": F(1, 4)}


def test_addresses_numbered_differently_on_different_paths_are_not_confused():
    """`v1 ~` three times, once under a branch that returns early: at run time the later
    `v1 ~` statements get `v1#1`/`v1#2` on one path, while the analysis numbers them after
    the branch's one. Tabulating them under the analysis' parents would read the wrong
    statement's parents (a silent wrong answer found by a random program): the runs check
    that every address is the statement the analysis describes, so elimination declines or
    agrees with the paths."""
    src = """
def model():
    v1 ~ binomial(2, 2/3)
    if ((1 if (v1 > 1) else 0) == v1):
        v2 ~ uniform_draw([0, 2])
    else:
        v1 ~ categorical([1, 0])
        return (v1 > 0)
    v1 ~ categorical([0, 0, 1])
    v1 ~ categorical([2, 3, 1])
    observe (1) % 3 ~ binomial(2, (0.25 if (1 < v1) else 0.75))
    v3 ~ binomial(1, 0.6)
    observe (v3 > min(v1, v3)) ~ bernoulli(2/3)
    return (v3 > 0)
"""
    ve, paths = _both(src)
    assert ve is None or _same_measure(ve, paths)
    assert paths.probs()[True] != 0


def test_larger_random_programs_give_identical_fractions():
    applied = []

    @settings(SETTINGS, max_examples=30)
    @given(finite_programs(factors=False, max_statements=14))
    def check(src):
        ve, paths = _both(src)
        if ve is not None:
            applied.append(src)
            assert _same_measure(ve, paths) and all(ve.presence(n) == paths.presence(n) for n in paths.names), src
    check()
    assert len(applied) >= 20


def _measure(result) -> dict:
    """The unnormalised measure on return values of an enumerate result."""
    return {v: p * result.evidence for v, p in result.probs().items()}


def test_the_exact_checker_compares_elimination_with_the_path_sum(monkeypatch):
    """Item 7 with the exact checker's comparison (``TransformCheck``): the measure on
    return values by elimination equals the path sum (``exact_measure``) exactly; with a
    choice's prior forgotten, or a condition dropped, it does not."""
    from ppl.testing.validity import TransformCheck, exact_measure
    src = CHAIN.replace("    return x", "    condition x or y\n    return x").replace(
        "    x ~ flip(1/2)", "    x ~ flip(1/2)\n    y ~ flip(1/3)")
    m = ppl.model(src)
    truth = exact_measure(m, {"k": 5})  # 2^7 paths: enumerated one by one
    check = TransformCheck(truth, _measure(m.run("enumerate", {"k": 5}, strategy="elimination")))
    assert check.exact and check.ok(), str(check)
    for drop in (lambda t, a: t.kinds[a] == "choice", lambda t, a: a.startswith("cond@")):
        with monkeypatch.context() as mp:
            mp.setattr(exact_elimination, "_factors", _broken(drop, []))
            broken = TransformCheck(truth, _measure(m.run("enumerate", {"k": 5}, strategy="elimination")))
        assert not broken.ok(), str(broken)


# ------------------------------------------------------------- tug-of-war (memoised sites)
TUG = """
def tug(matches):
    strength = mem(lambda person: sample(uniform_draw([1, 2, 3])))
    lazy = mem(lambda person, match: sample(flip(0.25)))

    def pulling(person, match):
        return strength(person) / 2 if lazy(person, match) else strength(person)

    def team_pulling(team, match):
        return sum(map(lambda person: pulling(person, match), team))

    for i, match in enumerate(matches):
        winners, losers = match
        condition team_pulling(winners, i) > team_pulling(losers, i)
    return strength("alice")
"""
TUG_MATCHES = [[["alice"], ["bob"]], [["alice"], ["sue"]], [["bob", "sue"], ["tom", "jim"]],
               [["tom", "alice"], ["jim", "bob"]]]  # examples/tug_of_war.json


def tug_by_hand(matches) -> dict:
    """{alice's strength: posterior probability}: the sum over strengths of the product
    over matches of P(the winners pull harder | strengths), each by summing its members'
    laziness (independent per person and match)."""
    people = sorted({p for match in matches for team in match for p in team})
    out = {}
    for strengths in itertools.product((1, 2, 3), repeat=len(people)):
        s = dict(zip(people, strengths))
        w = F(1, 3) ** len(people)
        for winners, losers in matches:
            members = winners + losers
            won = 0
            for lazy in itertools.product((False, True), repeat=len(members)):
                p = math.prod(F(1, 4) if z else F(3, 4) for z in lazy)
                pull = [F(s[m], 2) if z else s[m] for m, z in zip(members, lazy)]
                if sum(pull[:len(winners)]) > sum(pull[len(winners):]):
                    won += p
            w *= won
        out[s["alice"]] = out.get(s["alice"], 0) + w
    z = sum(out.values())
    return {k: v / z for k, v in out.items() if v}


def test_tug_of_war_is_eliminated_with_the_paths_fractions():
    """A memoised strength called on both branches of `x if lazy else y` exists on every
    path: elimination applies and gives the path sum's Fractions (3,456 paths here)."""
    matches = [[["alice"], ["bob"]], [["alice"], ["sue"]], [["bob", "sue"], ["alice"]]]
    ve, paths = _both(TUG, {"matches": matches})
    assert ve is not None and _same_measure(ve, paths)
    assert ve.probs() == tug_by_hand(matches)


def test_tug_of_war_on_the_examples_matches_is_eliminated_quickly():
    """examples/tug_of_war.json's matches with discrete strengths: 3^5 * 2^12 paths (~287 s
    by paths); by elimination ~4 s (1,296 covering runs: the last match's condition has 8
    parents), equal to the hand-written sum."""
    r = ppl.model(TUG).run("enumerate", {"matches": TUG_MATCHES})
    assert r.strategy == "elimination"  # (auto chose it: no path was enumerated)
    assert r.probs() == tug_by_hand(TUG_MATCHES)


def test_the_analysis_is_reused_for_the_same_model_and_data_only(monkeypatch):
    """Repeated ``enumerate`` runs on the same model and plain data skip the dependency
    analysis; other data (or data that is not plain Python) is analysed afresh."""
    calls = []
    real = exact_elimination.structure_of
    monkeypatch.setattr(exact_elimination, "structure_of", lambda *a: calls.append(a[1]) or real(*a))
    m = ppl.model(CHAIN)
    for k in (12, 12, 13, 12):
        r = m.run("enumerate", {"k": k})
        z, top = forward_chain(k)
        assert r.strategy == "elimination" and r.evidence == z and r.probs()[True] == top / z
    assert calls == [{"k": 12}, {"k": 13}]
    m2 = ppl.model(CHAIN)  # another model (the same source): its own analysis
    m2.run("enumerate", {"k": 12})
    assert len(calls) == 3
    assert exact_elimination._structure_key(m, {"k": torch.tensor(3)}, m.interpreter(exact=True)) is None
