"""Inputs that used to be accepted silently (issue 9, items 6, 12 and 17): shapes that do
not fit, method options out of range, infinite best-of-N scores, the product of experts'
run(), and Python functions handing non-values back to a model. Each is now the right
answer or a PPLError that names what is wrong (with the source line where there is one)."""
from __future__ import annotations

import math
import os
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

import ppl
from ppl.cli import main
from ppl.inference.methods import OPTION_SPECS
from ppl.semantics.errors import PPLError, PPLRuntimeError

torch.set_num_threads(1)

FILE = "shapes.ppl"
GAUSSIAN_MEAN = """
def gaussian_mean(ys, sigma):
    mu ~ normal(0, 5)
    for y in ys:
        observe y ~ normal(mu, sigma)
    return mu
"""
INDEXED = """
def indexed(ys, sigma):
    mu ~ normal(0, 5)
    for i in range(len(ys)):
        observe ys[i] ~ normal(mu, sigma[i])
    return mu
"""


def located(err: PPLError, line: int, text: str) -> None:
    """The error points at ``line`` of FILE, showing ``text``, with a caret."""
    s = str(err)
    assert f"{FILE}:{line}:" in s and text in s and "^" in s, s


# --------------------------------------------------------------------- shapes
@pytest.mark.parametrize("method", ["importance", "smc", "mh", "enumerate"])
def test_scalar_observed_under_a_vector_of_scales_is_an_error(method):
    # {"ys": [1, 2], "sigma": [2, 3, 4]} for a model written for one sigma: each y would be
    # scored under three normals (the likelihood counted three times)
    m = ppl.model(GAUSSIAN_MEAN.replace("normal(0, 5)", "categorical([1, 1])"), filename=FILE)
    with pytest.raises(PPLRuntimeError, match=r"the value has shape \[\] but the distribution's parameters have "
                                              r"shape \[3\]: the value would be scored 3 times") as e:
        m.run(method, {"ys": [1, 2], "sigma": [2, 3, 4]}, particles=20, seed=0)
    located(e.value, 5, "observe y ~ normal(mu, sigma)")


def test_indexing_a_longer_parameter_list_is_fine():
    # the same data, indexed per observation: sigma[2] is simply unused; the closed form
    # of the normal-normal posterior (prior sd 5, noise sd 2 and 3) is the answer
    m = ppl.model(INDEXED, filename=FILE)
    r = m.run("importance", {"ys": [1.0, 2.0], "sigma": [2.0, 3.0, 4.0]}, particles=20_000, seed=0)
    prec = 1 / 25 + 1 / 4 + 1 / 9
    mean, sd = (1.0 / 4 + 2.0 / 9) / prec, prec ** -0.5
    assert abs(r.mean() - mean) < 4.5 * sd / math.sqrt(r.ess)


def test_value_of_one_element_against_a_vector_is_an_error_in_both_semantics():
    m = ppl.model("def m(ps):\n    observe [True] ~ flip(ps)\n    return 1\n", filename=FILE)
    for method in ("enumerate", "importance"):
        with pytest.raises(PPLRuntimeError, match=r"shape \[1\] but .* shape \[2\]") as e:
            m.run(method, {"ps": [0.5, 0.25]}, particles=4)
        located(e.value, 2, "observe [True] ~ flip(ps)")


def test_vector_observations_under_one_distribution_are_still_iid():
    m = ppl.model("def m(xs, ps):\n    observe xs ~ flip(ps)\n    return 1\n")
    for data, z in [({"xs": [True, False], "ps": 0.25}, Fraction(3, 16)),
                    ({"xs": [True, False], "ps": [0.25]}, Fraction(3, 16)),
                    ({"xs": [True, False], "ps": [0.5, 0.25]}, Fraction(3, 8))]:
        assert m.run("enumerate", data).evidence == z
        assert m.run("importance", data, particles=4).log_evidence == pytest.approx(math.log(z), abs=1e-6)


def test_arithmetic_on_shapes_that_do_not_broadcast_names_them():
    m = ppl.model("def m(a, b):\n    x ~ normal(0, 1)\n    return a * x + b\n", filename=FILE)
    with pytest.raises(PPLRuntimeError, match=r"cannot apply \+ to values of shapes \[2\] and \[3\]") as e:
        m.run("importance", {"a": [1.0, 2.0], "b": [1.0, 2.0, 3.0]}, particles=5, seed=0)
    located(e.value, 3, "return a * x + b")


RAGGED = {"xs": [[1], [0, 1]]}


