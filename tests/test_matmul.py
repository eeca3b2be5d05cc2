"""`a @ b`: matrix multiplication (Python's precedence, torch.matmul's meaning per
particle), in every semantics; the annotation `z ~ d @enumerate` keeps its meaning."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import ppl
from ppl.compiler import parse_program
from ppl.semantics import ir
from ppl.semantics.errors import PPLError
from ppl.semantics.pretty import pretty

Z = 4.5  # tolerance in Monte Carlo standard errors

LOGREG = """
def logreg(X, y):
    alpha ~ normal(0, 2)
    beta ~ normal(zeros(3), 2)
    observe y ~ bernoulli(logits=alpha + X @ beta)
    return beta
"""
LOGREG_ROWS = """
def logreg(X, y):
    alpha ~ normal(0, 2)
    beta ~ normal(zeros(3), 2)
    for i in range(len(y)):
        observe y[i] ~ bernoulli(logits=alpha + dot(X[i], beta))
    return beta
"""


def _logreg_data(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g)
    y = (torch.rand(n, generator=g) < torch.sigmoid(X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3)).float()
    return {"X": X, "y": y}


# ------------------------------------------------------------------ the newcomer's model
def test_logistic_regression_log_joint_equals_dot_per_row():
    data = _logreg_data()
    g = torch.Generator().manual_seed(1)
    trace = {"alpha": torch.randn(5, generator=g), "beta": torch.randn(5, 3, generator=g)}
    a = ppl.model(LOGREG).log_joint(trace, **data)
    b = ppl.model(LOGREG_ROWS).log_joint(trace, **data)
    assert a.shape == (5,) and torch.allclose(a.double(), b.double(), rtol=1e-9, atol=1e-9)
    X, y = data["X"].double(), data["y"].double()
    logits = trace["alpha"].double()[:, None] + trace["beta"].double() @ X.T  # by hand
    by_hand = (torch.distributions.Normal(0.0, 2.0).log_prob(trace["alpha"].double())
               + torch.distributions.Normal(0.0, 2.0).log_prob(trace["beta"].double()).sum(1)
               + torch.distributions.Bernoulli(logits=logits).log_prob(y).sum(1))
    assert torch.allclose(a.double(), by_hand, atol=1e-4)


def test_logistic_regression_importance_equals_dot_per_row():
    data = _logreg_data(n=8)
    a = ppl.model(LOGREG).run("importance", data, particles=400, seed=3)
    b = ppl.model(LOGREG_ROWS).run("importance", data, particles=400, seed=3)
    assert math.isfinite(a.log_evidence)
    assert a.log_evidence == pytest.approx(b.log_evidence, abs=1e-6)
    assert np.allclose(np.asarray(a.mean("beta"), dtype=float), np.asarray(b.mean("beta"), dtype=float), atol=1e-6)


def test_logistic_regression_nuts_agrees_with_importance_on_dot_per_row():
    """NUTS on the `@` model and importance sampling (many particles) on the model
    written with dot per row give one posterior of beta, within both Monte Carlo errors."""
    data = _logreg_data(n=12)
    a = ppl.model(LOGREG).run("nuts", data, particles=4, samples=200, burn_in=200, seed=0)
    b = ppl.model(LOGREG_ROWS).run("importance", data, particles=100_000, seed=1)
    assert a.extra["divergences"] == 0 and b.ess > 1000
    mean_a, mean_b, sd_b = (np.asarray(x, dtype=float) for x in (a.mean("beta"), b.mean("beta"), b.sd("beta")))
    for k in range(3):
        ess_a = a.ess_per_site[f"beta[{k}]"]
        assert abs(mean_a[k] - mean_b[k]) < Z * sd_b[k] * math.sqrt(1 / ess_a + 1 / b.ess), k


def test_linear_regression_with_matmul_matches_the_closed_form_under_nuts():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.5 * rng.normal(size=30)
    src = "def blr(X, y, sigma):\n    w ~ normal(zeros(3), 1)\n    observe y ~ normal(X @ w, sigma)\n"
    r = ppl.model(src).run("nuts", {"X": torch.tensor(X), "y": torch.tensor(y), "sigma": 0.5},
                           particles=4, samples=250, burn_in=200, seed=3)
    cov = np.linalg.inv(np.eye(3) + X.T @ X / 0.25)
    mean = cov @ X.T @ y / 0.25
    v = r.samples["w"].double()
    for k in range(3):
        ess, sd = r.ess_per_site[f"w[{k}]"], math.sqrt(cov[k, k])
        assert abs(float(v[:, k].mean()) - mean[k]) < Z * sd / math.sqrt(ess)
        assert abs(float(v[:, k].std()) - sd) < Z * sd / math.sqrt(2 * ess)


# ------------------------------------------------------------------ shapes, per particle
_A = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
_V = torch.tensor([1.0, -1.0, 2.0])


@pytest.mark.parametrize("expr, expect", [
    ("A @ b", lambda b: _A @ b),                                  # data matrix @ per-particle vector
    ("A[0:2] @ b", lambda b: _A[0:2] @ b),                        # [2, 3] @ [3]
    ("[b, b * 2, b - 1] @ v", lambda b: torch.stack([b, b * 2, b - 1]) @ _V),  # per-particle matrix @ data
    ("b @ b", lambda b: b @ b),                                   # both per particle: a number
    ("b @ (A * b)", lambda b: b @ (_A * b)),                      # per-particle vector @ per-particle matrix
    ("(A * b) @ (A * b)", lambda b: (_A * b) @ (_A * b)),         # per-particle matrices
    ("v @ A", lambda b: _V @ _A),                                 # plain tensors
    ("[A, A * 2] @ b", lambda b: torch.stack([_A, _A * 2]) @ b),  # a stack of matrices [2, 3, 3] @ [3]
    ("[A, A * 2] @ (A * b)", lambda b: torch.stack([_A, _A * 2]) @ (_A * b)),
])
def test_per_particle_products_are_each_particles_matmul(expr, expect):
    src = f"def m(A, v):\n    b ~ normal(zeros(3), 1)\n    return {expr}\n"
    r = ppl.model(src).run("prior", {"A": _A, "v": _V}, particles=4, seed=0)
    out, bs = r.sites["return"].value, r.sites["b"].value
    assert out.shape[0] == 4
    for k in range(4):
        assert torch.allclose(out[k], expect(bs[k]), atol=1e-5), (expr, k)


def test_plain_tensor_products_and_integer_products_are_exact():
    src = "def m(A, B, v):\n    return [A @ B, A @ v, v @ A, v @ v]\n"
    A, B, v = [[1, 2], [3, 4]], [[0, 1], [1, 0]], [5, 7]
    exact = ppl.model(src).run("enumerate", {"A": A, "B": B, "v": v})
    (value, p), = exact.probs().items() if isinstance(exact.probs(), dict) else [(None, None)]
    assert p == 1
    tA, tB, tv = torch.tensor(A), torch.tensor(B), torch.tensor(v)
    assert [np.asarray(x).tolist() for x in value] == [(tA @ tB).tolist(), (tA @ tv).tolist(),
                                                       (tv @ tA).tolist(), int(tv @ tv)]


def test_list_literals_are_vectors_and_matrices_for_matmul():
    src = "def m():\n    return [[1, 2], [3, 4]] @ [1, -1]\n"
    exact = ppl.model(src).run("enumerate", {})
    (value, p), = exact.probs().items()
    assert p == 1 and list(value) == [-1, -1]
    r = ppl.model(src).run("prior", {}, particles=2, seed=0)
    assert r.sites["return"].value.tolist() == [[-1, -1], [-1, -1]]


# ------------------------------------------------------------------ exact enumeration
FINITE = """
def m(y):
    a ~ categorical([0.5, 0.25, 0.25])
    b ~ flip(1/3)
    v = [[0.1, 0.2], [0.3, 0.1]] @ [a, b]
    observe y ~ bernoulli(0.9 if v[0] > v[1] else 0.2)
    return v[0] + v[1]
