"""Discrete choices summed out inside importance, SMC and NUTS (issue 12, items 3 and 7).

``z ~ d @enumerate`` (or ``enumerate=["z"]``) answers the choice with all its values at
once (``semantics.enumerate_sites``); the weights are those of the program with z summed
out, and z is drawn back from its conditional at the end (``infer_discrete``)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import ppl
from ppl.semantics.enumerate_sites import EnumRun
from ppl.semantics.errors import PPLError
from ppl.testing.validity import check_proper, enumerating_algorithm

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    return ppl.model((EXAMPLES / f"{name}.ppl").read_text()), json.loads((EXAMPLES / f"{name}.json").read_text())


FINITE = """
def model():
    z ~ categorical([0.2, 0.5, 0.3]) @enumerate
    c ~ flip(0.7 if z == 1 else 0.25) @enumerate
    x ~ flip(0.4)
    observe 1 ~ bernoulli([0.9, 0.2, 0.6][z])
    observe True ~ bernoulli(0.3 if c else 0.8)
    factor (0.5 if x else -0.25) + z * 0.1
    condition z + x < 3
    return (z, c, x)
"""


# ---------------------------------------------------------------- exact checks (item 7)
@pytest.mark.parametrize("ess_threshold", [0.0, 1.0])
def test_enumerated_smc_is_proper_exactly(ess_threshold):
    """Importance (ess 0) and SMC with resampling at every checkpoint, two particles, z and c
    summed out and drawn back: E[Z_hat sum w f] equals the exact measure (to ~1e-15)."""
    check = check_proper(ppl.model(FINITE), enumerating_algorithm(2, ess_threshold=ess_threshold))
    assert check.ok(), check


class _NoPrior(EnumRun):
    """Broken: the enumerated choice's prior is never a factor (summed uniformly)."""

    def add_prior(self, v, dims, logp, ctx):
        super().add_prior(v, dims, torch.zeros_like(logp) - math.log(v.K), ctx)


class _PerObserve(EnumRun):
    """Broken: each observe/factor on one choice is summed over z under z's *prior* on its
    own (log sum_z p(z) f(z) per factor) instead of once per variable over the product of
    all its factors (the right increment uses p(z | the factors so far))."""

    def add_prior(self, v, dims, logp, ctx):
        if dims == (v,):
            self.__dict__.setdefault("priors", {})[v] = logp
        super().add_prior(v, dims, logp, ctx)

    def factor(self, eff, lp, dims):
        priors = self.__dict__.get("priors", {})
        if len(dims) != 1 or dims[0] not in priors:
            return (yield from super().factor(eff, lp, dims))
        from ppl.semantics.interpreter import FactorEffect
        from ppl.semantics.values import Batched
        per = torch.logsumexp(lp.double() + priors[dims[0]], dim=1)
        yield FactorEffect(eff.addr, Batched(per, eff.ctx.idx), eff.ctx, eff.span)


@pytest.mark.parametrize("broken", [_NoPrior, _PerObserve])
def test_broken_enumerations_are_caught(broken):
    check = check_proper(ppl.model(FINITE), enumerating_algorithm(2, run_cls=broken, ess_threshold=0.0))
    assert not check.ok()


