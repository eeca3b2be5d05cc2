"""Lowering: the lark parse tree of a program -> IR (``semantics.ir``).

One ``Transformer`` method per grammar rule (see ``grammar.lark``), bottom-up. Every
node gets the ``Span`` of the text it came from. The few rules the grammar is too
lenient for (assignment targets, argument order, top-level statements) are checked
here and reported as ``PPLSyntaxError``.
"""
from __future__ import annotations

import ast
import sys
import warnings
from dataclasses import replace

from lark import Token, Transformer, Tree, v_args
from lark.exceptions import VisitError

from ppl.semantics import ir
from ppl.semantics.errors import PPLError, PPLSyntaxError
from ppl.semantics.source import SourceFile, Span


def lower(tree: Tree, source: SourceFile) -> ir.Program:
    """The IR program of a parse tree (from ``compiler.parser.parse_source``)."""
    if sys.getrecursionlimit() < 20_000:  # the parser bounds the nesting (parser.MAX_NESTING)
        sys.setrecursionlimit(20_000)
    try:
        return Lower(source).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, PPLError):
            raise e.orig_exc from None
        if isinstance(e.orig_exc, RecursionError):
            raise _too_deep(source, getattr(e, "obj", None)) from None
        raise
    except RecursionError:
        raise _too_deep(source, None) from None


def _too_deep(source: SourceFile, node) -> PPLSyntaxError:
    meta = getattr(node, "meta", None)
    line, col = (meta.line, meta.column) if meta is not None and not meta.empty else (1, 1)
    return PPLSyntaxError("the program is nested too deeply", Span(line, col, line, col, source=source),
                          "split deeply nested expressions into several assignments")


