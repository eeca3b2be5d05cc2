"""Runtime values over a batch of particles.

A program runs once for a whole population of N particles. Every runtime value is
one of:

* an *unbatched* value, the same for every particle: a Python scalar (int, float, bool,
  Fraction, str, None), a torch tensor (data), a Python list/tuple of runtime values
  (a list whose length is the same for every particle), or a function/distribution;
* ``Batched(t, idx)``: a tensor whose row ``k`` belongs to global particle ``idx[k]``;
* ``PerParticle(items, idx)``: one Python object per particle, for values that do not
  fit a tensor (strings, lists of differing lengths, functions that differ).

``Particles`` is the set of particles a piece of code runs for. When control flow
depends on a random value the set is split and each part runs on its own; a value
created for one set is read in another through its ``idx`` (``rows``), and writes to
a variable from a subset update only that subset's rows (``merge_parts``). That keeps
every particle's computation exactly what it would be if it ran alone, while each
operation still runs once per (sub)batch.
"""
from __future__ import annotations

import contextlib
import math
import operator
import threading
from fractions import Fraction
from numbers import Number
from typing import Any, Callable, Iterable, Sequence

import torch

from . import limits
from .errors import PPLRuntimeError, distribution_as_value
from ..stdlib.operands import number_operand
from .lazy import Lazy, has_lazy, lazy_binop


# ----------------------------------------------------------------------------- particles
class Particles:
    """The global particle indices a piece of code runs for (a LongTensor ``idx``)."""

    __slots__ = ("idx", "N", "device", "full")

    def __init__(self, idx: torch.Tensor, N: int, device, full: "Particles | None" = None):
        self.idx = idx
        self.N = N
        self.device = device
        self.full = full if full is not None else self

    @staticmethod
    def all(N: int, device="cpu") -> "Particles":
        return Particles(torch.arange(N, device=device), N, device)

    @property
    def M(self) -> int:
        return self.idx.shape[0]

    @property
    def is_full(self) -> bool:
        return self.idx is self.full.idx

    @property
    def generation(self) -> tuple:
        """Where the run's resampling stands: (the run's lineage, its epoch). Something
        computed per particle of these particles stays valid while this is unchanged
        (a cache key, e.g. of a language model's next-token rows)."""
        lin = _RUN.lineage
        return (lin, lin.epoch if lin is not None else 0)

    def subset(self, mask: torch.Tensor) -> "Particles | None":
        """The particles of self where ``mask`` (bool [M]) holds, or None if none."""
        idx = self.idx[mask]
        if idx.shape[0] == 0:
            return None
        return Particles(idx, self.N, self.device, self.full)

    def split(self, keys: list, key=lambda k: k) -> list:
        """The particles of self grouped by a per-particle Python value (``keys[i]`` for the
        i-th): [(the first value of a group, its particles)], in order of first appearance;
        ``key`` maps a value to what identifies its group (hashable)."""
        groups: dict = {}
        for pos, k in enumerate(keys):
            groups.setdefault(key(k), (k, []))[1].append(pos)
        out = []
        for k, positions in groups.values():
            if len(positions) == self.M:
                out.append((k, self))
            else:
                mask = torch.zeros(self.M, dtype=torch.bool, device=self.device)
                mask[torch.tensor(positions, device=self.device)] = True
                out.append((k, self.subset(mask)))
        return out

    def union(self, parts: Iterable["Particles | None"]) -> "Particles | None":
        """The particles of self that belong to any of ``parts``, in self's order."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        total = sum(p.M for p in parts)
        if total == self.M:
            return self
        mask = torch.zeros(self.N, dtype=torch.bool, device=self.device)
        for p in parts:
            mask[p.idx] = True
        return Particles(self.idx[mask[self.idx]], self.N, self.device, self.full)

    def positions(self, sub_idx: torch.Tensor) -> torch.Tensor:
        """Row positions, within self, of the global particles ``sub_idx`` (-1 if absent)."""
        if self.is_full:
            return sub_idx
        inv = torch.full((self.N,), -1, dtype=torch.long, device=self.device)
        inv[self.idx] = torch.arange(self.M, device=self.device)
        return inv[sub_idx]


# ---------------------------------------------------------------------------- lineage
class Lineage:
    """The resampling history of one run: ``ancestors[e]`` maps each particle after the
    e-th resampling to the particle it copies.

    Batched values remember the epoch they were made in and catch up lazily when read,
    so a value held anywhere — a frame, a closure, a memo table, a suspended generator's
    local — always describes the particles as they are now.

    Compaction: the lineage counts, per epoch, the values alive that were last caught up
    then (``_live``; a value counts itself in when made or caught up, out when caught up
    or freed). A value of epoch e needs ``ancestors[e:]`` only, so at each resampling the
    arrays older than the oldest epoch any live value has are freed (``None``): a run
    that keeps only current values holds one ancestor array, however long its path. A
    value that needs a freed array would be a bug of this bookkeeping: ``follow`` raises
    rather than answer wrongly."""

    __slots__ = ("ancestors", "full_idx", "N", "_suffixes", "_suffix_epoch", "_live", "_base", "_list_memo")

    def __init__(self, full_idx: torch.Tensor):
        self.ancestors: list[torch.Tensor | None] = []
        self.full_idx = full_idx
        self.N = full_idx.shape[0]
        self._suffixes: list = []
        self._suffix_epoch = -1
        self._live: list[int] = [0]  # _live[e]: values alive whose epoch is e
        self._base = 0  # ancestors[:_base] are freed (no live value is older than _base)
        self._list_memo = None  # (a row selector, its tolist()): ``index_list``

    def _suffix(self, since: int) -> torch.Tensor:
        """a_since[a_since+1[... a_last]]: where each current particle's line was at
        epoch ``since`` (all of them down to the oldest live epoch computed at once,
        backwards: O(epochs * N))."""
        epoch = len(self.ancestors)  # = self.epoch (no property call on the per-step path)
        if self._suffix_epoch != epoch:
            out = [None] * epoch
            acc = None
            for e in range(epoch - 1, self._base - 1, -1):
                acc = self.ancestors[e] if acc is None else self.ancestors[e].index_select(0, acc)
                out[e] = acc
            self._suffixes, self._suffix_epoch = out, epoch
        return self._suffixes[since]

    @property
    def epoch(self) -> int:
        return len(self.ancestors)

    @property
    def retained(self) -> int:
        """How many ancestor arrays are held (the others were freed by compaction)."""
        return self.epoch - self._base

    def resample(self, ancestors: torch.Tensor) -> None:
        self._compact()
        self.ancestors.append(ancestors)
        self._live.append(0)
        self._suffixes, self._suffix_epoch = [], -1  # stale from now on: free it
        self._list_memo = None

    def index_list(self, sel: torch.Tensor) -> list:
        """``sel.tolist()`` for a row selector of ``follow``, kept for the last one asked:
        the per-particle values caught up after one resampling read the same ancestor
        array (one conversion, not one per value). Selectors are never written to."""
        memo = self._list_memo
        if memo is not None and memo[0] is sel:
            return memo[1]
        out = sel.tolist()
        self._list_memo = (sel, out)
        return out

    def renew(self, values: list) -> None:
        """After a move the ancestor arrays cannot express (``Batched._relocate``: rows
        from other ranks), with ``values`` every live value of this lineage given its new
        rows: a new epoch whose ancestor array is invalid (index N), so a value that was
        not relocated fails when read instead of reading wrong rows; ``values`` are
        counted in it as current."""
        epoch = len(self.ancestors)
        self.resample(torch.full((self.N,), self.N, dtype=torch.long, device=self.full_idx.device))
        for v in values:
            if v._lin is self and v._ep == epoch:
                self._live[epoch] -= 1
                v._ep = epoch + 1
                self._live[-1] += 1

    def _compact(self) -> None:
        """Free the ancestor arrays older than every live value."""
        live, base, epoch = self._live, self._base, len(self.ancestors)  # (= self.epoch)
        while base < epoch and live[base] <= 0:
            self.ancestors[base] = None
            base += 1
        self._base = base

    def follow(self, idx: torch.Tensor, since: int):
        """For a value on particles ``idx`` at epoch ``since``: (new idx, row selector)."""
        if since < self._base:
            raise RuntimeError(f"internal error: a value of epoch {since} outlived the lineage's compaction "
                               f"(oldest kept: {self._base}); please report this")
        if idx is self.full_idx:  # the common case: one gather
            if since == len(self.ancestors) - 1:  # (= self.epoch - 1)
                return idx, self.ancestors[since]
            return idx, self._suffix(since)
        sel = None
        for a in self.ancestors[since:]:
            if idx is self.full_idx:
                pos = a
            else:
                inv = torch.full((self.N,), -1, dtype=torch.long, device=a.device)
                inv[idx] = torch.arange(idx.shape[0], device=a.device)
                p = inv[a]
                keep = p >= 0
                if bool(keep.all()):
                    idx, pos = self.full_idx, p
                else:
                    idx, pos = self.full_idx[keep], p[keep]
            sel = pos if sel is None else sel[pos]
        return idx, sel


class _ThreadRun(threading.local):
    """What belongs to the run a thread executes (runs in other threads have their own)."""

    lineage: "Lineage | None" = None  # the lineage of the run being executed (None: no resampling)


_RUN = _ThreadRun()


def current_lineage() -> "Lineage | None":
    """The lineage of the run this thread executes (None: no resampling)."""
    return _RUN.lineage


@contextlib.contextmanager
def lineage_scope(lineage: "Lineage | None"):
    """Run the block with ``lineage`` as this thread's run lineage, restoring the previous
    one on exit (also on error): the one way a run installs its lineage. Batched values
    made inside follow the lineage's resamplings."""
    old, _RUN.lineage = _RUN.lineage, lineage
    try:
        yield lineage
    finally:
        _RUN.lineage = old


