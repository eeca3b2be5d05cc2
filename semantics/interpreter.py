"""The sampling semantics: run a program for a population of particles at once.

``Interpreter.run(entry, data, particles)`` is a generator. It executes the IR once for
all particles (values are batched, see ``semantics.values``) and *yields an effect* at
every random choice and every likelihood site:

* ``SampleEffect``  (``x ~ d``)            -> the driver sends back the value of x
* ``ObserveEffect`` (``observe v ~ d``)    -> the driver scores v under d
* ``FactorEffect``  (``factor e``)         -> the driver adds e to the log weight
* ``ConditionEffect`` (``condition e``)    -> the driver zeroes the weight where e fails

Each effect carries its address, the particles it applies to, and its source span.
The driver ("handler") gives the effects their meaning: draw from the prior and weight
by the likelihood (importance sampling), replay a trace and sum log densities (the log
joint), or branch over a finite support (exact enumeration). The interpreter itself
never draws a random number, so one interpreter serves every semantics.

Control flow that depends on a random value splits the particles: each branch runs on
its own subset, assignments in a branch update only that subset's rows, and returns
are joined per particle. Recursion (``return 0 if b else 1 + geometric(p)``) thus runs
level by level on ever smaller batches, and terminates exactly when each particle's
own recursion does.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Generator, Optional

import torch

from . import branchless, ir, limits
from .dist_values import DistValue, ProposedDist
from .errors import PPLError, PPLRecursionError, PPLRuntimeError, did_you_mean
from .lazy import LIVE, Lazy, forced_in_containers, lazy_call_args
from .values import (Batched, Particles, PerParticle, Undefined, batch_rows, binop,
                     deep_batched, describe, is_batched, is_numeric, materialize, merge_parts, pack,
                     reject_distribution, restrict, rows, to_bool_rows, truthy, unop, as_tensor, Vector)


# -------------------------------------------------------------------------------- effects
@dataclass
class SampleEffect:
    addr: str
    dist: DistValue
    ctx: Particles
    span: Any
    enumerate: bool = False  # marked ``@enumerate`` (``semantics.enumerate_sites`` may sum it out)


@dataclass
class ObserveEffect:
    addr: str
    dist: DistValue
    value: Any
    ctx: Particles
    span: Any


@dataclass
class FactorEffect:
    addr: str
    value: Any
    ctx: Particles
    span: Any


@dataclass
class ConditionEffect:
    addr: str
    value: Any
    ctx: Particles
    span: Any


@dataclass
class TwistEffect:
    """``twist(phi)``: a potential for the intermediate targets of SMC. The weight is
    multiplied by exp(phi - previous phi), and by exp(-last phi) at the end, so the
    program's measure is unchanged (handlers without a ``twist`` method ignore it)."""
    addr: str
    value: Any
    ctx: Particles
    span: Any


# ------------------------------------------------------------------------------ functions
class Closure:
    """A user function (``def`` or ``lambda``) with the frame it was defined in."""

    __slots__ = ("name", "params", "body", "env", "span")

    def __init__(self, name, params, body, env, span):
        self.name, self.params, self.body, self.env, self.span = name, params, body, env, span

    def describe(self) -> str:
        return f"function '{self.name}'"


class Builtin:
    """A prelude function. ``fn(ctx, *args)``; higher-order ones (that call back into
    the model, like ``map``) are generators ``fn(interp, ctx, frame, span, *args)``."""

    __slots__ = ("name", "fn", "higher_order", "arity", "pure")

    def __init__(self, name, fn, arity=(0, None), higher_order=False, pure=True):
        self.name, self.fn, self.arity = name, fn, arity
        self.higher_order = higher_order
        self.pure = pure and not higher_order

    def describe(self) -> str:
        return f"built-in '{self.name}'"


class MemFn:
    """``mem(f)``: f with per-particle memoisation of its results by argument value,
    so a random function becomes a random *value* (each particle draws f(a) once)."""

    __slots__ = ("fn", "name", "table")

    def __init__(self, fn, name):
        self.fn, self.name, self.table = fn, name, {}

    def describe(self) -> str:
        return f"memoised function '{self.name}'"


# --------------------------------------------------------------------------------- frames
class Frame:
    """Local variables of one call, for the particles that made the call."""

    __slots__ = ("vars", "parent", "particles", "path", "depth", "counters", "loops", "returns")

    def __init__(self, parent, particles, path="", depth=0):
        self.vars: dict[str, Any] = {}
        self.parent = parent
        self.particles = particles
        self.path = path
        self.depth = depth
        self.counters: dict[str, int] = {}
        self.loops: list[int] = []
        self.returns: list = []

    def lookup(self, name: str) -> Any:
        f = self
        while f is not None:
            v = f.vars.get(name, _MISSING)
            if v is not _MISSING:
                return v
            f = f.parent
        raise KeyError(name)

    def all_names(self):
        f, out = self, set()
        while f is not None:
            out.update(f.vars)
            f = f.parent
        return out

    def address(self, name: str) -> str:
        """A fresh address for ``name`` in this frame: loop indices appended, and
        '#k' when the same name is reached again at the same indices."""
        loops = self.loops
        if not loops:
            key = name
        elif len(loops) == 1:  # the common case, without building a list
            key = f"{name}[{loops[0]}]"
        else:
            key = name + "".join([f"[{i}]" for i in loops])
        k = self.counters.get(key, 0)
        self.counters[key] = k + 1
        return self.path + (key if k == 0 else f"{key}#{k}")


_MISSING = object()

_STMT_ERRORS = (PPLError, RecursionError, MemoryError, TypeError, ValueError, RuntimeError, IndexError,
                ZeroDivisionError, OverflowError)


def _located(err: BaseException, span) -> PPLError:
    """The error a statement at ``span`` raises for ``err`` (one of ``_STMT_ERRORS``): the
    project's own, located; a Python error is never shown raw."""
    if isinstance(err, PPLError):
        return err.with_span(span)
    if isinstance(err, RecursionError):
        out = PPLRecursionError("recursion too deep", span, "check that the recursion terminates, or lower its depth")
    elif isinstance(err, MemoryError):
        out = PPLRuntimeError("out of memory", span, limits.MEMORY_HINT)
    else:
        out = PPLRuntimeError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", span)
        out.__cause__, out.__suppress_context__ = err, True  # (raise ... from err)
        return out
    out.__cause__, out.__suppress_context__ = None, True  # (raise ... from None)
    return out


class _SliceValue:
    __slots__ = ("lo", "hi")

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi


