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

Parts (``ppl.results``)
-----------------------
This module holds the result classes and ``as_result``; the work is done by one module
each: ``ppl.results.values`` (values as table keys and tensors, discreteness),
``ppl.results.stats`` (weighted and exact statistics, the per-site views built on first
use), ``ppl.results.text`` (``summary``), ``ppl.results.export`` (``to_json``, HTML) and
``ppl.results.plots`` (``plot``). Building a result computes only its weights, ESS and
evidence; a site's statistics are computed when first asked for, then cached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable

import numpy as np
import torch

from ppl.inference.population import Chains, Optimum, Population
from ppl.inference.resampling import normalise_log_weights
from ppl.semantics import enumerate_auto
from ppl.semantics.exact_elimination import EliminationResult
from ppl.semantics.errors import PPLError, PPLRuntimeError, ZeroEvidenceError, did_you_mean

from .results import export, plots, text
from .results.diagnostics import gradient_warnings, mcmc_warnings, weighted_warnings
from .results.export import _json_scalar
from .results.plots import _pyplot  # noqa: F401  (used by ppl.testing.sbc, inference.amortized)
from .results.stats import _check_q, _View, describe, exact_integer_view, exact_view, weighted_view
from .results.text import _fmt
from .results.values import FLOAT_MAX_LEVELS, INTEGRAL_MAX_LEVELS, _log, _to_key  # noqa: F401

