"""Result objects that inference returns to users.

Two classes share one user interface (:class:`_ResultBase`):

* :class:`WeightedResult` -- a weighted particle population (importance sampling, SMC, ...).
  Each named quantity ("site") is a :class:`Site`: a tensor ``[N, ...]`` or a Python list of
  ``N`` per-particle objects, plus an optional ``present`` mask for sites that exist only
  in some particles (random control flow).
* :class:`ExactResult` -- an exact enumeration of execution paths, each with an
  unnormalised weight (``fractions.Fraction`` when exact) and plain Python values.

Site names: ``"return"`` is the model's return value; the others are random-choice
addresses such as ``"p"``, ``"x[3]"`` or ``"geometric/b"``. *Top-level* sites are those
without ``"/"``; ``to_json`` and the default ``summary``/``plot`` show ``"return"`` and
the top-level sites.

Statistics (both classes)
-------------------------
``mean``, ``var``, ``sd``, ``quantile`` and ``marginal`` are posterior (weighted)
statistics. Conventions:

* ``var`` is the posterior variance ``E[(X - E[X])^2]`` (no small-sample correction),
  ``sd`` its square root.
* ``quantile(q)`` is the inverse CDF: the smallest value ``v`` whose cumulative posterior
  probability ``P(X <= v)`` is ``>= q``, so it is always a value of the site. Weighted
  results allow a relative slack of 1e-12 in that comparison for rounding; exact results
  compare exactly (a float ``q`` is read as the decimal it prints as, 0.05 -> 1/20).
* Booleans count as 0/1 in numeric statistics (the mean of a boolean site is P(true)).
* For a vector-valued site the statistics are per component: a tensor for
  :class:`WeightedResult`, a (nested) tuple for :class:`ExactResult` (whose values are
  plain Python, and whose statistics stay exact Fractions).
* **Sites that do not exist everywhere** (a ``present`` mask, or a key missing from some
  paths) are summarised *conditionally on existing*: over the particles/paths where the
  site exists, with their weights renormalised. ``presence(name)`` is the posterior
  probability that the site exists. A site that exists only in zero-weight particles has
  NaN statistics and an empty marginal.
* ``marginal(name)`` (alias ``probs``) is a table ``{value: probability}`` of a discrete
  site, keys sorted when they are comparable. Tensor values become Python scalars, and
  vectors (and lists) become tuples. A continuous site raises :class:`PPLError`; see
  ``is_discrete``.
* Zero-weight particles/paths are ignored everywhere (they never appear as values).
"""
from __future__ import annotations

import html
import json
import math
import os
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ppl.inference.population import Chains, Optimum, Population
from ppl.inference.resampling import normalise_log_weights
from ppl.semantics.errors import PPLError, PPLRuntimeError, ZeroEvidenceError, did_you_mean

__all__ = ["Site", "WeightedResult", "ExactResult", "MCMCResult", "BestOfNResult", "as_result"]

# A float-valued site counts as discrete when all its values are whole numbers and it has
# at most this many distinct values ...
INTEGRAL_MAX_LEVELS = 1000
# ... or when it has at most this many distinct values, each taken on average by at least
# two particles (so a small population of continuous draws is not mistaken for a table).
FLOAT_MAX_LEVELS = 20
# Relative slack in weighted quantile comparisons (cumulative weights are rounded).
_QUANTILE_TOL = 1e-12
# summary(): at most this many sites by default, this many components per vector site,
# and this many entries of a probability table.
_SUMMARY_MAX_SITES = 20
_SUMMARY_MAX_COMPONENTS = 8
_SUMMARY_TOP_PROBS = 3
# plot(): at most this many panels by default, bars per discrete panel, overlaid components.
_PLOT_MAX_SITES = 6
_PLOT_MAX_BARS = 30
_PLOT_MAX_COMPONENTS = 6

_ZERO_WEIGHTED_MSG = "every particle has weight zero (log evidence = -inf)"
_ZERO_WEIGHTED_HINT = (
    "the observations/conditions may be impossible under the prior, or too unlikely for "
    "N particles; increase particles or check the data"
)
_ZERO_EXACT_MSG = "every path has weight zero: the conditions/observations are impossible"
_ZERO_EXACT_HINT = (
    "no execution of the model satisfies all of its conditions and observations; "
    "check the observed data and the conditions"
)


