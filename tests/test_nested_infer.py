"""Nested inference (issue 13, item 1): ``infer(lambda: ..., method=...)`` inside a model is
the marginal distribution of the thunk's return value under the thunk's own conditioning,
usable with ``~``, ``observe``, ``d.prob``/``d.log_prob``/``d.support``/``d.mean``.

Checked against hand computation in exact rationals (RSA scalar implicature, a two-level
goal-inference model), the cost of a depth-k recursive RSA (inner problems solved, counted),
sampling methods inside and outside against the exact answer within replicate-based Monte
Carlo standard errors, and located errors for misuse."""
from __future__ import annotations

import math
import statistics
import warnings
from fractions import Fraction as F

import pytest
import torch

import ppl
from ppl import PPLError, PPLRecursionError, PPLRuntimeError, ZeroEvidenceError
from ppl.semantics import nested
from ppl.semantics.errors import PPLDiagnosticWarning
from ppl.semantics.exact import enumerate_paths

torch.set_num_threads(1)

FILE = "model.ppl"

# ------------------------------------------------------------------------------- RSA
# Scalar implicature: 3 apples, state = how many were eaten (0..3), utterances none/some/all.
MEANING = '''
def meaning(utt, state):
    if utt == "none":
        return state == 0
    if utt == "some":
        return state > 0
    return state == 3

def literal(utt):
    state ~ uniform_draw([0, 1, 2, 3])
    condition meaning(utt, state)
    return state
'''

RSA = MEANING + '''
def speaker(state):
    utt ~ uniform_draw(["none", "some", "all"])
    observe state ~ infer(lambda: literal(utt))
    return utt

def pragmatic(utt):
    state ~ uniform_draw([0, 1, 2, 3])
    observe utt ~ infer(lambda: speaker(state))
    return state
'''

# By hand. L0(s | u) is uniform on the states where u is true:
#   L0(.|none) = {0: 1}, L0(.|some) = {1: 1/3, 2: 1/3, 3: 1/3}, L0(.|all) = {3: 1}.
# S1(u | s) ∝ L0(s | u)^alpha, alpha = 1 (uniform utterance prior, no cost):
#   s=0: none only -> S1(some|0) = 0;  s=1, s=2: some only -> S1(some|s) = 1;
#   s=3: some 1/3, all 1 -> S1(some|3) = (1/3) / (4/3) = 1/4.
# L1(s | some) ∝ P(s) S1(some | s) = 1/4 * (0, 1, 1, 1/4)  ->  (0, 4/9, 4/9, 1/9).
L1_SOME = {1: F(4, 9), 2: F(4, 9), 3: F(1, 9)}
S1_AT_3 = {"some": F(1, 4), "all": F(3, 4)}


def test_rsa_pragmatic_listener_is_exact():
    m = ppl.model(RSA, entry="pragmatic", filename=FILE)
    r = m.run("enumerate", {"utt": "some"})
    assert r.marginal() == L1_SOME
    assert all(type(p) is F for p in r.marginal().values())


def test_rsa_distribution_methods_inside_a_model():
    """d.prob / d.log_prob / d.support / d.mean on the inner distribution, as DSL values."""
    src = RSA + '''
def main():
    S = infer(lambda: speaker(3))
    L = infer(lambda: pragmatic("some"))
    return [S.prob("some"), S.prob("all"), S.prob("none"), L.prob(1), L.mean(), len(S.support()),
            S.log_prob("all")]
'''
    r = ppl.model(src, entry="main").run("enumerate", {})
    ((w, values),) = r.paths
    some, all_, none, l1, mean, n, log_all = values["return"]
    assert (some, all_, none, l1) == (S1_AT_3["some"], S1_AT_3["all"], 0, F(4, 9))
    assert mean == F(4, 9) * 1 + F(4, 9) * 2 + F(1, 9) * 3 and n == 2
    assert log_all == pytest.approx(math.log(3 / 4), rel=1e-15)


