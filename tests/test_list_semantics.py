"""Numeric data is a vector in every semantics (issue 9, item 10: one program, one meaning).

A numeric data list (or array, or tensor) is a tensor under sampling and an exact
``Vector`` under enumeration: arithmetic and comparisons on it are elementwise (with
torch's broadcasting) in both, ``concat``/``append`` concatenate in both, and list
literals written in the model stay lists (``+`` concatenates, ``* n`` repeats) unless
combined with a vector. Before, enumeration read data as Python lists: ``a + a`` was
(1, 2, 1, 2) there and (2, 4) under importance sampling, silently.
"""
from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import ppl
from ppl.semantics.errors import PPLRuntimeError

DATA = {"a": [1, 2], "b": [3, 5], "M": [[1, 2], [3, 4]], "B": [True, False]}
N = 2000


def _model(body: str):
    return ppl.model(f"def m(a, b, M, B):\n    k ~ flip(0.5)\n    x = 1 if k else 2\n    return {body}\n")


def _key(v):
    """A marginal's key with every number as a float (exact keys are Fractions/ints)."""
    if isinstance(v, tuple):
        return tuple(_key(x) for x in v)
    return v if isinstance(v, str) else float(v)


def _marginal(result) -> dict:
    return {_key(k): float(p) for k, p in result.marginal("return").items()}


def _assert_same_distribution(body: str, data=DATA):
    """Enumeration's exact marginal of the return value, and importance/SMC's within 4
    Monte Carlo standard errors (N prior draws: SE = sqrt(p (1 - p) / N))."""
    m = _model(body)
    exact = _marginal(m.run("enumerate", data))
    for method in ("importance", "smc"):
        est = _marginal(m.run(method, data, particles=N, seed=1))
        assert set(est) == set(exact), (method, body, est, exact)
        for v, p in exact.items():
            assert abs(est[v] - p) <= 4 * math.sqrt(p * (1 - p) / N) + 1e-12, (method, body, v, est[v], p)
    return exact


