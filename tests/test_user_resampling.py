"""Resampling schemes registered with their exact law (``ppl.register_resampling``).

* The worked example ``examples/power_resampling.py``: power resampling (ancestors
  drawn in proportion to w^alpha, compensating weights w / p: a weighted scheme) passes
  ``check_proper`` exactly (to 1e-12, float rounding); the same ancestors without the
  compensating weights fail it by 0.016 on the same program.
* A registered scheme runs wherever a built-in one does: ``Model.run("smc",
  resampling=...)`` (checked against the exact posterior within 4.5 Monte Carlo standard
  errors), the option table (registered after import), the CLI with ``--plugin``; the
  built-in schemes are entries of the same registry; unknown names are errors that list
  the registered ones; tempering, whose population carries no weights, refuses a weighted
  scheme with an error.
"""
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import ppl
from ppl.inference.methods import OPTION_SPECS
from ppl.inference.resampling import RESAMPLING, SCHEMES, systematic, systematic_law, unregister_resampling
from ppl.testing.validity import check_proper, check_resampling_draws, resampling_distribution, smc_algorithm

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[1]
EXACT = 1e-12


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("power_resampling", ROOT / "examples" / "power_resampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # registers "power" and "power_unweighted"
    yield module
    for name in ("power", "power_unweighted"):
        unregister_resampling(name)


def test_power_resampling_is_proper_exactly(example):
    result = example.check("power")
    assert result.max_error <= EXACT and result.ok(), result
    assert result.outcomes == 40  # 2 particles: prior draws and resampling, every branch


def test_power_resampling_without_its_weights_is_caught(example):
    result = example.check("power_unweighted")
    assert result.max_error > 1e-2 and not result.ok(), result
    assert abs(result.observed[True] - 0.119190879144) < 1e-9  # E[Z_hat w(z = True)]: 0.135 when proper


def test_the_registered_law_is_unbiased(example):
    """One resampling step alone: E[(1/n) sum_k exp(lw'_k) 1{a_k = i}] = w_i, mass 1."""
    for w in ([0.2, 0.3, 0.5], [0.7, 0.0, 0.3], [0.05, 0.15, 0.35, 0.45]):
        for n in (1, 2, 3):
            law = resampling_distribution(w, "power", n)
            assert abs(sum(law.values()) - 1) <= EXACT
            for i in range(len(w)):
                mean = sum(p * sum(math.exp(l) for a, l in zip(anc, lw) if a == i) / n
                           for (anc, lw), p in law.items())
                assert abs(mean - w[i]) <= EXACT, (w, n, i)


def test_a_registered_scheme_runs_through_model_run(example):
    exact = example.MODEL.run("enumerate", {})
    p = float(exact.mean("return"))
    r = example.MODEL.run("smc", {}, particles=4000, resampling="power", seed=0)
    se = math.sqrt(p * (1 - p) / r.ess)
    assert abs(r.mean("return") - p) < 4.5 * se
    assert "power" in SCHEMES and OPTION_SPECS["resampling"].check("resampling", "power") == "power"


def test_a_registered_scheme_runs_from_the_cli(tmp_path):
    (tmp_path / "m.ppl").write_text("def m():\n    z ~ flip(0.3)\n    observe True ~ bernoulli(0.9 if z else 0.1)\n"
                                    "    return z\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "ppl", "run", str(tmp_path / "m.ppl"), "--method", "smc", "-n", "2000",
                          "--seed", "0", "--plugin", "power_resampling", "-o", "resampling=power", "--json"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    mean = json.loads(out.stdout)["posterior"]["return"]["mean"]
    p = 0.27 / 0.34
    assert abs(mean - p) < 4.5 * math.sqrt(p * (1 - p) / 1000)  # ESS >= 1000 of 2000 here


def test_builtin_schemes_are_entries_of_the_same_registry():
    assert list(RESAMPLING)[:4] == ["multinomial", "stratified", "systematic", "residual"]
    assert RESAMPLING["systematic"].draw is systematic and RESAMPLING["systematic"].law is systematic_law
    assert not any(RESAMPLING[s].weighted for s in ("multinomial", "stratified", "systematic", "residual"))


def test_registering_a_name_twice_needs_replace():
    with pytest.raises(ValueError, match="already registered"):
        ppl.register_resampling("systematic", systematic, systematic_law)


def test_an_unknown_scheme_is_an_error_naming_the_registered_ones():
    with pytest.raises(ValueError, match="registered: multinomial, stratified, systematic, residual"):
        resampling_distribution([0.5, 0.5], "sorted", 2)
    m = ppl.model("def m():\n    z ~ flip(0.3)\n    observe True ~ bernoulli(0.9 if z else 0.1)\n    return z\n")
    with pytest.raises(ppl.PPLError, match="unknown resampling scheme 'sorted'"):
        check_proper(m, smc_algorithm(2, resampling="sorted"))


def test_tempering_refuses_a_weighted_scheme(example):
    m = ppl.model("def m():\n    mu ~ normal(0, 1)\n    observe 1.0 ~ normal(mu, 1)\n    return mu\n")
    with pytest.raises(ppl.PPLError, match="tempering needs an unweighted resampling scheme"):
        m.run("tempering", {}, particles=50, resampling="power", seed=0)


@pytest.mark.parametrize("scheme", ["power", "multinomial", "stratified", "systematic", "residual"])
def test_the_draws_follow_the_registered_law(example, scheme):
    for w in ([0.1, 0.0, 0.6, 0.3], [0.05, 0.15, 0.35, 0.45]):
        result = check_resampling_draws(scheme, w, 4, draws=2000, seed=3)
        assert result.ok(), (scheme, w, result.unexpected[:3], result.weight_error, result.p_value)


def test_a_law_that_does_not_describe_its_draw_is_caught(example):
    """Power resampling's draw registered with systematic resampling's law on w (not on
    w^alpha): check_proper would pass it (that law is proper), the draw check does not."""
    ppl.register_resampling("mislabelled", example.power_draw,
                            lambda w, n: {(a, tuple(0.0 for _ in a)): p for a, p in systematic_law(w, n).items()},
                            weighted=True)
    try:
        result = check_resampling_draws("mislabelled", [0.05, 0.15, 0.35, 0.45], 4, draws=2000, seed=3)
        assert not result.ok() and (result.unexpected or result.weight_error > 1e-3)
    finally:
        unregister_resampling("mislabelled")
