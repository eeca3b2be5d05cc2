"""Device handling: the same model runs on CPU and, where one exists, on a CUDA GPU
with the same answer; asking for CUDA without one is a clear error."""
import math

import pytest
import torch

import ppl

COIN = """
def coin(flips):
    p ~ beta(2, 2)
    for f in flips:
        observe f ~ bernoulli(p)
    if p > 0.5:
        k ~ binomial(3, p)
    else:
        k = 0
    return p
"""
FLIPS = [1, 1, 0, 1, 1, 0, 1, 1]


def _check_beta_posterior(res):
    a, b = 2 + 6, 2 + 2
    mean = a / (a + b)
    sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    assert abs(res.mean("p") - mean) < 4.5 * sd / math.sqrt(res.ess)
    exact_logz = (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)) - \
                 (math.lgamma(2) + math.lgamma(2) - math.lgamma(4))
    w = res.weights.double()
    n = w.shape[0]
    lw = res.log_weights.double()
    rel_se = float(torch.exp(lw - lw.max()).std() / torch.exp(lw - lw.max()).mean()) / math.sqrt(n)
    assert abs(res.log_evidence - exact_logz) < 4.5 * rel_se + 1e-6


def test_cpu_device_explicit():
    res = ppl.model(COIN).run("importance", {"flips": FLIPS}, particles=50_000, seed=3, device="cpu")
    _check_beta_posterior(res)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ppl.PPLError) as e:
        ppl.model(COIN).run("importance", {"flips": FLIPS}, particles=10, device="cuda")
    assert "no CUDA GPU" in str(e.value) and "device='cpu'" in str(e.value)


def test_auto_device_runs():
    res = ppl.model(COIN).run("importance", {"flips": FLIPS}, particles=50_000, seed=4, device="auto")
    _check_beta_posterior(res)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_closed_form():
    res = ppl.model(COIN).run("importance", {"flips": FLIPS}, particles=200_000, seed=5, device="cuda")
    _check_beta_posterior(res)
    assert res.log_weights.device.type == "cpu"  # results are brought back for people