class RaggedRange(PerParticle):
    """``range(n)`` where n differs between particles. ``for`` runs it as a batched
    loop from its bounds; everything else sees what it is per particle, a Python range
    (the ``items`` of a PerParticle, built on first use), so ``len``, ``sum``, ``map``,
    ``filter``, ``in``, ... mean what they mean for each particle alone."""

    __slots__ = ("start", "stop", "_ctx")

    def __init__(self, start, stop, ctx: Particles):
        PerParticle.__init__(self, None, ctx.idx)
        self.start, self.stop, self._ctx = start, stop, ctx

    def _select(self, sel):
        if self._items is not None:  # not built yet: only the particle set moves
            PerParticle._select(self, sel)

    @property
    def items(self) -> list:
        idx = self.idx  # catches up with resampling first
        if self._items is None:
            ctx = Particles(idx, self._ctx.N, self._ctx.device, self._ctx.full)
            self._items = [range(_int_index(a), _int_index(b)) for a, b in
                           zip(materialize(self.start, ctx), materialize(self.stop, ctx))]
        return self._items

    def describe(self) -> str:
        return "range"


# ---------------------------------------------------------------------------- interpreter
class Interpreter:
    """Runs a program; see the module docstring. ``exact=True`` reads float literals as
    exact rationals and divides integers exactly (used by the enumeration semantics)."""

    def __init__(self, program: ir.Program, builtins: dict[str, Any], *, exact: bool = False,
                 max_depth: int | None = None, max_iterations: int | None = None):
        self.program = program
        self.exact = exact
        bounds = limits.current()  # None: the process-wide limits (semantics.limits)
        self.max_depth = bounds.max_depth if max_depth is None else max_depth
        self.max_iterations = bounds.max_iterations if max_iterations is None else max_iterations
        # (``globals``, the frame of the builtins and the program's functions, is made on first use:
        # ``__getattr__``; exact enumeration by recipes never needs it)
        self._purity_inputs = (builtins, _bound_names(program))  # (``_pure_builtins``, made on first use)
        self._pure_names: set | None = None
        self._pure_cache: dict[int, bool] = {}
        self._select_plans: dict[int, Any] = {}  # id(IfExp/If) -> its ``semantics.branchless`` plan
        if sys.getrecursionlimit() < 20_000:
            sys.setrecursionlimit(20_000)

    def __getattr__(self, name: str):
        """``globals`` (made here on first use, then an ordinary attribute)."""
        if name != "globals":
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        g = Frame(None, None)
        g.vars.update(self._purity_inputs[0])
        for f in self.program.functions:
            g.vars[f.name] = Closure(f.name, f.params, f.body, g, f.span)
        self.globals = g
        return g

    def builtins_frame(self) -> Frame:
        """A frame of the builtins alone (the dict the interpreter was given, not copied):
        for evaluating pure expressions that read no function of the program (in
        ``globals`` a function shadows a builtin of its name). Nothing may write to it."""
        fr = Frame(None, None)
        fr.vars = self._purity_inputs[0]
        return fr

    # ----------------------------------------------------------------------------- entry
    def run(self, entry: str, data: dict, ctx: Particles) -> Generator:
        """Call the entry function with ``data`` bound to its parameters, for ``ctx``."""
        f = self.globals.vars[entry]
        return (yield from self.call_closure(f, [], dict(data), ctx, f.span, self.globals, top=True))

    # --------------------------------------------------------------------------- purity
    @property
    def _pure_builtins(self) -> set:
        """The names of the pure builtins the program does not rebind (made on first use:
        a run that evaluates no effect-free expression through ``pure`` never needs them)."""
        if self._pure_names is None:
            builtins, bound = self._purity_inputs
            self._pure_names = {n for n, b in builtins.items() if isinstance(b, Builtin) and b.pure} - bound
        return self._pure_names

    def pure(self, e: ir.Expr) -> bool:
        """Whether evaluating e can yield no effect (no call into model code)."""
        r = self._pure_cache.get(id(e))
        if r is None:
            if isinstance(e, ir.Call):
                r = (isinstance(e.func, ir.Var) and e.func.name in self._pure_builtins
                     and all(self.pure(a) for a in e.args) and all(self.pure(k.value) for k in e.kwargs))
            elif isinstance(e, ir.Lambda):
                r = True
            else:
                r = all(self.pure(c) for c in ir.children(e))
            self._pure_cache[id(e)] = r
        return r

    # ----------------------------------------------------------------- pure expressions
    def pv(self, e: ir.Expr, fr: Frame, ctx: Particles) -> Any:
        """Evaluate a pure expression (no effects possible): a plain function call."""
        t = type(e)
        if t is ir.Var:  # = fr.lookup(e.name), inlined (the most frequent expression)
            name, f = e.name, fr
            while f is not None:
                v = f.vars.get(name, _MISSING)
                if v is not _MISSING:
                    return v
                f = f.parent
            raise PPLRuntimeError(f"name '{name}' is not defined", e.span, did_you_mean(name, fr.all_names()))
        if t is ir.Const:
            v = e.value
            if self.exact and isinstance(v, float):
                return _exact_literal(v)
            return v
        if t is ir.BinOp:
            a, b = self.pv(e.left, fr, ctx), self.pv(e.right, fr, ctx)
            try:  # (= self._binop, inlined: the most frequent operation)
                return binop(e.op, a, b, ctx, self.exact)
            except PPLError as err:
                raise err.with_span(e.span)
        if t is ir.Call:
            f = self.pv(e.func, fr, ctx)
            args = [self.pv(a, fr, ctx) for a in e.args]
            kwargs = {k.name: self.pv(k.value, fr, ctx) for k in e.kwargs} if e.kwargs else {}
            return self._call_builtin(f, args, kwargs, ctx, e.span)
        if t is ir.UnaryOp:
            return self._guard(unop, e.span, e.op, self.pv(e.operand, fr, ctx), ctx)
        if t is ir.Index:
            v = self.pv(e.value, fr, ctx)
            i = self._slice(e.index, fr, ctx) if isinstance(e.index, ir.Slice) else self.pv(e.index, fr, ctx)
            try:  # (= self._index(v, i, ctx, e.span), inlined)
                return _index(v, i, ctx)
            except PPLError as err:
                raise err.with_span(e.span)
        if t is ir.ListExpr:
            return [self.pv(x, fr, ctx) for x in e.items]
        if t is ir.TupleExpr:
            return tuple(self.pv(x, fr, ctx) for x in e.items)
        if t is ir.Lambda:
            return Closure("lambda", _lambda_params(e), e.body, fr, e.span)
        if t is ir.IfExp:
            c = self.pv(e.cond, fr, ctx)
            if isinstance(c, Lazy):  # (semantics.lazy: both branches, for every particle)
                return self._guard(c.where, e.span, self.pv(e.then, fr, ctx), self.pv(e.orelse, fr, ctx), ctx)
            if type(c) is Batched and self._select_plan(e):  # (semantics.branchless: no split)
                v = branchless.ifexp(self, e, c, fr, ctx)
                if v is not None:
                    return v
            tc, fc = self.split(c, ctx, e.cond.span)
            if fc is None:
                return self.pv(e.then, fr, tc)
            if tc is None:
                return self.pv(e.orelse, fr, fc)
            return merge_parts([(tc.idx, self.pv(e.then, fr, tc)), (fc.idx, self.pv(e.orelse, fr, fc))], ctx)
        if t is ir.BoolOp:
            left = self.pv(e.left, fr, ctx)
            rest = self._boolop_rest(e, left, ctx)
            if rest is None:
                return left
            sub, parts = rest
            parts.append((sub.idx, self.pv(e.right, fr, sub)))
            return merge_parts(parts, ctx)
        if t is ir.Attr:
            return self._attr(self.pv(e.value, fr, ctx), e)
        if t is ir.Slice:
            return self._slice(e, fr, ctx)
        raise PPLRuntimeError(f"cannot evaluate {t.__name__}", e.span)

    def _slice(self, e, fr, ctx):
        lo = self.pv(e.lo, fr, ctx) if e.lo is not None else None
        hi = self.pv(e.hi, fr, ctx) if e.hi is not None else None
        return _SliceValue(lo, hi)

    def _index_arg(self, e, fr, ctx):
        return self._slice(e, fr, ctx) if isinstance(e, ir.Slice) else self.pv(e, fr, ctx)

    # ------------------------------------------------------------ effectful expressions
    def ev(self, e: ir.Expr, fr: Frame, ctx: Particles) -> Generator:
        """Evaluate any expression; yields the effects of the model code it calls."""
        if self.pure(e):
            return self.pv(e, fr, ctx)
        t = type(e)
        if t is ir.Call:  # (a pure part through pv: what ev does first, without a generator)
            pure = self.pure
            f = self.pv(e.func, fr, ctx) if pure(e.func) else (yield from self.ev(e.func, fr, ctx))
            args = []
            for a in e.args:
                args.append(self.pv(a, fr, ctx) if pure(a) else (yield from self.ev(a, fr, ctx)))
            kwargs = {}
            for k in e.kwargs:
                kwargs[k.name] = self.pv(k.value, fr, ctx) if pure(k.value) else (yield from self.ev(k.value, fr, ctx))
            try:
                return (yield from self.call(f, args, kwargs, ctx, e.span, fr))
            except PPLError as err:
                raise err.with_span(e.span)
        if t is ir.BinOp:
            a = yield from self.ev(e.left, fr, ctx)
            b = yield from self.ev(e.right, fr, ctx)
            return self._binop(e, a, b, ctx)
        if t is ir.UnaryOp:
            a = yield from self.ev(e.operand, fr, ctx)
            return self._guard(unop, e.span, e.op, a, ctx)
        if t is ir.Index:
            v = yield from self.ev(e.value, fr, ctx)
            if isinstance(e.index, ir.Slice):
                lo = (yield from self.ev(e.index.lo, fr, ctx)) if e.index.lo is not None else None
                hi = (yield from self.ev(e.index.hi, fr, ctx)) if e.index.hi is not None else None
                i = _SliceValue(lo, hi)
            else:
                i = yield from self.ev(e.index, fr, ctx)
            return self._index(v, i, ctx, e.span)
        if t is ir.ListExpr or t is ir.TupleExpr:
            out = []
            for x in e.items:
                out.append((yield from self.ev(x, fr, ctx)))
            return out if t is ir.ListExpr else tuple(out)
        if t is ir.IfExp:
            c = yield from self.ev(e.cond, fr, ctx)
            if isinstance(c, Lazy) and self.pure(e.then) and self.pure(e.orelse):  # (semantics.lazy)
                return self._guard(c.where, e.span, self.pv(e.then, fr, ctx), self.pv(e.orelse, fr, ctx), ctx)
            if type(c) is Batched and self._select_plan(e):  # (semantics.branchless: no split)
                v = branchless.ifexp(self, e, c, fr, ctx)
                if v is not None:
                    return v
            tc, fc = self.split(c, ctx, e.cond.span)
            if fc is None:
                return (yield from self.ev(e.then, fr, tc))
            if tc is None:
                return (yield from self.ev(e.orelse, fr, fc))
            a = yield from self.ev(e.then, fr, tc)
            b = yield from self.ev(e.orelse, fr, fc)
            return merge_parts([(tc.idx, a), (fc.idx, b)], ctx)
        if t is ir.BoolOp:
            left = yield from self.ev(e.left, fr, ctx)
            rest = self._boolop_rest(e, left, ctx)
            if rest is None:
                return left
            sub, parts = rest
            parts.append((sub.idx, (yield from self.ev(e.right, fr, sub))))
            return merge_parts(parts, ctx)
        if t is ir.Attr:
            v = yield from self.ev(e.value, fr, ctx)
            return self._attr(v, e)
        raise PPLRuntimeError(f"cannot evaluate {t.__name__}", e.span)

    def _boolop_rest(self, e, left, ctx):
        """Short-circuit: None if ``left`` decides for every particle, else the subset
        where the right side must run and the parts already decided."""
        tc, fc = self.split(left, ctx, e.left.span)
        decided, undecided = (tc, fc) if e.op == "or" else (fc, tc)
        if undecided is None:
            return None
        parts = [] if decided is None else [(decided.idx, left)]
        return undecided, parts

    def _binop(self, e, a, b, ctx):
        return self._guard(binop, e.span, e.op, a, b, ctx, self.exact)

    def _select_plan(self, node):
        """``semantics.branchless``'s plan for a conditional (cached per node): truthy
        when it may run without splitting its particles."""
        plan = self._select_plans.get(id(node), _MISSING)
        if plan is _MISSING:
            if self.exact:
                plan = None
            elif type(node) is ir.IfExp:
                plan = branchless.ifexp_plan(node)
            else:
                plan = branchless.if_plan(node)
            self._select_plans[id(node)] = plan
        return plan

    @staticmethod
    def _guard(fn, span, *args):
        try:
            return fn(*args)
        except PPLError as err:
            raise err.with_span(span)

    # ------------------------------------------------------------------------ splitting
    def split(self, cond: Any, ctx: Particles, span=None):
        """(particles where cond holds, particles where it fails); either may be None."""
        try:
            c = to_bool_rows(cond, ctx)
        except PPLError as err:
            raise err.with_span(span)
        if isinstance(c, bool):
            return (ctx, None) if c else (None, ctx)
        if bool(c.all()):
            return ctx, None
        if not bool(c.any()):
            return None, ctx
        return ctx.subset(c), ctx.subset(~c)

    def split_by_key(self, keys: list, ctx: Particles):
        """Group the particles of ctx by a per-particle Python key: [(key, particles)]."""
        return ctx.split(keys, _hashable)

    # ------------------------------------------------------------------------ statements
    def exec_block(self, stmts, fr: Frame, ctx: Particles) -> Generator:
        """Run statements; returns the particles still running (None if all returned)."""
        for s in stmts:
            try:  # (= yield from self.exec_stmt(s, fr, ctx), inlined: one generator less per statement)
                live = yield from self._STMTS[type(s)](self, s, fr, ctx)
            except _STMT_ERRORS as err:
                raise _located(err, s.span)
            if live is None:
                return None
            if live is not ctx and ctx is fr.particles:
                fr.particles = live  # particles that returned never read this frame again
            ctx = live
        return ctx

    def exec_stmt(self, s: ir.Stmt, fr: Frame, ctx: Particles) -> Generator:
        try:
            return (yield from self._STMTS[type(s)](self, s, fr, ctx))
        except _STMT_ERRORS as err:
            raise _located(err, s.span)

    def _eval(self, e, fr, ctx):
        if self.pure(e):
            return self.pv(e, fr, ctx)
        return (yield from self.ev(e, fr, ctx))

    def _s_assign(self, s: ir.Assign, fr, ctx):
        v = self.pv(s.value, fr, ctx) if self.pure(s.value) else (yield from self.ev(s.value, fr, ctx))
        self.bind(fr, s.target, v, ctx)
        return ctx

    def _s_sample(self, s: ir.Sample, fr, ctx):
        d = self.pv(s.dist, fr, ctx) if self.pure(s.dist) else (yield from self.ev(s.dist, fr, ctx))
        if type(d) is not DistValue:  # (the common case needs no _as_dist call)
            d = self._as_dist(d, s.dist)
        v = yield SampleEffect(fr.address(s.target), d, ctx, s.span, s.enumerate)
        self.assign(fr, s.target, v, ctx)
        if not self.exact and getattr(getattr(d, "target", d), "log_mass", None) is not None:  # (mass_factor's test)
            yield from self.mass_factor(d, v, fr, ctx, s.span)
        return ctx

    def mass_factor(self, d, v, fr, ctx, span):
        """A distribution of total mass below 1 (a constrained language-model choice,
        ``allowed=``) is sampled and scored by its normalisation; its mass is then a
        factor right after the choice (exact enumeration uses the masses directly)."""
        mass = None if self.exact else getattr(getattr(d, "target", d), "log_mass", None)
        if mass is not None:
            w = mass(v, ctx)
            if w is not None:
                yield FactorEffect(fr.address(f"mass@{span.line}:{span.col}"), w, ctx, span)

    def _s_observe(self, s: ir.Observe, fr, ctx):
        v = self.pv(s.value, fr, ctx) if self.pure(s.value) else (yield from self.ev(s.value, fr, ctx))
        d = self.pv(s.dist, fr, ctx) if self.pure(s.dist) else (yield from self.ev(s.dist, fr, ctx))
        if type(d) is not DistValue:  # (the common case needs no _as_dist call)
            d = self._as_dist(d, s.dist)
        yield ObserveEffect(fr.address(f"obs@{s.span.line}:{s.span.col}"), d, v, ctx, s.span)
        if not self.exact and getattr(getattr(d, "target", d), "log_mass", None) is not None:  # (mass_factor's test)
            yield from self.mass_factor(d, v, fr, ctx, s.span)
        return ctx

    def _s_factor(self, s: ir.Factor, fr, ctx):
        v = yield from self._eval(s.expr, fr, ctx)
        reject_distribution(v, "as a factor (a number)")
        yield FactorEffect(fr.address(f"factor@{s.span.line}:{s.span.col}"), v, ctx, s.span)
        return ctx

    def _s_condition(self, s: ir.Condition, fr, ctx):
        v = yield from self._eval(s.expr, fr, ctx)
        yield ConditionEffect(fr.address(f"cond@{s.span.line}:{s.span.col}"), v, ctx, s.span)
        return ctx

    def _s_expr(self, s: ir.ExprStmt, fr, ctx):
        yield from self._eval(s.expr, fr, ctx)
        return ctx

    def _s_pass(self, s, fr, ctx):
        return ctx
        yield  # pragma: no cover  (makes this a generator)

    def _s_return(self, s: ir.Return, fr, ctx):
        v = None if s.value is None else (yield from self._eval(s.value, fr, ctx))
        if fr.depth == 1:  # the entry function's result is a value, never a distribution
            reject_distribution(v, "as the model's result")
        fr.returns.append((ctx, v))
        return None

    def _s_def(self, s: ir.FunctionDef, fr, ctx):
        self.assign(fr, s.name, Closure(s.name, s.params, s.body, fr, s.span), ctx)
        return ctx
        yield  # pragma: no cover

    def _s_if(self, s: ir.If, fr, ctx):
        c = yield from self._eval(s.cond, fr, ctx)
        if type(c) is Batched:  # (semantics.branchless: bodies that only assign, without a split)
            plan = self._select_plan(s)
            if plan and branchless.if_statement(self, plan, c, s, fr, ctx):
                return ctx
        tc, fc = self.split(c, ctx, s.cond.span)
        if fc is None:
            return (yield from self.exec_block(s.then, fr, tc))
        if tc is None:
            return (yield from self.exec_block(s.orelse, fr, fc))
        saved = fr.counters
        fr.counters = dict(saved)
        live_t = yield from self.exec_block(s.then, fr, tc)
        counters_t, fr.counters = fr.counters, dict(saved)
        live_f = yield from self.exec_block(s.orelse, fr, fc)
        for k, n in counters_t.items():  # addresses stay unique on both paths
            fr.counters[k] = max(n, fr.counters.get(k, 0))
        return ctx.union([live_t, live_f])

    def _s_for(self, s: ir.For, fr, ctx):
        it = yield from self._eval(s.iterable, fr, ctx)
        items = self.iter_items(it, ctx, s.iterable.span)
        if items is not None:
            self.check_iterations(len(items), s.span, "loop")
            for i, item in enumerate(items):
                self.bind(fr, s.target, item, ctx)
                fr.loops.append(i)
                try:
                    ctx = yield from self.exec_block(s.body, fr, ctx)
                finally:
                    fr.loops.pop()
                if ctx is None:
                    return None
            return ctx
        lengths, element = self.ragged(it, ctx)
        return (yield from self._loop(s, fr, ctx, lambda k, c: Batched(rows(lengths, c) > k, c.idx),
                                      lambda k, c: self.bind(fr, s.target, element(k, c), c)))

    def check_iterations(self, n: int, span, what: str = "loop") -> None:
        """A loop (or map/filter/fold) over ``n`` items longer than ``max_iterations`` is
        an error before its first iteration (a ``while`` loop fails when it gets there)."""
        if n > self.max_iterations:
            raise PPLRuntimeError(f"this {what} would run {n:,} iterations, more than the limit of "
                                  f"{self.max_iterations:,} (max_iterations)", span, _ITERATIONS_HINT)

    def _s_while(self, s: ir.While, fr, ctx):
        return (yield from self._loop(s, fr, ctx, None, None))

    def _loop(self, s, fr, ctx, has_next, bind_item):
        """A loop whose number of iterations differs between particles: particles leave
        as their own condition fails, the rest iterate on."""
        exited = []
        active = ctx
        k = 0
        while active is not None:
            if has_next is None:
                c = yield from self._eval(s.cond, fr, active)
            else:
                c = has_next(k, active)
            cont, done = self.split(c, active, (s.cond if isinstance(s, ir.While) else s.iterable).span)
            if done is not None:
                exited.append(done)
            if cont is None:
                break
            if k >= self.max_iterations:
                raise PPLRuntimeError(f"loop ran more than {self.max_iterations} iterations", s.span,
                                      _ITERATIONS_HINT)
            if bind_item is not None:
                bind_item(k, cont)
            fr.loops.append(k)
            try:
                active = yield from self.exec_block(s.body, fr, cont)
            finally:
                fr.loops.pop()
            k += 1
        return ctx.union(exited)

    _STMTS: dict = {}

    # ------------------------------------------------------------------------- bindings
    def bind(self, fr: Frame, target, v, ctx):
        if isinstance(target, str):
            self.assign(fr, target, v, ctx)
            return
        parts = self.unpack(v, len(target), ctx)
        for name, part in zip(target, parts):
            self.assign(fr, name, part, ctx)

    def unpack(self, v, n, ctx):
        if isinstance(v, (list, tuple)):
            if len(v) != n:
                raise PPLRuntimeError(f"cannot unpack {len(v)} values into {n} names")
            return list(v)
        if isinstance(v, Batched) and v.t.dim() >= 2 and v.t.shape[1] == n:
            t = rows(v, ctx)
            return [Batched(t[:, i], ctx.idx) for i in range(n)]
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n:
            return list(v.unbind(0))
        if isinstance(v, PerParticle):
            items = rows(v, ctx)
            if any(len(x) != n for x in items):
                raise PPLRuntimeError(f"cannot unpack into {n} names: lengths differ")
            return [pack([x[i] for x in items], ctx) for i in range(n)]
        raise PPLRuntimeError(f"cannot unpack {describe(v)} into {n} names")

    def assign(self, fr: Frame, name: str, v, ctx: Particles):
        """Bind ``name`` for the particles of ctx; other particles keep their value."""
        if isinstance(v, (Closure, MemFn)) and v.name == "lambda":
            v.name = name  # `strength = mem(lambda p: ...)` is addressed as strength(...)
        if ctx is fr.particles or fr.particles is None or ctx.idx is fr.particles.idx:
            fr.vars[name] = v
            return
        old = fr.vars.get(name, _MISSING)
        if old is v:
            return
        if old is _MISSING:
            # defined on this path only: reading it on another path is an error
            fr.vars[name] = v if is_batched(v) else _only_for(v, ctx)
            return
        base_idx = old.idx if is_batched(old) or isinstance(old, Lazy) and hasattr(old, "idx") else fr.particles.idx
        target = _union(base_idx, ctx.idx, ctx)
        fr.vars[name] = merge_parts([(base_idx, old), (ctx.idx, v)], target)

    # -------------------------------------------------------------------------- calling
    def call(self, f, args, kwargs, ctx: Particles, span, fr: Frame) -> Generator:
        if isinstance(f, Closure):
            return (yield from self.call_closure(f, args, kwargs, ctx, span, fr))
        if isinstance(f, Builtin):
            if f.higher_order:
                return (yield from f.fn(self, ctx, fr, span, *args, **kwargs))
            return self._call_builtin(f, args, kwargs, ctx, span)
        if isinstance(f, MemFn):
            return (yield from self.call_mem(f, args, ctx, span, fr))
        if isinstance(f, PerParticle):  # a different function per particle
            parts = yield from self.per_group(fr, self.split_by_key(rows(f, ctx), ctx),
                                              lambda fn, sub: self.call(fn, args, kwargs, sub, span, fr))
            return merge_parts(parts, ctx)
        raise PPLRuntimeError(f"{describe(f)} is not callable", span)

    def per_group(self, fr, groups, run) -> Generator:
        """[(particles, run(key, particles))] for the groups of a split, run one after
        another, each from the same address counters of ``fr`` (like the branches of an
        ``if``): a choice's address depends on its own particle's path, never on which
        other groups happened to run before it."""
        counters = getattr(fr, "counters", None)  # None for a _Renamed (memoised) caller
        joined = dict(counters) if counters is not None else None
        parts = []
        for key, sub in groups:
            if counters is not None:
                fr.counters = dict(counters)
            parts.append((sub.idx, (yield from run(key, sub))))
            if counters is not None:
                for k, n in fr.counters.items():
                    joined[k] = max(n, joined.get(k, 0))
        if counters is not None:
            fr.counters = joined
        return parts

    def _call_builtin(self, f, args, kwargs, ctx, span):
        if not isinstance(f, Builtin):
            raise PPLRuntimeError(f"{describe(f)} is not callable here", span)
        if LIVE[0] and (any(isinstance(a, Lazy) for a in args) or any(isinstance(a, Lazy) for a in kwargs.values())):
            args, kwargs = self._guard(lazy_call_args, span, f.name, args, kwargs, ctx, getattr(f.fn, "accepts_lazy", False))
        try:
            return f.fn(ctx, *args, **kwargs)
        except PPLError as err:
            forced = forced_in_containers(args, kwargs, f.name, ctx) if LIVE[0] else None
            if forced is not None:  # (semantics.lazy: lazy values in a list the built-in cannot use)
                return self._call_builtin(f, forced[0], forced[1], ctx, span)
            raise err.with_span(span)
        except TypeError as err:
            forced = forced_in_containers(args, kwargs, f.name, ctx) if LIVE[0] else None
            if forced is not None:
                return self._call_builtin(f, forced[0], forced[1], ctx, span)
            msg = str(err)
            if "argument" in msg:
                raise PPLRuntimeError(f"{f.name}(): wrong arguments ({msg.split(') ', 1)[-1]})", span) from None
            raise PPLRuntimeError(f"{f.name}(): {msg}", span) from err

    def call_closure(self, f: Closure, args, kwargs, ctx, span, caller: Frame, top=False) -> Generator:
        depth = caller.depth + 1
        if depth > self.max_depth:
            raise PPLRecursionError(
                f"recursion deeper than {self.max_depth} calls (in '{f.name}')", span,
                "check that the recursion terminates, or raise max_depth= in infer()")
        path = "" if top else caller.address(f.name) + "/"
        fr = Frame(f.env, ctx, path, depth)
        params = f.params
        if len(args) > len(params):
            raise PPLRuntimeError(f"{f.name}() takes {len(params)} arguments but {len(args)} were given", span)
        for p, a in zip(params, args):
            fr.vars[p.name] = a
        names = {p.name for p in params}
        for k, v in kwargs.items():
            if k not in names:
                raise PPLRuntimeError(f"{f.name}() got an unexpected argument '{k}'", span, did_you_mean(k, names))
            if k in fr.vars:
                raise PPLRuntimeError(f"{f.name}() got multiple values for argument '{k}'", span)
            fr.vars[k] = v
        for p in params[len(args):]:
            if p.name not in fr.vars:
                if p.default is None:
                    raise PPLRuntimeError(f"{f.name}() is missing the argument '{p.name}'", span)
                try:
                    fr.vars[p.name] = yield from self._eval(p.default, f.env, ctx)
                except PPLError as err:
                    raise err.with_span(p.default.span)
                except (TypeError, ValueError, RuntimeError, IndexError, ZeroDivisionError, OverflowError) as err:
                    # not inside any statement (the entry's defaults): report here
                    msg = str(err).splitlines()[0] if str(err) else ""
                    raise PPLRuntimeError(f"{type(err).__name__}: {msg}", p.default.span) from err
        if isinstance(f.body, ir.Expr):
            return (yield from self._eval(f.body, fr, ctx))
        live = yield from self.exec_block(f.body, fr, ctx)
        parts = [(c.idx, v) for c, v in fr.returns]
        if live is not None:
            parts.append((live.idx, None))
        if len(parts) == 1 and parts[0][0] is ctx.idx:
            return parts[0][1]
        return merge_parts(parts, ctx)

    def call_mem(self, m: MemFn, args, ctx, span, fr) -> Generator:
        """Look up or compute m(args) for each particle: one draw per particle and key."""
        if any(is_batched(a) or (isinstance(a, (list, tuple)) and any(map(is_batched, a))) for a in args):
            keys = list(zip(*[materialize(a, ctx) for a in args])) if args else [()] * ctx.M
            parts = []
            for key, sub in self.split_by_key(keys, ctx):
                parts.append((sub.idx, (yield from self.call_mem(m, list(key), sub, span, fr))))
            return merge_parts(parts, ctx)
        key = _hashable(tuple(args))
        # an entry is (coverage, value): coverage is a batched marker whose particles are
        # those that have computed the value (batched, so it follows resampling)
        entry = m.table.get(key)
        if entry is None:
            todo = ctx
        else:
            have = torch.zeros(ctx.N, dtype=torch.bool, device=ctx.device)
            have[entry[0].idx] = True
            missing = ~have[ctx.idx]
            todo = ctx.subset(missing) if bool(missing.any()) else None
        if todo is not None:
            label = f"{m.name}({', '.join(_label(a) for a in args)})"
            v = yield from self.call(m.fn, args, {}, todo, span, _Renamed(fr, label))
            mark = Batched(torch.ones(todo.M, dtype=torch.bool, device=ctx.device), todo.idx)
            if entry is None:
                entry = (mark, v)
            else:
                old_idx = entry[0].idx
                whole = _union(old_idx, todo.idx, ctx)
                entry = (Batched(torch.ones(whole.M, dtype=torch.bool, device=ctx.device), whole.idx),
                         merge_parts([(old_idx, entry[1]), (todo.idx, v)], whole))
            m.table[key] = entry
        v = entry[1]
        if not is_batched(v):
            return v
        return restrict(v, ctx)

    # --------------------------------------------------------------- indexing, iterating
    def _index(self, v, i, ctx, span):
        try:
            return _index(v, i, ctx)
        except PPLError as err:
            raise err.with_span(span)

    def _attr(self, v, e: ir.Attr):
        v = joined_distribution(v)
        get = getattr(v, "ppl_attribute", None)
        if get is None or e.name.startswith("_"):
            hint = "a language model (passed as data, or toy_lm()) has next_token and generate" \
                if get is None and e.name in ("next_token", "generate") else None
            raise PPLRuntimeError(f"{describe(v)} has no attribute '{e.name}'", e.span, hint)
        return get(e.name)

    def _as_dist(self, d, e):
        d = joined_distribution(d)
        if not isinstance(d, (DistValue, ProposedDist)):
            raise PPLRuntimeError(f"expected a distribution after '~', got {describe(d)}", e.span,
                                  "write e.g. `x ~ normal(0, 1)`")
        return d

    def iter_items(self, it, ctx, span=None):
        """The elements of an iterable with the same length for every particle, or None
        when the length differs (then ``ragged`` describes it)."""
        if isinstance(it, (list, tuple)):
            return list(it)
        if isinstance(it, range):
            return it
        if isinstance(it, torch.Tensor):
            if it.dim() == 0:
                raise PPLRuntimeError("cannot iterate over a number", span)
            return list(it.unbind(0))
        if isinstance(it, str):
            return list(it)
        if isinstance(it, Batched):
            t = rows(it, ctx)
            if t.dim() < 2:
                raise PPLRuntimeError("cannot iterate over a number", span)
            return [Batched(t[:, k], ctx.idx) for k in range(t.shape[1])]
        if isinstance(it, RaggedRange):
            return None
        if isinstance(it, PerParticle):
            items = rows(it, ctx)
            lens = {len(x) for x in items}
            if len(lens) == 1:
                n = lens.pop()
                return [pack([x[k] for x in items], ctx) for k in range(n)]
            return None
        if isinstance(it, Lazy):  # (semantics.lazy: a concrete value, or its located refusal)
            try:
                return self.iter_items(it.force(ctx, "as the iterable of a loop"), ctx, span)
            except PPLError as err:
                raise err.with_span(span)
        raise PPLRuntimeError(f"cannot iterate over {describe(it)}", span)

    def ragged(self, it, ctx):
        """(lengths per particle, element getter) of a ragged iterable."""
        if isinstance(it, RaggedRange):
            start = it.start
            length = binop("-", it.stop, start, ctx)
            length = Batched(batch_rows(length, ctx).clamp(min=0), ctx.idx)
            return length, lambda k, c: binop("+", restrict(start, c) if is_batched(start) else start, k, c)
        items = it
        lengths = Batched(torch.tensor([len(x) for x in rows(items, ctx)], device=ctx.device), ctx.idx)
        return lengths, lambda k, c: pack([x[k] for x in rows(items, c)], c)