def test_rsa_with_mem_and_an_rsa_alpha_factor():
    """The mem formulation (listener/speaker as memoised functions returning infer), and a
    speaker with alpha = 2 written as `factor alpha * L0.log_prob(state)` (floats):
    S1(some|3) = (1/9) / (1/9 + 1) = 1/10, L1(.|some) ∝ (0, 1, 1, 1/10) -> (0, 10/21, 10/21, 1/21)."""
    src = MEANING + '''
def main(utt, alpha):
    L0 = mem(lambda u: infer(lambda: literal(u)))
    S1 = mem(lambda s: infer(lambda: speak(s, L0, alpha)))
    state ~ uniform_draw([0, 1, 2, 3])
    observe utt ~ S1(state)
    return state

def speak(state, L0, alpha):
    utt ~ uniform_draw(["none", "some", "all"])
    factor alpha * L0(utt).log_prob(state)
    return utt
'''
    m = ppl.model(src, entry="main")
    got = m.run("enumerate", {"utt": "some", "alpha": 2}).marginal()
    want = {1: 10 / 21, 2: 10 / 21, 3: 1 / 21}
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-12) for k in want)


# ---------------------------------------------------------------------- goal inference
GOALS = '''
def outcome(action):
    # left reaches the apple with probability 0.9, right with probability 0.3
    got_apple ~ flip(0.9 if action == "left" else 0.3)
    return "apple" if got_apple else "banana"

def act(goal):
    action ~ uniform_draw(["left", "right"])
    condition outcome(action) == goal
    return action

def agent(goal):
    return infer(lambda: act(goal))

def observer(action):
    goal ~ categorical([0.3, 0.7])
    goal_name = ["apple", "banana"][goal]
    observe action ~ agent(goal_name)
    return goal_name
'''


def test_goal_inference_two_levels_exact():
    """Agent: P(a | g) ∝ P(outcome = g | a): apple -> left 0.9, right 0.3 -> (3/4, 1/4);
    banana -> left 0.1, right 0.7 -> (1/8, 7/8). Observer with prior (0.3, 0.7) sees "left":
    apple ∝ 3/10 * 3/4 = 9/40, banana ∝ 7/10 * 1/8 = 7/80 -> (18/25, 7/25)."""
    m = ppl.model(GOALS, entry="observer")
    assert m.run("enumerate", {"action": "left"}).marginal() == {"apple": F(18, 25), "banana": F(7, 25)}
    # "right": apple ∝ 3/10 * 1/4 = 3/40, banana ∝ 7/10 * 7/8 = 49/80 -> (6/55, 49/55)
    assert m.run("enumerate", {"action": "right"}).marginal() == {"apple": F(6, 55), "banana": F(49, 55)}


def test_goal_inference_agent_distribution():
    src = GOALS + '''
def main():
    d = infer(lambda: act("banana"))
    return [d.prob("left"), d.prob("right")]
'''
    ((_, v),) = ppl.model(src, entry="main").run("enumerate", {}).paths
    assert v["return"] == (F(1, 8), F(7, 8))


# ------------------------------------------------------------------- polynomial depth
DEEP = MEANING + '''
def listener(utt, depth):
    if depth == 0:
        return infer(lambda: literal(utt))
    return infer(lambda: pragmatic(utt, depth))

def pragmatic(utt, depth):
    state ~ uniform_draw([0, 1, 2, 3])
    observe utt ~ speaker(state, depth)
    return state

def speaker(state, depth):
    return infer(lambda: speak(state, depth))

def speak(state, depth):
    utt ~ uniform_draw(["none", "some", "all"])
    observe state ~ listener(utt, depth - 1)
    return utt

def main(utt, depth):
    s ~ listener(utt, depth)
    return s
'''


def _deep_run(k):
    m = ppl.model(DEEP, entry="main")
    interp = m.interpreter(exact=True)
    paths = enumerate_paths(m.program, m.builtins(), "main", {"utt": "some", "depth": k}, interp=interp)
    total = sum(w for w, _ in paths)
    return nested.stats(interp)[0], sum(w for w, v in paths if v["return"] == 1) / total


def test_recursive_rsa_is_polynomial_in_depth(monkeypatch):
    """With the cache, each distinct inner problem (literal listener per utterance, speaker
    per (state, depth), pragmatic listener per (utterance, depth)) is solved once: 7 more
    per level. Without it the same model re-solves every nested problem: x12 per level."""
    solved = {k: _deep_run(k) for k in range(1, 6)}
    assert [solved[k][0] for k in range(1, 6)] == [7 * k + 1 for k in range(1, 6)]
    # the depth-k pragmatic listener's P(state=1 | some): 4/9, 10/21, 22/45, 46/93, 94/189
    assert [solved[k][1] for k in range(1, 6)] == [F(4, 9), F(10, 21), F(22, 45), F(46, 93), F(94, 189)]
    monkeypatch.setattr(nested, "CACHE_SIZE", 0)
    uncached = [_deep_run(k) for k in (1, 2)]
    assert [u[1] for u in uncached] == [F(4, 9), F(10, 21)]
    assert uncached[0][0] == 51 and uncached[1][0] == 627  # exponential without the cache