@st.composite
def enumerable_programs(draw):
    """Small finite programs whose enumerated choices are used only in ways the
    enumeration supports (arithmetic, comparisons, `a if z else b`, indexing, parameters)."""
    K = draw(st.integers(2, 3))
    probs = draw(st.lists(st.sampled_from([1, 2, 3]), min_size=K, max_size=K))
    z = f"z ~ categorical({[p / sum(probs) for p in probs]})" + (" @enumerate" if draw(st.booleans()) else "")
    lines = [z]
    p_c = draw(st.sampled_from(["0.3 if z == 1 else 0.8", "[0.1, 0.5, 0.9][z]", "0.5"]))
    lines.append(f"c ~ flip({p_c}) @enumerate")
    lines.append("x ~ flip(0.5)")
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["obs", "factor", "condition", "obs_c"]))
        if kind == "obs":
            lines.append(f"observe {draw(st.integers(0, 1))} ~ bernoulli([0.2, 0.7, 0.4][z])")
        elif kind == "obs_c":
            lines.append(f"observe {draw(st.integers(0, 2))} ~ binomial(2, 0.25 if c else 0.6)")
        elif kind == "factor":
            lines.append(f"factor z * {draw(st.sampled_from([0.5, -0.5, 1]))} + (0.25 if x else 0)")
        else:
            lines.append("condition z + c + x < 3")
    if draw(st.booleans()):  # an enumerated choice and its factors on one branch of a sampled one
        lines += ["if x:", "    b ~ categorical([0.5, 0.25, 0.25]) @enumerate",
                  f"    observe {draw(st.integers(0, 1))} ~ bernoulli([0.9, 0.3, 0.5][b] * (0.5 if c else 1))",
                  "    y = b + z", "else:", "    y = z"]
    else:
        lines.append("y = z")
    lines.append(draw(st.sampled_from(["return z", "return (z, c)", "return x", "return z + x", "return y"])))
    return "def model():\n" + "".join(f"    {line}\n" for line in lines)


@settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(enumerable_programs(), st.sampled_from([0.0, 1.0]))
def test_random_enumerable_programs_are_proper(source, ess):
    check = check_proper(ppl.model(source), enumerating_algorithm(2, ess_threshold=ess))
    assert check.ok(), (source, check)


# --------------------------------------------------------------------- the syntax and the option
def test_annotation_round_trips_and_unknown_annotation_is_located():
    from ppl.compiler import parse_program
    from ppl.semantics.pretty import pretty
    p = parse_program(FINITE)
    assert parse_program(pretty(p)) == p and "@enumerate" in pretty(p)
    with pytest.raises(PPLError) as err:
        parse_program("def m():\n    z ~ flip(0.5) @enumerat\n")
    assert "<model>:2:5" in str(err.value) and "@enumerate" in err.value.hint


def test_option_enumerate_names_a_site_and_z_is_recovered():
    """enumerate=["z"] on the unannotated mixture: the same weights as @enumerate; the
    assignment probabilities match the grid integration of the example's header."""
    model, data = _load("mixture")
    r = model.run("importance", data, particles=20_000, seed=1, enumerate=["z"])
    # the header's reference: P(z[4] | ys) = 0.9397, P(z[2] | ys) = 0.0073, E[mu1] = -2.6004 (sd 0.597)
    ess = r.ess
    assert abs(r.mean("z[4]") - 0.9397) < 5 * math.sqrt(0.9397 * 0.0603 / ess) + 0.01
    assert abs(r.mean("mu1") - -2.6004) < 5 * 0.597 / math.sqrt(ess)
    assert abs(r.mean("mu2") - 1.3281) < 5 * 0.6052 / math.sqrt(ess)
    # the assignments drawn back per kept draw (inference.infer_discrete): P(z[4] | ys) = 0.9397
    assert abs(r.mean("z[4]") - 0.9397) < 5 * math.sqrt(0.9397 * 0.0603 / ess)


# --------------------------------------------------------------------- mixture and change point
def _changepoint_exact(ys):
    """Exact posterior of the change point (tau summed, each rate's gamma(2, 1) prior
    integrated against its Poisson counts): log Z, p(tau | ys), E and sd of rate1 and rate2."""
    T = len(ys)

    def segment(counts):  # log of the integral of prod Poisson(y; r) gamma(r; 2, 1) dr, and r's posterior
        a, b = 2 + sum(counts), 1 + len(counts)
        return math.lgamma(a) - a * math.log(b) - sum(math.lgamma(y + 1) for y in counts), a, b
    logs, moments = [], []
    for tau in range(T):
        (l1, a1, b1), (l2, a2, b2) = segment(ys[:tau]), segment(ys[tau:])
        logs.append(-math.log(T) + l1 + l2)
        moments.append((a1 / b1, a1 * (a1 + 1) / b1 ** 2, a2 / b2, a2 * (a2 + 1) / b2 ** 2))
    top = max(logs)
    log_z = top + math.log(sum(math.exp(x - top) for x in logs))
    post = [math.exp(x - log_z) for x in logs]
    m = [sum(p * mo[i] for p, mo in zip(post, moments)) for i in range(4)]
    return log_z, post, (m[0], math.sqrt(m[1] - m[0] ** 2)), (m[2], math.sqrt(m[3] - m[2] ** 2))


