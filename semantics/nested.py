"""Nested inference: ``infer(thunk, method=..., particles=...)`` as a value of the DSL.

``d = infer(lambda: body())`` inside a model is the *marginal distribution* of the
thunk's return value under the thunk's own conditioning (WebPPL's ``Infer``): its
``observe``/``condition``/``factor`` statements normalise inside it and never reach the
outer model. ``d`` is a distribution (a ``MarginalDist``) usable with ``x ~ d``,
``observe v ~ d`` and ``sample(d)``, and it answers ``d.prob(x)``, ``d.log_prob(x)``,
``d.support()`` and ``d.mean()``.

Inner methods:

* ``"enumerate"`` (the default): every execution path of the thunk, by re-execution
  with ``semantics.exact``'s path handler; probabilities are ``Fraction``s when the
  thunk's are rational, so an outer exact enumeration over a model that calls ``infer``
  stays exact. Bounded by ``max_paths`` and ``max_seconds`` (errors naming them).
* ``"importance"`` / ``"smc"`` with ``particles=N``: likelihood weighting, or SMC with
  systematic resampling at every checkpoint all inner particles reach; the result is the
  *empirical* distribution of the N weighted return values. An outer result that uses it
  is a nested Monte Carlo estimate: for finite N it is biased (an ``observe`` under an
  empirical distribution scores the estimated probability, and values the inner
  particles never reached score zero), the bias vanishing as N grows. A
  ``PPLDiagnosticWarning`` says so once per call site.

The thunk runs as its own program: every value it reaches (its free variables, and those
of the functions it calls, transitively) is *captured*. A captured value that differs
between the outer particles (a batched value) splits the outer particles into groups of
equal captured values, and each distinct inner problem is solved once; the distribution
is then one table per particle (``PerParticle``), which ``x ~ d`` samples per particle.
A memoised function the thunk reaches is copied for the inner runs with the values the
outer particle has already computed (so ``strength("a")`` drawn outside is the same value
inside, as with WebPPL's ``mem``); arguments first met inside are drawn afresh on every
inner path and never reach the outer model. A captured value that carries a gradient
(a continuous choice under ``nuts``/``hmc``) is refused: the inner tables have no gradient.

Caching: results are kept per (thunk's code, captured values, method and options) on the
interpreter (so across the re-executions of an outer enumeration), at most
``CACHE_SIZE`` entries; sampling methods' results only within one seeded run (the run's
generator is part of their key). With ``listener = mem(lambda u: infer(lambda: ...))``
each distinct inner problem of a recursive RSA/pedagogy model is solved once, so its
cost grows polynomially with the recursion depth. ``stats(interp)`` counts the inner
problems solved and the cache hits.
"""
from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from fractions import Fraction
from typing import Any

import torch

from . import ir
from .dist_values import DistValue
from .errors import PPLDiagnosticWarning, PPLRuntimeError, ZeroEvidenceError, did_you_mean
from .exact import _PathHandler, _Pruned, _hashable as _exact_hashable
from .interpreter import Builtin, Closure, Frame, Interpreter, MemFn
from .lazy import Lazy
from .resampling import log_mean_exp, normalise_log_weights, resample
from .sampling import LikelihoodWeighting, Weighting, drive, prior
from .values import (Batched, Lineage, Particles, PerParticle, Vector, deep_batched, describe,
                     is_batched, lineage_scope, materialize, merge_parts, pack, rows, to_python,
                     to_vector)
from ..stdlib import rng

METHODS = ("enumerate", "importance", "smc")
DEFAULT_MAX_PATHS = 100_000
DEFAULT_MAX_SECONDS = 60.0
DEFAULT_PARTICLES = 1000
CACHE_SIZE = 10_000


# ------------------------------------------------------------------------ the result table
class Marginal:
    """One inner result: support values (plain Python, hashable) and their probabilities
    (``Fraction``s when exact, else floats), summing to 1."""

    __slots__ = ("values", "probs", "index", "method", "exact", "particles", "ess", "log_evidence")

    def __init__(self, weights: dict, method: str, *, particles=None, ess=None, log_evidence=None):
        total = sum(weights.values())
        self.values = list(weights)
        self.probs = [w / total for w in weights.values()]
        self.index = {v: i for i, v in enumerate(self.values)}
        self.method = method
        self.exact = all(isinstance(p, (int, Fraction)) for p in self.probs)
        self.particles, self.ess, self.log_evidence = particles, ess, log_evidence

    def prob(self, value):
        """P(value) (0 outside the support)."""
        i = self.index.get(_key_of_value(value))
        return 0 if i is None else self.probs[i]

    def mean(self):
        if not all(isinstance(v, (int, float, Fraction)) for v in self.values):
            raise PPLRuntimeError("mean(): the distribution's values are not all numbers",
                                  hint="support() lists them; prob(x) gives each one's probability")
        return sum(p * v for v, p in zip(self.values, self.probs))

    def __repr__(self):
        return f"Marginal({dict(zip(self.values, self.probs))})"


