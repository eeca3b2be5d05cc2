"""The public run kit of ``ppl.semantics``: effect-rewriting middleware and the handler
pieces of ``semantics.sampling``. Every check is exact (a log density in closed form, or
the same draws from one seed), except where a Monte Carlo tolerance is stated."""
import math

import pytest
import torch

import ppl
from ppl.semantics.errors import PPLRuntimeError
from ppl.semantics.interpreter import ObserveEffect, SampleEffect
from ppl.semantics.middleware import Answer, Rewritten, condition, observed_values, rewriting, substitute
from ppl.semantics.sampling import (LikelihoodWeighting, Suspended, Weighting, accumulate, drive, fixed,
                                    truncate)
from ppl.semantics.values import Particles

torch.set_num_threads(1)

GAUSS = """
def m(y):
    x ~ normal(0, 1)
    observe y ~ normal(x, 1)
    return x
"""


def _run(interp, model, data, N=6, seed=0):
    torch.manual_seed(seed)
    ctx = Particles.all(N, "cpu")
    h = LikelihoodWeighting(N, "cpu")
    ret = drive(interp.run(model.entry, model.prepare_data(data, "cpu"), ctx), h)
    return ret, h


def _observe_addr(model, data):
    seen = []

    def spy(eff):
        if type(eff) is ObserveEffect:
            seen.append(eff.addr)
        return eff
    _run(Rewritten(model.interpreter(), spy), model, data)
    return seen[0]


def test_observed_values_replace_the_data_bit_for_bit():
    m = ppl.model(GAUSS)
    addr = _observe_addr(m, {"y": 0.0})
    _, direct = _run(m.interpreter(), m, {"y": 1.7})
    _, rewritten = _run(Rewritten(m.interpreter(), observed_values({addr: 1.7})), m, {"y": 0.0})
    assert torch.equal(direct.log_weights, rewritten.log_weights)
    from_function = observed_values(lambda eff: torch.tensor(1.7) if eff.addr == addr else None)
    _, by_function = _run(Rewritten(m.interpreter(), from_function), m, {"y": 0.0})
    assert torch.allclose(direct.log_weights, by_function.log_weights, atol=1e-12, rtol=0)


def test_an_observation_without_a_value_is_a_located_error():
    m = ppl.model(GAUSS)
    with pytest.raises(PPLRuntimeError) as err:
        _run(Rewritten(m.interpreter(), observed_values({})), m, {"y": 0.0})
    assert "no value for the observation" in str(err.value) and err.value.span is not None


def test_condition_scores_the_fixed_choice_and_substitute_does_not():
    m = ppl.model(GAUSS)
    ret, h = _run(Rewritten(m.interpreter(), condition({"x": 0.5})), m, {"y": 1.0})
    normal = torch.distributions.Normal(0.0, 1.0)
    joint = float(normal.log_prob(torch.tensor(0.5)) + normal.log_prob(torch.tensor(0.5)))
    assert ret == 0.5 and "x" not in h.trace.sites()
    assert torch.allclose(h.log_weights, torch.full((6,), joint, dtype=torch.float64), atol=1e-6, rtol=0)
    ret, h = _run(Rewritten(m.interpreter(), substitute({"x": 0.5})), m, {"y": 1.0})
    likelihood = float(normal.log_prob(torch.tensor(0.5)))
    assert ret == 0.5 and "x" not in h.trace.sites()
    assert torch.allclose(h.log_weights, torch.full((6,), likelihood, dtype=torch.float64), atol=1e-6, rtol=0)


def test_rewriting_forwards_sends_and_thrown_errors_and_closes():
    log = []

    def program():
        try:
            got = yield SampleEffect("a", None, None, None)
            log.append(("sent", got))
            yield SampleEffect("b", None, None, None)
        except KeyError as err:  # the program's own frame sees what the driver threw
            log.append(("caught", err.args[0]))
            yield SampleEffect("after", None, None, None)
        finally:
            log.append("closed")
        return "done"

    renamed = lambda eff: SampleEffect(eff.addr.upper(), None, None, None)  # noqa: E731
    gen = rewriting(program(), renamed)
    assert next(gen).addr == "A"
    assert gen.send(41).addr == "B"
    assert gen.throw(KeyError("boom")).addr == "AFTER"
    with pytest.raises(StopIteration) as stop:
        gen.send(None)
    assert stop.value.value == "done" and log == [("sent", 41), ("caught", "boom"), "closed"]
    # an answered effect never reaches the driver; closing the wrapper closes the program
    gen = rewriting(program(), lambda eff: Answer(7) if eff.addr == "a" else eff)
    assert next(gen).addr == "b"
    gen.close()
    assert log[-2:] == [("sent", 7), "closed"]


# ---------------------------------------------------------------------- handler pieces
TWO_STEPS = """
def m():
    x ~ normal(0, 1)
    observe 0.5 ~ normal(x, 1)
    y ~ normal(x, 1)
    observe 1.5 ~ normal(y, 1)
    return y
"""


