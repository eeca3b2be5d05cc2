"""The registry of primitive distributions of the ppl DSL.

Every ``x ~ name(args)`` / ``observe v ~ name(args)`` in a model resolves ``name`` here
(:func:`get`) to a :class:`DistSpec`, which tells the checker the arity and shapes and
gives the two semantics what they need:

* the *sampling* semantics (particle batches) calls :meth:`DistSpec.make` on parameter
  tensors and gets a ``torch.distributions.Distribution`` (the pyro.distributions
  subclass, so ``.to_event`` / ``.mask`` / ``.expand_by`` are available too), then
  :meth:`DistSpec.to_value` on its samples and :meth:`DistSpec.from_value` before
  ``log_prob``;
* the *exact* semantics (enumeration) calls :meth:`DistSpec.exact_support` and
  :meth:`DistSpec.exact_prob` on plain Python values.

Conventions

* Densities and samplers are not written here: ``make`` wraps torch / pyro
  distributions (a few written for ppl are in ``dist_classes``; every density, pmf and
  sampler is compared with scipy.stats in tests/test_distributions_scipy.py).  The only
  arithmetic done here is the *exact* pmf of the discrete distributions, in
  :class:`fractions.Fraction` arithmetic where it is rational, for enumeration.
* ``make`` validates parameters itself first, so that a bad parameter is reported as
  ``PPLRuntimeError("normal: parameter 'scale' must be positive (got -1.0)")`` with the
  DSL's parameter name and the first offending value; whatever torch still rejects is
  translated to a ``PPLRuntimeError`` too.  Because every parameter is checked here
  (tests/test_distributions.py: an invalid value of each parameter is reported), the
  torch distribution is built with ``validate_args=False``: torch's own re-validation
  would check the same things again at about twice the cost of a small distribution.
* ``log_prob`` of a value *outside the support* returns ``-inf`` (zero likelihood)
  instead of raising torch's ``ValueError``, so that ``observe 3 ~ binomial(2, 0.5)``
  or ``observe -1 ~ exponential(1)`` means "impossible", consistently with
  ``exact_prob`` returning 0.  The support check is the safe ``log_prob``'s own
  (``_safe_class``), so it holds with ``validate_args=False``.
* Some distributions have a second parameterisation chosen by a keyword
  (``DistSpec.keyword_variants``): ``bernoulli(logits=x)``, ``binomial(n, logits=x)``,
  ``categorical(logits=v)``.  Their exact probabilities are floats (a sigmoid or a
  softmax is irrational for rational logits).
* Classes torch/pyro lack or get wrong for the DSL (``half_student_t``,
  ``truncated_normal``, a batched ``multinomial`` with an exact support, ``von_mises`` on
  ``[-pi, pi]``) are in ``dist_classes``.
* Parameters may carry extra leading batch dimensions (particles); vector parameters
  (``param_event_dims`` > 0) keep their event dimensions last.
* Value dtypes seen by the DSL: ``"float"`` for continuous distributions and ``delta``,
  ``"bool"`` for ``bernoulli`` / ``flip``, ``"long"`` for counts and indices.
* ``uniform_draw(items)`` is *index valued* (``spec.index_valued``): ``make`` only uses
  the shape of the items tensor (its last dimension is the number of items) and
  returns a uniform ``Categorical`` over indices ``0..K-1``; the runtime maps an index
  to ``items[index]``.  Its exact support, in contrast, is the items themselves.
* Exact enumeration: probabilities are ``Fraction`` when every probability-determining
  parameter is an ``int`` / ``bool`` / ``Fraction`` and ``float`` otherwise.  Count
  parameters (``binomial`` / ``beta_binomial`` ``n``) only need to be integral
  (``3.0`` is fine) and do not make the result inexact.  Distributions with infinite
  (``poisson``, ``geometric``, ``negative_binomial``, ``zero_inflated_poisson``) or
  continuous support raise ``InfiniteSupportError`` from ``exact_support``; their
  ``exact_prob`` still works
  (pmf, exact where the pmf is rational, or density as a float).
* Count conventions follow torch: ``geometric(p)`` counts the failures before the
  first success (support 0, 1, 2, ...); ``negative_binomial(total_count, p)`` counts
  the *successes* (each with probability ``p``) before ``total_count`` failures:
  ``P(k) = C(k + r - 1, k) (1 - p)^r p^k``.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import re
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Sequence

import pyro.distributions as pdist
import torch
import torch.distributions as td
from pyro.distributions.distribution import COERCIONS
from torch.distributions import constraints as tc

from ppl.semantics.errors import (
    InfiniteSupportError,
    PPLCheckError,
    PPLRuntimeError,
    did_you_mean,
)

from . import dist_classes as _dc
from .operands import number_operand

__all__ = ["DistSpec", "DISTRIBUTIONS", "get", "names"]

_INFINITE_HINT = (
    "exact enumeration needs finite support; use importance sampling, "
    "or bound it, e.g. categorical over a finite range"
)


# --------------------------------------------------------------------------- formatting


def _fmt(x: Any) -> str:
    """A short rendering of an offending value for error messages."""
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        s = repr(x)
        return s if len(s) <= 10 else f"{x:.6g}"
    if isinstance(x, int) and x.bit_length() > 64:
        return f"an integer of {len(str(abs(x)))} digits"
    if isinstance(x, Fraction):
        return str(x)
    if isinstance(x, (list, tuple)):
        inner = ", ".join(_fmt(v) for v in list(x)[:8])
        return "[" + inner + (", ..." if len(x) > 8 else "") + "]"
    return repr(x)


# ------------------------------------------------------------------------- constraints


# Parameter checks while a graph is traced (``inference.mh_traced``): a check cannot stop
# a traced run, so inside ``deferred_checks()`` (traced or not) each one appends its "all
# good" 0-dim bool tensor here instead; the graph returns their conjunction, and a step that fails
# it is redone by the interpreter, which raises the error at its source. Per thread: a
# graph traced in one thread does not defer the checks of a run in another.
class _Deferred(threading.local):
    checks: list | None = None


_DEFERRED = _Deferred()


@contextlib.contextmanager
def deferred_checks():
    """Collect the parameter checks made while tracing (in this thread): yields the list
    they go to."""
    saved, _DEFERRED.checks = _DEFERRED.checks, []
    try:
        yield _DEFERRED.checks
    finally:
        _DEFERRED.checks = saved


@dataclass(frozen=True)
class _Con:
    """An elementwise parameter constraint, checkable on tensors and on Python numbers."""

    text: str  # completes "parameter 'p' ..."
    tensor_ok: Callable[[torch.Tensor], torch.Tensor]
    py_ok: Callable[[Any], bool]
    integer: bool = False  # count parameter: exact arithmetic needs only integrality
    opaque: bool = False  # exact semantics: any Python value, passed through unchanged
    irrational: bool = False  # probabilities from it are irrational (logits): exact semantics uses floats


def _py_int_ok(x) -> bool:
    if isinstance(x, float) and not math.isfinite(x):
        return False
    return x >= 0 and x == int(x)


def _py_finite(x) -> bool:
    """A Python number is finite (a huge int or Fraction that overflows a float is not)."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


# An infinite constant parameter (written in the model or given as a number) is an
# error, never a silently degenerate distribution: beta(1e400, 2) -- 1e400 reads as inf --
# drew p ~ 1e-38. Per-particle (tensor) parameters may be infinite: a particle whose
# exp(s) overflowed scores an observation at the limit density 0 (weight zero), as before.
REAL = _Con("must be a real number", lambda t: ~torch.isnan(t), lambda x: x == x and _py_finite(x))
EXTENDED_REAL = _Con("must be a real number or +-inf", lambda t: ~torch.isnan(t), lambda x: x == x)  # bounds
POSITIVE = _Con("must be positive", lambda t: t > 0, lambda x: x > 0 and _py_finite(x))
NONNEG = _Con("must be non-negative", lambda t: t >= 0, lambda x: x >= 0 and _py_finite(x))

