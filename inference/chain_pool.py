"""The chains of one MCMC run shared by the ranks of a ``torchrun`` job (issue 15, item 2).

Every statistic a Markov chain method pools *over its chains* must be pooled over all the
job's chains, not over one rank's, or the ranks would run different kernels (each still
invariant, but not the single-process method). Inside ``chains_shared_with(group)`` (the
distributed chain runs enter it), ``pooled_over_chains(values)`` returns the per-chain
values of every rank, concatenated in rank order (chain order of the whole run); outside
it, the values themselves. What pools over chains today:

* ``mh``'s adapted random-walk scales, frozen at the end of burn-in to the median over
  the chains (``mh_adapt.ScaleAdaptation.freeze``): pooled here.
* ``mh(..., block=True)``: the population covariance and the straggler restarts use the
  whole population of chains at every burn-in step; ``refuse_when_shared`` makes it an
  error with distributed chains (one collective per step: not worth it yet).

NUTS/HMC adapt per chain (``inference/adaptation.py``): nothing to pool.

What stays per rank (stated, not pooled): ``mh``'s Robbins-Monro gain clock t_a counts the
burn-in steps in which *some chain of the batch* moved site a, so with several sites (each
chain picks one at random) a rank's smaller batch skips a few more ticks than one process's
batch of all chains: the burn-in path of the scales differs slightly in law (pooling it
would cost a collective per burn-in step). The kept chain is unaffected in kind: with the
frozen scales it is exactly the invariant MH kernel either way.
"""
from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar

import torch

from ..semantics.distributed import AT_CHECKPOINT
from ..semantics.errors import PPLRuntimeError

_SHARED: ContextVar = ContextVar("chains_shared_with", default=None)


@contextlib.contextmanager
def chains_shared_with(group):
    """Within: the chains of this process are its rank's share of ``group``'s chains."""
    token = _SHARED.set(group)
    try:
        yield group
    finally:
        _SHARED.reset(token)


def shared() -> bool:
    return _SHARED.get() is not None


def pooled_log_scales(log_scales: dict, chains: int, initial: float) -> dict:
    """``log_scales`` (address -> float64 [C_rank]) of every rank, address by address
    concatenated in rank order ([C_total]); an address a rank never adapted counts as
    ``initial`` for its chains (as one process's adaptation would hold it). One
    collective; the identity outside ``chains_shared_with``."""
    group = _SHARED.get()
    if group is None:
        return log_scales
    group.status(AT_CHECKPOINT, 1, where="pool the MH scales")  # (a rank that failed before: its error here)
    mine = {a: v.detach().cpu() for a, v in log_scales.items()}
    every = group.all_gather_object((chains, mine), what="pool the MH scales over the chains")
    addresses = list(dict.fromkeys(a for _, part in every for a in part))
    device = next(iter(log_scales.values())).device if log_scales else "cpu"
    start = torch.full((), math.log(initial), dtype=torch.float64)
    return {a: torch.cat([part[a] if a in part else start.expand(n) for n, part in every]).to(device)
            for a in addresses}


def refuse_when_shared(what: str, hint: str) -> None:
    """An error when the chains are shared by ranks and ``what`` pools them at every step."""
    if shared():
        raise PPLRuntimeError(f"{what} cannot run with distributed=True: it pools the chains of every rank "
                              "at every burn-in step", hint=hint)