"""


def _finite_by_hand(y: int) -> dict:
    prior_a = {0: Fraction(1, 2), 1: Fraction(1, 4), 2: Fraction(1, 4)}
    joint: dict = {}
    for a, pa in prior_a.items():
        for b, pb in ((True, Fraction(1, 3)), (False, Fraction(2, 3))):
            v0 = Fraction(1, 10) * a + Fraction(2, 10) * b
            v1 = Fraction(3, 10) * a + Fraction(1, 10) * b
            p1 = Fraction(9, 10) if v0 > v1 else Fraction(2, 10)
            w = pa * pb * (p1 if y else 1 - p1)
            joint[v0 + v1] = joint.get(v0 + v1, 0) + w
    z = sum(joint.values())
    return {k: w / z for k, w in joint.items()}


def test_exact_enumeration_of_matmul_gives_exact_fractions():
    probs = ppl.model(FINITE).run("enumerate", {"y": 1}).probs()
    assert probs == _finite_by_hand(1)
    assert ppl.model(FINITE).run("enumerate", {"y": 1}, strategy="elimination").probs() == probs
    assert all(type(k) is Fraction or type(k) is int for k in probs) and all(type(p) is Fraction for p in probs.values())


def test_sampling_agrees_with_exact_on_the_finite_matmul_model():
    """Likelihood weighting on 20,000 particles: each value's posterior probability within
    Z standard errors of the exact one (the tensors of the sampling semantics, the
    Fractions of the exact one)."""
    exact = _finite_by_hand(0)
    r = ppl.model(FINITE).run("importance", {"y": 0}, particles=20_000, seed=5)
    marginal = r.marginal("return")
    for value, p in exact.items():
        got = sum(q for k, q in marginal.items() if abs(float(k) - float(value)) < 1e-6)
        assert abs(got - float(p)) < Z * math.sqrt(float(p) * (1 - float(p)) / r.ess), (value, got, p)


def test_enumerated_choice_times_data_equals_exact_enumeration():
    """`X[z] @ beta` with z summed out (@enumerate, an enumerated value [M, K, p] times a
    vector): the evidence is exact, equal to enumeration's."""
    src = ("def m(X, beta, y):\n    z ~ categorical([0.2, 0.3, 0.5]) @enumerate\n"
           "    observe y ~ normal(X[z] @ beta, 1.0)\n    return z\n")
    data = {"X": [[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]], "beta": [0.5, 0.25], "y": 1.0}
    exact = ppl.model(src).run("enumerate", data)
    summed = ppl.model(src).run("importance", data, particles=4, seed=0)
    by_hand = math.log(sum(p * math.exp(-0.5 * (1.0 - (x[0] * 0.5 + x[1] * 0.25)) ** 2) / math.sqrt(2 * math.pi)
                           for p, x in zip((0.2, 0.3, 0.5), data["X"])))
    assert exact.log_evidence == pytest.approx(by_hand, abs=1e-12)
    assert summed.log_evidence == pytest.approx(by_hand, abs=1e-5)


