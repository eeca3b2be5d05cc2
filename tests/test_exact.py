"""The exact semantics: enumeration against posteriors computed by hand.

Each test states a small discrete model, works its posterior out on paper (the numbers
in the test are those hand computations, in ``Fraction`` arithmetic), and checks that
``Model.run("enumerate")`` gives exactly that: the same ``Fraction`` probabilities,
the same evidence, and the same set of random-choice addresses where that matters.
"""
import math
from fractions import Fraction as F
from itertools import product

import pytest
import torch

import ppl
from ppl import InfiniteSupportError, ZeroEvidenceError

torch.set_num_threads(1)


def enum(src, **data):
    return ppl.model(src).run("enumerate", data)


def assert_exact_table(got: dict, want: dict):
    """Equal tables, every probability a Fraction (no float sneaking in)."""
    assert got == want
    for k, p in got.items():
        assert isinstance(p, F), (k, p)


# ------------------------------------------------------------------------------ classics
def test_two_coins_condition_or():
    r = enum("""
def two():
    a ~ flip(0.5)
    b ~ flip(0.5)
    condition a or b
    return (a, b)
""")
    # the three surviving outcomes are equally likely
    assert_exact_table(r.probs(), {(False, True): F(1, 3), (True, False): F(1, 3), (True, True): F(1, 3)})
    assert_exact_table(r.probs("a"), {False: F(1, 3), True: F(2, 3)})
    assert_exact_table(r.probs("b"), {False: F(1, 3), True: F(2, 3)})
    assert r.evidence == F(3, 4) and isinstance(r.evidence, F)
    assert r.log_evidence == pytest.approx(math.log(3 / 4), rel=1e-15)
    assert r.mean("a") == F(2, 3)
    assert r.n == 3  # the path (False, False) is cut by the condition


MEDICAL = """
def diagnosis(positive):
    disease ~ flip(0.01)
    observe positive ~ bernoulli(0.95 if disease else 0.08)
    return disease
"""


def test_medical_diagnosis():
    r = enum(MEDICAL, positive=True)
    # P(+) = 0.01 * 0.95 + 0.99 * 0.08 = 0.0095 + 0.0792 = 0.0887
    assert r.evidence == F(887, 10000)
    assert_exact_table(r.probs(), {False: F(792, 887), True: F(95, 887)})
    r = enum(MEDICAL, positive=False)
    # P(-) = 0.01 * 0.05 + 0.99 * 0.92 = 0.0005 + 0.9108
    assert r.evidence == F(9113, 10000)
    assert r.probs()[True] == F(5, 9113)


def test_medical_diagnosis_with_condition_equals_observe():
    r = enum("""
def diagnosis():
    disease ~ flip(0.01)
    test ~ flip(0.95 if disease else 0.08)
    condition test
    return disease
""")
    assert r.probs()[True] == F(95, 887)
    assert r.evidence == F(887, 10000)


def test_fair_or_trick_coin():
    r = enum("""
def coin(flips):
    trick ~ flip(0.1)
    p = 0.9 if trick else 0.5
    for f in flips:
        observe f ~ bernoulli(p)
    nxt ~ flip(p)
    return trick
""", flips=[1, 1, 0, 1, 1])
    # L(trick) = 0.9^4 * 0.1 = 6561/100000, L(fair) = 1/32
    # joint: 1/10 * 6561/100000 = 6561/10^6 ; 9/10 * 1/32 = 28125/10^6
    assert r.evidence == F(34686, 10**6)
    post = F(6561, 34686)
    assert post == F(729, 3854)
    assert_exact_table(r.probs(), {False: 1 - post, True: post})
    # predictive of the next flip: 0.9 post + 0.5 (1 - post)
    assert r.probs("nxt")[True] == F(9, 10) * post + F(1, 2) * (1 - post)


def test_observing_a_list_is_independent_observations():
    loop = enum("""
def coin(flips):
    p ~ uniform_draw([0.25, 0.5, 0.75])
    for f in flips:
        observe f ~ bernoulli(p)
    return p
""", flips=[1, 0, 1, 1])
    vector = enum("""
def coin(flips):
    p ~ uniform_draw([0.25, 0.5, 0.75])
    observe flips ~ bernoulli(p)
    return p
""", flips=[1, 0, 1, 1])
    # p^3 (1 - p): 3/256, 16/256, 27/256
    assert_exact_table(vector.probs(), {F(1, 4): F(3, 46), F(1, 2): F(8, 23), F(3, 4): F(27, 46)})
    assert vector.probs() == loop.probs() and vector.evidence == loop.evidence == F(1, 3) * F(46, 256)
    r = enum("""
def m():
    a ~ flip(0.5)
    observe [1, 0] ~ bernoulli([0.9, 0.1] if a else [0.5, 0.5])
    observe [2] ~ binomial([2], 0.5)
    return a
""")
    # 0.81 vs 0.25, times 1/4 for the binomial either way
    assert_exact_table(r.probs(), {False: F(25, 106), True: F(81, 106)})
    assert r.evidence == F(1, 2) * (F(81, 100) + F(1, 4)) * F(1, 4)