# ------------------------------------------------------------------------ batched values
class _PerParticleValue:
    """Rows (a payload) belonging to the global particles ``idx``, kept in step with the
    run's lineage: on first read after a resampling, the payload is re-selected."""

    __slots__ = ("_idx", "_lin", "_ep")

    def __init__(self, idx: torch.Tensor):
        self._idx = idx
        lin = _RUN.lineage
        self._lin = lin
        if lin is None:
            self._ep = 0
        else:
            self._ep = len(lin._live) - 1  # = lin.epoch
            lin._live[-1] += 1  # counted in (see ``Lineage``: compaction)

    def __del__(self):
        lin = self._lin
        if lin is not None:
            lin._live[self._ep] -= 1

    def _select(self, sel: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fresh(self) -> None:
        lin = self._lin
        if lin is not None and self._ep != len(lin.ancestors):  # (= lin.epoch, without a property call)
            idx, sel = lin.follow(self._idx, self._ep)
            self._select(sel)
            self._idx = idx
            lin._live[self._ep] -= 1
            self._ep = len(lin.ancestors)  # (= lin.epoch)
            lin._live[-1] += 1

    @property
    def idx(self) -> torch.Tensor:
        self._fresh()
        return self._idx


class Batched(_PerParticleValue):
    """A tensor of per-particle values: row k belongs to global particle idx[k]."""

    __slots__ = ("_t",)

    def __init__(self, t: torch.Tensor, idx: torch.Tensor):
        _PerParticleValue.__init__(self, idx)
        self._t = t

    def _select(self, sel):
        self._t = self._t.index_select(0, sel)  # = self._t[sel] (sel: 1-D long), faster

    def _relocate(self, t: torch.Tensor, idx: torch.Tensor) -> None:
        """New rows ``t`` for the particles ``idx``, replacing the value's rows caught up
        to the lineage's current epoch: a move the lineage cannot express (rows that came
        from other ranks: ``semantics.live_state``; then ``Lineage.renew``)."""
        self._fresh()
        self._t, self._idx = t, idx

    @property
    def t(self) -> torch.Tensor:
        self._fresh()
        return self._t

    def __repr__(self) -> str:
        return f"Batched({tuple(self.t.shape)}, {self.t.dtype})"


class PerParticle(_PerParticleValue):
    """One Python object per particle (the slow path, used only where tensors cannot be)."""

    __slots__ = ("_items",)

    def __init__(self, items: list, idx: torch.Tensor):
        _PerParticleValue.__init__(self, idx)
        self._items = items

    def _select(self, sel):
        lin = self._lin
        ids = lin.index_list(sel) if lin is not None else sel.tolist()
        self._items = list(map(self._items.__getitem__, ids))  # (= [items[i] for i in sel])

    def _relocate(self, items: list, idx: torch.Tensor) -> None:
        """New objects ``items`` for the particles ``idx`` (as ``Batched._relocate``: rows
        that came from other ranks; then ``Lineage.renew``)."""
        self._fresh()
        self._items, self._idx = items, idx

    @property
    def items(self) -> list:
        self._fresh()
        return self._items

    def __repr__(self) -> str:
        return f"PerParticle({len(self.items)})"


def is_batched(v: Any) -> bool:
    return isinstance(v, (Batched, PerParticle))


class Undefined(PPLRuntimeError):
    pass


def _positions_of(v_idx: torch.Tensor, ctx: Particles) -> torch.Tensor:
    """Positions within a value's rows (indexed by v_idx) of the particles of ctx."""
    if v_idx is ctx.full.idx:
        return ctx.idx
    inv = torch.full((ctx.N,), -1, dtype=torch.long, device=ctx.device)
    inv[v_idx] = torch.arange(v_idx.shape[0], device=ctx.device)
    pos = inv[ctx.idx]
    if bool((pos < 0).any()):
        raise Undefined(
            "a variable is used on a path where it was never assigned",
            hint="assign it on every branch of the `if` (or before it)",
        )
    return pos


def rows(v: Batched | PerParticle, ctx: Particles):
    """The rows of a batched value for the particles of ``ctx`` (tensor or list)."""
    if type(v) is Batched:  # the common case first: one catch-up, no property calls
        lin = v._lin
        if lin is not None and v._ep != len(lin.ancestors):  # (= v._fresh()'s own test)
            v._fresh()
        if v._idx is ctx.idx:
            return v._t
    if v.idx is ctx.idx:
        return v.t if isinstance(v, Batched) else v.items
    pos = _positions_of(v.idx, ctx)
    if isinstance(v, Batched):
        return v.t.index_select(0, pos)  # = v.t[pos]
    return [v.items[i] for i in pos.tolist()]


def restrict(v: Any, ctx: Particles) -> Any:
    """``v`` as a value aligned to ``ctx`` (batched values re-indexed, others as is)."""
    if isinstance(v, Batched):
        return v if v.idx is ctx.idx else Batched(rows(v, ctx), ctx.idx)
    if isinstance(v, PerParticle):
        return v if v.idx is ctx.idx else PerParticle(rows(v, ctx), ctx.idx)
    return v


# ------------------------------------------------------------------ distributions as values
class DistributionValue:
    """Base class of the distributions of the language (``semantics.dist_values``): a
    value for ``~``, ``observe`` and ``sample(...)``, never a number or a truth value."""

    __slots__ = ()


def call_text(d: Any) -> str:
    """``d`` as the call that made it, for messages: ``flip(0.1)`` (``flip(...)`` when an
    argument is not a plain number)."""
    spec = getattr(d, "spec", None)
    name = getattr(spec, "name", "distribution")
    args = getattr(d, "args", None)
    if isinstance(args, tuple) and all(isinstance(a, (bool, int, float, Fraction)) for a in args):
        return f"{name}({', '.join(str(float(a)) if isinstance(a, Fraction) else repr(a) for a in args)})"
    return f"{name}(...)"


def not_a_value(d: Any, use: str) -> PPLRuntimeError:
    """The error for a distribution used as a value (``use``: "as a condition", ...)."""
    message, hint = distribution_as_value(call_text(d), use)
    return PPLRuntimeError(message, hint=hint)


def reject_distribution(v: Any, use: str) -> None:
    """Raise ``not_a_value`` if ``v`` is a distribution, or a list/tuple or per-particle
    value holding one (``v`` must be a value, e.g. the model's result)."""
    if isinstance(v, DistributionValue):
        raise not_a_value(v, use)
    if isinstance(v, (list, tuple)):
        for x in v:
            reject_distribution(x, use)
    elif isinstance(v, PerParticle) and v._items is not None:  # (a ragged range has none)
        for x in v._items:
            if isinstance(x, DistributionValue):
                raise not_a_value(x, use)


# ------------------------------------------------------------------- numeric conversions
def is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, Fraction)) and not isinstance(v, torch.Tensor)