# ------------------------------------------------------------------ errors
def test_shape_mismatch_is_located_with_both_shapes_and_a_hint():
    src = "def m(X):\n    b ~ normal(zeros(4), 1)\n    return X @ b\n"
    with pytest.raises(PPLError) as err:
        ppl.model(src).run("importance", {"X": torch.randn(5, 3)}, particles=4, seed=0)
    text = str(err.value)
    assert "<model>:3:12" in text and "[5, 3] and [4]" in text and "^^^^^" in text
    assert "X @ beta" in err.value.hint


def test_shape_mismatch_in_the_exact_semantics_has_the_same_message():
    src = "def m(X):\n    b ~ flip(0.5)\n    return X @ [b, 1, 0]\n"
    with pytest.raises(PPLError) as err:
        ppl.model(src).run("enumerate", {"X": [[1, 2], [3, 4]]})
    assert "<model>:3:12" in str(err.value) and "[2, 2] and [3]" in str(err.value)


def test_a_number_is_not_a_matrix():
    for src in ("def m(X):\n    return 2 @ X\n", "def m(X):\n    return 2 @ 3\n"):
        with pytest.raises(PPLError) as err:
            ppl.model(src).run("enumerate", {"X": [[1, 2], [3, 4]]})
        assert "<model>:2:12" in str(err.value) and "matrix multiplication" in str(err.value)
        assert "use *" in err.value.hint


