"""Posterior statistics of one site: mean, variance, sd and quantiles over a weighted
tensor sample (``_TensorStats``, vectorised) or an exact finite table (``_TableStats``,
Fractions stay exact), and the per-site ``_View`` a result builds on first use
(``weighted_view``, ``exact_view``). The conventions are in ``ppl.result``'s docstring.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Callable, Sequence

import torch

from ppl.semantics.errors import PPLError

from .values import (_flatten_numeric, _is_discrete_tensor, _nest, _objects_to_tensor, _scalar_or_tensor,
                     _sort_table, _tensor_table, _to_key)

# Relative slack in weighted quantile comparisons (cumulative weights are rounded).
_QUANTILE_TOL = 1e-12


def _as_fraction_q(q: Any) -> Fraction:
    """A quantile level as an exact Fraction: floats are read as the decimal they print
    as (0.05 -> 1/20), so that exact tables have no rounding surprises."""
    if isinstance(q, Fraction):
        return q
    if isinstance(q, int):
        return Fraction(q)
    return Fraction(repr(float(q)))


def _check_q(q: Any) -> None:
    if isinstance(q, bool) or not isinstance(q, (int, float, Fraction)) or not (0 <= q <= 1):
        raise PPLError(f"quantile level must be a number between 0 and 1 (got {q!r})")


def _exact_sqrt(x: Any) -> Any:
    """sqrt of a Fraction: a Fraction when it is exactly representable, else a float."""
    if isinstance(x, (Fraction, int)) and not isinstance(x, bool) and x >= 0:
        x = Fraction(x)
        n, d = math.isqrt(x.numerator), math.isqrt(x.denominator)
        if n * n == x.numerator and d * d == x.denominator:
            return Fraction(n, d)
    return math.sqrt(float(x)) if float(x) >= 0 else float("nan")


class _TensorStats:
    """Weighted statistics of a sample ``x`` [M, ...] with weights ``w`` [M] (float64,
    all > 0, summing to 1). Vectorised: no Python loops over particles."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor):
        self.x = x
        self.w = w
        self.shape = tuple(x.shape[1:])

    def _nan(self) -> Any:
        return _scalar_or_tensor(torch.full(self.shape, float("nan"), dtype=torch.float64))

    def _mean_t(self) -> torch.Tensor:
        return torch.tensordot(self.w, self.x.to(torch.float64), dims=1)

    def mean(self) -> Any:
        if self.x.shape[0] == 0:
            return self._nan()
        return _scalar_or_tensor(self._mean_t())

    def var(self) -> Any:
        if self.x.shape[0] == 0:
            return self._nan()
        d = self.x.to(torch.float64) - self._mean_t()
        return _scalar_or_tensor(torch.tensordot(self.w, d * d, dims=1).clamp(min=0))

    def sd(self) -> Any:
        v = self.var()
        return math.sqrt(v) if isinstance(v, float) else v.sqrt()

    def quantiles(self, qs: Sequence[float]) -> list:
        m = self.x.shape[0]
        if m == 0:
            return [self._nan() for _ in qs]
        x = self.x.long() if self.x.dtype == torch.bool else self.x
        xs, order = torch.sort(x, dim=0)
        cw = self.w[order].cumsum(0)  # w[order] has the shape of x: per-component weights
        out = []
        for q in qs:
            idx = (cw < float(q) - _QUANTILE_TOL).sum(0, keepdim=True).clamp(max=m - 1)
            out.append(_scalar_or_tensor(xs.gather(0, idx).squeeze(0)))
        return out


class _TableStats:
    """Exact statistics of a finite table {value: probability} whose values are numbers or
    equally shaped nested tuples of numbers. With Fraction probabilities and int/Fraction
    values every result is an exact Fraction (sd when the variance is a perfect square)."""

    def __init__(self, shape: tuple[int, ...], items: list[tuple[list, Any]]):
        self.shape = shape
        self.items = items  # [(flat leaves with bools as ints, probability)]
        self.size = math.prod(shape)

    @classmethod
    def from_table(cls, table: dict) -> "_TableStats | None":
        items, shape = [], None
        for key, p in table.items():
            f = _flatten_numeric(key)
            if f is None or (shape is not None and f[0] != shape):
                return None
            shape = f[0]
            items.append(([int(v) if isinstance(v, bool) else v for v in f[1]], p))
        if shape is None:  # empty table
            return None
        return cls(shape, items)

    def _per_component(self, fn: Callable[[list[tuple[Any, Any]]], Any]) -> Any:
        flat = [fn([(vals[j], p) for vals, p in self.items]) for j in range(self.size)]
        return _nest(flat, self.shape)

    @staticmethod
    def _mean1(vp: list) -> Any:
        return sum((v * p for v, p in vp), 0)

    def mean(self) -> Any:
        return self._per_component(self._mean1)

    def var(self) -> Any:
        def var1(vp):
            m = self._mean1(vp)
            return sum((p * (v - m) ** 2 for v, p in vp), 0)

        return self._per_component(var1)

    def sd(self) -> Any:
        v = self.var()
        flat = _flatten_numeric(v)[1] if self.shape else [v]
        return _nest([_exact_sqrt(x) for x in flat], self.shape)

    def quantiles(self, qs: Sequence[Any]) -> list:
        def make(q):
            def quant1(vp):
                vp = sorted(vp, key=lambda t: t[0])
                exact = all(isinstance(p, Fraction) for _, p in vp)
                level = _as_fraction_q(q) if exact else float(q) - _QUANTILE_TOL
                cum = 0
                for v, p in vp:
                    cum += p
                    if cum >= level:
                        return v
                return vp[-1][0]

            return quant1

        return [self._per_component(make(q)) for q in qs]


