"""Importance sampling: ppl vs the same computation hand-written in vectorised torch.

Models (the issue's benchmark): Beta-Bernoulli with 20 observations at N = 100,000,
and the 1-D linear-Gaussian state-space model with T = 100 at N = 10,000. The
hand-written versions are what a competent torch user would write, with ppl's settings:
torch.distributions objects with ``validate_args=False`` (ppl builds its torch
distributions that way and makes its own parameter checks, which count in its time),
log weights accumulated in float64 (as ppl does), one batched draw per site and one
batched log_prob per site -- for the coin, ONE log_prob call for all 20 flips (the
observations are exchangeable given p; ppl runs its loop of 20 observe statements).
Both sides compute the same estimator (likelihood weighting); the log-evidence each
returns is printed as a check.
"""
from __future__ import annotations

import functools
import math

import torch

import ppl
from ppl.inference.importance import likelihood_weighting

from common import report, time_interleaved

COIN = """
def coin(flips):
    p ~ beta(1, 1)
    for f in flips:
        observe f ~ bernoulli(p)
    return p
"""

SSM = """
def ssm(ys, a=0.9, q=1.0, r=1.0):
    x ~ normal(0, 1)
    for t in range(len(ys)):
        x ~ normal(a * x, q)
        observe ys[t] ~ normal(x, r)
    return x
"""


def hand_coin(flips: torch.Tensor, n: int):
    p = torch.distributions.Beta(1.0, 1.0, validate_args=False).sample((n,))
    # all 20 observations in one vectorised call: [n, 1] probabilities against [20] flips
    lw = torch.distributions.Bernoulli(probs=p[:, None], validate_args=False).log_prob(flips)
    return p, lw.sum(1, dtype=torch.float64)


def hand_ssm(ys: torch.Tensor, n: int, a=0.9, q=1.0, r=1.0):
    Normal = functools.partial(torch.distributions.Normal, validate_args=False)
    x = Normal(0.0, 1.0).sample((n,))
    lw = torch.zeros(n, dtype=torch.float64)
    for t in range(len(ys)):  # sequential in t: one draw and one log_prob per step
        x = Normal(a * x, q).sample()
        lw += Normal(x, r).log_prob(ys[t])
    return x, lw


def kalman_log_evidence(ys, a=0.9, q=1.0, r=1.0) -> float:
    """log p(y_1..T) of the state-space model (x_0 ~ N(0, 1), then x_t = a x_{t-1} + N(0, q))."""
    m, v, total = 0.0, 1.0, 0.0
    for y in ys.tolist():
        m, v = a * m, a * a * v + q * q
        s = v + r * r
        total += -0.5 * (math.log(2 * math.pi * s) + (y - m) ** 2 / s)
        k = v / s
        m, v = m + k * (y - m), (1 - k) * v
    return total


def log_mean_exp(lw: torch.Tensor) -> float:
    return float(torch.logsumexp(lw, 0) - math.log(lw.shape[0]))


def run(repeats: int = 9, quick: bool = False) -> dict:
    torch.manual_seed(0)
    flips = (torch.rand(20) < 0.7).float()
    x, ys = 0.0, []
    for _ in range(100):
        x = 0.9 * x + torch.randn(()).item()
        ys.append(x + torch.randn(()).item())
    ys = torch.tensor(ys)

    coin = ppl.model(COIN)
    ssm = ppl.model(SSM)
    coin_interp, ssm_interp = coin.interpreter(), ssm.interpreter()
    coin_data = coin.prepare_data({"flips": flips}, "cpu")
    ssm_data = ssm.prepare_data(ssm.bind((), {"ys": ys}), "cpu")
    n_coin, n_ssm = (10_000, 1_000) if quick else (100_000, 10_000)

    results = {}
    # The interpreter entry point alone (what Model.run adds on top is the result object).
    times = time_interleaved({
        "hand-written torch": lambda: hand_coin(flips, n_coin),
        "ppl importance": lambda: likelihood_weighting(coin_interp, "coin", coin_data, n_coin),
        "ppl Model.run (+result)": lambda: coin.run("importance", {"flips": flips}, particles=n_coin),
    }, repeats)
    _, lw_hand = hand_coin(flips, n_coin)
    _, lw_ppl = likelihood_weighting(coin_interp, "coin", coin_data, n_coin)
    h = int(flips.sum())
    exact = math.lgamma(1 + h) + math.lgamma(1 + 20 - h) - math.lgamma(22)
    results["beta_bernoulli"] = report(
        f"Beta-Bernoulli, 20 observations, N = {n_coin:,} (exact log Z = {exact:.4f})", times,
        "hand-written torch", target=2.0,
        extra={"hand-written torch": f"log Z = {log_mean_exp(lw_hand):.4f}",
               "ppl importance": f"log Z = {log_mean_exp(lw_ppl):.4f}"})

    times = time_interleaved({
        "hand-written torch": lambda: hand_ssm(ys, n_ssm),
        "ppl importance": lambda: likelihood_weighting(ssm_interp, "ssm", ssm_data, n_ssm),
        "ppl Model.run (+result)": lambda: ssm.run("importance", {"ys": ys}, particles=n_ssm),
    }, repeats)
    _, lw_hand = hand_ssm(ys, n_ssm)
    _, lw_ppl = likelihood_weighting(ssm_interp, "ssm", ssm_data, n_ssm)
    results["state_space"] = report(
        f"State-space model, T = 100, N = {n_ssm:,} (Kalman log Z = {kalman_log_evidence(ys):.2f}; "
        "prior-proposal IS is very noisy at T = 100: SMC's job)", times, "hand-written torch", target=2.0,
        extra={"hand-written torch": f"log Z = {log_mean_exp(lw_hand):.2f}",
               "ppl importance": f"log Z = {log_mean_exp(lw_ppl):.2f}"})
    return results