def test_truncate_suspends_the_run_and_drive_carries_on_bit_for_bit():
    m = ppl.model(TWO_STEPS)
    ctx = Particles.all(5, "cpu")
    torch.manual_seed(3)
    whole = LikelihoodWeighting(5, "cpu")
    ret = drive(m.interpreter().run(m.entry, {}, ctx), whole)
    torch.manual_seed(3)
    h = Weighting(5, "cpu", at_checkpoint=truncate(1))
    gen = m.interpreter().run(m.entry, {}, ctx)
    with pytest.raises(Suspended):
        drive(gen, h)
    assert set(h.trace.sites()) == {"x"}            # stopped at the first observe
    h.at_checkpoint = accumulate
    resumed = drive(gen, h)
    assert torch.equal(resumed.t, ret.t) and torch.equal(h.log_weights, whole.log_weights)


def test_the_prior_chooser_draws_through_the_randomness_and_fixed_reads_columns():
    class Counting:
        calls = 0

        def sample(self, dist, ctx):
            Counting.calls += 1
            return dist.sample(ctx)
    m = ppl.model(TWO_STEPS)
    ctx = Particles.all(4, "cpu")
    h = LikelihoodWeighting(4, "cpu", randomness=Counting())
    drive(m.interpreter().run(m.entry, {}, ctx), h)
    assert Counting.calls == 2
    cols = {"x": torch.tensor([0.0, 1.0, 2.0, 3.0]), "y": torch.tensor([1.5, 1.5, 0.5, 0.5])}
    h = Weighting(4, "cpu", choose=fixed(cols))
    ret = drive(m.interpreter().run(m.entry, {}, ctx), h)
    normal = torch.distributions.Normal
    x, y = cols["x"].double(), cols["y"].double()
    lik = normal(x, 1.0).log_prob(torch.tensor(0.5).double()) + normal(y, 1.0).log_prob(torch.tensor(1.5).double())
    assert torch.equal(ret.t, cols["y"]) and torch.allclose(h.log_weights, lik, atol=1e-6, rtol=0)
    with pytest.raises(PPLRuntimeError, match="no value for the choice 'y'"):
        drive(m.interpreter().run(m.entry, {}, ctx), Weighting(4, "cpu", choose=fixed({"x": cols["x"]})))


# ------------------------------------------------------------- twist under resample-move
def _evidence_and_posterior(m, data, method, log_z, seeds=12, **options):
    """Per seeded run, Z_hat / Z and Z_hat / Z * P_hat(z = 1): both unbiased (properness)."""
    z, zp = [], []
    for seed in range(seeds):
        r = m.run(method, data, particles=200, seed=seed, **options)
        ratio = math.exp(r.log_evidence - log_z)
        z.append(ratio)
        zp.append(ratio * float(r.marginal().get(True, 0.0)))
    return torch.tensor(z, dtype=torch.float64), torch.tensor(zp, dtype=torch.float64)


def _mean_se(x):
    return float(x.mean()), float(x.std() / math.sqrt(len(x)))


TWISTED = """
def m():
    a ~ flip(0.3)
    twist(1.5 if a else -0.5)
    observe True ~ bernoulli(0.9 if a else 0.2)
    b ~ flip(0.8 if a else 0.3)
    twist(1.0 if b else -1.0)
    observe a ~ bernoulli(0.6)
    observe b ~ bernoulli(0.7)
    return a
"""


def test_twist_under_resample_move_agrees_with_smc_and_enumeration():
    """twist() under resample_move (it once died with a KeyError): E[Z_hat] = Z and
    E[Z_hat P_hat(a)] = Z P(a | data) by enumeration, and the same as SMC's, within 4.5
    Monte Carlo standard errors over seeded replicates. (Moves that ignore the twist
    give Z_hat / Z = 1.55 +- 0.06 here.)"""
    m = ppl.model(TWISTED)
    exact = m.run("enumerate", {})
    p1 = float(exact.probs()[True])
    means = {}
    for method, options in (("resample_move", {"moves": 1}), ("smc", {})):
        z, zp = _evidence_and_posterior(m, {}, method, exact.log_evidence, **options)
        for values, truth in ((z, 1.0), (zp, p1)):
            mean, se = _mean_se(values)
            assert 0 < se and abs(mean - truth) <= 4.5 * se, (method, mean, truth, se)
        means[method] = _mean_se(zp)
    (a, sa), (b, sb) = means["resample_move"], means["smc"]
    assert abs(a - b) <= 4.5 * math.hypot(sa, sb), means


# ------------------------------------------------------------------ the run's lineage
def test_the_lineage_belongs_to_the_run_and_particles_carry_its_generation():
    """A run installs its lineage with ``lineage_scope``; the particles' ``generation``
    (what a per-particle cache is keyed by: the LM rows of ``stdlib.lm.dsl``) changes
    when the run resamples, and is restored when the run ends, also on error."""
    from ppl.semantics.values import Lineage, lineage_scope
    ctx = Particles.all(3, "cpu")
    assert ctx.generation == (None, 0)
    with lineage_scope(Lineage(ctx.idx)) as lineage:
        before = ctx.generation
        lineage.resample(torch.tensor([0, 0, 2]))
        assert before == (lineage, 0) and ctx.generation == (lineage, 1)
        with pytest.raises(KeyError):
            with lineage_scope(Lineage(ctx.idx)):
                raise KeyError("inner run fails")
        assert ctx.generation == (lineage, 1)
    assert ctx.generation == (None, 0)