def test_bool_data_and_int_data_agree():
    m = ppl.model(MEDICAL)
    a = m.run("enumerate", {"positive": True})
    b = m.run("enumerate", {"positive": 1})
    assert a.probs() == b.probs() and a.evidence == b.evidence


# ---------------------------------------------------------------------------- recursion
GEO = """
def geo(p, depth):
    b ~ flip(p)
    if b or depth == 0:
        return 0
    return 1 + geo(p, depth - 1)
"""


def test_recursive_geometric_truncated_by_depth():
    r = enum(GEO, p=F(1, 3), depth=4)
    # P(k) = (2/3)^k (1/3) for k < 4; the depth bound stops at 4 whatever the flip
    want = {k: F(2, 3) ** k * F(1, 3) for k in range(4)}
    want[4] = F(2, 3) ** 4
    assert_exact_table(r.probs(), want)
    assert r.evidence == 1
    # one address per recursion level; level j is reached with probability (2/3)^j
    assert set(r.names) == {"return", "b", "geo/b", "geo/geo/b", "geo/geo/geo/b", "geo/geo/geo/geo/b"}
    assert r.presence("geo/geo/b") == F(4, 9)
    assert r.presence("geo/geo/geo/geo/b") == F(16, 81)
    assert r.mean() == sum(k * p for k, p in want.items())


def test_recursive_geometric_with_literal_probability():
    r = enum(GEO.replace("flip(p)", "flip(0.25)"), p=0, depth=3)
    assert_exact_table(r.probs(), {0: F(1, 4), 1: F(3, 16), 2: F(9, 64), 3: F(27, 64)})


def test_tree_recursion_two_calls_per_frame():
    r = enum("""
def size(d):
    leaf ~ flip(0.5)
    if leaf or d == 0:
        return 1
    return size(d - 1) + size(d - 1)
""", d=2)
    # s(0) = 1; s(1) = 1 w.p. 1/2 else 2; s(2) = 1 w.p. 1/2 else s(1) + s(1)
    s1 = {1: F(1, 2), 2: F(1, 2)}
    s2 = {1: F(1, 2)}
    for (x, p), (y, q) in product(s1.items(), s1.items()):
        s2[x + y] = s2.get(x + y, 0) + F(1, 2) * p * q
    assert_exact_table(r.probs(), s2)
    assert {"size/leaf", "size#1/leaf", "size/size/leaf", "size#1/size#1/leaf"} <= set(r.names)


# ------------------------------------------------------------------------ distributions
def test_categorical_weights_and_probabilities():
    r = enum("""
def m():
    c ~ categorical([1, 2, 3])
    d ~ categorical([0.2, 0.3, 0.5])
    return c
""")
    assert_exact_table(r.probs("c"), {0: F(1, 6), 1: F(1, 3), 2: F(1, 2)})
    assert_exact_table(r.probs("d"), {0: F(1, 5), 1: F(3, 10), 2: F(1, 2)})


def test_uniform_draw_items_and_repeats():
    r = enum("""
def m():
    u ~ uniform_draw(["a", "b", "c"])
    v ~ uniform_draw([1, 1, 2])
    return u
""")
    assert_exact_table(r.probs(), {"a": F(1, 3), "b": F(1, 3), "c": F(1, 3)})
    assert_exact_table(r.probs("v"), {1: F(2, 3), 2: F(1, 3)})


def test_binomial_and_beta_binomial():
    r = enum("""
def m():
    k ~ binomial(3, 0.5)
    j ~ beta_binomial(2, 1, 1)
    h ~ beta_binomial(3, 2, 1)
    g ~ binomial(4, 1 / 3)
    return k
""")
    assert_exact_table(r.probs("k"), {0: F(1, 8), 1: F(3, 8), 2: F(3, 8), 3: F(1, 8)})
    assert_exact_table(r.probs("j"), {0: F(1, 3), 1: F(1, 3), 2: F(1, 3)})  # beta(1,1): uniform
    # C(3,k) B(k+2, 4-k) / B(2,1): 1/10, 2/10, 3/10, 4/10
    assert_exact_table(r.probs("h"), {0: F(1, 10), 1: F(1, 5), 2: F(3, 10), 3: F(2, 5)})
    assert_exact_table(r.probs("g"), {0: F(16, 81), 1: F(32, 81), 2: F(24, 81), 3: F(8, 81), 4: F(1, 81)})