_FINITE_TEXTS = (REAL.text, POSITIVE.text, NONNEG.text)


def _is_infinite(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and bool(torch.isinf(x).all())
    return isinstance(x, (int, float, Fraction)) and not isinstance(x, bool) and not _py_finite(x)


UNIT = _Con("must be in [0, 1]", lambda t: (t >= 0) & (t <= 1), lambda x: 0 <= x <= 1)
UNIT_POS = _Con("must be in (0, 1]", lambda t: (t > 0) & (t <= 1), lambda x: 0 < x <= 1)
UNIT_HALF_OPEN = _Con("must be in [0, 1)", lambda t: (t >= 0) & (t < 1), lambda x: 0 <= x < 1)
NONNEG_INT = _Con(
    "must be a non-negative integer",
    lambda t: torch.isfinite(t) & (t >= 0) & (t == torch.floor(t)),
    _py_int_ok,
    integer=True,
)
PROB_VECTOR = _Con(  # categorical weights; the row-sum check is separate
    "must contain finite non-negative weights",
    lambda t: torch.isfinite(t) & (t >= 0),
    lambda x: x >= 0 and (not isinstance(x, float) or math.isfinite(x)),
)
LOGIT = _Con("must be a finite real number", torch.isfinite, lambda x: math.isfinite(x), irrational=True)
LOGIT_VECTOR = _Con(  # categorical logits; "at least one finite" is checked separately
    "must contain real numbers or -inf",
    lambda t: ~torch.isnan(t) & (t < math.inf),
    lambda x: x == x and x < math.inf,
    irrational=True,
)
DIM = _Con(
    "must be an integer >= 2",
    lambda t: torch.isfinite(t) & (t >= 2) & (t == torch.floor(t)),
    lambda x: _py_int_ok(x) and x >= 2,
    integer=True,
)
POINT = _Con("must be a real number", lambda t: ~torch.isnan(t), lambda x: True, opaque=True)  # delta
COV = _Con("must be a symmetric positive-definite matrix", None, None)  # type: ignore[arg-type]
ITEMS = _Con("must be a non-empty list", None, None)  # type: ignore[arg-type]

#: the constraints a per-particle value may fail at some particles with density zero there
#: (``DistSpec.invalid_rows``, ``semantics.invalid_parameters``): a scale that underflowed to
#: 0 or was computed at or below 0, a covariance that is not positive definite
SCALE_LIKE = (POSITIVE, NONNEG, COV)


# -------------------------------------------------------- out-of-support-safe torch dists


def _fill_zero(d):
    return torch.zeros((), dtype=torch.get_default_dtype())


def _fill_one(d):
    return torch.ones((), dtype=torch.get_default_dtype())


# In-support point per torch class, used to evaluate log_prob harmlessly where the value is
# outside the support (that entry is then replaced by -inf).
_FILLS: dict[type, Callable] = {
    pdist.Normal: _fill_zero,
    pdist.StudentT: _fill_zero,
    pdist.Cauchy: _fill_zero,
    pdist.Laplace: _fill_zero,
    pdist.LogNormal: _fill_one,
    pdist.HalfNormal: _fill_one,
    pdist.Gamma: _fill_one,
    pdist.InverseGamma: _fill_one,
    pdist.Exponential: _fill_one,
    pdist.Beta: lambda d: torch.full((), 0.5),
    pdist.Uniform: lambda d: (d.low + d.high) / 2,
    pdist.Dirichlet: lambda d: torch.full(
        d.concentration.shape[-1:], 1.0 / d.concentration.shape[-1], dtype=d.concentration.dtype
    ),
    pdist.MultivariateNormal: lambda d: d.loc,
    pdist.Delta: lambda d: d.v,
    pdist.Bernoulli: _fill_zero,
    pdist.Binomial: _fill_zero,
    pdist.BetaBinomial: _fill_zero,
    pdist.Categorical: _fill_zero,
    pdist.Poisson: _fill_zero,
    pdist.Geometric: _fill_zero,
    pdist.NegativeBinomial: _fill_zero,
    pdist.HalfCauchy: _fill_one,
    _dc.HalfStudentT: _fill_one,
    _dc.TruncatedNormal: lambda d: torch.maximum(torch.minimum(d.loc, d.high), d.low),
    pdist.Weibull: _fill_one,
    pdist.Pareto: lambda d: d.scale,
    pdist.Chi2: _fill_one,
    _dc.VonMises: _fill_zero,
    _dc.LKJCholesky: lambda d: torch.eye(d.event_shape[-1], dtype=d.concentration.dtype, device=d.concentration.device),
    _dc.Multinomial: lambda d: torch.cat(
        [d.total_count.unsqueeze(-1), torch.zeros_like(d.probs[..., 1:])], -1),
    pdist.ZeroInflatedPoisson: _fill_zero,
}


_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def _normal_log_prob(d, value: torch.Tensor) -> torch.Tensor:
    """torch's ``Normal.log_prob``, op for op (the same bits: tests/test_smcfast.py), with
    the tensor methods called directly (``x ** 2`` goes through a Python wrapper of
    torch's), ``2 * var`` as ``var + var`` (both exact) and the constant as a cached
    tensor: each costs ~5 us on CPU, and SMC scores a normal observation per step."""
    scale = d.scale
    if d._validate_args or not isinstance(scale, torch.Tensor):
        return td.Normal.log_prob(d, value)
    var = scale.pow(2)
    lp = -((value - d.loc).pow(2)) / (var + var) - scale.log()
    return lp - number_operand(_LOG_SQRT_2PI, lp)


def _bernoulli_log_prob(d, value: torch.Tensor) -> torch.Tensor:
    """``Bernoulli.log_prob`` as ``y l + log sigmoid(-l)`` (= ``y l - softplus(l)``) for
    logits ``l``, which is ``log sigmoid(l)`` at 1 and ``log sigmoid(-l)`` at 0. torch's is
    ``-binary_cross_entropy_with_logits``, with ``sigmoid`` in its derivative: TorchInductor
    compiles them (in a potential's recorded graph) into three exponentials, a logarithm and
    a division a point; ``log_sigmoid`` and its derivative into one exponential, one
    ``log1p`` and a division. The derivative ``y - sigmoid(l)`` is exact at ``l = 0`` too. Measured (one thread, 4 chains x 200
    points, value and gradient compiled): 6.6 -> 5.8 us a call on logistic regression;
    eagerly no slower than torch's (0.3-1.1 ms at 200,000 points). Agrees with torch's to
    ~1e-15 (tests/test_distributions_lean.py)."""
    if d._validate_args:
        return td.Bernoulli.log_prob(d, value)
    logits = d.logits
    return value * logits + torch.nn.functional.logsigmoid(-logits)


# class -> (the torch method replicated, the replica): used while the class's log_prob is
# still that method (pyro could give it one of its own)
_OWN_LOG_PROB = {pdist.Normal: (td.Normal.log_prob, _normal_log_prob),
                 pdist.Bernoulli: (td.Bernoulli.log_prob, _bernoulli_log_prob)}


def _safe_class(base: type) -> type:
    """A subclass of ``base`` whose ``log_prob`` is ``-inf`` outside the support instead of
    raising.  Everything else (sampling, expand, pyro's mixin methods) is inherited."""
    fill = _FILLS[base]
    replicated, replica = _OWN_LOG_PROB.get(base, (None, None))
    real_log_prob = replica if base.log_prob is replicated else base.log_prob

    def log_prob(self, value):
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value, dtype=torch.get_default_dtype())
        support = self.support
        if support is tc.real or type(support) is type(tc.real):  # nothing can be outside
            return real_log_prob(self, value)
        try:
            ok = support.check(value)
        except NotImplementedError:  # pragma: no cover - every support used here is checkable
            return base.log_prob(self, value)
        if _DEFERRED.checks is None and bool(ok.all()):  # a shortcut; a graph being traced takes the general path
            return real_log_prob(self, value)
        ok_full = ok.reshape(ok.shape + (1,) * len(self.event_shape))
        safe = torch.where(ok_full, value, fill(self).to(device=value.device, dtype=value.dtype))
        lp = real_log_prob(self, safe)
        return torch.where(ok, lp, torch.full_like(lp, -math.inf))

    log_prob.__doc__ = base.log_prob.__doc__
    qualname = f"_Safe{base.__name__}"
    cls = type(base)(base.__name__, (base,), {"log_prob": log_prob, "__module__": __name__, "__qualname__": qualname})
    globals()[qualname] = cls  # picklable
    return cls


