"""``enumerate="auto"`` (issue 12, item 3: "or automatically for finite-support sites whose
downstream graph allows it"): importance, SMC and NUTS sum out, by themselves, the finite
choices the dependency analysis finds every use of supported (``semantics.enumerate_auto``);
a choice used where its value is needed is left sampled (by the analysis, or after the
enumeration's located refusal, by running again); tables too large stay sampled."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import ppl
from ppl.semantics import limits
from ppl.semantics.enumerate_auto import select
from ppl.semantics.errors import PPLError
from ppl.testing.validity import check_proper, enumerating_algorithm
from test_enumerate_sites import EXAMPLES, _changepoint_exact, _load


# --------------------------------------------------------------------- the two examples, unmarked
def test_auto_sums_out_the_mixture_assignments_and_agrees_with_the_grid():
    """examples/mixture.ppl as it is (no @enumerate): the six assignments are chosen; the
    component means and P(z[4] | ys) agree with the grid integration of the example's
    header (as test_enumerate_sites' enumerate=["z"] test), within 5 MC standard errors."""
    model, data = _load("mixture")
    r = model.run("importance", data, particles=20_000, seed=1, enumerate="auto")
    assert r.extra["enumerated"] == [f"z[{i}]" for i in range(6)]
    assert r.extra["enumerate_sampled"] == {} and r.extra["enumerate_attempts"] == 1
    assert "enumerate=auto: summed out z[0..5]" in r.summary()
    ess = r.ess
    assert ess > 500  # (~940; sampling the assignments too leaves an ESS of ~13 at this N)
    assert abs(r.mean("mu1") - -2.6004) < 5 * 0.597 / math.sqrt(ess)
    assert abs(r.mean("mu2") - 1.3281) < 5 * 0.6052 / math.sqrt(ess)
    assert abs(r.mean("z[4]") - 0.9397) < 5 * math.sqrt(0.9397 * 0.0603 / ess)


def test_auto_sums_out_the_change_point_and_agrees_with_the_exact_answer():
    """examples/changepoint.ppl as it is: tau is chosen; log Z and P(tau = 10, 11, 12) agree
    with the exact sum over tau (gamma-Poisson integrals), within their MC errors."""
    model, data = _load("changepoint")
    log_z, post, (m1, sd1), (m2, sd2) = _changepoint_exact(data["ys"])
    r = model.run("importance", data, particles=20_000, seed=0, enumerate="auto")
    assert r.extra["enumerated"] == ["tau"] and r.extra["enumerate_attempts"] == 1
    ess = r.ess
    assert abs(r.log_evidence - log_z) < 5 * math.sqrt(r.n / ess - 1) / math.sqrt(r.n)
    for k in (10, 11, 12):
        assert abs(r.marginal("tau").get(k, 0.0) - post[k]) < 5 * math.sqrt(post[k] * (1 - post[k]) / ess)
    assert abs(r.mean("rate1") - m1) < 5 * sd1 / math.sqrt(ess)
    assert abs(r.mean("rate2") - m2) < 5 * sd2 / math.sqrt(ess)


def test_auto_smc_on_the_change_point_over_seeds():
    """SMC (resampling at every observation): the mean log evidence over 6 seeds is within 6
    standard errors (from the seeds' spread) of the exact -51.175."""
    model, data = _load("changepoint")
    log_z = _changepoint_exact(data["ys"])[0]
    runs = [model.run("smc", data, particles=500, seed=s, enumerate="auto") for s in range(6)]
    assert all(r.extra["enumerated"] == ["tau"] for r in runs)
    xs = [r.log_evidence for r in runs]
    mean = sum(xs) / len(xs)
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
    assert abs(mean - log_z) < 6 * se + 1e-3, (mean, log_z, se)


def test_auto_nuts_on_the_mixture():
    """NUTS with the assignments summed out in the potential, drawn back per draw."""
    model, data = _load("mixture")
    r = model.run("nuts", data, chains=2, samples=100, burn_in=100, seed=0, enumerate="auto")
    assert r.extra["enumerated"] == [f"z[{i}]" for i in range(6)]
    assert r.extra["recovered"] == [f"z[{i}]" for i in range(6)]
    ess = r.ess
    assert ess > 50
    assert abs(r.mean("mu1") - -2.6004) < 5 * 0.597 / math.sqrt(ess)
    assert abs(r.mean("z[4]") - 0.9397) < 5 * math.sqrt(0.9397 * 0.0603 / ess)


def test_auto_is_opt_in():
    """Without the option the mixture's assignments are sampled as before."""
    model, data = _load("mixture")
    r = model.run("importance", data, particles=200, seed=0)
    assert "enumerated" not in r.extra and "enumerate=auto" not in r.summary()


def test_cli_enumerate_auto_json(capsys):
    from ppl.cli import main
    rc = main(["run", str(EXAMPLES / "changepoint.ppl"), "--data", str(EXAMPLES / "changepoint.json"), "--method",
               "importance", "-n", "2000", "--seed", "0", "-o", "enumerate=auto", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["enumerated"] == ["tau"] and out["enumerate_sampled"] == {}
    assert abs(out["log_evidence"] - -51.175) < 0.3  # (ESS ~80 of 2000: a few tenths)


# --------------------------------------------------------------------- choices left sampled
IF_ON_Z = """
def model():
    z ~ flip(0.3)
    c ~ categorical([0.2, 0.3, 0.5])
    if z:
        observe 1 ~ bernoulli(0.9)
    observe 1 ~ bernoulli([0.1, 0.5, 0.9][c])
    factor 0.5 if z else 0.0
    return (z, c)
"""


def test_a_branch_on_a_finite_choice_keeps_it_sampled_and_the_answer_is_exact():
    """`if z:` needs z's value: z stays sampled (the analysis says why), c is summed out; the
    weighting is exactly proper (check_proper) and the estimates agree with enumeration."""
    model = ppl.model(IF_ON_Z)
    r = model.run("importance", {}, particles=4000, seed=0, enumerate="auto")
    assert r.extra["enumerated"] == ["c"]
    assert r.extra["enumerate_sampled"] == {"z": "its value is needed as a condition, line 5"}
    assert "left sampled: z (its value is needed as a condition, line 5)" in r.summary()
    exact = model.run("enumerate", {})
    for name in ("z", "c"):
        m, sd = float(exact.mean(name)), float(exact.sd(name))
        assert abs(r.mean(name) - m) < 5 * sd / math.sqrt(r.ess)
    sel = select(model, {}, 2)
    assert set(sel.chosen) == {"c"}
    for ess in (0.0, 1.0):
        check = check_proper(model, enumerating_algorithm(2, names=sel.chosen, ess_threshold=ess))
        assert check.ok(), check


@st.composite
def finite_programs(draw):
    """Three finite choices, each used in supported ways (arithmetic, indexing, `a if c
    else b`, parameters) and perhaps also in an unsupported one (a branch, a built-in);
    returns (source, the choices that can be summed out)."""
    K = draw(st.integers(2, 3))
    probs = draw(st.lists(st.sampled_from([1, 2, 3]), min_size=K, max_size=K))
    lines = [f"z ~ categorical({[p / sum(probs) for p in probs]})",
             f"c ~ flip({draw(st.sampled_from(['0.3 if z == 1 else 0.8', '[0.1, 0.5, 0.9][z]', '0.5']))})",
             "x ~ flip(0.5)"]
    for _ in range(draw(st.integers(1, 2))):
        lines.append(draw(st.sampled_from([
            f"observe {draw(st.integers(0, 1))} ~ bernoulli([0.2, 0.7, 0.4][z])",
            f"observe {draw(st.integers(0, 2))} ~ binomial(2, 0.25 if c else 0.6)",
            "factor z * 0.5 + (0.25 if x else 0)", "condition z + c + x < 3"])))
    summable = {"z", "c", "x"}
    for v in ("z", "c", "x"):
        use = draw(st.sampled_from(["none", "none", "branch", "builtin"]))
        test = "z == 1" if v == "z" else v
        if use == "branch":
            lines += [f"if {test}:", "    observe 1 ~ bernoulli(0.8)", "else:", "    observe 1 ~ bernoulli(0.3)"]
        elif use == "builtin":
            lines.append(f"factor log(1.5 + (1 if {test} else 0))")
        if use != "none":
            summable.discard(v)
    lines.append(draw(st.sampled_from(["return z", "return (z, c)", "return x", "return z + x"])))
    return "def model():\n" + "".join(f"    {line}\n" for line in lines), summable


@settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(finite_programs(), st.sampled_from([0.0, 1.0]))
def test_random_finite_programs_with_the_automatic_choice_are_exactly_proper(program, ess):
    """The automatic choice is exactly the choices with no unsupported use, and SMC with them
    summed out (two particles) is exactly proper for the program (check_proper)."""
    source, summable = program
    model = ppl.model(source)
    sel = select(model, {}, 2)
    assert set(sel.chosen) == summable, (source, sel)
    check = check_proper(model, enumerating_algorithm(2, names=sel.chosen, ess_threshold=ess))
    assert check.ok(), (source, check)


def test_a_use_the_analysis_cannot_see_is_refused_and_the_choice_left_sampled():
    """A memoised call of a random value sends the analysis to executed traces (no uses
    recorded): z is tried, the enumeration refuses `if f(z):` (located), and the second run
    has z sampled; c stays summed out. The answer agrees with exact enumeration."""
    src = ("def m():\n    f = mem(lambda a: a * 2)\n    z ~ flip(0.4)\n    c ~ flip(0.3)\n    if f(z):\n"
           "        observe 1 ~ bernoulli(0.9)\n    observe 1 ~ bernoulli(0.2 if c else 0.7)\n    return (z, c)\n")
    model = ppl.model(src)
    r = model.run("importance", {}, particles=4000, seed=0, enumerate="auto")
    assert r.extra["enumerated"] == ["c"] and r.extra["enumerate_attempts"] == 2
    assert "as a condition" in r.extra["enumerate_sampled"]["z"] and "line 5" in r.extra["enumerate_sampled"]["z"]
    exact = model.run("enumerate", {})
    assert abs(r.log_evidence - exact.log_evidence) < 5 * math.sqrt(r.n / r.ess - 1) / math.sqrt(r.n)
    for name in ("z", "c"):
        m, sd = float(exact.mean(name)), float(exact.sd(name))
        assert abs(r.mean(name) - m) < 5 * sd / math.sqrt(r.ess)


def test_tables_beyond_the_memory_budget_stay_sampled():
    """acc = z0 + ... + z39: a table over 40 flips (2^40 entries per particle) is foreseen
    by the analysis and the flips stay sampled (no error); a categorical whose own table is
    over the budget is refused at run time and left sampled on the second run."""
    acc = ("def m():\n    acc = 0\n    for i in range(40):\n        z ~ flip(0.5)\n        acc = acc + z\n"
           "    factor acc * 0.1\n    return acc\n")
    r = ppl.model(acc).run("importance", {}, particles=500, seed=0, enumerate="auto")
    assert r.extra["enumerated"] == [] and len(r.extra["enumerate_sampled"]) == 40
    assert "memory budget" in r.extra["enumerate_sampled"]["z[7]"]
    # E[acc] under the tilted measure: 40 flips each true with probability e^0.1 / (1 + e^0.1)
    p = math.exp(0.1) / (1 + math.exp(0.1))
    assert abs(r.mean("return") - 40 * p) < 5 * math.sqrt(40 * p * (1 - p) / r.ess)
    big = "def m():\n    z ~ categorical([0.005] * 200)\n    observe 1 ~ bernoulli(0.3 + z / 1000)\n    return z\n"
    with limits.limits(max_memory="100KB"):  # the prior table: 100 particles x 200 values x 8 bytes
        r = ppl.model(big).run("importance", {}, particles=100, seed=0, enumerate="auto")
    assert r.extra["enumerated"] == [] and r.extra["enumerate_attempts"] == 2
    assert "memory budget" in r.extra["enumerate_sampled"]["z"]


def test_errors_that_are_not_the_automatic_choice_are_raised():
    """An explicitly marked choice used in a branch, and the model's own error, are raised
    (located) under enumerate="auto" as without it."""
    marked = "def m():\n    z ~ flip(0.5) @enumerate\n    if z:\n        observe 1 ~ bernoulli(0.9)\n    return 0\n"
    with pytest.raises(PPLError) as err:
        ppl.model(marked).run("importance", {}, particles=10, seed=0, enumerate="auto")
    assert "<model>:3" in str(err.value) and "drop @enumerate" in err.value.hint
    broken = ("def m():\n    z ~ flip(0.4)\n    xs = [1, 2]\n    observe 1 ~ bernoulli(0.3 if z else 0.6)\n"
              "    factor xs[5]\n    return z\n")
    with pytest.raises(PPLError) as err:
        ppl.model(broken).run("smc", {}, particles=10, seed=0, enumerate="auto")
    assert "<model>:5" in str(err.value) and "out of range" in str(err.value)


def test_auto_on_an_unmarked_hmm_is_the_forward_algorithm():
    """test_enumerate_sites' HMM without its marks: every state is chosen (a chain of
    choices, each indexing the transition matrix by the last), and one particle gives the
    exact evidence."""
    from test_enumerate_sites import HMM
    model = ppl.model(HMM.replace(" @enumerate", ""))
    r = model.run("smc", {}, particles=1, seed=0, enumerate="auto")
    assert r.extra["enumerated"] == ["s"] + [f"s[{t}]" for t in range(4)]
    assert abs(r.log_evidence - model.run("enumerate", {}).log_evidence) < 1e-6


def test_hmc_takes_the_option():
    """hmc declares enumerate= (it was refused by the option check before)."""
    model, data = _load("mixture")
    r = model.run("hmc", data, chains=2, samples=20, burn_in=20, seed=0, enumerate="auto")
    assert r.extra["enumerated"] == [f"z[{i}]" for i in range(6)]
    assert r.extra["recovered"] == [f"z[{i}]" for i in range(6)]