@dataclass
class Site:
    """The samples of one named quantity across N particles.

    value: a tensor ``[N, ...]`` (float/long/bool) or a Python list of N per-particle
        objects (str, tuple, list, numbers, ...).
    present: bool tensor ``[N]``: where the site exists (random control flow); None means
        in every particle. Entries of ``value`` where it is False are ignored.
    """

    value: torch.Tensor | list
    present: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------
# value conversion helpers
# ----------------------------------------------------------------------------------------


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


def _log(x: Any) -> float:
    """Natural log of a positive int/Fraction/float without overflow."""
    if isinstance(x, Fraction):
        return math.log(x.numerator) - math.log(x.denominator)
    return math.log(x)


# ----------------------------------------------------------------------------------------
# statistics backends: a tensor sample with float weights, or an exact finite table
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# formatting helpers
# ----------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    """A short human-readable number/value for summary tables."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, Fraction):
        s = str(v)
        return s if len(s) <= 9 else _fmt(float(v))
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.4g}"
    if isinstance(v, str):
        return v
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(e) for e in v) + ("," if len(v) == 1 else "") + ")"
    return str(v)


def _json_scalar(v: Any) -> Any:
    """A json.dumps-able version of a statistic (NaN and infinities become None)."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        return _json_scalar(v.tolist())
    if isinstance(v, (list, tuple)):
        return [_json_scalar(e) for e in v]
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v
    f = float(v)
    return f if math.isfinite(f) else None


def _json_key_leaf(v: Any) -> Any:
    """A key element inside a JSON list key: numbers stay numbers."""
    if isinstance(v, tuple):
        return [_json_key_leaf(e) for e in v]
    if isinstance(v, Fraction):
        return float(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v.is_integer() and abs(v) < 1e15:
            return int(v)
    return v


def _json_key(k: Any) -> str:
    """JSON object key of a table entry: bool -> "true"/"false", int -> "3", str -> itself,
    tuple -> json.dumps(list). Whole floats print as ints ("1", "[0, 1]"), a Fraction
    as "1/3" (inside a list as a float)."""
    if isinstance(k, bool):
        return "true" if k else "false"
    if isinstance(k, int):
        return str(k)
    if isinstance(k, str):
        return k
    if isinstance(k, float):
        return str(int(k)) if k.is_integer() and abs(k) < 1e15 else repr(k)
    if isinstance(k, Fraction):
        return str(k)
    if isinstance(k, tuple):
        try:
            return json.dumps(_json_key_leaf(k))
        except TypeError:
            return repr(k)
    return str(k)


def _pyplot():
    """matplotlib.pyplot, switching to the Agg backend first when there is no display."""
    import matplotlib

    if (
        "matplotlib.pyplot" not in sys.modules
        and not os.environ.get("MPLBACKEND")
        and sys.platform.startswith("linux")
        and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    ):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------
# the shared interface
# ----------------------------------------------------------------------------------------


class _ResultBase:
    """The user interface shared by WeightedResult and ExactResult. Subclasses provide
    ``method``, ``names``, ``n``, ``log_evidence``, ``ess``, ``_make_view(name)`` and
    ``_header()``; everything else is computed here from the per-site views."""

    method: str
    names: list[str]
    n: int
    log_evidence: float
    ess: float | None

    # -- subclass hooks ------------------------------------------------------------------

    def _make_view(self, name: str) -> _View:  # pragma: no cover - abstract
        raise NotImplementedError

    def _header(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _json_extra(self) -> dict:
        return {}

    def _diagnose(self) -> list[str]:
        """The diagnostic warnings of this result (``ppl.inference.diagnostics``)."""
        return []

    @property
    def warnings(self) -> list[str]:
        """Why this result may be unreliable (empty when nothing was found): split R-hat,
        Pareto k, a small ESS, a collapsed population; see ``ppl.inference.diagnostics``.
        Inference also emits each one as a ``ppl.PPLDiagnosticWarning``."""
        cached = self.__dict__.get("_warnings")
        if cached is None:
            cached = self.__dict__["_warnings"] = self._diagnose()
        return list(cached)

    # -- site access ---------------------------------------------------------------------

    def _view(self, name: str) -> _View:
        cache = self.__dict__.setdefault("_views", {})
        if name not in cache:
            if not isinstance(name, str) or name not in self.names:
                hint = did_you_mean(str(name), self.names)
                if hint is None:
                    shown = ", ".join(repr(n) for n in self.names[:12])
                    more = ", ..." if len(self.names) > 12 else ""
                    hint = f"the sites are: {shown}{more}" if self.names else "this result has no sites"
                raise PPLError(f"no site named {name!r} in this result", hint=hint)
            cache[name] = self._make_view(name)
        return cache[name]

    def _numeric(self, name: str, what: str):
        v = self._view(name)
        if v.stats is None:
            raise PPLError(
                f"site {name!r} has non-numeric values ({v.typename}): its {what} is undefined",
                hint=f"use .marginal({name!r}) for its distribution",
            )
        return v.stats

    def _top_level(self) -> list[str]:
        """"return" first, then the top-level sites (no "/") in order."""
        names = ["return"] if "return" in self.names else []
        return names + [n for n in self.names if n != "return" and "/" not in n]

    @staticmethod
    def _as_names(names: str | Iterable[str] | None) -> list[str] | None:
        if names is None:
            return None
        return [names] if isinstance(names, str) else list(names)

    # -- statistics ----------------------------------------------------------------------

    def presence(self, name: str = "return") -> Any:
        """Posterior probability that the site exists (1 for sites present everywhere)."""
        return self._view(name).presence

    def is_discrete(self, name: str = "return") -> bool:
        """Whether the site has a probability table (bool/int/str/tuple values, or floats
        taking few distinct values); continuous sites have none."""
        return self._view(name).discrete

    def mean(self, name: str = "return") -> Any:
        """Posterior mean (per component for vector sites; booleans count as 0/1)."""
        return self._numeric(name, "mean").mean()

    def var(self, name: str = "return") -> Any:
        """Posterior variance E[(X - E[X])^2] (per component for vector sites)."""
        return self._numeric(name, "variance").var()

    def sd(self, name: str = "return") -> Any:
        """Posterior standard deviation (per component for vector sites)."""
        return self._numeric(name, "standard deviation").sd()

    def quantile(self, q: Any, name: str = "return") -> Any:
        """Posterior quantile: the smallest value v with P(X <= v) >= q (per component for
        vector sites). ``q`` may be a sequence of levels, giving a list of answers."""
        if isinstance(q, (torch.Tensor, np.ndarray)):
            q = q.tolist()
        many = isinstance(q, (list, tuple))
        qs = [float(x) if isinstance(x, np.generic) else x for x in (list(q) if many else [q])]
        for x in qs:
            _check_q(x)
        out = self._numeric(name, "quantile").quantiles(qs)
        return out if many else out[0]

    def marginal(self, name: str = "return") -> dict:
        """Posterior probability table {value: probability} of a discrete site (conditional
        on the site existing). Raises PPLError for continuous sites."""
        v = self._view(name)
        if not v.discrete:
            raise PPLError(
                f"site {name!r} is continuous-valued: it has no probability table",
                hint="use .mean/.sd/.quantile or .plot for continuous sites",
            )
        return dict(v.table())

    probs = marginal

    # -- reporting -----------------------------------------------------------------------

    def _describe(self, name: str) -> dict:
        """mean/sd/quantiles (None when not numeric), the table when discrete, presence
        (cached: results are immutable)."""
        cache = self.__dict__.setdefault("_descs", {})
        if name not in cache:
            cache[name] = self._describe_uncached(name)
        return cache[name]

    def _describe_uncached(self, name: str) -> dict:
        v = self._view(name)
        d = {"mean": None, "sd": None, "q05": None, "q50": None, "q95": None,
             "probs": v.table() if v.discrete else None, "presence": v.presence, "shape": v.shape}
        if v.stats is not None:
            d["mean"], d["sd"] = v.stats.mean(), v.stats.sd()
            d["q05"], d["q50"], d["q95"] = v.stats.quantiles([0.05, 0.5, 0.95])
        return d

    def summary(self, names: str | Iterable[str] | None = None, *, show_warnings: bool = True) -> str:
        """A fixed-width table: name, mean, sd, 5%, 50%, 95% and, for discrete scalar sites,
        the most probable values. Default: "return" and the top-level sites (at most 20).
        Vector sites get one row per component (at most 8). Then a "warning: ..." line per
        diagnostic warning (``warnings``; ``show_warnings=False`` leaves them out)."""
        chosen = self._as_names(names)
        omitted = 0
        if chosen is None:
            chosen = self._top_level()
            omitted = max(0, len(chosen) - _SUMMARY_MAX_SITES)
            chosen = chosen[:_SUMMARY_MAX_SITES]
        descs = [(n, self._describe(n)) for n in chosen]
        partial = any(d["presence"] != 1 for _, d in descs)
        rows = []
        for name, d in descs:
            exists = _fmt(float(d["presence"])) if partial else None
            shape = d["shape"]
            if not shape:
                probs = ""
                if d["probs"] is not None:
                    top = sorted(d["probs"].items(), key=lambda kv: -float(kv[1]))
                    probs = ", ".join(f"{_fmt(k)}: {_fmt(p)}" for k, p in top[:_SUMMARY_TOP_PROBS])
                    if len(top) > _SUMMARY_TOP_PROBS:
                        probs += f", ... ({len(top) - _SUMMARY_TOP_PROBS} more)"
                cells = [d[k] for k in ("mean", "sd", "q05", "q50", "q95")]
                rows.append([name] + [_fmt(c) for c in cells] + ([exists] if partial else []) + [probs])
                continue
            size = math.prod(shape)
            for j in range(min(size, _SUMMARY_MAX_COMPONENTS)):
                index = np.unravel_index(j, shape)
                label = f"{name}[{','.join(str(int(i)) for i in index)}]"
                cells = [self._component(d[k], index) for k in ("mean", "sd", "q05", "q50", "q95")]
                rows.append([label] + [_fmt(c) for c in cells] + ([exists] if partial else []) + [""])
            if size > _SUMMARY_MAX_COMPONENTS:
                rows.append([f"{name}[...]"] + [""] * (5 + partial)
                            + [f"({size - _SUMMARY_MAX_COMPONENTS} more components)"])
        header = ["name", "mean", "sd", "5%", "50%", "95%"] + (["exists"] if partial else []) + ["probabilities"]
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header) - 1)]

        def line(r):
            head = r[0].ljust(widths[0])
            mid = "  ".join(c.rjust(w) for c, w in zip(r[1:-1], widths[1:]))
            return f"{head}  {mid}  {r[-1]}".rstrip()

        out = [self._header(), line(header)] + [line(r) for r in rows]
        if omitted:
            out.append(f"... and {omitted} more sites (pass names=[...] to choose)")
        if partial:
            out.append("(statistics of sites with exists < 1 are conditional on the site existing)")
        if show_warnings:
            out += [f"warning: {w}" for w in self.warnings]
        return "\n".join(out)

    @staticmethod
    def _component(v: Any, index: tuple) -> Any:
        if v is None:
            return None
        if isinstance(v, torch.Tensor):
            return v[tuple(int(i) for i in index)].item()
        for i in index:
            v = v[int(i)]
        return v

    def __repr__(self) -> str:
        try:
            return self.summary()
        except Exception:  # never fail in a REPL
            return f"<{type(self).__name__} method={self.method!r} sites={self.names!r}>"

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(repr(self))}</pre>"

    def to_json(self) -> dict:
        """A json.dumps-able dict: method, log_evidence, ess, n and "posterior": for
        "return" and each top-level site, mean/sd/q05/q50/q95 (None when not numeric,
        lists for vector sites) plus "probs" when the site is discrete, and "exists"
        (its probability) when the site does not exist everywhere. NaN/inf -> None.
        "warnings": the result's diagnostic warnings (``warnings``; empty when none);
        weighted results add "ess_before_resampling" and "unique_fraction" (None when
        not counted)."""
        posterior = {}
        for name in self._top_level():
            d = self._describe(name)
            entry = {k: _json_scalar(d[k]) for k in ("mean", "sd", "q05", "q50", "q95")}
            if d["probs"] is not None:
                probs: dict[str, float] = {}
                for k, p in d["probs"].items():
                    jk = _json_key(k)
                    probs[jk] = probs.get(jk, 0.0) + float(p)
                entry["probs"] = probs
            if d["presence"] != 1:
                entry["exists"] = _json_scalar(d["presence"])
            posterior[name] = entry
        out = {"method": self.method, "log_evidence": _json_scalar(self.log_evidence),
               "ess": _json_scalar(self.ess), "n": self.n}
        out.update(self._json_extra())
        out["warnings"] = self.warnings
        out["posterior"] = posterior
        return out

    def plot(self, names: str | Iterable[str] | None = None, bins: int = 50, ax=None):
        """Weighted histograms (continuous sites) or bar charts (discrete sites), one panel
        per name. Default: "return" plus the top-level scalar sites, at most 6. ``ax``: an
        Axes (for one name) or a sequence of Axes (one per name). Returns the Figure."""
        chosen = self._as_names(names)
        if chosen is None:
            chosen = [n for n in self._top_level() if n == "return" or self._view(n).shape == ()]
            chosen = chosen[:_PLOT_MAX_SITES]
        for n in chosen:
            self._view(n)  # unknown names fail before anything is drawn
        if not chosen:
            raise PPLError("nothing to plot: this result has no sites")
        plt = _pyplot()
        if ax is not None:
            axes = list(np.ravel(np.asarray(ax, dtype=object)))
            if len(axes) != len(chosen):
                raise PPLError(f"plot got {len(axes)} axes for {len(chosen)} sites ({', '.join(chosen)})")
            fig = axes[0].figure
        else:
            ncols = min(3, len(chosen))
            nrows = math.ceil(len(chosen) / ncols)
            fig, grid = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
            axes = list(grid.ravel())
            for extra in axes[len(chosen):]:
                extra.set_visible(False)
        for name, a in zip(chosen, axes):
            self._plot_site(name, a, bins)
        if ax is None:
            fig.tight_layout()
        return fig

    def _plot_site(self, name: str, ax, bins: int) -> None:
        v = self._view(name)
        title = name
        if v.presence != 1:
            title += f" (exists w.p. {_fmt(float(v.presence))})"
        ax.set_title(title)
        if v.discrete:
            table = v.table()
            if not table:
                ax.text(0.5, 0.5, "no particle with positive weight", ha="center", va="center",
                        transform=ax.transAxes)
                return
            items = list(table.items())
            if len(items) > _PLOT_MAX_BARS:
                top = sorted(items, key=lambda kv: -float(kv[1]))[:_PLOT_MAX_BARS]
                items = list(_sort_table(dict(top)).items())
                ax.set_title(title + f" (top {_PLOT_MAX_BARS})")
            keys = [k for k, _ in items]
            ps = [float(p) for _, p in items]
            if all(_is_number(k) and not isinstance(k, bool) for k in keys):
                xs = [float(k) for k in keys]
                gaps = np.diff(sorted(xs))
                width = 0.8 * (float(gaps.min()) if len(gaps) else 1.0)
                ax.bar(xs, ps, width=width)
            else:
                ax.bar(range(len(keys)), ps)
                ax.set_xticks(range(len(keys)))
                ax.set_xticklabels([_fmt(k) for k in keys], rotation=45 if len(keys) > 6 else 0,
                                   ha="right" if len(keys) > 6 else "center")
            ax.set_ylabel("probability")
            return
        x, w = v.plot_data
        if x.shape[0] == 0:
            ax.text(0.5, 0.5, "no particle with positive weight", ha="center", va="center",
                    transform=ax.transAxes)
            return
        xf = x.to(torch.float64).reshape(x.shape[0], -1).numpy()
        wn = w.numpy()
        if xf.shape[1] == 1:
            ax.hist(xf[:, 0], bins=bins, weights=wn, density=True)
        else:
            for j in range(min(xf.shape[1], _PLOT_MAX_COMPONENTS)):
                index = np.unravel_index(j, v.shape)
                ax.hist(xf[:, j], bins=bins, weights=wn, density=True, alpha=0.5, histtype="stepfilled",
                        label=f"{name}[{','.join(str(int(i)) for i in index)}]")
            ax.legend(fontsize="small")
        ax.set_ylabel("density")


# ----------------------------------------------------------------------------------------
# weighted particle populations
# ----------------------------------------------------------------------------------------


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


class WeightedResult(_ResultBase):
    """A weighted particle population returned by importance sampling (and SMC).

    Attributes: ``method``; ``sites`` (name -> Site); ``samples`` (name -> values as
    given); ``names``; ``log_weights`` (as given); ``weights`` (normalised, float64 [N]);
    ``log_evidence`` (logsumexp(lw) - log N); ``ess`` (1 / sum w^2); ``n``; ``extra``
    (engine-specific information, as given).

    Statistics are weighted; sites with a ``present`` mask are summarised conditionally on
    existing (present particles, weights renormalised) -- see the module docstring.
    """

    def __init__(self, method: str, sites: dict[str, Site], log_weights: torch.Tensor, *,
                 extra: dict | None = None):
        lw = torch.as_tensor(log_weights)
        if lw.dim() != 1 or lw.shape[0] == 0:
            raise ValueError(f"log_weights must be a non-empty 1-d tensor (got shape {tuple(lw.shape)})")
        n = lw.shape[0]
        lw64 = lw.detach().to("cpu", torch.float64)
        if torch.isnan(lw64).any() or (lw64 == float("inf")).any():
            bad = "NaN" if torch.isnan(lw64).any() else "+inf"
            raise PPLRuntimeError(
                f"a particle's log weight is {bad}",
                hint="a likelihood or factor evaluated to an invalid number; check the observation "
                     "model's parameters",
            )
        # max subtracted in float64, divided by the sum: exp(lw - logsumexp(lw)) would not
        # sum to 1 for log weights above ~1e16 in size
        weights, log_total = normalise_log_weights(lw64)
        if log_total == float("-inf"):
            raise ZeroEvidenceError(_ZERO_WEIGHTED_MSG, hint=_ZERO_WEIGHTED_HINT)
        self.method = method
        self.n = n
        self.log_weights = log_weights
        self.weights = weights
        self.log_evidence = float(log_total - math.log(n))
        self.ess = float(1.0 / (self.weights * self.weights).sum().item())
        # methods that resample set these (``inference.methods``): the ESS before the
        # last resampling (``ess`` after it reads N whatever happened) and the fraction
        # of distinct particles; without resampling the former is ``ess``
        self.ess_before_resampling = self.ess
        self.unique_fraction: float | None = None
        self.resampled = False
        self.extra = dict(extra or {})
        self.sites: dict[str, Site] = {}
        for name, site in sites.items():
            if not isinstance(site, Site):
                site = Site(site)
            length = site.value.shape[0] if isinstance(site.value, torch.Tensor) and site.value.dim() > 0 \
                else (len(site.value) if isinstance(site.value, (list, tuple)) else None)
            if length != n:
                raise ValueError(f"site {name!r}: expected {n} per-particle values, got "
                                 f"{'a scalar' if length is None else length}")
            if site.present is not None and tuple(torch.as_tensor(site.present).shape) != (n,):
                raise ValueError(f"site {name!r}: present mask must have shape ({n},)")
            self.sites[name] = site
        self.samples = {name: s.value for name, s in self.sites.items()}
        self.names = list(self.sites)

    @property
    def pareto_k(self) -> float:
        """The Pareto k-hat of the importance weights (PSIS, as Pyro's
        ``psis_diagnostic``; ``ppl.inference.amortized.pareto_k``): below 0.5 the weights
        have finite variance, 0.5-0.7 usable, above 0.7 the estimates are unreliable.
        NaN when there are too few distinct weights (e.g. after resampling)."""
        k = self.extra.get("pareto_k")
        if k is None:
            k = self.__dict__.get("_pareto_k")
            if k is None:
                from ppl.inference.amortized import pareto_k
                k = self.__dict__["_pareto_k"] = pareto_k(self.log_weights)
        return k

    def _header(self) -> str:
        before = f" (before the last resampling {self.ess_before_resampling:.1f})" if self.resampled else ""
        return (f"{self.method}: N={self.n}, ESS={self.ess:.1f}{before}, "
                f"log evidence={self.log_evidence:.4f}")

    def _diagnose(self) -> list[str]:
        from ppl.inference.diagnostics import weighted_warnings
        if self.method == "prior":
            return []
        k = None
        if not self.resampled and float(self.weights.max() - self.weights.min()) > 0:
            k = self.pareto_k
        unique = None if self.unique_fraction is None else int(round(self.unique_fraction * self.n))
        return weighted_warnings(self.method, self.n, min(self.ess, self.ess_before_resampling),
                                 resampled=self.resampled, pareto_k=k, unique=unique)

    def _json_extra(self) -> dict:
        return {"ess_before_resampling": _json_scalar(self.ess_before_resampling),
                "unique_fraction": _json_scalar(self.unique_fraction)}

    def _make_view(self, name: str) -> _View:
        site = self.sites[name]
        w = self.weights
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


# ----------------------------------------------------------------------------------------
# exact enumeration
# ----------------------------------------------------------------------------------------


class ExactResult(_ResultBase):
    """The exact posterior from enumerating every execution path.

    paths: ``[(weight, {name: value})]`` -- unnormalised weights (Fraction when exact,
    else float) and plain Python values (key "return" plus choice addresses). Paths may
    share values (their weights add up); zero-weight paths are ignored; a site missing from
    a path does not exist on it (statistics are conditional on existing).

    Attributes: ``method`` ("enumerate"), ``paths`` (as given), ``names``, ``n`` (number
    of paths with positive weight), ``evidence`` (sum of weights: a Fraction when every
    weight is a Fraction/int), ``log_evidence``, ``ess`` (None). Statistics are exact
    Fractions when the weights and values allow it.
    """

    method = "enumerate"

    def __init__(self, paths: list[tuple[Any, dict[str, Any]]]):
        self.paths = list(paths)
        weights = []
        for i, path in enumerate(self.paths):
            try:
                w, values = path
            except (TypeError, ValueError):
                raise ValueError(f"path {i}: expected a (weight, values) pair, got {path!r}") from None
            if isinstance(w, bool) or not isinstance(w, (int, float, Fraction)):
                if isinstance(w, (torch.Tensor, np.generic)):
                    w = float(w)
                else:
                    raise ValueError(f"path {i}: weight must be a number, got {w!r}")
            if isinstance(w, float) and math.isnan(w) or w < 0:
                raise ValueError(f"path {i}: weight must be >= 0, got {w!r}")
            if not isinstance(values, dict):
                raise ValueError(f"path {i}: values must be a dict, got {type(values).__name__}")
            weights.append(w)
        exact = all(isinstance(w, (int, Fraction)) for w in weights)
        self._positive = [(Fraction(w) if exact else float(w), vals)
                          for w, (_, vals) in zip(weights, self.paths) if w > 0]
        self.evidence = sum((w for w, _ in self._positive), Fraction(0) if exact else 0.0)
        if self.evidence == 0:
            raise ZeroEvidenceError(_ZERO_EXACT_MSG, hint=_ZERO_EXACT_HINT)
        self.log_evidence = _log(self.evidence)
        self.ess = None
        self.n = len(self._positive)
        names: dict[str, None] = {}
        for _, vals in self._positive:
            names.update(dict.fromkeys(vals))
        self.names = list(names)

    def _header(self) -> str:
        ev = _fmt(self.evidence)
        return f"{self.method}: {self.n} paths, evidence={ev}, log evidence={self.log_evidence:.4f}"

    def _json_extra(self) -> dict:
        return {"evidence": str(self.evidence)}

    def _make_view(self, name: str) -> _View:
        table: dict = {}
        mass = 0
        for w, vals in self._positive:
            if name in vals:
                try:
                    key = _to_key(vals[name])
                except TypeError as e:
                    raise PPLError(f"site {name!r} has values that cannot be tabulated ({e})") from None
                table[key] = table.get(key, 0) + w
                mass += w
        presence = mass / self.evidence
        probs = _sort_table({k: p / mass for k, p in table.items()})
        typename = "/".join(sorted({type(k).__name__ for k in probs}))
        return _View(presence, True, _TableStats.from_table(probs), lambda: probs, typename)


class MCMCResult(WeightedResult):
    """Draws of Markov chains (``mh``): every kept draw of every chain, equally weighted.

    ``ess`` is the MCMC effective sample size of the return value (autocorrelation
    aware, over all chains), ``r_hat`` and ``ess_per_site`` give split R-hat and ESS for
    each scalar numeric site present in every draw, ``acceptance_rate`` the fraction of
    accepted proposals after burn-in, ``chains`` and ``draws`` the layout (values are
    chain-major: index = chain * draws + draw). MH does not estimate the evidence:
    ``log_evidence`` is None."""

    def __init__(self, method: str, sites: dict, chains: int, draws: int, *, acceptance_rate: float,
                 r_hat: dict, ess_per_site: dict, extra: dict | None = None):
        super().__init__(method, sites, torch.zeros(chains * draws, dtype=torch.float64), extra=extra)
        self.chains, self.draws = chains, draws
        self.acceptance_rate = acceptance_rate
        self.r_hat = r_hat
        self.ess_per_site = ess_per_site
        self.ess = ess_per_site.get("return", min(ess_per_site.values()) if ess_per_site else float(self.n))
        self.ess_before_resampling = self.ess
        self.log_evidence = None

    def _diagnose(self) -> list[str]:
        from ppl.inference.diagnostics import mcmc_warnings
        return mcmc_warnings(self.method, self.r_hat, self.ess_per_site)

    def _json_extra(self) -> dict:
        """The chain layout and diagnostics (per-site split R-hat and ESS)."""
        return {"chains": self.chains, "draws": self.draws,
                "acceptance_rate": _json_scalar(self.acceptance_rate),
                "r_hat": {k: _json_scalar(v) for k, v in self.r_hat.items()},
                "ess_per_site": {k: _json_scalar(v) for k, v in self.ess_per_site.items()}}

    def _header(self) -> str:
        worst = max(self.r_hat.values()) if self.r_hat else float("nan")
        return (f"{self.method}: {self.chains} chains x {self.draws} draws, acceptance {self.acceptance_rate:.2f}, "
                f"ESS={self.ess:.1f}, max split R-hat={worst:.3f}")


class BestOfNResult(WeightedResult):
    """The single highest-scoring of N prior draws (``best_of_n``): an optimiser's answer,
    *not* a posterior. One particle of weight 1; its statistics describe that one draw.
    ``score`` is its total log weight (the sum of every observe/factor/condition; the
    prior of its choices is not part of it), ``candidates`` is N (both also in
    ``extra``). ``log_evidence`` is None: choosing the best is no estimate of the
    evidence (the N draws' importance-sampling estimate is kept as a side note in
    ``extra["importance_log_evidence"]``)."""

    def __init__(self, method: str, sites: dict, *, score: float, candidates: int,
                 importance_log_evidence: float | None = None, extra: dict | None = None):
        extra = {"score": score, "candidates": candidates, "importance_log_evidence": importance_log_evidence,
                 **(extra or {})}
        super().__init__(method, sites, torch.zeros(1, dtype=torch.float64), extra=extra)
        self.score, self.candidates = score, candidates
        self.log_evidence = None

    def _diagnose(self) -> list[str]:
        return []  # an optimum: no weights to diagnose

    def _json_extra(self) -> dict:
        return {"score": _json_scalar(self.score), "candidates": self.candidates,
                "importance_log_evidence": _json_scalar(self.extra["importance_log_evidence"]),
                "not_a_posterior": True}

    def _header(self) -> str:
        return (f"{self.method}: the best of {self.candidates} prior draws, score (total log weight) "
                f"{self.score:.4f}; an optimum, not a posterior sample (no evidence estimate)")


# ----------------------------------------------------------------------------------------
# wrapping what inference/ returns
# ----------------------------------------------------------------------------------------


def _cpu(v: Any) -> Any:
    return v.detach().cpu() if isinstance(v, torch.Tensor) else v


def _cpu_sites(raw_sites: dict) -> dict[str, Site]:
    """name -> Site on the CPU from inference's name -> (values, present) (or Site)."""
    out = {}
    for name, s in raw_sites.items():
        value, present = (s.value, s.present) if isinstance(s, Site) else s
        out[name] = Site(_cpu(value), _cpu(present))
    return out