Interpreter._STMTS = {
    ir.Assign: Interpreter._s_assign, ir.Sample: Interpreter._s_sample,
    ir.Observe: Interpreter._s_observe, ir.Factor: Interpreter._s_factor,
    ir.Condition: Interpreter._s_condition, ir.If: Interpreter._s_if, ir.For: Interpreter._s_for,
    ir.While: Interpreter._s_while, ir.Return: Interpreter._s_return, ir.ExprStmt: Interpreter._s_expr,
    ir.Pass: Interpreter._s_pass, ir.FunctionDef: Interpreter._s_def,
}


_ITERATIONS_HINT = ("loops are bounded; raise max_iterations= in ppl.model(...), or the limit "
                    "(ppl.set_limits(max_iterations=...), PPL_MAX_ITERATIONS, --limit max_iterations=...)")


class _Renamed:
    """A caller frame whose next call is addressed by a fixed label: memoised calls are
    addressed by function and arguments alone (``strength(alice)/sample``), wherever
    they are first made, since their value is shared by every later call."""

    def __init__(self, frame: Frame, label: str):
        self._frame, self._label = frame, label
        self.depth = frame.depth

    def address(self, name: str) -> str:
        return self._label


_LAMBDA_PARAMS: dict = {}  # id(ir.Lambda) -> (the node, its parameters as ir.Param)


