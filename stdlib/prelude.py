"""The prelude: the functions and constants every model sees.

Each function has per-particle semantics: given batched arguments it computes, for each
particle, what it would compute for that particle alone, in one tensor operation where
it can. Python scalars stay Python scalars (so exact enumeration keeps its Fractions);
functions that are not rational (exp, log, ...) return floats.

Higher-order functions (map, filter, fold) call back into the model, so they are
generators driven by the interpreter; every call they make is addressed with the
element's index (``map`` of a sampling lambda gives ``lambda[0]/x``, ``lambda[1]/x``, ...).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch

from ..semantics import limits
from ..semantics.dist_values import DistValue
from ..semantics.errors import PPLRuntimeError, did_you_mean
from ..semantics.interpreter import Builtin, Closure, MemFn, RaggedRange, _int_index
from ..semantics.lazy import Lazy
from ..semantics.values import _align_ranks  # the per-particle broadcasting of binop
from ..semantics.values import _no_broadcast  # binop's error when shapes do not broadcast
from ..semantics.values import (Batched, PerParticle, Vector, as_tensor, batch_rows, binop, describe,
                                is_batched, is_numeric, materialize, pack, per_particle, rows,
                                to_bool_rows, boolop_or, to_vector, truthy, vector_apply, vector_map)
from . import distributions as _dists
from . import printing as _printing


def _has_batched(x) -> bool:
    return is_batched(x) or (isinstance(x, (list, tuple)) and any(_has_batched(y) for y in x))


def _float_tensor(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


# --------------------------------------------------------------------------- elementwise
def _unary(name: str, tf, pf):
    """A math function: torch op on tensors/batches, Python op on scalars."""
    def fn(ctx, x):
        if isinstance(x, Batched):
            return Batched(tf(_float_tensor(rows(x, ctx))), ctx.idx)
        if isinstance(x, torch.Tensor):
            return tf(_float_tensor(x))
        if isinstance(x, PerParticle):
            return per_particle(lambda v: fn(ctx, v), (x,), ctx)
        if isinstance(x, (list, tuple)):
            t = batch_rows(x, ctx) if _has_batched(x) else as_tensor(x, ctx.device)
            out = tf(_float_tensor(t))
            return Batched(out, ctx.idx) if _has_batched(x) else out
        if isinstance(x, (int, float, Fraction)):
            try:
                return pf(x)
            except (ValueError, OverflowError, ZeroDivisionError):
                return float(tf(torch.tensor(float(x), dtype=torch.float64)))
        raise PPLRuntimeError(f"{name}() expects a number, got {describe(x)}")
    return Builtin(name, fn, (1, 1))


def _sigmoid(x):
    x = float(x)
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _logit(p):
    p = float(p)
    return math.log(p) - math.log1p(-p)


_UNARY = {
    "exp": (torch.exp, lambda x: math.exp(x)),
    "log": (torch.log, lambda x: math.log(x) if x > 0 else (-math.inf if x == 0 else math.nan)),
    "log1p": (torch.log1p, lambda x: math.log1p(x)),
    "expm1": (torch.expm1, lambda x: math.expm1(x)),
    "sqrt": (torch.sqrt, lambda x: math.sqrt(x)),
    "sin": (torch.sin, math.sin), "cos": (torch.cos, math.cos), "tan": (torch.tan, math.tan),
    "tanh": (torch.tanh, math.tanh), "atan": (torch.atan, math.atan),
    "sigmoid": (torch.sigmoid, _sigmoid), "logit": (torch.logit, _logit),
    "lgamma": (torch.lgamma, math.lgamma),
}


def _int_if_bool(t: torch.Tensor) -> torch.Tensor:
    """A bool tensor as 0/1 ints (abs(True) is 1, as in Python and the exact semantics)."""
    return t.long() if t.dtype == torch.bool else t


def _abs(ctx, x):
    if isinstance(x, Batched):
        return Batched(_int_if_bool(rows(x, ctx)).abs(), ctx.idx)
    if isinstance(x, torch.Tensor):
        return _int_if_bool(x).abs()
    if isinstance(x, PerParticle):
        return per_particle(abs, (x,), ctx)
    if isinstance(x, Vector):
        return vector_map(abs, x)
    try:
        return abs(x)
    except TypeError:
        raise PPLRuntimeError(f"abs() expects a number or a vector, got {describe(x)}") from None


def _rounding(name, tf, pf):
    def fn(ctx, x):
        if isinstance(x, Batched):
            return Batched(tf(_int_if_bool(rows(x, ctx))).long(), ctx.idx)
        if isinstance(x, torch.Tensor):
            return tf(_int_if_bool(x)).long()
        if isinstance(x, PerParticle):
            return per_particle(pf, (x,), ctx)
        if isinstance(x, Vector):
            return vector_map(pf, x)
        return pf(x)
    return Builtin(name, fn, (1, 1))


# ---------------------------------------------------------------------------- reductions
def _reduce_binary(op: str, tf):
    """min/max: of several arguments, or of one list/vector."""
    def fn(ctx, *args):
        if not args:
            raise PPLRuntimeError(f"{'max' if op == '>' else 'min'}() needs at least one argument")
        if len(args) == 1:
            x = args[0]
            if isinstance(x, Batched):
                t = rows(x, ctx)
                if t.dim() < 2:
                    raise PPLRuntimeError("expected a list or vector")
                return Batched(getattr(t.flatten(1), "amax" if op == ">" else "amin")(1), ctx.idx)
            if isinstance(x, torch.Tensor):
                return x.max() if op == ">" else x.min()
            if isinstance(x, PerParticle):
                return per_particle(max if op == ">" else min, (x,), ctx)
            if isinstance(x, Vector):
                x = x.flat()
            if isinstance(x, (list, tuple)):
                if not x:
                    raise PPLRuntimeError("min()/max() of an empty list")
                args = tuple(x)
            else:
                raise PPLRuntimeError(f"expected a list, got {describe(x)}")
        out = args[0]
        pick = (lambda x, y: y if (y > x if op == ">" else y < x) else x)
        for y in args[1:]:
            if (isinstance(out, Vector) or isinstance(y, Vector)) and not _has_batched(out) \
                    and not _has_batched(y) and not isinstance(out, torch.Tensor) and not isinstance(y, torch.Tensor):
                out = vector_apply(pick, out, y, "max" if op == ">" else "min")  # elementwise, as for tensors
            elif not _has_batched(out) and not _has_batched(y) and not isinstance(out, torch.Tensor) \
                    and not isinstance(y, torch.Tensor):
                out = pick(out, y)
            elif (is_numeric(out) and is_numeric(y)) or (_numbers(out) and _numbers(y) and
                                                          (_is_vector(out) or _is_vector(y))):
                # elementwise, per particle (a list literal of numbers next to a vector is one)
                out = _elementwise_rows(tf, out, y, ctx, "max" if op == ">" else "min")
            else:
                out = per_particle(max if op == ">" else min, (out, y), ctx)
        return out
    return fn


def _numbers(v) -> bool:
    """A number, a tensor, a per-particle tensor, or a list of those."""
    return is_numeric(v) or (isinstance(v, (list, tuple)) and all(_numbers(x) for x in v))


def _elementwise_rows(tf, a, b, ctx, name: str) -> Batched:
    """tf(a, b) for each particle, one's shapes broadcast as they would be for one particle."""
    ta, tb = _promote2(batch_rows(a, ctx), batch_rows(b, ctx))
    ta, tb = _align_ranks(ta, tb, True, True)
    try:
        return Batched(tf(ta, tb), ctx.idx)
    except RuntimeError:
        raise _no_broadcast(name, list(ta.shape[1:]), list(tb.shape[1:])) from None