def _key_of_value(v):
    """A runtime value as a key of a ``Marginal`` (tensors and lists as tuples)."""
    if isinstance(v, torch.Tensor):
        v = v.item() if v.dim() == 0 else v.tolist()
    return _exact_hashable(to_python(v))


class _MarginalSpec:
    """What the semantics read off a distribution's spec, for ``MarginalDist``s: a finite,
    discrete, index-valued distribution (an observed list is one value, never a list of
    independent observations)."""

    name = "infer"
    params = ("marginal",)
    defaults: dict = {}
    param_event_dims = (0,)
    value_event_dim = 0
    discrete = True
    value_dtype = "float"
    doc = "the marginal distribution of a thunk's return value (nested inference)"
    support_kind = "finite"
    index_valued = True
    keyword_variants: dict = {}
    finite_support = True

    @staticmethod
    def exact_support(table):
        return list(zip(table.values, table.probs))

    @staticmethod
    def exact_prob(value, table):
        return table.prob(value)


MARGINAL_SPEC = _MarginalSpec()


class MarginalDist(DistValue):
    """The distribution ``infer(...)`` returns: one ``Marginal`` for every particle, or a
    ``PerParticle`` of them when the inner problem depended on the particle."""

    __slots__ = ()

    def __init__(self, table):
        super().__init__(MARGINAL_SPEC, (table,))

    @property
    def table(self):
        return self.args[0]

    def describe(self) -> str:
        return "distribution from infer()"

    @staticmethod
    def joined(per: PerParticle) -> "MarginalDist":
        """One distribution from a per-particle value holding a ``MarginalDist`` for each
        particle (the branches of an ``if``, a memoised function's groups)."""
        idx = per.idx
        tables = []
        for i, d in zip(idx.tolist(), per.items):
            t = d.table
            if isinstance(t, PerParticle):  # (its own per-particle tables: this particle's)
                t = dict(zip(t.idx.tolist(), t.items))[i]
            tables.append(t)
        return MarginalDist(PerParticle(tables, idx))

    def _tables(self, ctx: Particles) -> list:
        t = self.table
        return rows(t, ctx) if isinstance(t, PerParticle) else [t] * ctx.M

    def _groups(self, ctx: Particles):
        """[(table, particles)] of ctx sharing a table."""
        t = self.table
        if not isinstance(t, PerParticle):
            return [(t, ctx)]
        return ctx.split(rows(t, ctx), id)  # (a table is one object per inner problem)

    # ------------------------------------------------------------------ sampling semantics
    def sample(self, ctx: Particles, generator: torch.Generator | None = None):
        parts = []
        for tab, sub in self._groups(ctx):
            probs = torch.tensor([float(p) for p in tab.probs], dtype=torch.float64, device=ctx.device)
            k = torch.multinomial(probs, sub.M, replacement=True,
                                  generator=generator or rng.generator(ctx.device)).tolist()
            parts.append((sub.idx, _pack_values([tab.values[i] for i in k], sub)))
        return parts[0][1] if len(parts) == 1 else merge_parts(parts, ctx)

    def log_prob(self, value, ctx: Particles) -> torch.Tensor:
        """log P(value) per particle of ctx (float64, -inf outside the support): one
        comparison against the support for numeric values, else a look-up per distinct value."""
        if not deep_batched(value) and not isinstance(self.table, PerParticle):
            p = float(self.table.prob(value))
            return torch.full((ctx.M,), math.log(p) if p > 0 else -math.inf, dtype=torch.float64,
                              device=ctx.device)
        parts = []
        for tab, sub in self._groups(ctx):
            parts.append((sub.idx, Batched(_table_log_prob(tab, value, sub), sub.idx)))
        out = parts[0][1] if len(parts) == 1 else merge_parts(parts, ctx)
        return rows(out, ctx)

    def placeholder(self, ctx: Particles):
        tab = self._tables(ctx)[0] if ctx.M else None
        return None if tab is None else _pack_values([tab.values[0]] * ctx.M, ctx)

    def torch_dist(self, ctx: Particles):
        raise PPLRuntimeError("a distribution from infer() has no torch distribution",
                              hint="gradient-based methods (nuts, hmc) need continuous choices; use mh, smc or "
                                   "importance for models that sample from infer()")

    # --------------------------------------------------------------------- exact semantics
    def _one_table(self) -> Marginal:
        t = self.table
        if isinstance(t, PerParticle):
            raise PPLRuntimeError("exact enumeration received a per-particle distribution (internal error)")
        return t

    def python_args(self) -> list:
        return [self._one_table()]

    def exact_support(self):
        return MARGINAL_SPEC.exact_support(self._one_table())

    def exact_prob(self, value):
        return self._one_table().prob(value)

    # --------------------------------------------------------------------- DSL attributes
    def ppl_attribute(self, name: str):
        fn = _ATTRIBUTES.get(name)
        if fn is None:
            raise PPLRuntimeError(f"a distribution from infer() has no attribute '{name}'",
                                  hint=did_you_mean(name, _ATTRIBUTES) or f"it has {', '.join(_ATTRIBUTES)}")
        return Builtin(name, lambda ctx, *args: fn(self, ctx, *args), _ARITIES[name])