def _lambda_params(e: ir.Lambda) -> tuple:
    """A lambda's parameters as ``ir.Param`` objects (frozen: made once per node, not at
    every evaluation of the lambda)."""
    hit = _LAMBDA_PARAMS.get(id(e))
    if hit is not None and hit[0] is e:
        return hit[1]
    params = tuple(ir.Param(p) for p in e.params)
    if len(_LAMBDA_PARAMS) >= 4096:
        _LAMBDA_PARAMS.clear()
    _LAMBDA_PARAMS[id(e)] = (e, params)
    return params


def joined_distribution(d):
    """A per-particle value holding a distribution that can join per-particle copies of
    itself (``semantics.nested.MarginalDist.joined``: the branches of an ``if`` or the
    groups of a memoised call, each with its own ``infer`` result) as that one
    distribution; anything else as it is."""
    if type(d) is PerParticle and d.items:
        join = getattr(type(d.items[0]), "joined", None)
        if join is not None and all(type(x) is type(d.items[0]) for x in d.items):
            return join(d)
    return d


def _union(a: torch.Tensor, b: torch.Tensor, ctx: Particles) -> Particles:
    """The particles in index sets a or b, in global order."""
    mask = torch.zeros(ctx.N, dtype=torch.bool, device=ctx.device)
    mask[a] = True
    mask[b] = True
    return Particles(ctx.full.idx[mask], ctx.N, ctx.device, ctx.full)


