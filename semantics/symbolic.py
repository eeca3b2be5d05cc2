"""Symbolic joint densities of static programs (sympy).

``density(program, entry, data)`` runs the IR once with *symbols* in place of random
choices and returns log p(choices, data) as one sympy expression: the sum of the log
densities of every ``x ~ d`` (at the choice's symbol), of every ``observe v ~ d`` (at the
value), of every ``factor e`` (e itself) and of every ``condition c`` (an indicator:
``log Piecewise((1, c), (0, True))``, i.e. 0 where c holds and -oo elsewhere).

Which programs: *static* ones, whose control flow does not depend on a random value.
``if``/``while``/conditional expressions must be decided by data and constants; loops over
data are unrolled. With ``symbolic_data=True`` the data are symbols too: a numeric list of
length n becomes an ``IndexedBase`` of symbolic length (lists of the same length share one
length symbol N) and a loop over it, or an ``observe`` of the whole vector, becomes a
``Sum(..., (i, 0, N - 1))``. Anything else (control flow on a random value, indexing with
a random value, a loop over symbolic data that carries state out of its body, a
distribution without a formula here) is a ``PPLError`` naming the construct and its
source location, never a wrong expression.

Symbols: one ``Symbol`` per scalar choice, named by its address (``mu``); an
``IndexedBase`` for choices inside loops (``x[3]`` is ``x[3]``) and for vector-valued
choices (``theta_tilde ~ normal(zeros(8), 1)`` gives ``theta_tilde[0]``...
``theta_tilde[7]``). Choices of a distribution on the positive reals are positive symbols,
those on [0, 1] / booleans / counts carry the matching assumptions, so sympy simplifies
``log(exp(x))`` and ``|x|`` where it may. The density is the density *on the support*:
outside the support of a choice (``tau < 0`` for ``tau ~ half_cauchy(5)``) the true log
density is -oo, which ``SymbolicDensity.support`` records per choice rather than writing
a ``Piecewise`` into every term. Observed values given as numbers outside the support give
-oo (the factor is written as an indicator).

The table ``LOG_DENSITIES`` gives each distribution's log density as a formula in sympy
(written out: ``sympy.stats``' densities of the same families are compared with these in
tests/test_symbolic.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import sympy as sp

from . import ir
from .errors import PPLError
from ..stdlib.distributions import DISTRIBUTIONS as _DISTRIBUTIONS


# ----------------------------------------------------------------------- the result
@dataclass
class SymbolicDensity:
    """log p(choices, data) of one call of ``entry``.

    ``expr``: the sympy expression; ``choices``: address -> its symbol (a ``Symbol`` or
    ``Indexed``) or, for a vector-valued choice, the list of its elements' symbols;
    ``support``: address -> ``(distribution, finite values or None, (low, high) bounds or
    None)`` of the choice (outside them the density is 0: ``function`` gives -inf); ``data_symbols``: datum name -> its symbol (symbolic data only);
    ``lengths``: length symbol -> the concrete length it stands for; ``env``: the entry
    function's variables when it returned (symbols and expressions)."""

    expr: sp.Expr
    choices: dict
    support: dict
    data_symbols: dict = field(default_factory=dict)
    lengths: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    params: tuple = ()

    def symbols(self) -> list:
        """Every scalar choice symbol, in the order the program reached them."""
        out = []
        for s in self.choices.values():
            out.extend(s if isinstance(s, list) else [s])
        return out

    def values_of(self, trace: dict) -> dict:
        """A substitution symbol -> number from a trace (address -> number or list)."""
        subs = {}
        for address, sym in self.choices.items():
            if address not in trace:
                raise PPLError(f"the trace has no value for the choice '{address}'",
                               hint=f"the density's choices are: {', '.join(self.choices)}")
            v = trace[address]
            if isinstance(sym, list):
                for s, x in zip(sym, _flat(v)):
                    subs[s] = x
            else:
                subs[sym] = _scalar(v)
        return subs

    def in_support(self, subs: dict) -> bool:
        """Whether the choices' values (symbol -> number) lie in their supports (the
        expression is the density on the support; outside it the density is 0)."""
        for address, sym in self.choices.items():
            entry = self.support.get(address)
            if entry is None or isinstance(sym, LazyVec):
                continue
            _, finite, interval = entry
            for s in (sym if isinstance(sym, list) else [sym]):
                x = float(subs[s])
                if finite is not None and x not in finite:
                    return False
                if interval is not None and not (interval[0] <= x <= interval[1]):
                    return False
        return True

    def function(self) -> Callable[[dict], float]:
        """A fast numeric version (``sympy.lambdify`` on numpy/scipy): trace -> log
        density as a float."""
        syms = self.symbols()
        dummies = [sp.Dummy() for _ in syms]
        expr = self.expr.xreplace(dict(zip(syms, dummies)))
        f = sp.lambdify(dummies, expr, modules=[{"softplus": _np_softplus}, "scipy", "numpy"], docstring_limit=0)

        def log_density(trace: dict) -> float:
            subs = self.values_of(trace)
            if not self.in_support(subs):
                return -math.inf
            with np.errstate(divide="ignore"):  # log 0 = -inf: an impossible trace
                return float(f(*[float(subs[s]) for s in syms]))
        return log_density

    def substitute_data(self, data: dict) -> sp.Expr:
        """The symbolic-data expression with the data put in (sums evaluated): equal to
        the unrolled density of the same data."""
        subs = {}
        for name, sym in self.data_symbols.items():
            v = data[name]
            if isinstance(sym, sp.IndexedBase):
                for i, x in enumerate(_flat(v)):
                    subs[sym[i]] = _number(x)
            else:
                subs[sym] = _number(v)
        expr = self.expr.xreplace(self.lengths).doit()
        return expr.xreplace(subs)


def _flat(v) -> list:
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        out = []
        for x in v:
            out.extend(_flat(x))
        return out
    return [v]


def _scalar(v):
    if hasattr(v, "tolist"):
        v = v.tolist()
    while isinstance(v, (list, tuple)) and len(v) == 1:
        v = v[0]
    return v


# ------------------------------------------------------------------- runtime values
class Vec(tuple):
    """A numeric vector (data list, ``zeros(n)``, a vector-valued choice): arithmetic is
    elementwise with broadcasting, as the tensors of the sampling semantics."""


