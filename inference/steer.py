"""SMC steering with expansion and selection without replacement, and best-of-N.

``smc_steer`` (LLaMPPL's ``smc_steer``, over the program's checkpoints): N parents, each
extended K ways, and N survivors chosen among the N*K children *without replacement*.

The population is M = N*K particles laid out as K copies of N parents (slot k*N + r is
copy k of parent r). Between synchronisation checkpoints (see ``inference.smc``) every
slot runs on its own: each copy draws its own choices, so a parent's K copies become K
different children (the K-way expansion; at the start the parents are the empty prefix,
so the first M particles are simply M prior draws). At a synchronisation checkpoint
(every one, or only when the ESS of the M children falls below ``ess_threshold * M``)
N of the M weighted children are selected without replacement by
``resampling.without_replacement`` (Fearnhead & Clifford's optimal resampling: with
p the normalised weights and c the solution of sum_i min(1, p_i / c) = N, a child with
p_i >= c is kept with its own weight, the others by one systematic sweep with
probability p_i / c and weight c; no child is kept twice), and each survivor is
replicated K times, every copy carrying the survivor's weight (the population's
weights are averaged over all M slots, so the K copies share it). As in SMC, the mean
weight before selection is kept in the evidence estimate and the new weights are
relative to it; unlike SMC's resampling they are not uniform.

Invariant: the final weighted population is proper for the program's unnormalised
measure gamma (mass Z): E[Z_hat * sum_i w_i f(x_i)] = Z * E_post[f] for every f, with
Z_hat = exp(log_evidence) (so Z_hat is unbiased). It holds because the selection is
unbiased (E[new_i 1{i kept}] = p_i: ``without_replacement``), replication into K slots
leaves each survivor's total weight unchanged, and the K copies' independent extensions
are each proper given their parent. The exact checker's ``steer_algorithm`` enumerates
every draw (prior draws per particle and the exact law of the selection) and
``check_proper`` verifies this exactly on small programs (tests/test_steer.py).

With K = 1 nothing is ever dropped (N of N children, all kept with their own weights):
``smc_steer`` is then importance sampling.

``best_of_n``: N prior draws (importance sampling's particles); the one with the highest
score, its total log weight (every observe/factor/condition of the program; the prior
of its choices is not part of it). An optimiser's answer, not a posterior sample: it has
no evidence estimate, and repeated runs do not sample the posterior.
"""
from __future__ import annotations

import functools

import torch

from ..semantics.errors import PPLRuntimeError
from ..semantics.options import OptionSpec
from .importance import likelihood_weighting
from .population import Optimum
from .resampling import log_mean_exp
from .smc import SMCHandler, smc


class SteerHandler(SMCHandler):
    """SMC whose resampling is ``smc_steer``'s selection: N = M / K survivors among the M
    children, without replacement, with their new (non-uniform) log weights, each
    replicated into K slots."""

    def __init__(self, N: int, device, lineage, *, expansion: int, **options):
        super().__init__(N, device, lineage, **options)
        if N % expansion:
            raise PPLRuntimeError(f"a steer population of {N} is not {expansion} copies of its parents")
        self.expansion = expansion
        self.parents = N // expansion

    def _resample(self, lw, w, s):
        idx, new_lw = self.randomness.select_without_replacement(lw, self.parents)
        K = self.expansion
        return idx.repeat(K), new_lw.to(lw.dtype).repeat(K)


#: the checks of the options ``smc_steer`` and ``best_of_n`` take (``semantics.options``)
_POSITIVE_INT, _FRACTION = OptionSpec("int", low=1), OptionSpec("number", low=0, high=1)


def smc_steer(interp, entry: str, data: dict, particles: int, expansion: int, device="cpu", *,
              ess_threshold: float = 1.0, randomness=None, handler_cls=None, progress: bool | None = None):
    """Run ``smc_steer`` with ``particles`` parents, each extended ``expansion`` ways: a
    ``Population`` of the particles*expansion slots, like ``inference.smc.smc``'s
    (log-mean-exp of the log weights is log Z_hat). ``randomness``
    must have ``sample`` and ``select_without_replacement``; ``handler_cls`` substitutes
    a subclass of ``SteerHandler`` (to check a modified algorithm). ``progress``: as for
    ``smc``, a counter of checkpoints with the ESS of the particles*expansion slots."""
    N, K = _POSITIVE_INT.check("particles", particles), _POSITIVE_INT.check("expansion", expansion)
    _FRACTION.check("ess_threshold", ess_threshold)
    cls = functools.partial(handler_cls or SteerHandler, expansion=K)
    pop = smc(interp, entry, data, N * K, device, ess_threshold=ess_threshold, randomness=randomness,
              handler_cls=cls, progress=progress, label="smc_steer")
    pop.extra = {"history": pop.extra["history"], "parents": N, "expansion": K, "ess_threshold": ess_threshold}
    return pop


def _finite_scores(h, eff) -> None:
    """Checkpoint rule of ``best_of_n``: a score (total log weight) of +inf or NaN is an
    error at the observe/factor that made it. A candidate scored +inf would win whatever
    it is, and "score inf" would be reported as if it were an answer."""
    lw = h.log_weights[eff.ctx.idx]
    bad = torch.isposinf(lw) | torch.isnan(lw)
    if bool(bad.any()):
        what = "+inf" if bool(torch.isposinf(lw).any()) else "NaN"
        raise PPLRuntimeError(
            f"best_of_n: this makes a candidate's score {what}, so no best candidate can be chosen",
            eff.span, "a factor of +inf (or an observed value of infinite density) outweighs everything; "
                      "bound it (e.g. factor min(x, 1e6)) or give the value a finite density")


_finite_scores.reports_infinite = True  # (the handler leaves a factor of +inf to this rule's error)


def best_of_n(interp, entry: str, data: dict, particles: int, device="cpu", progress: bool | None = None):
    """N prior draws, scored by their total log weight: the best as an ``Optimum`` (one
    particle, its score, and the N draws' importance estimate of log Z). Ties go to the
    lowest index. ``progress``: as for ``importance.likelihood_weighting``."""
    N = _POSITIVE_INT.check("particles", particles)
    pop = likelihood_weighting(interp, entry, data, N, device, at_checkpoint=_finite_scores, progress=progress,
                               label="best_of_n")
    best = int(torch.argmax(pop.log_weights))  # the first maximum
    one = {name: (v[best:best + 1] if isinstance(v, torch.Tensor) else [v[best]],
                  None if present is None else present[best:best + 1]) for name, (v, present) in pop.sites.items()}
    return Optimum("best_of_n", one, float(pop.log_weights[best]), N, log_mean_exp(pop.log_weights))