def _only_for(v, ctx: Particles):
    """A value that exists only for the particles of ctx."""
    if isinstance(v, Lazy):  # (semantics.lazy: it knows its own particles)
        return v
    if is_numeric(v) and not isinstance(v, torch.Tensor):
        return Batched(batch_rows(v, ctx), ctx.idx)
    if deep_batched(v):  # a list holding per-particle values: each particle's own list
        return PerParticle(materialize(v, ctx), ctx.idx)
    return PerParticle([v] * ctx.M, ctx.idx)


def _hashable(k):
    if isinstance(k, torch.Tensor):
        return ("tensor", tuple(k.reshape(-1).tolist()), tuple(k.shape))
    if isinstance(k, (list, tuple)):
        return tuple(_hashable(x) for x in k)
    try:
        hash(k)
        return k
    except TypeError:
        return ("id", id(k))


def _label(a) -> str:
    if isinstance(a, torch.Tensor) and a.dim() == 0:
        a = a.item()
    if isinstance(a, float) and a.is_integer():
        a = int(a)
    return str(a)


def _int_index(i) -> int:
    if type(i) is int:  # the common case (and no isinstance test against the Fraction ABC)
        return i
    if isinstance(i, torch.Tensor):
        if i.numel() != 1 or i.is_floating_point():
            raise PPLRuntimeError(f"an index must be an integer, got {describe(i)}")
        return int(i.item())
    if isinstance(i, bool) or not isinstance(i, (int, Fraction)):
        if isinstance(i, float) and i.is_integer():
            return int(i)
        raise PPLRuntimeError(f"an index must be an integer, got {describe(i)}")
    if isinstance(i, Fraction):
        if i.denominator != 1:
            raise PPLRuntimeError(f"an index must be an integer, got {i}")
        return int(i)
    return i