@dataclass(frozen=True)
class LazyVec:
    """A vector of symbolic length: element i is ``item(i)``."""
    item: Callable[[Any], Any]
    length: sp.Expr


@dataclass(frozen=True)
class Dist:
    """A distribution value: its name, parameters by name, and the constructor's span."""
    name: str
    params: dict
    span: Any = None


@dataclass
class Closure:
    params: tuple
    body: Any                 # a tuple of statements (def) or an expression (lambda)
    env: "Frame"
    name: str = "<lambda>"
    is_lambda: bool = False


class _Return(Exception):
    def __init__(self, value):
        self.value = value


class Frame:
    """Variables of one function call (parent: the enclosing closure's frame)."""

    def __init__(self, parent: "Frame | None" = None, path: str = ""):
        self.vars: dict = {}
        self.parent = parent
        self.path = path
        self.loops: list = []
        self.counters: dict = {}

    def lookup(self, name):
        f = self
        while f is not None:
            if name in f.vars:
                return f.vars[name]
            f = f.parent
        raise KeyError(name)

    def address(self, name: str) -> tuple[str, str, tuple]:
        """(address, base name, loop indices) of a fresh site named ``name`` (as
        ``semantics.interpreter``'s frames address them)."""
        key = name + "".join(f"[{i}]" for i in self.loops)
        k = self.counters.get(key, 0)
        self.counters[key] = k + 1
        base = self.path + (name if k == 0 else f"{name}#{k}")
        return self.path + (key if k == 0 else f"{key}#{k}"), base, tuple(self.loops)


def _err(what: str, node=None, hint: str | None = None) -> PPLError:
    return PPLError(what, getattr(node, "span", None), hint)


_STATIC_HINT = ("symbolic densities are for static programs: control flow may depend on data "
                "and constants, not on random choices")


