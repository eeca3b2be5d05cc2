"""Errors raised by a model's text carry its location (issue 9 item 15, last part).

Each class below was found by ``ppl.testing.fuzz`` (which now fails on a ``PPLError``
from a mutant model that has no ``file:line:col``): before the fix each printed as a bare
``runtime error: ...`` (or crashed, or hung). Errors about run arguments and budgets
(particles, seed, options, max_paths) legitimately have no location; errors about the
data file point into the data file."""
from __future__ import annotations

import json
import math

import pytest
import torch

import ppl
from ppl import cli
from ppl.semantics.errors import PPLRuntimeError, ZeroEvidenceError

torch.set_num_threads(1)


def located_at(err: ppl.PPLError, line: int, filename: str = "m.ppl") -> bool:
    span = err.span
    return span is not None and span.source is not None and span.line == line and span.filename == filename


# ------------------------------------------------------ zero evidence in a seeded run
def test_zero_evidence_in_a_seeded_importance_run_names_the_killing_site():
    """The locator replays the run from the same random state; a seeded run draws from
    its own generator (not torch's global one), which the replay must restore too —
    otherwise the replay saw other draws, some particle survived, and the error had no
    location. P(x > 1.5) = 0.067, so 8 particles all die for about half the seeds."""
    m = ppl.model("def m():\n    x ~ normal(0, 1)\n    condition x > 1.5\n    return x\n", filename="m.ppl")
    raised = 0
    for seed in range(16):
        try:
            m.run("importance", particles=8, seed=seed)
        except ZeroEvidenceError as err:
            raised += 1
            assert located_at(err, 3), (seed, str(err))
            assert "after this condition" in err.message
    assert raised >= 3


def test_zero_likelihood_in_a_seeded_tempering_run_names_the_killing_site():
    """Tempering's prior draws all of zero likelihood: the error replays those draws to
    say where they died (it had no location)."""
    m = ppl.model("def m():\n    x ~ normal(0, 1)\n    condition x > 1.5\n    return x\n", filename="m.ppl")
    raised = 0
    for seed in range(16):
        try:
            m.run("tempering", particles=8, seed=seed)
        except ZeroEvidenceError as err:
            raised += 1
            assert located_at(err, 3) and "after this condition" in err.message, (seed, str(err))
    assert raised >= 3


# ------------------------------------------------------------- NaN log densities
NAN_OBSERVE = """def m():
    mu ~ normal(0, 1)
    observe inf - inf ~ normal(mu, 1)
    return mu
"""


@pytest.mark.parametrize("method", ["importance", "smc"])
def test_a_nan_log_density_is_an_error_at_the_observe(method):
    with pytest.raises(PPLRuntimeError) as info:
        ppl.model(NAN_OBSERVE, filename="m.ppl").run(method, particles=8, seed=1)
    assert located_at(info.value, 3) and "log density is NaN" in info.value.message


def test_a_nan_log_density_on_dead_particles_only_is_no_error():
    """A particle of weight zero never raises: its NaN density counts as -inf, and the
    live particles are weighted exactly as without it."""
    nan_on_dead = "def m():\n    x ~ normal(0, 1)\n    condition x > 0\n" \
                  "    observe (0 if x > 0 else inf - inf) ~ normal(x, 1)\n    return x\n"
    plain = "def m():\n    x ~ normal(0, 1)\n    condition x > 0\n    observe 0 ~ normal(x, 1)\n    return x\n"
    a = ppl.model(nan_on_dead, filename="m.ppl").run("importance", particles=64, seed=3)
    b = ppl.model(plain, filename="m.ppl").run("importance", particles=64, seed=3)
    assert math.isfinite(a.log_evidence) and a.log_evidence == b.log_evidence


# ------------------------------------------------------------------- twist potentials
def twist_model(phi: str) -> ppl.Model:
    return ppl.model(f"def m():\n    z ~ flip(0.5)\n    twist({phi})\n    twist(0)\n    return z\n",
                     filename="m.ppl")


@pytest.mark.parametrize("phi, what", [("inf - inf", "NaN"), ("0 if z else inf", "+inf")])
def test_a_nan_or_plus_inf_twist_is_an_error_at_the_twist(phi, what):
    with pytest.raises(PPLRuntimeError) as info:
        twist_model(phi).run("importance", particles=32, seed=1)
    assert located_at(info.value, 3) and info.value.message == f"twist received {what}"


def test_a_minus_inf_twist_kills_the_particle_without_nan_weights():
    """twist(-inf) then twist(0) used to give the weight -inf + inf = NaN ("a particle's
    log weight is NaN", no location); the particle is dead and stays so."""
    res = twist_model("0 if z else -inf").run("importance", particles=200, seed=1)
    assert res.marginal() == {True: pytest.approx(1.0, abs=1e-12)} and math.isfinite(res.log_evidence)


# ------------------------------------------------------------------------------ MH
@pytest.mark.parametrize("method, options, message", [
    ("mh", dict(samples=10, burn_in=2, chains=2), "MH: no chain found a trace of positive probability"),
    ("tempering", dict(particles=8), "tempering: every prior draw has zero likelihood"),
])
def test_no_trace_of_positive_probability_names_the_site(method, options, message):
    m = ppl.model("def m():\n    x ~ normal(0, 1)\n    condition x > 100\n    return x\n", filename="m.ppl")
    with pytest.raises(PPLRuntimeError) as info:
        m.run(method, seed=1, **options)
    assert located_at(info.value, 3) and info.value.message.startswith(message)
    assert "after this condition" in info.value.message