def _table_log_prob(tab: Marginal, value, ctx: Particles) -> torch.Tensor:
    """log P(value) under one table for the particles of ctx: a float64 tensor [M]."""
    if isinstance(value, Batched) and rows(value, ctx).dim() == 1 and \
            all(isinstance(v, (int, float, Fraction)) for v in tab.values):
        v = rows(value, ctx).to(torch.float64)
        support = torch.tensor([float(x) for x in tab.values], dtype=torch.float64, device=ctx.device)
        probs = torch.tensor([float(p) for p in tab.probs], dtype=torch.float64, device=ctx.device)
        p = ((v[:, None] == support[None, :]).to(torch.float64) * probs[None, :]).sum(1)
        return p.log()
    values = materialize(value, ctx) if deep_batched(value) else [value] * ctx.M
    seen: dict = {}
    out = []
    for v in values:
        k = _key_of_value(v)
        p = seen.get(k)
        if p is None:
            p = seen[k] = float(tab.prob(k))
        out.append(p)
    return torch.tensor(out, dtype=torch.float64, device=ctx.device).log()


def _pack_values(items: list, ctx: Particles):
    """Support values drawn for the particles of ctx as a runtime value: a tensor when
    they are numbers or truth values, else one Python object per particle."""
    if all(isinstance(x, bool) for x in items):
        return Batched(torch.tensor(items, dtype=torch.bool, device=ctx.device), ctx.idx)
    if all(isinstance(x, (int, float, Fraction)) and not isinstance(x, bool) for x in items):
        if all(isinstance(x, int) for x in items):
            return Batched(torch.tensor(items, dtype=torch.long, device=ctx.device), ctx.idx)
        return Batched(torch.tensor([float(x) for x in items], device=ctx.device), ctx.idx)
    return PerParticle([list(x) if type(x) is tuple else x for x in items], ctx.idx)


def _per_table(d: MarginalDist, ctx: Particles, one, args):
    """``one(table, *args)`` for each particle (a plain value when nothing is batched)."""
    if not isinstance(d.table, PerParticle) and not any(deep_batched(a) for a in args):
        return one(d.table, *args)
    cols = [materialize(a, ctx) if deep_batched(a) else [a] * ctx.M for a in args]
    out = [one(t, *[c[i] for c in cols]) for i, t in enumerate(d._tables(ctx))]
    return pack([float(x) if isinstance(x, Fraction) else x for x in out], ctx)


def _attr_prob(d, ctx, x):
    return _per_table(d, ctx, lambda t, v: t.prob(v), (x,))


def _attr_log_prob(d, ctx, x):
    def one(t, v):
        p = t.prob(v)
        return math.log(p) if p > 0 else -math.inf
    return _per_table(d, ctx, one, (x,))


def _attr_support(d, ctx):
    return _per_table(d, ctx, lambda t: [list(v) if type(v) is tuple else v for v in t.values], ())


def _attr_mean(d, ctx):
    return _per_table(d, ctx, lambda t: t.mean(), ())