def _promote2(a, b):
    dt = torch.promote_types(a.dtype, b.dtype)
    return a.to(dt), b.to(dt)


def _sum(ctx, xs, start=0):
    if isinstance(xs, Batched):
        t = rows(xs, ctx)
        if t.dim() < 2:
            raise PPLRuntimeError("sum() expects a list or vector, got a number")
        return _plus_start(Batched(t.flatten(1).sum(1), ctx.idx), start, ctx)
    if isinstance(xs, torch.Tensor):
        return _plus_start(xs.sum(), start, ctx)
    if isinstance(xs, PerParticle):
        return per_particle(lambda v: sum(v, start), (xs,), ctx)
    if isinstance(xs, Vector):  # all its numbers, as a tensor's .sum()
        xs = xs.flat()
    if isinstance(xs, range):  # in closed form: a range may be far too long to walk
        n = len(xs)
        return binop("+", start, n * (xs[0] + xs[-1]) // 2 if n else 0, ctx)
    if isinstance(xs, (list, tuple)):
        if _has_batched(xs) and all(is_numeric(x) for x in xs) and xs:
            t = batch_rows(list(xs), ctx)
            return Batched(t.sum(1) + (start if start else 0), ctx.idx)
        out = start
        for x in xs:
            out = binop("+", out, x, ctx)
        return out
    raise PPLRuntimeError(f"sum() expects a list, got {describe(xs)}")


def _plus_start(total, start, ctx):
    """sum(xs, start) of a vector: its total plus start."""
    return total if isinstance(start, int) and not isinstance(start, bool) and start == 0 else \
        binop("+", start, total, ctx)


def _prod(ctx, xs):
    """The product of all the numbers of a list or vector (of a matrix too, like sum)."""
    out = 1
    for x in _static_items(ctx, _flat_vector(ctx, xs), "prod"):
        out = binop("*", out, x, ctx)
    return out


def _flat_vector(ctx, xs):
    """A vector (tensor, per-particle tensor, Vector) as one dimension; anything else as is."""
    if isinstance(xs, Vector):
        return xs.flat()
    if isinstance(xs, torch.Tensor) and xs.dim() >= 2:
        return xs.flatten()
    if isinstance(xs, Batched) and xs.t.dim() >= 3:
        return Batched(rows(xs, ctx).flatten(1), ctx.idx)
    return xs


def _mean(ctx, xs):
    """The mean of all the numbers of a list or vector (of a matrix: over every element)."""
    xs = _flat_vector(ctx, xs)
    return binop("/", _sum(ctx, xs), _len(ctx, xs), ctx)


def _vector(ctx, xs, name):
    """A list/vector argument as (tensor, batched?); a number is an error (softmax of a
    per-particle number would otherwise run across the particles)."""
    if isinstance(xs, Batched):
        t, batched = _float_tensor(rows(xs, ctx)), True
    elif isinstance(xs, (list, tuple)) and _has_batched(xs):
        t, batched = _float_tensor(batch_rows(list(xs), ctx)), True
    elif isinstance(xs, PerParticle):
        t, batched = _float_tensor(batch_rows(xs, ctx)), True
    else:
        try:
            t, batched = _float_tensor(as_tensor(xs, ctx.device)), False
        except PPLRuntimeError:
            raise PPLRuntimeError(f"{name}() expects a list of numbers, got {describe(xs)}") from None
    if t.dim() == int(batched):
        raise PPLRuntimeError(f"{name}() expects a list or vector of numbers, got a number")
    return t, batched


def _softmax(ctx, xs):
    if isinstance(xs, (list, tuple)) and not _has_batched(xs) and all(isinstance(x, (int, float, Fraction)) for x in xs):
        m = max(float(x) for x in xs)
        e = [math.exp(float(x) - m) for x in xs]
        z = sum(e)
        return Vector(v / z for v in e)  # a vector, as the tensor sampling returns
    t, b = _vector(ctx, xs, "softmax")
    out = torch.softmax(t, -1)
    return Batched(out, ctx.idx) if b else out


def _logsumexp(ctx, xs):
    if isinstance(xs, (list, tuple)) and not _has_batched(xs) and all(isinstance(x, (int, float, Fraction)) for x in xs):
        m = max(float(x) for x in xs)
        return m + math.log(sum(math.exp(float(x) - m) for x in xs)) if math.isfinite(m) else m
    t, b = _vector(ctx, xs, "logsumexp")
    out = torch.logsumexp(t, -1)
    return Batched(out, ctx.idx) if b else out


def _dot(ctx, a, b):
    """sum(a * b) of two vectors (or lists) of one length: never broadcast, never truncated.
    A matrix next to a vector is an error pointing to ``X @ beta`` (two matrices of one
    shape keep the meaning sum(a * b))."""
    sa, sb = _value_shape(a), _value_shape(b)
    if sa is not None and sb is not None and len(sa) != len(sb) and max(len(sa), len(sb)) >= 2:
        raise PPLRuntimeError(f"dot() of values of shapes {list(sa)} and {list(sb)}: dot(a, b) is for two vectors",
                              hint=_DOT_MATRIX_HINT)
    na, nb = _len(ctx, a), _len(ctx, b)
    if isinstance(na, int) and isinstance(nb, int) and na != nb:
        raise PPLRuntimeError(f"dot() of vectors of lengths {na} and {nb}",
                              hint="dot(a, b) needs vectors of one length" +
                              ("; " + _DOT_MATRIX_HINT if max(len(sa or ()), len(sb or ())) >= 2 else ""))
    vectors = any(_is_vector(v) for v in (a, b))
    return _sum(ctx, binop("*", a, b, ctx) if vectors or not isinstance(a, (list, tuple)) else
                [binop("*", x, y, ctx) for x, y in zip(a, b)])


_DOT_MATRIX_HINT = "for a matrix times a vector write X @ beta (matrix multiplication)"


def _value_shape(v):
    """One particle's shape of a numeric value (tensor, per-particle tensor, Vector, list
    of numbers or of lists of numbers), or None where it is not known cheaply."""
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, Batched):
        return tuple(v.t.shape[1:])
    if isinstance(v, Vector):
        return v.shape
    if isinstance(v, (list, tuple)) and v:
        inner = _value_shape(v[0]) if isinstance(v[0], (list, tuple, torch.Tensor, Batched)) else ()
        return None if inner is None else (len(v),) + inner
    return None