_SAFE: dict[type, type] = {cls: _safe_class(cls) for cls in _FILLS}


def _build(cls: type, *args, **kwargs):
    # Parameters were validated by DistSpec.make (with the DSL's names in the message);
    # values are checked against the support in the safe log_prob. Skipping torch's own
    # re-validation of both halves the cost of a small distribution.
    direct = _DIRECT.get(cls)
    if direct is not None and not kwargs and not COERCIONS:
        return direct(*args)
    if cls in _INNER_CHECKED:
        return _dc.without_torch_checks(_SAFE[cls], *args, validate_args=False, **kwargs)
    return _SAFE[cls](*args, validate_args=False, **kwargs)


#: classes whose constructor builds inner distributions with torch's default argument checks:
#: built by ``_build`` with the checks off (``dist_classes.without_torch_checks``)
_INNER_CHECKED = frozenset({pdist.StudentT, pdist.LogNormal, pdist.BetaBinomial, _dc.LKJCholesky})

_broadcast_tensors = torch._C._VariableFunctions.broadcast_tensors  # what torch.broadcast_tensors calls


def _direct_builder(cls: type, names: tuple[str, str]) -> Callable | None:
    """For a torch class whose ``__init__`` (given two tensors) is: the two parameters
    broadcast together, stored as ``names``, then ``Distribution.__init__`` with their
    shape as the batch shape: the safe class's instance built by doing just that, without
    the generic argument handling (half the cost of the constructor; the same object:
    tests/test_fastpath.py). None when pyro's class has an ``__init__`` of its own."""
    if cls.__init__ is not getattr(td, cls.__name__).__init__:
        return None
    safe = _SAFE[cls]
    a, b = names

    def build(p: torch.Tensor, q: torch.Tensor):
        d = safe.__new__(safe)
        if type(p) is torch.Tensor and type(q) is torch.Tensor:
            # the op itself: torch.broadcast_tensors' Python wrapper (a __torch_function__
            # test, a module __getattr__) costs as much as the op (SMC's fixed cost per step)
            pb, qb = _broadcast_tensors([p, q])
        else:
            pb, qb = torch.broadcast_tensors(p, q)
        setattr(d, a, pb)
        setattr(d, b, qb)
        td.Distribution.__init__(d, pb.size(), validate_args=False)
        return d
    return build


_DIRECT = {cls: fn for cls, names in [(pdist.Normal, ("loc", "scale")), (pdist.Cauchy, ("loc", "scale")),
                                      (pdist.Laplace, ("loc", "scale")), (pdist.Gamma, ("concentration", "rate"))]
           if (fn := _direct_builder(cls, names)) is not None}


# ---------------------------------------------------------------- python-value helpers


