"""Which random choices each site of a model depends on: a dependency analysis.

``analyse(model, data)`` runs an *abstract interpreter* over the IR (``semantics.ir``) for
one call of the entry function on the given data. Deterministic, data-only values are
computed concretely with the real interpreter's operations (loop bounds over data, data
indexing, helper calls), so loops over data are unrolled and every site gets exactly the
address the interpreter gives it (``x``, ``x[3]``, ``f/x``, ``f#1/x``,
``strength(alice)/x``, ``obs@5:9``; see ``Frame.address``). Every other value is
*unknown*, and carries the set of random-choice addresses it depends on:

* data flow: an operation's result depends on what its operands depend on; a list built
  element by element keeps one set per element, so ``xs[i]`` with a known ``i`` depends on
  that element only (an unknown index depends on every element and on the index);
* control flow: statements under ``if c:`` (or a loop body, a short-circuit operand, an
  ``x if c else y`` branch) on an unknown ``c`` depend on ``c``'s set, and so does
  everything after a ``return`` taken under it.

Each site (choice, observe, factor, condition) is recorded with its kind, parents (the
choice addresses it depends on: a superset of its true dependencies, never a subset), the
data names it reads, its span, the enclosing loops (plates) and whether it exists on every
path (``static``).

Where the analysis cannot decide the structure (a loop bound, a ``while`` condition or a
memoised call's argument that depends on a random value; recursion on a random value),
it falls back to the sites of executed traces: the sampling interpreter runs the model
from the prior for a batch of particles and the sites reached are united; a site's
parents are then every choice that ran before it on some particle's path (sound, since
a value can only depend on choices made before it), and ``static`` means "reached by
every particle of that batch". Such an analysis says so:
``from_traces`` is True, ``reason`` says why, and every site carries ``from_traces``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Optional

import torch

from . import ir
from .errors import PPLError, PPLRuntimeError
from .interpreter import Builtin, Closure, Frame, Interpreter, _label
from ..stdlib.printing import silent as _silent
from .source import Span
from .values import Particles, binop, truthy, unop

__all__ = ["analyse", "Dependencies", "Site", "Plate", "Recipe", "SITE_KINDS"]

SITE_KINDS = ("choice", "observe", "factor", "condition")
_LIKELIHOOD_PREFIX = {"observe": "obs", "factor": "factor", "condition": "cond"}
EMPTY: frozenset = frozenset()
TRACE_PARTICLES = 256


# ------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Plate:
    """One enclosing loop of a site: the loop variable (``"map"``/``"fold"``/``"filter"``
    for a higher-order call, ``"while"``), this iteration's index and the loop's length
    (None for a ``while`` loop)."""

    name: str
    index: int
    size: Optional[int]


@dataclass(frozen=True)
class Site:
    """A site of the model (see the module docstring)."""

    address: str
    kind: str
    parents: frozenset = EMPTY
    data: frozenset = EMPTY
    span: Optional[Span] = field(default=None, compare=False)
    loops: tuple = ()
    static: bool = True
    distribution: Optional[str] = None
    from_traces: bool = False
    name: str = ""
    shape: Optional[tuple] = field(default=None, compare=False)  # one draw's / observation's shape
    spans: tuple = field(default=(), compare=False)  # every statement with this address
                                                     # (two branches of an unknown `if` may share one)


@dataclass
class Dependencies:
    """The result of ``analyse``: the sites in execution order and their parents."""

    sites: tuple
    values: tuple = ()
    data_names: tuple = ()
    from_traces: bool = False
    reason: Optional[str] = None
    _by_address: dict = field(default_factory=dict, repr=False)
    #: address -> ``Recipe`` of each site (and "return") whose statement can be evaluated
    #: on its own from its parents' values (``Recipe``); sites without one are absent
    recipes: dict = field(default_factory=dict, repr=False, compare=False)
    #: a call was numbered (``f#1``) on some paths only: a later call of the same function
    #: may have another address on another path than the one given here
    numbered_on_some_paths: bool = False

    def __post_init__(self):
        self._by_address = {s.address: s for s in (*self.sites, *self.values)}

    def site(self, address: str) -> Site:
        return self._by_address[address]

    def parents(self, address: str) -> frozenset:
        """The choice addresses the site at ``address`` depends on."""
        return self._by_address[address].parents

    @property
    def choices(self) -> tuple:
        return tuple(s.address for s in self.sites if s.kind == "choice")

    @property
    def addresses(self) -> tuple:
        return tuple(s.address for s in self.sites)

    @property
    def is_static(self) -> bool:
        """Every site exists on every path, and the structure came from the analysis."""
        return not self.from_traces and all(s.static for s in self.sites)

    def __contains__(self, address: str) -> bool:
        return address in self._by_address


# ------------------------------------------------------------------------ abstract values
class _Unknown:
    def __repr__(self):
        return "<unknown>"


UNKNOWN = _Unknown()


@dataclass(frozen=True)
class AV:
    """An abstract value: a concrete runtime value (``value``), or ``UNKNOWN`` with the
    choices it depends on; or a list/tuple of known length whose elements are abstract
    values (``items``). ``data``: the data names it was computed from; ``dist``: the
    distribution's name when the value is a distribution."""

    value: Any = UNKNOWN
    deps: frozenset = EMPTY
    data: frozenset = EMPTY
    items: Optional[tuple] = None
    is_tuple: bool = False
    dist: Optional[str] = None
    #: the address of the choice whose value this is, exactly (a variable bound by
    #: ``x ~ d`` and not rebound since); None for any value computed from it
    choice: Optional[str] = None

    @property
    def known(self) -> bool:
        if self.items is not None:
            return all(x.known for x in self.items)
        return self.value is not UNKNOWN

    def concrete(self) -> Any:
        """The runtime value (only when ``known``)."""
        if self.items is not None:
            vals = [x.concrete() for x in self.items]
            return tuple(vals) if self.is_tuple else vals
        return self.value

    def all_deps(self) -> frozenset:
        if self.items is None:
            return self.deps
        return self.deps.union(*(x.all_deps() for x in self.items))

    def all_data(self) -> frozenset:
        if self.items is None:
            return self.data
        return self.data.union(*(x.all_data() for x in self.items))

    def with_deps(self, deps: frozenset, data: frozenset = EMPTY) -> "AV":
        if not deps and not data:
            return self
        if deps and self.items is None and self.value is not UNKNOWN:
            if isinstance(self.value, (list, tuple)):  # keep its elements apart
                items = tuple(AV(x, EMPTY, self.data) for x in self.value)
                return AV(UNKNOWN, deps, self.data | data, items=items, is_tuple=isinstance(self.value, tuple))
            return AV(UNKNOWN, self.deps | deps, self.data | data, dist=self.dist)
        # (a control dependency added: the value may be undefined on some paths, so it is
        # no longer known to be exactly its choice's value)
        return replace(self, deps=self.deps | deps, data=self.data | data, choice=None if deps else self.choice)