def _any_all(is_any: bool):
    def fn(ctx, xs):
        if isinstance(xs, Batched):
            t = rows(xs, ctx).flatten(1).bool()
            return Batched(t.any(1) if is_any else t.all(1), ctx.idx)
        if isinstance(xs, torch.Tensor):
            return bool(xs.bool().any() if is_any else xs.bool().all())
        if isinstance(xs, PerParticle):
            return per_particle(any if is_any else all, (xs,), ctx)
        items = list(_static_items(ctx, _flat_vector(ctx, xs), "any" if is_any else "all"))
        if not _has_batched(items):
            return any(bool(x) for x in items) if is_any else all(bool(x) for x in items)
        t = torch.stack([_as_bool_rows(x, ctx) for x in items], 1)
        return Batched(t.any(1) if is_any else t.all(1), ctx.idx)
    return fn


def _as_bool_rows(x, ctx):
    r = to_bool_rows(x, ctx)
    if isinstance(r, bool):
        return torch.full((ctx.M,), r, device=ctx.device)
    return r


# ---------------------------------------------------------------------- lists and ranges
def _static_items(ctx, xs, name):
    if isinstance(xs, (list, tuple)):
        return xs
    if isinstance(xs, torch.Tensor) and xs.dim() >= 1:
        return list(xs.unbind(0))
    if isinstance(xs, Batched) and xs.t.dim() >= 2:
        t = rows(xs, ctx)
        return [Batched(t[:, k], ctx.idx) for k in range(t.shape[1])]
    if isinstance(xs, range):
        limits.check_items(len(xs), f"{name}(): a list", limits.INT_ITEM_BYTES)
        return list(xs)
    if isinstance(xs, str):
        return list(xs)
    raise PPLRuntimeError(f"{name}() expects a list, got {describe(xs)}")


def _len(ctx, xs):
    if isinstance(xs, (list, tuple, str, range)):
        return len(xs)
    if isinstance(xs, torch.Tensor):
        if xs.dim() == 0:
            raise PPLRuntimeError("len() of a number")
        return xs.shape[0]
    if isinstance(xs, Batched):
        if xs.t.dim() < 2:
            raise PPLRuntimeError("len() of a number")
        return xs.t.shape[1]
    if isinstance(xs, PerParticle):
        return per_particle(len, (xs,), ctx)
    raise PPLRuntimeError(f"len() of {describe(xs)}")


def _range(ctx, *args):
    if not 1 <= len(args) <= 3:
        raise PPLRuntimeError("range() takes 1 to 3 arguments")
    if any(is_batched(a) for a in args):
        if len(args) == 3:
            raise PPLRuntimeError("range() with a step needs bounds that are the same for every particle")
        start, stop = (0, args[0]) if len(args) == 1 else args
        return RaggedRange(start, stop, ctx)
    bounds = [_int_index(a) for a in args]
    if any(not -2 ** 62 <= b < 2 ** 62 for b in bounds):
        raise PPLRuntimeError(f"range(): the bounds must be below 2 ** 62 in size (got {limits._short(max(bounds, key=abs))})")
    return range(*bounds)


