"""Per-particle values as people read them: plain-Python keys for tables, numbers stacked
into tensors, and whether a tensor sample is discrete (has a probability table).

Used by the statistics (``ppl.results.stats``) and the reports; no result class here.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import torch

# A float-valued site counts as discrete when all its values are whole numbers and it has
# at most this many distinct values ...
INTEGRAL_MAX_LEVELS = 1000
# ... or when it has at most this many distinct values, each taken on average by at least
# two particles (so a small population of continuous draws is not mistaken for a table).
FLOAT_MAX_LEVELS = 20


def _to_key(v: Any) -> Any:
    """A hashable plain-Python version of one value: tensors and numpy values become
    Python scalars, sequences become tuples (recursively)."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.item() if v.dim() == 0 else _to_key(v.tolist())
    if isinstance(v, np.ndarray):
        return _to_key(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return tuple(_to_key(e) for e in v)
    hash(v)  # raises TypeError for unhashable objects (dicts, sets, ...)
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, (bool, int, float, Fraction))


def _flatten_numeric(v: Any) -> tuple[tuple[int, ...], list] | None:
    """(shape, leaves) of a number or a rectangular nested tuple of numbers, else None."""
    if _is_number(v):
        return (), [v]
    if isinstance(v, tuple) and len(v) > 0:
        parts = [_flatten_numeric(e) for e in v]
        if any(p is None for p in parts) or any(p[0] != parts[0][0] for p in parts):
            return None
        return (len(v),) + parts[0][0], [leaf for p in parts for leaf in p[1]]
    return None


def _nest(flat: list, shape: tuple[int, ...]) -> Any:
    """Inverse of the flattening: nested tuples of the given shape (a scalar for ())."""
    if not shape:
        return flat[0]
    step = len(flat) // shape[0]
    return tuple(_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0]))


def _objects_to_tensor(keys: list) -> torch.Tensor | None:
    """Stack per-particle plain values into a tensor [M, ...] when they are all numbers (or
    equally shaped tuples of numbers); None for anything else (strings, ragged, ...)."""
    if not keys:
        return None
    flats = [_flatten_numeric(k) for k in keys]
    if any(f is None for f in flats) or any(f[0] != flats[0][0] for f in flats):
        return None
    leaves = [leaf for f in flats for leaf in f[1]]
    if all(isinstance(x, bool) for x in leaves):
        dtype = torch.bool
    elif all(isinstance(x, (bool, int)) for x in leaves):
        dtype = torch.long
    else:
        dtype = torch.float64
        leaves = [float(x) for x in leaves]
    try:
        t = torch.tensor(leaves, dtype=dtype)
    except (OverflowError, RuntimeError, TypeError, ValueError):  # e.g. ints beyond int64
        return None
    return t.reshape((len(keys),) + flats[0][0])


def _sort_table(table: dict) -> dict:
    """The table with keys in ascending order when they are comparable."""
    try:
        return dict(sorted(table.items(), key=lambda kv: kv[0]))
    except TypeError:
        return dict(sorted(table.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0]))))


def _scalar_or_tensor(t: torch.Tensor) -> Any:
    return t.item() if t.dim() == 0 else t


def _log(x: Any) -> float:
    """Natural log of a positive int/Fraction/float without overflow."""
    if isinstance(x, Fraction):
        return math.log(x.numerator) - math.log(x.denominator)
    return math.log(x)


def _unique_rows(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct rows [K, D] in lexicographic order, inverse indices [M]) of flat [M, D].

    Vectorised: each column is ranked with a 1-d unique and the ranks are combined into one
    int64 key (mixed radix); torch.unique(dim=0) is used only if that key would overflow."""
    m, d = flat.shape
    if d == 1:
        u, inv = torch.unique(flat[:, 0], return_inverse=True)
        return u[:, None], inv
    key = torch.zeros(m, dtype=torch.long)
    radix = 1
    for j in reversed(range(d)):  # a loop over components, not particles
        u, inv = torch.unique(flat[:, j], return_inverse=True)
        if radix * max(len(u), 1) >= 2**62:
            return torch.unique(flat, dim=0, return_inverse=True)
        key += inv * radix
        radix *= max(len(u), 1)
    uk, inv = torch.unique(key, return_inverse=True)
    rep = torch.zeros(len(uk), dtype=torch.long).scatter_(0, inv, torch.arange(m))
    return flat[rep], inv


def _distinct_rows(flat: torch.Tensor) -> int:
    if flat.shape[1] == 1:
        return torch.unique(flat[:, 0]).numel()
    return _unique_rows(flat)[0].shape[0]


def _count_levels(flat: torch.Tensor, limit: int) -> int:
    """Number of distinct rows of flat [M, D], or limit + 1 when there are more than limit
    (decided on a prefix first, so large continuous samples are rejected cheaply)."""
    if flat.shape[0] > 4 * limit and _distinct_rows(flat[: 4 * limit]) > limit:
        return limit + 1
    return _distinct_rows(flat)


def _is_discrete_tensor(x: torch.Tensor) -> bool:
    """bool/int tensors are discrete; float ones when whole-valued with at most
    INTEGRAL_MAX_LEVELS distinct values, or with at most FLOAT_MAX_LEVELS distinct values
    each taken by two particles on average."""
    if x.dtype == torch.bool or not (x.is_floating_point() or x.is_complex()):
        return True
    m = x.shape[0]
    if m == 0:
        return True
    flat = x.reshape(m, -1)
    finite = flat[torch.isfinite(flat)]
    if bool((finite == finite.round()).all()):
        return _count_levels(flat, INTEGRAL_MAX_LEVELS) <= INTEGRAL_MAX_LEVELS
    levels = _count_levels(flat, FLOAT_MAX_LEVELS)
    return levels <= FLOAT_MAX_LEVELS and 2 * levels <= m


def _tensor_table(x: torch.Tensor, w: torch.Tensor) -> dict:
    """{value: total weight} of the rows of x [M, ...] (keys Python scalars or tuples)."""
    m = x.shape[0]
    if m == 0:
        return {}
    if x.dim() == 1:
        uniq, inv = torch.unique(x, return_inverse=True)
        keys = uniq.tolist()
    else:
        uniq, inv = _unique_rows(x.reshape(m, -1))
        keys = [_to_key(r) for r in uniq.reshape((uniq.shape[0],) + tuple(x.shape[1:])).tolist()]  # (rows of 0 numbers too)
    p = torch.zeros(len(keys), dtype=torch.float64).scatter_add_(0, inv, w)
    return _sort_table(dict(zip(keys, p.tolist())))