def test_sum_of_independent_choices_is_the_convolution():
    r = enum("""
def m():
    c ~ categorical([1, 2, 3])
    k ~ binomial(3, 0.5)
    j ~ beta_binomial(2, 1, 1)
    return c + k + j
""")
    c = {0: F(1, 6), 1: F(2, 6), 2: F(3, 6)}
    k = {0: F(1, 8), 1: F(3, 8), 2: F(3, 8), 3: F(1, 8)}
    j = {0: F(1, 3), 1: F(1, 3), 2: F(1, 3)}
    want: dict = {}
    for (a, p), (b, q), (d, s) in product(c.items(), k.items(), j.items()):
        want[a + b + d] = want.get(a + b + d, 0) + p * q * s
    assert_exact_table(r.probs(), want)
    assert r.n == 3 * 4 * 3


def test_observe_binomial_over_a_discrete_prior():
    r = enum("""
def m():
    p ~ uniform_draw([0.25, 0.5, 0.75])
    observe 2 ~ binomial(3, p)
    return p
""")
    # L(p) = 3 p^2 (1 - p): 9/64, 24/64, 27/64
    assert r.evidence == F(1, 3) * F(60, 64)
    assert_exact_table(r.probs(), {F(1, 4): F(3, 20), F(1, 2): F(2, 5), F(3, 4): F(9, 20)})


def test_observe_categorical_and_out_of_support_value():
    r = enum("""
def m(y):
    z ~ flip(0.5)
    observe y ~ categorical([1, 1, 2] if z else [2, 1, 1])
    return z
""", y=2)
    assert_exact_table(r.probs(), {False: F(1, 3), True: F(2, 3)})
    assert r.evidence == F(1, 2) * F(1, 2) + F(1, 2) * F(1, 4)
    with pytest.raises(ZeroEvidenceError):
        enum("""
def m(y):
    z ~ flip(0.5)
    observe y ~ categorical([1, 1, 2] if z else [2, 1, 1])
    return z
""", y=3)


# ------------------------------------------------------------------------------- factor
def test_factor_zero_keeps_exactness_and_minus_inf_cuts():
    r = enum("""
def m():
    x ~ flip(0.25)
    factor 0
    factor 0 if x else -inf
    return x
""")
    assert_exact_table(r.probs(), {True: F(1)})
    assert r.evidence == F(1, 4) and isinstance(r.evidence, F)
    assert r.n == 1


def test_factor_float_values_weight_by_exp():
    r = enum("""
def m():
    x ~ flip(0.5)
    factor log(3) if x else 0
    return x
""")
    probs = r.probs()
    assert isinstance(probs[True], float)
    assert probs[True] == pytest.approx(3 / 4, rel=1e-12)
    assert r.evidence == pytest.approx(2.0, rel=1e-12)
    r = enum("""
def m():
    x ~ flip(0.5)
    factor 1.5 if x else -0.5
    return x
""")
    assert r.probs()[True] == pytest.approx(math.exp(1.5) / (math.exp(1.5) + math.exp(-0.5)), rel=1e-12)
    assert r.log_evidence == pytest.approx(math.log((math.exp(1.5) + math.exp(-0.5)) / 2), rel=1e-12)


# ---------------------------------------------------------------------------------- mem
def test_mem_same_argument_is_one_choice():
    r = enum("""
def m():
    c = mem(lambda i: sample(flip(0.3)))
    a = c(1)
    b = c(1)
    d = c(2)
    return [a == b, a and b, a and d]
""")
    # a == b always; P(a and b) = P(a) = 3/10; c(2) is independent: 9/100
    assert r.probs("return") == {(True, False, False): F(7, 10), (True, True, False): F(21, 100),
                                 (True, True, True): F(9, 100)}
    assert sorted(n for n in r.names if n != "return") == ["c(1)/sample", "c(2)/sample"]


def test_mem_of_a_def_versus_no_mem():
    src = """
def coin(i):
    x ~ flip(0.3)
    return x

def m():
    f = MEM
    return f(0) and f(0)
"""
    assert enum(src.replace("MEM", "mem(coin)")).probs()[True] == F(3, 10)
    assert enum(src.replace("MEM", "coin")).probs()[True] == F(9, 100)