# ------------------------------------------------------ sampling inside and outside
RSA_MEM = MEANING + '''
def main(utt):
    L0 = mem(lambda u: infer(lambda: literal(u)INNER))
    S1 = mem(lambda s: infer(lambda: speaker(s, L0)))
    state ~ uniform_draw([0, 1, 2, 3])
    observe utt ~ S1(state)
    return state

def speaker(state, L0):
    utt ~ uniform_draw(["none", "some", "all"])
    observe state ~ L0(utt)
    return utt
'''


def _replicates(run, R=8):
    """(mean, its Monte Carlo standard error) of P(state = 1) over R seeds."""
    est = [float(run(seed).marginal().get(1, 0.0)) for seed in range(R)]
    return statistics.mean(est), statistics.stdev(est) / math.sqrt(R)


@pytest.mark.parametrize("method", ["importance", "smc"])
def test_outer_sampling_over_exact_inner_agrees_with_exact(method):
    """Particles of the outer run split by their state; each distinct speaker problem is
    solved once (exact), and the outer estimate is an ordinary proper weighting."""
    m = ppl.model(RSA_MEM.replace("INNER", ""), entry="main")
    mean, se = _replicates(lambda s: m.run(method, {"utt": "some"}, particles=500, seed=s))
    assert abs(mean - 4 / 9) < 4 * se


def test_outer_mh_over_exact_inner():
    m = ppl.model(RSA_MEM.replace("INNER", ""), entry="main")
    r = m.run("mh", {"utt": "some"}, chains=8, samples=400, burn_in=100, seed=0)
    p = r.marginal()[1]
    n_eff = min(r.ess, r.n)  # a discrete return value: its ESS, bounded by the draws
    assert abs(p - 4 / 9) < 4 * math.sqrt(4 / 9 * 5 / 9 / n_eff)


@pytest.mark.parametrize("inner", ["importance", "smc"])
def test_inner_sampling_under_exact_outer_is_a_nested_estimate(inner):
    """The inner literal listener by importance/SMC (4,000 particles) under exact
    enumeration outside: a nested Monte Carlo estimate (warned), within 4 replicate
    standard errors of the exact 4/9 (its O(1/N) bias is well below that here)."""
    m = ppl.model(RSA_MEM.replace("INNER", f', method="{inner}", particles=4000'), entry="main")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mean, se = _replicates(lambda s: m.run("enumerate", {"utt": "some"}, seed=s))
    assert any(issubclass(w.category, PPLDiagnosticWarning) and "nested Monte Carlo estimate" in str(w.message)
               for w in caught)
    assert 0 < se < 0.01 and abs(mean - 4 / 9) < 4 * se


def test_inner_and_outer_sampling_together():
    m = ppl.model(RSA_MEM.replace("INNER", ', method="smc", particles=2000'), entry="main")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PPLDiagnosticWarning)
        mean, se = _replicates(lambda s: m.run("importance", {"utt": "some"}, particles=500, seed=s))
    assert abs(mean - 4 / 9) < 4 * se


def test_inner_problem_depends_on_each_particle():
    """x ~ flip: the inner model is different per particle (grouped: solved twice), and
    per-particle distributions from the branches of an `if` join for `~`."""
    src = '''
def inner(k):
    a ~ flip(0.5)
    b ~ flip(0.5)
    condition a or b
    return a and k

def main():
    x ~ flip(0.5)
    d = infer(lambda: inner(x)) if x else infer(lambda: inner(False))
    y ~ d
    observe True ~ d
    return y
'''
    m = ppl.model(src, entry="main")
    assert m.run("enumerate", {}).marginal() == {True: F(2, 3), False: F(1, 3)}
    mean, se = _replicates(lambda s: m.run("importance", {}, particles=400, seed=s))  # (True == 1)
    assert abs(mean - 2 / 3) < 4 * se