def _unknown(*parts: AV, extra: frozenset = EMPTY, dist: Optional[str] = None) -> AV:
    deps = extra.union(*(p.all_deps() for p in parts)) if parts else extra
    data = EMPTY.union(*(p.all_data() for p in parts)) if parts else EMPTY
    return AV(UNKNOWN, deps, data, dist=dist)


def _known(value: Any, *parts: AV) -> AV:
    data = EMPTY.union(*(p.all_data() for p in parts)) if parts else EMPTY
    dist = getattr(getattr(value, "spec", None), "name", None)
    return AV(value, EMPTY, data, dist=dist)


class _Undecidable(Exception):
    """The structure depends on random values here: fall back to executed traces."""

    def __init__(self, why: str, span: Optional[Span] = None):
        super().__init__(why)
        self.why = why
        self.span = span


@dataclass(frozen=True)
class Recipe:
    """How to evaluate one site's statement on its own, given its parents' values: its
    expressions (a choice's distribution; an observe's value and distribution; a factor's
    or condition's expression; the entry's return value) and the local variables they read,
    each either the value of a choice (``("choice", address)``) or a data-only value the
    same on every path (``("value", v)``: a bool, int, str or None). Names not in ``env``
    are the interpreter's globals (builtins, top-level functions). Recorded only for pure
    expressions (``Interpreter.pure``: no call into model code) without a lambda, reading
    only such variables."""

    kind: str   # "choice", "observe", "factor", "condition" or "return"
    exprs: tuple
    env: tuple  # ((name, "choice" | "value", address | value), ...)


#: the types of data-only values a recipe may hold: the same under the analysis' sampling
#: interpreter and under exact enumeration (a float literal is a Fraction there)
_RECIPE_VALUE_TYPES = (bool, int, str, type(None))


@dataclass
class _AClosure:
    name: str
    params: tuple
    body: Any
    env: "_AFrame"
    span: Any


@dataclass
class _AMem:
    fn: Any
    name: str
    table: dict = field(default_factory=dict)


class _AFrame:
    """An abstract frame: local abstract values, the interpreter's address state
    (counters, loop indices, call path) and the control context (``pc``: the choices the
    current statement's execution depends on; ``conditional``: not on every path)."""

    def __init__(self, parent, path="", depth=0, pc=EMPTY, conditional=False, label=None):
        self.vars: dict = {}
        self.parent = parent
        self.path = path
        self.depth = depth
        self.counters: dict = {}
        self.loops: list = []
        self.plates: list = []
        self.pc = pc
        self.conditional = conditional
        self.returns: list = []
        self.return_pc = EMPTY  # the choices on which a return taken so far depended
        self.return_musts: list = []  # the memoised calls made on every path to each return
        self.label = label  # a memoised call's fixed address (interpreter's _Renamed)

    address = Frame.address

    def lookup(self, name: str):
        f = self
        while f is not None:
            if name in f.vars:
                return f.vars[name]
            f = f.parent
        raise KeyError(name)