# -------------------------------------------------------------------- the evaluator
class SymbolicRun:
    """One symbolic execution of a program (see the module docstring)."""

    def __init__(self, program: ir.Program, symbolic_data: bool = False):
        self.program = program
        self.symbolic_data = symbolic_data
        self.terms: list = []
        self.choices: dict = {}
        self.support: dict = {}
        self.data_symbols: dict = {}
        self.lengths: dict = {}
        self.bases: dict = {}
        self.coins: set = set()
        self.depth = 0  # nesting of Sums: their index is named by it (i, j, k, ...)
        self.globals = Frame()
        for f in program.functions:
            self.globals.vars[f.name] = Closure(tuple(f.params), f.body, self.globals, f.name)

    # -- data ----------------------------------------------------------------------
    def data_value(self, name: str, v):
        """A datum as a value: numbers (or their symbols), vectors (or IndexedBases of
        symbolic length)."""
        if hasattr(v, "tolist"):
            v = v.tolist()
        if not self.symbolic_data:
            return _as_value(v)
        if isinstance(v, bool) or isinstance(v, str):
            return v
        if isinstance(v, (int, float)):
            s = sp.Symbol(name, real=True)
            self.data_symbols[name] = s
            return s
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                     for x in v):
            base = sp.IndexedBase(name, real=True)
            self.data_symbols[name] = base
            n = self._length_symbol(len(v))
            return LazyVec(lambda i, base=base: base[i], n)
        return _as_value(v)

    def _length_symbol(self, n: int) -> sp.Symbol:
        for s, m in self.lengths.items():
            if m == n:
                return s
        names = ["N", "M", "K", "L"]
        s = sp.Symbol(names[len(self.lengths)] if len(self.lengths) < len(names) else f"N_{len(self.lengths)}",
                      integer=True, positive=True)
        self.lengths[s] = n
        return s

    # -- running -------------------------------------------------------------------
    def run(self, entry: str, data: dict) -> SymbolicDensity:
        f = self.program.function(entry)
        frame = Frame(self.globals)
        for p in f.params:
            if p.name in data:
                frame.vars[p.name] = self.data_value(p.name, data[p.name])
            elif p.default is not None:
                frame.vars[p.name] = self.ev(p.default, frame)
            else:
                s = sp.Symbol(p.name, real=True)
                self.data_symbols[p.name] = s
                frame.vars[p.name] = s
        try:
            self.block(f.body, frame)
        except _Return:
            pass
        expr = sp.Add(*self.terms) if self.terms else sp.Integer(0)
        return SymbolicDensity(expr, self.choices, self.support, self.data_symbols, self.lengths,
                               dict(frame.vars), tuple(p.name for p in f.params))

    def block(self, stmts, frame: Frame):
        for s in stmts:
            self.stmt(s, frame)

    def stmt(self, s, frame: Frame):
        method = getattr(self, "_s_" + type(s).__name__, None)
        if method is None:
            raise _err(f"symbolic density: the statement `{type(s).__name__}` is not supported", s)
        method(s, frame)

    def _s_Pass(self, s, frame):
        pass

    def _s_ExprStmt(self, s, frame):
        self.ev(s.expr, frame)

    def _s_Assign(self, s, frame):
        self.bind(frame, s.target, self.ev(s.value, frame), s)

    def bind(self, frame, target, v, node):
        if isinstance(target, str):
            frame.vars[target] = v
            return
        items = self.items(v, node)
        if len(items) != len(target):
            raise _err(f"cannot unpack {len(items)} values into {len(target)} names", node)
        for t, x in zip(target, items):
            frame.vars[t] = x

    def _s_FunctionDef(self, s, frame):
        frame.vars[s.name] = Closure(tuple(s.params), s.body, frame, s.name)

    def _s_Return(self, s, frame):
        raise _Return(None if s.value is None else self.ev(s.value, frame))

    def _s_Sample(self, s, frame):
        d = self.dist_of(self.ev(s.dist, frame), s.dist)
        address, base, loops = frame.address(s.target)
        value = self.choice(address, base, loops, d, s)
        self.terms.append(self.log_density(d, value, s))
        frame.vars[s.target] = value

    def _s_Observe(self, s, frame):
        value = self.ev(s.value, frame)
        d = self.dist_of(self.ev(s.dist, frame), s.dist)
        self.terms.append(self.log_density(d, value, s))

    def _s_Factor(self, s, frame):
        v = self.ev(s.expr, frame)
        if isinstance(v, (Vec, LazyVec, list, Dist)):
            raise _err("factor needs a number", s)
        self.terms.append(_sym(v))

    def _s_Condition(self, s, frame):
        c = self.ev(s.expr, frame)
        if isinstance(c, (bool, sp.logic.boolalg.BooleanAtom)):
            if not bool(c):
                self.terms.append(-sp.oo)
            return
        if _is_boolean(c):
            self.terms.append(sp.log(sp.Piecewise((1, c), (0, True))))
            return
        raise _err("symbolic density: a condition must be a comparison or a boolean", s)

    def _s_If(self, s, frame):
        c = self.decided(self.ev(s.cond, frame), s, "`if`")
        self.block(s.then if c else s.orelse, frame)

    def _s_While(self, s, frame):
        for _ in range(100000):
            if not self.decided(self.ev(s.cond, frame), s, "`while`"):
                return
            self.block(s.body, frame)
        raise _err("symbolic density: a `while` loop ran 100000 iterations", s)

    def _s_For(self, s, frame):
        it = self.ev(s.iterable, frame)
        if isinstance(it, LazyVec):
            return self.symbolic_loop(s, it, frame)
        items = self.items(it, s.iterable)
        frame.loops.append(0)
        try:
            for k, x in enumerate(items):
                frame.loops[-1] = k
                self.bind(frame, s.target, x, s)
                self.block(s.body, frame)
        finally:
            frame.loops.pop()

    def symbolic_loop(self, s, it: LazyVec, frame):
        """A loop over data of symbolic length: the body once, at a symbolic index i,
        its log-density terms summed over i = 0..N-1."""
        i = self.index()
        outer_terms, self.terms = self.terms, []
        before = dict(frame.vars)
        frame.loops.append(i)
        self.depth += 1
        try:
            self.bind(frame, s.target, it.item(i), s)
            self.block(s.body, frame)
        finally:
            frame.loops.pop()
            self.depth -= 1
        body_terms, self.terms = self.terms, outer_terms
        carried = [n for n in before if n in frame.vars and frame.vars[n] is not before[n]
                   and n not in ir.assigned_names(s.target)]
        if carried:
            raise _err(f"symbolic density: this loop over data of symbolic length changes "
                       f"{', '.join(carried)}, which outlives the loop: it cannot be written as a Sum", s,
                       hint="pass the data without symbolic_data (the loop is unrolled)")
        for name in list(frame.vars):
            if name not in before:
                del frame.vars[name]  # body-local values depend on i
        if body_terms:
            self.terms.append(sp.Sum(sp.Add(*body_terms), (i, 0, it.length - 1)))

    def index(self) -> sp.Idx:
        """The index of a new Sum at the current nesting depth."""
        names = "ijklmnpqrs"
        return sp.Idx(names[self.depth] if self.depth < len(names) else f"i_{self.depth}")

    def decided(self, c, node, what: str) -> bool:
        if isinstance(c, (bool, int, float)) and not isinstance(c, sp.Basic):
            return bool(c)
        if isinstance(c, sp.logic.boolalg.BooleanAtom):
            return bool(c)
        if isinstance(c, sp.Basic) and c.is_number:
            return bool(c != 0)
        if isinstance(c, (Vec, list, tuple, str)):
            return len(c) > 0
        raise _err(f"symbolic density: {what} on a random value (control flow that depends on a choice)",
                   node, hint=_STATIC_HINT)

    # -- choices -----------------------------------------------------------------
    def choice(self, address, base, loops, d: Dist, node):
        """The symbol(s) of a new choice of distribution d (bernoulli/flip ones are
        remembered as coins: 0/1 values)."""
        value = self.new_choice(address, base, loops, d, node)
        if d.name.split(".")[0] in ("bernoulli", "flip"):
            self.coins.update(value if isinstance(value, Vec) else [value] if isinstance(value, sp.Basic) else [])
        return value

    def new_choice(self, address, base, loops, d: Dist, node):
        assumptions = _ASSUMPTIONS.get(d.name, {"real": True})
        shape = self.batch_length(d, node)
        self.support[address] = (d.name, _finite_support(d), _interval(d))
        if not loops and shape is None:
            s = sp.Symbol(address, **assumptions)
            self.choices[address] = s
            return s
        b = self.bases.get(base)
        if b is None:
            b = self.bases[base] = sp.IndexedBase(base, **assumptions)
        if shape is None:
            s = b[loops]
            self.choices[address] = s
            return s
        if isinstance(shape, sp.Basic):  # symbolic length: element i is b[..., i]
            lazy = LazyVec(lambda i, b=b: b[(*loops, i)], shape)
            self.choices[address] = lazy
            return lazy
        elems = Vec(b[(*loops, j)] for j in range(shape))
        self.choices[address] = list(elems)
        return elems

    def batch_length(self, d: Dist, node):
        """None for a scalar distribution, else the length of its batch of elements."""
        spec = _spec(d.name)
        ped = dict(zip(spec.params, spec.param_event_dims)) if spec else {}
        length = None
        for pname, v in d.params.items():
            if ped.get(pname, 0):
                continue
            if isinstance(v, (Vec, list)):
                n = len(v)
            elif isinstance(v, LazyVec):
                n = v.length
            else:
                continue
            if length is not None and n != length and 1 not in (n, length):
                raise _err(f"{d.name}: parameters of lengths {length} and {n} do not broadcast", node)
            length = n if length in (None, 1) else length
        return length

    # -- densities ---------------------------------------------------------------
    def dist_of(self, v, node) -> Dist:
        if isinstance(v, Dist):
            return v
        raise _err("expected a distribution after `~`", node)

    def log_density(self, d: Dist, value, node):
        """log d(value), summed over the elements of a vector value/batch."""
        spec = _spec(d.name)
        ped = dict(zip(spec.params, spec.param_event_dims)) if spec else {}
        vector_params = {k: v for k, v in d.params.items() if not ped.get(k, 0)}
        lazy = [v for v in (value, *vector_params.values()) if isinstance(v, LazyVec)]
        if lazy:
            i = self.index()
            elem = self.log_density(
                Dist(d.name, {k: _lazy_at(v, i, node) if not ped.get(k, 0) else v for k, v in d.params.items()},
                     d.span), _lazy_at(value, i, node), node)
            return sp.Sum(elem, (i, 0, lazy[0].length - 1))
        lengths = [len(v) for v in (value, *vector_params.values()) if isinstance(v, (Vec, list))]
        if lengths:
            n = max(lengths)
            return sp.Add(*[self.log_density(
                Dist(d.name, {k: (_at(v, j, node) if not ped.get(k, 0) else v) for k, v in d.params.items()}, d.span),
                _at(value, j, node), node) for j in range(n)])
        formula = LOG_DENSITIES.get(d.name)
        if formula is None:
            raise _err(f"symbolic density: no formula for the distribution `{d.name}`", node,
                       hint=f"supported: {', '.join(sorted(LOG_DENSITIES))}")
        x = value
        if isinstance(x, bool):
            x = int(x)
        return formula(_sym(x), **{k: (v if isinstance(v, (Vec, list)) else _sym(v)) for k, v in d.params.items()})

    # -- expressions -------------------------------------------------------------
    def ev(self, e, frame: Frame):
        method = getattr(self, "_e_" + type(e).__name__, None)
        if method is None:
            raise _err(f"symbolic density: the expression `{type(e).__name__}` is not supported", e)
        return method(e, frame)

    def _e_Const(self, e, frame):
        return _as_value(e.value)

    def _e_Var(self, e, frame):
        try:
            return frame.lookup(e.name)
        except KeyError:
            pass
        if e.name in _CONSTANTS:
            return _CONSTANTS[e.name]
        if e.name in _FUNCTIONS or _spec(e.name) is not None:
            return ("builtin", e.name)
        raise _err(f"symbolic density: the name `{e.name}` is not supported", e)

    def _e_ListExpr(self, e, frame):
        return [self.ev(x, frame) for x in e.items]

    def _e_TupleExpr(self, e, frame):
        return tuple(self.ev(x, frame) for x in e.items)

    def _e_UnaryOp(self, e, frame):
        v = self.ev(e.operand, frame)
        if e.op == "not":
            return _elementwise(lambda a: (not a) if isinstance(a, bool) else sp.Not(a), v)
        if e.op == "-":
            return _elementwise(lambda a: -_sym(a), v)
        return v

    def _e_BinOp(self, e, frame):
        a, b = self.ev(e.left, frame), self.ev(e.right, frame)
        if e.op == "+" and isinstance(a, list) and isinstance(b, list) and \
                not isinstance(a, Vec) and not isinstance(b, Vec):
            return a + b
        if e.op == "@":
            return _matmul(a, b, e)
        op = _BINOPS.get(e.op)
        if op is None:
            raise _err(f"symbolic density: the operator `{e.op}` is not supported", e)
        return _broadcast(op, a, b, e)

    def _e_BoolOp(self, e, frame):
        a = self.ev(e.left, frame)
        if isinstance(a, (bool, int, float)) and not isinstance(a, sp.Basic):
            if e.op == "and":
                return self.ev(e.right, frame) if a else a
            return a if a else self.ev(e.right, frame)
        b = self.ev(e.right, frame)
        return (sp.And if e.op == "and" else sp.Or)(_boolean(a, e), _boolean(b, e))

    def _e_IfExp(self, e, frame):
        c = self.ev(e.cond, frame)
        if not (_is_boolean(c) and not isinstance(c, sp.logic.boolalg.BooleanAtom)) and \
                not (isinstance(c, sp.Expr) and not c.is_number):
            return self.ev(e.then if self.decided(c, e, "a conditional expression") else e.orelse, frame)
        n = len(self.terms)
        then, orelse = self.ev(e.then, frame), self.ev(e.orelse, frame)
        if len(self.terms) != n or any(isinstance(v, (Vec, LazyVec, list, Dist)) for v in (then, orelse)):
            raise _err("symbolic density: a conditional expression on a random value whose branches are "
                       "not plain numbers", e, hint=_STATIC_HINT)
        if self.is_coin(c):  # a 0/1 choice: a if z else b is b + (a - b) z, exactly
            return _sym(then) * c + _sym(orelse) * (1 - c)
        return sp.Piecewise((_sym(then), _boolean(c, e)), (_sym(orelse), True))

    def is_coin(self, v) -> bool:
        """Whether v is the symbol of a bernoulli/flip choice (values 0 and 1)."""
        return isinstance(v, (sp.Symbol, sp.Indexed)) and v in self.coins

    def _e_Index(self, e, frame):
        v = self.ev(e.value, frame)
        if isinstance(e.index, ir.Slice):
            lo = None if e.index.lo is None else self.ev(e.index.lo, frame)
            hi = None if e.index.hi is None else self.ev(e.index.hi, frame)
            if isinstance(v, LazyVec) or not all(x is None or isinstance(x, int) for x in (lo, hi)):
                raise _err("symbolic density: a slice with symbolic bounds", e)
            out = v[lo:hi]
            return Vec(out) if isinstance(v, Vec) else out
        i = self.ev(e.index, frame)
        return _elem(v, i, e)

    def _e_Lambda(self, e, frame):
        return Closure(tuple(ir.Param(p) for p in e.params), e.body, frame, is_lambda=True)

    def _e_Call(self, e, frame):
        f = self.ev(e.func, frame)
        args = [self.ev(a, frame) for a in e.args]
        kwargs = {k.name: self.ev(k.value, frame) for k in e.kwargs}
        return self.call(f, args, kwargs, e, frame)

    def call(self, f, args, kwargs, node, frame):
        if isinstance(f, Closure):
            return self.call_closure(f, args, kwargs, node, frame)
        if isinstance(f, tuple) and len(f) == 2 and f[0] == "builtin":
            name = f[1]
            if name in _FUNCTIONS:
                return _FUNCTIONS[name](self, node, frame, *args, **kwargs)
            return self.make_dist(name, args, kwargs, node)
        raise _err("symbolic density: this call is not supported", node)

    def call_closure(self, f: Closure, args, kwargs, node, frame):
        if f.is_lambda:
            inner = Frame(f.env, frame.path)
            inner.loops, inner.counters = frame.loops, frame.counters
            for p, a in zip(f.params, args):
                inner.vars[p.name] = a
            return self.ev(f.body, inner)
        address, _, _ = frame.address(f.name)
        inner = Frame(f.env, address + "/")
        given = dict(zip([p.name for p in f.params], args))
        given.update(kwargs)
        for p in f.params:
            if p.name in given:
                inner.vars[p.name] = given[p.name]
            elif p.default is not None:
                inner.vars[p.name] = self.ev(p.default, inner)
            else:
                raise _err(f"{f.name}() is missing the argument '{p.name}'", node)
        try:
            self.block(f.body, inner)
        except _Return as r:
            return r.value
        return None

    def make_dist(self, name, args, kwargs, node) -> Dist:
        spec = _spec(name)
        names = list(spec.params)
        if kwargs and set(kwargs) & set(spec.keyword_variants):
            (kw,) = [k for k in kwargs if k in spec.keyword_variants]
            replaced, _ = spec.keyword_variants[kw]
            names = [kw if p == replaced else p for p in names]
            name = f"{name}.{kw}"
        params = dict(zip(names, args))
        params.update(kwargs)
        for p in names:
            if p not in params:
                if p in spec.defaults:
                    params[p] = _as_value(spec.defaults[p])
                else:
                    raise _err(f"{spec.name}: missing parameter '{p}'", node)
        return Dist(name, params, getattr(node, "span", None))

    def items(self, v, node) -> list:
        if isinstance(v, (list, tuple)):
            return list(v)
        if isinstance(v, range):
            return list(v)
        if isinstance(v, LazyVec):
            raise _err("symbolic density: this use of data of symbolic length is not supported", node,
                       hint="pass the data without symbolic_data (loops are unrolled)")
        raise _err("symbolic density: cannot iterate over this value (a random one?)", node, hint=_STATIC_HINT)


