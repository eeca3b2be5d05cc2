"""The exact validity checker (``ppl.testing.validity``) on the library's algorithms, and
on deliberately broken ones.

``check_proper(model, algorithm)`` enumerates every outcome of an algorithm's random draws
(2-3 particles, finite programs) and checks E[Z_hat * sum_i w_i 1{x_i = v}] = gamma({v})
for every return value v, to float64 precision: a finite sum, not a Monte Carlo estimate,
so the tolerance is rounding (1e-9 relative) and a wrong algorithm fails by a margin.

* Importance sampling and SMC with every resampling scheme (and adaptive resampling) are
  proper on fixed programs with random control flow, ``factor``, ``condition``,
  observations inside branches and inside called functions, and a loop of observations
  (N = 2 and 3), and on generated ``finite_programs()`` (N = 2).
* Broken transformations are caught, each by a large error: resampling that keeps the old
  weights, a resampler that always copies the heaviest particle, a handler that drops the
  likelihood of observations inside branches, one that forgets the evidence at resampling
  steps, and multinomial resampling on squared weights.

Cost: every outcome is a run of the interpreter (a few ms), and the outcomes multiply with
the particles: multinomial resampling of 3 particles has 10 outcomes per synchronisation
point, so the N = 3 programs are the smallest that still have each feature.
"""
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ppl
from ppl.inference.smc import SMCHandler, smc
from ppl.semantics.errors import ZeroEvidenceError
from ppl.testing.strategies import finite_programs
from ppl.testing.validity import (check_proper, enumerate_outcomes, importance_algorithm,
                                  smc_algorithm)

torch.set_num_threads(1)
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))

SCHEMES = ["multinomial", "stratified", "systematic", "residual"]

BRANCHES = """
def m():
    z ~ flip(0.4)
    if z:
        observe True ~ bernoulli(0.9)
        factor -0.5
    else:
        observe True ~ bernoulli(0.3)
        observe False ~ bernoulli(0.4)
    k ~ categorical([1, 2])
    observe k ~ bernoulli(0.3 if z else 0.8)
    return (z, k)
"""

CALLS = """
def f(k):
    observe k % 2 ~ bernoulli(0.7)
    return k

def m():
    k ~ categorical([1, 1, 1])
    b ~ flip(0.5)
    j = 0
    if b:
        j = f(k)
    condition b or k > 0
    return j + k
"""

LOOP = """
def m(ys):
    t = 0
    for y in ys:
        b ~ flip(0.5)
        observe y ~ bernoulli(0.8 if b else 0.3)
        t = t + (1 if b else 0)
    return t
"""

# the smallest programs with each feature, for N = 3
TINY_BRANCH = """
def m():
    z ~ flip(0.4)
    if z:
        observe True ~ bernoulli(0.9)
    else:
        factor -1
    observe z ~ bernoulli(0.3)
    return z
"""

TINY_CALL = """
def f(z):
    observe z ~ bernoulli(0.8)
    return 1

def m():
    z ~ flip(0.5)
    k = 0
    if z:
        k = f(z)
    observe z ~ bernoulli(0.3)
    return k
"""

TINY_LOOP = """
def m(ys):
    z ~ flip(0.5)
    for y in ys:
        observe y ~ bernoulli(0.8 if z else 0.3)
    return z
"""

PROGRAMS = {"branches": (BRANCHES, None), "calls": (CALLS, None), "loop": (LOOP, {"ys": [True, False]})}
TINY = {"branch": (TINY_BRANCH, None), "call": (TINY_CALL, None), "loop": (TINY_LOOP, {"ys": [True, False]})}


def algorithms(N):
    yield "importance", importance_algorithm(N)
    for s in SCHEMES:
        yield s, smc_algorithm(N, s)


def assert_proper(check, what, nontrivial=True):
    assert check.ok(), f"{what}:\n{check}"
    assert check.outcomes > 1 or not nontrivial


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_proper_with_two_particles(name):
    src, data = PROGRAMS[name]
    m = ppl.model(src)
    for alg_name, alg in algorithms(2):
        assert_proper(check_proper(m, alg, data), f"{name}, {alg_name}, N = 2")
    assert_proper(check_proper(m, smc_algorithm(2, "systematic", ess_threshold=0.5), data),
                  f"{name}, adaptive systematic, N = 2")


@pytest.mark.parametrize("name", list(TINY))
def test_proper_with_three_particles(name):
    src, data = TINY[name]
    m = ppl.model(src)
    for alg_name, alg in algorithms(3):
        assert_proper(check_proper(m, alg, data), f"{name}, {alg_name}, N = 3")


def test_proper_with_three_particles_low_variance_schemes_on_larger_programs():
    m = ppl.model(BRANCHES)
    for s in ("stratified", "systematic", "residual"):
        assert_proper(check_proper(m, smc_algorithm(3, s)), f"branches, {s}, N = 3")
    m = ppl.model(CALLS)
    assert_proper(check_proper(m, importance_algorithm(3)), "calls, importance, N = 3")
    assert_proper(check_proper(m, smc_algorithm(3, "systematic", ess_threshold=0.6)),
                  "calls, adaptive systematic, N = 3")