def is_numeric(v: Any) -> bool:
    """Values that live in tensors: scalars, tensors, Batched."""
    return isinstance(v, (Batched, torch.Tensor)) or is_scalar(v)


# ------------------------------------------------------------------------ exact vectors
class Vector(tuple):
    """Numeric data in the exact semantics: what a data tensor is under sampling.

    Numeric data (a rectangular list of numbers, an array, a tensor) is a *vector* in
    every semantics: arithmetic and comparisons on it are elementwise, broadcasting like
    torch. Sampling keeps it a tensor; exact enumeration keeps it a ``Vector`` of Python
    numbers (ints, bools, floats, Fractions; nested Vectors for a matrix), so its
    arithmetic stays exact. Indexing, ``len`` and iteration are a tuple's; a slice is a
    Vector. ``binop``/``unop`` give the elementwise meaning (``vector_binop``); Python's
    own ``+``/``*`` on the tuple are never used for it."""

    __slots__ = ()

    def __getitem__(self, k):
        out = tuple.__getitem__(self, k)
        return Vector(out) if isinstance(k, slice) else out

    def __repr__(self) -> str:
        return f"Vector({list(self)!r})"

    @property
    def shape(self) -> tuple:
        return vector_shape(self)

    def flat(self) -> list:
        """The numbers, in row-major order."""
        return [y for x in self for y in (x.flat() if isinstance(x, Vector) else (x,))]


def vector_shape(v: Any) -> tuple:
    """The shape of a Vector (() for a number)."""
    if isinstance(v, Vector):
        return (len(v),) + (vector_shape(v[0]) if len(v) else ())
    return ()


def to_vector(v: Any) -> Any:
    """A rectangular nested list/tuple of numbers (or a tensor/array's ``tolist()``) as a
    Vector (nested for a matrix); a number stays a number. A ragged or non-numeric list is
    a ``RaggedListError``/``PPLRuntimeError``, as it would be as a tensor."""
    if hasattr(v, "tolist") and not isinstance(v, (list, tuple)):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        out = Vector(to_vector(x) for x in v)
        shapes = {vector_shape(x) for x in out}
        if len(shapes) > 1:
            raise RaggedListError.of(shapes, "vector", "lists used as vectors or matrices need items of one shape")
        return out
    if is_scalar(v):
        return v
    raise PPLRuntimeError(f"expected a number, got {describe(v)}")


def _vector_operand(v: Any) -> Any:
    """An operand next to a Vector: a list literal of numbers becomes a Vector (as a
    tensor operand turns one into a tensor under sampling); numbers stay numbers."""
    if isinstance(v, Vector) or is_scalar(v):
        return v
    if isinstance(v, (list, tuple)):
        return to_vector(v)
    raise PPLRuntimeError(f"expected a number, got {describe(v)}")


def vector_binop(op: str, a: Any, b: Any, exact: bool) -> Any:
    """``a op b`` elementwise when either is a Vector: a number broadcasts, shapes
    broadcast like torch's (trailing dims; a dim of 1 stretches); otherwise an error
    naming both shapes, as under sampling."""
    return vector_apply(lambda x, y: _py_binop(op, x, y, exact), a, b, op)


def vector_apply(fn: Callable, a: Any, b: Any, op: str) -> Any:
    """``fn`` on the numbers of a and b (Vectors, list literals of numbers, or numbers),
    broadcast as ``vector_binop`` does; ``op`` names the operation in errors."""
    try:
        a, b = _vector_operand(a), _vector_operand(b)
    except RaggedListError:
        raise
    except PPLRuntimeError:
        raise PPLRuntimeError(f"unsupported operand types for {op}: {describe(a)} and {describe(b)}",
                              hint="arithmetic on a vector is elementwise: the other operand must be a number "
                                   "or a vector (list of numbers)") from None
    sa, sb = vector_shape(a), vector_shape(b)
    try:
        shape = tuple(torch.broadcast_shapes(sa, sb))
    except RuntimeError:
        raise _no_broadcast(op, list(sa), list(sb)) from None
    return _elementwise(fn, a, len(sa), b, len(sb), shape)


def _no_broadcast(op: str, sa: list, sb: list) -> PPLRuntimeError:
    """The error for an elementwise ``op`` on shapes that do not broadcast (exact Vectors
    and tensors alike)."""
    return PPLRuntimeError(f"cannot apply {op} to values of shapes {sa} and {sb}: the shapes do not broadcast",
                           hint="elementwise operations need equal shapes (or a shape of one element, or a "
                                "single number)")


def _elementwise(fn: Callable, a: Any, ra: int, b: Any, rb: int, shape: tuple) -> Any:
    """fn over the broadcast of a (rank ra) and b (rank rb) to ``shape``."""
    if not shape:
        return fn(a, b)
    n = len(shape)

    def item(v, r, i):  # v's element for output position i along the leading dim
        if r < n:  # v has fewer dims: it repeats along this one
            return v
        return v[0] if len(v) == 1 else v[i]
    return Vector(_elementwise(fn, item(a, ra, i), min(ra, n - 1), item(b, rb, i), min(rb, n - 1), shape[1:])
                  for i in range(shape[0]))


def vector_map(fn: Callable, v: Vector) -> Vector:
    """fn on every number of v (elementwise unary operations)."""
    return Vector(vector_map(fn, x) if isinstance(x, Vector) else fn(x) for x in v)


def scalar_dtype(v: Any) -> torch.dtype:
    if isinstance(v, bool):
        return torch.bool
    if isinstance(v, int):
        return torch.long
    return torch.get_default_dtype()