# --------------------------------------------------------------------------- the analysis
class _Analysis:
    def __init__(self, interp: Interpreter, data_names: Iterable[str]):
        self.interp = interp
        self.ctx = Particles.all(1)
        self.data_names = tuple(data_names)
        self.sites: dict = {}
        self.values: dict = {}
        self.globals = _AFrame(None)
        for name, v in interp.globals.vars.items():
            if isinstance(v, Closure):
                self.globals.vars[name] = AV(_AClosure(v.name, v.params, v.body, self.globals, v.span))
            else:
                self.globals.vars[name] = AV(v)
        self.stack: list = []  # the bodies of the closures being called
        # memoised calls made on every path reaching the current point (a forward "must"
        # analysis: an unknown `if` keeps what both branches call); at the end a memoised
        # call's sites are static where the call is made on every path, wherever it was first
        self.must: set = set()
        self.memo_sites: dict = {}    # memo key -> addresses recorded during its first call
        self.memo_implies: dict = {}  # memo key -> memo keys its body calls on every path
        self.recipes: dict = {}       # address -> Recipe (``recipe``); None: none for that address
        self.entry_frame: Optional[_AFrame] = None
        self.entry_returns: list = []  # the entry's return statements' recipes (None: none)
        # a call numbered (``#k``) on some paths only: later calls of the same function may
        # be numbered differently on different paths, so no address is certain to be the
        # run's, and recipes (which no run checks) are not given
        self.numbered_on_some_paths = False

    # ---------------------------------------------------------------------------- entry
    def run(self, entry: str, data: Mapping[str, Any]) -> None:
        f = self.globals.vars[entry].value
        fr = _AFrame(self.globals, "", 1)
        args = {k: AV(v, EMPTY, frozenset([k])) for k, v in data.items()}
        out = self.call_closure(f, [], args, f.span, fr, top=True)
        self.demote_conditional_memo_sites()
        if len(self.entry_returns) == 1 and self.entry_returns[0] is not None:
            self.recipes["return"] = self.entry_returns[0]
        self.values["return"] = Site("return", "return", out.all_deps(), out.all_data(), f.span,
                                     (), True, out.dist, False, "return")

    def demote_conditional_memo_sites(self) -> None:
        """A memoised call's sites were recorded as if the call were made on every path
        (``call_mem``); where it is not (no call on some path: ``self.must`` at the end
        lacks it), they exist on some paths only."""
        for key, (sites, values) in self.memo_sites.items():
            if key in self.must:
                continue
            for addr in sites:
                self.sites[addr] = replace(self.sites[addr], static=False)
            for addr in values:
                self.values[addr] = replace(self.values[addr], static=False)

    # ------------------------------------------------------------------------- recording
    def record(self, fr: _AFrame, kind: str, addr: str, parents: frozenset, data: frozenset, span,
               dist: Optional[str], name: str) -> None:
        site = Site(addr, kind, parents, data, span, tuple(fr.plates), not fr.conditional, dist, False, name,
                    spans=(span,))
        old = self.sites.get(addr)
        if old is not None:  # the same address on two branches of an unknown `if`
            site = replace(old, parents=old.parents | parents, data=old.data | data, static=False,
                           distribution=old.distribution if old.distribution == dist else None,
                           spans=old.spans + tuple(x for x in (span,) if x not in old.spans))
        self.sites[addr] = site

    def record_value(self, fr: _AFrame, name: str, v: AV, span) -> None:
        """A named deterministic value that depends on choices (kept for the graph)."""
        deps = v.all_deps()
        if not deps:
            return
        idx = "".join(f"[{i}]" for i in fr.loops)
        addr = "value:" + fr.path + name + idx  # (never a site's address)
        old = self.values.get(addr)
        if old is not None:
            deps = deps | old.parents
        self.values[addr] = Site(addr, "deterministic", deps, v.all_data(), span, tuple(fr.plates),
                                 not fr.conditional, None, False, name)

    def record_recipe(self, addr: str, kind: str, exprs: tuple, fr: _AFrame) -> None:
        """Keep the ``Recipe`` of the site at ``addr`` (None where it has none, or where
        the address is met twice: two branches of an unknown ``if``)."""
        self.recipes[addr] = None if addr in self.recipes else self.recipe(kind, exprs, fr)

    def recipe(self, kind: str, exprs: tuple, fr: _AFrame) -> Optional[Recipe]:
        """The ``Recipe`` of ``exprs`` evaluated in ``fr``, or None: an expression with a
        lambda, or reading a local variable that is neither exactly a choice's value nor a
        data-only bool/int/str/None."""
        env = {}
        for e in exprs:
            if not self.interp.pure(e):  # (it calls model code)
                return None
            for node in ir.walk(e):
                if isinstance(node, ir.Lambda):
                    return None
                if isinstance(node, ir.Var) and node.name not in env:
                    where = self.binding(node.name, fr)
                    if where is None:
                        return None
                    if where is not self.globals:
                        v = where.vars[node.name]
                        if v.choice is not None and v.value is UNKNOWN and v.items is None:
                            env[node.name] = ("choice", v.choice)
                        elif v.items is None and type(v.value) in _RECIPE_VALUE_TYPES:
                            env[node.name] = ("value", v.value)
                        else:
                            return None
        return Recipe(kind, tuple(exprs), tuple((name, how, x) for name, (how, x) in env.items()))

    @staticmethod
    def binding(name: str, fr: _AFrame) -> Optional[_AFrame]:
        """The frame whose variable ``name`` is (None when undefined)."""
        f = fr
        while f is not None:
            if name in f.vars:
                return f
            f = f.parent
        return None

    # ------------------------------------------------------------------------ statements
    def exec_block(self, stmts, fr: _AFrame) -> bool:
        """Run statements; True when the block certainly returned."""
        for s in stmts:
            try:
                if self.exec_stmt(s, fr):
                    return True
            except PPLError as err:
                raise err.with_span(s.span)
            except (TypeError, ValueError, RuntimeError, IndexError, ZeroDivisionError, OverflowError) as err:
                # as the interpreter: a user value the operation cannot use, never a raw Python error
                msg = str(err).splitlines()[0] if str(err) else ""
                raise PPLRuntimeError(f"{type(err).__name__}: {msg}", s.span) from err
        return False

    def exec_stmt(self, s, fr: _AFrame) -> bool:
        t = type(s)
        if t is ir.Assign:
            v = self.eval(s.value, fr).with_deps(fr.pc)
            self.bind(fr, s.target, v, s.span)
        elif t is ir.Sample:
            d = self.eval(s.dist, fr)
            addr = fr.address(s.target)
            self.record(fr, "choice", addr, d.all_deps() | fr.pc, d.all_data(), s.span, d.dist, s.target)
            self.record_recipe(addr, "choice", (s.dist,), fr)
            fr.vars[s.target] = AV(UNKNOWN, frozenset([addr]), choice=addr)
        elif t is ir.Observe:
            v, d = self.eval(s.value, fr), self.eval(s.dist, fr)
            addr = fr.address(f"obs@{s.span.line}:{s.span.col}")
            self.record(fr, "observe", addr, v.all_deps() | d.all_deps() | fr.pc, v.all_data() | d.all_data(),
                        s.span, d.dist, "obs")
            self.record_recipe(addr, "observe", (s.value, s.dist), fr)
        elif t is ir.Factor or t is ir.Condition:
            v = self.eval(s.expr, fr)
            kind = "factor" if t is ir.Factor else "condition"
            addr = fr.address(f"{_LIKELIHOOD_PREFIX[kind]}@{s.span.line}:{s.span.col}")
            self.record(fr, kind, addr, v.all_deps() | fr.pc, v.all_data(), s.span, None,
                        _LIKELIHOOD_PREFIX[kind])
            self.record_recipe(addr, kind, (s.expr,), fr)
        elif t is ir.If:
            return self.exec_if(s, fr)
        elif t is ir.For:
            return self.exec_for(s, fr)
        elif t is ir.While:
            return self.exec_while(s, fr)
        elif t is ir.Return:
            v = self.eval(s.value, fr) if s.value is not None else AV(None)
            if fr is self.entry_frame:
                self.entry_returns.append(None if fr.pc else
                                          self.recipe("return", (s.value,) if s.value is not None else (), fr))
            fr.returns.append(v.with_deps(fr.pc))
            fr.return_pc |= fr.pc
            fr.return_musts.append(set(self.must))
            return True
        elif t is ir.ExprStmt:
            self.eval(s.expr, fr)
        elif t is ir.FunctionDef:
            fr.vars[s.name] = AV(_AClosure(s.name, s.params, s.body, fr, s.span))
        return False

    def exec_if(self, s: ir.If, fr: _AFrame) -> bool:
        c = self.eval(s.cond, fr)
        if c.known:
            return self.exec_block(s.then if self.truth(c, s.cond) else s.orelse, fr)
        cdeps = c.all_deps()
        saved_vars, saved_counters, saved_pc, saved_cond = fr.vars, fr.counters, fr.pc, fr.conditional
        n_returns = len(fr.returns)
        must_before = self.must
        fr.pc, fr.conditional = saved_pc | cdeps, True
        fr.vars, fr.counters = dict(saved_vars), dict(saved_counters)
        self.must = set(must_before)
        ret_t = self.on_some_paths(lambda: self.exec_block(s.then, fr))
        vars_t, counters_t, must_t = fr.vars, fr.counters, self.must
        fr.vars, fr.counters = dict(saved_vars), dict(saved_counters)
        self.must = set(must_before)
        ret_f = self.on_some_paths(lambda: self.exec_block(s.orelse, fr))
        vars_f, must_f = fr.vars, self.must
        # the paths that go on past the `if`: those of the branches that did not return
        self.must = must_f if ret_t and not ret_f else must_t if ret_f and not ret_t else must_t & must_f
        for k, n in counters_t.items():  # addresses stay unique on both paths (as the interpreter)
            fr.counters[k] = max(n, fr.counters.get(k, 0))
        fr.vars = self.join_vars(saved_vars, vars_t, vars_f, cdeps, ret_t, ret_f)
        fr.pc, fr.conditional = saved_pc, saved_cond
        if ret_t and ret_f:
            return True
        if len(fr.returns) > n_returns:
            # some paths returned: what follows runs only on the others
            fr.pc, fr.conditional = fr.pc | cdeps | fr.return_pc, True
        return False

    @staticmethod
    def join_vars(before, a, b, cdeps, ret_a, ret_b) -> dict:
        """Variables after an `if` on an unknown condition: where the branches differ,
        unknown, depending on both and on the condition. A branch that returned leaves
        its variables behind it."""
        if ret_a and not ret_b:
            a = before
        if ret_b and not ret_a:
            b = before
        out = dict(before)
        for name in set(a) | set(b):
            va, vb = a.get(name), b.get(name)
            if va is vb and va is not None:
                out[name] = va
            elif va is None or vb is None:
                out[name] = (va or vb).with_deps(cdeps)  # defined on one path only
            else:
                out[name] = _unknown(va, vb, extra=cdeps)
        return out

    def exec_for(self, s: ir.For, fr: _AFrame) -> bool:
        it = self.eval(s.iterable, fr)
        items = self.items_of(it, s.iterable.span, "the length of this loop's iterable")
        self.interp.check_iterations(len(items), s.span, "loop")
        name = s.target if isinstance(s.target, str) else ",".join(s.target)
        for i, item in enumerate(items):
            self.bind(fr, s.target, item, s.span)
            fr.loops.append(i)
            fr.plates.append(Plate(name, i, len(items)))
            try:
                if self.exec_block(s.body, fr):
                    return True
            finally:
                fr.loops.pop()
                fr.plates.pop()
        return False

    def exec_while(self, s: ir.While, fr: _AFrame) -> bool:
        k = 0
        while True:
            c = self.eval(s.cond, fr)
            if not c.known:
                raise _Undecidable("a while loop's condition depends on random choices", s.cond.span)
            if not self.truth(c, s.cond):
                return False
            if k >= self.interp.max_iterations:
                raise PPLRuntimeError(f"loop ran more than {self.interp.max_iterations} iterations", s.span)
            fr.loops.append(k)
            fr.plates.append(Plate("while", k, None))
            try:
                if self.exec_block(s.body, fr):
                    return True
            finally:
                fr.loops.pop()
                fr.plates.pop()
            k += 1

    def bind(self, fr: _AFrame, target, v: AV, span) -> None:
        if isinstance(target, str):
            if isinstance(v.value, (_AClosure, _AMem)) and v.value.name == "lambda":
                v.value.name = target  # as the interpreter: `f = lambda ...` is addressed f/...
            fr.vars[target] = v
            self.record_value(fr, target, v, span)
            return
        if v.items is not None and len(v.items) == len(target):
            parts = list(v.items)
        elif v.known:
            parts = [AV(x, EMPTY, v.all_data()) for x in self.interp.unpack(v.concrete(), len(target), self.ctx)]
        else:
            parts = [_unknown(v)] * len(target)
        for name, part in zip(target, parts):
            fr.vars[name] = part
            self.record_value(fr, name, part, span)

    def truth(self, c: AV, e: ir.Expr) -> bool:
        try:
            return truthy(c.concrete())
        except PPLError as err:
            raise err.with_span(e.span)

    def items_of(self, it: AV, span, what: str) -> list:
        """The elements of an iterable whose length is known."""
        if it.items is not None:
            return [x.with_deps(it.deps, it.data) for x in it.items]
        if not it.known:
            raise _Undecidable(f"{what} depends on random choices", span)
        items = self.interp.iter_items(it.value, self.ctx, span)
        if items is None:
            raise _Undecidable(f"{what} differs between particles", span)
        return [AV(x, EMPTY, it.data) for x in items]

    # ----------------------------------------------------------------------- expressions
    def eval(self, e: ir.Expr, fr: _AFrame) -> AV:
        t = type(e)
        if t is ir.Const:
            return AV(e.value)
        if t is ir.Var:
            try:
                return fr.lookup(e.name)
            except KeyError:
                raise PPLRuntimeError(f"name '{e.name}' is not defined", e.span) from None
        if t is ir.BinOp:
            return self.eval_binop(e, self.eval(e.left, fr), self.eval(e.right, fr))
        if t is ir.UnaryOp:
            a = self.eval(e.operand, fr)
            if a.known:
                return _known(self.guard(unop, e.span, e.op, a.concrete(), self.ctx), a)
            return _unknown(a)
        if t is ir.BoolOp:
            return self.eval_boolop(e, fr)
        if t is ir.IfExp:
            return self.eval_ifexp(e, fr)
        if t is ir.Call:
            return self.eval_call(e, fr)
        if t is ir.Lambda:
            return AV(_AClosure("lambda", tuple(ir.Param(p) for p in e.params), e.body, fr, e.span))
        if t is ir.ListExpr or t is ir.TupleExpr:
            items = tuple(self.eval(x, fr) for x in e.items)
            if all(x.known for x in items):
                vals = [x.concrete() for x in items]
                return _known(tuple(vals) if t is ir.TupleExpr else vals, *items)
            return AV(UNKNOWN, items=items, is_tuple=t is ir.TupleExpr)
        if t is ir.Index:
            return self.eval_index(e, fr)
        if t is ir.Attr:
            v = self.eval(e.value, fr)
            if v.known:
                return _known(self.interp._attr(v.concrete(), e), v)
            return _unknown(v)
        raise PPLRuntimeError(f"cannot evaluate {t.__name__}", e.span)

    @staticmethod
    def guard(fn, span, *args):
        try:
            return fn(*args)
        except PPLError as err:
            raise err.with_span(span)

    def eval_binop(self, e: ir.BinOp, a: AV, b: AV) -> AV:
        if a.known and b.known:
            return _known(self.guard(binop, e.span, e.op, a.concrete(), b.concrete(), self.ctx, False), a, b)
        if e.op == "+" and a.items is not None and b.items is not None and not a.is_tuple and not b.is_tuple:
            return AV(UNKNOWN, a.deps | b.deps, a.data | b.data, items=a.items + b.items)
        if e.op == "+" and (a.items is not None or b.items is not None):
            la, lb = self.as_items(a), self.as_items(b)
            if la is not None and lb is not None:
                return AV(UNKNOWN, items=tuple(la) + tuple(lb))
        return _unknown(a, b)

    @staticmethod
    def as_items(v: AV):
        if v.items is not None:
            return v.items
        if v.known and isinstance(v.value, list):
            return [AV(x, EMPTY, v.data) for x in v.value]
        return None

    def eval_boolop(self, e: ir.BoolOp, fr: _AFrame) -> AV:
        left = self.eval(e.left, fr)
        if left.known:
            decided = self.truth(left, e.left) == (e.op == "or")
            return left if decided else self.eval(e.right, fr)
        must_before = self.must
        self.must = set(must_before)
        right = self.conditionally(fr, left.all_deps(), lambda: self.eval(e.right, fr))
        self.must = must_before  # the right operand runs on some paths only
        return _unknown(left, right)

    def eval_ifexp(self, e: ir.IfExp, fr: _AFrame) -> AV:
        c = self.eval(e.cond, fr)
        if c.known:
            return self.eval(e.then if self.truth(c, e.cond) else e.orelse, fr)
        cdeps = c.all_deps()
        must_before = self.must
        self.must = set(must_before)
        a = self.conditionally(fr, cdeps, lambda: self.eval(e.then, fr))
        must_a, self.must = self.must, set(must_before)
        b = self.conditionally(fr, cdeps, lambda: self.eval(e.orelse, fr))
        self.must = must_a & self.must  # the calls both branches make
        return _unknown(c, a, b, dist=a.dist if a.dist == b.dist else None)

    @classmethod
    def conditionally(cls, fr: _AFrame, cdeps: frozenset, run):
        saved = fr.pc, fr.conditional
        fr.pc, fr.conditional = fr.pc | cdeps, True
        try:
            return cls.on_some_paths(run)
        finally:
            fr.pc, fr.conditional = saved

    @staticmethod
    def on_some_paths(run):
        """Run code that executes on some paths only: an error there may be on a path the
        model never takes (the traces decide; a real error is raised by them)."""
        try:
            return run()
        except PPLError as err:
            raise _Undecidable(f"code under a branch on a random value fails in the analysis ({err.message})",
                               err.span) from None

    def eval_index(self, e: ir.Index, fr: _AFrame) -> AV:
        v = self.eval(e.value, fr)
        if isinstance(e.index, ir.Slice):
            lo = self.eval(e.index.lo, fr) if e.index.lo is not None else AV(None)
            hi = self.eval(e.index.hi, fr) if e.index.hi is not None else AV(None)
            if v.known and lo.known and hi.known:
                from .interpreter import _SliceValue
                return _known(self.interp._index(v.concrete(), _SliceValue(lo.concrete(), hi.concrete()),
                                                 self.ctx, e.span), v, lo, hi)
            if v.items is not None and lo.known and hi.known:
                sl = slice(*(None if x.concrete() is None else int(x.concrete()) for x in (lo, hi)))
                return AV(UNKNOWN, v.deps, v.data | lo.data | hi.data, items=v.items[sl], is_tuple=v.is_tuple)
            return _unknown(v, lo, hi)
        i = self.eval(e.index, fr)
        if v.known and i.known:
            return _known(self.interp._index(v.concrete(), i.concrete(), self.ctx, e.span), v, i)
        if v.items is not None and i.known:
            k = self.guard(self.interp._index, e.span, list(range(len(v.items))), i.concrete(), self.ctx, e.span)
            if isinstance(k, int):
                return v.items[k].with_deps(v.deps, v.data | i.data)
        return _unknown(v, i)

    # ----------------------------------------------------------------------------- calls
    def eval_call(self, e: ir.Call, fr: _AFrame) -> AV:
        f = self.eval(e.func, fr)
        args = [self.eval(a, fr) for a in e.args]
        kwargs = {k.name: self.eval(k.value, fr) for k in e.kwargs}
        if not f.known:
            raise _Undecidable("the function called depends on random choices", e.span)
        try:
            return self.call(f.value, args, kwargs, e.span, fr).with_deps(f.deps)
        except PPLError as err:
            raise err.with_span(e.span)

    def call(self, f, args, kwargs, span, fr: _AFrame) -> AV:
        if isinstance(f, _AClosure):
            return self.call_closure(f, args, kwargs, span, fr)
        if isinstance(f, _AMem):
            return self.call_mem(f, args, span, fr)
        if isinstance(f, Builtin):
            special = _SPECIAL.get(f.name) if f is self.interp.globals.vars.get(f.name) else None
            if special is not None:
                return special(self, fr, span, args, kwargs)
            if f.higher_order:
                raise _Undecidable(f"{f.name}() is not analysed", span)
            if all(a.known for a in args) and all(v.known for v in kwargs.values()):
                out = self.interp._call_builtin(f, [a.concrete() for a in args],
                                                {k: v.concrete() for k, v in kwargs.items()}, self.ctx, span)
                return _known(out, *args, *kwargs.values())
            return _unknown(*args, *kwargs.values(), dist=f.name if _is_distribution(f.name) else None)
        raise PPLRuntimeError(f"{type(f).__name__} is not callable", span)

    def call_closure(self, f: _AClosure, args, kwargs, span, caller: _AFrame, top=False) -> AV:
        depth = caller.depth + 1
        if depth > self.interp.max_depth:
            if caller.pc:
                raise _Undecidable(f"recursion of '{f.name}' depends on random choices", span)
            raise PPLRuntimeError(f"recursion deeper than {self.interp.max_depth} calls (in '{f.name}')", span)
        if id(f.body) in self.stack and caller.pc:
            raise _Undecidable(f"recursion of '{f.name}' depends on random choices", span)
        if caller.label is not None:
            path = caller.label + "/"
        else:
            path = "" if top else caller.address(f.name) + "/"
            self.numbered_on_some_paths = self.numbered_on_some_paths or (caller.conditional and not top)
        fr = _AFrame(f.env, path, depth, caller.pc, caller.conditional)
        fr.plates = list(caller.plates)
        if top:
            self.entry_frame = fr
        params = f.params
        if len(args) > len(params):
            raise PPLRuntimeError(f"{f.name}() takes {len(params)} arguments but {len(args)} were given", span)
        for p, a in zip(params, args):
            fr.vars[p.name] = a
        for k, v in kwargs.items():
            if k not in {p.name for p in params}:
                raise PPLRuntimeError(f"{f.name}() got an unexpected argument '{k}'", span)
            fr.vars[k] = v
        for p in params[len(args):]:
            if p.name not in fr.vars:
                if p.default is None:
                    raise PPLRuntimeError(f"{f.name}() is missing the argument '{p.name}'", span)
                fr.vars[p.name] = self.eval(p.default, f.env)
        self.stack.append(id(f.body))
        try:
            if isinstance(f.body, ir.Expr):
                return self.eval(f.body, fr)
            returned = self.exec_block(f.body, fr)
        finally:
            self.stack.pop()
        outs = list(fr.returns)
        if not returned:
            outs.append(AV(None).with_deps(fr.pc))
        if fr.return_musts:  # the paths out of the call: each return, and the end of the body
            self.must = set.intersection(*fr.return_musts, *(() if returned else (self.must,)))
        if len(outs) == 1:
            return outs[0]
        return _unknown(*outs, dist=outs[0].dist if len({o.dist for o in outs}) == 1 else None)

    def call_mem(self, m: _AMem, args, span, fr: _AFrame) -> AV:
        if not all(a.known for a in args):
            raise _Undecidable(f"a memoised call of '{m.name}' has an argument that depends on random choices",
                               span)
        vals = [a.concrete() for a in args]
        from .interpreter import _hashable
        key = _hashable(tuple(vals))
        memo = (id(m), key)
        if key not in m.table:
            label = f"{m.name}({', '.join(_label(a) for a in vals)})"
            # a memoised value is a function of its arguments alone, whichever path first
            # computes it: its sites do not depend on the caller's control context, and
            # they exist on every path where the call is made on every path (decided at
            # the end: ``demote_conditional_memo_sites``)
            renamed = _AFrame(None, fr.path, fr.depth, EMPTY, False, label=label)
            renamed.plates = fr.plates
            sites_before, values_before, must_before = set(self.sites), set(self.values), self.must
            self.must = set()
            try:
                m.table[key] = self.call(m.fn, args, {}, span, renamed)
                self.memo_implies[memo] = self.must
            finally:
                self.must = must_before
            self.memo_sites[memo] = ([a for a in self.sites if a not in sites_before],
                                     [a for a in self.values if a not in values_before])
        self.must |= {memo} | self.memo_implies.get(memo, set())
        return m.table[key]