# the rows of the table in the issue, and more; expected: the exact marginal of the return value
CASES = {
    "a + a": {(2, 4): 1},                     # was (1, 2, 1, 2) under enumerate
    "a * 2": {(2, 4): 1},                     # was (1, 2, 1, 2)
    "a + 1": {(2, 3): 1},                     # was an error
    "a + [3, 4]": {(4, 6): 1},                # was (1, 2, 3, 4)
    "[3, 4] + a": {(4, 6): 1},
    "concat(a, [3])": {(1, 2, 3): 1},         # was (4, 5) under importance
    "concat([3], a)": {(3, 1, 2): 1},
    "concat(a, b)": {(1, 2, 3, 5): 1},
    "append(a, 3)": {(1, 2, 3): 1},
    "append(a, x)": {(1, 2, 1): 0.5, (1, 2, 2): 0.5},
    "concat(a * x, a)": {(1, 2, 1, 2): 0.5, (2, 4, 1, 2): 0.5},   # a per-particle tensor
    "append(a * x, x)": {(1, 2, 1): 0.5, (2, 4, 2): 0.5},
    "concat([x, 1], a)": {(1, 1, 1, 2): 0.5, (2, 1, 1, 2): 0.5},
    "[1, 2] + [3]": {(1, 2, 3): 1},           # list literals stay lists
    "[1, 2] * 2": {(1, 2, 1, 2): 1},
    "[1, 2] * (2 if k else 1)": {(1, 2, 1, 2): 0.5, (1, 2): 0.5},
    "a * (2 if k else 3)": {(2, 4): 0.5, (3, 6): 0.5},  # a vector times a per-particle scalar
    "[x, 1] + a": {(2, 3): 0.5, (3, 3): 0.5},
    "[x, 1] * a": {(1, 2): 0.5, (2, 2): 0.5},
    "a < x": {(False, False): 0.5, (True, False): 0.5},
    "a == b - 2": {(True, False): 1},
    "a * x >= 2": {(False, True): 0.5, (True, True): 0.5},
    "sum(a * b)": {13: 1},
    "dot(a, b) * x": {13: 0.5, 26: 0.5},
    "prod(a + x)": {6: 0.5, 12: 0.5},
    "mean(a * x)": {1.5: 0.5, 3: 0.5},
    "max(a * x) + min(b)": {5: 0.5, 7: 0.5},
    "-a": {(-1, -2): 1},
    "abs(a - 2)": {(1, 0): 1},
    "a / 2": {(0.5, 1): 1},
    "a // 2 + a % 2": {(1, 1): 1},
    "a ** 2": {(1, 4): 1},
    "a[0:1] + a[1:2]": {(3,): 1},             # a slice of a vector is a vector
    "a[x - 1]": {1: 0.5, 2: 0.5},
    "len(a) + len(M)": {4: 1},
    "list(a) + list(b)": {(1, 2, 3, 5): 1},   # list() makes a list
    "softmax(a) * 0 + 1": {(1, 1): 1},
    "max(a, b)": {(3, 5): 1},                 # elementwise with two vectors, as torch.maximum
    "min(a * x, 2)": {(1, 2): 0.5, (2, 2): 0.5},
    "max([x, 1], [2, x])": {(2, 1): 0.5, (2, 2): 0.5},  # two list literals: lists (compared as lists)
    "sum(a * x, 10)": {13: 0.5, 16: 0.5},     # the start was ignored for a tensor
    # per-particle vectors of different lengths (a value that is [1, 2] or [1, 2, 1])
    "concat(a if k else concat(a, [1]), a) + 1": {(2, 3, 2, 3): 0.5, (2, 3, 2, 2, 3): 0.5},
    "append(a if k else b[0:1], 7) * 2": {(2, 4, 14): 0.5, (6, 14): 0.5},  # b[0:1] was broadcast to [3, 3]
    "len(a if k else b[0:1])": {2: 0.5, 1: 0.5},
    "(0 if k else a) + a": {(1, 2): 0.5, (2, 4): 0.5},
    "append([1] if k else [1, 2], x)": {(1, 1): 0.5, (1, 2, 2): 0.5},
    # conversions of a vector are elementwise; str shows its numbers as a list
    "str(a * x)": {"[1, 2]": 0.5, "[2, 4]": 0.5},   # was 'Vector(...)' / 'tensor(...)'
    "str(M)": {"[[1, 2], [3, 4]]": 1},
    "int(a * x / 2)": {(0, 1): 0.5, (1, 2): 0.5},
    "bool(a - 1)": {(False, True): 1},          # was True (a non-empty list) under enumerate
    # a list next to a per-particle vector is a vector; next to a number (sum(a) is one) a list
    "[1, 2] + a * x": {(2, 4): 0.5, (3, 6): 0.5},        # was an error under sampling
    "a * x != list(a)": {(False, False): 0.5, (True, True): 0.5},  # was True (list != tensor)
    "[1, 2] * sum(a)": {(1, 2, 1, 2, 1, 2): 1},          # was (3, 6) under sampling
    "dot([1, 2], a * x)": {5: 0.5, 10: 0.5},
    "[] + a[0:1]": {(): 1},                               # an empty vector result crashed the table
    # `in`: a number among a vector's numbers; in a list, an element of the same shape
    "x in a": {True: 1},
    "2 in M": {True: 1},
    "a[0:1] in [1, 2]": {False: 1},                       # was True under sampling ([1] == 1)
    "a in [a, b]": {True: 1},
    "a * x in [a, b]": {True: 0.5, False: 0.5},
    # str shows a value the same way in every semantics
    "str([x, 3])": {"[1, 3]": 0.5, "[2, 3]": 0.5},        # was '[Batched(...), 3]'
    "str(list(a))": {"[1, 2]": 1},                        # was '[tensor(1), tensor(2)]'
    "str(x / 2)": {"0.5": 0.5, "1.0": 0.5},               # exact printed '1/2' and '1'
    "abs(B) + floor(B)": {(2, 0): 1},                     # bool tensors failed in abs/floor
    "sample(uniform_draw(M)) * x": {(1, 2): 0.25, (2, 4): 0.25, (3, 4): 0.25, (6, 8): 0.25},  # a row: a vector
    "sample(uniform_draw([a, b])) + 1": {(2, 3): 0.5, (4, 6): 0.5},
    "filter(lambda y: sum(y) > 3, M)": {((3, 4),): 1},
    # a matrix datum
    "M + a": {((2, 4), (4, 6)): 1},
    "M * M": {((1, 4), (9, 16)): 1},
    "M[x - 1] * x": {(1, 2): 0.5, (6, 8): 0.5},
    "max(M * x, a)": {((1, 2), (3, 4)): 0.5, ((2, 4), (6, 8)): 0.5},
    "sum(M)": {10: 1},
    "mean(M)": {2.5: 1},
    "prod(M)": {24: 1},
    "max(M)": {4: 1},
    "concat(M, [[5, 6]])": {((1, 2), (3, 4), (5, 6)): 1},
    "append(M, [x, x])": {((1, 2), (3, 4), (1, 1)): 0.5, ((1, 2), (3, 4), (2, 2)): 0.5},
    # bool data (flips): arithmetic counts them, as a tensor does
    "B + B": {(2, 0): 1},
    "-B": {(-1, 0): 1},
    "B == [True, True]": {(True, False): 1},
    "sum(B)": {1: 1},
    "any(B) and not all(B)": {True: 1},
    "concat(B, [True])": {(True, False, True): 1},
}


