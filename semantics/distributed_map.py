"""Embarrassingly parallel work over the ranks of a ``torchrun`` job (issue 15, item 3):
``count`` independent items (SBC simulations, replicate runs), item i computed by
``fn(i)`` on the rank whose share (``distributed.shard``: contiguous, in rank order,
sizes differing by at most one) holds i, gathered on rank 0 in index order.

The split does not change the results when ``fn(i)`` depends on i alone (each item
seeded from its index, never from a stream shared with the items before it): the list
rank 0 gets is then exactly ``[fn(i) for i in range(count)]`` of one process, whatever
the number of ranks. A rank whose ``fn`` raises tells the others (the status collective
of ``distributed.Group``): every rank stops with its message, none hangs.
"""
from __future__ import annotations

import secrets
from typing import Any, Callable

from .distributed import FINISHED, CollectiveError, Group, RankError, shard


def agreed_seed(seed: int | None, group: Group) -> int:
    """The job's seed, the same on every rank: rank 0's ``seed``, or with ``seed=None``
    one rank 0 draws afresh (62 random bits), broadcast to the others."""
    mine = (secrets.randbits(62) if seed is None else int(seed)) if group.is_root else None
    return group.broadcast_int(mine, what="seed")


def map_indices(count: int, fn: Callable[[int], Any], group: Group, *, what: str = "the items") -> list | None:
    """``[fn(i) for i in range(count)]`` computed by the ranks together (each its
    contiguous share of the indices), on rank 0; None on the other ranks. The results
    travel by pickling (``gather_object``): keep them small (numbers, numpy arrays)."""
    start, n = shard(int(count), group.size, group.rank)
    try:
        local = [fn(i) for i in range(start, start + n)]
        group.status(FINISHED, 0, where=f"end of {what}")
    except BaseException as err:
        if not isinstance(err, (RankError, CollectiveError)):
            group.fail(err, 0)
        raise
    parts = group.gather_object(local, what=f"gather {what} on rank 0")
    return [x for part in parts for x in part] if group.is_root else None
