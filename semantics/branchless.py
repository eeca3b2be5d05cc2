"""Branch-free conditionals: ``a if c else b`` (and an ``if``/``else`` that only assigns)
on a per-particle condition, evaluated without splitting the particles.

The interpreter's general rule for control flow on a per-particle value is to *split*
the particles (``Interpreter.split``): each branch runs on its own subset, the results
are joined (``values.merge_parts``). Splitting reads the condition into Python (which
rows hold?), so a program with such a conditional cannot be recorded as one fixed graph
(``inference.potential``'s tracing: the change-point model's ``rate = early if t < tau
else late``, tau a discrete choice held per chain, ran the interpreter at every leapfrog
step), and every split costs a subset, a merge and their index tensors.

Here, when both branches are *select-safe* expressions, each is evaluated once for every
particle of the context and the rows are chosen by ``torch.where``. Exactness, the
same values at every particle as the split:

* **values**: a select-safe expression is built from variables, ``+``, ``-``, unary
  ``-``/``+``, ``*`` by a numeric literal, indexing and nested ``x if c else y`` of such
  expressions; each is computed row by row, so a row's value does not depend on which
  other rows are computed with it. The select is used only when both branches give a
  per-particle tensor (``Batched``) of the same dtype and per-particle shape, which is
  what the split's merge would make (a literal branch, a list, a per-particle Python
  value, a lazy value, a dtype that the merge would promote: the split runs, since its
  result's type can depend on which rows take which side);
* **errors**: a branch evaluated for rows that do not take it may fail there (an index
  out of range, a variable that those rows never assigned): any ``PPLError`` while
  evaluating the branches sends the conditional back to the split, which raises only for
  rows that take the failing branch, exactly as before. The branches are pure (no
  effects, no draws), so evaluating them twice changes nothing but time;
* **gradients**: ``torch.where`` passes a zero gradient to the rows a branch does not
  give, and through the select-safe operations a zero stays a zero (their derivatives
  are the constants 1, -1, a literal, or a gather): a branch that is not taken never
  adds a NaN to a gradient (``sqrt``, ``log``, division or a product of two variables
  would: ``0 * inf``), which is why they are not select-safe.

``If`` statements get the same treatment when both bodies are plain assignments of
select-safe expressions to names (``if t < tau: rate = early else: rate = late``): every
assigned name gets ``where(c, then-value, else-value)``, a name assigned on one side
only keeps its old value on the other (the frame's own, read for every row; a name the
frame does not hold yet sends the statement to the split, which makes it exist for
the assigning rows only). A statement that reads a name assigned by an earlier
statement of its own body also goes to the split.
"""
from __future__ import annotations

from typing import Any

import torch

from . import ir
from .errors import PPLError
from .values import Batched, Particles, rows, to_bool_rows

#: binary operators whose derivative in each operand is a constant (1 or -1)
_LINEAR_OPS = ("+", "-")


def _is_number_literal(e: ir.Expr) -> bool:
    return type(e) is ir.Const and isinstance(e.value, (int, float)) and not isinstance(e.value, bool)


def select_safe(e: ir.Expr) -> bool:
    """Whether ``e`` may be evaluated for rows that do not take its branch (see the module
    docstring): it reads at least one variable (a literal branch is never per-particle)
    and uses only select-safe operations."""
    t = type(e)
    if t is ir.Var:
        return True
    if t is ir.UnaryOp:
        return e.op in ("-", "+") and select_safe(e.operand)
    if t is ir.BinOp:
        if e.op in _LINEAR_OPS:
            return _operand_safe(e.left) and _operand_safe(e.right) and (select_safe(e.left) or select_safe(e.right))
        if e.op == "*":
            return (_is_number_literal(e.left) and select_safe(e.right)) or \
                (_is_number_literal(e.right) and select_safe(e.left))
        return False
    if t is ir.Index:
        return select_safe(e.value) and not isinstance(e.index, ir.Slice) and _index_safe(e.index)
    if t is ir.IfExp:
        return _pure_condition(e.cond) and select_safe(e.then) and select_safe(e.orelse)
    return False


def _operand_safe(e: ir.Expr) -> bool:
    return _is_number_literal(e) or select_safe(e)


