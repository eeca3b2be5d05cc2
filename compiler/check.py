"""Static checks on a parsed program, before anything runs: ``check(program, globals)``.

Names resolve as in Python: a function's scope holds its parameters and every name it
binds anywhere in its body (assignments, ``~`` targets, ``for`` targets, nested
``def``s); nested defs and lambdas also see their enclosing scopes; every function sees
the program's top-level functions and the builtins in ``globals``. Calls of top-level
functions and of builtins with a known arity are checked for their argument counts.
Each error is a ``PPLCheckError`` with the span of the offending node and, where
possible, a hint.

Two footguns are caught where the checker can see them:

* a distribution used as a value: a direct call of a distribution constructor
  (``flip(0.1)``) as a condition (``if``/``while``/``... if c else ...``/``and``/``or``/
  ``not``/``condition``), an operand of arithmetic or a comparison, a ``factor``, or the
  entry function's result (the interpreter catches the cases it cannot see, such as
  ``x = flip(0.1)`` then ``if x:``). Helpers returning a distribution for a later ``~``
  stay legal;
* ``y ~ d`` on a parameter ``y`` of the entry function: the parameters are the data, and
  ``~`` would replace the datum by a draw (``observe y ~ d`` scores it).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Tuple

from ppl.semantics import ir
from ppl.semantics.errors import PPLCheckError, did_you_mean, distribution_as_value
from ppl.semantics.pretty import expr as source_of

Arity = Optional[Tuple[int, Optional[int]]]  # (min_args, max_args or None); None: unchecked
_INTERNALS = "models cannot reach Python internals"
_COMPARISONS = frozenset(("==", "!=", "<", "<=", ">", ">=", "in"))


def check(program: ir.Program, globals: Mapping[str, Arity], entry: Optional[str] = None) -> None:
    """Raise ``PPLCheckError`` for the first static error in ``program``. ``entry``: the
    function run as the model (its parameters are the data, its result the model's)."""
    _Checker(program, globals, entry).run()


def distribution_constructors() -> frozenset:
    """The builtin names whose call is a distribution (a value for ``~``, not a number)."""
    from ppl.stdlib.distributions import names
    return frozenset(names()) | {"propose"}


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



#: names users bring from Stan, PyMC, NumPyro and WebPPL that ppl spells differently (the
#: hint for an unknown name; names difflib finds on its own, e.g. ``Normal``, are left out)
_OTHER_PPLS = {
    **dict.fromkeys(("uniform_int", "randint", "random_integer", "randomInteger", "discrete_uniform",
                     "DiscreteUniform", "categorical_uniform"),
                    "an integer drawn uniformly from lo..hi: `uniform_draw(range(lo, hi + 1))`"),
    "uniformDraw": "did you mean 'uniform_draw'?",
    **dict.fromkeys(("multi_normal", "MultivariateNormal", "multivariate_normal", "mvn"),
                    "did you mean 'mv_normal'?"),
    **dict.fromkeys(("inv_gamma", "InverseGamma"), "did you mean 'inverse_gamma'?"),
    **dict.fromkeys(("lkj_corr_cholesky", "LKJCholesky"), "did you mean 'lkj_cholesky'?"),
    **dict.fromkeys(("neg_binomial", "neg_binomial_2", "NegativeBinomial"), "did you mean 'negative_binomial'?"),
}

class _Checker:
    def __init__(self, program: ir.Program, globals: Mapping[str, Arity], entry: Optional[str] = None):
        self.program = program
        self.globals = dict(globals)
        self.functions: dict[str, ir.FunctionDef] = {}
        self.entry = entry
        self.distributions = distribution_constructors() & frozenset(self.globals)
        self.in_entry = False  # checking the entry function's own body (not nested defs)
        self.entry_params: frozenset = frozenset()  # the entry's parameters, while in_entry

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
        saved = self.entry_params, self.in_entry
        self.in_entry = len(scopes) == 1 and f.name == self.entry  # the entry's own body
        self.entry_params = frozenset(p.name for p in f.params) if self.in_entry else frozenset()
        self.block(f.body, scopes + (local,))
        self.entry_params, self.in_entry = saved

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
        self.footguns(s, scopes)
        for t in (ir.assigned_names(s.target) if hasattr(s, "target") else ()):
            self.name(t, s)
        for child in ir.children(s):
            if isinstance(child, ir.Stmt):
                self.stmt(child, scopes)
            else:
                self.expr(child, scopes)

    def expr(self, e: ir.Expr, scopes):
        self.value_uses(e, scopes)
        if isinstance(e, ir.Var):
            self.name(e.name, e)
            if not any(e.name in s for s in scopes):
                visible = set().union(*scopes)
                self.fail(f"unknown name '{e.name}'", e, _OTHER_PPLS.get(e.name) or did_you_mean(e.name, visible)
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

    # ------------------------------------------------------------------ footguns
    def footguns(self, s: ir.Stmt, scopes):
        """A statement's uses of a distribution as a value, and ``~`` on the data."""
        if isinstance(s, (ir.If, ir.While)):
            self.as_condition(s.cond, scopes)
        elif isinstance(s, ir.Condition):
            self.as_condition(s.expr, scopes)
        elif isinstance(s, ir.Factor):
            self.not_distribution(s.expr, "as a factor (a number)", scopes)
        elif isinstance(s, ir.Return) and self.in_entry and s.value is not None:
            self.not_distribution(s.value, "as the model's result", scopes)
        elif isinstance(s, ir.Sample) and s.target in self.entry_params:
            self.fail(f"{s.target} is data; did you mean `observe {s.target} ~ ...`?", s,
                      f"'{s.target}' is a parameter of the model {self.entry}(), so its value is given: "
                      f"`{s.target} ~ d` would replace it by a draw from d; `observe {s.target} ~ d` scores "
                      f"the datum (or give the choice another name)")

    def value_uses(self, e: ir.Expr, scopes):
        """An expression's operands that are used as numbers or truth values."""
        if isinstance(e, ir.IfExp):
            self.as_condition(e.cond, scopes)
        elif isinstance(e, ir.BoolOp):
            self.as_condition(e.left, scopes)
        elif isinstance(e, ir.UnaryOp):
            if e.op == "not":
                self.as_condition(e.operand, scopes)
            else:
                self.not_distribution(e.operand, "in arithmetic", scopes)
        elif isinstance(e, ir.BinOp):
            use = "in a comparison" if e.op in _COMPARISONS else "in arithmetic"
            self.not_distribution(e.left, use, scopes)
            self.not_distribution(e.right, use, scopes)

    def as_condition(self, e: ir.Expr, scopes):
        if isinstance(e, ir.BoolOp):
            self.as_condition(e.left, scopes)
            self.as_condition(e.right, scopes)
        else:
            self.not_distribution(e, "as a condition", scopes)

    def not_distribution(self, e: ir.Expr, use: str, scopes):
        """Fail if ``e`` is a direct call of a (not shadowed) distribution constructor."""
        if not (isinstance(e, ir.Call) and isinstance(e.func, ir.Var)):
            return
        name = e.func.name
        if name not in self.distributions or name in self.functions or any(name in s for s in scopes[1:]):
            return
        message, hint = distribution_as_value(source_of(e), use)
        self.fail(message, e, hint)

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
