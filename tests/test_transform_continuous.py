"""Checking transformations of continuous programs (``check_transformation`` beyond
enumeration; ``ppl/testing/density_check.py``).

A transformation declares how it maps choices (``semantics.choice_map.ChoiceMap``);
the check compares the joint densities through that map with its Jacobian: with sympy
where both programs are static, else at prior traces of the new program. Correct
non-centring (the ``non_centre`` pass) and centring pass on eight schools and random
conjugate programs; a non-centring that uses the mean as the scale -- self-consistent, so
simulation-based calibration cannot see it -- is caught, and so is a log-transform of a
positive choice without its Jacobian, a marginalisation that forgets the prior, and an
"identity" pass that changes a constant.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import sympy as sp
from hypothesis import HealthCheck, assume, given, settings

import ppl
from ppl.compiler import parse_program
from ppl.compiler.transforms import NonCentre, non_centre
from ppl.semantics import ir
from ppl.semantics.choice_map import ChoiceMap
from ppl.semantics.errors import PPLError
from ppl.testing.density_check import DensityCheck
from ppl.testing.strategies import conjugate_programs
from ppl.testing.validity import TransformCheck, check_transformation

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DATA = json.loads((EXAMPLES / "eight_schools.json").read_text())

CENTRED = """def eight_schools(y, sigma):
    mu ~ normal(0, 5)
    tau ~ half_cauchy(5)
    theta ~ normal(mu + zeros(len(y)), tau)
    observe y ~ normal(theta, sigma)
    return theta
"""


class MeanAsScale(NonCentre):
    """The broken non-centring: x = m + m * x_raw (and it declares that map)."""

    def value(self, m, s, raw, span):
        return ir.BinOp("+", m, ir.BinOp("*", m, raw, span=span), span=span)


def replaced_by(source: str, choice_map: ChoiceMap):
    """A hand-written transformation: any program -> the program in ``source``."""
    def transform(program):
        return parse_program(source, "<transformed>")
    transform.choice_map = choice_map
    return transform


# ------------------------------------------------------------------------ eight schools
def test_non_centring_eight_schools_passes():
    check = check_transformation(non_centre("theta"), ppl.model(CENTRED), DATA)
    assert isinstance(check, DensityCheck) and check.method == "symbolic"
    assert check.proved and check.ok() and check.max_error < 1e-12 and len(check.errors) == 20


def test_centring_eight_schools_passes():
    example = ppl.model(str(EXAMPLES / "eight_schools.ppl"))
    centring = replaced_by(CENTRED, ChoiceMap.reparameterisation({"theta_tilde": "(theta - mu) / tau"},
                                                                 new=("theta",)))
    check = check_transformation(centring, example, DATA)
    assert check.proved and check.ok()


def test_mean_as_scale_non_centring_is_caught():
    check = check_transformation(MeanAsScale("theta"), ppl.model(CENTRED), DATA)
    assert not check.proved and not check.ok()
    assert check.max_error > 1e-3
    assert "theta_raw" in str(check.difference)


def test_centring_with_a_wrong_map_is_caught():
    example = ppl.model(str(EXAMPLES / "eight_schools.ppl"))
    centring = replaced_by(CENTRED, ChoiceMap.reparameterisation({"theta_tilde": "theta - mu"}, new=("theta",)))
    assert not check_transformation(centring, example, DATA).ok()


# ------------------------------------------------------------------ conjugate programs
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conjugate_programs())
def test_conjugate_programs_transformations(program):
    source, data, _ = program
    model = ppl.model(source)
    if "normal(m0, s0)" in source:
        assert check_transformation(non_centre("mu"), model, data).ok()
        assume(abs(abs(data["m0"]) - data["s0"]) > 1e-3)  # there mean-as-scale is correct
        assert not check_transformation(MeanAsScale("mu"), model, data).ok()
    else:  # no normal choice: the identity passes are checked by density too
        check = check_transformation("optimize", model, data)
        assert isinstance(check, DensityCheck) and check.kind == "identity" and check.ok()


# --------------------------------------------------------------- a log-transformation
POSITIVE = """def model(y):
    tau ~ half_cauchy(5)
    observe y ~ normal(0, tau)
    return tau
"""

LOG_SCALE = """def model(y):
    tau_log ~ normal(0, 1)
    tau = exp(tau_log)
    observe tau ~ half_cauchy(5)
    factor tau_log - (-tau_log ** 2 / 2 - log(2 * pi) / 2){jacobian}
    observe y ~ normal(0, tau)
    return tau
"""


def log_transform(jacobian: bool):
    source = LOG_SCALE.format(jacobian="" if jacobian else " - tau_log")
    return replaced_by(source, ChoiceMap.reparameterisation({"tau": "exp(tau_log)"}, new=("tau_log",)))


def test_log_transform_with_its_jacobian_passes():
    check = check_transformation(log_transform(jacobian=True), ppl.model(POSITIVE), {"y": 1.3})
    assert check.proved and check.ok()


def test_log_transform_without_its_jacobian_is_caught():
    check = check_transformation(log_transform(jacobian=False), ppl.model(POSITIVE), {"y": 1.3})
    assert not check.ok()
    assert sp.simplify(check.difference - sp.Symbol("tau_log", real=True)) == 0  # exactly the log-Jacobian


# ------------------------------------------------- non-static programs: random traces
BRANCHING = """def model(y):
    mu ~ normal(0, 2)
    tau ~ half_normal(1)
    x ~ normal(mu, tau)
    if x > 0:
        observe y ~ normal(x, 1)
    else:
        observe y ~ normal(-x, 2)
    return x