def as_tensor(v: Any, device) -> torch.Tensor:
    """An unbatched numeric value (scalar, tensor, list of numbers) as a tensor."""
    if isinstance(v, torch.Tensor):
        return v.to(device) if v.device != torch.device(device) else v
    if isinstance(v, Fraction):
        return torch.tensor(float(v), device=device)
    if is_scalar(v):
        if type(v) is int and not _INT64[0] <= v < _INT64[1]:
            raise _too_big_for_tensor(v)
        return torch.tensor(v, device=device, dtype=scalar_dtype(v))
    if isinstance(v, (list, tuple)):
        items = [as_tensor(x, device) for x in v]
        return stack_items(_promote(items)) if items else torch.zeros(0, device=device)
    raise PPLRuntimeError(f"expected a number, got {describe(v)}")


class RaggedListError(PPLRuntimeError):
    """A list whose items differ in shape was used where a tensor is needed."""

    @classmethod
    def of(cls, shapes: set, as_what: str, hint: str) -> "RaggedListError":
        """The error for a list whose items have the (several) ``shapes``, naming two."""
        a, b = sorted(shapes, key=lambda s: (len(s), s))[:2]
        return cls(f"a ragged list (items of shapes {list(a)} and {list(b)}) cannot be used as a {as_what}",
                   hint=hint)


def stack_items(ts: Sequence[torch.Tensor], dim: int = 0, lead: int = 0) -> torch.Tensor:
    """The items of a list as one tensor (stacked along ``dim``). Items must have the same
    shape (after ``lead`` leading dims, e.g. the particle dim): a list whose items differ
    in shape, like [[1], [0, 1]], is ragged; it stays a list and cannot be a tensor (it is
    never broadcast: [1] read as [1, 1] would be a silently wrong value)."""
    # (while torch.jit traces a static program, sizes are tensors; its eager run checked them)
    shapes = set() if torch.jit.is_tracing() else {tuple(t.shape[lead:]) for t in ts}
    if len(shapes) > 1:
        raise RaggedListError.of(shapes, "tensor", "lists used as vectors or matrices need items of one shape; "
                                                   "a ragged list can be indexed and looped over")
    return torch.stack(list(ts), dim=dim)


def _promote(ts: Sequence[torch.Tensor]) -> list:
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in ts]


def batch_rows(v: Any, ctx: Particles) -> torch.Tensor:
    """A numeric value as a tensor with one row per particle of ``ctx`` ([M, ...])."""
    if isinstance(v, Batched):
        return rows(v, ctx)
    if isinstance(v, (list, tuple)) and deep_batched(v):  # e.g. a matrix of per-particle numbers
        parts = [batch_rows(x, ctx) for x in v]
        parts = _promote(parts)
        return stack_items(parts, dim=1, lead=1)
    if isinstance(v, PerParticle):
        return pack_tensor(rows(v, ctx), ctx.device)
    t = as_tensor(v, ctx.device)
    return t.unsqueeze(0).expand(ctx.M, *t.shape)


def pack_tensor(items: list, device) -> torch.Tensor:
    ts = [as_tensor(x, device) for x in items]
    return stack_items(_promote(ts))


def to_bool_rows(v: Any, ctx: Particles) -> torch.Tensor | bool:
    """A condition: a Python bool when unbatched, else a bool tensor [M]."""
    if isinstance(v, Batched):
        t = rows(v, ctx)
        if t.dim() != 1:
            raise PPLRuntimeError(
                f"a condition must be one truth value per particle, got a value of shape {tuple(t.shape[1:])}",
                hint="use any(...) or all(...) to reduce a vector to a truth value",
            )
        return t if t.dtype == torch.bool else t != 0
    if isinstance(v, PerParticle):
        return torch.tensor([bool(truthy(x)) for x in rows(v, ctx)], device=ctx.device)
    if isinstance(v, Lazy):  # (semantics.lazy)
        return v.truth(ctx)
    return bool(truthy(v))


def truthy(v: Any) -> bool:
    if isinstance(v, Vector):  # as a tensor: one element is its truth value, more is an error
        items = v.flat()
        if len(items) != 1:
            raise PPLRuntimeError(f"a condition must be one truth value, got a tensor of shape {tuple(v.shape)}",
                                  hint="use any(...) or all(...)")
        return bool(items[0])
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise PPLRuntimeError(
                f"a condition must be one truth value, got a tensor of shape {tuple(v.shape)}",
                hint="use any(...) or all(...)",
            )
        return bool(v.item())
    if isinstance(v, DistributionValue):
        raise not_a_value(v, "as a condition")
    return bool(v)


# ------------------------------------------------------------------ per-particle fallback
def materialize(v: Any, ctx: Particles) -> list:
    """The per-particle Python values of ``v`` for the particles of ``ctx``."""
    if isinstance(v, Batched):
        t = rows(v, ctx)
        return t.tolist() if t.dim() == 1 else list(t.unbind(0))
    if isinstance(v, PerParticle):
        return rows(v, ctx)
    if isinstance(v, (list, tuple)) and deep_batched(v):
        cols = [materialize(x, ctx) for x in v]
        kind = type(v)
        return [kind(col[i] for col in cols) for i in range(ctx.M)]
    return [v] * ctx.M


def pack(items: list, ctx: Particles) -> Any:
    """Per-particle Python values back into the most efficient runtime value."""
    if not items:
        return PerParticle(items, ctx.idx)
    first = items[0]
    if all(x is first for x in items) and not isinstance(first, (list, dict)):
        return first
    if all(isinstance(x, bool) for x in items):
        return Batched(torch.tensor(items, dtype=torch.bool, device=ctx.device), ctx.idx)
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in items):
        dtype = torch.long if all(isinstance(x, int) for x in items) else torch.get_default_dtype()
        return Batched(torch.tensor(items, dtype=dtype, device=ctx.device), ctx.idx)
    if all(isinstance(x, torch.Tensor) for x in items):
        shapes = {tuple(x.shape) for x in items}
        if len(shapes) == 1:
            return Batched(torch.stack(_promote(items)).to(ctx.device), ctx.idx)
    return PerParticle(list(items), ctx.idx)


def per_particle(fn: Callable, args: Sequence[Any], ctx: Particles) -> Any:
    """Apply a Python function particle by particle (the slow path)."""
    cols = [materialize(a, ctx) for a in args]
    return pack([fn(*(col[i] for col in cols)) for i in range(ctx.M)], ctx)


# ---------------------------------------------------------------------------- operators
_PY_BINOPS: dict[str, Callable] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
    "//": operator.floordiv, "%": operator.mod, "**": operator.pow, "@": operator.matmul,
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
}
_TORCH_BINOPS: dict[str, Callable] = {
    "+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.true_divide,
    "//": torch.floor_divide, "%": torch.remainder, "**": torch.pow,
    "==": torch.eq, "!=": torch.ne, "<": torch.lt, "<=": torch.le,
    ">": torch.gt, ">=": torch.ge,
}


def _align_ranks(a: torch.Tensor, b: torch.Tensor, a_batched: bool, b_batched: bool):
    """Make per-particle shapes broadcast the way they would for one particle.

    A batched tensor is [M, *s]; its per-particle value has shape s. Numpy broadcasting
    of s against another shape aligns trailing dims, so the batched one is padded with
    singleton dims right after the particle dim."""
    ra = a.dim() - a_batched
    rb = b.dim() - b_batched
    r = max(ra, rb)
    if a_batched and ra < r:
        a = a.reshape(a.shape[0], *([1] * (r - ra)), *a.shape[1:])
    if b_batched and rb < r:
        b = b.reshape(b.shape[0], *([1] * (r - rb)), *b.shape[1:])
    return a, b


