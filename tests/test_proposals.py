"""Custom proposals written in the DSL: ``x ~ propose(target, proposal)``.

The choice's distribution is the target; IS and SMC draw from the proposal and correct
the weight by target/proposal. Checked exactly (properness by enumerating every draw of
the algorithm; the exact semantics and MH see only the target) and statistically (SMC
with the locally optimal proposal of a linear-Gaussian model against a Kalman filter)."""
import math

import numpy as np
import pytest
import torch

import ppl
from ppl.testing.validity import check_proper, importance_algorithm, mh_kernel_check, smc_algorithm

torch.set_num_threads(1)

FINITE = """
def m():
    a ~ propose(flip(0.3), flip(0.5))
    observe True ~ bernoulli(0.8 if a else 0.2)
    b ~ propose(flip(0.6 if a else 0.4), flip(0.9))
    observe False ~ bernoulli(0.7 if b else 0.1)
    return a + 2 * b
"""
PLAIN = FINITE.replace("propose(flip(0.3), flip(0.5))", "flip(0.3)").replace(
    "propose(flip(0.6 if a else 0.4), flip(0.9))", "flip(0.6 if a else 0.4)")


def test_the_measure_is_the_target_s():
    assert ppl.model(FINITE).enumerate().probs() == ppl.model(PLAIN).enumerate().probs()
    assert ppl.model(FINITE).log_joint({"a": True, "b": False}) == ppl.model(PLAIN).log_joint({"a": True, "b": False})


@pytest.mark.parametrize("algorithm", [importance_algorithm(2), smc_algorithm(2, "systematic"),
                                       smc_algorithm(2, "multinomial"), smc_algorithm(3, "residual")])
def test_proposals_keep_is_and_smc_exactly_proper(algorithm):
    c = check_proper(ppl.model(FINITE), algorithm)
    assert c.ok(), c


def test_a_proposal_without_its_correction_is_caught():
    # the same draws without the target/proposal weight: not proper
    from ppl.inference.smc import SMCHandler

    class NoCorrection(SMCHandler):
        def sample(self, eff):
            d = getattr(eff.dist, "proposal", eff.dist)
            value = self.randomness.sample(d, eff.ctx)
            self.trace.record(eff.addr, eff.ctx, value)
            return value

    c = check_proper(ppl.model(FINITE), smc_algorithm(2, "systematic", handler=NoCorrection))
    assert not c.ok() and c.max_error > 0.01


def test_mh_uses_the_target():
    c = mh_kernel_check(ppl.model(FINITE))
    assert c.ok() and c.balance_error < 1e-12


def test_a_proposal_must_be_a_distribution():
    m = ppl.model("def m():\n    x ~ propose(normal(0, 1), 3)\n    return x\n")
    with pytest.raises(ppl.PPLError, match="proposal must be a distribution"):
        m.run("importance", particles=10)


SSM = """
def ssm(ys, guided, a=0.9, q=1.0, r=1.0):
    x ~ normal(0, 1)
    for t in range(len(ys)):
        if guided:
            # the locally optimal proposal p(x_t | x_t-1, y_t) of this linear-Gaussian model
            s2 = q * q * r * r / (q * q + r * r)
            x ~ propose(normal(a * x, q), normal(s2 * (a * x / (q * q) + ys[t] / (r * r)), sqrt(s2)))
        else:
            x ~ normal(a * x, q)
        observe ys[t] ~ normal(x, r)
    return x
"""


def kalman(ys, a=0.9, q=1.0, r=1.0):
    m, v, total = 0.0, 1.0, 0.0
    for y in ys:
        m, v = a * m, a * a * v + q * q
        s = v + r * r
        total += -0.5 * (math.log(2 * math.pi * s) + (y - m) ** 2 / s)
        k = v / s
        m, v = m + k * (y - m), (1 - k) * v
    return total, m


def test_guided_smc_is_unbiased_against_kalman():
    g = torch.Generator().manual_seed(0)
    x, ys = 0.0, []
    for _ in range(40):
        x = 0.9 * x + float(torch.randn((), generator=g))
        ys.append(x + float(torch.randn((), generator=g)))
    log_z, mean_T = kalman(ys)
    m = ppl.model(SSM)
    ratios, means = [], []
    for seed in range(12):
        r = m.run("smc", {"ys": ys, "guided": True}, particles=300, seed=seed)
        ratios.append(math.exp(r.log_evidence - log_z))
        means.append(r.mean())
    ratios, means = np.array(ratios), np.array(means)
    assert abs(ratios.mean() - 1) < 4.5 * ratios.std(ddof=1) / math.sqrt(len(ratios)) + 1e-3
    assert abs(means.mean() - mean_T) < 4.5 * means.std(ddof=1) / math.sqrt(len(means)) + 1e-3