def test_changepoint_enumerated_matches_exact_evidence_and_tau():
    """tau summed out: importance gives log Z = -51.175 (exact, tests/test_fk.py) and
    P(tau = 11) = 0.77 within MCSE; no tau is sampled until it is drawn back."""
    model = ppl.model((EXAMPLES / "changepoint_enumerated.ppl").read_text())
    data = json.loads((EXAMPLES / "changepoint.json").read_text())
    log_z, post, (m1, sd1), (m2, sd2) = _changepoint_exact(data["ys"])
    assert abs(log_z - -51.175) < 5e-4 and abs(post[11] - 0.765) < 5e-4  # the example's header
    r = model.run("importance", data, particles=20_000, seed=0)
    ess = r.ess
    # the relative error of Z_hat is about sqrt(N / ESS - 1) / sqrt(N) (log scale, delta method)
    assert abs(r.log_evidence - log_z) < 5 * math.sqrt(r.n / ess - 1) / math.sqrt(r.n)
    for k in (10, 11, 12):
        assert abs(r.marginal("return").get(k, 0.0) - post[k]) < 5 * math.sqrt(post[k] * (1 - post[k]) / ess)
    assert abs(r.mean("rate1") - m1) < 5 * sd1 / math.sqrt(ess)
    assert abs(r.mean("rate2") - m2) < 5 * sd2 / math.sqrt(ess)


def test_smc_with_enumerated_sites_agrees_with_the_references_over_seeds():
    """SMC (resampling at every observation) on both examples, 6 seeds: the mean over seeds
    is within 6 standard errors (estimated from the seeds' spread; t with 5 degrees of
    freedom exceeds 6 with probability 0.002) of the exact/grid reference."""
    cases = [("mixture_enumerated", "mixture", {"mu1": -2.6004, "mu2": 1.3281, "z[4]": 0.9397}, 1000)]
    ys = json.loads((EXAMPLES / "changepoint.json").read_text())["ys"]
    log_z, post, (m1, _), (m2, _) = _changepoint_exact(ys)
    cases.append(("changepoint_enumerated", "changepoint", {"rate1": m1, "rate2": m2, "log_evidence": log_z}, 500))
    for stem, data_stem, refs, n in cases:
        model = ppl.model((EXAMPLES / f"{stem}.ppl").read_text())
        data = json.loads((EXAMPLES / f"{data_stem}.json").read_text())
        runs = [model.run("smc", data, particles=n, seed=s) for s in range(6)]
        for k, ref in refs.items():
            xs = [r.log_evidence if k == "log_evidence" else r.mean(k) for r in runs]
            mean = sum(xs) / len(xs)
            se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
            assert abs(mean - ref) < 6 * se + 1e-3, (stem, k, mean, ref, se)


def test_control_flow_on_an_enumerated_value_is_a_located_error():
    src = "def m():\n    z ~ flip(0.5) @enumerate\n    if z:\n        observe 1 ~ bernoulli(0.9)\n    return 0\n"
    with pytest.raises(PPLError) as err:
        ppl.model(src).run("importance", {}, particles=10, seed=0)
    assert "<model>:3" in str(err.value) and "drop @enumerate" in err.value.hint


def test_builtin_of_an_enumerated_value_is_a_located_error():
    src = "def m():\n    z ~ categorical([0.5, 0.5]) @enumerate\n    factor exp(z)\n    return 0\n"
    with pytest.raises(PPLError) as err:
        ppl.model(src).run("smc", {}, particles=10, seed=0)
    assert "exp()" in str(err.value) and "drop @enumerate" in err.value.hint


