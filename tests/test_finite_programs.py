"""Generated finite programs: exact enumeration and importance sampling agree.

``ppl.testing.strategies.finite_programs()`` draws small discrete models with random
control flow, observations, factors and conditions (never with zero evidence). For each,
the exact semantics (``enumerate``) is the truth, and likelihood weighting with N
particles in one batch must agree with it within Monte Carlo error:

(a) every return value's probability: |p_IS - p| <= 5 SE, SE the larger of Kish's
    sqrt(p (1 - p) / ESS) and the delta-method SE of the self-normalised estimate
    linearised at p (Kish's formula alone understates the error when the weights
    correlate with the value), plus a slack of 1e-9 for float rounding; a value the
    exact semantics gives probability 0 must have no weight at all;
(b) the evidence: exp(log_evidence) of IS is unbiased for Z, so |Zhat / Z - 1| <= 5 SE
    with SE = sd(W) / (sqrt(N) mean(W)) from the weights (plus 1e-5 for float32 weights);
(c) the exact evidence is the sum of the path weights, and a Fraction when no factor
    makes a weight irrational; the exact table sums to one.
"""
import math
import sys
from fractions import Fraction

import torch
from hypothesis import HealthCheck, given, settings

import ppl
from ppl.testing.montecarlo import describe, evidence_se, kish_se, particle_keys, ratio_se
from ppl.testing.strategies import finite_programs

torch.set_num_threads(1)
# the interpreter raises the recursion limit on first use; do it before hypothesis runs
# so that hypothesis does not warn about a limit changed during a test
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))
N = 50_000
Z = 5.0
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def _same(a, b) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


@SETTINGS
@given(finite_programs())
def test_importance_sampling_matches_enumeration(src):
    m = ppl.model(src)
    exact = m.run("enumerate")
    r = m.run("importance", particles=N, seed=0)
    truth = exact.probs()
    w = r.weights.to(torch.float64)
    keys = particle_keys(r.sites["return"])
    weighted = {k for k, wi in zip(keys, w.tolist()) if wi > 0}
    impossible = [k for k in weighted if not any(_same(k, v) for v in truth)]
    assert not impossible, f"values with weight but probability 0: {impossible}\n{src}"
    for v, p in truth.items():
        p = float(p)
        g = torch.tensor([1.0 if _same(k, v) else 0.0 for k in keys], dtype=torch.float64)
        est, se = ratio_se(w, g, centre=p)
        se = max(se, kish_se(w, None, p))
        assert abs(est - p) <= Z * se + 1e-9, f"P(return = {v!r}): {describe(est, p, se)}\n{src}"


@SETTINGS
@given(finite_programs())
def test_importance_evidence_matches_exact_evidence(src):
    m = ppl.model(src)
    exact = m.run("enumerate")
    r = m.run("importance", particles=N, seed=0)
    log_z, se = evidence_se(r.log_weights)
    ratio = math.exp(log_z - float(exact.log_evidence))
    assert abs(ratio - 1) <= Z * se + 1e-5, \
        f"Zhat / Z = {ratio:.6f}, SE {se:.3g}, Z = {exact.evidence}\n{src}"


@SETTINGS
@given(finite_programs(factors=False))
def test_exact_evidence_is_a_fraction_summing_the_paths(src):
    exact = ppl.model(src).run("enumerate")
    assert isinstance(exact.evidence, Fraction)
    assert all(isinstance(w, Fraction) for w, _ in exact.paths)
    assert exact.evidence == sum(w for w, _ in exact.paths) > 0
    assert sum(exact.probs().values()) == 1
    assert exact.log_evidence == math.log(exact.evidence) or \
        abs(exact.log_evidence - math.log(exact.evidence)) <= 1e-12 * abs(math.log(exact.evidence)) + 1e-15


@SETTINGS
@given(finite_programs())
def test_exact_evidence_sums_the_paths_with_factors(src):
    exact = ppl.model(src).run("enumerate")
    weights = [w for w, _ in exact.paths]
    if all(isinstance(w, Fraction) for w in weights):
        assert isinstance(exact.evidence, Fraction) and exact.evidence == sum(weights)
    else:
        assert isinstance(exact.evidence, float)
        assert math.isclose(exact.evidence, math.fsum(float(w) for w in weights), rel_tol=1e-12)
    assert exact.evidence > 0
    assert math.isclose(sum(float(p) for p in exact.probs().values()), 1.0, rel_tol=1e-12)