@pytest.mark.parametrize("body", list(CASES))
def test_same_distribution_under_every_method(body):
    exact = _assert_same_distribution(body)
    assert exact == {_key(k): float(p) for k, p in CASES[body].items()}


def test_a_tensor_an_array_and_a_list_are_the_same_datum_under_enumerate():
    m = _model("concat(a * x, b) + 1 if k else sum(M * 2) - B[0]")
    as_lists = m.run("enumerate", DATA)
    for a in ([1, 2], torch.tensor([1, 2]), np.array([1, 2]), (1, 2)):
        for M in (torch.tensor([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]])):
            other = m.run("enumerate", {**DATA, "a": a, "M": M, "B": torch.tensor([True, False])})
            assert other.marginal("return") == as_lists.marginal("return")
    assert as_lists.marginal("return") == {(2, 3, 4, 6): Fraction(1, 2), 19: Fraction(1, 2)}


def test_vector_arithmetic_stays_exact():
    m = ppl.model("def m(a):\n    k ~ flip(0.5)\n    return a / 3 if k else sum(a) / 10\n")
    assert m.run("enumerate", {"a": [1, 2]}).marginal("return") == {
        (Fraction(1, 3), Fraction(2, 3)): Fraction(1, 2), Fraction(3, 10): Fraction(1, 2)}


def test_observed_vector_and_vector_parameters_agree():
    """``observe ys ~ normal(mu, 1)`` (vectorised), ``observe ys[i] ~ ...``, a vector of
    probabilities and a dirichlet's vector parameter: enumeration's exact posterior,
    importance within 4 SE (from its ESS)."""
    m = ppl.model("""
def m(ys, ps, alpha, w):
    mu ~ categorical(ps)
    observe ys ~ normal(mu * w[0], 1)
    observe ys[0] ~ normal(mu, 2)
    observe softmax(ys) ~ dirichlet(alpha * (mu + 1))
    return mu
""")
    data = {"ys": [1.0, 2.0, 1.5], "ps": [0.2, 0.3, 0.5], "alpha": [1, 2, 3], "w": [1]}
    exact = m.run("enumerate", data)
    est = m.run("importance", data, particles=4000, seed=0)
    ess = float(est.ess)
    for v, p in exact.marginal("return").items():
        p = float(p)
        assert abs(float(est.marginal("return").get(v, 0)) - p) <= 4 * math.sqrt(p * (1 - p) / ess)
    # the same data as a tensor and an array: the same exact posterior
    again = m.run("enumerate", {**data, "ys": torch.tensor(data["ys"], dtype=torch.float64),
                                "ps": np.array(data["ps"])})
    for v, p in exact.marginal("return").items():
        assert float(again.marginal("return")[v]) == pytest.approx(float(p), rel=1e-6)