def _py_binop(op: str, a: Any, b: Any, exact: bool) -> Any:
    if op == "in":
        return a in b
    if isinstance(a, torch.Tensor) and isinstance(b, (str, type(None))) or \
            isinstance(b, torch.Tensor) and isinstance(a, (str, type(None))):  # (torch: t == "s" is False)
        raise PPLRuntimeError(f"unsupported operand types for {op}: {describe(a)} and {describe(b)}")
    if exact and op == "/" and isinstance(a, (int, Fraction)) and isinstance(b, (int, Fraction)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        if b == 0:
            raise PPLRuntimeError("division by zero")
        return Fraction(a) / b
    _check_size(op, a, b)
    try:
        out = _PY_BINOPS[op](a, b)
    except ZeroDivisionError:
        if op == "/" and isinstance(a, (int, float, Fraction)):
            return math.copysign(math.inf, a) if a != 0 else math.nan
        raise PPLRuntimeError("division by zero") from None
    except TypeError:
        if op == "@":
            raise _matmul_operand_error(a, b) from None
        raise PPLRuntimeError(
            f"unsupported operand types for {op}: {describe(a)} and {describe(b)}"
        ) from None
    except OverflowError:
        raise PPLRuntimeError(f"OverflowError: the result of {op} is too large for a float",
                              hint="the result overflows; work on a log scale (e.g. log-probabilities)") from None
    if type(out) is int:
        limits.check_int(out)
    elif type(out) is Fraction:
        limits.check_fraction(out)
    return out


def _check_size(op: str, a: Any, b: Any) -> None:
    """Refuse, before computing it, an operation whose result the limits forbid: an
    integer power of too many bits, a list or string repeated past the memory budget."""
    if op == "**":
        limits.check_power(a, b)
    elif op == "*":
        seq, n = (a, b) if isinstance(a, (list, tuple, str)) else (b, a)
        if isinstance(seq, (list, tuple, str)) and isinstance(n, int) and not isinstance(n, bool) and n > 1:
            width = 1 if isinstance(seq, str) and seq.isascii() else 4 if isinstance(seq, str) \
                else limits.LIST_SLOT_BYTES
            limits.check_memory(len(seq) * n * width, f"a {_kind(seq)} of {len(seq) * n:,} "
                                f"{'characters' if isinstance(seq, str) else 'elements'}")
    elif op == "+" and isinstance(a, (list, tuple, str)) and isinstance(b, (list, tuple, str)):
        width = 1 if isinstance(a, str) else limits.LIST_SLOT_BYTES
        if (len(a) + len(b)) * width > limits.current().max_memory:  # (the message only when it fails)
            limits.check_memory((len(a) + len(b)) * width, f"a {_kind(a)} of {len(a) + len(b):,} "
                                f"{'characters' if isinstance(a, str) else 'elements'}")


def _kind(seq) -> str:
    return "string" if isinstance(seq, str) else "tuple" if isinstance(seq, tuple) else "list"


def deep_batched(v: Any) -> bool:
    """Whether ``v`` is batched or a (nested) list/tuple with a batched element."""
    if isinstance(v, (list, tuple)):
        return any(deep_batched(x) for x in v)
    return isinstance(v, (Batched, PerParticle))  # (= is_batched(v))


def _tensor_arg(v: Any, ctx: Particles) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, Fraction):
        return torch.tensor(float(v), device=ctx.device)
    if isinstance(v, (list, tuple)):
        return batch_rows(v, ctx) if deep_batched(v) else as_tensor(v, ctx.device)
    return v


def binop(op: str, a: Any, b: Any, ctx: Particles, exact: bool = False) -> Any:
    """``a op b`` with per-particle semantics."""
    ta, tb = type(a), type(b)
    if (ta is Batched and (tb is Batched or tb is float or tb is int) or tb is Batched and (ta is float or ta is int)) \
            and op != "in" and op != "@":
        # the common case, first (a model's arithmetic per step): exactly what the general
        # path below does for these operand types, without its checks for the others
        va = rows(a, ctx) if ta is Batched else a
        vb = rows(b, ctx) if tb is Batched else b
        if ta is tb:
            va, vb = _align_ranks(va, vb, True, True)
        elif op in _NUMBER_OPS:  # a float next to a tensor: a cached 0-d tensor, the same bits (stdlib.operands)
            if ta is float:
                va = number_operand(va, vb)
            elif tb is float:
                vb = number_operand(vb, va)
        return Batched(_torch_binop(op, va, vb, lead=(ta is Batched, tb is Batched)), ctx.idx)
    if ta in _PY_NUMBERS and tb in _PY_NUMBERS and op != "in":
        return _py_binop(op, a, b, exact)  # (plain numbers: where the checks below would lead)
    if ta is list and tb is list and op == "+":  # (two plain lists, ``toks = toks + [tok]``: the
        return a + b  # concatenation the checks below lead to, which have no limit for "+")
    if isinstance(a, Lazy) or isinstance(b, Lazy):  # (semantics.lazy: an enumerated or delayed value)
        return lazy_binop(op, a, b, ctx)
    if isinstance(a, DistributionValue) or isinstance(b, DistributionValue):
        d = a if isinstance(a, DistributionValue) else b
        raise not_a_value(d, "in a comparison" if op in _COMPARISONS or op == "in" else "in arithmetic")
    if op == "in":
        return contains(b, a, ctx)
    if op == "@":
        return matmul(a, b, ctx, exact)
    if isinstance(a, Vector) or isinstance(b, Vector):
        if not (deep_batched(a) or deep_batched(b) or isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)):
            return vector_binop(op, a, b, exact)
    a, b = _number_next_to_list(a, b), _number_next_to_list(b, a)
    a, b = _batch_list_next_to_tensor(a, b, ctx), _batch_list_next_to_tensor(b, a, ctx)
    ab, bb = isinstance(a, Batched), isinstance(b, Batched)
    if not (ab or bb):
        if isinstance(a, PerParticle) or isinstance(b, PerParticle) or \
                (op != "+" and (deep_batched(a) or deep_batched(b))):
            # e.g. comparing lists whose elements differ between particles
            return per_particle(lambda x, y: _py_binop(op, x, y, exact), (a, b), ctx)
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return _torch_binop(op, _tensor_arg(a, ctx), _tensor_arg(b, ctx))
        return _py_binop(op, a, b, exact)
    if isinstance(a, PerParticle) or isinstance(b, PerParticle) or isinstance(a, (str, list, tuple)) \
            or isinstance(b, (str, list, tuple)):
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            return per_particle(lambda x, y: _py_binop(op, x, y, exact), (a, b), ctx)
        if isinstance(a, str) or isinstance(b, str) or is_batched(a) or is_batched(b):
            return per_particle(lambda x, y: _py_binop(op, x, y, exact), (a, b), ctx)
    ta = rows(a, ctx) if ab else _tensor_arg(a, ctx)
    tb = rows(b, ctx) if bb else _tensor_arg(b, ctx)
    if isinstance(ta, torch.Tensor) and isinstance(tb, torch.Tensor):
        ta, tb = _align_ranks(ta, tb, ab, bb)
    elif not isinstance(ta, torch.Tensor) and not is_scalar(ta) or \
            not isinstance(tb, torch.Tensor) and not is_scalar(tb):
        raise PPLRuntimeError(f"unsupported operand types for {op}: {describe(a)} and {describe(b)}")
    return Batched(_torch_binop(op, ta, tb, lead=(ab, bb)), ctx.idx)