_ATTRIBUTES = {"prob": _attr_prob, "log_prob": _attr_log_prob, "support": _attr_support, "mean": _attr_mean}
_ARITIES = {"prob": (1, 1), "log_prob": (1, 1), "support": (0, 0), "mean": (0, 0)}


# ---------------------------------------------------------------------------- the builtin
def infer_builtin(interp: Interpreter, ctx: Particles, fr, span, thunk=None, method="enumerate",
                  particles=None, max_paths=None, max_seconds=None):
    """``infer(thunk, method="enumerate", particles=N, max_paths=P, max_seconds=S)``: the
    prelude's higher-order builtin (a generator that yields no effect: the inner runs are
    driven here, and never reach the outer handler)."""
    opts = _options(thunk, method, particles, max_paths, max_seconds, span)
    cache = _cache(interp)
    groups = _groups(interp, thunk, ctx, span)
    parts = []
    for sub, values in groups:
        parts.append((sub, _solve(interp, thunk, values, opts, cache, fr, span)))
    if len(parts) == 1:
        return MarginalDist(parts[0][1])
    tables: list = [None] * ctx.M
    for sub, tab in parts:
        for pos in ctx.positions(sub.idx).tolist():
            tables[pos] = tab
    return MarginalDist(PerParticle(tables, ctx.idx))
    yield  # pragma: no cover  (a generator: called with ``yield from``)


def _options(thunk, method, particles, max_paths, max_seconds, span) -> tuple:
    if not isinstance(thunk, Closure):
        raise PPLRuntimeError(f"infer() expects a function of no arguments, got {describe(thunk)}", span,
                              "write `infer(lambda: model())`, with the model's code in a function")
    required = [p.name for p in thunk.params if p.default is None]
    if required:
        raise PPLRuntimeError(f"infer() calls its function with no arguments, but {thunk.describe()} needs "
                              f"{', '.join(required)}", span,
                              "bind the arguments in a lambda: `infer(lambda: speaker(state))`")
    if not isinstance(method, str) or method not in METHODS:
        raise PPLRuntimeError(f"infer(): unknown method {method!r}", span,
                              (did_you_mean(method, METHODS) + " " if isinstance(method, str) and
                               did_you_mean(method, METHODS) else "") + f"choose from: {', '.join(METHODS)}")
    if method == "enumerate":
        if particles is not None:
            raise PPLRuntimeError("infer(): particles= is for method='importance' or 'smc'", span,
                                  "exact enumeration visits every path; drop particles=")
        return (method, None, _count(max_paths, DEFAULT_MAX_PATHS, "max_paths", span),
                DEFAULT_MAX_SECONDS if max_seconds is None else _positive(max_seconds, "max_seconds", span))
    for name, given in (("max_paths", max_paths), ("max_seconds", max_seconds)):
        if given is not None:
            raise PPLRuntimeError(f"infer(): {name}= bounds method='enumerate', not {method!r}", span,
                                  "a sampling method's work is bounded by particles=")
    return (method, _count(particles, DEFAULT_PARTICLES, "particles", span), None, None)


def _count(v, default, name, span) -> int:
    if v is None:
        return default
    v = to_python(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise PPLRuntimeError(f"infer(): {name} must be a positive integer, got {v!r}", span)
    return v


def _positive(v, name, span) -> float:
    v = to_python(v)
    if isinstance(v, bool) or not isinstance(v, (int, float, Fraction)) or not v > 0:
        raise PPLRuntimeError(f"infer(): {name} must be a positive number, got {v!r}", span)
    return float(v)


# ------------------------------------------------------------------- captured values
def _is_global(frame) -> bool:
    return frame is None or frame.parent is None


def _lookup(env, name):
    """(value, whether it is a global) of ``name`` seen from ``env``, or None."""
    f = env
    while f is not None:
        if name in f.vars:
            return f.vars[name], f.parent is None
        f = f.parent
    return None


_NAMES_CACHE: dict = {}


def _names(body) -> tuple:
    """Every name a function body reads (nested functions included): a superset of its
    free variables (the interpreter reads a name not yet assigned from the enclosing
    frames, so a name assigned in the body may still be captured)."""
    hit = _NAMES_CACHE.get(id(body))
    if hit is not None and hit[0] is body:
        return hit[1]
    nodes = [body] if isinstance(body, ir.Expr) else list(body)
    names = set()
    for n in nodes:
        for node in ir.walk(n):
            if isinstance(node, ir.Var):
                names.add(node.name)
    out = tuple(sorted(names))
    if len(_NAMES_CACHE) > 4096:
        _NAMES_CACHE.clear()
    _NAMES_CACHE[id(body)] = (body, out)
    return out


def _captured(f: Closure) -> list:
    """(name, value) of each non-global value ``f`` reads from its frames."""
    out = []
    for name in _names(f.body):
        if any(p.name == name for p in f.params):
            continue
        hit = _lookup(f.env, name)
        if hit is not None and not hit[1]:
            out.append((name, hit[0]))
    return out


def _leaves(thunk: Closure) -> list:
    """The batched values reachable from the thunk (through closures and memoised
    functions it captures), each once."""
    seen, leaves, stack = set(), {}, [thunk]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, Closure):
            stack.extend(val for _, val in _captured(v))
        elif isinstance(v, MemFn):
            stack.append(v.fn)
            for key, entry in list(v.table.items()):
                memo = _MemoEntry(v, key, entry)
                leaves[id(memo)] = memo
        elif isinstance(v, MarginalDist):
            if isinstance(v.table, PerParticle):
                leaves[id(v.table)] = v.table
        elif deep_batched(v) or isinstance(v, Lazy):
            leaves[id(v)] = v
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, DistValue):
            stack.extend(v.args)
    return list(leaves.values())