def _as_count(v) -> int | None:
    """``v`` as a Python int if it is an integral number, else None."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, (bool, int)):
        return int(v)
    if isinstance(v, Fraction):
        return int(v) if v.denominator == 1 else None
    if isinstance(v, float):
        return int(v) if math.isfinite(v) and v.is_integer() else None
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        f = float(v)
        return int(f) if math.isfinite(f) and f.is_integer() else None
    return None


def _merge_key(v):
    """Equality key for merging support values: keeps bools apart from ints (True != 1
    as DSL values), merges 1 / 1.0 / Fraction(1)."""
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, numbers.Number):
        return ("num", v)
    if isinstance(v, (list, tuple)):
        return ("seq", tuple(_merge_key(x) for x in v))
    try:
        hash(v)
    except TypeError:
        return ("id", id(v))
    return ("obj", v)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _xlogy(a: float, x: float) -> float:
    return 0.0 if a == 0 else a * _log(x)


def _xlog1m(a: float, p: float) -> float:
    """a * log(1 - p), 0 when a == 0."""
    return 0.0 if a == 0 else a * _log(1.0 - p)


def _rising(x, k: int):
    """Rising factorial x (x+1) ... (x+k-1), exact for Fraction / int x."""
    out = 1
    for i in range(k):
        out *= x + i
    return out


def _rising_list(x, n: int) -> list:
    out = [1]
    for i in range(n):
        out.append(out[-1] * (x + i))
    return out


def _lbeta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _lcomb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


# ------------------------------------------------------------------------------ DistSpec


@dataclass(frozen=True)
class DistSpec:
    """One primitive distribution of the DSL.  See the module docstring for conventions."""

    name: str
    params: tuple[str, ...]
    defaults: dict
    param_event_dims: tuple[int, ...]
    value_event_dim: int
    discrete: bool
    value_dtype: str  # "float" | "long" | "bool"
    doc: str
    support_kind: str  # "real" | "positive" | "unit_interval" | "interval" | "simplex" | "integer" | "boolean" | "finite"
    index_valued: bool = False  # uniform_draw: torch values are indices into the items
    # another parameterisation chosen by a keyword: {"logits": ("p", spec of bernoulli(logits))}
    # means ``bernoulli(logits=x)`` is that spec, and 'p' may then not be given
    keyword_variants: dict = field(default_factory=dict, repr=False, compare=False)
    # --- internals
    _constraints: tuple = field(default=(), repr=False, compare=False)
    _builder: Callable | None = field(default=None, repr=False, compare=False)
    _torch_names: dict = field(default_factory=dict, repr=False, compare=False)
    _pmf: Callable | None = field(default=None, repr=False, compare=False)
    _support: Callable | None = field(default=None, repr=False, compare=False)
    _exact_defaults: dict = field(default_factory=dict, repr=False, compare=False)
    _cross_check: Callable | None = field(default=None, repr=False, compare=False)
    # (name, constraint, event dims) of each parameter: what ``make`` checks, zipped once
    _checks: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_checks", tuple(zip(self.params, self._constraints, self.param_event_dims)))

    # ---------------------------------------------------------------- shape/arity info

    @property
    def finite_support(self) -> bool:
        """True when :meth:`exact_support` can enumerate this distribution."""
        return self._support is not None

    @property
    def n_required(self) -> int:
        return len(self.params) - len(self.defaults)

    def check_arity(self, n: int) -> None:
        lo, hi = self.n_required, len(self.params)
        if not lo <= n <= hi:
            want = str(hi) if lo == hi else f"{lo} to {hi}"
            raise PPLCheckError(
                f"{self.name} takes {want} parameter{'s' if hi != 1 else ''} "
                f"({', '.join(self.params)}), got {n}",
                hint=f"{self.name}({', '.join(self.params)}): {self.doc}",
            )

    def _err(self, pname: str, text: str, got: Any = None, got_text: str | None = None) -> PPLRuntimeError:
        if got is not None and text in _FINITE_TEXTS and _is_infinite(got):
            text = "must be finite"  # an inf fails these constraints only by being infinite
        msg = f"{self.name}: parameter '{pname}' {text}"
        if got is not None:
            got_text = _fmt(got)
        if got_text is not None:
            msg += f" (got {got_text})"
        return PPLRuntimeError(msg, hint=f"{self.name}({', '.join(self.params)}): {self.doc}")

    # ----------------------------------------------------------------------- sampling

    def make(self, *params) -> torch.distributions.Distribution:
        """A validated torch (pyro) distribution for these parameter tensors."""
        if len(params) != len(self.params):  # (every parameter given: the arity is right)
            self.check_arity(len(params))
            params = params + tuple(self.defaults[p] for p in self.params[len(params):])
        checks = self._checks
        constant = []
        for (pname, con, ev), raw in zip(checks, params):
            is_constant = (type(raw) is float or type(raw) is int) and ev == 0 and con.py_ok is not None
            if is_constant and not con.py_ok(raw):  # a Python constant: checked without tensor ops
                raise self._err(pname, con.text, raw)  # (before a 10 ** 400 overflows a tensor)
            constant.append(is_constant)
        tensors = self._to_tensors(params)
        for (pname, con, ev), t, is_constant in zip(checks, tensors, constant):
            if not is_constant:
                self._check_tensor(pname, con, ev, t)
        if self._cross_check is not None:
            self._cross_check(self, *tensors)
        try:
            return self._builder(*tensors)  # type: ignore[misc]
        except PPLRuntimeError:
            raise
        except (ValueError, RuntimeError) as e:
            raise self._translate(e) from None

    def _to_tensors(self, params: Sequence) -> list[torch.Tensor]:
        device = None
        for p in params:
            if isinstance(p, torch.Tensor):
                device = p.device
                break
        out = []
        for p, con in zip(params, self._constraints):
            if con is ITEMS:  # only the shape matters
                t = p if isinstance(p, torch.Tensor) else torch.zeros(len(p) if isinstance(p, (list, tuple)) else ())
                out.append(t)
                continue
            if isinstance(p, torch.Tensor):
                t = p
            elif (type(p) is float or type(p) is int) and (t := _const_tensor(p, device)) is not None:
                pass  # a constant: its tensor is cached
            else:
                if isinstance(p, Fraction):
                    p = float(p)
                try:
                    t = torch.as_tensor(p, device=device)
                except (TypeError, ValueError, RuntimeError):
                    try:
                        t = torch.as_tensor(_floatify(p), device=device)
                    except (TypeError, ValueError, RuntimeError):
                        raise PPLRuntimeError(
                            f"{self.name}: parameter '{self.params[len(out)]}' must be a number (got {_fmt(p)})"
                        ) from None
            if not t.is_floating_point():
                t = t.to(torch.get_default_dtype())
            out.append(t)
        dtype, mixed = None, False  # the parameters' common float dtype; whether they differ
        for t, c in zip(out, self._constraints):
            if c is not ITEMS and t.dtype != dtype:
                mixed = dtype is not None
                dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
        if mixed:
            out = [t if c is ITEMS or t.dtype == dtype else t.to(dtype) for t, c in zip(out, self._constraints)]
        return out

    def _check_tensor(self, pname: str, con: _Con, ev: int, t: torch.Tensor) -> None:
        if _DEFERRED.checks is not None:
            _DEFERRED.checks.append(self._good(con, t))
            return
        if ev == 0 and t.is_floating_point() and t.numel() > 0:
            # fast passes of the common checks (one reduction, one sync); anything they
            # do not clear goes through the full check below, which reports the error
            if t.requires_grad:
                t = t.detach()
            if con is REAL and not math.isnan(float(t.sum())):
                return  # a NaN makes the sum NaN (the sum can also be NaN without one)
            if con is POSITIVE and float(t.min()) > 0:
                return  # min propagates NaN, which fails the test
            if con is UNIT:
                lo, hi = torch.aminmax(t)  # (one pass; NaN propagates and fails the test)
                if float(lo) >= 0 and float(hi) <= 1:
                    return
        if t.dim() < ev:
            kind = "a vector" if ev == 1 else "a matrix"
            raise self._err(pname, f"must be {kind}", t)
        if ev >= 1 and t.shape[-1] == 0:
            raise self._err(pname, "must not be empty")
        if con is ITEMS:
            return
        if con is COV:
            if t.shape[-1] != t.shape[-2]:
                raise self._err(pname, f"must be a square matrix (got shape {tuple(t.shape[-2:])})")
            good = tc.positive_definite.check(t)
            if not bool(good.all()):
                raise self._err(pname, con.text, t[~good][0])
            return
        good = con.tensor_ok(t)
        if not bool(good.all()):
            raise self._err(pname, con.text, t[~good][0].item())
        if con is PROB_VECTOR:
            s = t.sum(-1)
            if not bool((s > 0).all()):
                raise self._err(pname, "must have a positive sum (got all zeros)")
        if con is LOGIT_VECTOR and not bool(torch.isfinite(t).any(-1).all()):
            raise self._err(pname, "must contain at least one finite value (got all -inf)")

    def invalid_rows(self, params: Sequence, batched: Sequence[bool], M: int) -> torch.Tensor | None:
        """Per row of the batched parameters (leading dimension ``M``: the particles),
        whether that row fails a scale-like constraint (``SCALE_LIKE``: positive,
        non-negative, positive definite): a bool tensor [M]. None, for the caller's error,
        when a parameter that is not batched fails (the same for every row: a constant or
        data), a batched one fails another constraint (a probability of 1.5 is a bug, not
        a region of the parameter space), or there is nothing per row to check. ``make``'s
        cross-checks between parameters are not included."""
        bad = None
        for (pname, con, ev), t, b in zip(self._checks, params, batched):
            if con is ITEMS:
                continue
            t = torch.as_tensor(t)
            if con is COV:
                ok = tc.positive_definite.check(t) if t.dim() >= 2 and t.shape[-1] == t.shape[-2] \
                    else torch.zeros(t.shape[:-2], dtype=torch.bool)
            else:
                ok = con.tensor_ok(t)
                if con is PROB_VECTOR:
                    ok = ok.all(-1) & (t.sum(-1) > 0)
                elif con is LOGIT_VECTOR:
                    ok = ok.all(-1) & torch.isfinite(t).any(-1)
            if not b:
                if not bool(ok.all()):
                    return None
                continue
            if ok.dim() == 0 or ok.shape[0] != M:
                return None
            row_bad = ~ok.reshape(M, -1).all(1)
            if con not in SCALE_LIKE and bool(row_bad.any()):
                return None
            bad = row_bad if bad is None else bad | row_bad
        return bad

    @staticmethod
    def _good(con: _Con, t: torch.Tensor) -> torch.Tensor:
        """Whether the parameter tensor passes ``con``, as a 0-dim bool tensor (its shape
        is not checked: a traced graph has the shapes of the eager run that made it)."""
        if con is ITEMS:
            return torch.ones((), dtype=torch.bool, device=t.device)
        if con is COV:  # torch's positive_definite.check, without its Python branch
            symmetric = torch.isclose(t, t.mT, atol=1e-6).all(-2).all(-1)
            return (symmetric & torch.linalg.cholesky_ex(t).info.eq(0)).all()
        good = con.tensor_ok(t).all()
        if con is PROB_VECTOR:
            good = good & (t.sum(-1) > 0).all()
        if con is LOGIT_VECTOR:
            good = good & torch.isfinite(t).any(-1).all()
        return good

    def _translate(self, e: Exception) -> PPLRuntimeError:
        text = str(e).split("\n")[0]
        m = re.search(r"Expected parameter (\w+)", text)
        if m:
            tname = m.group(1)
            pname = self._torch_names.get(tname, tname)
            c = re.search(r"constraint (.*?), but found", text)
            what = f"must satisfy {c.group(1)}" if c else "is invalid"
            return self._err(pname, what)
        if "shape" in text or "broadcast" in text or "size" in text:
            return PPLRuntimeError(f"{self.name}: parameter shapes do not fit together ({text})")
        return PPLRuntimeError(f"{self.name}: invalid parameters ({text})")

    def to_value(self, sample: torch.Tensor) -> torch.Tensor:
        """A torch sample as a DSL value (bool / long / float)."""
        if not isinstance(sample, torch.Tensor):
            sample = torch.as_tensor(sample)
        if self.value_dtype == "bool":
            return sample != 0
        if self.value_dtype == "long":
            if sample.is_floating_point():
                sample = sample.round()
            return sample.long()
        if not sample.is_floating_point():
            return sample.to(torch.get_default_dtype())
        return sample

    def from_value(self, value: torch.Tensor) -> torch.Tensor:
        """A DSL value as what the torch distribution's ``log_prob`` wants."""
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        if self.name in ("categorical", "uniform_draw"):  # torch Categorical wants indices
            if value.is_floating_point():
                return value  # non-integral floats are then outside the support (-inf)
            return value.long()
        if not value.is_floating_point():
            return value.to(torch.get_default_dtype())
        return value

    # ---------------------------------------------------------------------- exact

    def exact_support(self, *params) -> list[tuple[Any, Fraction | float]]:
        """The finite support with its probabilities (see module docstring)."""
        if self._support is None:
            if self.discrete:
                self._exact_args(params)  # report bad parameters first
                raise InfiniteSupportError(
                    f"{self.name} has infinite support (0, 1, 2, ...); it cannot be enumerated exactly",
                    hint=_INFINITE_HINT,
                )
            self.make(*self._float64_params(params))  # report bad parameters first
            raise InfiniteSupportError(
                f"{self.name} is a continuous distribution; it cannot be enumerated exactly",
                hint=_INFINITE_HINT,
            )
        args, exact = self._exact_args(params)
        merged: dict = {}
        for v, p in self._support(args, exact):
            k = _merge_key(v)
            if k in merged:
                merged[k] = (merged[k][0], merged[k][1] + p)
            else:
                merged[k] = (v, p)
        conv = Fraction if exact else float
        return [(v, conv(p)) for v, p in merged.values() if p != 0]

    def exact_prob(self, value, *params) -> Fraction | float:
        """P(value) (discrete; exact where possible) or the density at value (continuous)."""
        if not self.discrete:
            return self._density(value, params)
        args, exact = self._exact_args(params)
        p = self._pmf(value, args, exact)  # type: ignore[misc]
        if exact and isinstance(p, (int, Fraction)):
            return Fraction(p)
        return float(p)

    def _float64_params(self, params) -> list[torch.Tensor]:
        """Plain-Python parameters (defaults filled in) as float64 tensors; a non-number
        is a ``PPLRuntimeError`` naming the parameter."""
        self.check_arity(len(params))
        params = list(params) + [self.defaults[p] for p in self.params[len(params):]]
        ts = []
        for pname, p in zip(self.params, params):
            try:
                ts.append(torch.as_tensor(_floatify(p), dtype=torch.float64) if not isinstance(p, torch.Tensor)
                          else p.double())
            except (TypeError, ValueError, RuntimeError):
                raise self._err(pname, "must be a number", p) from None
        return ts

    def _density(self, value, params) -> float:
        d = self.make(*self._float64_params(params))
        try:
            v = torch.as_tensor(_floatify(value), dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            return 0.0
        ved = self.value_event_dim
        if v.dim() < ved or (ved and v.shape[v.dim() - ved:] != d.event_shape):
            return 0.0
        lp = d.log_prob(v)
        if lp.numel() != 1:
            raise PPLRuntimeError(f"{self.name}: exact_prob needs a single value and single parameters")
        return math.exp(lp.item())

    def _exact_args(self, params: Sequence) -> tuple[list, bool]:
        """Validate plain-Python parameters; convert them to Fraction (exact) or float."""
        self.check_arity(len(params))
        params = list(params) + [
            self._exact_defaults.get(p, self.defaults.get(p)) for p in self.params[len(params):]
        ]
        raw = []
        leaves_exact = True
        for pname, con, ev, p in zip(self.params, self._constraints, self.param_event_dims, params):
            if con is ITEMS:
                if not isinstance(p, (list, tuple)) or len(p) == 0:
                    raise self._err(pname, con.text, p)
                raw.append(list(p))
                continue
            if con.opaque:
                raw.append(p)
                continue
            if ev == 1:
                if isinstance(p, torch.Tensor):
                    p = p.tolist()
                if not isinstance(p, (list, tuple)):
                    raise self._err(pname, "must be a list of numbers", p)
                if len(p) == 0:
                    raise self._err(pname, "must not be empty")
                xs = [self._py_number(pname, x) for x in p]
            else:
                xs = [self._py_number(pname, p)]
            for x in xs:
                if not con.py_ok(x):
                    raise self._err(pname, con.text, x)
            if con is PROB_VECTOR and sum(xs) <= 0:
                raise self._err(pname, "must have a positive sum (got all zeros)")
            if con is LOGIT_VECTOR and not any(math.isfinite(x) for x in xs):
                raise self._err(pname, "must contain at least one finite value (got all -inf)")
            if con.integer:
                xs = [int(x) for x in xs]
            elif con.irrational or not all(isinstance(x, (int, Fraction)) for x in xs):
                leaves_exact = False
            raw.append(xs if ev == 1 else xs[0])
        if leaves_exact:
            conv = lambda x: Fraction(x)  # noqa: E731
        else:
            conv = float
        args = []
        for con, ev, a in zip(self._constraints, self.param_event_dims, raw):
            if con is ITEMS or con.opaque or con.integer:
                args.append(a)
            elif ev == 1:
                args.append([conv(x) for x in a])
            else:
                args.append(conv(a))
        return args, leaves_exact

    def _py_number(self, pname: str, x):
        if isinstance(x, torch.Tensor) and x.numel() == 1:
            x = x.item()
        if isinstance(x, (bool, int, Fraction, float)):
            return int(x) if isinstance(x, bool) else x
        if isinstance(x, numbers.Integral):
            return int(x)
        if isinstance(x, numbers.Rational):
            return Fraction(x.numerator, x.denominator)
        if isinstance(x, numbers.Real):
            return float(x)
        raise self._err(pname, "must be a number", x)


_CONSTS: dict = {}


def _const_tensor(p, device) -> torch.Tensor | None:
    """``torch.as_tensor(p, device=device)`` (in the default float dtype when p is an int)
    for a Python int/float constant, cached: distributions never write to their
    parameters. -0.0 is kept apart from 0.0; the cache is bounded."""
    dtype = torch.get_default_dtype()
    key = (type(p), p, math.copysign(1.0, p) if type(p) is float else 0, device, dtype,
           torch.is_inference_mode_enabled())  # an inference tensor must not leak out of that mode
    t = _CONSTS.get(key)
    if t is None:
        try:
            t = torch.as_tensor(p, device=device)
        except (TypeError, ValueError, RuntimeError):
            return None  # e.g. an int too large for int64: the general path handles it
        if not t.is_floating_point():
            t = t.to(dtype)
        if len(_CONSTS) >= 512:
            _CONSTS.clear()
        _CONSTS[key] = t
    return t


def _floatify(x):
    if isinstance(x, (list, tuple)):
        return [_floatify(v) for v in x]
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, numbers.Real):
        return float(x)
    return x


