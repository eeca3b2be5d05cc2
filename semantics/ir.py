"""The core calculus of ppl.

A program is a tuple of function definitions; the body of a function is a block of
statements. Every node is an immutable dataclass carrying the ``Span`` of the source it
came from (spans never take part in equality, so ``parse(pretty(p)) == p``).

Meaning (see ``docs/ARCHITECTURE.md``): a call of a function denotes a measure on its
return values, built from the kernels of its random choices (``Sample``), multiplied by
the likelihood factors ``Observe``/``Factor``/``Condition`` and pushed forward through
the deterministic parts. ``semantics.exact`` computes that measure for programs whose
choices have finite support; ``semantics.interpreter`` samples from it over a batch of
particles, with the weights that make the samples proper for it.

Addresses: a ``Sample`` named ``x`` is addressed ``x`` in its function's frame, with the
indices of the enclosing loops appended (``x[3]``, ``x[3][0]``), and the frames of calls
prefixed (``geometric/b``, ``geometric/geometric/b``). Observe/factor/condition sites are
addressed by their source position (``obs@5:9``), so they are stable across runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple, Union

from .source import NO_SPAN, Span


def _span() -> Any:
    return field(default=NO_SPAN, compare=False, repr=False, kw_only=True)


# ----------------------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Expr:
    pass


@dataclass(frozen=True)
class Const(Expr):
    """A literal: int, float, bool, str or None. Exact semantics reads float literals as
    the decimal rationals they spell (``0.1`` is 1/10)."""

    value: Any
    span: Span = _span()


@dataclass(frozen=True)
class Var(Expr):
    name: str
    span: Span = _span()


BINARY_OPS = ("+", "-", "*", "/", "//", "%", "@", "**", "==", "!=", "<", "<=", ">", ">=", "in")
UNARY_OPS = ("-", "+", "not")


@dataclass(frozen=True)
class BinOp(Expr):
    op: str
    left: Expr
    right: Expr
    span: Span = _span()


@dataclass(frozen=True)
class BoolOp(Expr):
    """Short-circuit ``and`` / ``or``: the right side runs only where it is needed."""

    op: str  # "and" | "or"
    left: Expr
    right: Expr
    span: Span = _span()


@dataclass(frozen=True)
class UnaryOp(Expr):
    op: str
    operand: Expr
    span: Span = _span()


@dataclass(frozen=True)
class IfExp(Expr):
    cond: Expr
    then: Expr
    orelse: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Keyword:
    name: str
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Call(Expr):
    func: Expr
    args: Tuple[Expr, ...] = ()
    kwargs: Tuple[Keyword, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class Lambda(Expr):
    params: Tuple[str, ...]
    body: Expr
    span: Span = _span()


@dataclass(frozen=True)
class ListExpr(Expr):
    items: Tuple[Expr, ...]
    span: Span = _span()


@dataclass(frozen=True)
class TupleExpr(Expr):
    items: Tuple[Expr, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Slice(Expr):
    """Only valid as the index of ``Index``: ``xs[lo:hi]``."""

    lo: Optional[Expr]
    hi: Optional[Expr]
    span: Span = _span()


@dataclass(frozen=True)
class Index(Expr):
    value: Expr
    index: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Attr(Expr):
    """``obj.name``: only on runtime objects that expose attributes to models (no
    Python attribute access leaks through: see ``semantics.values.attribute``)."""

    value: Expr
    name: str
    span: Span = _span()


# ------------------------------------------------------------------------------ statements
@dataclass(frozen=True)
class Stmt:
    pass


Target = Union[str, Tuple[str, ...]]  # a name, or names for tuple unpacking


@dataclass(frozen=True)
class Assign(Stmt):
    target: Target
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Sample(Stmt):
    """``name ~ dist``: a random choice addressed by ``name`` (plus loop indices).
    ``enumerate`` (``name ~ dist @enumerate``): sampling methods that can (importance,
    smc, nuts) sum the choice out exactly instead of drawing it (``semantics.enumerate_sites``);
    the program's meaning is the same."""

    target: str
    dist: Expr
    enumerate: bool = False
    span: Span = _span()


@dataclass(frozen=True)
class Observe(Stmt):
    """``observe value ~ dist``: multiplies the weight by dist's density at value."""

    value: Expr
    dist: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Factor(Stmt):
    """``factor e``: multiplies the weight by exp(e)."""

    expr: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Condition(Stmt):
    """``condition e``: multiplies the weight by 1 if e holds, else 0."""

    expr: Expr
    span: Span = _span()


@dataclass(frozen=True)
class If(Stmt):
    cond: Expr
    then: Tuple[Stmt, ...]
    orelse: Tuple[Stmt, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class For(Stmt):
    target: Target
    iterable: Expr
    body: Tuple[Stmt, ...]
    span: Span = _span()


@dataclass(frozen=True)
class While(Stmt):
    """Bounded: exceeding the interpreter's ``max_iterations`` is a runtime error."""

    cond: Expr
    body: Tuple[Stmt, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Return(Stmt):
    value: Optional[Expr]
    span: Span = _span()


@dataclass(frozen=True)
class ExprStmt(Stmt):
    expr: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Pass(Stmt):
    span: Span = _span()


@dataclass(frozen=True)
class Param:
    name: str
    default: Optional[Expr] = None
    span: Span = _span()


@dataclass(frozen=True)
class FunctionDef(Stmt):
    """A named function; at top level, a model or a helper. Nested defs are closures."""

    name: str
    params: Tuple[Param, ...]
    body: Tuple[Stmt, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Program:
    functions: Tuple[FunctionDef, ...]
    span: Span = _span()

    def function(self, name: str) -> FunctionDef:
        for f in self.functions:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in self.functions)


# ------------------------------------------------------------------------------ traversal
def children(node: Any):
    """The IR nodes directly below ``node`` (expressions and statements)."""
    for name in getattr(node, "__dataclass_fields__", {}):
        if name == "span":
            continue
        v = getattr(node, name)
        if isinstance(v, (Expr, Stmt, Keyword, Param)):
            yield v
        elif isinstance(v, tuple):
            for item in v:
                if isinstance(item, (Expr, Stmt, Keyword, Param, FunctionDef)):
                    yield item


def walk(node: Any):
    """Pre-order traversal of every IR node below and including ``node``."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(list(children(n))))


def assigned_names(target: Target) -> Tuple[str, ...]:
    return (target,) if isinstance(target, str) else tuple(target)