def as_result(raw: Any) -> "_ResultBase":
    """The result object people read for what an inference algorithm returned:

    * ``inference.population.Population`` -> :class:`WeightedResult` (``ess_history``
      from ``extra["history"]`` when the algorithm recorded synchronisation checkpoints);
    * ``inference.population.Chains`` -> :class:`MCMCResult`;
    * ``inference.population.Optimum`` -> :class:`BestOfNResult`;
    * the exact paths ``[(weight, values)]`` of ``semantics.exact.enumerate_paths`` ->
      :class:`ExactResult`;
    * a result object -> itself (so wrapping twice is harmless).

    Sites and log weights are moved to the CPU (results are summarised for people)."""
    if isinstance(raw, _ResultBase):
        return raw
    if isinstance(raw, Population):
        res = WeightedResult(raw.method, _cpu_sites(raw.sites), _cpu(raw.log_weights), extra=raw.extra)
        history = raw.extra.get("history")
        if history is not None:
            res.ess_history = [r.ess for r in history]
        return res
    if isinstance(raw, Chains):
        return MCMCResult(raw.method, _cpu_sites(raw.sites), raw.chains, raw.draws,
                          acceptance_rate=raw.acceptance_rate, r_hat=raw.r_hat, ess_per_site=raw.ess,
                          extra=raw.extra)
    if isinstance(raw, Optimum):
        return BestOfNResult(raw.method, _cpu_sites(raw.sites), score=raw.score, candidates=raw.candidates,
                             importance_log_evidence=raw.importance_log_evidence, extra=raw.extra)
    if isinstance(raw, (list, tuple)):
        return ExactResult(raw)
    raise TypeError(f"as_result: cannot make a result of a {type(raw).__name__} "
                    "(expected a Population, Chains, Optimum, exact paths or a result)")
