"""Training objectives for guides (``Guide.fit(objective=...)``).

Notation: a model p(x, y) with latent choices x and observed data y; a guide q(x | y);
for one data set y, K particles x_1..x_K ~ q(. | y) with log weights
lw_k = log p(x_k, y) - log q(x_k | y) (the model run with the guide as its proposal: every
choice's prior density, every likelihood, factor and condition, minus q's density). A
training batch holds B data sets (simulated from the model's prior predictive for an
amortized guide, or the one data set of a guide without encoder), so every tensor below
is [B, K]; losses are averaged over the B data sets. Each function returns
(surrogate loss to minimise, the reported value), and documents what it estimates.

* ``elbo`` -- estimates ELBO = E_q[log p(x, y) - log q(x | y)] = log p(y) - KL(q || p(. | y)),
  a lower bound on log p(y) (the reported value is -ELBO). Gradients: reparameterised
  (pathwise through x = T(loc + scale * eps)) for continuous choices; for discrete
  choices the score-function term (lw_k - b_k) grad log q(x_k) with the leave-one-out
  baseline b_k = mean_{j != k} lw_j (independent of x_k, so the estimator stays unbiased;
  a running mean of the ELBO when K = 1).
* ``iwae`` -- estimates the importance-weighted bound
  E[log (1/K) sum_k exp(lw_k)] (Burda et al. 2016), between the ELBO (K = 1) and
  log p(y) (K -> infinity). Reparameterised gradients; for discrete choices the VIMCO
  score-function term sum_k (L - L_{-k}) grad log q(x_k) (Mnih & Rezende 2016), where
  L_{-k} replaces lw_k by the mean of the others.
* ``rws`` (alias ``brain``) -- self-normalised importance-weighted training, the
  wake-phase q update of reweighted wake-sleep (Bornschein & Bengio 2015): with
  alpha_k = softmax(lw)_k, sum_k alpha_k grad log q(x_k) is a self-normalised (biased,
  consistent as K grows) estimate of -grad KL(p(. | y) || q(. | y)), the *inclusive*
  (mass-covering) KL that a proposal should minimise. Samples are not differentiated
  through. The loss is BRAIn's distillation loss (Pandey et al. 2024)
  -sum_k stopgrad(alpha_k - beta_k) log q(x_k), where beta_k, the self-normalised weight
  of q against the proposal, is 1/K when the proposal is q itself: a baseline with zero
  expectation that lowers the variance. For a reward-tilted target
  p(y) exp(r(y) / beta) (a ``factor`` in the model) this distils the tilted posterior into
  q. Reported: -log Z_hat, the negative IWAE bound of the batch.
* ``forward_kl`` -- simulation-based amortized inference: latents and data drawn from
  the model's prior predictive, (x, y) ~ p(x) p(y | x); the loss -log q(x | y) estimates
  E_{p(y)}[KL(p(. | y) || q(. | y))] + E_{p(y)}[H(p(. | y))] (the second term does not
  depend on q), so its minimiser is the exact posterior for every y the prior predictive
  reaches, whatever the data set. It needs an encoder (a guide that ignores y can only
  learn the prior) and a model whose observations are data (no ``factor``). Reported:
  the loss.
"""
from __future__ import annotations

import math

import torch

OBJECTIVES = ("elbo", "iwae", "rws", "forward_kl")
ALIASES = {"brain": "rws", "kl": "forward_kl", "fkl": "forward_kl"}

# particles violating a condition (log weight -inf) enter ELBO/IWAE losses with this
# finite log weight: no pathwise gradient flows through them, and the score-function
# term pushes the discrete proposal away from them
_FLOOR = -1.0e4


def _finite(lw: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(lw), lw, torch.full_like(lw, _FLOOR).detach())


def elbo(lw: torch.Tensor, logq_discrete: torch.Tensor | None = None, running: list | None = None):
    """(-ELBO surrogate, -ELBO) for log weights ``lw`` [B, K]; ``logq_discrete`` [B, K]
    the log q of the discrete choices (score-function term), ``running`` a one-element
    list holding the running-mean baseline (used when K = 1)."""
    lw = _finite(lw)
    value = lw.mean()
    loss = -value
    value = value.detach()
    if logq_discrete is not None and logq_discrete.requires_grad:
        lwd = lw.detach()
        K = lw.shape[1]
        if K > 1:
            b = (lwd.sum(1, keepdim=True) - lwd) / (K - 1)
        else:
            b = torch.full_like(lwd, running[0] if running and running[0] is not None else float(lwd.mean()))
        if running is not None:
            m = float(lwd.mean())
            running[0] = m if running[0] is None else 0.9 * running[0] + 0.1 * m
        loss = loss - ((lwd - b) * logq_discrete).mean()
    return loss, -float(value)


def iwae(lw: torch.Tensor, logq_discrete: torch.Tensor | None = None):
    """(-IWAE surrogate, -IWAE bound) for ``lw`` [B, K] (VIMCO term for discrete choices)."""
    lw = _finite(lw)
    B, K = lw.shape
    L = torch.logsumexp(lw, 1) - math.log(K)
    loss = -L.mean()
    if logq_discrete is not None and logq_discrete.requires_grad and K > 1:
        lwd = lw.detach()
        others = (lwd.sum(1, keepdim=True) - lwd) / (K - 1)
        M = lwd.unsqueeze(1).expand(B, K, K).clone()
        ar = torch.arange(K)
        M[:, ar, ar] = others
        L_minus = torch.logsumexp(M, 2) - math.log(K)
        loss = loss - ((L.detach().unsqueeze(1) - L_minus) * logq_discrete).sum(1).mean()
    return loss, -float(L.detach().mean())


def rws(lw: torch.Tensor, logq: torch.Tensor):
    """(BRAIn/RWS surrogate, -log Z_hat) for log weights ``lw`` [B, K] and the guide's
    log densities ``logq`` [B, K] of its (non-differentiated) samples."""
    lwd = lw.detach()
    B, K = lwd.shape
    dead = torch.isneginf(lwd).all(1, keepdim=True)
    alpha = torch.softmax(torch.where(dead, torch.zeros_like(lwd), lwd), 1)
    alpha = torch.where(dead, torch.full_like(alpha, 1.0 / K), alpha)  # no information: no update
    beta = 1.0 / K
    loss = -((alpha - beta) * logq).sum(1).mean()
    z = torch.logsumexp(_finite(lwd), 1) - math.log(K)
    return loss, -float(z.mean())


def forward_kl(logq: torch.Tensor):
    """(loss, loss) for the guide's log densities ``logq`` [B] of simulated latents."""
    loss = -logq.mean()
    return loss, float(loss.detach())
