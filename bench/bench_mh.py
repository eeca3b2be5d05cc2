"""MH: ppl's single-site trace MH vs the same sampler hand-written in batched torch.

Model: a two-component Gaussian mixture with known weight w and sd sigma, unknown
ordered means (normal(0, 3) priors, mu1 < mu2), N = 20 points. Both sides sample the
two means only: the assignments are summed out in the likelihood, per point
logsumexp([log w + log N(y; mu1, sigma), log(1 - w) + log N(y; mu2, sigma)]) (constants
common to both terms dropped). Written in the DSL two ways:

* "per point": ``for y in ys: factor logsumexp([...])`` -- one factor per point;
* "vectorised": the same sum over the data as tensor arithmetic on ``ys`` (one factor).

ppl runs both as a traced graph per step (``inference/mh_traced.py``: the default for the
random-walk kernel on a program whose control flow does not depend on its choices; the
time includes building the trace); "interpreted" is the same kernel re-running the
interpreter at every step (``traced=False``), for reference.

The sampler is the same on every side: C chains in one batch, per step and per chain
pick one of the two means uniformly, propose mean + scale * N(0, 1) (ppl's ``rw``
kernel: the means' support is the real line, so no Jacobian), accept with probability
min(1, p(x') / p(x)) (0 when the ordering fails). The hand-written version is what a
torch user would write: one [C, N] log-target evaluation per step, with ppl's numerics:
values and the per-point terms in float32 (the model's dtype; ppl evaluates the model in
it), the per-chain log target accumulated in float64 (as ppl accumulates log densities).

Reported, per contender: the median wall time of a run (burn-in + kept steps), the
median ESS of mu1 over the kept draws of all chains (``pyro.ops.stats``
effective_sample_size, chains x draws), the median over repeats of ESS / second, and
the ratio of that to the hand-written one (target: ppl at least 0.5). Each contender's
posterior mean of mu1 is printed with its MCSE as a check that all sample the same
posterior. Repeats are interleaved (hand, ppl, ppl, hand, ...) as in ``common``.
"""
from __future__ import annotations

import math
import statistics

import torch
from pyro.ops.stats import effective_sample_size

import ppl
from ppl.inference.mh import mh

from common import now

PER_POINT = """
def mixture(ys, w, sigma):
    mu1 ~ normal(0, 3)
    mu2 ~ normal(0, 3)
    condition mu1 < mu2
    for y in ys:
        factor logsumexp([log(w) - 0.5 * ((y - mu1) / sigma) ** 2, log(1 - w) - 0.5 * ((y - mu2) / sigma) ** 2])
    return mu1
"""

VECTORISED = """
def mixture(ys, w, sigma):
    mu1 ~ normal(0, 3)
    mu2 ~ normal(0, 3)
    condition mu1 < mu2
    a = log(w) - 0.5 * ((ys - mu1) / sigma) ** 2
    b = log(1 - w) - 0.5 * ((ys - mu2) / sigma) ** 2
    m = max(a, b)
    factor sum(m + log(exp(a - m) + exp(b - m)))
    return mu1
"""

W, SIGMA, PRIOR_SD = 0.4, 1.0, 3.0


def make_data(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, generator=g) < W
    return torch.where(z, -2.0 + SIGMA * torch.randn(n, generator=g), 2.0 + SIGMA * torch.randn(n, generator=g))