def test_dot_of_a_matrix_points_to_matmul():
    src = "def m(X):\n    beta ~ normal(zeros(3), 2)\n    return dot(X, beta)\n"
    with pytest.raises(PPLError) as err:
        ppl.model(src).run("importance", {"X": torch.randn(100, 3)}, particles=4, seed=0)
    assert "<model>:3:12" in str(err.value) and "[100, 3] and [3]" in str(err.value)
    assert "X @ beta" in err.value.hint
    with pytest.raises(PPLError) as err:  # same first length: it used to broadcast silently
        ppl.model(src).run("importance", {"X": torch.randn(3, 3)}, particles=4, seed=0)
    assert "X @ beta" in err.value.hint
    exact = "def m(X):\n    b ~ flip(0.5)\n    return dot(X, [b, 1])\n"
    with pytest.raises(PPLError) as err:
        ppl.model(exact).run("enumerate", {"X": [[1, 2], [3, 4]]})
    assert "X @ beta" in err.value.hint
    # vectors keep their meaning
    assert ppl.model("def m():\n    return dot([1, 2], [3, 4])\n").run("enumerate", {}).probs() == {11: 1}


# ------------------------------------------------------------------ syntax
def test_matmul_parses_with_the_precedence_of_times():
    f = parse_program("def m():\n    return a + b @ c * d\n").functions[0]
    e = f.body[0].value
    assert e.op == "+" and e.right.op == "*" and e.right.left.op == "@"
    assert pretty(e) == "a + b @ c * d"
    for src in ("a @ b", "(a @ b) @ c", "a @ (b @ c)", "-a @ b", "a ** 2 @ b", "f(x @ y)[0] @ z"):
        p = parse_program(f"def m():\n    return {src}\n")
        assert parse_program(pretty(p)) == p, src


def test_annotation_still_parses_as_before():
    p = parse_program("def m():\n    z ~ flip(0.5) @enumerate\n    w ~ flip(0.5) if z else flip(0.1) @enumerate\n")
    s, t = p.functions[0].body
    assert isinstance(s, ir.Sample) and s.enumerate and s.dist.func.name == "flip"
    assert t.enumerate and isinstance(t.dist, ir.IfExp) and t.dist.orelse.func.name == "flip"
    assert parse_program(pretty(p)) == p and pretty(s) == "z ~ flip(0.5) @enumerate"


def test_a_product_on_a_choice_is_bracketed_in_the_pretty_print():
    product = ir.Sample("x", ir.BinOp("@", ir.Var("a"), ir.Var("b")))
    assert pretty(product) == "x ~ (a @ b)"
    program = ir.Program((ir.FunctionDef("m", (), (product,
                                                   ir.Sample("y", ir.BinOp("@", ir.Var("a"), ir.Var("b")), True))),))
    assert parse_program(pretty(program)) == program


def test_annotation_errors_are_located():
    with pytest.raises(PPLError) as err:
        parse_program("def m():\n    z ~ X @ beta\n")
    assert "<model>:2:5" in str(err.value) and "unknown annotation '@beta'" in str(err.value)
    assert "@enumerate" in err.value.hint and "matrix multiplication" in err.value.hint
    with pytest.raises(PPLError) as err:
        parse_program("def m():\n    observe 1 ~ flip(0.5) @enumerate\n")
    assert "<model>:2:28" in str(err.value) and "random choice" in str(err.value)
    with pytest.raises(PPLError) as err:
        parse_program("@decorate\ndef f():\n    pass\n")
    assert "matrix multiplication" in err.value.hint and "@enumerate" in err.value.hint


def test_highlighting_tells_an_annotation_from_a_product():
    from ppl.compiler.highlight import tokens
    kinds = [(k, p) for k, p in tokens("z ~ flip(0.5) @enumerate\ny = X @ b\n") if p == "@"]
    assert kinds == [("operator", "@"), ("punctuation", "@")]