# ----------------------------------------------------------------------- torch builders


def _b_categorical(probs):
    return _build(pdist.Categorical, probs=probs)


def _b_uniform_draw(items):
    return _build(pdist.Categorical, probs=torch.ones(items.shape, dtype=torch.get_default_dtype(), device=items.device))


# --------------------------------------------------------------------------- exact pmfs


def _bool_pmf(value, args, exact):
    (p,) = args
    if value is True or (not isinstance(value, bool) and isinstance(value, numbers.Number) and value == 1):
        return p
    if value is False or (not isinstance(value, bool) and isinstance(value, numbers.Number) and value == 0):
        return 1 - p
    return 0


def _bool_support(args, exact):
    (p,) = args
    return [(True, p), (False, 1 - p)]


def _binomial_pmf(value, args, exact):
    n, p = args
    k = _as_count(value)
    if k is None or not 0 <= k <= n:
        return 0
    if exact:
        return math.comb(n, k) * p**k * (1 - p) ** (n - k)
    return math.exp(_lcomb(n, k) + _xlogy(k, p) + _xlog1m(n - k, p))


def _binomial_support(args, exact):
    n = args[0]
    return [(k, _binomial_pmf(k, args, exact)) for k in range(n + 1)]


def _beta_binomial_pmf(value, args, exact):
    n, a, b = args
    k = _as_count(value)
    if k is None or not 0 <= k <= n:
        return 0
    if exact:
        return Fraction(math.comb(n, k)) * _rising(a, k) * _rising(b, n - k) / _rising(a + b, n)
    return math.exp(_lcomb(n, k) + _lbeta(k + a, n - k + b) - _lbeta(a, b))


