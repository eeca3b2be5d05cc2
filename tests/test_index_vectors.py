"""Indexing by a vector of integers: ``a[county]`` (NumPy's and Stan's integer-array
indexing), the way hierarchical models pick each observation's group effect.

A newcomer's radon-style model (``observe y ~ normal(a[county] + b * x, sigma)``) stopped
with "an index must be an integer". What is checked:

* ``v[i]`` for data ``i`` is ``[v[i[0]], v[i[1]], ...]`` for constant vectors, lists and
  per-particle vectors (one row per particle);
* a model written with ``z[g]`` computes the same log weights as the same model written
  with a loop over ``z[g[i]]`` (same seed: the same draws), and its evidence and posterior
  means agree with the closed form of the normal-normal hierarchy (tolerances: 4.5 Monte
  Carlo standard errors, from the run's own ESS);
* the gradient-based kernels run it (NUTS's traced potential gathers the same way);
* bad indices are located errors with a hint: out of range, booleans, fractions, matrices.
"""
import math
from fractions import Fraction

import pytest
import torch

import ppl
from ppl.semantics.errors import PPLError

torch.set_num_threads(1)

G = torch.tensor([0, 1, 1, 0, 1, 2, 2, 0])
Y = torch.tensor([0.3, 1.2, 0.9, -0.1, 1.5, -0.8, -1.1, 0.4], dtype=torch.float64)
J = 3

VECTOR = """
def vector(y, g, J):
    z ~ normal(zeros(J), 1)
    observe y ~ normal(z[g], 1)
    return z
"""

LOOP = """
def loop(y, g, J):
    z ~ normal(zeros(J), 1)
    for i in range(len(y)):
        observe y[i] ~ normal(z[g[i]], 1)
    return z
"""


def _closed_form():
    """Evidence and posterior means of z_j ~ N(0, 1), y_i ~ N(z_{g_i}, 1): per group, y_j
    is N(0, I + 11^T); the posterior of z_j is N(sum y_j / (1 + n_j), 1 / (1 + n_j))."""
    log_z, means, sds = 0.0, [], []
    for j in range(J):
        yj = Y[G == j]
        n = len(yj)
        cov = torch.eye(n, dtype=torch.float64) + torch.ones(n, n, dtype=torch.float64)
        log_z += float(torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(yj))
        means.append(float(yj.sum()) / (1 + n))
        sds.append(1 / math.sqrt(1 + n))
    return log_z, means, sds


def _returned(body: str, g) -> dict:
    m = ppl.model("def f(g):\n    " + body + "\n")
    return m.run("prior", {"g": g}, particles=5, seed=0).marginal("return")


def test_indexing_constants_lists_and_particles():
    g = torch.tensor([2, 0, 0])
    assert _returned("return [10, 20, 30][g]", g) == {(30.0, 10.0, 10.0): 1.0}
    assert _returned('return ["a", "b", "c"][g]', g) == {("c", "a", "a"): 1.0}
    # per particle: row by row (each particle's x[g] is its own x[2], x[0], x[0])
    same = "x ~ normal(zeros(3), 1)\n    y = x[g]\n    return (y[0] - x[2]) + (y[1] - x[0]) + (y[2] - x[0])"
    assert _returned(same, g) == {0.0: 1.0}
    assert _returned("return [10, 20, 30][g]", torch.tensor([2.0, 0.0])) == {(30.0, 10.0): 1.0}  # integral floats


def test_a_vector_index_equals_the_loop_and_the_closed_form():
    data = {"y": Y, "g": G, "J": J}
    vec = ppl.model(VECTOR).run("importance", data, particles=200_000, seed=3)
    loop = ppl.model(LOOP).run("importance", data, particles=200_000, seed=3)
    # the same draws (same seed, same choices), the same density: equal log weights up to
    # float32 rounding of the per-observation densities (8 terms of |log p| < 20: < 1e-5)
    assert torch.allclose(vec.log_weights, loop.log_weights, rtol=0, atol=1e-5)
    log_z, means, sds = _closed_form()
    ess = float(vec.ess)
    # log evidence: the MCSE of log Z-hat is about sqrt((N / ESS - 1) / N)
    se_log_z = math.sqrt((200_000 / ess - 1) / 200_000)
    assert abs(float(vec.log_evidence) - log_z) < 4.5 * se_log_z + 1e-6
    got = torch.as_tensor(vec.mean("z"), dtype=torch.float64)
    for j in range(J):
        assert abs(float(got[j]) - means[j]) < 4.5 * sds[j] / math.sqrt(ess), (j, float(got[j]), means[j])


def test_nuts_runs_a_vector_index():
    data = {"y": Y, "g": G, "J": J}
    r = ppl.model(VECTOR).run("nuts", data, particles=2, samples=300, burn_in=200, seed=1)
    _, means, sds = _closed_form()
    got = torch.as_tensor(r.mean("z"), dtype=torch.float64)
    # NUTS draws are correlated: 4.5 MCSE with a deliberately low effective size of 150
    for j in range(J):
        assert abs(float(got[j]) - means[j]) < 4.5 * sds[j] / math.sqrt(150), (j, float(got[j]), means[j])


@pytest.mark.parametrize("index, message", [
    (torch.tensor([0, 3]), "index 3 out of range for length 3"),
    (torch.tensor([True, False, True]), "an index must be an integer or a vector of integers"),
    (torch.tensor([0.5, 1.0]), "an index must be an integer or a vector of integers"),
    (torch.tensor([[0, 1], [1, 2]]), "an index vector must be one-dimensional"),
])
def test_bad_index_vectors_are_located_errors(index, message):
    m = ppl.model("""
def f(g):
    z ~ normal(zeros(3), 1)
    return z[g]
""")
    with pytest.raises(PPLError) as e:
        m.run("prior", {"g": index}, particles=4, seed=0)
    text = str(e.value)
    assert message in text
    assert "<model>:4:12" in text and "^^^^" in text, text  # located at z[g]


def test_exact_enumeration_indexes_by_a_vector_as_the_loop_does():
    """Under enumeration data is a Vector of Python numbers: ``p[g]`` gathers exactly, and
    the posterior equals the one of the same model written with a loop (Fractions)."""
    data = {"ys": torch.tensor([1.0, 0.0, 1.0]), "g": torch.tensor([1, 0, 1])}
    head = "def f(ys, g):\n    b ~ flip(0.5)\n    p = [0.2, 0.7] if b else [0.5, 0.5]\n"
    vector = ppl.model(head + "    observe ys ~ bernoulli(p[g])\n    return b\n")
    loop = ppl.model(head + "    for i in range(len(ys)):\n        observe ys[i] ~ bernoulli(p[g[i]])\n"
                            "    return b\n")
    exact = vector.run("enumerate", data).marginal("return")
    assert exact == loop.run("enumerate", data).marginal("return")
    # 0.7 * 0.8 * 0.7 = 0.392 against 0.5^3 = 0.125
    assert exact == {True: Fraction(392, 517), False: Fraction(125, 517)}
