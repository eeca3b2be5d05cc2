"""The recorder of a run: per address, the values each particle's choice took.

A ``Trace`` collects (particle set, value) parts as a run makes its choices;
``sites()`` joins them into one column per address, with a presence mask for choices
that only some particles make. Batched values follow the run's lineage, so a column
read after resampling describes the particles as they are now.
"""
from __future__ import annotations

from typing import Any

import torch

from .errors import PPLError
from .values import Batched, Particles, batch_rows, is_batched, is_numeric, materialize, rows


class Trace:
    """Per-address values of a run over N particles."""

    def __init__(self, N: int, device):
        self.N = N
        self.device = device
        self.parts: dict[str, list] = {}

    def record(self, addr: str, ctx: Particles, value: Any):
        self.parts.setdefault(addr, []).append((ctx, value))

    def sites(self) -> dict[str, tuple]:
        """address -> (values, present): values a tensor [N, ...] or a list of N objects;
        present a bool tensor [N], or None when every particle has the choice."""
        return {a: consolidate(parts, self.N, self.device) for a, parts in self.parts.items()}


def consolidate(parts: list, N: int, device) -> tuple:
    """Join per-subset values into one per-particle column."""
    # a batched value knows its particles (and follows resampling): trust it over the
    # particle set recorded when it was made
    parts = [(Particles(v.idx, ctx.N, ctx.device, ctx.full) if is_batched(v) else ctx, v) for ctx, v in parts]
    if len(parts) == 1 and parts[0][0].M == N:
        ctx, v = parts[0]
        return column(v, ctx), None
    present = torch.zeros(N, dtype=torch.bool, device=device)
    cols = []
    for ctx, v in parts:
        present[ctx.idx] = True
        cols.append((ctx, column(v, ctx)))
    if all(isinstance(c, torch.Tensor) for _, c in cols) and len({tuple(c.shape[1:]) for _, c in cols}) == 1:
        dtype = cols[0][1].dtype
        for _, c in cols[1:]:
            dtype = torch.promote_types(dtype, c.dtype)
        out = torch.zeros((N, *cols[0][1].shape[1:]), dtype=dtype, device=device)
        for ctx, c in cols:
            out[ctx.idx] = c.to(dtype)
        return out, present
    out = [None] * N
    for ctx, c in cols:
        items = c.tolist() if isinstance(c, torch.Tensor) else c
        for i, item in zip(ctx.idx.tolist(), items):
            out[i] = item
    return out, present


def column(v: Any, ctx: Particles):
    """A runtime value as one entry per particle of ctx: a tensor [M, ...] when numeric,
    else a list of plain Python values (lists become tuples, so they can be tabulated)."""
    if isinstance(v, Batched):
        return rows(v, ctx)
    if is_numeric(v) or (isinstance(v, (list, tuple)) and v and all(is_numeric(x) for x in v)
                         and _uniform_shapes(v)):
        try:
            t = batch_rows(v, ctx)
            if t.dtype in (torch.bool, torch.long) or not isinstance(v, (list, tuple)):
                if isinstance(v, (list, tuple)) and t.dtype in (torch.bool, torch.long):
                    return [tuple(r) for r in t.tolist()]
            return t
        except PPLError:
            pass
    return [_plain(x) for x in materialize(v, ctx)]


def _uniform_shapes(v) -> bool:
    return True


def _plain(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, list):
        return tuple(_plain(y) for y in x)
    if isinstance(x, tuple):
        return tuple(_plain(y) for y in x)
    return x
