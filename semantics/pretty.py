"""IR -> readable ppl source: ``pretty(node)``.

The output is Python-like with 4-space indents and only the parentheses that the
precedence of each operator needs, so that ``parse_program(pretty(p)) == p`` for every
program the parser can produce. A one-statement ``If`` in an ``orelse`` prints as
``elif``; floats and strings print with ``repr`` so they read back exactly.
"""
from __future__ import annotations

import math
from typing import Any

from . import ir

# Binding strength, loosest first; mirrors compiler/grammar.lark.
LAMBDA, IFEXP, OR, AND, NOT, COMPARE, SUM, PRODUCT, UNARY, POWER, POSTFIX, ATOM = range(12)
_BINARY = {"==": COMPARE, "!=": COMPARE, "<": COMPARE, "<=": COMPARE, ">": COMPARE,
           ">=": COMPARE, "in": COMPARE, "+": SUM, "-": SUM,
           "*": PRODUCT, "/": PRODUCT, "//": PRODUCT, "%": PRODUCT, "@": PRODUCT}
INDENT = "    "


def pretty(node: Any) -> str:
    """Source text for a Program, FunctionDef, statement, expression, Keyword or Param."""
    if isinstance(node, ir.Program):
        return "\n".join("\n".join(_stmt(f, 0)) + "\n" for f in node.functions)
    if isinstance(node, ir.Stmt):
        return "\n".join(_stmt(node, 0))
    if isinstance(node, ir.Keyword):
        return f"{node.name}={expr(node.value)}"
    if isinstance(node, ir.Param):
        return node.name if node.default is None else f"{node.name}={expr(node.default)}"
    return expr(node)


# ------------------------------------------------------------------------------ statements
def _block(body, depth: int) -> list[str]:
    return [line for s in body for line in _stmt(s, depth)] or [INDENT * depth + "pass"]


def _target(t: ir.Target) -> str:
    if isinstance(t, str):
        return t
    return ", ".join(t) + ("," if len(t) == 1 else "")


def _stmt(s: ir.Stmt, depth: int) -> list[str]:
    pad = INDENT * depth
    if isinstance(s, ir.FunctionDef):
        params = ", ".join(pretty(p) for p in s.params)
        return [f"{pad}def {s.name}({params}):", *_block(s.body, depth + 1)]
    if isinstance(s, ir.If):
        lines = [f"{pad}if {expr(s.cond)}:", *_block(s.then, depth + 1)]
        while len(s.orelse) == 1 and isinstance(s.orelse[0], ir.If):
            s = s.orelse[0]
            lines += [f"{pad}elif {expr(s.cond)}:", *_block(s.then, depth + 1)]
        if s.orelse:
            lines += [f"{pad}else:", *_block(s.orelse, depth + 1)]
        return lines
    if isinstance(s, ir.For):
        return [f"{pad}for {_target(s.target)} in {expr(s.iterable)}:", *_block(s.body, depth + 1)]
    if isinstance(s, ir.While):
        return [f"{pad}while {expr(s.cond)}:", *_block(s.body, depth + 1)]
    return [pad + _simple(s)]


def _simple(s: ir.Stmt) -> str:
    if isinstance(s, ir.Assign):
        return f"{_target(s.target)} = {expr(s.value)}"
    if isinstance(s, ir.Sample):
        dist = expr(s.dist)
        if _ends_in_matmul_by_name(s.dist, LAMBDA):  # else `x ~ (a @ b)` would read back as an annotation
            dist = f"({dist})"
        return f"{s.target} ~ {dist}" + (" @enumerate" if s.enumerate else "")
    if isinstance(s, ir.Observe):
        return f"observe {expr(s.value)} ~ {expr(s.dist)}"
    if isinstance(s, ir.Factor):
        return f"factor {expr(s.expr)}"
    if isinstance(s, ir.Condition):
        return f"condition {expr(s.expr)}"
    if isinstance(s, ir.Return):
        return "return" if s.value is None else f"return {expr(s.value)}"
    if isinstance(s, ir.ExprStmt):
        return expr(s.expr)
    if isinstance(s, ir.Pass):
        return "pass"
    raise TypeError(f"pretty: not a statement: {s!r}")