def _list(ctx, xs=()):
    if isinstance(xs, PerParticle):
        return per_particle(list, (xs,), ctx)
    return list(_static_items(ctx, xs, "list"))


def _tuple(ctx, xs=()):
    if isinstance(xs, PerParticle):
        return per_particle(tuple, (xs,), ctx)
    return tuple(_static_items(ctx, xs, "tuple"))


def _zip(ctx, *lists):
    return [tuple(t) for t in zip(*[_static_items(ctx, x, "zip") for x in lists])]


def _enumerate(ctx, xs):
    return [(i, x) for i, x in enumerate(_static_items(ctx, xs, "enumerate"))]


def _reverse(ctx, xs):
    if isinstance(xs, PerParticle):
        return per_particle(lambda v: v[::-1], (xs,), ctx)
    return list(_static_items(ctx, xs, "reverse"))[::-1]


def _append(ctx, xs, x):
    """xs with x at its end: a list stays a list, a vector stays a vector."""
    if _is_vector(xs):
        return _concat_vectors(ctx, xs, [x])
    if isinstance(xs, PerParticle):
        return per_particle(lambda v, y: _concat_one(v, [y]), (xs, x), ctx)
    return list(_static_items(ctx, xs, "append")) + [x]


def _concat(ctx, a, b):
    """a followed by b. Never elementwise: with a vector among them (numeric data, a tensor,
    a per-particle tensor) the result is a vector, else a list (or a string)."""
    if _is_vector(a) or _is_vector(b):
        return _concat_vectors(ctx, a, b)
    if isinstance(a, PerParticle) or isinstance(b, PerParticle):
        return per_particle(_concat_one, (a, b), ctx)
    return binop("+", a, b, ctx)


def _concat_one(x, y):
    """One particle's concat: of tensors (a tensor among them) along the first dim, of
    lists, or of strings."""
    if isinstance(x, str) and isinstance(y, str):
        return x + y
    for v in (x, y):
        if not isinstance(v, (list, tuple, torch.Tensor)) or (isinstance(v, torch.Tensor) and v.dim() == 0):
            raise PPLRuntimeError(f"concat() expects two lists or vectors, got {describe(v)}",
                                  hint="append(xs, x) adds one element")
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        tx, ty = as_tensor(x, "cpu"), as_tensor(y, "cpu")
        if len(x) == 0 or len(y) == 0:
            return tx if len(y) == 0 else ty
        tx, ty = _concat_shapes(*_promote2(tx, ty.to(tx.device)), lead=0)
        return torch.cat([tx, ty])
    return list(x) + list(y)


def _is_vector(v) -> bool:
    """A value that is a vector (elementwise arithmetic): a tensor of at least one dim,
    a per-particle tensor of vectors, or an exact Vector."""
    return isinstance(v, Vector) or (isinstance(v, torch.Tensor) and v.dim() >= 1) or \
        (isinstance(v, Batched) and v.t.dim() >= 2)


def _concat_vectors(ctx, a, b):
    """Concatenation along the first dim, when one operand is a vector: Vectors in the
    exact semantics, tensors (per particle when either is) under sampling."""
    if isinstance(a, PerParticle) or isinstance(b, PerParticle):
        return per_particle(_concat_one, (a, b), ctx)
    for v in (a, b):
        if not isinstance(v, (list, tuple)) and not _is_vector(v):
            raise PPLRuntimeError(f"concat() expects two lists or vectors, got {describe(v)}",
                                  hint="append(xs, x) adds one element")
    if not any(_has_batched(v) or isinstance(v, torch.Tensor) for v in (a, b)):  # exact: Vectors
        va, vb = to_vector(a), to_vector(b)
        if len(va) and len(vb) and (va.shape[1:] != vb.shape[1:] or not va.shape or not vb.shape):
            raise _concat_shape_error(list(va.shape), list(vb.shape))
        return Vector(va + vb)
    if not any(_has_batched(v) for v in (a, b)):
        ta, tb = as_tensor(a, ctx.device), as_tensor(b, ctx.device)
        if len(a) == 0 or len(b) == 0:
            return ta if len(b) == 0 else tb
        return torch.cat(_concat_shapes(*_promote2(ta, tb), lead=0))
    ta, tb = batch_rows(a, ctx), batch_rows(b, ctx)
    return Batched(torch.cat(_concat_shapes(*_promote2(ta, tb), lead=1), dim=1), ctx.idx)


def _concat_shapes(ta, tb, lead: int):
    """The two tensors, checked to be concatenable (same item shape); ``lead`` particle dims."""
    if ta.dim() == lead or tb.dim() == lead or ta.shape[lead + 1:] != tb.shape[lead + 1:]:
        raise _concat_shape_error(list(ta.shape[lead:]), list(tb.shape[lead:]))
    return ta, tb


def _concat_shape_error(sa: list, sb: list) -> PPLRuntimeError:
    return PPLRuntimeError(f"concat() of values of shapes {sa} and {sb}: their items differ in shape",
                           hint="concatenated vectors need items of one shape")