__all__ = ["Site", "WeightedResult", "ExactResult", "EliminatedResult", "MCMCResult", "BestOfNResult", "as_result"]

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
        """The diagnostic warnings of this result (``ppl.results.diagnostics``)."""
        return []

    @property
    def warnings(self) -> list[str]:
        """Why this result may be unreliable (empty when nothing was found): split R-hat,
        Pareto k, a small ESS, a collapsed population; see ``ppl.results.diagnostics``.
        Inference also emits each one as a ``ppl.PPLDiagnosticWarning``. ``run_warnings``
        (set by ``ppl.registry``: what the run itself noted, e.g. a distribution parameter
        invalid at some particles, ``semantics.invalid_parameters``) come last."""
        cached = self.__dict__.get("_warnings")
        if cached is None:
            cached = self.__dict__["_warnings"] = self._diagnose()
        return list(cached) + list(self.__dict__.get("run_warnings", ()))

    # -- site access ---------------------------------------------------------------------

    def _view(self, name: str) -> _View:
        cache = self.__dict__.setdefault("_views", {})
        if name not in cache:
            if not isinstance(name, str) or name not in self.names:
                dropped = getattr(self, "extra", {}).get("dropped_sites") or ()
                if name in dropped:
                    raise PPLError(f"the site {name!r} was not kept by this run",
                                   hint=f"a long SMC run keeps the return value and the last value of each "
                                        f"choice by default ({len(dropped)} sites left out); pass "
                                        f"keep=[{name!r}, ...] (or keep='all') to keep it")
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


    # -- reporting (``ppl.results``) -------------------------------------------------------

    def _describe(self, name: str) -> dict:
        """mean/sd/quantiles (None when not numeric), the table when discrete, presence
        (cached: results are immutable)."""
        cache = self.__dict__.setdefault("_descs", {})
        if name not in cache:
            cache[name] = describe(self._view(name))
        return cache[name]

    def summary(self, names: str | Iterable[str] | None = None, *, show_warnings: bool = True) -> str:
        """A fixed-width table: name, mean, sd, 5%, 50%, 95% and, for discrete scalar sites,
        the most probable values. Default: "return" and the top-level sites (at most 20).
        Vector sites get one row per component (at most 8). Then a "warning: ..." line per
        diagnostic warning (``warnings``; ``show_warnings=False`` leaves them out)."""
        return text.summary(self, names, show_warnings=show_warnings)

    def __repr__(self) -> str:
        try:
            return self.summary()
        except Exception:  # never fail in a REPL
            return f"<{type(self).__name__} method={self.method!r} sites={self.names!r}>"

    def _repr_html_(self) -> str:
        return export.to_html(self)

    def to_json(self) -> dict:
        """A json.dumps-able dict: method, log_evidence, ess, n and "posterior": for
        "return" and each top-level site, mean/sd/q05/q50/q95 (None when not numeric,
        lists for vector sites) plus "probs" when the site is discrete, and "exists"
        (its probability) when the site does not exist everywhere. NaN/inf -> None.
        "warnings": the result's diagnostic warnings (``warnings``; empty when none);
        weighted results add "ess_before_resampling" and "unique_fraction" (None when
        not counted)."""
        return export.to_json(self)

    def plot(self, names: str | Iterable[str] | None = None, bins: int = 50, ax=None):
        """Weighted histograms (continuous sites) or bar charts (discrete sites), one panel
        per name. Default: "return" plus the top-level scalar sites, at most 6. ``ax``: an
        Axes (for one name) or a sequence of Axes (one per name). Returns the Figure."""
        return plots.plot(self, names, bins, ax)

    # -- ArviZ (``ppl.results.arviz``; arviz is imported on first use) -----------------------

    #: the model and the data of the run (set by ``Model.run``; None for a result built by hand)
    model = None
    data = None

    def to_arviz(self, *, model=None, data=None, draws: int | None = None, seed: int = 0,
                 log_likelihood: bool | None = None, predictive=None):
        """This result as an ``arviz.InferenceData``: ``posterior`` (chain, draw, ...),
        ``sample_stats`` (``lp``; NUTS/HMC: diverging, acceptance_rate, tree_depth, n_steps,
        energy, step_size), ``log_likelihood`` (pointwise, per observed element, by
        re-scoring each draw's trace with the model: ``az.loo``/``az.waic``/``az.compare``
        work), ``observed_data``, and with ``predictive=`` (``Model.predictive``'s result,
        or a list of a prior and a posterior one) ``prior_predictive``/``posterior_predictive``.

        MCMC results keep their chains and draws. A weighted population (importance, smc,
        tempering, ...) is *resampled*: one chain of ``draws`` (default N) particles drawn
        multinomially by weight with ``numpy.random.default_rng(seed)`` (equal weights:
        the particles as they are); an exact result gives ``draws`` (default 1000) paths
        drawn by probability. ``model``/``data``: for a result not made by ``Model.run``;
        ``log_likelihood``: None = when the model is known, False = leave out (no
        re-scoring). Details: ``ppl.results.arviz``."""
        from .results.arviz import to_arviz
        return to_arviz(self, model=model, data=data, draws=draws, seed=seed, log_likelihood=log_likelihood,
                        predictive=predictive)

    def plot_trace(self, **kwargs):
        """``az.plot_trace(result.to_arviz(), **kwargs)`` (default: "return" and the top-level
        sites); the Figure. Divergences of NUTS/HMC are marked."""
        from .results.arviz import plot
        return plot(self, "trace", **kwargs)

    def plot_rank(self, **kwargs):
        """``az.plot_rank(result.to_arviz(), **kwargs)``: rank histograms per chain; the Figure."""
        from .results.arviz import plot
        return plot(self, "rank", **kwargs)

    def plot_pair(self, **kwargs):
        """``az.plot_pair(result.to_arviz(), **kwargs)`` (divergences marked); the Figure."""
        from .results.arviz import plot
        return plot(self, "pair", **kwargs)