def test_mem_with_random_argument():
    r = enum("""
def m():
    f = mem(lambda i: sample(flip(0.5)))
    i ~ categorical([1, 1, 1])
    j ~ categorical([1, 1, 1])
    return f(i) == f(j)
""")
    # same index w.p. 1/3 (then equal); else two independent fair coins agree w.p. 1/2
    assert_exact_table(r.probs(), {False: F(1, 3), True: F(2, 3)})


# ------------------------------------------------------------------ higher-order functions
def test_map_fold_filter_with_random_lambdas():
    r = enum("""
def m():
    xs = map(lambda i: sample(flip(0.25)), range(3))
    n = fold(lambda acc, x: acc + (1 if x else 0), 0, xs)
    ys = filter(lambda x: sample(flip(1 / 3)), [1, 2, 3])
    return (n, sum(ys))
""")
    nd = {k: math.comb(3, k) * F(1, 4) ** k * F(3, 4) ** (3 - k) for k in range(4)}
    sd: dict = {}
    for keep in product([0, 1], repeat=3):
        p = math.prod(F(1, 3) if b else F(2, 3) for b in keep)
        s = sum(v for v, b in zip([1, 2, 3], keep) if b)
        sd[s] = sd.get(s, 0) + p
    want = {(n, s): p * q for (n, p), (s, q) in product(nd.items(), sd.items())}
    assert_exact_table(r.probs(), want)
    assert r.n == 64  # 2^3 maps x 2^3 filters
    assert {"lambda[0]/sample", "lambda[2]/sample"} <= set(r.names)


def test_map_over_data_dependent_probabilities():
    r = enum("""
def m():
    xs = map(lambda p: sample(flip(p)), [0.5, 0.25, 1])
    return xs
""")
    assert_exact_table(r.probs(), {(False, False, True): F(3, 8), (False, True, True): F(1, 8),
                                   (True, False, True): F(3, 8), (True, True, True): F(1, 8)})


# --------------------------------------------------------------------------- control flow
def test_while_loop_with_random_exit_bounded():
    r = enum("""
def m():
    n = 0
    go = True
    while go and n < 3:
        go ~ flip(0.5)
        n = n + 1
    return n
""")
    assert_exact_table(r.probs(), {1: F(1, 2), 2: F(1, 4), 3: F(1, 4)})
    assert set(r.names) == {"go[0]", "go[1]", "go[2]", "return"}
    assert r.presence("go[2]") == F(1, 4)


def test_while_loop_random_walk():
    r = enum("""
def m():
    x = 0
    steps = 0
    while x < 2 and x > -2 and steps < 4:
        s ~ flip(0.75)
        x = x + (1 if s else -1)
        steps = steps + 1
    return (x, steps)
""")
    # paths: ++ (9/16), +- then ++ / +- ... enumerate by hand over 4 steps, stopping at |x| = 2
    want: dict = {}

    def walk(x, steps, p):
        if not (-2 < x < 2 and steps < 4):
            want[(x, steps)] = want.get((x, steps), 0) + p
            return
        walk(x + 1, steps + 1, p * F(3, 4))
        walk(x - 1, steps + 1, p * F(1, 4))
    walk(0, 0, F(1))
    assert_exact_table(r.probs(), want)
    assert want[(2, 2)] == F(9, 16)


def test_branches_assign_different_variables_and_return_early():
    r = enum("""
def m():
    a ~ flip(0.5)
    if a:
        x ~ flip(0.25)
        y = 1
    else:
        z ~ categorical([1, 1, 1])
        return z + 10
    return y + (1 if x else 0)
""")
    assert_exact_table(r.probs(), {1: F(3, 8), 2: F(1, 8), 10: F(1, 6), 11: F(1, 6), 12: F(1, 6)})
    assert r.presence("x") == F(1, 2) and r.presence("z") == F(1, 2)
    assert_exact_table(r.probs("x"), {False: F(3, 4), True: F(1, 4)})  # conditional on existing


def test_variable_defined_on_one_path_read_under_short_circuit():
    r = enum("""
def m():
    a ~ flip(0.5)
    if a:
        x = 1
        y ~ flip(0.5)
    else:
        x = 2
    return x + (1 if a and y else 0)
""")
    assert_exact_table(r.probs(), {1: F(1, 4), 2: F(3, 4)})


def test_early_return_inside_a_loop():
    r = enum("""
def first_heads(n):
    for i in range(n):
        c ~ flip(0.5)
        if c:
            return i
    return -1
""", n=3)
    assert_exact_table(r.probs(), {-1: F(1, 8), 0: F(1, 2), 1: F(1, 4), 2: F(1, 8)})
    assert r.presence("c[2]") == F(1, 4)


