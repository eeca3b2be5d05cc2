"""The recorder of a run: per address, the values each particle's choice took.

A ``Trace`` collects (particle set, value) parts as a run makes its choices;
``sites()`` joins them into one column per address, with a presence mask for choices
that only some particles make. Batched values follow the run's lineage, so a column
read after resampling describes the particles as they are now.

What a trace keeps (``keep``): every site (``None`` or ``"all"``); the sites named
(a list of addresses, ``"return"`` naming the run's return value, which the caller
records); or ``"auto"``, the rule for runs whose length is not known in advance: every
site while the trace holds at most ``KEEP_ALL_LIMIT`` per-particle values (N times
the number of choices recorded), and past that, for each choice *name* (the address
without its loop indices and call counters: ``x[3]`` and ``f#2/x[7]`` are named
``x`` and ``f/x``), only the last address drawn, so a filter's memory does not grow
with its path. A site that is not kept is absent; ``dropped`` lists the addresses
the ``"auto"`` rule dropped, so a result can say so.
"""
from __future__ import annotations

import itertools
import re
from typing import Any

import torch

from .errors import PPLError, PPLRuntimeError, did_you_mean
from .values import Batched, Particles, batch_rows, is_batched, is_numeric, materialize, rows

#: per-particle values (N times the choices recorded) a ``keep="auto"`` trace holds in
#: full; past it, the last address of each choice name only (N = 10^5 particles over
#: 100 choices, or 10^6 over 10, are kept in full: ~40 MB of float32 values)
KEEP_ALL_LIMIT = 10_000_000

_SEEN_LIMIT = 10_000
_INDICES = re.compile(r"\[[^\]]*\]|#\d+")


def choice_name(addr: str) -> str:
    """An address without its loop indices and call counters: ``f#2/x[3][1]`` -> ``f/x``."""
    return _INDICES.sub("", addr)


def keep_names(keep: Any) -> "frozenset[str] | str | None":
    """``keep`` checked: None, "all", "auto", or a frozenset of site names (a single
    name may be given as a string)."""
    if keep is None or keep in ("all", "auto"):
        return keep
    if isinstance(keep, str):
        keep = [keep]
    if not isinstance(keep, (list, tuple, set, frozenset)) or not all(isinstance(k, str) for k in keep):
        raise PPLError(f"keep must be a list of site names (addresses such as 'x[3]', or 'return'), "
                       f"'all' or 'auto' (got {keep!r})")
    return frozenset(keep)


class Trace:
    """Per-address values of a run over N particles, as ``keep`` says (module docstring)."""

    def __init__(self, N: int, device, keep: Any = None):
        self.N = N
        self.device = device
        self.parts: dict[str, list] = {}
        self.keep = keep_names(keep)
        self.dropped: list[str] = []  # addresses the "auto" rule dropped, in the order drawn
        self._dropped: set[str] = set()
        # addresses drawn that a list of names did not keep, for a did-you-mean: the first
        # _SEEN_LIMIT of them and the last of each choice name (bounded on a long path)
        self._seen: set[str] = set()
        self._seen_last: dict[str, str] = {}
        self._held = 0  # per-particle values recorded (for "auto")
        self._last: dict[str, str] | None = None  # choice name -> its last address, once "auto" trims

    def keeps(self, addr: str) -> bool:
        """Whether the site ``addr`` (or "return") is kept, when drawn."""
        return not isinstance(self.keep, frozenset) or addr in self.keep

    def record(self, addr: str, ctx: Particles, value: Any):
        if isinstance(self.keep, frozenset):
            if addr not in self.keep:
                if len(self._seen) < _SEEN_LIMIT:
                    self._seen.add(addr)
                self._seen_last[choice_name(addr)] = addr
                return
        elif self.keep == "auto" and not self._auto(addr, ctx):
            return
        self.parts.setdefault(addr, []).append((ctx, value))

    def _auto(self, addr: str, ctx: Particles) -> bool:
        """The "auto" rule for one recorded value: whether to keep it."""
        if self._last is None:  # still keeping every site
            self._held += ctx.M
            if self._held <= KEEP_ALL_LIMIT:
                return True
            self._last = {}
            for a in list(self.parts):  # in the order first drawn: the last of each name stays
                self._replace(a)
        if addr in self.parts:  # another particle subset of a kept address
            return True
        if addr in self._dropped:  # drawn again after a later address of its name: stays dropped
            return False
        self._replace(addr)
        return True

    def _replace(self, addr: str) -> None:
        """Make ``addr`` the last address of its choice name, dropping the previous one."""
        name = choice_name(addr)
        prev = self._last.get(name)
        if prev is not None and prev != addr:
            del self.parts[prev]
            self.dropped.append(prev)
            self._dropped.add(prev)
        self._last[name] = addr

    def sites(self) -> dict[str, tuple]:
        """address -> (values, present): values a tensor [N, ...] or a list of N objects;
        present a bool tensor [N], or None when every particle has the choice. Raises a
        ``PPLRuntimeError`` when ``keep`` names an address the run never drew."""
        self._check_names()
        return {a: consolidate(parts, self.N, self.device) for a, parts in self.parts.items()}

    def _check_names(self) -> None:
        if not isinstance(self.keep, frozenset):
            return
        for name in sorted(self.keep - {"return"} - set(self.parts)):
            known = ["return", *self.parts, *self._seen, *self._seen_last.values()]
            raise PPLRuntimeError(f"keep names '{name}', which is not a site of this run",
                                  hint=did_you_mean(name, known) or
                                  f"the sites are 'return' and the addresses of the choices drawn, "
                                  f"e.g. {', '.join(repr(a) for a in sorted(known)[:5])}")


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
    items = materialize(v, ctx)
    if all(map(isinstance, items, itertools.repeat(str))):  # (strings, e.g. tokens: their own plain value)
        return list(items)
    return [_plain(x) for x in items]


def _uniform_shapes(v) -> bool:
    return True


def _plain(x: Any) -> Any:
    if isinstance(x, str):  # (the common non-numeric value: a string, or a token)
        return x
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, list):
        return tuple(_plain(y) for y in x)
    if isinstance(x, tuple):
        return tuple(_plain(y) for y in x)
    return x