# ------------------------------------------------------------------------------ errors
def _run_error(src, kind=PPLError, method="enumerate", data=None, entry="main"):
    m = ppl.model(src, entry=entry, filename=FILE)
    with pytest.raises(kind) as info:
        m.run(method, data or {}, **({} if method == "enumerate" else {"particles": 16, "seed": 0}))
    return str(info.value)


def _points_at(text, line, col, source):
    lines = text.splitlines()
    assert lines[0].startswith(f"{FILE}:{line}:{col}: "), text
    assert lines[1].endswith(source), text
    assert lines[2].index("^") == lines[1].index("|") + 2 + col - 1, text


def test_error_thunk_returns_nothing():
    src = '''
def noisy():
    x ~ flip(0.5)

def main():
    d = infer(lambda: noisy())
    y ~ d
    return y
'''
    for method in ("enumerate", "importance"):
        text = _run_error(src, PPLRuntimeError, method)
        _points_at(text, 6, 9, "    d = infer(lambda: noisy())")
        assert "returned nothing" in text and "hint:" in text


def test_error_zero_evidence_inside_names_the_infer_call():
    src = '''
def impossible():
    x ~ flip(0.5)
    condition x and not x
    return x

def main():
    y ~ infer(lambda: impossible())
    return y
'''
    text = _run_error(src, ZeroEvidenceError)
    _points_at(text, 8, 9, "    y ~ infer(lambda: impossible())")
    assert "inner model has weight zero" in text and "model.ppl:4:5" in text
    text = _run_error(src, ZeroEvidenceError, "importance")
    assert "model.ppl:8:9" in text  # the outer sampling semantics: the same infer call


@pytest.mark.parametrize("call, message, hint", [
    ('infer(lambda: f(), method="enumerat")', "unknown method 'enumerat'", "did you mean 'enumerate'"),
    ('infer(lambda: f(), method="importance", particles=0)', "particles must be a positive integer", None),
    ('infer(lambda: f(), particles=10)', "particles= is for method='importance' or 'smc'", "drop particles="),
    ('infer(lambda: f(), method="smc", max_paths=10)', "max_paths= bounds method='enumerate'", "particles="),
    ('infer(3)', "expects a function of no arguments", "infer(lambda: model())"),
    ('infer(lambda a: f())', "needs a", "bind the arguments in a lambda"),
    ('infer(lambda: flip(0.5))', "returned a distribution", "sample(flip(0.5))"),
])
def test_error_misuse(call, message, hint):
    src = f'''
def f():
    x ~ flip(0.5)
    return x

def main():
    y ~ {call}
    return y
'''
    text = _run_error(src, PPLRuntimeError)
    _points_at(text, 7, 9, f"    y ~ {call}")
    assert message in text
    if hint:
        assert hint in text


MANY = '''
def many():
    n = 0
    for i in range(12):
        b ~ flip(0.5)
        n = n + b
    return n
'''  # 2^12 paths: a thunk over it runs into the bounds below


def test_error_inner_path_bound():
    src = MANY + '''
def main():
    y ~ infer(lambda: many(), max_paths=100)
    return y
'''
    text = _run_error(src, PPLRuntimeError)
    _points_at(text, 10, 9, "    y ~ infer(lambda: many(), max_paths=100)")
    assert "exceeded 100 paths" in text and "max_paths=N" in text


def test_error_unbounded_recursion_through_infer_is_located():
    src = '''
def loop():
    return sample(infer(lambda: loop()))

def main():
    y ~ infer(lambda: loop())
    return y
'''
    m = ppl.model(src, entry="main", filename=FILE, max_depth=60)
    with pytest.raises(PPLRecursionError) as info:
        m.run("enumerate", {})
    assert "recursion deeper than 60 calls" in str(info.value) and f"{FILE}:" in str(info.value)