def test_loop_over_an_enumerated_value_is_a_located_error():
    src = "def m():\n    z ~ categorical([0.5, 0.5]) @enumerate\n    for i in z:\n        factor 1\n    return 0\n"
    with pytest.raises(PPLError) as err:
        ppl.model(src).run("importance", {}, particles=10, seed=0)
    assert "<model>:3" in str(err.value) and "drop @enumerate" in err.value.hint


def test_user_functions_and_mem_take_enumerated_values():
    """f(z) through a closure and through mem: factor 2 z with z uniform on {0, 1} gives
    log Z = log((1 + e^2) / 2) and P(z = 1) = e^2 / (1 + e^2), exactly (no sampling left)."""
    for body in ("f = mem(lambda a: a * 2)", "f = lambda a: a * 2"):
        src = f"def m():\n    {body}\n    z ~ categorical([0.5, 0.5]) @enumerate\n    factor f(z)\n    return z\n"
        r = ppl.model(src).run("importance", {}, particles=2000, seed=0)
        assert abs(r.log_evidence - math.log((1 + math.e ** 2) / 2)) < 1e-6
        ess = r.ess
        p = math.e ** 2 / (1 + math.e ** 2)
        assert abs(r.mean("return") - p) < 5 * math.sqrt(p * (1 - p) / ess)


def test_a_sampled_choice_with_an_enumerated_parent_is_proper():
    """x ~ flip(ps[z]) with z enumerated and x not: z is drawn from its conditional first
    (the weight stays proper), exactly checked."""
    src = ("def model():\n    z ~ categorical([0.3, 0.7]) @enumerate\n    observe 1 ~ bernoulli(0.3 if z == 1 else 0.6)\n"
           "    x ~ flip([0.2, 0.9][z])\n    observe x ~ bernoulli(0.25)\n    return (z, x)\n")
    for ess in (0.0, 1.0):
        check = check_proper(ppl.model(src), enumerating_algorithm(2, ess_threshold=ess))
        assert check.ok(), check


def test_other_methods_ignore_the_annotation():
    """MH and exact enumeration sample/enumerate z as before (the meaning is the same)."""
    r = ppl.model(FINITE).run("enumerate", {})
    s = ppl.model(FINITE.replace(" @enumerate", "")).run("enumerate", {})
    assert r.marginal("return") == s.marginal("return")


# --------------------------------------------------------------------------- NUTS
def test_nuts_mixture_with_z_enumerated():
    """NUTS on the mixture with z summed out in the potential: the component means agree
    with the grid integration (E[mu1] = -2.6004 sd 0.597, E[mu2] = 1.3281 sd 0.605)."""
    model = ppl.model((EXAMPLES / "mixture_enumerated.ppl").read_text())
    data = json.loads((EXAMPLES / "mixture.json").read_text())
    r = model.run("nuts", data, chains=4, samples=200, burn_in=150, seed=0)
    # the assignments are not in the chains' state: drawn back per kept draw afterwards
    assert r.extra["recovered"] == [f"z[{i}]" for i in range(6)]
    ess = r.ess  # the smallest ESS over the sites (autocorrelation-aware)
    assert ess > 100
    assert abs(r.mean("mu1") - -2.6004) < 5 * 0.597 / math.sqrt(ess)
    assert abs(r.mean("mu2") - 1.3281) < 5 * 0.6052 / math.sqrt(ess)
    # the assignments drawn back per kept draw (inference.infer_discrete): P(z[4] | ys) = 0.9397
    assert abs(r.mean("z[4]") - 0.9397) < 5 * math.sqrt(0.9397 * 0.0603 / ess)