def _batch_list_next_to_tensor(v: Any, other: Any, ctx: Particles) -> Any:
    """A list literal next to a vector is a vector (as a list next to a Vector is in the
    exact semantics): ``[x, 1] + a`` (per-particle numbers: a per-particle vector) and
    ``[1, 2] + a * x`` (a per-particle vector) are elementwise for each particle. Next to
    a 0-d tensor (a number) a list stays a list: ``[1, 2] * sum(a)`` repeats it."""
    if not isinstance(v, (list, tuple)) or isinstance(v, Vector):
        return v
    if not (isinstance(other, (torch.Tensor, Vector)) and (not isinstance(other, torch.Tensor) or other.dim() >= 1)
            or isinstance(other, Batched) and other.t.dim() >= 2):
        return v
    if deep_batched(v):
        return Batched(batch_rows(v, ctx), ctx.idx)
    return as_tensor(v, ctx.device) if isinstance(other, Batched) else v


def _number_next_to_list(v: Any, other: Any) -> Any:
    """A 0-d tensor (e.g. ``sum(a)``) next to a list or string is the number it holds, as
    in the exact semantics (``[1, 2] * n`` repeats the list)."""
    if isinstance(v, torch.Tensor) and v.dim() == 0 and isinstance(other, (list, tuple, str)) \
            and not isinstance(other, Vector):
        return v.item()
    return v


_COMPARISONS = frozenset(("==", "!=", "<", "<=", ">", ">="))
_PY_NUMBERS = frozenset((bool, int, float, Fraction))  # (plain Python numbers: ``binop``'s scalar path)
_NUMBER_OPS = frozenset(("+", "-", "*", "/"))  # where a 0-d tensor may stand for a float (stdlib.operands)


def _torch_binop(op: str, a: Any, b: Any, lead: tuple = (False, False)) -> torch.Tensor:
    """``a op b`` on tensors; ``lead`` says which operand has a leading particle dim (left
    out of the shapes an error names, which are one particle's)."""
    if op not in _COMPARISONS and (_is_bool(a) or _is_bool(b)):
        # in arithmetic a bool is the int 0/1, as in Python (torch: True + True is True,
        # and `-` of a bool tensor is an error)
        a = (a.long() if isinstance(a, torch.Tensor) else int(a)) if _is_bool(a) else a
        b = (b.long() if isinstance(b, torch.Tensor) else int(b)) if _is_bool(b) else b
    if op in ("/", "//", "%") and isinstance(b, (int, float)) and b == 0 and op != "/":
        raise PPLRuntimeError("division by zero")
    if type(a) is int or type(b) is int:  # (_fit_int64 returns anything else as is)
        a, b = _fit_int64(a, b), _fit_int64(b, a)
    if not isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and op in _COMPARISONS:
        a = torch.as_tensor(a, device=b.device)  # torch.gt(3, t) has no (Number, Tensor) form
    try:
        return _TORCH_BINOPS[op](a, b)
    except RuntimeError as e:
        if "must match the size" in str(e) or "broadcast" in str(e):
            sa, sb = (list(x.shape[int(l):]) if isinstance(x, torch.Tensor) else [] for x, l in zip((a, b), lead))
            raise _no_broadcast(op, sa, sb) from None
        raise PPLRuntimeError(f"cannot apply {op}: {str(e).splitlines()[0]}") from None
    except TypeError:  # e.g. a tensor and a string
        raise PPLRuntimeError(f"unsupported operand types for {op}: {describe(a)} and {describe(b)}") from None


# ---------------------------------------------------------------- matrix multiplication
def matmul(a: Any, b: Any, ctx: Particles, exact: bool = False) -> Any:
    """``a @ b``: torch.matmul's meaning for each particle (vector . vector is a number,
    matrix @ vector a vector, vector @ matrix a vector, matrix @ matrix a matrix; more dims
    are batches of matrices), the particle dim kept apart: data X [n, p] @ a per-particle
    beta (rows [M, p]) is per-particle [M, n]. Exact Vectors multiply by Python sums, so
    Fractions stay exact (``vector_matmul``). List literals of numbers are vectors and
    matrices here (a list has no ``@`` of its own). Shapes that do not fit are a
    ``PPLRuntimeError`` naming both."""
    if isinstance(a, PerParticle) or isinstance(b, PerParticle):
        return per_particle(lambda x, y: matmul(x, y, ctx, exact), (a, b), ctx)
    a, b = _concrete_items(a, ctx), _concrete_items(b, ctx)
    a, b = _matmul_list(a, b, ctx), _matmul_list(b, a, ctx)
    if not _tensor_like(a) and not _tensor_like(b) and (exact or isinstance(a, Vector) or isinstance(b, Vector)):
        return vector_matmul(a, b, exact)
    for v in (a, b):
        if not (_tensor_like(v) or isinstance(v, (list, tuple)) or is_scalar(v)):
            raise _matmul_operand_error(a, b)
    ab, bb = isinstance(a, Batched), isinstance(b, Batched)
    try:
        ta = rows(a, ctx) if ab else as_tensor(a, ctx.device)
        tb = rows(b, ctx) if bb else as_tensor(b, ctx.device)
    except RaggedListError:
        raise
    except PPLRuntimeError:
        raise _matmul_operand_error(a, b) from None
    out = matmul_tensors(ta, tb, (int(ab), int(bb)))
    return Batched(out, ctx.idx) if ab or bb else out


def _concrete_items(v: Any, ctx: Particles) -> Any:
    """A list literal holding lazy values (``[mu, 1.0]`` with mu delayed or enumerated:
    ``semantics.lazy``) with each made concrete, as a lazy operand of ``@`` itself is
    (its class may refuse, with its own located error)."""
    if not isinstance(v, (list, tuple)) or isinstance(v, Vector) or not has_lazy(v):
        return v
    return type(v)(x.force(ctx, "in a matrix product") if isinstance(x, Lazy) else _concrete_items(x, ctx)
                   for x in v)


def _tensor_like(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, Batched))


def _matmul_list(v: Any, other: Any, ctx: Particles) -> Any:
    """An operand of ``@`` that is a list literal (``@`` has no meaning for lists, so a
    list of numbers is a vector, a list of such lists a matrix): per-particle numbers make
    it a per-particle vector; next to a tensor it is a tensor; otherwise it stays a list,
    a tensor under sampling and a Vector in the exact semantics (``matmul``)."""
    if not isinstance(v, (list, tuple)) or isinstance(v, Vector):
        return v
    if deep_batched(v):
        return Batched(batch_rows(v, ctx), ctx.idx)
    return as_tensor(v, ctx.device) if _tensor_like(other) else v


def _matmul_operand_error(a: Any, b: Any) -> PPLRuntimeError:
    numbers = [v for v in (a, b) if is_scalar(v) or isinstance(v, torch.Tensor) and v.dim() == 0]
    if numbers:
        return PPLRuntimeError(f"@ (matrix multiplication) needs vectors or matrices, got {describe(a)} and "
                               f"{describe(b)}", hint="use * to multiply by a number")
    return PPLRuntimeError(f"unsupported operand types for @: {describe(a)} and {describe(b)}",
                           hint="@ multiplies vectors and matrices of numbers (numeric data, lists of numbers, "
                                "lists of such lists)")