class _View:
    """Everything the shared code needs about one site, conditioned on its existence.

    presence: posterior probability that the site exists.
    discrete: whether it has a probability table.
    stats: a _TensorStats / _TableStats, or None when the values are not numeric.
    table: callable returning the sorted {value: probability} table.
    typename: a word for the values' type (for error messages).
    """

    def __init__(self, presence, discrete, stats, table, typename, plot_data=None):
        self.presence = presence
        self.discrete = discrete
        self.stats = stats
        self._table_fn = table
        self._table = None
        self.typename = typename
        self.plot_data = plot_data  # (x, w) tensors for histograms of continuous sites

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stats.shape if self.stats is not None else ()

    def table(self) -> dict:
        if self._table is None:
            self._table = self._table_fn()
        return self._table


def weighted_view(name: str, site, weights: torch.Tensor) -> _View:
    """The view of ``site`` (a ``ppl.result.Site``) of a weighted population with
    normalised ``weights`` [N]: conditioned on the site existing (present particles,
    weights renormalised), zero-weight particles left out."""
    w = weights
    mask = None
    if site.present is not None:
        mask = torch.as_tensor(site.present).detach().to("cpu").bool()
    wp = w if mask is None else w[mask]
    mass = float(wp.sum().item())
    presence = 1.0 if mask is None else mass
    wn = wp / mass if mass > 0 else wp
    keep = wn > 0

    value = site.value
    if isinstance(value, torch.Tensor):
        x_all = value.detach().to("cpu")
        if mask is not None:
            x_all = x_all[mask]
        objs = None
        typename = str(x_all.dtype).replace("torch.", "")
    else:
        idx = range(len(value)) if mask is None else mask.nonzero().flatten().tolist()
        try:
            objs = [_to_key(value[i]) for i in idx]
        except TypeError as e:
            raise PPLError(f"site {name!r} has values that cannot be tabulated ({e})") from None
        x_all = _objects_to_tensor(objs)
        types = sorted({type(o).__name__ for o in objs}) or ["no values"]
        typename = "/".join(types)

    if x_all is not None:
        xs, ws = x_all[keep], wn[keep]
        return _View(presence, _is_discrete_tensor(x_all), _TensorStats(xs, ws),
                     lambda: _tensor_table(xs, ws), typename, plot_data=(xs, ws))

    wl = wn.tolist()
    keep_l = keep.tolist()

    def table():
        t: dict = {}
        for o, p, k in zip(objs, wl, keep_l):
            if k:
                t[o] = t.get(o, 0.0) + p
        return _sort_table(t)

    return _View(presence, True, None, table, typename)


def exact_view(name: str, positive: list, evidence: Any) -> _View:
    """The view of site ``name`` over the exact paths ``positive`` ([(weight, values)], every
    weight > 0) whose weights sum to ``evidence``: conditioned on the site existing."""
    table: dict = {}
    mass = 0
    for w, vals in positive:
        if name in vals:
            try:
                key = _to_key(vals[name])
            except TypeError as e:
                raise PPLError(f"site {name!r} has values that cannot be tabulated ({e})") from None
            table[key] = table.get(key, 0) + w
            mass += w
    return _table_view(table, mass / evidence, lambda p: p / mass)


def exact_integer_view(counts: dict, total: int) -> _View:
    """``exact_view`` of a site present on every path from its integer weights
    ({value: int > 0}, values already keys: ``_to_key``) summing to ``total``: the same
    Fractions (each w / total), one ``Fraction(w, total)`` each instead of Fraction
    arithmetic."""
    return _table_view(counts, Fraction(1), lambda p: Fraction(p, total))


def _table_view(table: dict, presence, normalise) -> _View:
    """The view of an exact table {key: weight > 0}, each weight made a probability by
    ``normalise``."""
    return _ExactTableView(presence, _sort_table({k: normalise(p) for k, p in table.items()}))


class _ExactTableView(_View):
    """The ``_View`` of an exact probability table, its statistics and type name made on
    first use (``probs()`` reads the table only)."""

    def __init__(self, presence, probs: dict):
        self.presence, self.discrete, self.plot_data = presence, True, None
        self._table_fn, self._table = None, probs
        self._stats = self._typename = _UNSET

    @property
    def stats(self):
        if self._stats is _UNSET:
            self._stats = _TableStats.from_table(self._table)
        return self._stats

    @property
    def typename(self) -> str:
        if self._typename is _UNSET:
            self._typename = "/".join(sorted({type(k).__name__ for k in self._table}))
        return self._typename


_UNSET = object()


def describe(v: _View) -> dict:
    """What the reports show of one site: mean/sd/q05/q50/q95 (None when not numeric), the
    table ("probs") when discrete, "presence" and "shape"."""
    d = {"mean": None, "sd": None, "q05": None, "q50": None, "q95": None,
         "probs": v.table() if v.discrete else None, "presence": v.presence, "shape": v.shape}
    if v.stats is not None:
        d["mean"], d["sd"] = v.stats.mean(), v.stats.sd()
        d["q05"], d["q50"], d["q95"] = v.stats.quantiles([0.05, 0.5, 0.95])
    return d
