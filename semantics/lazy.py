"""Lazy values: per-particle values that are not concrete yet.

A *lazy value* stands for a value that a method keeps symbolic instead of drawing it: an
enumerated choice (``z ~ categorical(w) @enumerate``: all of z's values at once, as an extra
enumeration dimension, ``semantics.enumerate_sites``) or a delayed one (a variable that stays
a distribution until it must be sampled). The interpreter never builds one itself: a
middleware answers a ``SampleEffect`` with one, and the program computes with it.

The protocol is the class ``Lazy``: the interpreter's operations hand a lazy operand to it
instead of computing, through a few hook points, each one ``isinstance`` test placed after
the common case (a program without lazy values pays nothing measurable):

* ``values.binop``   -> ``a.binop(op, b, ctx, swapped=False)`` or ``b.binop(op, a, ctx, swapped=True)``
                        (the left operand first when both are lazy);
* ``values.unop``    -> ``a.unop(op, ctx)`` (``-``, ``+``, ``not``);
* ``values.to_bool_rows`` (``if``, ``while``, ``and``/``or``, ``condition`` on a split)
                     -> ``v.truth(ctx)``;
* ``values.merge_parts`` (a variable written on a branch, the join of branches)
                     -> ``Lazy.merge(parts, target)`` of the first lazy part's class;
* ``interpreter._index`` -> ``v.getitem(i, ctx)`` (``v[i]``, v lazy) or ``i.index_of(v, ctx)``
                        (``v[i]``, the index lazy);
* ``interpreter._only_for`` (a variable first assigned on one branch): a lazy value is kept as
  it is (it must know its own particles, and refuse to be read for others);
* ``IfExp`` (``a if c else b``, c lazy, both branches pure) -> ``c.where(a, b, ctx)`` with
  both branches evaluated for every particle of ctx;
* a call of a built-in function with a lazy argument (``_call_builtin``, checked only while
  a lazy run is live: ``LIVE``) -> ``v.call_arg(name, ctx)`` for each lazy argument, whose
  result is passed instead (a distribution constructor takes lazy arguments as they are).

Every method has a default that calls ``force(ctx, use)``: a concrete runtime value
(``values.Batched``...) for the particles of ctx, or a located ``PPLRuntimeError`` saying
that this use needs a concrete value (the default: enumerated values cannot be forced
inside an expression, because drawing them there would need an effect). A subclass
overrides what it can do lazily; what it cannot, it forces (or refuses).

``LIVE[0]`` counts the runs (in any thread) that may hold lazy values; the middleware
that makes them increments it for the run's duration (``live_run``).
"""
from __future__ import annotations

import contextlib
from typing import Any

from .errors import PPLRuntimeError

#: how many runs that may create lazy values are in progress (any thread)
LIVE = [0]


@contextlib.contextmanager
def live_run():
    """Mark a run that may create lazy values (enables the built-in call check)."""
    LIVE[0] += 1
    try:
        yield
    finally:
        LIVE[0] -= 1


class Lazy:
    """A per-particle value that is not concrete yet (see the module docstring)."""

    __slots__ = ()

    #: whether a built-in that failed on a list/tuple holding this value is called again with
    #: it forced (``forced_in_containers``; delayed values say yes, enumerated ones no)
    force_in_containers = False

    # -- what a subclass must say
    def describe(self) -> str:
        return "lazy value"

    def force(self, ctx, use: str) -> Any:
        """A concrete value for the particles of ctx, or a PPLRuntimeError (``use`` says
        what needed it, e.g. "as a condition")."""
        raise PPLRuntimeError(f"a {self.describe()} cannot be used {use}")

    # -- operations: the defaults force, then compute as usual
    def binop(self, op: str, other: Any, ctx, swapped: bool) -> Any:
        from .values import binop
        mine = self.force(ctx, "in arithmetic" if op not in ("==", "!=", "<", "<=", ">", ">=") else "in a comparison")
        if isinstance(other, Lazy):
            other = other.force(ctx, "in arithmetic")
        return binop(op, other, mine, ctx) if swapped else binop(op, mine, other, ctx)

    def unop(self, op: str, ctx) -> Any:
        from .values import unop
        return unop(op, self.force(ctx, "in arithmetic"), ctx)

    def truth(self, ctx) -> Any:
        from .values import to_bool_rows
        return to_bool_rows(self.force(ctx, "as a condition (control flow)"), ctx)

    def getitem(self, index: Any, ctx) -> Any:
        from .interpreter import _index
        return _index(self.force(ctx, "as an indexed value"), index, ctx)

    def index_of(self, container: Any, ctx) -> Any:
        from .interpreter import _index
        return _index(container, self.force(ctx, "as an index"), ctx)

    def where(self, then: Any, orelse: Any, ctx) -> Any:
        from .values import merge_parts, to_bool_rows
        c = to_bool_rows(self.force(ctx, "as a condition"), ctx)
        if isinstance(c, bool):
            return then if c else orelse
        parts = [(p.idx, v) for p, v in ((ctx.subset(c), then), (ctx.subset(~c), orelse)) if p is not None]
        return merge_parts(parts, ctx)

    def call_arg(self, name: str, ctx) -> Any:
        return self.force(ctx, f"as an argument of {name}()")

    @classmethod
    def merge(cls, parts, target) -> Any:
        from .values import merge_parts
        forced = []
        for idx, v in parts:
            if isinstance(v, Lazy):
                from .values import Particles
                v = v.force(Particles(idx, target.N, target.device, target.full), "on one branch of an `if`")
            forced.append((idx, v))
        return merge_parts(forced, target)

    # the interpreter's indexing hook for objects that are not lists/tensors
    def ppl_index(self, index: Any, ctx) -> Any:
        return self.getitem(index, ctx)


def lazy_binop(op: str, a: Any, b: Any, ctx) -> Any:
    """``a op b`` where a or b is lazy: the left lazy operand decides."""
    if isinstance(a, Lazy):
        return a.binop(op, b, ctx, False)
    return b.binop(op, a, ctx, True)


def lazy_call_args(name: str, args: list, kwargs: dict, ctx, accepts_lazy: bool):
    """The arguments of a built-in call with lazy ones replaced by ``call_arg``'s value
    (as they are when the built-in accepts lazy arguments: a distribution constructor)."""
    if accepts_lazy:
        return args, kwargs
    args = [a.call_arg(name, ctx) if isinstance(a, Lazy) else a for a in args]
    kwargs = {k: (v.call_arg(name, ctx) if isinstance(v, Lazy) else v) for k, v in kwargs.items()}
    return args, kwargs


def forced_in_containers(args: list, kwargs: dict, name: str, ctx):
    """(args, kwargs) with every lazy value inside a list or tuple whose class has
    ``force_in_containers`` forced (``call_arg``), or None when there is none: for a
    built-in that failed on such a list (``max([a, b])``); one that can use them as they
    are (``sum``, through ``binop``) never gets here."""
    found = [False]

    def walk(v):
        if isinstance(v, Lazy) and type(v).force_in_containers:
            found[0] = True
            return v.call_arg(name, ctx)
        if isinstance(v, (list, tuple)) and has_lazy(v):
            return type(v)(walk(x) for x in v)
        return v
    args = [walk(a) if isinstance(a, (list, tuple)) else a for a in args]
    kwargs = {k: walk(v) if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()}
    return (args, kwargs) if found[0] else None


def has_lazy(v: Any) -> bool:
    """Whether v is lazy or a list/tuple holding a lazy value (at any depth)."""
    if isinstance(v, Lazy):
        return True
    if isinstance(v, (list, tuple)):
        return any(has_lazy(x) for x in v)
    return False