def _convert(name, py, dtype):
    """int/float/bool/str. A vector converts elementwise (a tensor's ``.to(dtype)``, in
    every semantics); str of a vector is its numbers as a list, ``[1, 2]``."""
    def one(x):
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return x.to(dtype) if dtype is not None else _vector_str(x)
        if isinstance(x, torch.Tensor):
            x = x.item()
        try:
            if isinstance(x, Vector):
                return vector_map(py, x) if dtype is not None else _vector_str(x)
            return py(x) if dtype is not None else _vector_str(x)
        except (TypeError, ValueError, OverflowError):
            raise PPLRuntimeError(f"{name}() cannot convert {describe(x)}") from None

    def fn(ctx, x):
        if isinstance(x, Batched):
            return Batched(rows(x, ctx).to(dtype), ctx.idx) if dtype is not None else per_particle(one, (x,), ctx)
        if isinstance(x, PerParticle) or (dtype is None and _has_batched(x)):
            return per_particle(one, (x,), ctx)
        return one(x)
    return fn


def _vector_str(v, inner: bool = False) -> str:
    """str of a value, the same in every semantics: a vector (Vector or tensor) as the list
    of its numbers ("[1, 2]", "[[1, 2], [3, 4]]"), a Fraction as the float it stands for
    (exact 1/2 is 0.5 under sampling), lists and tuples as Python shows them."""
    if isinstance(v, torch.Tensor) and v.dim() == 0:
        v = v.item()
    if isinstance(v, (Vector, torch.Tensor)):
        return "[" + ", ".join(_vector_str(x, True) for x in v) + "]"
    if isinstance(v, Fraction):
        return str(float(v))
    if isinstance(v, list):
        return "[" + ", ".join(_vector_str(x, True) for x in v) + "]"
    if isinstance(v, tuple):
        return "(" + ", ".join(_vector_str(x, True) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v) if inner and isinstance(v, str) else str(v)


def _length(name, n) -> int:
    k = _int_index(n)
    if k < 0:
        raise PPLRuntimeError(f"{name}() needs a non-negative length, got {k}")
    return k


def _zeros(ctx, n):
    return torch.zeros(_tensor_length("zeros", n), device=ctx.device)


def _ones(ctx, n):
    return torch.ones(_tensor_length("ones", n), device=ctx.device)


def _tensor_length(name, n) -> int:
    """The length of a new vector, within the memory budget."""
    k = _length(name, n)
    limits.check_items(k, f"{name}(): a vector", torch.get_default_dtype().itemsize)
    return k


# ------------------------------------------------------------------------- higher order
def _map(interp, ctx, fr, span, f, xs, *more):
    lists = [xs, *more]
    if any(isinstance(x, PerParticle) for x in lists):
        return (yield from _ragged_apply(interp, ctx, fr, span, lists,
                                          lambda c, ls: _map(interp, c, fr, span, f, *ls)))
    items = [interp.iter_items(x, ctx, span) for x in lists]
    interp.check_iterations(min(len(x) for x in items), span, "map")
    out = []
    for i, args in enumerate(zip(*items)):
        fr.loops.append(i)
        try:
            out.append((yield from interp.call(f, list(args), {}, ctx, span, fr)))
        finally:
            fr.loops.pop()
    return out


def _filter(interp, ctx, fr, span, pred, xs):
    if isinstance(xs, PerParticle):
        return (yield from _ragged_apply(interp, ctx, fr, span, [xs],
                                          lambda c, ls: _filter(interp, c, fr, span, pred, *ls)))
    items = interp.iter_items(xs, ctx, span)
    interp.check_iterations(len(items), span, "filter")
    items = list(items)
    keep = []
    for i, x in enumerate(items):
        fr.loops.append(i)
        try:
            keep.append((yield from interp.call(pred, [x], {}, ctx, span, fr)))
        finally:
            fr.loops.pop()
    if not any(_has_batched(k) for k in keep) and not any(_has_batched(x) for x in items):
        return [x for x, k in zip(items, keep) if truthy(k)]  # (a vector is no truth value: an error)
    cols_items = [materialize(x, ctx) for x in items]
    cols_keep = [materialize(k, ctx) for k in keep]
    return pack([[cols_items[j][p] for j in range(len(items)) if truthy(cols_keep[j][p])] for p in range(ctx.M)],
                ctx) if items else []


def _fold(interp, ctx, fr, span, f, init, xs):
    """fold(f, init, xs) = f(...f(f(init, xs[0]), xs[1])..., xs[n-1])."""
    if isinstance(xs, PerParticle):
        return (yield from _ragged_apply(interp, ctx, fr, span, [xs],
                                          lambda c, ls: _fold(interp, c, fr, span, f, init, *ls)))
    acc = init
    items = interp.iter_items(xs, ctx, span)
    interp.check_iterations(len(items), span, "fold")
    for i, x in enumerate(items):
        fr.loops.append(i)
        try:
            acc = yield from interp.call(f, [acc, x], {}, ctx, span, fr)
        finally:
            fr.loops.pop()
    return acc


def _ragged_apply(interp, ctx, fr, span, lists, body):
    """Run ``body`` separately for each group of particles whose lists share lengths."""
    from ..semantics.values import merge_parts, restrict
    keys = list(zip(*[[len(v) for v in materialize(x, ctx)] if is_batched(x) else [len(x)] * ctx.M
                      for x in lists]))
    # within a group every list has one length: make it a list of per-particle elements
    parts = yield from interp.per_group(fr, interp.split_by_key(keys, ctx), lambda _, sub: body(
        sub, [interp.iter_items(restrict(x, sub), sub) if isinstance(x, PerParticle) else x for x in lists]))
    return merge_parts(parts, ctx)


def _sample(interp, ctx, fr, span, d, name="sample"):
    """``sample(d)``: a random choice as an expression (for lambdas), addressed by
    ``name`` in the calling frame."""
    from ..semantics.interpreter import SampleEffect, joined_distribution
    from ..semantics.dist_values import ProposedDist
    d = joined_distribution(d)  # (per-particle results of infer(): one distribution)
    if not isinstance(d, (DistValue, ProposedDist)):
        raise PPLRuntimeError(f"sample() expects a distribution, got {describe(d)}", span)
    if not isinstance(name, str):
        raise PPLRuntimeError("sample(): the name must be a string", span)
    v = yield SampleEffect(fr.address(name), d, ctx, span)
    yield from interp.mass_factor(d, v, fr, ctx, span)
    return v


