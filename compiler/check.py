"""Static checks on a parsed program, before anything runs: ``check(program, globals)``.

Names resolve as in Python: a function's scope holds its parameters and every name it
binds anywhere in its body (assignments, ``~`` targets, ``for`` targets, nested
``def``s); nested defs and lambdas also see their enclosing scopes; every function sees
the program's top-level functions and the builtins in ``globals``. Calls of top-level
functions and of builtins with a known arity are checked for their argument counts.
Each error is a ``PPLCheckError`` with the span of the offending node and, where
possible, a hint.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Tuple

from ppl.semantics import ir
from ppl.semantics.errors import PPLCheckError, did_you_mean

Arity = Optional[Tuple[int, Optional[int]]]  # (min_args, max_args or None); None: unchecked
_INTERNALS = "models cannot reach Python internals"


def check(program: ir.Program, globals: Mapping[str, Arity]) -> None:
    """Raise ``PPLCheckError`` for the first static error in ``program``."""
    _Checker(program, globals).run()


def bound_names(body: Iterable[ir.Stmt]) -> set[str]:
    """The names a block binds, not looking inside nested function bodies."""
    names: set[str] = set()
    for s in body:
        if isinstance(s, (ir.Assign, ir.For)):
            names.update(ir.assigned_names(s.target))
        elif isinstance(s, ir.Sample):
            names.add(s.target)
        elif isinstance(s, ir.FunctionDef):
            names.add(s.name)
        if isinstance(s, ir.If):
            names |= bound_names(s.then) | bound_names(s.orelse)
        elif isinstance(s, (ir.For, ir.While)):
            names |= bound_names(s.body)
    return names


def _takes(lo: int, hi: Optional[int]) -> str:
    n = lambda k: f"{k} argument" + ("" if k == 1 else "s")  # noqa: E731
    if hi is None:
        return f"at least {n(lo)}"
    if lo == hi:
        return n(lo) if lo else "no arguments"
    return f"{lo} to {n(hi)}"


class _Checker:
    def __init__(self, program: ir.Program, globals: Mapping[str, Arity]):
        self.program = program
        self.globals = dict(globals)
        self.functions: dict[str, ir.FunctionDef] = {}

    def fail(self, message: str, node, hint: Optional[str] = None):
        raise PPLCheckError(message, getattr(node, "span", None), hint)

    def name(self, name: str, node):
        if name.startswith("__"):
            self.fail(f"the name '{name}' is not allowed", node, _INTERNALS)

    def run(self):
        for f in self.program.functions:
            if not isinstance(f, ir.FunctionDef):
                self.fail("statements must be inside a function", f,
                          "put statements inside a def")
            if f.name in self.functions:
                self.fail(f"function '{f.name}' is defined twice", f, "rename one of them")
            self.functions[f.name] = f
        base = frozenset(self.functions) | frozenset(self.globals)
        for f in self.program.functions:
            self.function(f, (base,))

    # ------------------------------------------------------------------ scopes
    def function(self, f: ir.FunctionDef, scopes: tuple):
        self.name(f.name, f)
        for p in f.params:
            if p.default is not None:
                self.expr(p.default, scopes)
        self.params([p.name for p in f.params], f.params, f)
        local = frozenset(p.name for p in f.params) | bound_names(f.body)
        self.block(f.body, scopes + (local,))

    def params(self, names, nodes, owner):
        seen = set()
        for i, n in enumerate(names):
            node = nodes[i] if nodes else owner
            self.name(n, node)
            if n in seen:
                self.fail(f"duplicate parameter '{n}'", node, "give each parameter its own name")
            seen.add(n)

    def block(self, body, scopes):
        for s in body:
            self.stmt(s, scopes)

    def stmt(self, s: ir.Stmt, scopes):
        if isinstance(s, ir.FunctionDef):
            return self.function(s, scopes)
        for t in (ir.assigned_names(s.target) if hasattr(s, "target") else ()):
            self.name(t, s)
        for child in ir.children(s):
            if isinstance(child, ir.Stmt):
                self.stmt(child, scopes)
            else:
                self.expr(child, scopes)

    def expr(self, e: ir.Expr, scopes):
        if isinstance(e, ir.Var):
            self.name(e.name, e)
            if not any(e.name in s for s in scopes):
                visible = set().union(*scopes)
                self.fail(f"unknown name '{e.name}'", e, did_you_mean(e.name, visible)
                          or "assign it, draw it with '~', or pass it in as a parameter")
            return
        if isinstance(e, ir.Lambda):
            self.params(e.params, (), e)
            return self.expr(e.body, scopes + (frozenset(e.params),))
        if isinstance(e, ir.Attr):
            if e.name.startswith("_"):
                self.fail(f"attribute '{e.name}' is not allowed", e, _INTERNALS)
        if isinstance(e, ir.Call):
            self.call(e, scopes)
        for child in ir.children(e):
            if isinstance(child, ir.Keyword):
                self.name(child.name, child)
                child = child.value
            self.expr(child, scopes)

    # ------------------------------------------------------------------ calls
    def call(self, e: ir.Call, scopes):
        if not isinstance(e.func, ir.Var):
            return
        name = e.func.name
        if any(name in s for s in scopes[1:]):  # shadowed by a local: unknown arity
            return
        if name in self.functions:
            return self.call_function(e, self.functions[name])
        arity = self.globals.get(name)
        if arity is not None:
            lo, hi = arity
            given = len(e.args) + len(e.kwargs)
            if given < lo or (hi is not None and given > hi):
                self.fail(self.arity_message(name, lo, hi, given), e)

    @staticmethod
    def arity_message(name, lo, hi, given):
        were = "was" if given == 1 else "were"
        return f"{name}() takes {_takes(lo, hi)} but {given} {were} given"

    def call_function(self, e: ir.Call, f: ir.FunctionDef):
        names = [p.name for p in f.params]
        required = sum(p.default is None for p in f.params)
        if len(e.args) > len(names):
            self.fail(self.arity_message(f.name, required, len(names), len(e.args)), e)
        filled = set(names[: len(e.args)])
        for k in e.kwargs:
            if k.name not in names:
                self.fail(f"{f.name}() has no parameter '{k.name}'", k,
                          did_you_mean(k.name, names) or f"its parameters are: {', '.join(names) or 'none'}")
            if k.name in filled:
                self.fail(f"{f.name}() got multiple values for '{k.name}'", k)
            filled.add(k.name)
        missing = [p.name for p in f.params if p.default is None and p.name not in filled]
        if missing:
            if not e.kwargs:
                self.fail(self.arity_message(f.name, required, len(names), len(e.args)), e)
            self.fail(f"{f.name}() is missing the argument '{missing[0]}'", e)