class _MemoEntry:
    """One entry of a memoised function's table, as a per-particle value: (whether the
    particle has computed it, its value there). Inner runs start from the values the
    outer particle already has (as WebPPL's ``mem`` inside ``Infer``)."""

    __slots__ = ("memfn", "key", "mark", "value")

    def __init__(self, memfn, key, entry):
        self.memfn, self.key = memfn, key
        self.mark, self.value = entry

    def column(self, ctx: Particles) -> list:
        have = torch.zeros(ctx.N, dtype=torch.bool, device=ctx.device)
        have[self.mark.idx] = True
        covered = have[ctx.idx]
        out = [(False, None)] * ctx.M
        sub = ctx.subset(covered)
        if sub is not None:
            vals = materialize(self.value, sub) if is_batched(self.value) or deep_batched(self.value) \
                else [self.value] * sub.M
            for pos, v in zip(ctx.positions(sub.idx).tolist(), vals):
                out[pos] = (True, v)
        return out


def _refuse_gradients(leaves, ctx, span) -> None:
    """A captured value that carries a gradient (a continuous choice under nuts/hmc): the
    inner tables are numbers without gradients, so the potential's gradient would silently
    miss infer's dependence on it; an error instead."""
    for leaf in leaves:
        t = getattr(leaf, "t", None) if isinstance(leaf, Batched) else None
        if isinstance(t, torch.Tensor) and (t.requires_grad or type(t) is not torch.Tensor):
            raise PPLRuntimeError("infer() of a function that depends on a continuous choice cannot run under a "
                                  "gradient-based method: its distribution has no gradient", span,
                                  "use mh, smc, importance or tempering for this model, or pass the choice's "
                                  "value in data")


def _groups(interp, thunk, ctx: Particles, span=None) -> list:
    """[(particles, {id(leaf): its value for them})]: the particles of ctx grouped by the
    values of the batched values the thunk reaches."""
    leaves = _leaves(thunk)
    if not leaves:
        return [(ctx, {})]
    _refuse_gradients(leaves, ctx, span)
    cols = [_column(leaf, ctx, span) for leaf in leaves]
    keys = [tuple(_group_key(c[i]) for c in cols) for i in range(ctx.M)]
    out = []
    for key, sub in interp.split_by_key(keys, ctx):
        first = int(ctx.positions(sub.idx[:1])[0])
        out.append((sub, {_leaf_id(leaf): col[first] for leaf, col in zip(leaves, cols)}))
    return out


def _column(leaf, ctx: Particles, span) -> list:
    """The per-particle values of a captured leaf (a lazy value is made concrete, as any
    other use of it would)."""
    if isinstance(leaf, _MemoEntry):
        return leaf.column(ctx)
    if isinstance(leaf, Lazy):
        try:
            leaf = leaf.force(ctx, "as a value captured by infer()")
        except PPLRuntimeError as err:
            raise err.with_span(span)
    return materialize(leaf, ctx)


def _leaf_id(leaf):
    return ("memo", id(leaf.memfn), leaf.key) if isinstance(leaf, _MemoEntry) else id(leaf)