def _twist(interp, ctx, fr, span, phi):
    """``twist(phi)``: set this particle's SMC potential to phi (see TwistEffect)."""
    from ..semantics.interpreter import TwistEffect
    yield TwistEffect(fr.address("twist"), phi, ctx, span)
    return None


def _propose(ctx, target, proposal):
    """``x ~ propose(target, proposal)``: x has distribution target; IS and SMC draw it
    from proposal with the weight correction target(x) / proposal(x)."""
    from ..semantics.dist_values import ProposedDist
    for d, what in ((target, "target"), (proposal, "proposal")):
        if not isinstance(d, DistValue):
            raise PPLRuntimeError(f"propose(): the {what} must be a distribution, got {describe(d)}",
                                  hint="x ~ propose(normal(a * x, q), normal(y, 1))")
    return ProposedDist(target, proposal)


def _infer(interp, ctx, fr, span, *args, **kwargs):
    """``infer(thunk, method="enumerate", particles=N, ...)``: nested inference, the
    marginal distribution of the thunk's return value (``semantics.nested``)."""
    from ..semantics.nested import infer_builtin
    return (yield from infer_builtin(interp, ctx, fr, span, *args, **kwargs))


def _mem(ctx, f):
    if not isinstance(f, (Closure, Builtin)):
        raise PPLRuntimeError(f"mem() expects a function, got {describe(f)}")
    return MemFn(f, f.name)


# ------------------------------------------------------------------------------ strings
def _string_fn(name: str, fn, nargs: tuple, strs: tuple = (0,)):
    """A string function: per particle when an argument differs between particles.
    ``strs``: the positions of the arguments that must be strings."""
    def one(*args):
        for i in strs:
            if i < len(args) and not isinstance(args[i], str):
                raise PPLRuntimeError(f"{name}() expects a string, got {describe(args[i])}")
        return fn(*args)

    def call(ctx, *args):
        if any(_has_batched(a) for a in args):
            return per_particle(one, args, ctx)
        return one(*args)
    return Builtin(name, call, nargs)


_REGEX: dict = {}


def _regex_engine():
    """The ``regex`` module (like ``re``, with a timeout per match), else ``re``."""
    try:
        import regex
        return regex, True
    except ImportError:  # pragma: no cover - regex is a dependency
        import re
        return re, False


def _regex(pattern: str):
    r = _REGEX.get(pattern)
    if r is None:
        bound = limits.current().max_regex_length
        if len(pattern) > bound:
            raise PPLRuntimeError(f"regular expression of {len(pattern):,} characters, longer than the limit "
                                  f"of {bound:,}", hint="use a shorter pattern, or contains()/startswith()")
        engine, _ = _regex_engine()
        try:
            r = engine.compile(pattern)
        except (engine.error, ValueError, OverflowError, RecursionError) as e:
            raise PPLRuntimeError(f"bad regular expression {limits._short(pattern)!r}: {e}") from None
        if len(_REGEX) < 1000:
            _REGEX[pattern] = r
    return r


def _regex_call(how: str, pattern: str, s: str) -> bool:
    """``re.fullmatch``/``re.search`` semantics, stopped after ``regex_timeout`` seconds
    (a pattern such as ``(a|aa)+$`` can take exponential time on some strings)."""
    r = _regex(pattern)
    _, has_timeout = _regex_engine()
    timeout = limits.current().regex_timeout
    try:
        if has_timeout:
            return getattr(r, how)(s, timeout=timeout) is not None
        return getattr(r, how)(s) is not None  # pragma: no cover
    except TimeoutError:
        raise PPLRuntimeError(f"regex_{'match' if how == 'fullmatch' else how} took more than {timeout:g} s "
                              f"(regex_timeout) for the pattern {limits._short(pattern)!r}",
                              hint="the pattern backtracks catastrophically on this text (nested repetition "
                              "such as (a+)+ or (a|aa)+); simplify it, or raise the limit with "
                              "ppl.set_limits(regex_timeout=...) / PPL_REGEX_TIMEOUT") from None


def _join(xs, sep=""):
    if not isinstance(xs, (list, tuple)) or not all(isinstance(x, str) for x in xs):
        raise PPLRuntimeError(f"join() expects a list of strings, got {describe(xs)}")
    if not isinstance(sep, str):
        raise PPLRuntimeError(f"join(): the separator must be a string, got {describe(sep)}")
    return sep.join(str(x) for x in xs)


def _string_builtins() -> dict:
    """String helpers (per particle on per-particle strings). ``regex_match`` is Python's
    ``re.fullmatch`` (the whole string), ``regex_search`` is ``re.search`` (anywhere);
    ``words`` and ``word_count`` split on whitespace; ``join(xs, sep="")``."""
    fns = {
        "startswith": (lambda s, p: s.startswith(p), (2, 2), (0, 1)),
        "endswith": (lambda s, p: s.endswith(p), (2, 2), (0, 1)),
        "contains": (lambda s, p: p in s, (2, 2), (0, 1)),
        "words": (lambda s: s.split(), (1, 1), (0,)),
        "word_count": (lambda s: len(s.split()), (1, 1), (0,)),
        "lower": (lambda s: s.lower(), (1, 1), (0,)),
        "upper": (lambda s: s.upper(), (1, 1), (0,)),
        "strip": (lambda s: s.strip(), (1, 1), (0,)),
        "regex_match": (lambda p, s: _regex_call("fullmatch", p, s), (2, 2), (0, 1)),
        "regex_search": (lambda p, s: _regex_call("search", p, s), (2, 2), (0, 1)),
        "join": (_join, (1, 2), ()),
    }
    return {name: _string_fn(name, fn, nargs, strs) for name, (fn, nargs, strs) in fns.items()}