# ------------------------------------------------------------------- value helpers
def _as_value(v):
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return sp.Integer(v)
    if isinstance(v, float):
        if v == int(v) and abs(v) < 2 ** 53:
            return sp.Integer(int(v))
        return sp.Float(v)
    if isinstance(v, (list, tuple)):
        items = [_as_value(x) for x in v]
        if items and all(isinstance(x, sp.Basic) for x in items):
            return Vec(items)
        return items if isinstance(v, list) else tuple(items)
    return v


def _number(v):
    return _as_value(_scalar(v)) if not isinstance(v, bool) else sp.Integer(int(v))


def _is_boolean(v) -> bool:
    """A sympy truth value or condition (a Symbol is a Boolean to sympy too: not here)."""
    return isinstance(v, sp.logic.boolalg.Boolean) and not isinstance(v, sp.Expr)


def _sym(v):
    if isinstance(v, bool):
        return sp.Integer(int(v))
    if isinstance(v, (int, float)):
        return _as_value(v)
    if isinstance(v, sp.Basic):
        if _is_boolean(v) and not isinstance(v, sp.logic.boolalg.BooleanAtom):
            return sp.Piecewise((1, v), (0, True))
        if isinstance(v, sp.logic.boolalg.BooleanAtom):
            return sp.Integer(int(bool(v)))
        return v
    raise PPLError(f"symbolic density: expected a number, got {type(v).__name__}")