def test_all_particles_can_die():
    """An outcome in which every particle fails a condition has Z_hat = 0 (SMC stops
    there with a ZeroEvidenceError): the checker counts it as nothing, and the rest is
    still exactly proper."""
    m = ppl.model("""
def m():
    a ~ flip(0.5)
    condition a
    b ~ categorical([1, 1, 2])
    observe b % 2 ~ bernoulli(0.25)
    return b
""")
    for alg_name, alg in algorithms(2):
        assert_proper(check_proper(m, alg), alg_name)
    with pytest.raises(ZeroEvidenceError):
        torch.manual_seed(0)
        for _ in range(50):  # some seed kills both particles at the condition
            m.run("smc", particles=2, seed=None)


# ------------------------------------------------------------------- generated programs
def _max_checkpoints(m) -> int:
    """The most synchronisation points on any path (SMC with one particle, enumerated)."""
    interp, entry = m.interpreter(), m.entry

    def run(rnd):
        try:
            _, _, h = smc(interp, entry, {}, 1, "cpu", randomness=rnd)
            return len(h.history)
        except ZeroEvidenceError:
            return 0

    return max(n for _, n in enumerate_outcomes(run, max_outcomes=2000))


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(src=finite_programs(max_statements=5, max_depth=2),
       which=st.sampled_from(["importance"] + SCHEMES))
def test_proper_on_generated_programs(src, which):
    m = ppl.model(src)
    paths = len(m.run("enumerate").paths)
    assume(3 <= paths <= 30)
    # outcomes <= (paths per particle)^2 * (3 resampling outcomes)^(synchronisation points)
    bound = paths**2 * (1 if which == "importance" else 3 ** _max_checkpoints(m))
    assume(bound <= 800)
    alg = importance_algorithm(2) if which == "importance" else smc_algorithm(2, which)
    assert_proper(check_proper(m, alg), f"{which}, N = 2, program:\n{src}", nontrivial=False)


# ---------------------------------------------------------------- broken transformations
class ForgetsReset(SMCHandler):
    """Resamples but keeps each particle's accumulated weight (counts it twice)."""

    def _checkpoint(self, eff):
        before, n = self.log_weights, len(self.history)
        super()._checkpoint(eff)
        if len(self.history) > n and self.history[-1].resampled:
            self.log_weights = before[self.lineage.ancestors[-1]]


class DropsBranchLikelihoods(SMCHandler):
    """Ignores the likelihood of observations made by only some particles."""

    def observe(self, eff):
        if eff.ctx.M != self.N:
            self._checkpoint(eff)
            return
        super().observe(eff)


class ForgetsEvidence(SMCHandler):
    """Resets the weights at resampling without keeping their mean in the evidence."""

    def _checkpoint(self, eff):
        log_z = self.log_z
        super()._checkpoint(eff)
        self.log_z = log_z


class _Wrapped:
    """A randomness source that draws like ``inner`` but resamples its own way."""

    def __init__(self, inner):
        self.inner = inner

    def sample(self, dist, ctx):
        return self.inner.sample(dist, ctx)


class CopiesHeaviest(_Wrapped):
    def resample(self, log_weights, scheme, n):
        return torch.full((n,), int(torch.argmax(log_weights)), dtype=torch.long)


class SquaredWeights(_Wrapped):
    def resample(self, log_weights, scheme, n):
        return self.inner.resample(2 * log_weights, "multinomial", n)


def with_randomness(wrapper, N, scheme="multinomial"):
    base = smc_algorithm(N, scheme)
    return lambda model, data, rnd: base(model, data, wrapper(rnd))


BROKEN = {
    "forgets to reset the weights": lambda N: smc_algorithm(N, "systematic", handler=ForgetsReset),
    "copies the heaviest particle": lambda N: with_randomness(CopiesHeaviest, N),
    "drops likelihoods inside branches": lambda N: smc_algorithm(N, "systematic", handler=DropsBranchLikelihoods),
    "forgets the evidence at resampling": lambda N: smc_algorithm(N, "residual", handler=ForgetsEvidence),
    "multinomial on squared weights": lambda N: with_randomness(SquaredWeights, N),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_transformations_are_caught(name):
    m = ppl.model(BRANCHES)
    # the intact algorithm passes on the same program
    assert_proper(check_proper(m, smc_algorithm(2, "systematic")), "intact")
    check = check_proper(m, BROKEN[name](2))
    scale = max(float(v) for v in check.expected.values())
    assert not check.ok(), f"{name} was not caught:\n{check}"
    assert check.max_error > 0.02 * scale, f"{name}: only a small error:\n{check}"


def test_broken_variants_also_caught_on_a_loop():
    m = ppl.model(LOOP)
    data = {"ys": [True, False]}
    for name in ("forgets to reset the weights", "copies the heaviest particle",
                 "forgets the evidence at resampling", "multinomial on squared weights"):
        check = check_proper(m, BROKEN[name](2), data)
        assert not check.ok() and check.max_error > 0.01, f"{name}:\n{check}"
