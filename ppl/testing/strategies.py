"""Hypothesis strategies for ppl programs.

Syntax: ``ir_programs()``, ``ir_expressions()``, ``ir_statements()`` draw random,
well-formed IR. Everything generated is something the parser can produce (names are
never keywords, numeric constants are non-negative, ``Slice`` only appears as an index,
blocks are non-empty, parameters with defaults come last), so
``parse_program(pretty(p)) == p`` should hold for every draw. The programs need not
make sense (unknown names, wrong arities): they exercise syntax, not semantics.

Semantics: ``finite_programs()`` draws DSL *source text* of small, meaningful, finite
discrete models (random choices, arithmetic, nested random ``if``, ``for``, ``observe``,
``factor``, ``condition``) whose evidence is never zero, so that exact enumeration gives
their meaning and every other semantics can be checked against it
(``tests/test_finite_programs.py``).
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
        st.builds(ir.Sample, names(), exprs, st.booleans()),
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


# ------------------------------------------------------------------ finite DSL programs
#
# ``finite_programs()`` draws *source text* of small models whose random choices all
# have finite support, so that exact enumeration can give their meaning to compare
# every other semantics against. See its docstring for what the programs contain.

_PROBS = ("0.5", "0.25", "0.75", "0.1", "0.9", "0.3", "0.6", "0.2", "1/3", "2/3")  # in (0, 1)
_EDGE_PROBS = ("0", "1")  # only for choices: they cut a branch, never all of them
_LIKELY = ("0.9", "0.8", "3/4", "1")  # the escape hatch of every `condition`
_FACTORS = ("0.5", "-1", "1/2", "-0.25", "0", "0.1")
_MAX_PATHS = 600  # bound on the number of execution paths (enumeration cost)


class _Scope:
    """Variables visible at a point of the program: name -> "int" | "bool"."""

    def __init__(self, parent=None):
        self.vars: dict[str, str] = dict(parent.vars) if parent is not None else {}
        self.loop_vars: frozenset = parent.loop_vars if parent is not None else frozenset()

    def of(self, kind: str) -> list[str]:
        return sorted(n for n, k in self.vars.items() if k == kind)


class _Gen:
    """Builds one program from hypothesis draws (see ``finite_programs``)."""

    def __init__(self, draw, max_depth: int, factors: bool, ret: str):
        self.draw = draw
        self.max_depth = max_depth
        self.factors = factors
        self.ret = ret
        self.fresh = 0

    def name(self, prefix="v") -> str:
        self.fresh += 1
        return f"{prefix}{self.fresh}"

    def pick(self, options):
        return self.draw(st.sampled_from(options))

    def chance(self, p_percent: int) -> bool:
        return self.draw(st.integers(0, 99)) < p_percent

    # ---------------------------------------------------------------------- expressions
    def int_expr(self, sc: _Scope, depth: int = 2) -> str:
        ints = sc.of("int")
        if depth <= 0 or not self.chance(55):
            return self.pick(ints) if ints and self.chance(80) else str(self.draw(st.integers(0, 3)))
        kind = self.draw(st.integers(0, 7))
        a = self.int_expr(sc, depth - 1)
        if kind == 0:
            return f"({a} + {self.int_expr(sc, depth - 1)})"
        if kind == 1:
            return f"({a} - {self.int_expr(sc, depth - 1)})"
        if kind == 2:
            return f"({a} * {self.draw(st.integers(0, 2))})"  # a constant factor: values stay small
        if kind == 3:
            return f"({a} if {self.bool_expr(sc, depth - 1)} else {self.int_expr(sc, depth - 1)})"
        if kind == 4:
            return f"({a} % {self.draw(st.integers(2, 3))})"
        if kind == 5:
            return f"({a} // 2)"
        if kind == 6:
            return f"{self.pick(['min', 'max'])}({a}, {self.int_expr(sc, depth - 1)})"
        return f"(1 if {self.bool_expr(sc, depth - 1)} else 0)"

    def bool_expr(self, sc: _Scope, depth: int = 2) -> str:
        bools = sc.of("bool")
        if depth <= 0 or not self.chance(50):
            if bools and self.chance(85):
                return self.pick(bools)
            if sc.of("int") and self.chance(70):
                return f"({self.pick(sc.of('int'))} > {self.draw(st.integers(0, 2))})"
            return self.pick(["True", "False"])
        kind = self.draw(st.integers(0, 5))
        if kind == 0:
            return f"(not {self.bool_expr(sc, depth - 1)})"
        if kind == 1:
            return f"({self.bool_expr(sc, depth - 1)} and {self.bool_expr(sc, depth - 1)})"
        if kind == 2:
            return f"({self.bool_expr(sc, depth - 1)} or {self.bool_expr(sc, depth - 1)})"
        op = self.pick(["<", "<=", "==", "!=", ">"])
        return f"({self.int_expr(sc, depth - 1)} {op} {self.int_expr(sc, depth - 1)})"

    def prob(self, sc: _Scope, edge: bool = False) -> str:
        if edge and self.chance(10):
            return self.pick(_EDGE_PROBS)
        if sc.vars and self.chance(25):
            return f"({self.pick(_PROBS)} if {self.bool_expr(sc, 1)} else {self.pick(_PROBS)})"
        return self.pick(_PROBS)

    def weights(self, k: int, positive: bool) -> str:
        lo = 1 if positive or not self.chance(15) else 0
        ws = [self.draw(st.integers(lo, 3)) for _ in range(k)]
        if sum(ws) == 0:
            ws[0] = 1
        return "[" + ", ".join(map(str, ws)) + "]"

    # ----------------------------------------------------------------------- statements
    def choice(self, kind: str, sc: _Scope) -> tuple[str, int]:
        """(distribution text, support size) for a new random variable of this kind."""
        if kind == "bool":
            return f"{self.pick(['flip', 'bernoulli'])}({self.prob(sc, edge=True)})", 2
        which = self.draw(st.integers(0, 2))
        if which == 0:
            k = self.draw(st.integers(2, 3))
            return f"categorical({self.weights(k, positive=False)})", k
        if which == 1:
            k = self.draw(st.integers(2, 3))
            items = [str(self.draw(st.integers(-1, 3))) for _ in range(k)]
            return f"uniform_draw([{', '.join(items)}])", k
        n = self.draw(st.integers(1, 2))
        return f"binomial({n}, {self.prob(sc, edge=True)})", n + 1

    def block(self, sc: _Scope, depth: int, budget: int, size: int, least: int = 1) -> tuple[list[str], int]:
        """Statements (unindented lines) and an upper bound on their number of paths."""
        lines: list[str] = []
        paths = 1
        n = self.draw(st.integers(least, size))
        for _ in range(n):
            stmt, p = self.statement(sc, depth, max(1, budget // paths))
            lines += stmt
            paths *= p
        return lines, paths

    def statement(self, sc: _Scope, depth: int, budget: int) -> tuple[list[str], int]:
        kinds = ["sample", "sample", "sample", "assign", "observe", "observe", "condition"]
        if self.factors:
            kinds.append("factor")
        if depth < self.max_depth:
            kinds += ["if", "if", "if", "for"]
        kind = self.pick(kinds)
        if kind == "sample" or not sc.vars:
            vkind = self.pick(["int", "bool"])
            existing = [n for n in sc.of(vkind) if n not in sc.loop_vars]
            name = self.pick(existing) if existing and self.chance(30) else self.name()
            dist, k = self.choice(vkind, sc)
            sc.vars[name] = vkind
            if k > budget:  # no room for more paths: a constant instead
                return [f"{name} = {'True' if vkind == 'bool' else '1'}"], 1
            return [f"{name} ~ {dist}"], k
        if kind == "assign":
            vkind = self.pick(["int", "bool"])
            expr = self.int_expr(sc) if vkind == "int" else self.bool_expr(sc)
            existing = [n for n in sc.of(vkind) if n not in sc.loop_vars]
            name = self.pick(existing) if existing and self.chance(50) else self.name()
            sc.vars[name] = vkind
            return [f"{name} = {expr}"], 1
        if kind == "observe":
            which = self.draw(st.integers(0, 2))
            if which == 0:
                return [f"observe {self.bool_expr(sc)} ~ bernoulli({self.prob(sc)})"], 1
            if which == 1:
                k = self.draw(st.integers(2, 3))
                return [f"observe ({self.int_expr(sc)}) % {k} ~ categorical({self.weights(k, positive=True)})"], 1
            n = self.draw(st.integers(1, 2))
            value = self.int_expr(sc) if self.chance(60) else str(self.draw(st.integers(0, n)))
            return [f"observe ({value}) % {n + 1} ~ binomial({n}, {self.prob(sc)})"], 1
        if kind == "condition":
            if budget < 2:
                return ["pass"], 1
            ok = self.name("ok")
            return [f"{ok} ~ flip({self.pick(_LIKELY)})", f"condition {self.bool_expr(sc)} or {ok}"], 2
        if kind == "factor":
            if self.chance(50):
                return [f"factor {self.pick(_FACTORS)}"], 1
            return [f"factor ({self.pick(_FACTORS)} if {self.bool_expr(sc)} else {self.pick(_FACTORS)})"], 1
        if kind == "if":
            cond = self.bool_expr(sc) if not sc.of("int") or self.chance(80) else self.pick(sc.of("int"))
            then_sc = _Scope(sc)
            then, p1 = self.block(then_sc, depth + 1, budget, 3)
            self._maybe_return(then_sc, then)
            lines = [f"if {cond}:"] + ["    " + l for l in then]
            p2 = 1
            if self.chance(60):
                else_sc = _Scope(sc)
                other, p2 = self.block(else_sc, depth + 1, budget, 3)
                self._maybe_return(else_sc, other)
                lines += ["else:"] + ["    " + l for l in other]
            return lines, max(p1, p2)  # a path takes one branch
        # for
        k = self.draw(st.integers(1, 3))
        i = self.name("i")
        body_sc = _Scope(sc)
        body_sc.vars[i] = "int"
        body_sc.loop_vars = body_sc.loop_vars | {i}
        per = max(1, int(round(budget ** (1 / k))))
        body, p = self.block(body_sc, depth + 1, per, 2)
        return [f"for {i} in range({k}):"] + ["    " + l for l in body], p ** k

    def _maybe_return(self, sc: _Scope, lines: list[str]):
        if self.chance(25):
            lines.append(f"return {self.ret_expr(sc)}")

    def ret_expr(self, sc: _Scope) -> str:
        """An expression of the return type that reads at least one variable."""
        v = self.pick(sorted(sc.vars))
        if self.ret == "int":
            base = v if sc.vars[v] == "int" else f"(1 if {v} else 0)"
            return base if self.chance(40) else f"({base} + {self.int_expr(sc, 1)})"
        base = v if sc.vars[v] == "bool" else f"({v} > {self.draw(st.integers(0, 2))})"
        return base if self.chance(40) else f"({base} {self.pick(['and', 'or'])} {self.bool_expr(sc, 1)})"

    def program(self, size: int) -> str:
        sc = _Scope()
        first, p = self.statement(sc, self.max_depth, _MAX_PATHS)  # no variables yet: a choice
        body, q = self.block(sc, 0, max(1, _MAX_PATHS // p), size, least=min(3, size))
        lines = first + body + [f"return {self.ret_expr(sc)}"]
        return "def model():\n" + "\n".join("    " + l for l in lines) + "\n"


@st.composite
def finite_programs(draw, max_statements: int = 6, max_depth: int = 2, factors: bool = True) -> str:
    """Source text of a small, finite, discrete model ``def model(): ...`` (no data).

    Contents: random choices ``flip``/``bernoulli``/``categorical``/``uniform_draw``/
    ``binomial`` with rational probabilities (written as decimals like ``0.3`` or as
    ``1/3``; a choice may also use 0 or 1, or a probability that depends on earlier
    values); integer and boolean arithmetic on them (``+ - * // % min max``, comparisons,
    ``and or not``, conditional expressions); ``if``/``else`` on random values, nested up
    to ``max_depth``, whose branches may reassign outer variables, bind their own, and
    ``return`` early; ``for`` loops over ``range(1..3)``; ``observe`` of discrete values
    under ``bernoulli``/``categorical``/``binomial``; ``factor`` of small rational
    constants (when ``factors``); ``condition``; and a final ``return`` of an int or bool
    expression (one type per program).

    Guarantees, by construction:

    * every random choice has finite support and every program terminates, with at most
      a few hundred execution paths (enumeration is quick);
    * **the evidence is never 0**: every observation has positive probability for every
      value it can see (probabilities in (0, 1), positive categorical weights, the value
      reduced modulo the support size), factors are finite, and every ``condition c``
      is ``condition c or ok`` with a fresh ``ok ~ flip(q)``, q >= 3/4, drawn just before;
    * names are defined before use on every path (branch-local names stay in their branch);
    * integer values stay small (multiplication only by constants 0..2).

    Without ``factor`` statements (or with only ``factor 0``) the exact evidence is a
    ``Fraction``; ``factor c`` with c != 0 multiplies by the irrational e^c, making the
    exact weights floats.
    """
    ret = draw(st.sampled_from(["int", "bool"]))
    return _Gen(draw, max_depth, factors, ret).program(max_statements)


# ------------------------------------------------------------- continuous conjugate models
@st.composite
def conjugate_programs(draw):
    """A continuous model with a closed-form posterior: (source, data, answer), where
    answer has the posterior ``mean`` and ``sd`` of the returned parameter and the exact
    ``log_evidence``. Families: normal mean with known noise, beta-bernoulli,
    gamma-poisson; random hyperparameters and data (2-8 observations)."""
    import math

    from scipy.special import betaln, gammaln

    family = draw(st.sampled_from(["normal", "beta", "gamma"]))
    n = draw(st.integers(2, 8))
    if family == "normal":
        m0 = draw(st.floats(-3, 3, allow_nan=False))
        s0 = draw(st.floats(0.5, 3))
        s = draw(st.floats(0.5, 2))
        ys = [round(draw(st.floats(-5, 5, allow_nan=False)), 3) for _ in range(n)]
        src = ("def model(ys, m0, s0, s):\n    mu ~ normal(m0, s0)\n    for y in ys:\n"
               "        observe y ~ normal(mu, s)\n    return mu\n")
        prec = 1 / s0 ** 2 + n / s ** 2
        mean = (m0 / s0 ** 2 + sum(ys) / s ** 2) / prec
        # evidence: ys ~ MVN(m0 1, s^2 I + s0^2 11^T)
        ybar = sum(ys) / n
        ss = sum((y - ybar) ** 2 for y in ys)
        v = s ** 2 + n * s0 ** 2
        log_z = (-0.5 * n * math.log(2 * math.pi) - (n - 1) * math.log(s) - 0.5 * math.log(v)
                 - 0.5 * ss / s ** 2 - 0.5 * n * (ybar - m0) ** 2 / v)
        return src, {"ys": ys, "m0": m0, "s0": s0, "s": s}, {"mean": mean, "sd": prec ** -0.5, "log_evidence": log_z}
    if family == "beta":
        a = draw(st.floats(0.5, 5))
        b = draw(st.floats(0.5, 5))
        flips = [draw(st.booleans()) for _ in range(n)]
        h = sum(flips)
        src = ("def model(flips, a, b):\n    p ~ beta(a, b)\n    for f in flips:\n"
               "        observe f ~ bernoulli(p)\n    return p\n")
        a2, b2 = a + h, b + n - h
        sd = math.sqrt(a2 * b2 / ((a2 + b2) ** 2 * (a2 + b2 + 1)))
        return src, {"flips": flips, "a": a, "b": b}, {"mean": a2 / (a2 + b2), "sd": sd,
                                                        "log_evidence": betaln(a2, b2) - betaln(a, b)}
    k = draw(st.floats(1, 5))
    r = draw(st.floats(0.5, 3))
    counts = [draw(st.integers(0, 8)) for _ in range(n)]
    src = ("def model(counts, k, r):\n    lam ~ gamma(k, r)\n    for c in counts:\n"
           "        observe c ~ poisson(lam)\n    return lam\n")
    k2, r2 = k + sum(counts), r + n
    log_z = (k * math.log(r) - gammaln(k) + gammaln(k2) - k2 * math.log(r2)
             - sum(gammaln(c + 1) for c in counts))
    return src, {"counts": counts, "k": k, "r": r}, {"mean": k2 / r2, "sd": math.sqrt(k2) / r2,
                                                     "log_evidence": float(log_z)}