# ---------------------------------------------------------------- builtins analysed here
def _is_distribution(name: str) -> bool:
    from ..stdlib.distributions import DISTRIBUTIONS
    return name in DISTRIBUTIONS


def _b_len(an: _Analysis, fr, span, args, kwargs) -> AV:
    if len(args) == 1 and args[0].items is not None:
        return AV(len(args[0].items), EMPTY, args[0].data)
    return _generic(an, "len", fr, span, args, kwargs)


def _b_append(an: _Analysis, fr, span, args, kwargs) -> AV:
    if len(args) == 2 and not (args[0].known and args[1].known):
        items = an.as_items(args[0])
        if items is not None:
            return AV(UNKNOWN, args[0].deps, args[0].data, items=tuple(items) + (args[1],))
    return _generic(an, "append", fr, span, args, kwargs)


def _b_range(an: _Analysis, fr, span, args, kwargs) -> AV:
    if not all(a.known for a in args):
        raise _Undecidable("a range's bounds depend on random choices", span)
    return _generic(an, "range", fr, span, args, kwargs)


def _generic(an: _Analysis, name, fr, span, args, kwargs) -> AV:
    f = an.interp.globals.vars[name]
    if all(a.known for a in args) and all(v.known for v in kwargs.values()):
        out = an.interp._call_builtin(f, [a.concrete() for a in args], {k: v.concrete() for k, v in kwargs.items()},
                                      an.ctx, span)
        return _known(out, *args, *kwargs.values())
    return _unknown(*args, *kwargs.values())