def test_ragged_data_stays_a_list_of_lists():
    m = ppl.model("def m(xs):\n    return [len(xs[0]), len(xs[1]), sum(xs[1])]\n")
    for method in ("enumerate", "importance"):
        assert m.run(method, RAGGED, particles=3).marginal() == {(1, 2, 1): 1}
    # a ragged list as a value is shown as the lists it is (never broadcast to [[1, 1], [0, 1]])
    twice = ppl.model("def m(xs):\n    return xs * 2\n")
    want = {((1,), (0, 1), (1,), (0, 1)): 1}
    assert twice.run("importance", RAGGED, particles=3).marginal() == pytest.approx(want)
    assert twice.run("enumerate", RAGGED).marginal() == want


def test_ragged_data_observed_under_a_scalar_distribution_scores_each_item():
    # the exact semantics: independent observations of 1, 0, 1; the sampling semantics used
    # to broadcast [1] to [1, 1] (one observation too many)
    m = ppl.model("def m(xs):\n    p ~ beta(1, 1)\n    observe xs ~ bernoulli(p)\n    return p\n")
    lj = m.log_joint({"p": torch.tensor([0.3])}, **RAGGED)
    assert float(lj[0]) == pytest.approx(math.log(0.3 * 0.7 * 0.3) + 0.0, abs=1e-6)
    flips = ppl.model("def m(xs):\n    p ~ categorical([1, 1, 1])\n    observe xs ~ flip(0.25 * (p + 1))\n"
                      "    return p\n")
    exact = flips.run("enumerate", RAGGED)
    want = {p: (0.25 * (p + 1)) ** 2 * (1 - 0.25 * (p + 1)) for p in range(3)}
    z = sum(want.values())
    assert float(exact.evidence) == pytest.approx(z / 3, abs=1e-12)
    r = flips.run("importance", RAGGED, particles=4000, seed=0)
    assert r.log_evidence == pytest.approx(math.log(z / 3), abs=0.05)


def test_ragged_data_used_as_a_tensor_is_a_clear_error():
    m = ppl.model("def m(xs, ps):\n    observe xs ~ flip(ps)\n    return 1\n", filename=FILE)
    with pytest.raises(PPLRuntimeError, match=r"a ragged list \(items of shapes \[1\] and \[2\]\) cannot be used "
                                              "as a tensor") as e:
        m.run("importance", {"xs": [[True], [False, True]], "ps": [0.5, 0.5]}, particles=3)
    located(e.value, 2, "observe xs ~ flip(ps)")
    m2 = ppl.model("def m(xs):\n    x ~ normal(xs, 1)\n    return x\n", filename=FILE)
    with pytest.raises(PPLRuntimeError, match="ragged list") as e:
        m2.run("importance", RAGGED, particles=3)
    located(e.value, 2, "x ~ normal(xs, 1)")


@pytest.mark.parametrize("method", ["importance", "smc", "mh"])
def test_empty_parameter_is_an_error(method):
    m = ppl.model("def m():\n    x ~ normal(0, [])\n    return x\n", filename=FILE)
    with pytest.raises(PPLRuntimeError, match=r"normal: parameter 'scale' is empty") as e:
        m.run(method, particles=4, seed=0)
    located(e.value, 2, "x ~ normal(0, [])")


@pytest.mark.parametrize("src, param", [("x ~ flip([])", "flip: parameter 'p'"),
                                        ("observe True ~ flip([])", "flip: parameter 'p'"),
                                        ("x ~ poisson([])", "poisson: parameter 'rate'")])
@pytest.mark.parametrize("method", ["enumerate", "importance"])
def test_empty_parameter_is_an_error_in_both_semantics(src, param, method):
    # (observing under flip([]) used to be a likelihood of 1 under enumerate: no factor at all)
    m = ppl.model(f"def m():\n    {src}\n    return 1\n", filename=FILE)
    with pytest.raises(PPLRuntimeError, match=f"{param} (is empty|must be a number)") as e:
        m.run(method, particles=3, seed=0)
    located(e.value, 2, src)


def test_observing_an_empty_list_is_no_observation():
    m = ppl.model("def m():\n    observe [] ~ flip(0.5)\n    return 1\n")
    assert m.run("enumerate").evidence == 1
    assert m.run("importance", particles=3).log_evidence == 0.0