def _toy_lm(ctx):
    from .lm.dsl import toy_lm_value
    return toy_lm_value()


def _toy_reward(ctx):
    from .lm.dsl import toy_reward_value
    return toy_reward_value()


# ------------------------------------------------------------------------ distributions
def _dist_builtin(spec) -> Builtin:
    names = spec.params
    required = sum(1 for n in names if n not in spec.defaults)

    n_params = len(names)
    nothing_defaulted = frozenset()

    def make(ctx, *args, **kwargs):
        if not kwargs and len(args) == n_params:  # every parameter given by position
            return DistValue(spec, args, nothing_defaulted)
        return _bind_dist(_dist_variant(spec, args, kwargs), args, kwargs)

    make.accepts_lazy = True  # lazy parameters (semantics.lazy) are kept as they are
    return Builtin(spec.name, make, (required, len(names)))


def _dist_variant(spec, args, kwargs):
    """The parameterisation a call selects: ``bernoulli(logits=x)`` is bernoulli's logits
    spec (``spec.keyword_variants``); giving both ``p`` and ``logits`` is an error."""
    for key, (replaced, variant) in spec.keyword_variants.items():
        if key in kwargs:
            if replaced in kwargs or len(args) > spec.params.index(replaced):
                raise PPLRuntimeError(f"{spec.name}() takes '{replaced}' or '{key}', not both",
                                      hint=f"{spec.name}({', '.join(variant.params)}) or "
                                           f"{spec.name}({', '.join(spec.params)})")
            return variant
    return spec


def bind_arguments(name, params, args, kwargs, *, noun="parameter", options=None) -> dict:
    """``{param: value}`` for a call ``name(*args, **kwargs)`` of a builtin taking ``params``
    (parameters not given are absent): too many positional arguments, an unknown keyword
    (hinted from ``options``, default ``params``) or a value given twice is an error."""
    if len(args) > len(params):
        raise PPLRuntimeError(f"{name}() takes at most {len(params)} arguments ({', '.join(params)}) "
                              f"but {len(args)} were given")
    bound = dict(zip(params, args))
    for k, v in kwargs.items():
        if k not in params:
            options = list(params) if options is None else options
            raise PPLRuntimeError(f"{name}() has no {noun} '{k}'", hint=did_you_mean(k, options)
                                  or f"its {noun}s are: {', '.join(options)}")
        if k in bound:
            raise PPLRuntimeError(f"{name}() got two values for '{k}'")
        bound[k] = v
    return bound


def _bind_dist(spec, args, kwargs) -> DistValue:
    """A distribution value from positional and keyword arguments (defaults filled in)."""
    names = spec.params
    bound = bind_arguments(spec.name, names, args, kwargs, options=list(names) + list(spec.keyword_variants))
    defaulted = set()
    for i, n in enumerate(names):
        if n not in bound:
            if n not in spec.defaults:
                raise PPLRuntimeError(f"{spec.name}() is missing the parameter '{n}'",
                                      hint=f"{spec.name}({', '.join(names)})")
            bound[n] = spec.defaults[n]
            defaulted.add(i)
    return DistValue(spec, tuple(bound[n] for n in names), frozenset(defaulted))


def _param(ctx, name, init, constraint="real"):
    raise PPLRuntimeError(f"param('{name}', ...) declares a learnable parameter of a guide program",
                          hint="a model cannot learn parameters; a function with param declarations is a guide "
                               "program: ppl.guide(model, data, program=its source)")


# --------------------------------------------------------------------------- print
def _print(ctx, *args):
    """``print(a, b, ...)``: the values, per particle for the first few particles, into
    the run's output (``stdlib.printing``: bounded, labelled, silent outside a run).
    Returns None; reads values only (draws nothing, forces no lazy value)."""
    log = _printing.current()
    if log is None or log.silenced:
        return None
    try:
        lines = _print_lines(ctx, args, log)
    except Exception:  # noqa: BLE001 - a value that cannot be read here (a traced graph): never fail
        lines = ["<...>"]
    for text in lines:
        log.line(text)
    return None


_print.accepts_lazy = True  # a delayed/enumerated value is shown, never forced (no draw)


def _print_lines(ctx, args, log) -> list[str]:
    if log.in_path or not any(_has_batched(a) for a in args):
        text = " ".join(_shown(a) for a in args)
        if log.in_path:
            return [text]
        m = ctx.M
        return [f"[{log.unit} {int(ctx.idx[0])}] {text}" if m == 1 else f"[{m} {log.unit}s] {text}"]
    k = min(ctx.M, log.max_particles)
    indices = ctx.idx[:k].tolist()
    per_arg = [_first_rows(a, ctx, k) for a in args]
    lines = [f"[{log.unit} {i}] " + " ".join(_shown(row[j]) for row in per_arg) for j, i in enumerate(indices)]
    if ctx.M > k:
        lines.append(f"... ({ctx.M - k} more {log.unit}s)")
    return lines


def _first_rows(v, ctx, k: int) -> list:
    """The values of the first ``k`` particles of ``ctx`` in ``v``."""
    if is_batched(v):
        r = rows(v, ctx)
        return [r[j] for j in range(k)]
    if isinstance(v, (list, tuple)) and _has_batched(v):
        columns = [_first_rows(e, ctx, k) for e in v]
        return [type(v)(c[j] for c in columns) for j in range(k)]
    return [v] * k