def log_target(mu: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """log p(mu1, mu2, ys) up to a constant, per chain: mu [C, 2] -> [C], float64 (the
    terms are computed in the inputs' dtype, their sum accumulated in float64)."""
    prior = (-0.5 * (mu / PRIOR_SD) ** 2).sum(1)
    a = math.log(W) - 0.5 * ((ys - mu[:, :1]) / SIGMA) ** 2  # [C, N]
    b = math.log(1 - W) - 0.5 * ((ys - mu[:, 1:]) / SIGMA) ** 2
    lp = prior.double() + torch.logaddexp(a, b).sum(1).double()
    return torch.where(mu[:, 0] < mu[:, 1], lp, torch.full_like(lp, -math.inf))


def hand_mh(ys: torch.Tensor, chains: int, burn_in: int, samples: int, scale: float) -> torch.Tensor:
    """Single-site random-walk MH on (mu1, mu2), C chains batched: mu1's kept draws [C, S]."""
    ys = ys.float()
    mu = torch.sort(PRIOR_SD * torch.randn(chains, 2), 1).values  # the prior given mu1 < mu2
    lp = log_target(mu, ys)
    rows = torch.arange(chains)
    kept = torch.empty(chains, samples)
    for t in range(burn_in + samples):
        site = (torch.rand(chains) * 2).long()
        prop = mu.clone()
        prop[rows, site] += scale * torch.randn(chains)
        lp_prop = log_target(prop, ys)
        accept = torch.log(torch.rand(chains, dtype=torch.float64)) < lp_prop - lp
        mu = torch.where(accept[:, None], prop, mu)
        lp = torch.where(accept, lp_prop, lp)
        if t >= burn_in:
            kept[:, t - burn_in] = mu[:, 0]
    return kept.double()


def ppl_mh(interp, entry, data, chains: int, burn_in: int, samples: int, scale: float,
           traced: bool = True) -> torch.Tensor:
    """ppl's MH; ``traced`` (the default for the rw kernel on a static program) replays a
    traced graph per step, ``traced=False`` re-runs the interpreter (the same kernel)."""
    info: dict = {}
    kept, _ = mh(interp, entry, data, chains=chains, samples=samples, burn_in=burn_in, kernel="rw", scale=scale,
                 traced=traced, info=info)
    assert info["traced"] == traced
    return torch.stack([k.values["mu1"] for k in kept], 1).double()


def ess(draws: torch.Tensor) -> float:
    return float(effective_sample_size(draws, chain_dim=0, sample_dim=1))


def bench(title: str, contenders: dict, repeats: int, reference: str, target: float | None) -> dict:
    """Interleaved repeats (the order alternates each round); ESS computed untimed."""
    fns = list(contenders.items())
    for _, fn in fns:  # warm-up
        fn()
    times = {n: [] for n in contenders}
    esss = {n: [] for n in contenders}
    rates = {n: [] for n in contenders}
    means = {n: [] for n in contenders}
    for r in range(repeats):
        for name, fn in (fns if r % 2 == 0 else fns[::-1]):
            t0 = now()
            draws = fn()
            dt = now() - t0
            e = ess(draws)
            times[name].append(dt)
            esss[name].append(e)
            rates[name].append(e / dt)
            means[name].append((float(draws.mean()), float(draws.std()) / math.sqrt(e)))
    ref = statistics.median(rates[reference])
    print(f"\n{title}")
    print(f"  {'contender':<26} {'median s':>9} {'ESS':>7} {'ESS/s':>9} {'ratio':>7}   E[mu1] (MCSE), last run")
    out = {}
    for name in contenders:
        rate = statistics.median(rates[name])
        out[name] = {"seconds": statistics.median(times[name]), "ess": statistics.median(esss[name]),
                     "ess_per_s": rate, "ratio": rate / ref}
        m, se = means[name][-1]
        print(f"  {name:<26} {out[name]['seconds']:>9.3f} {out[name]['ess']:>7.0f} {rate:>9.1f} "
              f"{rate / ref:>7.3f}   {m:.3f} ({se:.3f})")
    if target is not None:
        worst = min(v["ratio"] for n, v in out.items() if n != reference)
        best = max(v["ratio"] for n, v in out.items() if n != reference)
        verdict = "OK" if best >= target else "MISSED"
        print(f"  target: ppl ESS/s at least {target:.1f}x of {reference}: {verdict} "
              f"(best ppl {best:.3f}x, worst {worst:.3f}x)")
    return out


def run(repeats: int = 9, quick: bool = False) -> dict:
    repeats = max(3, min(repeats, 5))  # each run is seconds long: a few repeats suffice
    n = 20
    ys = make_data(n)
    data_list = {"ys": ys.tolist(), "w": W, "sigma": SIGMA}
    loop_model, vec_model = ppl.model(PER_POINT), ppl.model(VECTORISED)
    loop_interp, vec_interp = loop_model.interpreter(), vec_model.interpreter()
    loop_data = loop_model.prepare_data(data_list, "cpu")
    vec_data = vec_model.prepare_data(data_list, "cpu")
    # the three log densities agree (up to the dropped constant) on a few points
    mu = torch.tensor([[-2.0, 2.0], [-1.0, 1.5], [0.5, 0.7]], dtype=torch.float64)
    const = []
    for m in (loop_model, vec_model):
        for i in range(mu.shape[0]):
            lj = m.log_joint({"mu1": float(mu[i, 0]), "mu2": float(mu[i, 1])}, **data_list)
            const.append(float(lj) - float(log_target(mu[i:i + 1], ys.double())[0]))
    assert max(const) - min(const) < 1e-4, f"the DSL models and the hand-written target differ: {const}"

    results = {}
    burn_in, samples = (100, 300) if quick else (200, 1000)
    for chains, scale in [(8, 0.6), (1024, 0.6)]:
        if quick and chains > 8:
            continue
        title = (f"Mixture of 2 normals, N = {n}, means only (assignments summed out), single-site RW MH, "
                 f"{chains} chains, {burn_in} + {samples} steps")
        contenders = {
            "hand-written torch": lambda c=chains, s=scale: hand_mh(ys, c, burn_in, samples, s),
            "ppl mh (vectorised)": lambda c=chains, s=scale: ppl_mh(vec_interp, "mixture", vec_data, c, burn_in,
                                                                    samples, s),
        }
        if chains <= 8:
            contenders["ppl mh (per-point factor)"] = lambda c=chains, s=scale: ppl_mh(
                loop_interp, "mixture", loop_data, c, burn_in, samples, s)
        contenders["ppl mh (vec., interpreted)"] = lambda c=chains, s=scale: ppl_mh(
            vec_interp, "mixture", vec_data, c, burn_in, samples, s, traced=False)
        results[f"mixture_{chains}_chains"] = bench(title, contenders, repeats, "hand-written torch",
                                                    target=0.5 if chains == 8 else None)
    return results