def _group_key(v):
    if isinstance(v, torch.Tensor):
        return ("t", tuple(v.shape), tuple(v.reshape(-1).tolist()))
    if isinstance(v, (list, tuple)):
        return tuple(_group_key(x) for x in v)
    if isinstance(v, Marginal):
        return ("m", id(v))
    try:
        hash(v)
        return v
    except TypeError:
        return ("id", id(v))


class _Freezer:
    """Copies of the closures a thunk reaches, with batched values replaced by one
    group's values and numbers converted for the inner semantics (exact or sampling);
    ``key`` is a hashable description of the copy (None when some value cannot be
    described safely), for the result cache."""

    def __init__(self, values: dict, exact: bool, device, inner_n: int = 1):
        self.values, self.exact, self.device, self.inner_n = values, exact, device, inner_n
        self.memo: dict = {}
        self.keys: dict = {}
        self.keep: list = []  # objects whose ids are in keys (kept alive with the cache entry)
        self.safe = True
        self.memo_tables: list = []  # (copied MemFn, its initial table)

    def closure(self, f: Closure) -> Closure:
        got = self.memo.get(id(f))
        if got is not None:
            return got
        env = Frame(_global_frame(f.env), None)
        copy = Closure(f.name, f.params, f.body, env, f.span)
        self.memo[id(f)] = copy
        self.keys[id(f)] = ("fn", id(f.body), "rec")  # a cycle refers back by code
        items = []
        for name, v in _captured(f):
            fv, kv = self.value(v)
            env.vars[name] = fv
            items.append((name, kv))
        self.keep.append(f.body)
        self.keys[id(f)] = ("fn", id(f.body), tuple(items))
        return copy

    def memo_fn(self, m: MemFn):
        """A fresh memoised function over the frozen function, holding the values the
        group's particle has already computed (``_MemoEntry``)."""
        got = self.memo.get(id(m))
        if got is not None:
            return got, self.keys[id(m)]
        copy = MemFn(None, m.name)
        self.memo[id(m)] = copy
        self.keys[id(m)] = ("mem", id(m), "rec")
        copy.fn, fk = self.value(m.fn)
        entries = []
        for key in list(m.table):
            have, v = self.values.get(("memo", id(m), key), (False, None))
            if have:
                fv, kv = self.value(v)
                mark = Batched(torch.ones(self.inner_n, dtype=torch.bool), torch.arange(self.inner_n))
                copy.table[key] = (mark, fv)
                entries.append((key, kv))
        self.keys[id(m)] = ("mem", fk, tuple(entries))
        self.memo_tables.append((copy, dict(copy.table)))
        return copy, self.keys[id(m)]

    def reset(self) -> None:
        """Every copied memoised function back to its initial table: each inner path (and
        each sampling run) draws its own values."""
        for copy, table in self.memo_tables:
            copy.table = dict(table)

    def value(self, v):
        """(the value for the inner run, its key)."""
        if isinstance(v, Closure):
            c = self.closure(v)
            return c, self.keys[id(v)]
        if isinstance(v, MemFn):
            return self.memo_fn(v)
        if isinstance(v, Builtin):
            return v, ("builtin", v.name, id(v))
        if isinstance(v, MarginalDist):
            tab = self.values[id(v.table)] if isinstance(v.table, PerParticle) else v.table
            self.keep.append(tab)
            return MarginalDist(tab), ("marginal", id(tab))
        if id(v) in self.values:
            v = self.values[id(v)]
        elif is_batched(v) or deep_batched(v):  # (a list holding per-particle values: its leaves)
            v = self._listed(v)
        return self._convert(v)

    def _listed(self, v):
        if id(v) in self.values:
            return self.values[id(v)]
        if isinstance(v, (list, tuple)):
            return type(v)(self._listed(x) for x in v)
        return v

    def _convert(self, v):
        if isinstance(v, torch.Tensor):
            if self.exact:
                py = v.item() if v.dim() == 0 else to_vector(v.tolist())
                return py, ("t", tuple(v.shape), tuple(v.reshape(-1).tolist()))
            return v, ("t", tuple(v.shape), str(v.dtype), tuple(v.reshape(-1).tolist()))
        if isinstance(v, Vector):
            key = ("v", tuple(v))
            return (v if self.exact else torch.tensor(to_python(v), device=self.device)), key
        if isinstance(v, Fraction) and not self.exact:
            return float(v), ("q", v)
        if isinstance(v, (list, tuple)):
            conv = [self.value(x) for x in v]
            return type(v)(c for c, _ in conv), (type(v).__name__, tuple(k for _, k in conv))
        if isinstance(v, DistValue):
            conv = [self.value(a) for a in v.args]
            return type(v)(v.spec, tuple(c for c, _ in conv), v.defaulted), \
                ("dist", v.spec.name, tuple(k for _, k in conv))
        try:
            hash(v)
            return v, ("c", type(v).__name__, v)
        except TypeError:
            self.safe = False
            return v, None