def matmul_shape(sa: Sequence[int], sb: Sequence[int]) -> tuple:
    """The shape of ``a @ b`` for one particle's shapes ``sa`` and ``sb``, as torch.matmul
    gives it; a ``PPLRuntimeError`` naming both shapes where they do not fit."""
    sa, sb = list(sa), list(sb)
    if not sa or not sb:
        raise PPLRuntimeError(f"@ (matrix multiplication) needs vectors or matrices, got values of shapes "
                              f"{sa} and {sb}", hint="use * to multiply by a number")
    inner_a, inner_b = sa[-1], sb[0] if len(sb) == 1 else sb[-2]
    if inner_a != inner_b:
        raise PPLRuntimeError(
            f"cannot apply @ to values of shapes {sa} and {sb}: the inner dimensions {inner_a} and {inner_b} differ",
            hint="a @ b pairs the last dimension of a with the first dimension of a vector b (the second to last "
                 "of a matrix b): data X of shape [n, p] times coefficients beta of length p is X @ beta")
    try:
        batch = tuple(torch.broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2])))
    except RuntimeError:
        raise PPLRuntimeError(f"cannot apply @ to values of shapes {sa} and {sb}: the batch dimensions "
                              f"{sa[:-2]} and {sb[:-2]} do not broadcast",
                              hint="stacks of matrices need equal leading dimensions (or 1)") from None
    return batch + tuple(sa[-2:-1]) + tuple(sb[-1:] if len(sb) >= 2 else ())


def matmul_tensors(a: torch.Tensor, b: torch.Tensor, lead: tuple = (0, 0)) -> torch.Tensor:
    """``a @ b`` on tensors whose first ``lead[0]`` (``lead[1]``) dims are batch dims of
    the run (the particle dim, enumeration dims), not part of each value: the values
    multiply as torch.matmul's would, the run's dims broadcast (an operand with fewer gets
    leading 1s). Integer and bool tensors multiply exactly (as int64)."""
    la, lb = lead
    sa, sb = a.shape[la:], b.shape[lb:]
    if not torch.jit.is_tracing():  # (a traced static program had its shapes checked by its eager run)
        matmul_shape(sa, sb)
    run = max(la, lb)
    a = a.reshape((1,) * (run - la) + tuple(a.shape))
    b = b.reshape((1,) * (run - lb) + tuple(b.shape))
    if a.dtype == torch.bool:
        a = a.long()
    if b.dtype == torch.bool:
        b = b.long()
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    vec_a, vec_b = len(sa) == 1, len(sb) == 1
    if vec_a:
        a = a.unsqueeze(-2)  # [.., 1, n]
    if vec_b:
        b = b.unsqueeze(-1)  # [.., n, 1]
    ra, rb = a.dim() - run, b.dim() - run  # each value's rank, now >= 2: pad the smaller
    if ra < rb:
        a = a.reshape(tuple(a.shape[:run]) + (1,) * (rb - ra) + tuple(a.shape[run:]))
    elif rb < ra:
        b = b.reshape(tuple(b.shape[:run]) + (1,) * (ra - rb) + tuple(b.shape[run:]))
    if dtype.is_floating_point or dtype.is_complex:
        out = torch.matmul(a, b)
    else:  # (integer matmul: exact, and on every device)
        out = (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)
    if vec_a:
        out = out.squeeze(-2)
    if vec_b:
        out = out.squeeze(-1)
    return out


def vector_matmul(a: Any, b: Any, exact: bool) -> Any:
    """``a @ b`` in the exact semantics: Vectors (or list literals next to one) of rank 1
    or 2 multiplied by Python sums of products, so Fractions stay exact; the same shapes
    and errors as for tensors."""
    try:
        a, b = _vector_operand(a), _vector_operand(b)
    except RaggedListError:
        raise
    except PPLRuntimeError:
        raise _matmul_operand_error(a, b) from None
    sa, sb = vector_shape(a), vector_shape(b)
    matmul_shape(sa, sb)
    if len(sa) > 2 or len(sb) > 2:
        raise PPLRuntimeError(f"@ of values of shapes {list(sa)} and {list(sb)}: stacks of matrices (more than 2 "
                              "dims) are not supported in exact enumeration",
                              hint="multiply the matrices one at a time, e.g. in a loop over the first index")

    def dot(u, v):
        total = 0
        for x, y in zip(u, v):
            total = _py_binop("+", total, _py_binop("*", x, y, exact), exact)
        return total
    columns = list(zip(*b)) if len(sb) == 2 else None
    if len(sa) == 1:
        return dot(a, b) if columns is None else Vector(dot(a, col) for col in columns)
    if columns is None:
        return Vector(dot(row, b) for row in a)
    return Vector(Vector(dot(row, col) for col in columns) for row in a)


_INT64 = (-2 ** 63, 2 ** 63)


def _fit_int64(x: Any, other: Any) -> Any:
    """A Python int operand of a tensor operation: tensors of whole numbers are 64-bit,
    so a larger int is a float next to a float tensor and an error otherwise."""
    if type(x) is not int or _INT64[0] <= x < _INT64[1]:
        return x
    if isinstance(other, torch.Tensor) and other.is_floating_point():
        try:
            return float(x)
        except OverflowError:
            pass
    raise _too_big_for_tensor(x)


def _too_big_for_tensor(x: int) -> PPLRuntimeError:
    return PPLRuntimeError(f"the integer {limits._short(x)} does not fit in 64 bits (tensors of whole numbers "
                           "are 64-bit)", hint="write it as a float to compute with it approximately, e.g. "
                           "2.0 ** 64 instead of 2 ** 64")


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool) or (isinstance(x, torch.Tensor) and x.dtype == torch.bool)


def unop(op: str, a: Any, ctx: Particles) -> Any:
    if isinstance(a, Lazy):  # (semantics.lazy)
        return a.unop(op, ctx)
    if op == "not":
        if isinstance(a, Batched):
            t = to_bool_rows(a, ctx)  # one truth value per particle: `not` of a vector is an error, as unbatched
            return Batched(~t, ctx.idx)
        if isinstance(a, PerParticle):
            return per_particle(lambda x: not truthy(x), (a,), ctx)
        return not truthy(a)
    if isinstance(a, DistributionValue):
        raise not_a_value(a, "in arithmetic")
    if isinstance(a, Batched):
        t = rows(a, ctx)
        if t.dtype == torch.bool:
            t = t.long()
        return Batched(-t if op == "-" else t, ctx.idx)
    if isinstance(a, PerParticle):
        return per_particle(operator.neg if op == "-" else operator.pos, (a,), ctx)
    if isinstance(a, Vector):  # elementwise, a bool as the int 0/1 (as for a tensor)
        return vector_map(lambda x: -x if op == "-" else +int(x) if isinstance(x, bool) else +x, a)
    if isinstance(a, torch.Tensor) and a.dtype == torch.bool:
        a = a.long()
    try:
        return -a if op == "-" else +a
    except TypeError:
        raise PPLRuntimeError(f"bad operand type for unary {op}: {describe(a)}") from None