_PRINT_MAX_CHARS = 200


def _shown(v) -> str:
    """A short, readable text of a value (strings as they are)."""
    if isinstance(v, str):
        text = v
    elif isinstance(v, torch.Tensor):
        text = _shown(v.detach().cpu().tolist()) if v.dim() else _shown(v.item())
    elif isinstance(v, bool) or v is None:
        text = str(v)
    elif isinstance(v, float):
        text = f"{v:.6g}"
    elif isinstance(v, (int, Fraction)):
        text = str(v)
    elif isinstance(v, Vector):
        text = _shown(list(v))
    elif isinstance(v, list):
        text = "[" + ", ".join(_shown(e) for e in v) + "]"
    elif isinstance(v, tuple):
        text = "(" + ", ".join(_shown(e) for e in v) + ("," if len(v) == 1 else "") + ")"
    elif isinstance(v, DistValue):
        text = f"<distribution {v.spec.name}>"
    elif isinstance(v, Lazy):  # delayed sampling / an enumerated choice: printing must not draw it
        text = f"<{type(v).__name__}: not drawn yet>"
    else:
        text = f"<{type(v).__name__}>"
    return text if len(text) <= _PRINT_MAX_CHARS else text[:_PRINT_MAX_CHARS - 3] + "..."


# ---------------------------------------------------------------------------- the table
def builtins() -> dict[str, Any]:
    """name -> value of everything in the prelude: a new dict (callers may add to it) of
    ``Builtin`` objects made once per torch default dtype (``float`` converts to it) and
    shared, as they hold no state."""
    dtype = torch.get_default_dtype()
    table = _BUILTINS.get(dtype)
    if table is None:
        table = _BUILTINS[dtype] = _make_builtins()
    return dict(table)


#: torch default dtype -> the prelude's table (``builtins``)
_BUILTINS: dict = {}


def _make_builtins() -> dict[str, Any]:
    """``builtins`` made afresh."""
    out: dict[str, Any] = {}
    for name, (tf, pf) in _UNARY.items():
        out[name] = _unary(name, tf, pf)
    simple = {
        "abs": (_abs, (1, 1)), "floor": (None, None), "ceil": (None, None), "round": (None, None),
        "min": (_reduce_binary("<", torch.minimum), (1, None)),
        "max": (_reduce_binary(">", torch.maximum), (1, None)),
        "sum": (_sum, (1, 2)), "prod": (_prod, (1, 1)), "mean": (_mean, (1, 1)),
        "softmax": (_softmax, (1, 1)), "logsumexp": (_logsumexp, (1, 1)), "dot": (_dot, (2, 2)),
        "any": (_any_all(True), (1, 1)), "all": (_any_all(False), (1, 1)),
        "len": (_len, (1, 1)), "range": (_range, (1, 3)), "list": (_list, (0, 1)), "tuple": (_tuple, (0, 1)),
        "zip": (_zip, (1, None)), "enumerate": (_enumerate, (1, 1)), "reverse": (_reverse, (1, 1)),
        "append": (_append, (2, 2)), "concat": (_concat, (2, 2)),
        "int": (_convert("int", int, torch.long), (1, 1)),
        "float": (_convert("float", float, torch.get_default_dtype()), (1, 1)),
        "bool": (_convert("bool", bool, torch.bool), (1, 1)),
        "str": (_convert("str", str, None), (1, 1)),
        "zeros": (_zeros, (1, 1)), "ones": (_ones, (1, 1)), "mem": (_mem, (1, 1)),
    }
    for name, (fn, arity) in simple.items():
        if fn is not None:
            out[name] = Builtin(name, fn, arity)
    out["floor"] = _rounding("floor", torch.floor, math.floor)
    out["ceil"] = _rounding("ceil", torch.ceil, math.ceil)
    out["round"] = _rounding("round", torch.round, round)
    out["map"] = Builtin("map", _map, (2, None), higher_order=True)
    out["filter"] = Builtin("filter", _filter, (2, 2), higher_order=True)
    out["fold"] = Builtin("fold", _fold, (3, 3), higher_order=True)
    out["sample"] = Builtin("sample", _sample, (1, 2), higher_order=True)
    out["twist"] = Builtin("twist", _twist, (1, 1), higher_order=True)
    out["infer"] = Builtin("infer", _infer, (1, 5), higher_order=True)  # nested inference
    out["propose"] = Builtin("propose", _propose, (2, 2))
    out["param"] = Builtin("param", _param, (2, 3), pure=False)  # learnable; only in guide programs
    out["print"] = Builtin("print", _print, (0, None), pure=False)  # output only (stdlib.printing)
    out.update(_string_builtins())
    out["toy_lm"] = Builtin("toy_lm", _toy_lm, (0, 0))        # the toy language model (stdlib.lm.toy)
    out["toy_reward"] = Builtin("toy_reward", _toy_reward, (0, 0))
    from .lm.constraints import prelude_builtins as _constraints  # regex(), grammar(), json_schema() for allowed=
    out.update(_constraints())
    from .lm.masks import prelude_builtins as _token_predicates  # text_lacks(...) etc. for allowed=
    out.update(_token_predicates())
    for name, spec in _dists.DISTRIBUTIONS.items():
        out[name] = _dist_builtin(spec)
    out["pi"] = math.pi
    out["e"] = math.e
    out["inf"] = math.inf
    return out


def arities() -> dict[str, tuple | None]:
    """name -> (min_args, max_args or None) for the static checker; None for constants."""
    return {n: (b.arity if isinstance(b, Builtin) else None) for n, b in builtins().items()}