# ----------------------------------------------------------------------------------------
# weighted particle populations
# ----------------------------------------------------------------------------------------


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
        head = (f"{self.method}: N={self.n}, ESS={self.ess:.1f}{before}, "
                f"log evidence={self.log_evidence:.4f}")
        auto = enumerate_auto.summary_line(self.extra)
        if auto is not None:
            head += "\n" + auto
        delayed = self.delayed_summary()
        if delayed is None:
            return head
        line = (f"delayed sampling: {delayed['marginal_observes']} observations scored by their "
                f"marginal likelihood")
        if "return_mean" in delayed:
            line += (f"; the return value's marginal (Rao-Blackwellised): mean={delayed['return_mean']:.4g}, "
                     f"sd={delayed['return_sd']:.4g}")
        return head + "\n" + line

    def delayed_summary(self) -> dict | None:
        """What delayed sampling did (``delayed=True``), or None: node and marginalised
        observation counts, and, where the return value was still a delayed Gaussian at the
        end, its marginal mixed over the particles' weights (``return_mean``, ``return_sd``):
        with one particle on a linear-Gaussian model, the exact Kalman filtering mean and sd.
        The ``return`` site itself holds one draw per particle from that marginal."""
        raw = self.extra.get("delayed")
        if not raw:
            return None
        out = {k: int(v) for k, v in raw.items() if not isinstance(v, torch.Tensor)}
        if isinstance(raw.get("return_mean"), torch.Tensor):
            w = self.weights.to(torch.float64).cpu()
            m = raw["return_mean"].to(torch.float64).cpu().reshape(-1)
            v = raw["return_var"].to(torch.float64).cpu().reshape(-1)
            if m.shape == w.shape:
                mean = float((w * m).sum())
                variance = float((w * (v + m * m)).sum()) - mean * mean  # the mixture's law of total variance
                out["return_mean"], out["return_sd"] = mean, max(variance, 0.0) ** 0.5
        return out

    def _diagnose(self) -> list[str]:
        if self.method == "prior":
            return []
        k = None
        if not self.resampled and float(self.weights.max() - self.weights.min()) > 0:
            k = self.pareto_k
        unique = None if self.unique_fraction is None else int(round(self.unique_fraction * self.n))
        return weighted_warnings(self.method, self.n, min(self.ess, self.ess_before_resampling),
                                 resampled=self.resampled, pareto_k=k, unique=unique) + \
            list(self.extra.get("move_warnings", []))  # adaptive SMC moves that hit max_moves

    def _json_extra(self) -> dict:
        out = {"ess_before_resampling": _json_scalar(self.ess_before_resampling),
               "unique_fraction": _json_scalar(self.unique_fraction)}
        delayed = self.delayed_summary()
        if delayed is not None:
            out["delayed"] = delayed
        out.update(_enumerated_json(self.extra))
        return out

    def _make_view(self, name: str) -> _View:
        return weighted_view(name, self.sites[name], self.weights)


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
    #: how the measure was computed: "paths" here, "elimination" for ``EliminatedResult``
    strategy = "paths"

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
        return exact_view(name, self._positive, self.evidence)


class EliminatedResult(ExactResult):
    """The exact posterior computed by variable elimination (``enumerate`` on a model of
    static structure: ``semantics.exact_elimination``), with the interface of
    :class:`ExactResult`: the same evidence and return-value table (Fractions when exact),
    per-site marginals of every choice, ``n`` (the number of positive-weight paths,
    counted by the same elimination). ``strategy`` is "elimination". ``paths`` is the path
    list, enumerated on first use (one run per path: slow for a long chain)."""

    strategy = "elimination"

    def __init__(self, raw: EliminationResult):
        self._raw = raw
        exact = getattr(raw, "scaled_returns", None) is not None or \
            all(isinstance(w, (int, Fraction)) for w in raw.returns.values())  # (scaled: every weight exact)
        self.evidence = Fraction(raw.evidence) if exact else float(raw.evidence)
        if self.evidence == 0:
            raise ZeroEvidenceError(_ZERO_EXACT_MSG, hint=_ZERO_EXACT_HINT)
        self.log_evidence = _log(self.evidence)
        self.ess = None
        self.names = list(raw.names)

    @property
    def n(self) -> int:
        """The number of execution paths of positive weight."""
        return self._raw.count_paths()

    @property
    def paths(self) -> list:
        cached = self.__dict__.get("_paths")
        if cached is None:
            cached = self.__dict__["_paths"] = list(self._raw.enumerate_paths())
        return cached

    def _header(self) -> str:
        ev = _fmt(self.evidence)
        return (f"{self.method}: {self.n} paths (by variable elimination), evidence={ev}, "
                f"log evidence={self.log_evidence:.4f}")

    def _json_extra(self) -> dict:
        return {"evidence": str(self.evidence), "strategy": self.strategy}

    def _make_view(self, name: str) -> _View:
        scaled = getattr(self._raw, "scaled_returns", None)
        if name == "return" and scaled is not None:  # (integer weights: one Fraction per value)
            counts: dict = {}
            for v, w in scaled[0].items():
                if w > 0:
                    key = _to_key(v)
                    counts[key] = counts.get(key, 0) + w
            return exact_integer_view(counts, sum(counts.values()))
        weights = self._raw.marginal_weights(name)
        return exact_view(name, [(w, {name: v}) for v, w in weights.items() if w > 0], self.evidence)