def _b_mem(an: _Analysis, fr, span, args, kwargs) -> AV:
    f = args[0].value if args and args[0].known else None
    if not isinstance(f, (_AClosure, Builtin)):
        raise PPLRuntimeError("mem() expects a function", span)
    return AV(_AMem(f, f.name))


def _b_sample(an: _Analysis, fr, span, args, kwargs) -> AV:
    d = args[0] if args else kwargs.get("d", AV(None))
    name = args[1] if len(args) > 1 else kwargs.get("name", AV("sample"))
    if not name.known or not isinstance(name.concrete(), str):
        raise PPLRuntimeError("sample(): the name must be a string", span)
    addr = _frame_address(fr, name.concrete())
    an.record(fr, "choice", addr, d.all_deps() | fr.pc, d.all_data(), span, d.dist, name.concrete())
    return AV(UNKNOWN, frozenset([addr]))


def _b_twist(an: _Analysis, fr, span, args, kwargs) -> AV:
    _frame_address(fr, "twist")  # consumes a counter, as the interpreter's TwistEffect does
    return AV(None)


def _frame_address(fr: _AFrame, name: str) -> str:
    return fr.label if fr.label is not None else fr.address(name)


def _loop_calls(an: _Analysis, fr: _AFrame, span, what: str, lists: list, each) -> list:
    items = [an.items_of(x, span, f"the length of {what}()'s list") for x in lists]
    n = min(len(x) for x in items)
    an.interp.check_iterations(n, span, what)
    out = []
    for i in range(n):
        fr.loops.append(i)
        fr.plates.append(Plate(what, i, n))
        try:
            out.append(each(i, [x[i] for x in items]))
        finally:
            fr.loops.pop()
            fr.plates.pop()
    return out