def _beta_binomial_support(args, exact):
    n, a, b = args
    if not exact:
        return [(k, _beta_binomial_pmf(k, args, exact)) for k in range(n + 1)]
    ra, rb, den = _rising_list(a, n), _rising_list(b, n), _rising(a + b, n)
    return [(k, Fraction(math.comb(n, k)) * ra[k] * rb[n - k] / den) for k in range(n + 1)]


def _categorical_pmf(value, args, exact):
    (probs,) = args
    k = _as_count(value)
    if k is None or isinstance(value, bool) or not 0 <= k < len(probs):
        return 0
    return probs[k] / sum(probs)


def _categorical_support(args, exact):
    (probs,) = args
    total = sum(probs)
    return [(k, w / total) for k, w in enumerate(probs)]


def _uniform_draw_pmf(value, args, exact):
    (items,) = args
    key = _merge_key(value)
    return Fraction(sum(1 for x in items if _merge_key(x) == key), len(items))


def _uniform_draw_support(args, exact):
    (items,) = args
    return [(x, Fraction(1, len(items))) for x in items]


def _delta_pmf(value, args, exact):
    return 1 if _merge_key(value) == _merge_key(args[0]) else 0


def _delta_support(args, exact):
    return [(args[0], 1)]


def _poisson_pmf(value, args, exact):
    (rate,) = args
    k = _as_count(value)
    if k is None or k < 0:
        return 0
    if rate == 0:
        return 1 if k == 0 else 0
    return math.exp(k * math.log(rate) - float(rate) - math.lgamma(k + 1))


def _geometric_pmf(value, args, exact):
    (p,) = args
    k = _as_count(value)
    if k is None or k < 0:
        return 0
    if exact:
        return (1 - p) ** k * p
    return math.exp(_xlog1m(k, p) + _log(p))


def _negative_binomial_pmf(value, args, exact):
    r, p = args
    k = _as_count(value)
    if k is None or k < 0:
        return 0
    if exact and r.denominator == 1:
        return math.comb(k + int(r) - 1, k) * (1 - p) ** int(r) * p**k
    r, p = float(r), float(p)
    return math.exp(math.lgamma(k + r) - math.lgamma(k + 1) - math.lgamma(r) + _xlog1m(r, p) + _xlogy(k, p))