@pytest.mark.parametrize("statement", [
    "observe M ~ normal(x, 2)",                      # a matrix of independent observations
    "observe M[1] ~ normal(x * 2, 2)",
    "observe a ~ normal(a * x, 1)",                  # a vector parameter made from the data
    "observe a ~ poisson(x)",
    "observe B ~ bernoulli(0.3 * x)",                # bool data
    "observe a ~ categorical([0.2, 0.3, 0.5 * x])",  # a vector of category indices
    "factor sum(a) * x",
])
def test_observing_vector_data_agrees(statement):
    """Enumeration's exact posterior of x, importance's within 4 SE (from its ESS)."""
    m = ppl.model(f"def m(a, M, B):\n    k ~ flip(0.5)\n    x = 1 if k else 2\n    {statement}\n    return x\n")
    data = {k: DATA[k] for k in ("a", "M", "B")}
    exact = _marginal(m.run("enumerate", data))
    est = m.run("importance", data, particles=4000, seed=0)
    got = _marginal(est)
    for v, p in exact.items():
        assert abs(got.get(v, 0.0) - p) <= 4 * math.sqrt(p * (1 - p) / float(est.ess)) + 1e-12, (v, got, exact)


def test_a_vector_choice_is_a_vector_under_enumeration():
    m = ppl.model("def m(ps):\n    x ~ multinomial(2, ps)\n    return x + x\n")
    assert _marginal(m.run("enumerate", {"ps": [0.5, 0.5]})) == pytest.approx({(0, 4): 0.25, (2, 2): 0.5, (4, 0): 0.25})


@pytest.mark.parametrize("body, message", [
    ("a + [1, 2, 3]", "cannot apply + to values of shapes [2] and [3]"),
    ("a * M[0:1][0] + [1, 2, 3]", "cannot apply + to values of shapes [2] and [3]"),
    ("a + 'x'", "unsupported operand types for +"),
    ("concat(a, M)", "concat() of values of shapes [2] and [2, 2]"),
    ("concat(a, 3)", "concat() expects two lists or vectors"),
    ("not a", "a condition must be one truth value"),
    ("a[0:1] in a", "`x in v` with v a vector needs a number x"),   # was True under sampling
    ("'s' in a * x", "`x in v` with v a vector needs a number x"),
    ("a * x == 's'", "unsupported operand types for ==: tensor of shape (2,) and string"),  # was False
    ("softmax(x)", "softmax() expects a list or vector of numbers, got a number"),  # ran across particles
    ("dot(a, a[0:1])", "dot() of vectors of lengths 2 and 1"),
    ("filter(lambda y: y > 1, M)", "a condition must be one truth value"),  # enumerate kept every row
    ("a if a else b", "a condition must be one truth value"),
    ("B and B", "a condition must be one truth value"),          # bool data: not, and, or need one value
    ("not (a * x)", "a condition must be one truth value"),      # was elementwise for a per-particle vector
])
def test_shape_errors_are_located_and_the_same_in_every_semantics(body, message):
    m = _model(body)
    for method in ("enumerate", "importance"):
        with pytest.raises(PPLRuntimeError) as err:
            m.run(method, DATA, particles=10, seed=0)
        assert message in str(err.value), (method, str(err.value))
        assert "<model>:4:" in str(err.value) and "^" in str(err.value), (method, str(err.value))


def test_ragged_and_string_data_stay_lists():
    m = ppl.model("def m(r, s):\n    k ~ flip(0.5)\n    return len(r + r) + len(s + s) + len(r[1])\n")
    data = {"r": [[1], [2, 3]], "s": ["x", "y"]}
    assert m.run("enumerate", data).marginal("return") == {10: 1}
    assert _marginal(m.run("importance", data, particles=10, seed=0)) == {10.0: pytest.approx(1.0)}