# -------------------------------------------------------------------- options
M = ppl.model("def m():\n    x ~ normal(0, 1)\n    observe 1.0 ~ normal(x, 1)\n    return x\n")
BAD_OPTIONS = [
    ("smc", "ess_threshold", math.nan, "a number in [0, 1]"),
    ("smc", "ess_threshold", -1, "a number in [0, 1]"),
    ("smc", "ess_threshold", 1.5, "a number in [0, 1]"),
    ("smc_steer", "ess_threshold", math.inf, "a number in [0, 1]"),
    ("resample_move", "moves", -1, "an integer >= 0"),
    ("resample_move", "moves", 1.5, "an integer >= 0"),
    ("tempering", "moves", -1, "an integer >= 0"),
    ("tempering", "target_ess", 0, "a number in (0, 1)"),
    ("tempering", "target_ess", 1.0, "a number in (0, 1)"),
    ("mh", "samples", 0, "a positive integer (at least 1)"),
    ("mh", "burn_in", -1, "an integer >= 0"),
    ("mh", "thin", 0, "a positive integer (at least 1)"),
    ("mh", "chains", 0, "a positive integer (at least 1)"),
    ("mh", "scale", 0, "a positive finite number"),
    ("mh", "scale", math.inf, "a positive finite number"),
    ("mh", "scale", "big", "a positive finite number"),
    ("mh", "traced", "maybe", "true, false or 'auto'"),
    ("pmmh", "samples", True, "a positive integer (at least 1)"),
    ("smc_steer", "expansion", 0, "a positive integer (at least 1)"),
    ("smc", "resampling", "sorted", "one of 'multinomial', 'stratified', 'systematic', 'residual'"),
    ("enumerate", "max_paths", 0, "a positive integer (at least 1)"),
    ("importance", "particles", -1, "a positive integer (at least 1)"),
    ("importance", "particles", math.nan, "a positive integer (at least 1)"),
]


@pytest.mark.parametrize("method, name, value, allowed", BAD_OPTIONS)
def test_bad_option_values_are_errors_naming_option_value_and_range(method, name, value, allowed):
    options = {"particles": 10, name: value}
    with pytest.raises(PPLError) as e:
        M.run(method, {}, seed=0, **options)
    assert str(e.value).startswith(f"error: {name} must be {allowed} (got {value!r})"), str(e.value)


def test_good_option_values_pass_and_are_normalised():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2 short chains: the convergence diagnostics warn
        r = M.run("mh", {}, particles=2, seed=0, samples=20.0, burn_in=np.int64(5), thin=1,
                  scale=np.float32(0.5), traced="false")
    assert (r.chains, r.draws) == (2, 20) and r.extra["burn_in"] == 5 and r.extra["traced"] is False
    assert OPTION_SPECS["samples"].check("samples", 20.0) == 20 and \
        type(OPTION_SPECS["samples"].check("samples", 20.0)) is int
    assert OPTION_SPECS["ess_threshold"].check("ess_threshold", 0) == 0.0
    assert OPTION_SPECS["chains"].check("chains", None) is None


@pytest.mark.parametrize("option, text", [("ess_threshold=NaN", "ess_threshold must be a number in [0, 1] (got nan)"),
                                          ("ess_threshold=-1", "ess_threshold must be a number in [0, 1] (got -1)"),
                                          ("moves=-1", "moves must be an integer >= 0 (got -1)")])
def test_cli_options_are_checked_by_the_same_table(tmp_path, capsys, option, text):
    model = tmp_path / "m.ppl"
    model.write_text("def m():\n    x ~ normal(0, 1)\n    observe 1.0 ~ normal(x, 1)\n    return x\n")
    method = "resample_move" if option.startswith("moves") else "smc"
    rc = main(["run", str(model), "--method", method, "-n", "10", "-o", option])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and "Traceback" not in err
    assert text in err, err


def test_ppl_infer_checks_options_too():
    f = ppl.infer(M, method="smc", particles=10, ess_threshold=2.0)
    with pytest.raises(PPLError, match=r"ess_threshold must be a number in \[0, 1\] \(got 2.0\)"):
        f()


# ------------------------------------------------------------------ best_of_n
@pytest.mark.parametrize("src, line, what", [
    ("def m():\n    x ~ normal(0, 1)\n    factor inf if x > 0 else 0.0\n    return x\n", 3, "+inf"),
    ("def m():\n    x ~ flip(0.5)\n    observe 0.0 ~ beta(0.5, 0.5)\n    return x\n", 3, "+inf"),
])
def test_best_of_n_with_an_infinite_score_is_an_error(src, line, what):
    m = ppl.model(src, filename=FILE)
    with pytest.raises(PPLRuntimeError, match=f"best_of_n: this makes a candidate's score \\{what}") as e:
        m.run("best_of_n", particles=20, seed=0)
    assert f"{FILE}:{line}:" in str(e.value) and "bound it" in str(e.value)


def test_best_of_n_with_finite_scores_picks_the_maximum():
    m = ppl.model("def m():\n    x ~ categorical([1, 1, 1, 1])\n    factor 10.0 * x\n    return x\n")
    r = m.run("best_of_n", particles=200, seed=0)
    assert r.score == 30.0 and float(r.mean()) == 3.0