def _boolean(v, node):
    if isinstance(v, bool):
        return sp.true if v else sp.false
    if _is_boolean(v):
        return v
    if isinstance(v, sp.Basic):
        return sp.Ne(v, 0)
    raise _err("symbolic density: expected a boolean", node)


def _at(v, j, node):
    if isinstance(v, (Vec, list)):
        return v[j] if len(v) > 1 else v[0]
    return v


_HALF_LINE = ("lognormal", "half_normal", "half_cauchy", "exponential", "gamma", "inverse_gamma", "chi2",
              "poisson", "geometric")


def _interval(d: Dist):
    """(low, high) bounds of a scalar choice's support where they are numbers, else None
    (a choice outside them has density 0: ``SymbolicDensity.function`` gives -inf)."""
    base = d.name.split(".")[0]
    if base in _HALF_LINE:
        return (0.0, math.inf)
    if base == "beta":
        return (0.0, 1.0)
    if base == "uniform":
        low, high = d.params.get("low"), d.params.get("high")
        if isinstance(low, sp.Basic) and isinstance(high, sp.Basic) and low.is_number and high.is_number:
            return (float(low), float(high))
    return None


def _finite_support(d: Dist):
    """The values of a discrete scalar distribution with finite support, else None."""
    base = d.name.split(".")[0]
    if base in ("bernoulli", "flip"):
        return [0, 1]
    if base == "categorical":
        probs = next(iter(d.params.values()))
        return list(range(len(probs))) if isinstance(probs, (Vec, list)) else None
    if base == "binomial":
        n = d.params.get("n")
        return list(range(int(n) + 1)) if isinstance(n, sp.Integer) else None
    return None


def _lazy_at(v, i, node):
    """Element i of a vector of symbolic length; a scalar broadcasts."""
    if isinstance(v, LazyVec):
        return v.item(i)
    if isinstance(v, (Vec, list)):
        raise _err("symbolic density: a vector of known length next to one of symbolic length", node)
    return v


def _elem(v, i, node):
    if isinstance(v, LazyVec):
        return v.item(i)
    if isinstance(v, (Vec, list, tuple, str)):
        if isinstance(i, sp.Integer):
            i = int(i)
        if isinstance(i, int):
            return v[i]
        raise _err("symbolic density: indexing with a random (or symbolic) index", node, hint=_STATIC_HINT)
    if isinstance(v, dict):
        return v[i]
    raise _err("symbolic density: cannot index this value", node)


def _elementwise(fn, v):
    if isinstance(v, Vec):
        return Vec(fn(x) for x in v)
    if isinstance(v, LazyVec):
        return LazyVec(lambda i, item=v.item: fn(item(i)), v.length)
    return fn(v)