def _enumerated_json(extra: dict) -> dict:
    """What ``enumerate="auto"`` adds to a result's JSON: the choices summed out and those
    left sampled with why (``semantics.enumerate_auto``)."""
    if "enumerated" not in extra:
        return {}
    return {"enumerated": list(extra["enumerated"]), "enumerate_sampled": dict(extra.get("enumerate_sampled") or {})}


#: what HMC/NUTS add to a result's JSON (``inference.gradient_mcmc``); the last ones say how the
#: run was executed (a traced graph, compiled; the NUTS transition compiled), why not, and the
#: seconds of warm-up and sampling (wall and CPU)
_GRADIENT_FIELDS = ("divergences", "divergences_per_chain", "warmup_divergences", "step_size", "tree_depth_mean",
                    "hit_max_tree_depth", "max_tree_depth", "bfmi", "leapfrog_steps",
                    "traced", "compiled", "transition", "why_not_traced", "why_not_compiled",
                    "why_not_compiled_transition", "phase_seconds")


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
        return mcmc_warnings(self.method, self.r_hat, self.ess_per_site) + gradient_warnings(self.method, self.extra)

    def _json_extra(self) -> dict:
        """The chain layout and diagnostics (per-site split R-hat and ESS)."""
        return {"chains": self.chains, "draws": self.draws,
                "acceptance_rate": _json_scalar(self.acceptance_rate),
                "r_hat": {k: _json_scalar(v) for k, v in self.r_hat.items()},
                "ess_per_site": {k: _json_scalar(v) for k, v in self.ess_per_site.items()},
                **{k: self.extra[k] for k in _GRADIENT_FIELDS if k in self.extra}, **_enumerated_json(self.extra)}

    def _header(self) -> str:
        worst = max(self.r_hat.values()) if self.r_hat else float("nan")
        head = (f"{self.method}: {self.chains} chains x {self.draws} draws, acceptance {self.acceptance_rate:.2f}, "
                f"ESS={self.ess:.1f}, max split R-hat={worst:.3f}")
        if "divergences" in self.extra:
            e = self.extra
            head += (f", divergences={e['divergences']}, mean tree depth={e['tree_depth_mean']:.2f}, "
                     f"min E-BFMI={min(e['bfmi']):.2f}")
        auto = enumerate_auto.summary_line(self.extra)
        return head if auto is None else head + "\n" + auto


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
        out = {"score": _json_scalar(self.score), "candidates": self.candidates,
               "importance_log_evidence": _json_scalar(self.extra["importance_log_evidence"]),
               "not_a_posterior": True}
        if "beams" in self.extra:  # beam search (``inference.beam``): every final beam, best first
            out["beams"] = [{"score": _json_scalar(b["score"]), "return": b["return"]} for b in self.extra["beams"]]
            out.update({k: self.extra[k] for k in ("beam_width", "expand", "groups", "diversity", "sample")
                        if k in self.extra})
        return out

    def _header(self) -> str:
        if "beams" in self.extra:
            e = self.extra
            return (f"{self.method}: the best of {len(e['beams'])} beams (width {e['beam_width']}, "
                    f"{self.candidates} extensions scored), score (log joint density) {self.score:.4f}; "
                    f"an optimum, not a posterior sample (no evidence estimate)")
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
    if isinstance(raw, EliminationResult):
        return EliminatedResult(raw)
    raise TypeError(f"as_result: cannot make a result of a {type(raw).__name__} "
                    "(expected a Population, Chains, Optimum, exact paths or a result)")