def _index_safe(e: ir.Expr) -> bool:
    """An index: a literal, a variable or linear arithmetic of them (never differentiated)."""
    t = type(e)
    if t is ir.Const:
        return isinstance(e.value, int)
    if t is ir.Var:
        return True
    if t is ir.BinOp and e.op in _LINEAR_OPS:
        return _index_safe(e.left) and _index_safe(e.right)
    if t is ir.UnaryOp:
        return e.op == "-" and _index_safe(e.operand)
    return False


def _pure_condition(e: ir.Expr) -> bool:
    """A nested conditional's condition: no call at all (evaluated for every row)."""
    if type(e) is ir.Call or type(e) is ir.Lambda:
        return False
    return all(_pure_condition(c) for c in ir.children(e))


def reads(e: ir.Expr) -> set:
    """The variable names an expression reads."""
    if type(e) is ir.Var:
        return {e.name}
    out: set = set()
    for c in ir.children(e):
        out |= reads(c)
    return out


# ------------------------------------------------------------------------------ plans
def ifexp_plan(e: ir.IfExp) -> bool:
    """Whether ``a if c else b`` may be selected row-wise (both branches select-safe)."""
    return select_safe(e.then) and select_safe(e.orelse)


def if_plan(s: ir.If):
    """For an ``if`` statement whose bodies only assign select-safe expressions to names:
    (names, then-expressions, else-expressions) with a dict name -> expression per side;
    None otherwise (the statement splits as usual)."""
    sides = []
    for body in (s.then, s.orelse):
        assigned: dict = {}
        for st in body:
            if type(st) is not ir.Assign or not isinstance(st.target, str) or not select_safe(st.value):
                return None
            if st.target in assigned or reads(st.value) & set(assigned):
                return None  # sequential within the body: the split keeps its order
            assigned[st.target] = st.value
        sides.append(assigned)
    then, orelse = sides
    if not then and not orelse:
        return None
    return tuple(dict.fromkeys([*then, *orelse])), then, orelse


# ------------------------------------------------------------------------- evaluation
def condition_mask(c: Batched, ctx: Particles, span) -> torch.Tensor:
    """The condition's rows as a bool tensor [M] (the split's own conversion and errors)."""
    try:
        return to_bool_rows(c, ctx)
    except PPLError as err:
        raise err.with_span(span)


def select(mask: torch.Tensor, a: Any, b: Any, ctx: Particles) -> Batched | None:
    """``where(mask, a, b)`` row-wise over ctx when a and b are per-particle tensors of the
    same dtype and per-particle shape (what the split would merge without promoting);
    None otherwise. May raise a PPLError (rows that were never assigned)."""
    if type(a) is not Batched or type(b) is not Batched:
        return None
    ta, tb = rows(a, ctx), rows(b, ctx)
    if ta.dtype != tb.dtype or ta.shape != tb.shape:
        return None
    m = mask.reshape(mask.shape[0], *([1] * (ta.dim() - 1)))
    return Batched(torch.where(m, ta, tb), ctx.idx)


def ifexp(interp, e: ir.IfExp, c: Batched, fr, ctx: Particles) -> Batched | None:
    """``e`` (whose condition has the value c) without splitting, or None: the caller splits."""
    mask = condition_mask(c, ctx, e.cond.span)
    try:
        return select(mask, interp.pv(e.then, fr, ctx), interp.pv(e.orelse, fr, ctx), ctx)
    except PPLError:
        return None  # some row failed: the split raises only for rows that take the failing branch


def if_statement(interp, plan, c: Batched, s: ir.If, fr, ctx: Particles) -> bool:
    """Run an ``if`` statement of plan ``plan`` (``if_plan``) without splitting: assign each
    name its row-wise value; False (nothing assigned) when the split must run."""
    names, then, orelse = plan
    mask = condition_mask(c, ctx, s.cond.span)
    values = {}
    try:
        for name in names:
            if (name not in then or name not in orelse) and name not in fr.vars:
                return False  # defined on one path only: the split makes it exist for those rows
            a = interp.pv(then[name], fr, ctx) if name in then else fr.vars[name]
            b = interp.pv(orelse[name], fr, ctx) if name in orelse else fr.vars[name]
            v = select(mask, a, b, ctx)
            if v is None:
                return False
            values[name] = v
    except PPLError:
        return False
    for name, v in values.items():
        interp.assign(fr, name, v, ctx)
    return True