def _broadcast(op, a, b, node):
    if isinstance(a, list) and not isinstance(a, Vec):
        a = Vec(a)
    if isinstance(b, list) and not isinstance(b, Vec):
        b = Vec(b)
    if isinstance(a, LazyVec) or isinstance(b, LazyVec):
        n = a.length if isinstance(a, LazyVec) else b.length
        if isinstance(a, LazyVec) and isinstance(b, LazyVec) and a.length != b.length:
            raise _err("symbolic density: vectors of different symbolic lengths", node)
        if isinstance(a, Vec) or isinstance(b, Vec):
            raise _err("symbolic density: a vector of symbolic length with one of known length", node)
        fa = a.item if isinstance(a, LazyVec) else (lambda i: a)
        fb = b.item if isinstance(b, LazyVec) else (lambda i: b)
        return LazyVec(lambda i: op(fa(i), fb(i)), n)
    if isinstance(a, Vec) or isinstance(b, Vec):
        la = len(a) if isinstance(a, Vec) else 1
        lb = len(b) if isinstance(b, Vec) else 1
        if la != lb and 1 not in (la, lb):
            raise _err(f"vectors of lengths {la} and {lb} do not broadcast", node)
        n = max(la, lb)
        return Vec(op(_at(a, j, node) if isinstance(a, Vec) else a, _at(b, j, node) if isinstance(b, Vec) else b)
                   for j in range(n))
    return op(a, b)


def _matmul(a, b, node):
    """``a @ b`` of vectors (``Vec``) and matrices (lists of row vectors) of known sizes:
    sums of products, with the shapes torch.matmul accepts; symbolic lengths are refused."""
    def rows_of(v):
        if isinstance(v, LazyVec):
            raise _err("symbolic density: @ of data of symbolic length is not supported", node,
                       hint="pass the data without symbolic_data (products are written out)")
        if isinstance(v, (list, tuple)) and v and all(isinstance(r, (list, tuple)) for r in v):
            return [list(r) for r in v]
        if isinstance(v, (list, tuple)) and not any(isinstance(x, (list, tuple, LazyVec)) for x in v):
            return None  # a vector
        raise _err("symbolic density: @ needs a vector or a matrix of numbers on each side", node,
                   hint="use * to multiply by a number")

    ma, mb = rows_of(a), rows_of(b)
    sa = [len(ma), len(ma[0])] if ma is not None else [len(a)]
    sb = [len(mb), len(mb[0])] if mb is not None else [len(b)]
    if any(len(r) != sa[-1] for r in ma or ()) or any(len(r) != sb[-1] for r in mb or ()):
        raise _err("symbolic density: @ of a ragged list", node)
    inner_b = sb[0]
    if sa[-1] != inner_b:
        raise _err(f"cannot apply @ to values of shapes {sa} and {sb}: the inner dimensions {sa[-1]} and "
                   f"{inner_b} differ", node)

    def dot(u, w):
        return sp.Add(*[_sym(x) * _sym(y) for x, y in zip(u, w)])
    columns = [list(c) for c in zip(*mb)] if mb is not None else None
    if ma is None:
        return dot(a, b) if columns is None else Vec(dot(a, c) for c in columns)
    if columns is None:
        return Vec(dot(r, b) for r in ma)
    return [Vec(dot(r, c) for c in columns) for r in ma]


def _compare(fn):
    def op(a, b):
        if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
            return fn(a, b)
        r = fn(_sym(a), _sym(b))
        if isinstance(r, sp.logic.boolalg.BooleanAtom):
            return bool(r)
        return r
    return op


def _eq(a, b):
    if isinstance(a, (str, type(None))) or isinstance(b, (str, type(None))):
        return a == b
    r = sp.Eq(_sym(a), _sym(b))
    return bool(r) if isinstance(r, sp.logic.boolalg.BooleanAtom) else r


_BINOPS = {
    "+": lambda a, b: _sym(a) + _sym(b),
    "-": lambda a, b: _sym(a) - _sym(b),
    "*": lambda a, b: _sym(a) * _sym(b),
    "/": lambda a, b: _sym(a) / _sym(b),
    "//": lambda a, b: sp.floor(_sym(a) / _sym(b)),
    "%": lambda a, b: sp.Mod(_sym(a), _sym(b)),
    "**": lambda a, b: _sym(a) ** _sym(b),
    "<": _compare(lambda a, b: a < b),
    "<=": _compare(lambda a, b: a <= b),
    ">": _compare(lambda a, b: a > b),
    ">=": _compare(lambda a, b: a >= b),
    "==": _eq,
    "!=": lambda a, b: (lambda r: (not r) if isinstance(r, bool) else sp.Not(r))(_eq(a, b)),
}


def _spec(name: str):
    return _DISTRIBUTIONS.get(name.split(".")[0])


# ----------------------------------------------------------------- the prelude subset
def _unary(fn):
    return lambda run, node, frame, x: _elementwise(lambda a: fn(_sym(a)), x)


def _length(run, node, frame, v):
    if isinstance(v, LazyVec):
        return v.length
    if isinstance(v, (list, tuple, str)):
        return sp.Integer(len(v))
    raise _err("symbolic density: len() of a value that is not a list", node,
               hint="pass the data (Model.density(data) / latex(data)): their values tell which are vectors")


def _range(run, node, frame, *args):
    if len(args) == 1 and isinstance(args[0], sp.Expr) and not args[0].is_number:
        return LazyVec(lambda i: i, args[0])  # range(N) of a symbolic length
    ints = []
    for a in args:
        if isinstance(a, sp.Integer):
            a = int(a)
        if not isinstance(a, int):
            raise _err("symbolic density: range() with a symbolic or random bound", node,
                       hint="pass the data without symbolic_data, or loop over the data themselves")
        ints.append(a)
    return list(range(*ints))


def _fill(value):
    def make(run, node, frame, n):
        if isinstance(n, sp.Integer):
            n = int(n)
        if not isinstance(n, int):
            if isinstance(n, sp.Basic):
                return LazyVec(lambda i: sp.Integer(value), n)
            raise _err("symbolic density: zeros()/ones() of this length", node)
        return Vec([sp.Integer(value)] * n)
    return make


def _zip(run, node, frame, *vs):
    if any(isinstance(v, LazyVec) for v in vs):
        if not all(isinstance(v, LazyVec) for v in vs) or len({v.length for v in vs}) != 1:
            raise _err("symbolic density: zip of vectors of different (symbolic) lengths", node)
        return LazyVec(lambda i: tuple(v.item(i) for v in vs), vs[0].length)
    return [tuple(t) for t in zip(*[run.items(v, node) for v in vs])]