def _check_range(i: int, n: int):
    if not -n <= i < n:
        raise PPLRuntimeError(f"index {i} out of range for length {n}")


def _index(v, i, ctx: Particles):
    """``v[i]`` with per-particle semantics (objects with ``ppl_index(i, ctx)``, such as
    an MH proposal's ``trace``, index themselves; a lazy index, ``semantics.lazy``, indexes
    with ``index_of``)."""
    if type(i) is int:  # data indexed by a loop counter (``ys[t]``): the general path's answer, first
        tv = type(v)
        n = len(v) if tv is list or tv is tuple else v.shape[0] if tv is torch.Tensor and v.dim() > 0 else None
        if n is not None and -n <= i < n:  # (Tensor.__len__ is a Python method: shape[0] instead)
            return v[i]
    if isinstance(i, Lazy):
        return i.index_of(v, ctx)
    if not isinstance(v, (list, tuple, str, torch.Tensor, Batched, PerParticle)):
        hook = getattr(v, "ppl_index", None)
        if hook is not None:
            return hook(i, ctx)
    if isinstance(i, _SliceValue):
        if is_batched(i.lo) or is_batched(i.hi) or is_batched(v):
            return per_particle_slice(v, i, ctx)
        lo = None if i.lo is None else _int_index(i.lo)
        hi = None if i.hi is None else _int_index(i.hi)
        if isinstance(v, (list, tuple, str, torch.Tensor)):
            return v[lo:hi]
        raise PPLRuntimeError(f"cannot slice {describe(v)}")
    if isinstance(i, torch.Tensor) and i.dim() >= 1:  # ``a[county]``: one index per data row
        return _take(v, i, ctx)
    if isinstance(i, Vector):  # ... and the same under exact enumeration (data as a Vector)
        return _take_exact(v, i)
    if not isinstance(v, (Batched, PerParticle)) and not isinstance(i, (Batched, PerParticle)):  # (is_batched)
        if isinstance(v, (list, tuple, str)):
            k = _int_index(i)
            _check_range(k, len(v))
            return v[k]
        if isinstance(v, torch.Tensor):
            if v.dim() == 0:
                raise PPLRuntimeError("cannot index a number")
            k = _int_index(i)
            _check_range(k, v.shape[0])
            return v[k]
        raise PPLRuntimeError(f"cannot index {describe(v)}")
    if isinstance(i, Batched):
        k = rows(i, ctx)
        if k.is_floating_point() or k.dtype == torch.bool or k.dim() != 1:
            if k.is_floating_point() and bool((k == k.round()).all()):
                k = k.long()
            else:
                raise PPLRuntimeError(f"an index must be an integer, got {describe(i)}")
        if isinstance(v, (list, tuple)) and all(is_numeric(x) for x in v) and v:
            table = batch_rows(list(v), ctx)  # [M, K, ...]
            return Batched(_gather(table, k, ctx), ctx.idx)
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            n = v.shape[0]
            _check_batched_range(k, n)
            return Batched(v[k % n], ctx.idx)
        if isinstance(v, Batched):
            return Batched(_gather(rows(v, ctx), k, ctx), ctx.idx)
    if isinstance(v, Batched) and not is_batched(i):
        t = rows(v, ctx)
        if t.dim() < 2:
            raise PPLRuntimeError("cannot index a number")
        k = _int_index(i)
        _check_range(k, t.shape[1])
        return Batched(t[:, k], ctx.idx)
    from .values import per_particle

    def one(a, b):
        if isinstance(b, float) and b.is_integer():
            b = int(b)
        if not isinstance(a, (list, tuple, str, torch.Tensor)):
            raise PPLRuntimeError(f"cannot index {describe(a)}")
        _check_range(_int_index(b), len(a))
        return a[b]
    return per_particle(one, (v, i), ctx)