# ------------------------------------------------------------------ symbolic density
def test_symbolic_density_writes_the_product_out():
    from ppl.semantics import symbolic
    src = "def m(X, y):\n    beta ~ normal(zeros(2), 1)\n    observe y ~ normal(X @ beta, 1)\n"
    data = {"X": [[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], "y": [1.0, 0.0, 2.0]}
    model = ppl.model(src)
    density = symbolic.density(model.program, model.entry, model.bind((), data))
    point = [0.3, -0.7]
    expected = float(model.log_joint({"beta": point}, **data)[0])
    assert density.function()({"beta": point}) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(PPLError, match="symbolic length") as err:  # refused, located, never wrong
        model.density(data, symbolic_data=True)
    assert "<model>:3" in str(err.value)


def test_delayed_values_in_a_list_are_realised_for_the_product():
    """`X @ [mu, 1.0]` with mu delayed (importance, delayed=True): mu is drawn where the
    product needs it; the evidence is the closed form's within its Monte Carlo error."""
    src = ("def m(X, y):\n    mu ~ normal(0, 1)\n    observe y ~ normal(X @ [mu, 1.0], 1.0)\n    return mu\n")
    X = torch.tensor([[1.0, 0.5], [2.0, -1.0], [0.3, 0.2]], dtype=torch.float64)
    y = torch.tensor([0.7, 1.2, -0.4], dtype=torch.float64)
    r = ppl.model(src).run("importance", {"X": X, "y": y}, particles=4000, delayed=True, seed=3)
    a, c = X[:, 0], X[:, 1]
    exact = float(torch.distributions.MultivariateNormal(c, torch.eye(3, dtype=torch.float64)
                                                         + torch.outer(a, a)).log_prob(y))
    se = math.sqrt((4000 / r.ess - 1) / 4000)
    assert abs(r.log_evidence - exact) < Z * se + 1e-9, (r.log_evidence, exact, se)


def test_pyro_model_of_the_logistic_regression_has_the_same_log_joint():
    pyro = pytest.importorskip("pyro")
    from pyro import poutine
    data = _logreg_data(n=10)
    model = ppl.model(LOGREG)
    f = model.to_pyro()
    for seed in range(3):
        pyro.set_rng_seed(seed)
        tr = poutine.trace(f).get_trace(**data)
        latent = {k: v["value"] for k, v in tr.nodes.items() if v.get("type") == "sample" and not v["is_observed"]}
        assert set(latent) == {"alpha", "beta"}
        one_trace = {k: v.tolist() for k, v in latent.items()}  # (a tensor [3] would be three traces)
        assert float(tr.log_prob_sum()) == pytest.approx(float(model.log_joint(one_trace, **data)), rel=1e-5,
                                                         abs=1e-4)


# ------------------------------------------------------------------ both semantics, every pair
SWEEP_DATA = {"a": [1, 2], "M": [[1, 2], [3, 4]], "B": [True, False], "T": [[1, 0, 2], [0, 1, 1]]}
SWEEP_OPERANDS = ["a", "M", "[1, 2]", "[x, 3]", "x", "a * x", "list(a)", "B", "T", "[[x, 1], [0, x]]", "'s'"]


def _sweep_outcome(body: str, method: str):
    """('ok', the support of the return value, floats) or ('error', None)."""
    m = ppl.model(f"def m(a, M, B, T):\n    k ~ flip(0.5)\n    x = 1 if k else 2\n    return {body}\n")
    try:
        r = m.run(method, SWEEP_DATA, particles=20, seed=0)
    except ppl.PPLError:
        return "error", None

    def key(v):
        return tuple(key(x) for x in v) if isinstance(v, tuple) else float(v)
    return "ok", frozenset(key(k) for k in r.marginal("return"))


def test_every_pair_of_operands_multiplies_the_same_under_enumerate_and_importance():
    """Data vectors and matrices, per-particle vectors and matrices, list literals,
    numbers, a string: for every pair, `p @ q` gives the same values under both semantics
    or an error under both (never a raw Python exception)."""
    differ, products = [], 0
    for p in SWEEP_OPERANDS:
        for q in SWEEP_OPERANDS:
            e, i = _sweep_outcome(f"{p} @ {q}", "enumerate"), _sweep_outcome(f"{p} @ {q}", "importance")
            products += e[0] == "ok"
            if e != i:
                differ.append((f"{p} @ {q}", e, i))
    assert not differ, differ
    assert products >= 30  # (most pairs are products)
    assert _sweep_outcome("M @ a", "enumerate") == ("ok", frozenset({(5.0, 11.0)}))
    assert _sweep_outcome("[x, 3] @ T", "enumerate") == ("ok", frozenset({(1.0, 3.0, 5.0), (2.0, 3.0, 7.0)}))