def test_mh_with_a_prior_of_density_nan_everywhere_names_the_choice():
    """lognormal(0, 1e30) draws only 0 or inf, each of log density NaN or -inf: MH finds
    no starting trace and now says at which choice (no observe/condition is to blame).
    (beta(1e400, 2) did this too; an infinite constant parameter is now an error of its own.)"""
    m = ppl.model("def m():\n    p ~ lognormal(0, 1e30)\n    observe 1 ~ normal(p, 1)\n    return p\n",
                  filename="m.ppl")
    with pytest.raises(PPLRuntimeError) as info:
        m.run("mh", samples=10, burn_in=2, chains=2, seed=1)
    assert located_at(info.value, 2) and "density zero (or NaN)" in info.value.message


@pytest.mark.filterwarnings("ignore::ppl.semantics.errors.PPLDiagnosticWarning")
def test_mh_where_every_chain_draws_the_same_plain_item():
    """uniform_draw over items of which one differs per chain drew, for seed 1, the same
    plain item in both chains: MH crashed (AttributeError: 'int' object has no attribute
    'idx', an internal error in the CLI)."""
    m = ppl.model("def m():\n    x ~ normal(0, 1)\n    total = 1 if x > 0 else 2\n"
                  "    roll ~ uniform_draw([total, 2, 3])\n    return roll\n", filename="m.ppl")
    res = m.run("mh", samples=10, burn_in=2, chains=2, seed=1)
    assert set(res.marginal("roll")) <= {1, 2, 3}


# --------------------------------------------------------------- exact integer powers
def test_an_exact_power_with_a_float_literal_exponent_is_bounded():
    """Enumeration reads 1e308 exactly (a Fraction): 2 ** 1e308 was computed as an
    integer of 10^308 bits (a hang); now the max_int_bits error, located."""
    m = ppl.model("def m():\n    p ~ flip(0.5)\n    return 2 ** 1e308 if p else 0\n", filename="m.ppl")
    with pytest.raises(PPLRuntimeError) as info:
        m.run("enumerate", max_seconds=5)
    assert located_at(info.value, 3) and "max_int_bits" in info.value.message
    assert "10^308 bits" in info.value.message


# -------------------------------------------------------------------------------- CLI
MODEL = "def m(ys):\n    mu ~ normal(0, 1)\n    for y in ys:\n        observe y ~ normal(mu, 1)\n    return mu\n"


def run_cli(tmp_path, data_text: str, *extra, model: str = MODEL) -> tuple[int, str]:
    (tmp_path / "m.ppl").write_text(model)
    (tmp_path / "d.json").write_text(data_text)
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["run", str(tmp_path / "m.ppl"), "--data", str(tmp_path / "d.json"), "-n", "10", *extra])
    return code, err.getvalue()


@pytest.mark.parametrize("data_text, message", [
    ('{"ys": [1],\n  "zs": 2}', "the data binds 'zs', but m(ys) has no such parameter"),
    ('{"a": 1,\n  "ys": {"b": 1}}', None),  # (an unknown key comes first: 'a' at 1:2)
    ('{\n  "ys": {"b": 1}}', "data 'ys' has a type a model cannot use: dict"),
    ('{\n  "ys": [1, 18446744073709551616]}', "data 'ys' holds an integer that does not fit in 64 bits"),
])
def test_cli_data_errors_point_at_the_key_in_the_data_file(tmp_path, data_text, message):
    code, err = run_cli(tmp_path, data_text)
    assert code == 1
    if message is None:
        assert err.startswith(f"{tmp_path / 'd.json'}:1:2: error: the data binds 'a'")
        return
    assert err.startswith(f"{tmp_path / 'd.json'}:2:3: error: {message}"), err
    assert err.splitlines()[2].strip() == "^^^^"  # the caret under "ys" / "zs"


def test_cli_mh_errors_from_the_model_print_its_location(tmp_path):
    impossible = "def m(ys):\n    mu ~ normal(0, 1)\n    condition mu > 100\n    return mu\n"
    code, err = run_cli(tmp_path, json.dumps({"ys": []}), "--method", "mh", "--samples", "5",
                        "--burn-in", "1", "-o", "chains=2", model=impossible)
    assert code == 1 and err.startswith(f"{tmp_path / 'm.ppl'}:3:5: runtime error: MH: no chain found"), err


def test_a_nan_probability_at_some_particles_is_a_located_error():
    """The [0, 1] check's one-pass fast path (min and max) lets no NaN through: a NaN
    probability at half of the particles is the located error, as a value of 1.5 is."""
    m = ppl.model("def f(x):\n    p ~ beta(1, 1)\n    q = x if p < 0.5 else p\n    observe 1 ~ bernoulli(q)\n"
                  "    return p\n", filename="m.ppl")
    for bad in (float("nan"), 1.5):
        with pytest.raises(PPLRuntimeError) as info:
            m.run("importance", {"x": bad}, particles=1000, seed=0)
        assert "bernoulli: parameter 'p' must be in [0, 1]" in str(info.value)
        assert located_at(info.value, 4)