def _take(v, i: torch.Tensor, ctx: Particles):
    """``v[i]`` for a vector of integer indices ``i`` that is the same at every particle
    (data, such as a group label per observation): the vector ``[v[i[0]], v[i[1]], ...]``,
    as NumPy's and Stan's integer-array indexing. A particle-batched ``v`` (one row per
    particle) is indexed row by row."""
    k = _integer_indices(i)
    if isinstance(v, (list, tuple)):
        if v and all(is_numeric(x) for x in v) and not any(isinstance(x, (Batched, PerParticle)) for x in v):
            v = torch.as_tensor([float(x) for x in v], dtype=torch.get_default_dtype())
        else:
            _check_batched_range(k, len(v))
            return [v[int(j)] for j in k]
    if isinstance(v, torch.Tensor):
        if v.dim() == 0:
            raise PPLRuntimeError("cannot index a number")
        _check_batched_range(k, v.shape[0])
        return v[k.to(v.device)]
    if isinstance(v, Batched):
        t = rows(v, ctx)
        if t.dim() < 2:
            raise PPLRuntimeError("cannot index a number")
        _check_batched_range(k, t.shape[1])
        return Batched(t[:, k.to(t.device)], ctx.idx)
    raise PPLRuntimeError(f"cannot index {describe(v)} with a vector of indices",
                          hint="indexing by a vector of integers works on numeric vectors and lists")