def _enumerate(run, node, frame, v):
    if isinstance(v, LazyVec):
        return LazyVec(lambda i: (i, v.item(i)), v.length)
    return [(sp.Integer(k), x) for k, x in enumerate(run.items(v, node))]


def _reduce_sum(run, node, frame, v):
    if isinstance(v, LazyVec):
        i = run.index()
        return sp.Sum(_sym(v.item(i)), (i, 0, v.length - 1))
    return sp.Add(*[_sym(x) for x in run.items(v, node)])


def _mean(run, node, frame, v):
    return _reduce_sum(run, node, frame, v) / _length(run, node, frame, v)


def _prod(run, node, frame, v):
    return sp.Mul(*[_sym(x) for x in run.items(v, node)])


def _minmax(fn):
    def f(run, node, frame, *args):
        items = run.items(args[0], node) if len(args) == 1 else list(args)
        return fn(*[_sym(x) for x in items])
    return f


def _map(run, node, frame, f, v):
    return [run.call(f, [x], {}, node, frame) for x in run.items(v, node)]


def _softmax(run, node, frame, v):
    items = [_sym(x) for x in run.items(v, node)]
    total = sp.Add(*[sp.exp(x) for x in items])
    return Vec(sp.exp(x) / total for x in items)


def _logsumexp(run, node, frame, v):
    return sp.log(sp.Add(*[sp.exp(_sym(x)) for x in run.items(v, node)]))


def _dot(run, node, frame, a, b):
    return sp.Add(*[_sym(x) * _sym(y) for x, y in zip(run.items(a, node), run.items(b, node))])


def _to_float(run, node, frame, x):
    return _sym(x)


def _to_list(run, node, frame, v):
    return list(run.items(v, node))


def _twist(run, node, frame, potential):
    """An SMC twisting potential: it reweights intermediate targets only and leaves the
    program's joint density unchanged (it consumes an address, as the interpreter's)."""
    frame.address("twist")
    return None


_FUNCTIONS = {
    "twist": _twist,
    "exp": _unary(sp.exp), "log": _unary(sp.log), "sqrt": _unary(sp.sqrt), "abs": _unary(sp.Abs),
    "log1p": _unary(lambda x: sp.log(1 + x)), "expm1": _unary(lambda x: sp.exp(x) - 1),
    "sigmoid": _unary(lambda x: 1 / (1 + sp.exp(-x))), "logit": _unary(lambda x: sp.log(x / (1 - x))),
    "lgamma": _unary(sp.loggamma), "sin": _unary(sp.sin), "cos": _unary(sp.cos), "tan": _unary(sp.tan),
    "tanh": _unary(sp.tanh), "atan": _unary(sp.atan), "floor": _unary(sp.floor), "ceil": _unary(sp.ceiling),
    "len": _length, "range": _range, "zeros": _fill(0), "ones": _fill(1), "zip": _zip,
    "enumerate": _enumerate, "sum": _reduce_sum, "mean": _mean, "prod": _prod,
    "min": _minmax(sp.Min), "max": _minmax(sp.Max), "map": _map, "softmax": _softmax,
    "logsumexp": _logsumexp, "dot": _dot, "float": _to_float, "list": _to_list,
}

_CONSTANTS = {"pi": sp.pi, "e": sp.E, "inf": sp.oo}


# ------------------------------------------------------------- the log density table
_LOG2PI = sp.log(2 * sp.pi)


def _in_support(x, holds, formula):
    """``formula`` where ``holds`` (a condition on a concrete or symbolic value), -oo
    elsewhere; a choice symbol with the matching assumption makes ``holds`` True."""
    c = holds(x)
    if c is sp.true or c is True:
        return formula
    if c is sp.false or c is False:
        return -sp.oo
    return formula  # a symbolic datum/choice: its support is recorded, not written


def _normal(x, loc, scale):
    return -sp.log(scale) - _LOG2PI / 2 - (x - loc) ** 2 / (2 * scale ** 2)


def _lognormal(x, loc, scale):
    return _in_support(x, lambda v: sp.Gt(v, 0),
                       -sp.log(x) - sp.log(scale) - _LOG2PI / 2 - (sp.log(x) - loc) ** 2 / (2 * scale ** 2))


def _half_normal(x, scale):
    return _in_support(x, lambda v: sp.Ge(v, 0), sp.log(2) - sp.log(scale) - _LOG2PI / 2 - x ** 2 / (2 * scale ** 2))


def _half_cauchy(x, scale):
    return _in_support(x, lambda v: sp.Ge(v, 0), sp.log(2) - sp.log(sp.pi) - sp.log(scale)
                       - sp.log(1 + (x / scale) ** 2))


def _cauchy(x, loc, scale):
    return -sp.log(sp.pi) - sp.log(scale) - sp.log(1 + ((x - loc) / scale) ** 2)


def _student_t(x, df, loc, scale):
    return (sp.loggamma((df + 1) / 2) - sp.loggamma(df / 2) - sp.log(df * sp.pi) / 2 - sp.log(scale)
            - (df + 1) / 2 * sp.log(1 + ((x - loc) / scale) ** 2 / df))


def _laplace(x, loc, scale):
    return -sp.log(2 * scale) - sp.Abs(x - loc) / scale


def _exponential(x, rate):
    return _in_support(x, lambda v: sp.Ge(v, 0), sp.log(rate) - rate * x)


def _gamma(x, shape, rate):
    return _in_support(x, lambda v: sp.Gt(v, 0),
                       shape * sp.log(rate) - sp.loggamma(shape) + (shape - 1) * sp.log(x) - rate * x)


def _inverse_gamma(x, shape, rate):
    return _in_support(x, lambda v: sp.Gt(v, 0),
                       shape * sp.log(rate) - sp.loggamma(shape) - (shape + 1) * sp.log(x) - rate / x)


def _chi2(x, df):
    return _gamma(x, df / 2, sp.Rational(1, 2))


def _beta(x, a, b):
    return _in_support(x, lambda v: sp.And(sp.Ge(v, 0), sp.Le(v, 1)),
                       (a - 1) * sp.log(x) + (b - 1) * sp.log(1 - x)
                       - sp.loggamma(a) - sp.loggamma(b) + sp.loggamma(a + b))


def _uniform(x, low, high):
    return _in_support(x, lambda v: sp.And(sp.Ge(v, low), sp.Lt(v, high)), -sp.log(high - low))