# ----------------------------------------------------------------------------- example
def test_rsa_example_header_command(monkeypatch):
    """examples/rsa.ppl: the command in its header prints the hand-computed answer."""
    import contextlib
    import io
    import json
    import re
    import shlex
    from pathlib import Path

    from ppl import cli
    root = Path(__file__).resolve().parent.parent
    text = (root / "examples" / "rsa.ppl").read_text()
    assert "Expected answer" in text and "4/9" in text and "9/16" in text
    (cmd,) = re.findall(r"#\s+python -m ppl (run .*)$", text, re.M)
    monkeypatch.chdir(root)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(shlex.split(cmd) + ["--json"]) == 0
    got = json.loads(out.getvalue())
    assert got["evidence"] == "9/16"
    assert got["posterior"]["return"]["probs"] == {"1": 4 / 9, "2": 4 / 9, "3": 1 / 9}


# ------------------------------------------------------------- mem and gradients
def test_outer_memoised_values_are_seen_inside_and_new_ones_drawn_per_path():
    """`strength("a")` drawn outside is the same value inside infer (as WebPPL's mem);
    `strength("b")`, first called inside, is drawn afresh on every inner path:
    d = P(a and b | a) = 0.3 when a, else 0; y ~ d."""
    src = '''
def main():
    strength = mem(lambda p: sample(flip(0.3)))
    a = strength("a")
    d = infer(lambda: strength("a") and strength("b"))
    y ~ d
    return [a, y, d.prob(True)]
'''
    m = ppl.model(src, entry="main")
    want = {(False, False, 0): F(7, 10), (True, False, F(3, 10)): F(21, 100), (True, True, F(3, 10)): F(9, 100)}
    got = m.run("enumerate", {}).marginal()
    assert got.keys() == want.keys() and all(float(got[k]) == pytest.approx(float(v), rel=1e-15)
                                             for k, v in want.items())
    r = m.run("importance", {}, particles=4000, seed=0)
    p = r.marginal()
    n = 4000
    for k, v in want.items():
        got = sum(q for kk, q in p.items() if (kk[0], kk[1]) == (k[0], k[1]))
        assert abs(got - float(v)) < 4 * math.sqrt(float(v) * (1 - float(v)) / n)


def test_gradient_methods_refuse_infer_of_a_continuous_choice():
    src = '''
def inner(mu):
    b ~ flip(0.5)
    condition b or mu > 0
    return b

def main():
    mu ~ normal(0, 1)
    d = infer(lambda: inner(mu))
    observe True ~ d
    return mu
'''
    m = ppl.model(src, entry="main", filename=FILE)
    with pytest.raises(PPLRuntimeError) as info:
        m.run("nuts", {}, samples=5, burn_in=5, seed=0)
    _points_at(str(info.value), 9, 9, "    d = infer(lambda: inner(mu))")
    assert "gradient" in str(info.value) and "use mh, smc" in str(info.value)
    # under importance sampling it runs: d(True) = 1/2 for mu > 0 and 1 for mu <= 0, so
    # E[mu | data] = (-phi(0) + phi(0)/2) / (1/2 + 1/4) = -2 / (3 sqrt(2 pi))
    r = m.run("importance", {}, particles=1000, seed=0)  # (1,000 distinct mu: 1,000 inner problems)
    exact = -2 / (3 * math.sqrt(2 * math.pi))
    assert abs(r.mean() - exact) < 4 * r.sd() / math.sqrt(r.ess)


@pytest.mark.parametrize("method", ["importance", "smc", "mh"])
def test_outer_particles_grouped_each_inner_problem_solved_once(method, monkeypatch):
    """500 outer particles (8 MH chains x 60 steps) with a per-particle state: the speaker's
    problem is solved once per state (4) and the literal listener once per utterance (3)."""
    solved = []
    original = nested._enumerate
    monkeypatch.setattr(nested, "_enumerate", lambda *a, **k: solved.append(1) or original(*a, **k))
    m = ppl.model(RSA_MEM.replace("INNER", ""), entry="main")
    options = {"chains": 8, "samples": 50, "burn_in": 10} if method == "mh" else {"particles": 500}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PPLDiagnosticWarning)  # (MH's short-run R-hat)
        m.run(method, {"utt": "some"}, seed=0, **options)
    assert len(solved) == 7


def test_error_inner_time_bound():
    src = MANY + '''
def main():
    y ~ infer(lambda: many(), max_seconds=0.000001)
    return y
'''
    text = _run_error(src, PPLRuntimeError)
    _points_at(text, 10, 9, "    y ~ infer(lambda: many(), max_seconds=0.000001)")
    assert "ran longer than 1e-06 s" in text and "max_seconds=S" in text
