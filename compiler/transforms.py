"""Measure-preserving rewrites of the IR: program -> program.

Invariant of every pass here: for every function and every argument on which the source
program runs without error, the measure its call denotes *on return values* is
unchanged -- so are the evidence and every posterior expectation of the return value.
(Traces may change: a removed choice is no longer recorded.) The checker
``ppl.testing.validity.check_transformation`` verifies this by exact enumeration of the
program before and after, comparing the two measures in exact rational arithmetic; the
tests run it on generated finite programs, and show that plausible wrong versions of
these passes fail it.

* ``fold_constants``: evaluates operators on literals, conditional expressions and ``if``
  statements with a literal condition, and ``while False``. A result is folded only when
  it means the same under both semantics: the exact one reads a float literal as the
  decimal it spells (``0.1`` is 1/10), so ``1/3`` must stay a division (0.3333333333333333
  is not 1/3), while ``1/4`` folds to ``0.25``.
* ``eliminate_dead_code``: drops assignments of total pure expressions to names nothing
  reads, and random choices ``x ~ d(...)`` of a prelude distribution whose value nothing
  reads (a probability kernel integrates to one, so the measure on everything else is
  unchanged). Likelihood statements (``observe``, ``factor``, ``condition``) are never
  dropped: they weight the measure.
* ``optimize``: both, to a fixed point.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any, Callable

from ..semantics import ir
from ..semantics.errors import PPLError
from ..semantics.values import _py_binop

_NUMBER = (bool, int, float)


# ------------------------------------------------------------------------- constant folding
def fold_constants(program: ir.Program) -> ir.Program:
    """Fold operations on literals (see the module docstring); measure-preserving."""
    return _map_program(program, _fold_block)


def _fold_block(stmts: tuple) -> tuple:
    out = []
    for s in stmts:
        out.extend(_fold_stmt(s))
    return tuple(out)


def _body(stmts: tuple, span) -> tuple:
    """A block that may not be empty (a loop or function body, a branch)."""
    return stmts or (ir.Pass(span=span),)


def _fold_stmt(s: ir.Stmt) -> list:
    if isinstance(s, ir.If):
        cond = _fold_expr(s.cond)
        if isinstance(cond, ir.Const) and isinstance(cond.value, _NUMBER + (str, type(None))):
            return list(_fold_block(s.then if cond.value else s.orelse)) or [ir.Pass(span=s.span)]
        return [dataclasses.replace(s, cond=cond, then=_body(_fold_block(s.then), s.span),
                                    orelse=_fold_block(s.orelse))]
    if isinstance(s, ir.While):
        cond = _fold_expr(s.cond)
        if isinstance(cond, ir.Const) and cond.value is False:
            return []
        return [dataclasses.replace(s, cond=cond, body=_body(_fold_block(s.body), s.span))]
    if isinstance(s, ir.For):
        return [dataclasses.replace(s, iterable=_fold_expr(s.iterable), body=_body(_fold_block(s.body), s.span))]
    if isinstance(s, ir.FunctionDef):
        return [dataclasses.replace(s, body=_body(_fold_block(s.body), s.span))]
    return [_map_exprs(s, _fold_expr)]


def _fold_expr(e: ir.Expr) -> ir.Expr:
    if _is_num(e):
        return e  # a literal (-1 is the parser's UnaryOp("-", 1): leave it so)
    e = _map_exprs(e, _fold_expr)  # children first
    if isinstance(e, ir.BinOp) and _is_num(e.left) and _is_num(e.right):
        return _folded(e, lambda exact, a, b: _py_binop(e.op, a, b, exact), _value(e.left), _value(e.right))
    if isinstance(e, ir.UnaryOp) and _is_num(e.operand):
        ops = {"-": lambda exact, a: -a, "+": lambda exact, a: +a, "not": lambda exact, a: not a}
        if e.op in ops:
            return _folded(e, ops[e.op], _value(e.operand))
    if isinstance(e, ir.IfExp) and _is_num(e.cond):
        return e.then if _value(e.cond) else e.orelse
    if isinstance(e, ir.BoolOp) and _is_num(e.left):
        # Python's `a and b` is b when a is truthy, else a (and dually for `or`)
        keep_left = (not _value(e.left)) if e.op == "and" else bool(_value(e.left))
        return e.left if keep_left else e.right
    return e


def _is_num(e: ir.Expr) -> bool:
    """A number literal: ``Const`` of a bool/int/float, or ``-`` of a positive one (as
    the parser reads ``-1``)."""
    if isinstance(e, ir.UnaryOp) and e.op == "-":
        e = e.operand
        return isinstance(e, ir.Const) and type(e.value) in (int, float)
    return isinstance(e, ir.Const) and isinstance(e.value, _NUMBER)


def _value(e: ir.Expr):
    return -e.operand.value if isinstance(e, ir.UnaryOp) else e.value


def _literal(value, span) -> ir.Expr:
    """The literal the parser would make for ``value`` (negative numbers as ``-x``)."""
    if type(value) in (int, float) and (value < 0 or (value == 0 and str(value).startswith("-"))):
        return ir.UnaryOp("-", ir.Const(-value, span=span), span=span)
    return ir.Const(value, span=span)


def _folded(e: ir.Expr, op: Callable, *consts) -> ir.Expr:
    """``op`` applied to the literals, as a literal, if the result means the same under
    the sampling semantics (floats) and the exact one (decimals as Fractions); else e."""
    try:
        approx = op(False, *consts)
        exact = op(True, *(Fraction(repr(c)) if type(c) is float else c for c in consts))
    except (ArithmeticError, TypeError, ValueError, PPLError):
        return e  # e.g. division by zero: the program's own error, at run time
    if type(approx) is bool or type(approx) is int:
        return _literal(approx, e.span) if approx == exact and type(exact) is type(approx) else e
    if type(approx) is float:
        ok = isinstance(exact, (int, Fraction)) and not isinstance(exact, bool) and \
            approx == approx and abs(approx) != float("inf") and Fraction(repr(approx)) == exact
        return _literal(approx, e.span) if ok else e
    return e


# ----------------------------------------------------------------------- dead-code elimination
def eliminate_dead_code(program: ir.Program, distributions: frozenset | None = None) -> ir.Program:
    """Drop unread pure assignments and unread prelude choices (see the module
    docstring); measure-preserving on return values."""
    if distributions is None:
        from ..stdlib.distributions import DISTRIBUTIONS
        distributions = frozenset(DISTRIBUTIONS)
    functions = []
    for f in program.functions:
        while True:
            g = _dce_function(f, distributions)
            if g == f:
                break
            f = g
        functions.append(f)
    return dataclasses.replace(program, functions=tuple(functions))


def _dce_function(f: ir.FunctionDef, distributions: frozenset) -> ir.FunctionDef:
    reads = {n.name for n in ir.walk(f) if isinstance(n, ir.Var)}  # nested functions included
    bound = {p.name for p in f.params} | {t for n in ir.walk(f) if isinstance(n, (ir.Assign, ir.For))
                                          for t in ir.assigned_names(n.target)}
    bound |= {n.name for n in ir.walk(f) if isinstance(n, ir.FunctionDef) and n is not f}

    def dead(s: ir.Stmt) -> bool:
        if isinstance(s, ir.Assign) and isinstance(s.target, str):
            return s.target not in reads and _total(s.value)
        if isinstance(s, ir.Sample):
            d = s.dist
            return (s.target not in reads and isinstance(d, ir.Call) and isinstance(d.func, ir.Var)
                    and d.func.name in distributions and d.func.name not in bound
                    and all(_total(a) for a in d.args) and all(_total(k.value) for k in d.kwargs))
        return False

    def block(stmts: tuple) -> tuple:
        out = []
        for s in stmts:
            if dead(s):
                continue
            if isinstance(s, ir.If):
                s = dataclasses.replace(s, then=_body(block(s.then), s.span), orelse=block(s.orelse))
            elif isinstance(s, (ir.For, ir.While, ir.FunctionDef)):
                s = dataclasses.replace(s, body=_body(block(s.body), s.span))
            out.append(s)
        return tuple(out)

    return dataclasses.replace(f, body=_body(block(f.body), f.span))


_PARTIAL_OPS = frozenset(("/", "//", "%", "@", "**", "in"))


def _total(e: ir.Expr) -> bool:
    """Whether evaluating e can neither fail nor have an effect: literals, names (of
    bound variables), and arithmetic, comparison and logic that cannot raise."""
    if isinstance(e, (ir.Const, ir.Var)):
        return True
    if isinstance(e, ir.BinOp):
        return e.op not in _PARTIAL_OPS and _total(e.left) and _total(e.right) and \
            _numeric_literal_or_name(e.left) and _numeric_literal_or_name(e.right)
    if isinstance(e, ir.UnaryOp):
        return e.op == "not" and _total(e.operand)
    if isinstance(e, (ir.BoolOp, ir.IfExp)):
        return all(_total(c) for c in ir.children(e))
    if isinstance(e, (ir.ListExpr, ir.TupleExpr)):
        return all(_total(x) for x in e.items)
    return False


def _numeric_literal_or_name(e: ir.Expr) -> bool:
    # `a + b` on a string and a number raises; a literal string operand is not total
    return not (isinstance(e, ir.Const) and not isinstance(e.value, _NUMBER))


# ---------------------------------------------------------------------------------- both
def optimize(program: ir.Program) -> ir.Program:
    """``fold_constants`` then ``eliminate_dead_code``, until nothing changes."""
    while True:
        nxt = eliminate_dead_code(fold_constants(program))
        if nxt == program:
            return program
        program = nxt


PASSES = {"fold_constants": fold_constants, "eliminate_dead_code": eliminate_dead_code, "optimize": optimize}


# ------------------------------------------------------------------------------ plumbing
def _map_program(program: ir.Program, fn: Callable[[tuple], tuple]) -> ir.Program:
    return dataclasses.replace(program, functions=tuple(
        dataclasses.replace(f, body=fn(f.body) or (ir.Pass(span=f.span),)) for f in program.functions))


def _map_exprs(node: Any, fn: Callable[[ir.Expr], ir.Expr]) -> Any:
    """``node`` with ``fn`` applied to each expression directly below it (statements and
    nested bodies are left alone)."""
    changes = {}
    for name in node.__dataclass_fields__:
        if name == "span":
            continue
        v = getattr(node, name)
        if isinstance(v, ir.Expr):
            changes[name] = fn(v)
        elif isinstance(v, ir.Keyword):
            changes[name] = dataclasses.replace(v, value=fn(v.value))
        elif isinstance(v, tuple) and any(isinstance(x, (ir.Expr, ir.Keyword)) for x in v):
            changes[name] = tuple(fn(x) if isinstance(x, ir.Expr) else
                                  dataclasses.replace(x, value=fn(x.value)) if isinstance(x, ir.Keyword) else x
                                  for x in v)
    return dataclasses.replace(node, **changes) if changes else node


# ------------------------------------------------------------------------ non-centring
class NonCentre:
    """The non-centring reparameterisation of one choice: ``x ~ normal(m, s)`` becomes

        x_raw ~ normal(0 * (m) + 0 * (s), 1)     # standard normal, of x's shape
        x = m + s * x_raw

    Invariant (a change of variables, not a rewrite of the measure on traces): the
    program's measure on return values is unchanged, and the joint densities satisfy
    log p_old(T(z)) + log |det dT/dz| = log p_new(z) with T(z) = z except x = m + s * x_raw
    (|det dT/dx_raw| = s^n). The pass declares T as its ``choice_map`` (a function of the
    program: the map reads m and s), which ``ppl.testing.validity.check_transformation``
    checks on continuous programs. ``x`` must be a choice of a ``normal`` at the top level
    of a function's body (not in a loop or branch: its address is then ``x``)."""

    def __init__(self, site: str):
        self.site = site
        self.raw = f"{site}_raw"
        self.__name__ = f"non_centre({site})"

    def __call__(self, program: ir.Program) -> ir.Program:
        f, k, m, s = self._find(program)
        span = f.body[k].span
        zero = ir.Const(0, span=span)
        shape = ir.BinOp("+", ir.BinOp("*", zero, m, span=span), ir.BinOp("*", zero, s, span=span), span=span)
        raw = ir.Sample(self.raw, ir.Call(ir.Var("normal", span=span), (shape, ir.Const(1, span=span)), span=span),
                        span=span)
        value = ir.Assign(self.site, self.value(m, s, ir.Var(self.raw, span=span), span), span=span)
        body = f.body[:k] + (raw, value) + f.body[k + 1:]
        functions = tuple(dataclasses.replace(g, body=body) if g is f else g for g in program.functions)
        return dataclasses.replace(program, functions=functions)

    def value(self, m, s, raw, span) -> ir.Expr:
        """x's value from the standard-normal choice: m + s * x_raw."""
        return ir.BinOp("+", m, ir.BinOp("*", s, raw, span=span), span=span)

    def choice_map(self, program: ir.Program):
        """The declared change of variables: x = m + s * x_raw."""
        from ..semantics.choice_map import ChoiceMap
        from ..semantics.pretty import expr as pretty_expr
        _, _, m, s = self._find(program)
        raw = ir.Var(self.raw)
        return ChoiceMap.reparameterisation({self.site: pretty_expr(self.value(m, s, raw, m.span))},
                                            new=(self.raw,))

    def _find(self, program: ir.Program):
        """(function, position, mean, scale) of ``site ~ normal(mean, scale)``."""
        found = []
        for f in program.functions:
            for k, st in enumerate(f.body):
                if isinstance(st, ir.Sample) and st.target == self.site:
                    found.append((f, k, st))
        if not found:
            raise PPLError(f"non_centre: no choice `{self.site} ~ normal(...)` at the top level of a function",
                           hint="the site must be drawn outside loops and branches")
        if len(found) > 1:
            raise PPLError(f"non_centre: the choice `{self.site}` is drawn more than once", found[1][2].span)
        f, k, st = found[0]
        d = st.dist
        if not (isinstance(d, ir.Call) and isinstance(d.func, ir.Var) and d.func.name == "normal"
                and len(d.args) == 2 and not d.kwargs):
            raise PPLError(f"non_centre: `{self.site}` is not drawn from normal(mean, scale)", st.span)
        if any(isinstance(n, ir.Var) and n.name == self.raw for g in program.functions for n in ir.walk(g)) or \
                any(isinstance(n, (ir.Sample, ir.Assign)) and self.raw in ir.assigned_names(n.target)
                    for g in program.functions for n in ir.walk(g)):
            raise PPLError(f"non_centre: the name `{self.raw}` is already used", st.span)
        return f, k, d.args[0], d.args[1]


def non_centre(site: str) -> NonCentre:
    """The non-centring pass for the choice ``site`` (see ``NonCentre``)."""
    return NonCentre(site)