def _bernoulli(x, p):
    if x.is_number:
        return sp.log(p) if x == 1 else sp.log(1 - p) if x == 0 else -sp.oo
    return x * sp.log(p) + (1 - x) * sp.log(1 - p)


class softplus(sp.Function):
    """log(1 + exp(x)), kept whole (sympy would expand it at length; numerically it is
    numpy's logaddexp(0, x), as stable as torch's)."""

    def _latex(self, printer):
        return r"\log\left(1 + e^{%s}\right)" % printer._print(self.args[0])

    def fdiff(self, argindex=1):
        return 1 / (1 + sp.exp(-self.args[0]))

    def _eval_evalf(self, prec):
        return sp.log(1 + sp.exp(self.args[0])).evalf(sp.core.evalf.prec_to_dps(prec))

    def _eval_rewrite_as_log(self, x, **kwargs):
        return sp.log(1 + sp.exp(x))


def _np_softplus(x):
    return np.logaddexp(0, x)


def _bernoulli_logits(x, logits):
    return x * logits - softplus(logits)


def _binomial(x, n, p):
    if x.is_number and n.is_number and not (0 <= x <= n):
        return -sp.oo
    return (sp.loggamma(n + 1) - sp.loggamma(x + 1) - sp.loggamma(n - x + 1)
            + x * sp.log(p) + (n - x) * sp.log(1 - p))


def _binomial_logits(x, n, logits):
    return (sp.loggamma(n + 1) - sp.loggamma(x + 1) - sp.loggamma(n - x + 1)
            + x * logits - n * softplus(logits))


def _poisson(x, rate):
    if x.is_number and (x < 0 or not x.is_integer):
        return -sp.oo
    return x * sp.log(rate) - rate - sp.loggamma(x + 1)


def _geometric(x, p):
    return x * sp.log(1 - p) + sp.log(p)


def _categorical_from(weights_of):
    def logpmf(x, probs):
        w = weights_of([_sym(v) for v in probs])
        total = sp.Add(*w)
        if x.is_number:
            k = int(x)
            return sp.log(w[k] / total) if 0 <= k < len(w) else -sp.oo
        return sp.log(sp.Piecewise(*[(wk / total, sp.Eq(x, k)) for k, wk in enumerate(w)], (0, True)))
    return logpmf


def _categorical_logits(x, logits):
    return _categorical_from(lambda ls: [sp.exp(v) for v in ls])(x, logits)


LOG_DENSITIES: dict[str, Callable] = {
    "normal": _normal, "lognormal": _lognormal, "half_normal": _half_normal, "half_cauchy": _half_cauchy,
    "cauchy": _cauchy, "student_t": _student_t, "laplace": _laplace, "exponential": _exponential,
    "gamma": _gamma, "inverse_gamma": _inverse_gamma, "chi2": _chi2, "beta": _beta, "uniform": _uniform,
    "bernoulli": _bernoulli, "flip": _bernoulli, "bernoulli.logits": _bernoulli_logits,
    "binomial": _binomial, "binomial.logits": _binomial_logits, "poisson": _poisson, "geometric": _geometric,
    "categorical": _categorical_from(lambda w: w), "categorical.logits": _categorical_logits,
}

_ASSUMPTIONS = {
    "lognormal": {"positive": True}, "half_normal": {"positive": True}, "half_cauchy": {"positive": True},
    "exponential": {"positive": True}, "gamma": {"positive": True}, "inverse_gamma": {"positive": True},
    "chi2": {"positive": True}, "beta": {"positive": True}, "bernoulli": {"integer": True, "nonnegative": True},
    "flip": {"integer": True, "nonnegative": True}, "binomial": {"integer": True, "nonnegative": True},
    "poisson": {"integer": True, "nonnegative": True}, "geometric": {"integer": True, "nonnegative": True},
    "categorical": {"integer": True, "nonnegative": True},
}


# ------------------------------------------------------------------------ the API
def density(program: ir.Program, entry: str, data: dict | None = None, symbolic_data: bool = False) \
        -> SymbolicDensity:
    """log p(choices, data) of ``entry(**data)`` as a sympy expression (see the module
    docstring). ``symbolic_data``: the data become symbols (numeric lists: IndexedBases of
    symbolic length, loops over them ``Sum``s); parameters without data are symbols
    either way."""
    if entry not in program.names:
        raise PPLError(f"no function named '{entry}'", hint=f"it defines: {', '.join(program.names)}")
    return SymbolicRun(program, symbolic_data).run(entry, dict(data or {}))


def evaluate(program: ir.Program, expr: ir.Expr, env: dict):
    """The value of ``expr`` (an IR expression) in ``env`` (name -> value: symbols,
    numbers, ``Vec``s), with the program's functions and the prelude subset in scope."""
    run = SymbolicRun(program)
    frame = Frame(run.globals)
    frame.vars.update(env)
    value = run.ev(expr, frame)
    if run.terms:
        raise _err("this expression has random choices or likelihood terms of its own", expr)
    return value


def latex(program: ir.Program, entry: str, data: dict | None = None, symbolic_data: bool | None = None) -> str:
    """``\\log p(choices \\mid data) = ...`` as LaTeX (sympy.latex of ``density``).
    ``symbolic_data`` None: the data as symbols with sums where the program allows it
    (loops that carry no state), else unrolled."""
    if symbolic_data is None:
        try:
            d = density(program, entry, data, True)
        except PPLError:
            d = density(program, entry, data, False)
    else:
        d = density(program, entry, data, symbolic_data)
    choices = _latex_names(d.choices)
    given = [sp.latex(sp.Symbol(p)) for p in d.params]
    lhs = r"\log p(" + ", ".join(choices) + (r" \mid " + ", ".join(given) if given else "") + ")"
    return lhs + " = " + sp.latex(d.expr)


def _latex_names(choices: dict) -> list:
    """One name per choice site (a vector or a loop's choices as ``\\theta``)."""
    names = []
    for sym in choices.values():
        if isinstance(sym, LazyVec):
            sym = sym.item(0)
        s = sym[0] if isinstance(sym, list) else sym
        base = s.base if isinstance(s, sp.Indexed) else s
        text = sp.latex(base)
        if text not in names:
            names.append(text)
    return names