"""


def test_non_static_program_is_checked_on_traces():
    check = check_transformation(non_centre("x"), ppl.model(BRANCHING), {"y": 0.8})
    assert check.method == "traces" and "not static" in check.reason
    assert check.ok() and len(check.errors) == 20


def test_non_static_broken_non_centring_is_caught():
    check = check_transformation(MeanAsScale("x"), ppl.model(BRANCHING), {"y": 0.8})
    assert check.method == "traces" and not check.ok()


# ------------------------------------------------------------------- marginalisation
MIXTURE = """def model(y):
    mu ~ normal(0, 3)
    z ~ flip(0.3)
    observe y ~ normal(mu if z else -mu, 1)
    return mu
"""

MARGINAL = """def model(y):
    mu ~ normal(0, 3)
    factor logsumexp([{prior1} - (y - mu) ** 2 / 2, {prior0} - (y + mu) ** 2 / 2]) - log(2 * pi) / 2
    return mu
"""


def test_marginalising_a_discrete_choice_passes():
    summed = replaced_by(MARGINAL.format(prior1="log(0.3)", prior0="log(0.7)"), ChoiceMap.marginalisation(["z"]))
    check = check_transformation(summed, ppl.model(MIXTURE), {"y": 1.1})
    assert check.kind == "marginalisation" and check.ok()


def test_marginalisation_that_forgets_the_prior_is_caught():
    summed = replaced_by(MARGINAL.format(prior1="0", prior0="0"), ChoiceMap.marginalisation(["z"]))
    assert not check_transformation(summed, ppl.model(MIXTURE), {"y": 1.1}).ok()


# ----------------------------------------------------------------------- identity
def test_identity_pass_on_a_continuous_program():
    check = check_transformation("optimize", ppl.model(str(EXAMPLES / "eight_schools.ppl")), DATA)
    assert check.kind == "identity" and check.proved and check.ok()


def test_identity_that_changes_a_constant_is_caught():
    changed = replaced_by(CENTRED.replace("normal(0, 5)", "normal(0, 4)"), ChoiceMap.identity())
    assert not check_transformation(changed, ppl.model(CENTRED), DATA).ok()


def test_finite_programs_still_checked_exactly():
    model = ppl.model("def m():\n    a ~ flip(0.5)\n    b = 1 + 1\n    return a\n")
    assert isinstance(check_transformation("optimize", model), TransformCheck)


def test_undeclared_replaced_choice_is_an_error():
    undeclared = replaced_by(CENTRED.replace("theta ~ normal(mu + zeros(len(y)), tau)",
                                             "theta_raw ~ normal(zeros(len(y)), 1)\n    theta = mu + tau * theta_raw"),
                             ChoiceMap.identity())
    with pytest.raises(PPLError, match="'theta' is not in the new program"):
        check_transformation(undeclared, ppl.model(CENTRED), DATA)


# ------------------------------------------- integrating out continuous choices (quadrature)
NORMAL_NORMAL = """def model(y):
    s ~ half_normal(1)
    mu ~ normal(0, 2)
    observe y ~ normal(mu, s)
    return s
"""

NORMAL_MARGINAL = """def model(y):
    s ~ half_normal(1)
    observe y ~ normal(0, sqrt(4 + s ** 2))
    return s
"""


def test_integrating_out_a_normal_mean_passes():
    summed = replaced_by(NORMAL_MARGINAL, ChoiceMap.marginalisation(["mu"]))
    check = check_transformation(summed, ppl.model(NORMAL_NORMAL), {"y": 1.3}, traces=6)
    assert check.method == "symbolic+quadrature" and check.ok() and check.max_error < 1e-10


def test_integrating_out_that_forgets_the_observation_noise_is_caught():
    summed = replaced_by(NORMAL_MARGINAL.replace("sqrt(4 + s ** 2)", "2"), ChoiceMap.marginalisation(["mu"]))
    assert not check_transformation(summed, ppl.model(NORMAL_NORMAL), {"y": 1.3}, traces=6).ok()


BETA_BERNOULLI = """def model(f0, f1):
    p ~ beta(2, 3)
    observe f0 ~ bernoulli(p)
    observe f1 ~ bernoulli(p)
    return f1
"""

PREDICTIVE = """def model(f0, f1):
    observe f0 ~ bernoulli(2 / 5)
    observe f1 ~ bernoulli((2 + f0) / 6)
    return f1
"""


def test_integrating_out_a_beta_probability_passes():
    summed = replaced_by(PREDICTIVE, ChoiceMap.marginalisation(["p"]))
    for f0, f1 in ((True, False), (False, False), (True, True)):
        check = check_transformation(summed, ppl.model(BETA_BERNOULLI), {"f0": f0, "f1": f1}, traces=1)
        assert check.ok(), check
    broken = replaced_by(PREDICTIVE.replace("(2 + f0) / 6", "2 / 5"), ChoiceMap.marginalisation(["p"]))
    assert not check_transformation(broken, ppl.model(BETA_BERNOULLI), {"f0": True, "f1": True}, traces=1).ok()