def _log_sigmoid(x: float) -> float:
    """log(1 / (1 + exp(-x))), accurate for large |x|."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _bool_logits_support(args, exact):
    (logit,) = args
    return [(True, math.exp(_log_sigmoid(logit))), (False, math.exp(_log_sigmoid(-logit)))]


def _bool_logits_pmf(value, args, exact):
    (logit,) = args
    if _bool_pmf(value, [1], exact) == 1:  # true (or 1)
        return math.exp(_log_sigmoid(logit))
    if _bool_pmf(value, [0], exact) == 1:  # false (or 0)
        return math.exp(_log_sigmoid(-logit))
    return 0


def _binomial_logits_pmf(value, args, exact):
    n, logit = args
    k = _as_count(value)
    if k is None or not 0 <= k <= n:
        return 0
    return math.exp(_lcomb(n, k) + k * _log_sigmoid(logit) + (n - k) * _log_sigmoid(-logit))


def _binomial_logits_support(args, exact):
    return [(k, _binomial_logits_pmf(k, args, exact)) for k in range(args[0] + 1)]


def _log_softmax(logits) -> list[float]:
    top = max(logits)
    lse = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - lse for x in logits]


def _categorical_logits_pmf(value, args, exact):
    (logits,) = args
    k = _as_count(value)
    if k is None or isinstance(value, bool) or not 0 <= k < len(logits):
        return 0
    return math.exp(_log_softmax(logits)[k])


def _categorical_logits_support(args, exact):
    return [(k, math.exp(lp)) for k, lp in enumerate(_log_softmax(args[0]))]


_MAX_MULTINOMIAL_SUPPORT = 100_000


def _multinomial_pmf(value, args, exact):
    n, probs = args
    if not isinstance(value, (list, tuple)) or len(value) != len(probs) or any(isinstance(v, bool) for v in value):
        return 0
    ks = [_as_count(v) for v in value]
    if any(k is None or k < 0 for k in ks) or sum(ks) != n:
        return 0
    total = sum(probs)
    if exact:
        p = Fraction(math.factorial(n))
        for k, w in zip(ks, probs):
            p = p / math.factorial(k) * (Fraction(w) / total) ** k
        return p
    lp = math.lgamma(n + 1)
    for k, w in zip(ks, probs):
        lp += _xlogy(k, w / total) - math.lgamma(k + 1)
    return math.exp(lp)


def _compositions(n: int, parts: int):
    """Every list of ``parts`` non-negative ints summing to n (lexicographically descending)."""
    if parts == 1:
        yield [n]
        return
    for first in range(n, -1, -1):
        for rest in _compositions(n - first, parts - 1):
            yield [first] + rest


def _multinomial_support(args, exact):
    n, probs = args
    used = [i for i, w in enumerate(probs) if w != 0]  # categories of probability 0 stay at 0
    size = math.comb(n + len(used) - 1, len(used) - 1)
    if size > _MAX_MULTINOMIAL_SUPPORT:
        raise PPLRuntimeError(
            f"multinomial({n}, ...) over {len(used)} categories has {size} outcomes: too many to enumerate "
            f"(at most {_MAX_MULTINOMIAL_SUPPORT})",
            hint="use importance sampling, SMC or MH for this model")
    out = []
    for comp in _compositions(n, len(used)):
        value = [0] * len(probs)
        for i, k in zip(used, comp):
            value[i] = k
        out.append((value, _multinomial_pmf(value, args, exact)))
    return out


def _zip_pmf(value, args, exact):
    """Zero-inflated Poisson: gate [k = 0] + (1 - gate) Poisson(k; rate)."""
    rate, gate = args
    k = _as_count(value)
    if k is None or k < 0:
        return 0
    if rate == 0:  # the Poisson part is a point mass at 0: exact
        return 1 if k == 0 else 0
    pois = math.exp(k * math.log(rate) - float(rate) - math.lgamma(k + 1))
    return (float(gate) if k == 0 else 0.0) + (1 - float(gate)) * pois


# ----------------------------------------------------------------- cross-parameter checks


def _check_uniform(spec: DistSpec, low: torch.Tensor, high: torch.Tensor) -> None:
    if _DEFERRED.checks is not None:
        _DEFERRED.checks.append((low < high).all())
        return
    try:
        low, high = torch.broadcast_tensors(low, high)
    except RuntimeError:
        return  # reported by torch, translated in make
    bad = ~(low < high)
    if bool(bad.any()):
        got = f"low={_fmt(low[bad][0].item())}, high={_fmt(high[bad][0].item())}"
        raise spec._err("high", "must be greater than 'low'", got_text=got)


def _check_truncated_normal(spec: DistSpec, loc, scale, low, high) -> None:
    _check_uniform(spec, low, high)


def _one_int(spec_name: str, pname: str, t: torch.Tensor) -> int:
    """A parameter that torch needs as one Python int (lkj_cholesky's dim)."""
    flat = t.reshape(-1)
    if flat.numel() > 1 and not bool((flat == flat[0]).all()):
        raise PPLRuntimeError(f"{spec_name}: parameter '{pname}' must be the same for every particle "
                              f"(got {_fmt(flat[0].item())} and others)")
    return int(flat[0].item())


def _check_mv_normal(spec: DistSpec, mean: torch.Tensor, cov: torch.Tensor) -> None:
    k = mean.shape[-1]
    if cov.shape[-2:] != (k, k):
        raise spec._err("cov", f"must be a {k}x{k} matrix to match 'mean' (got shape {tuple(cov.shape[-2:])})")


# ----------------------------------------------------------------------------- registry

_R = "real"

def _continuous(name, params, cons, builder, doc, support_kind, defaults=None, ped=None, ved=0, tnames=None,
                cross=None):
    return DistSpec(
        name=name,
        params=tuple(params),
        defaults=dict(defaults or {}),
        param_event_dims=tuple(ped or (0,) * len(params)),
        value_event_dim=ved,
        discrete=False,
        value_dtype="float",
        doc=doc,
        support_kind=support_kind,
        _constraints=tuple(cons),
        _builder=builder,
        _torch_names=dict(tnames or {}),
        _cross_check=cross,
    )


def _discrete(name, params, cons, builder, doc, support_kind, value_dtype, pmf, support=None,
              defaults=None, ped=None, tnames=None, index_valued=False, exact_defaults=None, ved=0,
              variants=None):
    return DistSpec(
        name=name,
        params=tuple(params),
        defaults=dict(defaults or {}),
        param_event_dims=tuple(ped or (0,) * len(params)),
        value_event_dim=ved,
        keyword_variants=dict(variants or {}),
        discrete=True,
        value_dtype=value_dtype,
        doc=doc,
        support_kind=support_kind,
        index_valued=index_valued,
        _constraints=tuple(cons),
        _builder=builder,
        _torch_names=dict(tnames or {}),
        _pmf=pmf,
        _support=support,
        _exact_defaults=dict(exact_defaults or {}),
    )


# The logits parameterisations (``bernoulli(logits=x)``): specs of their own, reached only
# through the keyword (``DistSpec.keyword_variants``); their names are the distributions'
# names, so messages read "bernoulli: parameter 'logits' ...".
_BERNOULLI_LOGITS = _discrete(
    "bernoulli", ["logits"], [LOGIT], lambda logits: _build(pdist.Bernoulli, logits=logits),
    "true with probability sigmoid(logits), logits a finite real number", "boolean", "bool",
    _bool_logits_pmf, _bool_logits_support)
_BINOMIAL_LOGITS = _discrete(
    "binomial", ["n", "logits"], [NONNEG_INT, LOGIT],
    lambda n, logits: _build(pdist.Binomial, total_count=n, logits=logits),
    "number of successes in n >= 0 trials of success probability sigmoid(logits); values 0..n", "finite", "long",
    _binomial_logits_pmf, _binomial_logits_support, tnames={"total_count": "n"})
_CATEGORICAL_LOGITS = _discrete(
    "categorical", ["logits"], [LOGIT_VECTOR], lambda logits: _build(pdist.Categorical, logits=logits),
    "index 0..K-1 drawn with probability softmax(logits)[k]; logits real or -inf (probability 0)", "finite",
    "long", _categorical_logits_pmf, _categorical_logits_support, ped=(1,))

_SPECS = [
    # ---- continuous
    _continuous("normal", ["loc", "scale"], [REAL, POSITIVE],
                lambda loc, scale: _build(pdist.Normal, loc, scale),
                "Gaussian with mean loc and standard deviation scale > 0", _R),
    _continuous("lognormal", ["loc", "scale"], [REAL, POSITIVE],
                lambda loc, scale: _build(pdist.LogNormal, loc, scale),
                "exp of a normal(loc, scale): loc and scale > 0 are those of the log", "positive"),
    _continuous("half_normal", ["scale"], [POSITIVE],
                lambda scale: _build(pdist.HalfNormal, scale),
                "|normal(0, scale)|, scale > 0; values >= 0", "positive"),
    _continuous("student_t", ["df", "loc", "scale"], [POSITIVE, REAL, POSITIVE],
                lambda df, loc, scale: _build(pdist.StudentT, df, loc, scale),
                "Student's t with df > 0 degrees of freedom, location loc, scale > 0", _R,
                defaults={"loc": 0.0, "scale": 1.0}),
    _continuous("cauchy", ["loc", "scale"], [REAL, POSITIVE],
                lambda loc, scale: _build(pdist.Cauchy, loc, scale),
                "Cauchy with median loc and half-width scale > 0", _R),
    _continuous("laplace", ["loc", "scale"], [REAL, POSITIVE],
                lambda loc, scale: _build(pdist.Laplace, loc, scale),
                "Laplace (double exponential) with mean loc and scale > 0 (variance 2 scale^2)", _R),
    _continuous("uniform", ["low", "high"], [REAL, REAL],
                lambda low, high: _build(pdist.Uniform, low, high),
                "uniform on [low, high), low < high", "interval", cross=_check_uniform),
    _continuous("beta", ["a", "b"], [POSITIVE, POSITIVE],
                lambda a, b: _build(pdist.Beta, a, b),
                "Beta(a, b) on [0, 1], a, b > 0, mean a / (a + b)", "unit_interval",
                tnames={"concentration1": "a", "concentration0": "b"}),
    _continuous("gamma", ["shape", "rate"], [POSITIVE, POSITIVE],
                lambda shape, rate: _build(pdist.Gamma, shape, rate),
                "Gamma with shape > 0 and rate > 0 (mean shape / rate)", "positive",
                tnames={"concentration": "shape"}),
    _continuous("inverse_gamma", ["shape", "rate"], [POSITIVE, POSITIVE],
                lambda shape, rate: _build(pdist.InverseGamma, shape, rate),
                "1 / gamma(shape, rate): shape > 0, rate > 0 (mean rate / (shape - 1))", "positive",
                tnames={"concentration": "shape"}),
    _continuous("exponential", ["rate"], [POSITIVE],
                lambda rate: _build(pdist.Exponential, rate),
                "exponential with rate > 0 (mean 1 / rate)", "positive"),
    _continuous("dirichlet", ["alpha"], [POSITIVE],
                lambda alpha: _build(pdist.Dirichlet, alpha),
                "Dirichlet over the simplex, concentration vector alpha > 0; values are vectors", "simplex",
                ped=(1,), ved=1, tnames={"concentration": "alpha"}),
    _continuous("mv_normal", ["mean", "cov"], [REAL, COV],
                lambda mean, cov: _build(pdist.MultivariateNormal, mean, covariance_matrix=cov),
                "multivariate Gaussian with mean vector and positive-definite covariance matrix cov", _R,
                ped=(1, 2), ved=1, tnames={"loc": "mean", "covariance_matrix": "cov"}, cross=_check_mv_normal),
    _continuous("half_cauchy", ["scale"], [POSITIVE],
                lambda scale: _build(pdist.HalfCauchy, scale),
                "|cauchy(0, scale)|, scale > 0; values >= 0", "positive"),
    _continuous("half_student_t", ["df", "scale"], [POSITIVE, POSITIVE],
                lambda df, scale: _build(_dc.HalfStudentT, df, scale),
                "|student_t(df, 0, scale)|, df > 0, scale > 0; values >= 0", "positive",
                defaults={"scale": 1.0}),
    _continuous("truncated_normal", ["loc", "scale", "low", "high"], [REAL, POSITIVE, EXTENDED_REAL, EXTENDED_REAL],
                lambda loc, scale, low, high: _build(_dc.TruncatedNormal, loc, scale, low, high),
                "normal(loc, scale) restricted to [low, high], low < high (either may be -inf / inf), "
                "renormalised", "interval", cross=_check_truncated_normal),
    _continuous("lkj_cholesky", ["dim", "concentration"], [DIM, POSITIVE],
                lambda dim, conc: _build(_dc.LKJCholesky, _one_int("lkj_cholesky", "dim", dim), conc),
                "Cholesky factor of a dim x dim correlation matrix with density proportional to "
                "det(R)^(concentration - 1), dim >= 2, concentration > 0 (default 1: uniform over correlations)",
                "corr_cholesky", defaults={"concentration": 1.0}, ved=2),
    _continuous("von_mises", ["loc", "concentration"], [REAL, POSITIVE],
                lambda loc, conc: _build(_dc.VonMises, loc, conc),
                "circular normal: angles in [-pi, pi] around loc, concentration > 0", "interval"),
    _continuous("weibull", ["scale", "concentration"], [POSITIVE, POSITIVE],
                lambda scale, conc: _build(pdist.Weibull, scale, conc),
                "Weibull with scale > 0 and shape concentration > 0 (torch's order): "
                "density (k/s) (x/s)^(k-1) exp(-(x/s)^k), x > 0", "positive"),
    _continuous("pareto", ["scale", "alpha"], [POSITIVE, POSITIVE],
                lambda scale, alpha: _build(pdist.Pareto, scale, alpha),
                "Pareto with minimum scale > 0 and tail index alpha > 0: density alpha scale^alpha / "
                "x^(alpha+1), x >= scale", "lower_bounded"),
    _continuous("chi2", ["df"], [POSITIVE],
                lambda df: _build(pdist.Chi2, df),
                "chi-squared with df > 0 degrees of freedom (= gamma(df / 2, 1 / 2))", "positive"),
    # ---- discrete, finite support
    _discrete("bernoulli", ["p"], [UNIT],
              lambda p: _build(pdist.Bernoulli, probs=p),
              "true with probability p in [0, 1] (or bernoulli(logits=x): p = sigmoid(x))", "boolean", "bool",
              _bool_pmf, _bool_support, tnames={"probs": "p"}, variants={"logits": ("p", _BERNOULLI_LOGITS)}),
    _discrete("flip", ["p"], [UNIT],
              lambda p: _build(pdist.Bernoulli, probs=p),
              "a coin: true with probability p in [0, 1] (default 1/2); same as bernoulli", "boolean", "bool",
              _bool_pmf, _bool_support, defaults={"p": 0.5}, exact_defaults={"p": Fraction(1, 2)},
              tnames={"probs": "p"}),
    _discrete("binomial", ["n", "p"], [NONNEG_INT, UNIT],
              lambda n, p: _build(pdist.Binomial, total_count=n, probs=p),
              "number of successes in n >= 0 trials of success probability p (or binomial(n, logits=x): "
              "p = sigmoid(x)); values 0..n", "finite", "long",
              _binomial_pmf, _binomial_support, tnames={"total_count": "n", "probs": "p"},
              variants={"logits": ("p", _BINOMIAL_LOGITS)}),
    _discrete("beta_binomial", ["n", "a", "b"], [NONNEG_INT, POSITIVE, POSITIVE],
              lambda n, a, b: _build(pdist.BetaBinomial, a, b, total_count=n),
              "binomial(n, p) with p ~ beta(a, b), a, b > 0; values 0..n", "finite", "long",
              _beta_binomial_pmf, _beta_binomial_support,
              tnames={"total_count": "n", "concentration1": "a", "concentration0": "b"}),
    _discrete("categorical", ["probs"], [PROB_VECTOR],
              _b_categorical,
              "index 0..K-1 drawn with probability proportional to the non-negative weights probs (or "
              "categorical(logits=v): softmax(v))", "finite",
              "long", _categorical_pmf, _categorical_support, ped=(1,), tnames={"probs": "probs"},
              variants={"logits": ("probs", _CATEGORICAL_LOGITS)}),
    _discrete("uniform_draw", ["items"], [ITEMS],
              _b_uniform_draw,
              "an element of the non-empty list items, each position equally likely", "finite", "long",
              _uniform_draw_pmf, _uniform_draw_support, ped=(1,), index_valued=True),
    _discrete("multinomial", ["n", "probs"], [NONNEG_INT, PROB_VECTOR],
              lambda n, probs: _build(_dc.Multinomial, n, probs),
              "counts of n >= 0 draws over K categories with probabilities proportional to the non-negative "
              "weights probs: a vector of K counts summing to n", "finite", "long",
              _multinomial_pmf, _multinomial_support, ped=(0, 1), ved=1),
    _discrete("delta", ["value"], [POINT],
              lambda value: _build(pdist.Delta, value),
              "point mass: always value", "finite", "float", _delta_pmf, _delta_support),
    # ---- discrete, infinite support
    _discrete("poisson", ["rate"], [NONNEG],
              lambda rate: _build(pdist.Poisson, rate),
              "Poisson counts 0, 1, 2, ... with mean rate >= 0", "integer", "long", _poisson_pmf),
    _discrete("geometric", ["p"], [UNIT_POS],
              lambda p: _build(pdist.Geometric, probs=p),
              "number of failures before the first success, success probability p in (0, 1]; values 0, 1, 2, ...",
              "integer", "long", _geometric_pmf, tnames={"probs": "p"}),
    _discrete("negative_binomial", ["total_count", "p"], [POSITIVE, UNIT_HALF_OPEN],
              lambda r, p: _build(pdist.NegativeBinomial, r, probs=p),
              "number of successes (probability p in [0, 1)) before total_count > 0 failures (torch's "
              "convention): P(k) = C(k+r-1, k) (1-p)^r p^k", "integer", "long", _negative_binomial_pmf,
              tnames={"probs": "p"}),
    _discrete("zero_inflated_poisson", ["rate", "gate"], [NONNEG, UNIT],
              lambda rate, gate: _build(pdist.ZeroInflatedPoisson, rate, gate=gate),
              "0 with probability gate in [0, 1], else poisson(rate), rate >= 0; values 0, 1, 2, ...",
              "integer", "long", _zip_pmf),
]

DISTRIBUTIONS: dict[str, DistSpec] = {s.name: s for s in _SPECS}


def get(name: str) -> DistSpec:
    """The spec of a distribution; an unknown name is a PPLCheckError with a suggestion."""
    try:
        return DISTRIBUTIONS[name]
    except KeyError:
        raise PPLCheckError(
            f"unknown distribution '{name}'",
            hint=did_you_mean(name, DISTRIBUTIONS) or f"known distributions: {', '.join(sorted(DISTRIBUTIONS))}",
        ) from None


def names() -> list[str]:
    """The DSL names of all distributions, sorted."""
    return sorted(DISTRIBUTIONS)