def _b_map(an: _Analysis, fr, span, args, kwargs) -> AV:
    f, lists = args[0], args[1:]
    if not f.known:
        raise _Undecidable("the function mapped depends on random choices", span)
    out = _loop_calls(an, fr, span, "map", lists, lambda i, xs: an.call(f.value, xs, {}, span, fr))
    if all(x.known for x in out):
        return _known([x.concrete() for x in out], *out)
    return AV(UNKNOWN, items=tuple(out))


def _b_fold(an: _Analysis, fr, span, args, kwargs) -> AV:
    f, acc, xs = args
    if not f.known:
        raise _Undecidable("the function folded depends on random choices", span)
    box = [acc]

    def step(i, x):
        box[0] = an.call(f.value, [box[0], x[0]], {}, span, fr)
        return box[0]
    _loop_calls(an, fr, span, "fold", [xs], step)
    return box[0]


def _b_filter(an: _Analysis, fr, span, args, kwargs) -> AV:
    pred, xs = args
    if not pred.known:
        raise _Undecidable("the predicate depends on random choices", span)
    elems = an.items_of(xs, span, "the length of filter()'s list")
    keep = _loop_calls(an, fr, span, "filter", [xs], lambda i, x: an.call(pred.value, x, {}, span, fr))
    if all(k.known for k in keep):
        chosen = [x for x, k in zip(elems, keep) if truthy(k.concrete())]
        if all(x.known for x in chosen):
            return _known([x.concrete() for x in chosen], *chosen, *keep)
        return AV(UNKNOWN, items=tuple(chosen))
    return _unknown(*elems, *keep)  # a list whose length depends on random choices