def _global_frame(env):
    f = env
    while f.parent is not None:
        f = f.parent
    return f


# --------------------------------------------------------------------------- solving
class _Stats:
    __slots__ = ("solved", "hits")

    def __init__(self):
        self.solved, self.hits = 0, 0


def _cache(interp) -> dict:
    cache = getattr(interp, "_nested_cache", None)
    if cache is None:
        cache = interp._nested_cache = {}
        interp._nested_stats = _Stats()
    return cache


def stats(interp) -> tuple[int, int]:
    """(inner problems solved, cache hits) of ``infer`` calls run by ``interp``."""
    s = getattr(interp, "_nested_stats", None)
    return (0, 0) if s is None else (s.solved, s.hits)


def _inner_interpreter(interp: Interpreter, exact: bool) -> Interpreter:
    """An interpreter of the same program in the wanted semantics (``interp`` itself when
    it already is one; a twin sharing its cache otherwise)."""
    if interp.exact == exact:
        return interp
    twins = getattr(interp, "_nested_twins", None)
    if twins is None:
        twins = interp._nested_twins = {}
    twin = twins.get(exact)
    if twin is None:
        builtins = {k: v for k, v in interp.globals.vars.items() if not isinstance(v, Closure)}
        twin = Interpreter(interp.program, builtins, exact=exact, max_depth=interp.max_depth,
                           max_iterations=interp.max_iterations)
        _cache(interp)
        twin._nested_cache, twin._nested_stats = interp._nested_cache, interp._nested_stats
        twin._nested_twins = {interp.exact: interp}
        twin._nested_warned = interp.__dict__.setdefault("_nested_warned", set())
        twins[exact] = twin
    return twin


def _solve(interp, thunk, values, opts, cache, fr, span) -> Marginal:
    method, particles, max_paths, max_seconds = opts
    exact = method == "enumerate"
    inner = _inner_interpreter(interp, exact)
    device = "cpu"
    freezer = _Freezer(values, exact, device, 1 if exact else particles)
    frozen = freezer.closure(thunk)
    key = None
    if freezer.safe:
        key = (freezer.keys[id(thunk)], opts)
        if not exact:
            gen = rng.generator(device)
            key = None if gen is None else key + (id(gen),)
            freezer.keep.append(gen)
    if key is not None:
        hit = cache.get(key)
        if hit is not None:
            interp._nested_stats.hits += 1
            return hit[0]
    depth = getattr(fr, "depth", 0)
    if exact:
        table = _enumerate(inner, frozen, depth, max_paths, max_seconds, span, freezer.reset)
    else:
        freezer.reset()
        table = _sample(inner, frozen, depth, method, particles, span)
        _warn_nested_estimate(interp, method, particles, span)
    interp._nested_stats.solved += 1
    if key is not None and CACHE_SIZE > 0:
        if len(cache) >= CACHE_SIZE:
            del cache[next(iter(cache))]
        cache[key] = (table, freezer.keep)
    return table


def _run_thunk(interp, thunk, ctx, depth, span):
    caller = Frame(None, ctx, "", depth)
    return interp.call_closure(thunk, [], {}, ctx, span, caller)