def contains(container: Any, item: Any, ctx: Particles) -> Any:
    """``item in container`` (objects with ``ppl_contains(item, ctx)`` answer it themselves)."""
    hook = getattr(container, "ppl_contains", None)
    if hook is not None:
        return hook(item, ctx)
    if not deep_batched(item) and not deep_batched(container):
        return member(item, container)
    if isinstance(container, (list, tuple)) and all(is_numeric(x) and _is_number(x) for x in container) \
            and _is_number(item):
        out = False
        for x in container:
            out = boolop_or(out, binop("==", item, x, ctx), ctx)
        return out
    return per_particle(member, (item, container), ctx)


def member(item: Any, container: Any) -> bool:
    """One particle's ``item in container``, the same in every semantics: in a vector
    (tensor, Vector) a number is looked for among all its numbers (a non-number is an
    error); in a list or tuple, an element equal to item (of its shape: [1] is not 1);
    in a string, a substring."""
    if isinstance(container, Vector) or (isinstance(container, torch.Tensor) and container.dim() >= 1):
        if not _is_number(item):
            raise PPLRuntimeError(f"`x in v` with v a vector needs a number x, got {describe(item)}",
                                  hint="a vector holds numbers; to find a row of a matrix, compare rows: "
                                       "any(all(row == x) for row in v)")
        x = item.item() if isinstance(item, torch.Tensor) else item
        items = container.flat() if isinstance(container, Vector) else container.flatten().tolist()
        return any(x == y for y in items)
    if isinstance(container, (list, tuple)):
        return any(_eq(item, x) for x in container)
    if isinstance(container, str):
        if not isinstance(item, str):
            raise PPLRuntimeError(f"`x in s` with s a string needs a string x, got {describe(item)}")
        return item in container
    if isinstance(item, torch.Tensor) and item.dim() == 0:
        item = item.item()
    try:  # a range, ...
        return item in container
    except TypeError:
        raise PPLRuntimeError(f"`in` needs a list, vector or string on its right, got {describe(container)}") \
            from None


def _is_number(v: Any) -> bool:
    return is_scalar(v) or (isinstance(v, torch.Tensor) and v.dim() == 0) or \
        (isinstance(v, Batched) and v.t.dim() == 1)


def _eq(a, b) -> bool:
    """Equality of two elements of a list, shape included: a vector (a tensor, a Vector)
    equals only a vector of the same shape and numbers ([1] is not 1, nor the list [1])."""
    va, vb = _is_vector_value(a), _is_vector_value(b)
    if va or vb:
        return va and vb and _nested_numbers(a) == _nested_numbers(b)
    if isinstance(a, torch.Tensor):
        a = a.item()
    if isinstance(b, torch.Tensor):
        b = b.item()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return isinstance(a, list) == isinstance(b, list) and len(a) == len(b) and \
            all(_eq(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable objects are not equal
        return False


def _is_vector_value(v: Any) -> bool:
    return isinstance(v, Vector) or (isinstance(v, torch.Tensor) and v.dim() >= 1)


def _nested_numbers(v: Any) -> list:
    """A vector's numbers as nested Python lists (its shape is their nesting)."""
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return [_nested_numbers(x) if isinstance(x, Vector) else x for x in v]


def boolop_or(a: Any, b: Any, ctx: Particles) -> Any:
    if not is_batched(a) and not is_batched(b):
        return truthy(a) or truthy(b)
    ta, tb = to_bool_rows(a, ctx), to_bool_rows(b, ctx)
    if isinstance(ta, bool):
        ta = torch.full((ctx.M,), ta, device=ctx.device)
    if isinstance(tb, bool):
        tb = torch.full((ctx.M,), tb, device=ctx.device)
    return Batched(ta | tb, ctx.idx)


# ------------------------------------------------------------------------------- merging
def merge_parts(parts: Sequence[tuple[torch.Tensor, Any]], target: Particles) -> Any:
    """One value over ``target`` from values defined on parts of it.

    ``parts`` is a list of ``(idx, value)``; where parts overlap, later ones win. Used
    for assignments from a subset of particles (a write updates only its rows) and for
    joining the return values of the branches of a split."""
    vals = [v for _, v in parts]
    first = vals[0]
    if all(v is first for v in vals[1:]) and not is_batched(first):
        return first
    if len(parts) == 1 and is_batched(first):
        return restrict(first, target) if _covers(first, target) else first
    for v in vals:
        if isinstance(v, Lazy):  # (semantics.lazy)
            return type(v).merge(parts, target)
    if all(is_numeric(v) for v in vals):
        pieces = [batch_rows(v, Particles(idx, target.N, target.device, target.full)) for idx, v in parts]
        # one tensor only when every part has the same per-particle shape: broadcasting a
        # part's [3] to [3, 3] (or 0 to [0, 0]) would change its particles' values
        # (while torch.jit traces a static program, sizes are tensors; its eager run checked them)
        if torch.jit.is_tracing():
            shape = tuple(torch.broadcast_shapes(*[p.shape[1:] for p in pieces]))
        else:
            shapes = {tuple(p.shape[1:]) for p in pieces}
            shape = shapes.pop() if len(shapes) == 1 else None
        if shape is not None:
            pieces = _promote(pieces)
            out = torch.empty((target.M, *shape), dtype=pieces[0].dtype, device=target.device)
            for (idx, _), p in zip(parts, pieces):
                out[target.positions(idx)] = p.expand(p.shape[0], *shape)
            return Batched(out, target.idx)
    if all(isinstance(v, (list, tuple)) for v in vals) and len({(type(v), len(v)) for v in vals}) == 1:
        kind = type(first)
        return kind(merge_parts([(idx, v[i]) for idx, v in parts], target) for i in range(len(first)))
    out: list = [None] * target.M
    for idx, v in parts:
        sub = Particles(idx, target.N, target.device, target.full)
        for pos, item in zip(target.positions(idx).tolist(), materialize(v, sub)):
            out[pos] = item
    return PerParticle(out, target.idx)


def _covers(v: Batched | PerParticle, target: Particles) -> bool:
    if v.idx is target.idx or v.idx is target.full.idx:
        return True
    try:
        _positions_of(v.idx, target)
        return True
    except Undefined:
        return False


# --------------------------------------------------------------------------- descriptions
def describe(v: Any) -> str:
    """A short, user-facing description of a runtime value's type."""
    if isinstance(v, Batched):
        s = tuple(v.t.shape[1:])
        kind = {torch.bool: "bool", torch.long: "int"}.get(v.t.dtype, "float")
        return f"{kind}" + (f" tensor of shape {s}" if s else "")
    if isinstance(v, PerParticle):
        return "per-particle value"
    if isinstance(v, Vector):
        return f"tensor of shape {tuple(v.shape)}"  # as the tensor it is under sampling
    if isinstance(v, torch.Tensor):
        return f"tensor of shape {tuple(v.shape)}" if v.dim() else "number"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, Number):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "list"
    if isinstance(v, tuple):
        return "tuple"
    if v is None:
        return "None"
    return getattr(v, "describe", lambda: type(v).__name__)()


def to_python(v: Any) -> Any:
    """An unbatched runtime value as plain Python (tensors to lists/scalars)."""
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, list):
        return [to_python(x) for x in v]
    if isinstance(v, tuple):  # (a Vector stays one: numeric data is a vector)
        return (Vector if isinstance(v, Vector) else tuple)(to_python(x) for x in v)
    return v