# -------------------------------------------------------------- product of experts
E1 = "def m1():\n    a ~ flip(0.3)\n    observe True ~ bernoulli(0.8 if a else 0.3)\n    return a\n"
E2 = "def m2():\n    a ~ flip(0.6)\n    return a\n"
# p1(a) p2(a)^2 = 0.3 * 0.8 * 0.6^2 = 0.0864 (a) and 0.7 * 0.3 * 0.4^2 = 0.0336 (not a)
PRODUCT = {True: 0.0864, False: 0.0336}


def test_product_run_has_model_run_signature():
    p = ppl.product(ppl.model(E1), ppl.model(E2), a=1.0, b=2.0)
    z = sum(PRODUCT.values())
    r = p.run("importance", particles=20_000, seed=0)
    q = PRODUCT[True] / z
    assert abs(r.marginal()[True] - q) < 4.5 * math.sqrt(q * (1 - q) / r.ess)
    e = p.run("enumerate")
    assert e.marginal()[True] == pytest.approx(q, abs=1e-6)
    assert e.log_evidence == pytest.approx(math.log(z), abs=1e-6)
    r2 = p.run("importance", {}, particles=100, seed=0, data2={})
    assert r2.n == 100


def test_product_run_refuses_methods_and_options_it_does_not_have():
    p = ppl.product(ppl.model(E1), ppl.model(E2))
    for method in ("smc", "mh", "tempering", "prior", "best_of_n"):
        with pytest.raises(PPLError, match=f"a product of experts cannot run the method '{method}'") as e:
            p.run(method)
        assert "importance, enumerate" in str(e.value)
    with pytest.raises(PPLError, match="has no option 'moves'"):
        p.run("importance", moves=2)
    with pytest.raises(PPLError, match="particles must be a positive integer"):
        p.run("importance", particles=0)


def test_product_run_old_positional_data_still_works_with_a_deprecation_warning():
    m1 = ppl.model("def m1(w):\n    a ~ flip(0.5)\n    factor w if a else 0.0\n    return a\n")
    m2 = ppl.model("def m2(v):\n    a ~ flip(0.5)\n    factor v if a else 0.0\n    return a\n")
    p = ppl.product(m1, m2)
    with pytest.warns(DeprecationWarning, match="run\\(method, data, data2=...\\)"):
        old = p.run({"w": 1.0}, {"v": 1.0}, particles=500, seed=3)
    new = p.run("importance", {"w": 1.0}, data2={"v": 1.0}, particles=500, seed=3)
    assert torch.equal(old.log_weights, new.log_weights)
    # each a has prior 1/2 under both, p1 p2 / prior1 weights a by e^2: P(a) = e^2 / (1 + e^2)
    assert p.run("enumerate", {"w": 1.0}, data2={"v": 1.0}).marginal()[True] == \
        pytest.approx(math.e ** 2 / (1 + math.e ** 2), abs=1e-6)


# ---------------------------------------------------- Python functions as data
CALLS_F = "def m(f):\n    x ~ normal(0, 1)\n    y = f(x)\n    return y\n"


class _Thing:
    pass


@pytest.mark.parametrize("fn, kind", [
    (lambda x: os, "a module"),
    (lambda x: os.system, "a function"),
    (lambda x: (lambda: 0), "a function"),
    (lambda x: int, "a class"),
    (lambda x: _Thing(), "an object of type '_Thing'"),
    (lambda x: {"a": 1}, "an object of type 'dict'"),
    (lambda x: [1.0, os], "a module"),
    (lambda x: np.array([os], dtype=object), "an array of Python objects"),
])
def test_python_function_returning_a_non_value_is_a_located_error(fn, kind):
    m = ppl.model(CALLS_F, filename=FILE)
    with pytest.raises(PPLRuntimeError, match=f"the Python function 'f' returned {kind}, which a model cannot use") \
            as e:
        m.run("importance", {"f": fn}, particles=3, seed=0)
    located(e.value, 3, "y = f(x)")


def test_python_function_returning_values_works():
    m = ppl.model(CALLS_F)
    for fn, want in [(lambda x: x * 2, None), (lambda x: np.float64(2.5), 2.5), (lambda x: np.array(3.0), 3.0),
                     (lambda x: (1, 2.0), None), (lambda x: "s", None), (lambda x: None, None)]:
        r = m.run("importance", {"f": fn}, particles=4, seed=0)
        if want is not None:
            assert float(r.mean()) == want
    doubled = m.run("importance", {"f": lambda x: x * 2}, particles=4, seed=0)
    assert torch.allclose(doubled.samples["return"], 2 * doubled.samples["x"])