def test_vector_results_print_as_tuples_and_json_as_lists():
    r = ppl.model("def m(a):\n    k ~ flip(0.5)\n    return a * k\n").run("enumerate", {"a": [1, 2]})
    assert r.marginal("return") == {(0, 0): Fraction(1, 2), (1, 2): Fraction(1, 2)}
    out = r.to_json()
    out = json.loads(out) if isinstance(out, str) else out
    assert out["posterior"]["return"]["probs"] == {"[0, 0]": 0.5, "[1, 2]": 0.5}


def test_a_python_function_gets_the_same_vector_under_every_method():
    """A Python function passed as data sees a tensor for a vector datum under enumeration
    too (it saw a list: ``v * 2`` repeated it)."""
    def double(v):
        return v * 2
    m = ppl.model("def m(a, f):\n    k ~ flip(0.5)\n    return f(a) + (1 if k else 0)\n")
    data = {"a": [1, 2], "f": double}
    assert _marginal(m.run("enumerate", data)) == {(2.0, 4.0): 0.5, (3.0, 5.0): 0.5}
    assert set(_marginal(m.run("importance", data, particles=100, seed=0))) == {(2.0, 4.0), (3.0, 5.0)}


SWEEP_OPERANDS = ["a", "M", "[1, 2]", "[x, 3]", "x", "a * x", "list(a)", "B"]


def _outcome(m, method):
    """('ok', the support of the return value) or ('error', None)."""
    try:
        r = m.run(method, DATA, particles=20, seed=0)
    except ppl.PPLError:
        return "error", None
    return "ok", frozenset(_key(k) for k in r.marginal("return"))


@pytest.mark.parametrize("op", ["+", "*", "==", "in"])
def test_every_pair_of_operands_means_the_same_under_enumerate_and_importance(op):
    """Data vectors, per-particle vectors, list literals (with per-particle numbers), lists
    made by list(), numbers: for every pair, both semantics give the same values or both
    give an error (never a raw Python exception)."""
    differ = []
    for p in SWEEP_OPERANDS:
        for q in SWEEP_OPERANDS:
            m = _model(f"{p} {op} {q}")
            e, i = _outcome(m, "enumerate"), _outcome(m, "importance")
            if e != i:
                differ.append((f"{p} {op} {q}", e, i))
    assert not differ, differ


def test_fraction_data_is_a_vector_and_a_huge_integer_is_an_error():
    """A list of Fractions is numeric data (it stayed a list under both, with list
    arithmetic); an integer beyond 64 bits cannot be in a vector: an error naming the
    datum, not a list that silently concatenates."""
    m = ppl.model("def m(a):\n    k ~ flip(0.5)\n    return a + a\n")
    data = {"a": [Fraction(1, 2), Fraction(1, 3)]}
    assert m.run("enumerate", data).marginal("return") == {(Fraction(1), Fraction(2, 3)): 1}
    (value, p), = _marginal(m.run("importance", data, particles=10, seed=0)).items()
    assert value == pytest.approx((1.0, 2 / 3)) and p == pytest.approx(1.0)
    for method in ("enumerate", "importance"):
        with pytest.raises(ppl.PPLError, match="data 'a' holds an integer that does not fit in 64 bits"):
            m.run(method, {"a": [1, 2 ** 70]}, particles=10, seed=0)


@pytest.mark.parametrize("method", ["importance", "smc"])
def test_a_list_with_a_per_particle_element_made_in_one_branch_is_each_particles_own_list(method):
    """`w = [z, 1]` on one branch, `w = "none"` on the other: each particle that took the
    first branch returns its own [z_i, 1] (it returned the internal batched object before),
    and the others "none"."""
    m = ppl.model("def main():\n    z ~ normal(0, 1)\n    b ~ flip(0.5)\n    if b:\n        w = [z, 1]\n"
                  "    else:\n        w = 'none'\n    return w\n")
    r = m.run(method, particles=50, seed=0)
    z, b, ret = r.sites["z"].value, r.sites["b"].value, r.sites["return"].value
    for i in range(50):
        if bool(b[i]):
            assert ret[i] == (pytest.approx(float(z[i])), 1)
        else:
            assert ret[i] == "none"
