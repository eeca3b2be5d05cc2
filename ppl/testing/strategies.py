"""Hypothesis strategies for random, well-formed IR: ``ir_programs()``, ``ir_expressions()``.

Everything generated is something the parser can produce (names are never keywords,
numeric constants are non-negative, ``Slice`` only appears as an index, blocks are
non-empty, parameters with defaults come last), so ``parse_program(pretty(p)) == p``
should hold for every draw. The programs need not make sense (unknown names, wrong
arities): they exercise syntax, not semantics.
"""
from __future__ import annotations

import math
import string

from hypothesis import strategies as st

from ppl.compiler.parser import KEYWORDS, RESERVED
from ppl.semantics import ir

_TAIL = string.ascii_letters + string.digits + "_"
_COMMON = ["x", "y", "z", "mu", "sigma", "xs", "ys", "f", "g", "acc", "t", "i", "n", "p"]


def names() -> st.SearchStrategy[str]:
    """Identifiers that are not ppl keywords or reserved Python words."""
    head = st.sampled_from(string.ascii_letters + "_")
    fresh = st.builds(str.__add__, head, st.text(_TAIL, max_size=5))
    return st.one_of(st.sampled_from(_COMMON), fresh).filter(
        lambda s: s not in KEYWORDS and s not in RESERVED)


def constants() -> st.SearchStrategy[object]:
    floats = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False).filter(
        lambda v: math.copysign(1.0, v) > 0)
    return st.one_of(st.integers(0, 10**30), floats, st.booleans(), st.none(),
                     st.text(max_size=6))


def _targets() -> st.SearchStrategy[ir.Target]:
    return st.one_of(names(), st.lists(names(), min_size=1, max_size=3).map(tuple))


@st.composite
def _calls(draw, sub):
    func = draw(sub)
    args = tuple(draw(st.lists(sub, max_size=3)))
    keys = draw(st.lists(names(), max_size=2, unique=True))
    return ir.Call(func, args, tuple(ir.Keyword(k, draw(sub)) for k in keys))


def ir_expressions(max_leaves: int = 10) -> st.SearchStrategy[ir.Expr]:
    """Expressions of every kind, nested up to about ``max_leaves`` leaves."""
    leaves = st.one_of(names().map(ir.Var), constants().map(ir.Const))

    def extend(sub):
        opt = st.none() | sub
        return st.one_of(
            st.builds(ir.BinOp, st.sampled_from(ir.BINARY_OPS), sub, sub),
            st.builds(ir.BoolOp, st.sampled_from(("and", "or")), sub, sub),
            st.builds(ir.UnaryOp, st.sampled_from(ir.UNARY_OPS), sub),
            st.builds(ir.IfExp, sub, sub, sub),
            _calls(sub),
            st.builds(ir.Lambda, st.lists(names(), max_size=3, unique=True).map(tuple), sub),
            st.builds(ir.ListExpr, st.lists(sub, max_size=3).map(tuple)),
            st.builds(ir.TupleExpr, st.lists(sub, max_size=3).map(tuple)),
            st.builds(ir.Index, sub, sub | st.builds(ir.Slice, opt, opt)),
            st.builds(ir.Attr, sub, names()),
        )

    return st.recursive(leaves, extend, max_leaves=max_leaves)


@st.composite
def _params(draw, exprs):
    params = draw(st.lists(names(), max_size=3, unique=True))
    first_default = draw(st.integers(0, len(params)))
    return tuple(ir.Param(p, draw(exprs) if i >= first_default else None)
                 for i, p in enumerate(params))


def ir_statements(exprs=None, max_leaves: int = 8) -> st.SearchStrategy[ir.Stmt]:
    """Statements of every kind; compound ones nest, about ``max_leaves`` simple ones in all."""
    exprs = exprs if exprs is not None else ir_expressions(6)
    simple = st.one_of(
        st.builds(ir.Assign, _targets(), exprs),
        st.builds(ir.Sample, names(), exprs),
        st.builds(ir.Observe, exprs, exprs),
        st.builds(ir.Factor, exprs),
        st.builds(ir.Condition, exprs),
        st.builds(ir.Return, st.none() | exprs),
        st.builds(ir.ExprStmt, exprs),
        st.builds(ir.Pass),
    )

    def extend(sub):
        block = st.lists(sub, min_size=1, max_size=3).map(tuple)
        return st.one_of(
            st.builds(ir.If, exprs, block, st.just(()) | block),
            st.builds(ir.For, _targets(), exprs, block),
            st.builds(ir.While, exprs, block),
            st.builds(ir.FunctionDef, names(), _params(exprs), block),
        )

    return st.recursive(simple, extend, max_leaves=max_leaves)


def ir_programs(max_functions: int = 2, max_leaves: int = 5) -> st.SearchStrategy[ir.Program]:
    """Programs of 1..max_functions top-level defs with distinct names."""
    exprs = ir_expressions(max_leaves)
    body = st.lists(ir_statements(exprs, max_leaves=6), min_size=1, max_size=3).map(tuple)
    functions = st.builds(ir.FunctionDef, names(), _params(exprs), body)
    return st.builds(ir.Program, st.lists(functions, min_size=1, max_size=max_functions,
                                          unique_by=lambda f: f.name).map(tuple))