def _take_exact(v, i: Vector):
    """``_take`` in the exact semantics: ``v[i]`` for a Vector of integer indices, a Vector
    where ``v`` holds numbers (a list otherwise)."""
    if any(isinstance(k, Vector) for k in i):
        raise PPLRuntimeError(f"an index vector must be one-dimensional, got {describe(i)}")
    if any(isinstance(k, bool) for k in i):
        raise PPLRuntimeError(f"an index must be an integer or a vector of integers, got {describe(i)}",
                              hint="to keep the rows where a test holds, use filter(lambda ..., xs)")
    ks = []
    for k in i:
        if isinstance(k, float) and k.is_integer() or isinstance(k, Fraction) and k.denominator == 1:
            k = int(k)
        if not isinstance(k, int):
            raise PPLRuntimeError(f"an index must be an integer or a vector of integers, got {describe(i)}")
        ks.append(k)
    if not isinstance(v, (list, tuple)):
        raise PPLRuntimeError(f"cannot index {describe(v)} with a vector of indices",
                              hint="indexing by a vector of integers works on numeric vectors and lists")
    for k in ks:
        _check_range(k, len(v))
    out = [v[k] for k in ks]
    return Vector(out) if all(is_numeric(x) for x in out) else out


def _integer_indices(i: torch.Tensor) -> torch.Tensor:
    """A vector of indices as integers (integral floats such as 0.0, 1.0 are accepted)."""
    if i.dtype == torch.bool:
        raise PPLRuntimeError(f"an index must be an integer or a vector of integers, got {describe(i)}",
                              hint="to keep the rows where a test holds, use filter(lambda ..., xs)")
    if i.is_floating_point():
        if not bool((i == i.round()).all()):
            raise PPLRuntimeError(f"an index must be an integer or a vector of integers, got {describe(i)}")
        i = i.long()
    if i.dim() != 1:
        raise PPLRuntimeError(f"an index vector must be one-dimensional, got {describe(i)}")
    return i


def _gather(table: torch.Tensor, k: torch.Tensor, ctx) -> torch.Tensor:
    n = table.shape[1]
    _check_batched_range(k, n)
    return table[torch.arange(table.shape[0], device=table.device), k % n]


def _check_batched_range(k: torch.Tensor, n: int):
    if bool(((k < -n) | (k >= n)).any()):
        bad = int(k[(k < -n) | (k >= n)][0])
        raise PPLRuntimeError(f"index {bad} out of range for length {n}")


def per_particle_slice(v, s: _SliceValue, ctx):
    from .values import per_particle
    return per_particle(lambda a, lo, hi: a[None if lo is None else int(lo):None if hi is None else int(hi)],
                        (v, s.lo, s.hi), ctx)


def _exact_literal(v: float):
    """The exact rational a finite float literal spells (``0.9`` -> 9/10; ``Fraction``s are
    immutable, so one per literal value is shared), the float itself otherwise."""
    r = _EXACT_LITERALS.get(v)
    if r is None:
        if not math.isfinite(v):
            return v
        r = Fraction(repr(v))
        if len(_EXACT_LITERALS) < 4096:
            _EXACT_LITERALS[v] = r
    return r


#: float literal -> ``Fraction(repr(v))`` (0.0 and -0.0 share an entry: both spell 0)
_EXACT_LITERALS: dict = {}


def _bound_names(program: ir.Program) -> frozenset:
    """Every name a program binds anywhere (parameters, assignments, loop targets); cached
    per program object (the IR is immutable)."""
    hit = _BOUND_NAMES.get(id(program))
    if hit is not None and hit[0] is program:
        return hit[1]
    out = _walk_bound_names(program)
    if len(_BOUND_NAMES) >= 64:
        del _BOUND_NAMES[next(iter(_BOUND_NAMES))]  # the oldest
    _BOUND_NAMES[id(program)] = (program, out)  # (holding the program keeps its id unique)
    return out


#: id(program) -> (program, its bound names)
_BOUND_NAMES: dict = {}


def _walk_bound_names(program: ir.Program) -> frozenset:
    """``_bound_names`` without the cache."""
    out = set(program.names)
    for node in ir.walk(program):
        if isinstance(node, (ir.Assign, ir.For)):
            out.update(ir.assigned_names(node.target))
        elif isinstance(node, ir.Sample):
            out.add(node.target)
        elif isinstance(node, ir.Param):
            out.add(node.name)
        elif isinstance(node, ir.Lambda):
            out.update(node.params)
        elif isinstance(node, ir.FunctionDef):
            out.add(node.name)
    return frozenset(out)