_SPECIAL = {"len": _b_len, "append": _b_append, "range": _b_range, "mem": _b_mem, "sample": _b_sample,
            "twist": _b_twist, "map": _b_map, "fold": _b_fold, "filter": _b_filter}


# -------------------------------------------------------------------------- trace fallback
class _Recorder:
    """A handler that draws from the prior and records, per site, the choices executed
    before it on the paths of the particles that reached it."""

    def __init__(self, inner, n: int):
        self.inner = inner
        self.n = n
        self.order: dict = {}  # address -> [kind, parents set, span, dist name, particles reached]
        self.choice_cols: list = []
        self.seen = torch.zeros(n, 0, dtype=torch.bool)

    def _note(self, kind, eff, dist=None):
        idx = eff.ctx.idx.cpu()
        cols = self.seen[idx].any(0).nonzero().flatten().tolist() if self.seen.shape[1] else []
        parents = {self.choice_cols[c] for c in cols}
        entry = self.order.setdefault(eff.addr, [kind, set(), eff.span, dist, 0])
        entry[1] |= parents
        entry[4] = max(entry[4], len(idx))
        if kind == "choice":
            if eff.addr not in self.choice_cols:
                self.choice_cols.append(eff.addr)
                self.seen = torch.cat([self.seen, torch.zeros(self.n, 1, dtype=torch.bool)], 1)
            self.seen[idx, self.choice_cols.index(eff.addr)] = True

    def sample(self, eff):
        self._note("choice", eff, getattr(getattr(eff.dist, "spec", None), "name", None))
        return self.inner.sample(eff)

    def observe(self, eff):
        self._note("observe", eff, getattr(getattr(eff.dist, "spec", None), "name", None))
        return self.inner.observe(eff)

    def factor(self, eff):
        self._note("factor", eff)
        return self.inner.factor(eff)

    def condition(self, eff):
        self._note("condition", eff)
        return self.inner.condition(eff)

    def twist(self, eff):
        return getattr(self.inner, "twist", lambda e: None)(eff)