@v_args(meta=True)
class Lower(Transformer):
    def __init__(self, source: SourceFile):
        super().__init__()
        self.source = source

    # ---------------------------------------------------------------------- helpers
    def _span(self, m) -> Span:
        if isinstance(m, Token):
            return Span(m.line, m.column, m.end_line, m.end_column - 1, self.source)
        if getattr(m, "empty", True):
            return Span(1, 1, 1, 1, self.source)
        return Span(m.line, m.column, m.end_line, m.end_column - 1, self.source)

    def _fail(self, message, span: Span, hint=None):
        raise PPLSyntaxError(message, span, hint)

    def _target(self, e: ir.Expr) -> ir.Target:
        if isinstance(e, ir.Var):
            return e.name
        if isinstance(e, ir.TupleExpr) and e.items and all(isinstance(i, ir.Var) for i in e.items):
            return tuple(i.name for i in e.items)
        hint = {
            ir.Index: "lists are immutable; build a new list instead",
            ir.Attr: "attributes cannot be assigned",
        }.get(type(e), "assign to a name, or to names separated by commas")
        self._fail("cannot assign to this expression", e.span, hint)

    # ---------------------------------------------------------------------- program
    def start(self, meta, stmts):
        for s in stmts:
            if not isinstance(s, ir.FunctionDef):
                what = "'return' outside a function" if isinstance(s, ir.Return) else \
                    "statements must be inside a function"
                self._fail(what, s.span, "put statements inside a def, e.g. 'def model():'")
        return ir.Program(tuple(stmts), span=self._span(meta))

    def funcdef(self, meta, c):
        params, seen_default = c[1:-1], False
        for p in params:
            if p.default is None and seen_default:
                self._fail("a parameter without a default follows one with a default", p.span,
                           "put parameters with defaults last")
            seen_default = seen_default or p.default is not None
        return ir.FunctionDef(str(c[0]), tuple(params), c[-1], span=self._span(meta))

    def param(self, meta, c):
        return ir.Param(str(c[0]), c[1], span=self._span(meta))

    def suite(self, meta, stmts):
        return tuple(stmts)

    # ---------------------------------------------------------------------- statements
    def expr_stmt(self, meta, c):
        return ir.ExprStmt(c[0], span=self._span(meta))

    def assign(self, meta, c):
        return ir.Assign(self._target(c[0]), c[1], span=self._span(meta))

    def sample(self, meta, c):
        if not isinstance(c[0], ir.Var):
            self._fail("the left side of '~' must be a name", c[0].span,
                       "to condition on data, write 'observe <value> ~ <distribution>'")
        span = self._span(meta)
        split = _split_annotation(c[1], span)
        if split is None:
            return ir.Sample(c[0].name, c[1], span=span)
        dist, name = split
        if name.name != "enumerate":
            self._fail(f"unknown annotation '@{name.name}' of a random choice", span,
                       "the one annotation is '@enumerate': `z ~ categorical(w) @enumerate` "
                       "(between two values, '@' is matrix multiplication, which never gives a distribution)")
        return ir.Sample(c[0].name, dist, True, span=span)

    def observe(self, meta, c):
        span = self._span(meta)
        split = _split_annotation(c[1], span)
        if split is not None and split[1].name == "enumerate":
            self._fail("only a random choice can be annotated", split[1].span,
                       "'@enumerate' marks a choice to sum out (`z ~ categorical(w) @enumerate`); "
                       "an observe has no choice to sum")
        return ir.Observe(c[0], c[1], span=span)

    def factor(self, meta, c):
        return ir.Factor(c[0], span=self._span(meta))

    def condition(self, meta, c):
        return ir.Condition(c[0], span=self._span(meta))

    def return_(self, meta, c):
        return ir.Return(c[0], span=self._span(meta))

    def pass_(self, meta, c):
        return ir.Pass(span=self._span(meta))

    def if_(self, meta, c):
        orelse = c[2] if len(c) > 2 else ()
        return ir.If(c[0], c[1], (orelse,) if isinstance(orelse, ir.If) else orelse,
                     span=self._span(meta))

    elif_ = if_

    def else_(self, meta, c):
        return c[0]

    def for_(self, meta, c):
        target = c[0] if isinstance(c[0], tuple) else str(c[0])
        return ir.For(target, c[1], c[2], span=self._span(meta))

    def names(self, meta, c):
        return tuple(str(t) for t in c)

    def while_(self, meta, c):
        return ir.While(c[0], c[1], span=self._span(meta))

    # ---------------------------------------------------------------------- expressions
    def ifexp(self, meta, c):
        return ir.IfExp(c[1], c[0], c[2], span=self._span(meta))

    def lambdef(self, meta, c):
        return ir.Lambda(tuple(str(t) for t in c[:-1]), c[-1], span=self._span(meta))

    def or_(self, meta, c):
        return ir.BoolOp("or", c[0], c[1], span=self._span(meta))

    def and_(self, meta, c):
        return ir.BoolOp("and", c[0], c[1], span=self._span(meta))

    def not_(self, meta, c):
        return ir.UnaryOp("not", c[0], span=self._span(meta))

    def binop(self, meta, c):
        return ir.BinOp(str(c[1]), c[0], c[2], span=self._span(meta))

    def not_in(self, meta, c):  # `a not in b` is `not (a in b)`
        span = self._span(meta)
        return ir.UnaryOp("not", ir.BinOp("in", c[0], c[1], span=span), span=span)

    def pow(self, meta, c):
        return ir.BinOp("**", c[0], c[1], span=self._span(meta))

    def unary(self, meta, c):
        return ir.UnaryOp(str(c[0]), c[1], span=self._span(meta))

    def call(self, meta, c):
        args, kwargs = [], {}
        for a in c[1] or ():
            if isinstance(a, ir.Keyword):
                if a.name in kwargs:
                    self._fail(f"keyword argument '{a.name}' repeated", a.span)
                kwargs[a.name] = a
            elif kwargs:
                self._fail("positional argument follows keyword argument", a.span,
                           "put positional arguments before keyword arguments")
            else:
                args.append(a)
        return ir.Call(c[0], tuple(args), tuple(kwargs.values()), span=self._span(meta))

    def arguments(self, meta, c):
        return c

    def kwarg(self, meta, c):
        return ir.Keyword(str(c[0]), c[1], span=self._span(meta))

    def index(self, meta, c):
        return ir.Index(c[0], c[1], span=self._span(meta))

    def slice(self, meta, c):
        return ir.Slice(c[0], c[1], span=self._span(meta))

    def attr(self, meta, c):
        return ir.Attr(c[0], str(c[1]), span=self._span(meta))

    def var(self, meta, c):
        return ir.Var(str(c[0]), span=self._span(meta))

    def int_(self, meta, c):
        try:
            return ir.Const(int(c[0]), span=self._span(meta))
        except ValueError:  # more digits than Python converts
            self._fail("integer literal is too long", self._span(meta))

    def float_(self, meta, c):
        return ir.Const(float(c[0]), span=self._span(meta))

    def string(self, meta, c):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes such as '\d' stay as text
                value = ast.literal_eval(c[0])
        except (SyntaxError, ValueError) as e:
            self._fail("invalid string literal", self._span(meta), str(e.args[0]) if e.args else None)
        return ir.Const(value, span=self._span(meta))

    def true(self, meta, c):
        return ir.Const(True, span=self._span(meta))

    def false(self, meta, c):
        return ir.Const(False, span=self._span(meta))

    def none(self, meta, c):
        return ir.Const(None, span=self._span(meta))

    def tuple_(self, meta, c):
        return ir.TupleExpr(tuple(c), span=self._span(meta))

    def list_(self, meta, c):
        return ir.ListExpr(tuple(c), span=self._span(meta))


# ------------------------------------------------------------------ annotations of choices
# `z ~ d @enumerate` parses as `z ~ (d @ enumerate)` (a trailing `@ NAME` binds to the last
# operand of d, as `*` would: `z ~ a if c else b @enumerate` is `a if c else (b @ enumerate)`).
# A distribution is never the result of a matrix product, so an unbracketed `@ NAME` at the
# very end of a choice's right-hand side is its annotation; `(d @ name)` in brackets stays
# a product. The children through which an operand can end where its parent ends:
_LAST_OPERAND = {ir.BinOp: "right", ir.BoolOp: "right", ir.UnaryOp: "operand", ir.IfExp: "orelse",
                 ir.Lambda: "body"}


def _split_annotation(e: ir.Expr, stmt: Span):
    """(the distribution, the annotation's ``Var``) when ``e``, the right-hand side of the
    statement spanning ``stmt``, ends in an unbracketed ``@ NAME``; else None."""
    if (e.span.end_line, e.span.end_col) != (stmt.end_line, stmt.end_col):
        return None  # a closing bracket follows: `(d @ name)` is a product
    if isinstance(e, ir.BinOp) and e.op == "@" and isinstance(e.right, ir.Var):
        return e.left, e.right
    field = _LAST_OPERAND.get(type(e))
    if field is None or isinstance(e, ir.BinOp) and e.op == "**":
        return None
    inner = _split_annotation(getattr(e, field), stmt)
    if inner is None:
        return None
    dist, name = inner
    end = dist.span
    span = Span(e.span.line, e.span.col, end.end_line, end.end_col, e.span.source)
    return replace(e, **{field: dist}, span=span), name