def _enumerate(interp, thunk, depth, max_paths, max_seconds, span, reset) -> Marginal:
    """Every path of the thunk (``semantics.exact``'s re-execution), normalised."""
    ctx = Particles.all(1)
    stack: list = [[]]
    weights: dict = {}
    cuts: Counter = Counter()
    visited, start = 0, time.monotonic()
    while stack:
        prefix = stack.pop()
        visited += 1
        if visited > max_paths:
            raise PPLRuntimeError(f"infer(): the inner enumeration exceeded {max_paths:,} paths", span,
                                  "raise it with infer(..., max_paths=N), or use method='importance' or 'smc' "
                                  "with particles=N")
        if time.monotonic() - start > max_seconds:
            raise PPLRuntimeError(f"infer(): the inner enumeration ran longer than {max_seconds:g} s "
                                  f"({visited:,} paths)", span,
                                  "raise it with infer(..., max_seconds=S), or use method='importance'")
        h = _PathHandler(prefix)
        reset()
        try:
            ret = drive(_run_thunk(interp, thunk, ctx, depth, span), h)
            value = _result_value(ret, span)
            weights[value] = weights.get(value, 0) + h.weight
        except _Pruned as cut:
            cuts[cut.span] += 1
        for j in range(len(prefix), len(h.taken)):
            for alt in range(h.sizes[j] - 1, 0, -1):
                stack.append(h.taken[:j] + [alt])
    if not weights or sum(weights.values()) == 0:
        where = ", ".join(sp.location() for sp in cuts if sp is not None)
        raise ZeroEvidenceError("infer(): every path of the inner model has weight zero: its conditions/"
                                "observations are impossible", span,
                                (f"the paths were cut at {where}; " if where else "") +
                                "check the conditions inside the function given to infer()")
    return Marginal(weights, "enumerate")


def _result_value(ret, span):
    if ret is None:
        raise PPLRuntimeError("infer(): the function returned nothing (None)", span,
                              "the thunk's return value is what infer() gives the distribution of: "
                              "`return state`")
    if isinstance(ret, DistValue) or type(ret).__name__ == "ProposedDist":
        raise PPLRuntimeError("infer(): the function returned a distribution, not a value", span,
                              "draw from it inside: `infer(lambda: sample(flip(0.5)))`")
    return _exact_hashable(to_python(ret))


def _sample(interp, thunk, depth, method, particles, span) -> Marginal:
    """Likelihood weighting (``importance``) or SMC (``smc``: systematic resampling at
    each checkpoint all particles reach) of the thunk: the empirical distribution."""
    ctx = Particles.all(particles)
    with lineage_scope(Lineage(ctx.idx) if method == "smc" else None) as lineage:
        state = {"log_z": 0.0}
        if method == "smc":
            h = Weighting(particles, "cpu", choose=prior(), at_checkpoint=_resampler(lineage, state, span))
        else:
            h = LikelihoodWeighting(particles, "cpu")
        ret = drive(_run_thunk(interp, thunk, ctx, depth, span), h)
        values = materialize(ret, ctx)
        lw = h.log_weights
    w, log_total = normalise_log_weights(lw)
    if log_total == -math.inf:
        raise ZeroEvidenceError(f"infer(): every one of the {particles} inner particles has weight zero", span,
                                "the inner conditions may be impossible, or too unlikely for that many particles: "
                                "raise particles=")
    weights: dict = {}
    for v, wi in zip(values, w.tolist()):
        if wi > 0:
            k = _result_value(v, span)
            weights[k] = weights.get(k, 0.0) + wi
    ess = float(1.0 / (w * w).sum())
    return Marginal(weights, method, particles=particles, ess=ess,
                    log_evidence=state["log_z"] + log_mean_exp(lw))


def _resampler(lineage, state, span):
    def rule(h, eff):
        if eff.ctx.idx.shape[0] != h.log_weights.shape[0]:
            return  # not every particle is here: not a synchronisation point
        lw = h.log_weights
        lme = log_mean_exp(lw)
        if lme == -math.inf:
            raise ZeroEvidenceError("infer(): every inner particle has weight zero at this checkpoint", eff.span,
                                    "the inner conditions may be impossible, or too unlikely: raise particles=")
        state["log_z"] += lme
        lineage.resample(resample(lw, "systematic"))
        h.log_weights = torch.zeros_like(lw)
    return rule


def _warn_nested_estimate(interp, method, particles, span) -> None:
    """A ``PPLDiagnosticWarning``, once per call site and interpreter (one per run of a
    model), that a result using a sampled inner distribution is an estimate."""
    warned = getattr(interp, "_nested_warned", None)
    if warned is None:
        warned = interp._nested_warned = set()
    where = span.location() if span is not None else "infer()"
    if where in warned:
        return
    warned.add(where)
    warnings.warn(
        f"{where}: infer(method={method!r}, particles={particles}) is an empirical distribution: a result "
        "computed with it (also by exact enumeration) is a nested Monte Carlo estimate, biased for finite "
        "particles (values the inner particles never reached have probability 0); use method='enumerate' "
        "where the inner model is finite",
        PPLDiagnosticWarning, stacklevel=2)
