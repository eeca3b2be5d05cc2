"""Replicate runs: one inference method run R times on the same model and data with
independent seeds, e.g. to measure an estimator's spread across runs (the variance of
log Zhat, the coverage of an interval) or to compare two methods over many runs.

    from ppl.testing.replicates import replicate_runs
    zs = replicate_runs(model, "smc", data, replicates=200, particles=1000, seed=0,
                        summary=lambda r: r.log_evidence)

Run r is seeded from (``seed``, r) alone (``replicate_seed``), so the list is the same
whatever order or process runs each replicate: with ``distributed=True`` under
``torchrun`` (every rank calls it with the same arguments) the replicates are shared by
the ranks (``semantics.distributed_map``) and rank 0 gets exactly the single-process list
(the other ranks None).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from ..semantics.errors import PPLError

__all__ = ["replicate_runs", "replicate_seed"]


def replicate_seed(seed: int, index: int) -> int:
    """The seed of replicate ``index`` of a job seeded ``seed`` (numpy's SeedSequence of
    the pair: independent streams)."""
    return int(np.random.SeedSequence([int(seed) & (2 ** 63 - 1), int(index)]).generate_state(1)[0])


def replicate_runs(model, method: str, data: Mapping[str, Any] | None = None, *, replicates: int,
                   seed: int | None = 0, summary: Callable | None = None, distributed: bool = False,
                   **options) -> list | None:
    """``[summary(model.run(method, data, seed=replicate_seed(seed, r), **options)) for r
    in range(replicates)]`` (``summary`` None: the results themselves). With
    ``distributed=True`` the replicates are shared by the ranks of the ``torchrun`` job
    and rank 0 returns the list (the other ranks None); give a ``summary`` that keeps what
    you need (numbers), since every result travels to rank 0. ``seed=None``: a fresh seed
    (drawn by rank 0 when distributed)."""
    R = int(replicates)
    if R < 1:
        raise PPLError(f"replicates must be a positive integer (got {replicates!r})")
    keep = summary if summary is not None else (lambda result: result)

    def one(r: int, base: int):
        return keep(model.run(method, data, seed=replicate_seed(base, r), **options))

    if not distributed:
        base = int(np.random.SeedSequence(seed).generate_state(1)[0]) if seed is None else int(seed)
        return [one(r, base) for r in range(R)]
    from ..semantics.distributed import process_group
    from ..semantics.distributed_map import agreed_seed, map_indices
    with process_group() as group:
        base = agreed_seed(seed, group)
        return map_indices(R, lambda r: one(r, base), group, what="the replicate runs")