def _from_traces(interp: Interpreter, entry: str, data: Mapping[str, Any], why: str,
                 particles: int = TRACE_PARTICLES, seed: int = 0) -> Dependencies:
    from ..stdlib import rng
    from .sampling import LikelihoodWeighting, drive
    from .values import lineage_scope, Lineage
    rec = _Recorder(LikelihoodWeighting(particles, "cpu"), particles)
    with rng.run(seed), lineage_scope(Lineage(torch.arange(particles))):
        drive(interp.run(entry, dict(data), Particles.all(particles)), rec)
    sites = []
    for addr, (kind, parents, span, dist, reached) in rec.order.items():
        name = addr.rsplit("/", 1)[-1].split("[", 1)[0].split("@", 1)[0].split("#", 1)[0]
        sites.append(Site(addr, kind, frozenset(parents), EMPTY, span, (), reached == particles, dist, True, name))
    return Dependencies(tuple(sites), (), tuple(data), True, why)


def _value_shape(v: Any) -> Optional[tuple]:
    """The shape one particle sees of a runtime value (None if it has none)."""
    from .values import Batched
    if isinstance(v, Batched):
        return tuple(v._t.shape[1:])
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, (int, float, bool)):
        return ()
    return None


class _Shapes:
    """A handler that draws from the prior (one particle) and notes each site's shape."""

    def __init__(self, inner):
        self.inner, self.shapes = inner, {}

    def sample(self, eff):
        v = self.inner.sample(eff)
        self.shapes[eff.addr] = _value_shape(v)
        return v

    def observe(self, eff):
        self.shapes[eff.addr] = _value_shape(eff.value)
        return self.inner.observe(eff)

    def factor(self, eff):
        return self.inner.factor(eff)

    def condition(self, eff):
        return self.inner.condition(eff)


def _with_shapes(interp: Interpreter, entry: str, data: Mapping[str, Any], sites: tuple) -> tuple:
    """The sites with the shapes of one prior run's values (vectorised choices and
    observations: ``(8,)``); a run that fails leaves them None."""
    from ..stdlib import rng
    from .sampling import LikelihoodWeighting, drive
    from .values import Lineage, lineage_scope
    h = _Shapes(LikelihoodWeighting(1, "cpu"))
    try:
        with rng.run(0), lineage_scope(Lineage(torch.arange(1))):
            drive(interp.run(entry, dict(data), Particles.all(1)), h)
    except PPLError:
        pass
    return tuple(replace(s, shape=h.shapes.get(s.address)) for s in sites)


# ------------------------------------------------------------------------------ the API
@_silent  # the analysis' own runs print nothing (stdlib.printing)
def analyse(model: Any, data: Optional[Mapping[str, Any]] = None, *, entry: Optional[str] = None,
            builtins: Optional[dict] = None, shapes: bool = True) -> Dependencies:
    """The dependency analysis of one call of the model's entry on ``data``.

    ``model``: anything with the ``semantics.model.ModelLike`` protocol (``ppl.Model``),
    whose ``bind``/``prepare_data`` turn ``data`` into the entry's arguments; or an
    ``ir.Program`` with ``entry`` (default: its last function) and ``builtins`` (default:
    the prelude), ``data`` then being runtime values already. ``shapes=False`` leaves
    every site's ``shape`` None (it costs one prior run of the model)."""
    if isinstance(model, ir.Program):
        if builtins is None:
            from ..stdlib.prelude import builtins as prelude
            builtins = prelude()
        entry = entry or model.functions[-1].name
        interp = Interpreter(model, builtins)
        args = dict(data or {})
    else:
        entry = entry or model.entry
        interp = model.interpreter()
        args = model.prepare_data(model.bind((), dict(data or {})), "cpu")
    an = _Analysis(interp, args)
    try:
        an.run(entry, args)
    except _Undecidable as why:
        where = f" (line {why.span.line})" if why.span is not None and getattr(why.span, "line", 0) else ""
        return _from_traces(interp, entry, args, why.why + where)
    sites = tuple(an.sites.values())
    if shapes:
        sites = _with_shapes(interp, entry, args, sites)
    recipes = {} if an.numbered_on_some_paths else {a: r for a, r in an.recipes.items() if r is not None}
    return Dependencies(sites, tuple(an.values.values()), tuple(args), False, None, recipes=recipes,
                        numbered_on_some_paths=an.numbered_on_some_paths)