def _ends_in_matmul_by_name(e: ir.Expr, context: int) -> bool:
    """Whether ``e``, printed where it binds at least as tightly as ``context``, ends in
    an unbracketed ``@ name``: on a choice's right-hand side that is read as an
    annotation (``compiler.lower._split_annotation``)."""
    prec = _expr(e)[0]
    if prec < context:
        return False  # printed in brackets
    if isinstance(e, ir.BinOp):
        if e.op == "@":
            return isinstance(e.right, ir.Var)
        return e.op != "**" and _ends_in_matmul_by_name(e.right, prec + 1)
    if isinstance(e, ir.BoolOp):
        return _ends_in_matmul_by_name(e.right, prec + 1)
    if isinstance(e, ir.UnaryOp):
        return _ends_in_matmul_by_name(e.operand, prec)
    if isinstance(e, ir.IfExp):
        return _ends_in_matmul_by_name(e.orelse, LAMBDA)
    if isinstance(e, ir.Lambda):
        return _ends_in_matmul_by_name(e.body, LAMBDA)
    return False


# ----------------------------------------------------------------------------- expressions
def expr(e: ir.Expr, context: int = LAMBDA) -> str:
    """``e`` as source, parenthesised if it binds more loosely than ``context``."""
    prec, text = _expr(e)
    return f"({text})" if prec < context else text


def _const(v: Any) -> tuple[int, str]:
    if isinstance(v, float):
        if math.isnan(v):
            return ATOM, "(1e999 - 1e999)"
        text = repr(v).replace("inf", "1e999")
        return (UNARY if text.startswith("-") else ATOM), text
    if isinstance(v, int) and not isinstance(v, bool) and v < 0:
        return UNARY, repr(v)
    return ATOM, repr(v)


def _args(e: ir.Call) -> str:
    return ", ".join([expr(a) for a in e.args] + [pretty(k) for k in e.kwargs])


def _expr(e: ir.Expr) -> tuple[int, str]:
    if isinstance(e, ir.Const):
        return _const(e.value)
    if isinstance(e, ir.Var):
        return ATOM, e.name
    if isinstance(e, ir.BinOp):
        if e.op == "**":  # right-associative; the base is a primary, the exponent a factor
            return POWER, f"{expr(e.left, POSTFIX)} ** {expr(e.right, UNARY)}"
        p = _BINARY[e.op]
        right = p + 1
        left = p + 1 if p == COMPARE else p  # comparisons do not chain
        return p, f"{expr(e.left, left)} {e.op} {expr(e.right, right)}"
    if isinstance(e, ir.BoolOp):
        p = OR if e.op == "or" else AND
        return p, f"{expr(e.left, p)} {e.op} {expr(e.right, p + 1)}"
    if isinstance(e, ir.UnaryOp):
        if e.op == "not":
            return NOT, f"not {expr(e.operand, NOT)}"
        return UNARY, f"{e.op}{expr(e.operand, UNARY)}"
    if isinstance(e, ir.IfExp):
        return IFEXP, f"{expr(e.then, OR)} if {expr(e.cond, OR)} else {expr(e.orelse, LAMBDA)}"
    if isinstance(e, ir.Lambda):
        params = " " + ", ".join(e.params) if e.params else ""
        return LAMBDA, f"lambda{params}: {expr(e.body)}"
    if isinstance(e, ir.Call):
        return POSTFIX, f"{expr(e.func, POSTFIX)}({_args(e)})"
    if isinstance(e, ir.Index):
        return POSTFIX, f"{expr(e.value, POSTFIX)}[{expr(e.index)}]"
    if isinstance(e, ir.Slice):  # only meaningful inside Index
        lo = "" if e.lo is None else expr(e.lo, IFEXP)
        hi = "" if e.hi is None else expr(e.hi, IFEXP)
        return ATOM, f"{lo}:{hi}"
    if isinstance(e, ir.Attr):
        value = expr(e.value, POSTFIX)
        if isinstance(e.value, ir.Const) and isinstance(e.value.value, (int, float)) \
                and not value.startswith("("):
            value = f"({value})"  # `1.real` would lex as the float `1.`
        return POSTFIX, f"{value}.{e.name}"
    if isinstance(e, ir.ListExpr):
        return ATOM, "[" + ", ".join(expr(i) for i in e.items) + "]"
    if isinstance(e, ir.TupleExpr):
        inner = ", ".join(expr(i) for i in e.items)
        return ATOM, f"({inner},)" if len(e.items) == 1 else f"({inner})"
    raise TypeError(f"pretty: not an expression: {e!r}")