def test_elif_chain_and_reassignment_in_branches():
    r = enum("""
def m():
    k ~ categorical([1, 1, 2])
    v = 0
    if k == 0:
        v = 5
    elif k == 1:
        b ~ flip(0.5)
        v = v + (1 if b else 2)
    else:
        pass
    return v
""")
    assert_exact_table(r.probs(), {0: F(1, 2), 1: F(1, 8), 2: F(1, 8), 5: F(1, 4)})


# ----------------------------------------------------------------------- structured values
def test_list_and_tuple_returns():
    r = enum("""
def m():
    a ~ flip(0.5)
    n ~ categorical([1, 1])
    xs = []
    for i in range(n + 1):
        xs = append(xs, a)
    return xs
""")
    assert_exact_table(r.probs(), {(False,): F(1, 4), (False, False): F(1, 4),
                                   (True,): F(1, 4), (True, True): F(1, 4)})
    r = enum("""
def m():
    a ~ flip(0.5)
    k ~ binomial(2, 0.5)
    return a, k * 2
""")
    assert_exact_table(r.probs(), {(a, 2 * k): F(1, 2) * F(math.comb(2, k), 4)
                                   for a in (False, True) for k in range(3)})
    assert r.mean() == (F(1, 2), F(2))  # per component


def test_paths_record_choices_and_weights():
    r = enum("""
def m():
    a ~ flip(0.2)
    if a:
        b ~ flip(0.5)
        condition b
    return a
""")
    got = sorted((w, tuple(sorted(v.items()))) for w, v in r.paths)
    assert got == [(F(1, 10), (("a", True), ("b", True), ("return", True))),
                   (F(4, 5), (("a", False), ("return", False)))]
    assert r.evidence == F(9, 10) == sum(w for w, _ in r.paths)


# ---------------------------------------------------------------------- number semantics
def test_float_data_gives_float_results():
    src = """
def diagnosis(prior):
    disease ~ flip(prior)
    observe True ~ bernoulli(0.95 if disease else 0.08)
    return disease
"""
    r = enum(src, prior=0.01)
    p = r.probs()[True]
    assert isinstance(p, float) and not isinstance(p, F)
    assert p == pytest.approx(95 / 887, rel=1e-12)
    assert isinstance(r.evidence, float)
    assert r.evidence == pytest.approx(0.0887, rel=1e-12)
    r = enum(src, prior=F(1, 100))  # exact data keep the result exact
    assert r.probs()[True] == F(95, 887)


def test_rational_literals_are_exact_decimals():
    r = enum("""
def m():
    x ~ flip(0.1)
    return 0.1 + 0.2
""")
    assert r.probs("x") == {False: F(9, 10), True: F(1, 10)}
    assert r.probs() == {F(3, 10): F(1)}
    r = enum("""
def m():
    x ~ flip(0.5)
    return (1 / 3 if x else 0.3) * 3
""")
    assert_exact_table(r.probs(), {F(9, 10): F(1, 2), F(1): F(1, 2)})
    assert r.probs("x")[True] == F(1, 2)  # flip's default-free literal 0.5 is 1/2


def test_flip_default_is_exactly_one_half():
    r = enum("""
def m():
    x ~ flip()
    return x
""")
    assert_exact_table(r.probs(), {False: F(1, 2), True: F(1, 2)})


# ------------------------------------------------------------------------------- errors
def test_impossible_condition_is_zero_evidence():
    with pytest.raises(ZeroEvidenceError):
        enum("""
def m():
    a ~ flip(0.5)
    condition a and not a
    return a
""")


def test_infinite_support_cannot_be_enumerated():
    with pytest.raises(InfiniteSupportError):
        enum("""
def m():
    k ~ geometric(0.5)
    return k
""")
    with pytest.raises(InfiniteSupportError):
        enum("""
def m():
    x ~ normal(0, 1)
    return x
""")


def test_continuous_observation_gives_float_weights():
    r = enum("""
def m():
    z ~ flip(0.5)
    observe 0.5 ~ normal(1 if z else -1, 1)
    return z
""")
    lt, lf = math.exp(-0.5 * 0.25), math.exp(-0.5 * 2.25)
    assert r.probs()[True] == pytest.approx(lt / (lt + lf), rel=1e-12)
    assert r.evidence == pytest.approx(0.5 * (lt + lf) / math.sqrt(2 * math.pi), rel=1e-12)