def test_cli_option_enumerate_and_json(capsys):
    """`-o enumerate=z` from the CLI: the assignments are summed out and drawn back; the
    --json output carries them as sites."""
    from ppl.cli import main
    rc = main(["run", str(EXAMPLES / "mixture.ppl"), "--data", str(EXAMPLES / "mixture.json"), "--method",
               "importance", "-n", "4000", "--seed", "0", "-o", "enumerate=z", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert "z[4]" in json.dumps(out["posterior"])
    # summing z out leaves only (mu1, mu2) to importance-sample: the ESS is ~200 of 4000
    # (sampling the 6 assignments from the prior as well leaves an ESS of ~4)
    assert out["ess"] > 100
    # log Z = -15.135 (grid integration of the marginal density over [-15, 15]^2, step 0.02); an estimate with
    # ESS ~200 is within a few tenths
    assert abs(out["log_evidence"] - -15.13) < 0.3


HMM = """
def model():
    s ~ categorical([0.6, 0.4]) @enumerate
    ys = [1, 0, 1, 1]
    trans = [[0.8, 0.2], [0.3, 0.7]]
    emit = [0.2, 0.9]
    for t in range(4):
        s ~ categorical(trans[s]) @enumerate
        observe ys[t] ~ bernoulli(emit[s])
    return s
"""


def test_hmm_chain_of_enumerated_states_is_the_forward_algorithm():
    """A chain of five enumerated states (each one's distribution indexed by the last):
    variable elimination over the chain; one particle gives the exact evidence (the forward
    algorithm), and the final state drawn back is exactly proper."""
    model = ppl.model(HMM)
    exact = model.run("enumerate", {})
    r = model.run("smc", {}, particles=1, seed=0)
    assert abs(r.log_evidence - exact.log_evidence) < 1e-6
    check = check_proper(model, enumerating_algorithm(1, ess_threshold=0.0))
    assert check.ok(), check


def test_a_table_over_too_many_enumerated_choices_is_refused_before_it_is_made():
    """acc = z0 + z1 + ... over 40 enumerated flips would be a table of 2^40 entries per
    particle: a located error under the memory budget, not an out-of-memory kill."""
    src = ("def m():\n    acc = 0\n    for i in range(40):\n        z ~ flip(0.5) @enumerate\n"
           "        acc = acc + z\n    factor acc * 0.1\n    return 0\n")
    with pytest.raises(PPLError) as err:
        ppl.model(src).run("importance", {}, particles=100, seed=0)
    assert "<model>:5" in str(err.value) and "max_memory" in str(err.value) and "@enumerate" in err.value.hint


def test_hmm_cost_grows_with_the_chain_not_exponentially():
    """The value of s[t] carries only its own dimension (not its parents'): every table in a
    chain of 30 enumerated states has at most two enumerated dimensions."""
    import ppl.semantics.enumerate_sites as es
    src = ("def model(ys):\n    s ~ categorical([0.6, 0.4]) @enumerate\n    for t in range(len(ys)):\n"
           "        s ~ categorical([[0.8, 0.2], [0.3, 0.7]][s]) @enumerate\n"
           "        observe ys[t] ~ bernoulli([0.2, 0.9][s])\n    return s\n")
    widest = [0]
    original = es._lift_all

    def lift(vals, ctx):
        out, dims = original(vals, ctx)
        widest[0] = max(widest[0], len(dims))
        return out, dims
    es._lift_all = lift
    try:
        r = ppl.model(src).run("smc", {"ys": [1, 0] * 15}, particles=10, seed=0)
    finally:
        es._lift_all = original
    assert widest[0] <= 2 and math.isfinite(r.log_evidence)


def test_hmm_states_drawn_back_have_the_exact_smoothing_marginals():
    """Each state of the chain is summed out as soon as no value refers to it (its table is
    kept), and drawn back at the end last-first (forward filtering, backward sampling): the
    marginal of every s[t] is the exact smoothing marginal (within the binomial MCSE; the
    particles all have the same weight, so the ESS is N)."""
    model = ppl.model(HMM)
    exact = model.run("enumerate", {})
    r = model.run("importance", {}, particles=4000, seed=0)
    for t in range(4):
        p = float(exact.marginal(f"s[{t}]").get(1, 0))
        assert abs(r.mean(f"s[{t}]") - p) < 5 * math.sqrt(p * (1 - p) / r.ess) + 1e-9, t
