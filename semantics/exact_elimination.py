"""``enumerate`` by dynamic programming: a finite program's exact measure by variable
elimination instead of one re-execution per path.

Path enumeration (``semantics.exact``) costs one run per execution path: 2^k runs for a
chain of k binary choices. When the dependency analysis (``semantics.dependencies``)
decides the program's sites and the parents of each (the choices its distribution or
weight, and its existence, depend on: control dependencies included), the measure
factorises:

    w(x) = prod_choices p(x_c | x_pa(c)) * prod_likelihood-sites l_s(x_pa(s)),
    return value = r(x_pa(return)),

so it is enough to know each factor as a table over its parents' values. A site that
exists on some paths only (under a branch on a random value) has the value ABSENT where
its parents make it absent, with factor 1 there. The tables come from running the program
in exact mode with every choice FIXED (``_FixedRun``: a chooser that answers each choice
with a given value and records the choice's exact support, and records every
observe/factor/condition's weight, 0 included, without stopping the run) on a small set of
assignments that together cover every combination of every site's parents' values
(``covering_assignments``; for a chain, all-first and all-second values). The choice's own
value need not be covered: its row comes from its distribution's exact support.
``semantics.elimination`` then sums the factors out (Z and the joint of the return value's
parents, pushed through the tabulated return value), and per-site marginals come from a
bucket tree's two passes on demand. Cost: (number of covering runs) x (one run) plus tables
of the size of the parents' joint domains: linear in a chain's or tree's length.

**Invariant** (checked by ``tests/test_elimination.py`` on random finite programs against
path enumeration, and a broken variant that forgets a prior factor is caught): the measure
on return values, and Z, equal the path sum, as identical Fractions when exact.

**Where it does not apply, paths are enumerated** (``strategy`` says which was used):
the analysis could not decide the structure (a random loop bound, recursion or ``while``
on random values), a memoised choice exists on some paths only (its existence depends on
every call, not on its parents), a site's parents are unknown, a table or the joint of the
return value's parents would exceed ``max_table`` entries, a covering run fails (e.g. an
error only reachable at an impossible assignment), the runs disagree with the declared
structure (an unknown site appears, a static one vanishes, or a factor or a site's
existence changes while its parents do not), or
Z = 0 (path enumeration then gives the located error). Small programs (an upper bound of
at most ``path_threshold`` paths) keep the path form, whose per-path data some callers read.
"""
from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

from .elimination import (BucketTree, EliminationPlan, Factor, TableTooLarge, elimination_order, scaled_sum_product,
                          sum_product)
from .errors import InfiniteSupportError, PPLError, PPLRuntimeError
from .exact import _hashable, _observe_prob, exact_data
from .sampling import drive
from .dist_values import DistValue
from . import ir
from .interpreter import Frame, Interpreter
from .values import DistributionValue, Particles, to_python, to_vector, truthy

__all__ = ["Structure", "EliminationResult", "NotApplicable", "eliminate_program", "covering_assignments"]

DEFAULT_MAX_TABLE = 1 << 16


class NotApplicable(Exception):
    """Variable elimination does not apply to this program (the reason is the message)."""


@dataclass
class Structure:
    """What the elimination needs to know of a program, from the dependency analysis:

    * ``decided``: the analysis found the sites itself (not from executed traces);
    * ``sites``: every site that may exist, address -> "choice" or "likelihood", in order;
    * ``parents``: each site's parent choices (a superset of what its distribution or
      weight, and its existence, depend on), the return value's under "return";
    * ``conditional``: the sites that exist on some paths only;
    * ``spans``: where each site's statement is (a run's site at the same address but
      another place is not the site the analysis describes: the runs check it).

    Addresses are the interpreter's run-time addresses."""
    decided: bool
    sites: dict[str, str]
    parents: dict[str, tuple]
    conditional: frozenset = frozenset()
    #: address -> where its statement is (``_where``); a run's site elsewhere is another site
    spans: dict = field(default_factory=dict)
    #: the elimination order of the factors' scopes and its ``EliminationPlan`` (one per site: they follow from
    #: ``sites`` and ``parents`` alone), computed once per structure (``eliminate_program``)
    orders: dict = field(default_factory=dict, compare=False, repr=False)
    #: address (and "return") -> ``dependencies.Recipe``: how to evaluate each site on its
    #: own from its parents' values (``_direct_tables``); sites without one are absent
    recipes: dict = field(default_factory=dict, compare=False, repr=False)
    #: a call is numbered on some paths only (``Dependencies.numbered_on_some_paths``): the
    #: addresses of later calls may differ between paths, which covering runs need not meet
    numbered_on_some_paths: bool = False
    #: ``_site_plans``' answer, computed once per structure (None: not yet)
    plans: Any = field(default=None, compare=False, repr=False)
    #: whether a recipe names a function of the program (``_reads_functions``; None: not yet)
    reads_functions: Any = field(default=None, compare=False, repr=False)

    @property
    def static(self) -> bool:
        """Every site exists on every path."""
        return self.decided and not self.conditional


# ----------------------------------------------------------------------------------------
# running the program with every choice fixed
# ----------------------------------------------------------------------------------------


@dataclass
class _Site:
    addr: str
    kind: str          # "choice" or "likelihood"
    support: list | None = None   # a choice's [(hashable value, probability)]
    weight: Any = 1               # a likelihood site's weight
    span: Any = None


class _FixedRun:
    """A handler that answers each choice with ``assignment[addr]`` (its first support
    value when unassigned) and records every site: a choice's exact support, a likelihood
    site's weight (0 for a failed condition or an impossible observation: the run goes on)."""

    def __init__(self, assignment: dict, originals: dict, supports: dict):
        self.assignment, self.originals, self.supports = assignment, originals, supports
        self.sites: list[_Site] = []
        self.chosen: dict = {}  # addr -> the (hashable) value each choice was given

    def sample(self, eff):
        table = _support_table(eff.dist, self.originals, self.supports, eff.span)
        if not table:
            raise NotApplicable(f"{eff.addr}: a choice with no value of positive mass")
        self.sites.append(_Site(eff.addr, "choice", list(table.items()), span=eff.span))
        key = self.assignment.get(eff.addr, next(iter(table)))
        self.chosen[eff.addr] = key
        value = self.originals[key]
        if getattr(getattr(eff.dist, "spec", None), "value_event_dim", 0) >= 1 and isinstance(value, (list, tuple)):
            value = to_vector(value)
        return value

    def _record(self, eff, w):
        if w != w:
            raise PPLRuntimeError("a likelihood or factor is NaN", eff.span)
        self.sites.append(_Site(eff.addr, "likelihood", weight=w, span=eff.span))

    def observe(self, eff):
        self._record(eff, _observe_weight(eff.dist, eff.value))

    def factor(self, eff):
        self._record(eff, _factor_weight(eff.value))

    def condition(self, eff):
        self._record(eff, 1 if truthy(eff.value) else 0)


def _support_table(dist, originals: dict, supports: dict, span) -> dict:
    """{typed value (``_typed_key``): probability > 0} of ``dist``, cached in ``supports``
    by its distribution and arguments (the same table for the same parameters in every
    run); ``originals`` gets each typed value's value as the program sees it. A table of
    scalar values is also kept process-wide (``_KNOWN_SUPPORTS``)."""
    key = _dist_key(dist)
    table = supports.get(key) if key is not None else None
    if table is not None:
        return table
    table = _KNOWN_SUPPORTS.get(key) if key is not None else None
    if table is not None:
        for k in table:
            originals.setdefault(k, k[1])  # (a scalar's typed key holds the value itself)
    else:
        try:
            support = dist.exact_support()
        except InfiniteSupportError as err:
            raise err.with_span(span)
        table = {}
        for v, p in support:
            if p != 0:
                k = _typed_key(v)
                originals.setdefault(k, v)
                table[k] = table.get(k, 0) + p
        if key is not None and all(type(k[1]) in _SCALARS and k[0] != "tuple" for k in table):
            _remember(_KNOWN_SUPPORTS, key, table)
    if key is not None:
        supports[key] = table
    return table


def _observe_weight(dist, value):
    """P(value) under ``dist`` (``exact._observe_prob``), kept process-wide for a scalar
    value of a distribution with plain arguments (``_KNOWN_OBSERVATIONS``)."""
    dist_key = _dist_key(dist)
    v = to_python(value)
    key = (dist_key, type(v), v) if dist_key is not None and type(v) in _SCALARS else None
    w = _KNOWN_OBSERVATIONS.get(key) if key is not None else None
    if w is None:
        w = _observe_prob(dist.spec, v, dist.python_args())
        if key is not None:
            _remember(_KNOWN_OBSERVATIONS, key, w)
    return w


def _remember(memo: dict, key, value, limit: int = 4096) -> None:
    """memo[key] = value, dropping the oldest entry past ``limit`` entries."""
    if len(memo) >= limit:
        try:
            del memo[next(iter(memo))]
        except (StopIteration, KeyError, RuntimeError):  # (another thread got there first)
            pass
    memo[key] = value


#: the exact support and the observation probabilities of distributions with given plain
#: arguments (``_dist_key``), over scalar values: pure functions of their keys, kept across
#: runs (``flip(9/10)``'s table is computed once per process). Tables are never mutated.
_KNOWN_SUPPORTS: dict = {}
_KNOWN_OBSERVATIONS: dict = {}
_SCALARS = frozenset((bool, int, str, Fraction, float, type(None)))


def _factor_weight(value):
    """The weight exp(v) of ``factor v`` (exactly 1 at 0, 0 at -inf); ``NotApplicable`` for
    a value that is not a number or overflows (paths give the located error)."""
    v = to_python(value)
    if not isinstance(v, (int, float, Fraction)) or v != v:
        raise NotApplicable("a factor that is not a number")
    if v == 0:
        return 1
    if v == -math.inf:
        return 0
    w = math.exp(float(v))
    if w == math.inf:
        raise NotApplicable("a factor that overflows")
    return w


def _dist_key(dist):
    """A key that determines ``dist``'s exact support (its spec and its arguments, with
    their types: 1/2 and 0.5 differ), or None when it cannot be formed."""
    if type(dist) is not DistValue:
        return None
    parts = []
    for a in dist.args:  # (the common case: its own arguments are the key)
        t = type(a)
        if t is Fraction:
            parts.append((Fraction, a.numerator, a.denominator))  # (by its two ints: hashing one costs a pow)
        elif t in _PLAIN_ARGS:
            parts.append((t, a))
        else:
            break
    else:
        return (id(dist.spec), tuple(parts))
    try:
        key = (id(dist.spec), _typed(dist.python_args()))  # specs live in the module's table
        hash(key)
    except (TypeError, PPLError):
        return None
    return key


#: argument types that ``DistValue.python_args`` passes through unchanged (a float may be a
#: defaulted literal it reads as a Fraction: it takes the general path)
_PLAIN_ARGS = frozenset((bool, int, Fraction, str))


def _typed(v):
    if isinstance(v, (list, tuple)):
        return (type(v).__name__,) + tuple(_typed(x) for x in v)
    if isinstance(v, (bool, int, float, Fraction, str)) or v is None:
        return (type(v).__name__, v)
    raise TypeError("not a plain value")


class _Runner:
    """Runs of ``entry(**data)`` with every choice fixed, sharing the supports met (by
    distribution and arguments) and the first run (``probe``: each choice at its first
    value), which answers any later assignment it already contains."""

    def __init__(self, interp, entry: str, data: dict):
        self.interp, self.entry, self.data = interp, entry, data
        self.originals: dict = {}   # typed key (``_typed_key``) -> the value the program gets
        self.supports: dict = {}
        self._probe = None

    @property
    def probe(self):
        if self._probe is None:
            self._probe = self._run({})
        return self._probe

    def run(self, assignment: dict):
        """(sites, hashable return value, {choice: hashable value it was given})."""
        chosen = self.probe[2]
        if all(chosen.get(k, _MISSING) == v for k, v in assignment.items()):
            return self.probe
        return self._run(assignment)

    def _run(self, assignment: dict):
        h = _FixedRun(assignment, self.originals, self.supports)
        try:
            ret = drive(self.interp.run(self.entry, self.data, Particles.all(1)), h)
        except NotApplicable:
            raise
        except (PPLError, RecursionError) as err:  # e.g. reachable only at an impossible assignment
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise NotApplicable(f"a covering run failed: {first}") from None
        return h.sites, _typed_key(ret), h.chosen


_MISSING = object()


def _typed_key(v):
    """A hashable key of a value that keeps its type (True, 1 and 1.0 are different choices
    and return values here, though equal as dict keys)."""
    v = _hashable(v)
    if isinstance(v, tuple):
        return ("tuple",) + tuple(_typed_key(x) for x in v)
    return (type(v).__name__, v)


def _plain(key):
    """The plain value (as path enumeration records it) of a ``_typed_key``."""
    if key[0] == "tuple":
        return tuple(_plain(x) for x in key[1:])
    return key[1]


# ----------------------------------------------------------------------------------------
# covering designs
# ----------------------------------------------------------------------------------------


def covering_assignments(requirements: list[dict]) -> list[dict]:
    """Few assignments such that every requirement (a partial assignment) is contained in
    one of them: greedy first fit, merging each requirement into the first assignment
    that does not contradict it. For a chain of binary choices this gives two.

    The first fit is found with bit sets (Python ints over the assignments' indices):
    the assignments that agree with ``k = v`` are those that give ``k`` the value ``v``
    (``having[k, v]``) or do not assign ``k`` (``everyone & ~assigned[k]``); a
    requirement fits the lowest index in the intersection of those sets."""
    out: list[dict] = []
    having: dict = {}    # (variable, value) -> bit set of the assignments giving it that value
    assigned: dict = {}  # variable -> bit set of the assignments that give it a value
    everyone = 0
    for req in requirements:
        fits = everyone
        for k, v in req.items():
            fits &= having.get((k, v), 0) | (everyone & ~assigned.get(k, 0))
            if not fits:
                break
        if fits:
            i = (fits & -fits).bit_length() - 1
            out[i].update(req)
        else:
            i = len(out)
            out.append(dict(req))
            everyone |= 1 << i
        bit = 1 << i
        for k, v in req.items():
            having[k, v] = having.get((k, v), 0) | bit
            assigned[k] = assigned.get(k, 0) | bit
    return out


def _requirements(parent_sets: list[tuple], domains: dict) -> list[dict]:
    """Every combination of every parent set's values, as partial assignments. ABSENT is
    left out (it cannot be assigned: a choice is absent where its own parents, also among
    the parents of whoever reads it, make it so)."""
    reqs, seen = [], set()
    for parents in parent_sets:
        for combo in itertools.product(*(domains[p] for p in parents)):
            key = tuple((p, v) for p, v in zip(parents, combo) if v is not ABSENT)
            if key not in seen:
                seen.add(key)
                reqs.append(dict(key))
    return reqs


# ----------------------------------------------------------------------------------------
# tabulation
# ----------------------------------------------------------------------------------------


@dataclass
class _Tables:
    order: list[str]                      # site addresses in program order
    kinds: dict[str, str]
    domains: dict[str, tuple]             # choice -> its values (hashable)
    rows: dict[str, dict]                 # site -> {parents' values: support list | weight}
    returns: dict                         # return parents' values -> return value
    originals: dict = field(default_factory=dict)
    parents: dict = field(default_factory=dict)  # site (and "return") -> the variables of its rows
    #: a lower bound on ``_tables_path_bound`` (each choice's fewest values in any row; 0: unknown)
    fewest_paths: int = 0


#: the value of a choice on a path where it does not exist (its factor is 1 there)
ABSENT = ("<absent>",)


def _tabulate(runner: _Runner, structure: Structure, max_table: int) -> _Tables:
    """Run covering assignments until every choice's domain (the values its supports
    gave, and ABSENT where it did not exist) is settled; then each site's rows over its
    parents' values. A conditional site exists or not as a function of its parents (they
    include its control dependencies), so ABSENT is just one more value; a memoised
    site's existence is not (it depends on every call of the memoised function), so a
    conditional memoised site is not tabulated."""
    sites, parents = structure.sites, structure.parents
    memoised = [a for a in structure.conditional if "(" in a]  # `f(args)/x`: a memoised call's label
    if memoised:
        raise NotApplicable(f"the memoised site {memoised[0]!r} exists on some paths only")
    choices = [a for a, kind in sites.items() if kind == "choice"]
    for a in list(sites) + ["return"]:
        bad = [p for p in parents.get(a, ()) if sites.get(p) != "choice"]
        if a not in parents or bad:
            raise NotApplicable(f"the parents of {a!r} are unknown" if a not in parents else
                                f"{a!r} depends on {bad[0]!r}, which is not a choice")
    domains = {c: () for c in choices}
    _grow(domains, runner.probe[0], structure)
    for _ in range(12):  # extend the domains until every support and absence seen is inside them
        _check_sizes(sites, parents, domains, max_table)
        reqs = _requirements([tuple(parents[a]) for a in list(sites) + ["return"]],
                             {c: d or (ABSENT,) for c, d in domains.items()})
        runs = [runner.run(a) for a in covering_assignments(reqs)]
        grown = False
        for run_sites, _, _ in runs:
            grown = _grow(domains, run_sites, structure) or grown
        if not grown:
            break
    else:
        raise NotApplicable("the choices' domains did not settle")
    rows: dict[str, dict] = {a: {} for a in sites}
    returns: dict = {}
    for run_sites, value, chosen in runs:
        present = {s.addr: s for s in run_sites}
        full = {c: chosen.get(c, ABSENT) for c in choices}
        for a in sites:
            key = tuple(full[p] for p in parents[a])
            s = present.get(a)
            row = ABSENT if s is None else s.support if s.kind == "choice" else s.weight
            _put(rows[a], key, row, a)
        _put(returns, tuple(full[p] for p in parents["return"]), value, "return")
    order = list(sites)
    return _Tables(order, dict(sites), {c: d or (ABSENT,) for c, d in domains.items()}, rows, returns,
                   runner.originals, parents)


def _where(span) -> tuple | None:
    return None if span is None else (span.line, span.col, span.end_line, span.end_col)


def _grow(domains: dict, run_sites: list, structure: Structure) -> bool:
    """Add the values and absences of one run to the domains; whether any was new. A site
    the analysis does not know (or knows at another place), or one it called static that
    is missing, ends the attempt."""
    sites, conditional = structure.sites, structure.conditional
    grown = False
    present = set()
    for s in run_sites:
        if s.addr in present:
            raise NotApplicable(f"the address {s.addr!r} repeats within a run")
        present.add(s.addr)
        if sites.get(s.addr) != s.kind:
            raise NotApplicable(f"the run has a site the dependency analysis does not know: {s.addr!r}")
        if structure.spans and structure.spans.get(s.addr) != _where(s.span):
            raise NotApplicable(f"the address {s.addr!r} names another statement in a run than in the "
                                f"dependency analysis")
        if s.kind == "choice":
            new = tuple(k for k, _ in s.support if k not in domains[s.addr])
            if new:
                domains[s.addr] += new
                grown = True
    for a, kind in sites.items():
        if a not in present:
            if a not in conditional:
                raise NotApplicable(f"the site {a!r} is missing from a run, though the analysis calls it static")
            if kind == "choice" and ABSENT not in domains[a]:
                domains[a] += (ABSENT,)
                grown = True
    return grown


def _check_sizes(sites, parents, domains, max_table):
    for a in list(sites) + ["return"]:
        size = len(domains[a]) if a in domains else 1
        for p in parents[a]:
            size *= len(domains[p])
        if size > max_table:
            raise NotApplicable(f"the table of {a!r} would have {size} entries (max_table={max_table})")


def _put(table: dict, key: tuple, value, addr: str) -> None:
    """Record a site's row; the same parents' values giving another row means the site
    depends on something outside its declared parents."""
    if key in table:
        old = table[key]
        same = (dict(old) == dict(value)) if isinstance(value, list) and isinstance(old, list) else \
            old == value and (old is ABSENT) == (value is ABSENT)
        if not same:
            raise NotApplicable(f"{addr!r} changed while its declared parents did not")
    else:
        table[key] = value


# ----------------------------------------------------------------------------------------
# tabulation from the recipes, without running the program
# ----------------------------------------------------------------------------------------


def _direct_tables(interp, structure: Structure, max_table: int, originals: dict, supports: dict) -> _Tables:
    """The tables of a static program computed site by site from the analysis' recipes
    (``dependencies.Recipe``): each site's statement evaluated with the interpreter's own
    expression evaluator for every combination of the values of the choices it reads,
    in program order (a choice's domain is the union of its supports over its parents'
    values, known before any later site reads it). No program run: the choices' values
    reach an expression only through variables bound to them (the recipe says which), so
    the statement sees exactly what a run with those values fixed would show it. The
    rows are over the choices each recipe reads (a subset of the site's parents).
    ``NotApplicable`` where a site has no recipe or an evaluation fails (the caller then
    tabulates from covering runs, which give any located error)."""
    plans = _site_plans(structure)
    if structure.reads_functions is None:  # (the structure belongs to one program)
        structure.reads_functions = _reads_functions(plans, interp.program)
    evaluator = _RecipeEvaluator(interp, originals, supports, structure.reads_functions)
    domains: dict = {}
    rows: dict = {}
    shared: dict = {}  # (plan's memo number, its reading, its scope's domains' ids) -> (rows, domain, fewest)
    canonical: dict = {}  # a domain -> the one tuple object holding it (equal domains, one identity)
    fewest_paths = 1  # the product of each choice's fewest values in a row (``_Tables.fewest_paths``)
    domain_of = domains.__getitem__
    for a, plan in plans.items():
        key = (plan.memo, plan.read, *map(id, map(domain_of, plan.scope)))  # (the domains live in ``domains``)
        hit = shared.get(key)
        if hit is None:  # (a hit has the same domains, so the same sizes: checked once, here)
            size = math.prod([len(domains[p]) for p in plan.scope])
            if size > max_table:
                raise NotApplicable(f"the table of {a!r} would exceed max_table={max_table} entries")
            table = evaluator.rows(plan, domains)
            domain, fewest = None, 1
            if plan.recipe.kind == "choice":  # (one object per domain: sites reading equal domains share rows)
                domain = tuple(dict.fromkeys(v for support in table.values() for v, _ in support))
                domain = canonical.setdefault(domain, domain)
                if len(domain) * size > max_table:
                    raise NotApplicable(f"the table of {a!r} would exceed max_table={max_table} entries")
                fewest = min(map(len, table.values()))
            hit = shared[key] = (table, domain, fewest)
        rows[a] = hit[0]  # (one dict for sites with the same rows: ``_factors`` shares their tables)
        if hit[1] is not None:
            domains[a] = hit[1]
            fewest_paths *= hit[2]
    returns = rows.pop("return")
    sites = structure.sites
    return _Tables(list(sites), dict(sites), domains, rows, returns, originals,
                   {a: plan.scope for a, plan in plans.items()}, fewest_paths)


@dataclass(frozen=True)
class _SitePlan:
    """What ``_direct_tables`` needs of one site's (or the return value's) recipe."""
    recipe: Any        # its ``dependencies.Recipe``
    scope: tuple       # the choices it reads, in the order of the site's parents
    read: tuple | None  # the position in ``scope`` of each choice variable of the recipe (env
                        # order); None when that is the scope itself
    memo: int          # the same number for sites of the same kind, expressions (their
                       # identities) and data-only variables: their rows are the same
    names: frozenset = frozenset()  # the names its expressions read besides its variables


def _site_plans(structure: Structure) -> dict:
    """address (then "return") -> ``_SitePlan``, made once per structure; ``NotApplicable``
    where some site exists on some paths only, has no recipe, or reads a choice that is
    not among its parents and earlier in the program."""
    if structure.plans is None:
        try:
            structure.plans = _make_site_plans(structure)
        except NotApplicable as why:
            structure.plans = str(why)
    if isinstance(structure.plans, str):
        raise NotApplicable(structure.plans)
    return structure.plans


def _make_site_plans(structure: Structure) -> dict:
    if not structure.static:
        raise NotApplicable("some sites exist on some paths only")
    plans: dict = {}
    earlier: set = set()
    memos: dict = {}
    for a in (*structure.sites, "return"):
        recipe = structure.recipes.get(a)
        if recipe is None:
            raise NotApplicable(f"{a!r} cannot be evaluated on its own")
        choices = [x for _, how, x in recipe.env if how == "choice"]
        if not set(choices) <= set(structure.parents[a]) & earlier:
            raise NotApplicable(f"{a!r} reads a choice the analysis does not list before it")
        scope = tuple(p for p in structure.parents[a] if p in choices)
        memo = memos.setdefault((recipe.kind, tuple(map(id, recipe.exprs)),
                                 tuple((name, type(x), x) for name, how, x in recipe.env if how == "value")),
                                len(memos))
        read = tuple(scope.index(x) for x in choices)
        own = {name for name, _, _ in recipe.env}
        names = frozenset(n.name for e in recipe.exprs for n in ir.walk(e) if type(n) is ir.Var and n.name not in own)
        plans[a] = _SitePlan(recipe, scope, None if read == tuple(range(len(scope))) else read, memo, names)
        if structure.sites.get(a) == "choice":
            earlier.add(a)
    return plans


def _reads_functions(plans: dict, program) -> bool:
    """Whether some recipe names a function of ``program`` (then it is evaluated in the
    interpreter's ``globals``, where the function shadows any builtin of its name; else
    among the builtins alone, with nothing copied). Recipes call builtins only, so this is
    rare: a function named as a value."""
    names = {f.name for f in program.functions}
    return any(not names.isdisjoint(plan.names) for plan in plans.values())


def _size(scope: tuple, domains: dict) -> int:
    n = 1
    for p in scope:
        n *= len(domains[p])
    return n


def _keys(scope: tuple, domains: dict):
    return itertools.product(*(domains[p] for p in scope))


def _one_particle() -> Particles:
    """The context of one particle on the CPU (made once: expressions only read it)."""
    global _ONE
    if _ONE is None:
        _ONE = Particles.all(1)
    return _ONE


_ONE: Particles | None = None


class _RecipeEvaluator:
    """Evaluates recipes' expressions (``Interpreter.pv``) in a frame holding the recipe's
    variables, for one particle; the choices' values are given as typed keys and become
    the values the program sees (``originals``), as ``_FixedRun`` gives them. Any error is
    ``NotApplicable``."""

    def __init__(self, interp, originals: dict, supports: dict, reads_functions: bool = True):
        self.interp, self.originals, self.supports = interp, originals, supports
        self.ctx = _one_particle()
        self.frame = Frame(interp.globals if reads_functions else interp.builtins_frame(), self.ctx)
        self._rows: dict = {}

    def rows(self, plan: "_SitePlan", domains: dict) -> dict:
        """{values of the plan's scope: the site's row there} (a choice's support, a
        likelihood site's weight, the return value's typed key), memoised by the recipe's
        expressions (their identity) and the values its variables hold: pure expressions
        evaluated with the same variables give the same value (a chain's sites share one
        statement: two evaluations in all)."""
        recipe, scope, read = plan.recipe, plan.scope, plan.read
        evaluate = self.choice_row if recipe.kind == "choice" else \
            self.return_key if recipe.kind == "return" else self.likelihood_weight
        out = {}
        for key in _keys(scope, domains):
            memo = (plan.memo, key if read is None else tuple([key[i] for i in read]))
            row = self._rows.get(memo, _MISSING)
            if row is _MISSING:
                row = self._rows[memo] = evaluate(recipe, dict(zip(scope, key)))
            out[key] = row
        return out

    def _values(self, recipe, assignment: dict) -> list:
        """The values of the recipe's expressions with its variables bound (a bare variable
        holding a choice is that choice's value: no frame needed)."""
        exprs = recipe.exprs
        if len(exprs) == 1 and type(exprs[0]) is ir.Var and len(recipe.env) == 1 and recipe.env[0][1] == "choice":
            return [self.originals[assignment[recipe.env[0][2]]]]  # (e.g. ``return x``)
        fr = self.frame  # (one frame, its variables replaced: pure, lambda-free expressions keep no frame)
        fr.vars = {name: x if kind == "value" else self.originals[assignment[x]] for name, kind, x in recipe.env}
        try:  # (recipes hold pure expressions only)
            return [self.interp.pv(e, fr, self.ctx) for e in recipe.exprs]
        except (PPLError, ArithmeticError, TypeError, ValueError, LookupError, RecursionError) as err:
            raise NotApplicable(f"a site's evaluation failed: {type(err).__name__}") from None

    @staticmethod
    def _dist(value):
        if type(value) is not DistValue:
            raise NotApplicable("a distribution that is not a plain one")
        return value

    def choice_row(self, recipe, assignment: dict) -> list:
        """A choice's support [(typed value, probability)] at ``assignment``."""
        d = self._values(recipe, assignment)[0]
        if self._dist(d).spec.value_event_dim >= 1:
            raise NotApplicable("a vector-valued choice")  # (its value is made a Vector: runs do that)
        table = _support_table(d, self.originals, self.supports, None)
        if not table:
            raise NotApplicable("a choice with no value of positive mass")
        return list(table.items())

    def likelihood_weight(self, recipe, assignment: dict):
        """An observe's probability, a factor's exp(value) or a condition's 1/0 at ``assignment``."""
        values = self._values(recipe, assignment)
        if recipe.kind == "observe":
            w = _observe_weight(self._dist(values[1]), values[0])
        elif isinstance(values[0], DistributionValue):
            raise NotApplicable("a distribution used as a number")
        elif recipe.kind == "factor":
            w = _factor_weight(values[0])
        else:
            w = 1 if truthy(values[0]) else 0
        if w != w:
            raise NotApplicable("a likelihood that is NaN")
        return w

    def return_key(self, recipe, assignment: dict):
        """The typed key of the return value at ``assignment``."""
        value = self._values(recipe, assignment)[0] if recipe.exprs else None
        if isinstance(value, DistributionValue):
            raise NotApplicable("a distribution returned")
        return _typed_key(value)


def _factors(t: _Tables, parents: dict) -> list[Factor]:
    """One factor per site: a choice's over its parents and itself (its probabilities, or
    1 at ABSENT where it does not exist), a likelihood site's over its parents (its weight,
    1 where it does not exist)."""
    out = []
    tables: dict = {}  # id of a rows dict shared by several sites (``_direct_tables``) -> its table
    kinds, rows_of = t.kinds, t.rows
    for a in t.order:
        pa = tuple(parents[a])
        rows = rows_of[a]
        table = tables.get(id(rows))
        if kinds[a] == "choice":
            if table is None:
                table = tables[id(rows)] = {}
                for key, support in rows.items():
                    for v, p in ([(ABSENT, 1)] if support is ABSENT else support):
                        table[key + (v,)] = p
            out.append(Factor(pa + (a,), table))
        else:
            if table is None:
                table = tables[id(rows)] = {k: (1 if w is ABSENT else w) for k, w in rows.items() if w != 0}
            out.append(Factor(pa, table))
    return out


# ----------------------------------------------------------------------------------------
# the result
# ----------------------------------------------------------------------------------------


class EliminationResult:
    """The exact measure of a program computed by variable elimination.

    ``evidence`` (Z: a Fraction when exact), ``returns`` ({return value: weight}, weights
    summing to Z), ``names`` (the choice addresses in program order, then "return"),
    ``marginal_weights(name)`` ({value: weight}, summing to Z: every site exists on every
    path of a static program), ``count_paths()`` (the number of execution paths of
    positive weight, by the same elimination with 0/1 entries), ``strategy``
    ("elimination"), and ``enumerate_paths()`` (today's path list, computed on demand)."""

    strategy = "elimination"

    def __init__(self, tables: _Tables, factors: list[Factor], evidence, returns: dict, order: list,
                 max_table: int, enumerate_paths: Callable[[], list], scaled_returns: tuple | None = None):
        self._tables, self._factors, self._order, self._max_table = tables, factors, order, max_table
        self.evidence, self.returns = evidence, returns
        #: ({return value: integer weight}, their sum): ``returns`` times a common
        #: denominator, when exact (None otherwise); the normalised table is w / sum
        self.scaled_returns = scaled_returns
        self.names = [a for a in tables.order if tables.kinds[a] == "choice"
                      and (len(tables.domains[a]) > 1 or tables.domains[a][0] is not ABSENT)] + ["return"]
        # (as paths list them: the choices that exist on some path)
        self.enumerate_paths = enumerate_paths
        self._tree: BucketTree | None = None
        self._count: int | None = None

    def marginal_weights(self, name: str) -> dict:
        if name == "return":
            return dict(self.returns)
        if self._tree is None:
            self._tree = BucketTree(self._factors, self._tables.domains, self._order, max_table=self._max_table)
        out: dict = {}
        for k, p in self._tree.marginal([name]).items():
            if p != 0 and k[0] is not ABSENT:
                v = _plain(k[0])
                out[v] = out[v] + p * self.evidence if v in out else p * self.evidence
        return out

    def count_paths(self) -> int:
        if self._count is None:
            ones = [Factor(f.vars, {k: 1 for k, w in f.table.items() if w > 0}) for f in self._factors]
            self._count = sum_product(ones, self._tables.domains, self._order, max_table=self._max_table).scalar()
        return self._count


def _order_and_plan(structure: Structure, factors: list[Factor], query: tuple, direct: bool):
    """The elimination order of the factors' scopes (keeping ``query``) and its
    ``EliminationPlan``, made once per structure and scopes (``structure.orders``). The
    scopes of tables made from recipes follow from the structure alone: they are kept
    under one key and compared, instead of hashing every scope."""
    scopes = [f.vars for f in factors]
    key = ("direct", query) if direct else (tuple(scopes), query)
    hit = structure.orders.get(key)
    if hit is not None and (not direct or hit[1].scopes == scopes):
        return hit
    order = elimination_order(scopes, last=query)
    structure.orders[key] = hit = (order, EliminationPlan(scopes, order, query))
    return hit


def eliminate_program(interp, entry: str, data: dict, structure: Structure, *,
                      max_table: int = DEFAULT_MAX_TABLE, enumerate_paths: Callable[[], list] | None = None,
                      runner: _Runner | None = None, tables: _Tables | None = None) -> EliminationResult:
    """The exact measure of ``entry(**data)`` by variable elimination over factor tables
    tabulated from covering runs (module docstring). ``NotApplicable`` when it does not
    apply (the caller enumerates paths instead). ``runner``: the runs so far (``_Runner``
    over the same program and ``exact_data(data)``); ``tables``: the tables already made
    (``_direct_tables``), so no run is needed."""
    if not structure.decided:
        raise NotApplicable("the dependency analysis could not decide the structure")
    if structure.numbered_on_some_paths:
        raise NotApplicable("a call is numbered on some paths only: later addresses may differ between paths")
    t = tables or _tabulate(runner or _Runner(interp, entry, exact_data(data)), structure, max_table)
    parents = t.parents
    factors = _factors(t, parents)
    query = tuple(parents["return"])
    order, plan = _order_and_plan(structure, factors, query, direct=tables is not None)
    try:  # (integers over a common denominator where every weight is exact: ``exact_sum_product``)
        joint, denominator = scaled_sum_product([f.table for f in factors], t.domains, plan, max_table=max_table)
    except TableTooLarge as err:
        raise NotApplicable(str(err)) from None
    returns: dict = {}
    for key, w in joint.items():
        if key not in t.returns:  # the covering runs realise every possible key: a broken structure
            raise NotApplicable("an assignment of positive weight was never run")
        v = _plain(t.returns[key])
        returns[v] = returns[v] + w if v in returns else w
    scaled = None
    if denominator is None:
        evidence = sum(returns.values(), 0)
    else:  # (one division per value: the same Fractions as summing the divided entries)
        total = sum(returns.values())
        scaled = (returns, total)
        evidence = Fraction(total, denominator)
        returns = {v: Fraction(w, denominator) for v, w in returns.items()}
    if evidence == 0:
        raise NotApplicable("zero evidence")  # paths give the located error
    return EliminationResult(t, factors, evidence, returns, order, max_table, enumerate_paths or (lambda: []),
                             scaled_returns=scaled)


# ----------------------------------------------------------------------------------------
# the choice between elimination and paths
# ----------------------------------------------------------------------------------------

#: ``strategy="auto"`` enumerates paths when an upper bound on their number (the product
#: of the support sizes met on one run) is at most this: the per-path form is kept for
#: small programs, whose enumeration takes well under a second
DEFAULT_PATH_THRESHOLD = 1024
STRATEGIES = ("auto", "elimination", "paths")


def structure_of(model, data: dict) -> Structure:
    """The ``Structure`` of ``model`` (a ``ModelLike``) on ``data`` from the dependency
    analysis (``semantics.dependencies.analyse``)."""
    from .dependencies import analyse
    deps = analyse(model, data, shapes=False)  # (the shapes of values are not needed here)
    parents = {s.address: tuple(sorted(s.parents)) for s in (*deps.sites, *deps.values)}
    sites = {s.address: "choice" if s.kind == "choice" else "likelihood" for s in deps.sites}
    conditional = frozenset(s.address for s in deps.sites if not s.static)
    spans = {s.address: _where(s.span) for s in deps.sites}
    return Structure(not deps.from_traces, sites, parents, conditional, spans, recipes=dict(deps.recipes),
                     numbered_on_some_paths=deps.numbered_on_some_paths)


def _path_bound(runner: _Runner) -> int:
    """The product of the support sizes on one run (each choice at its first value)."""
    sites = runner.probe[0]
    bound = 1
    for s in sites:
        if s.kind == "choice":
            bound *= len(s.support)
    return bound


def enumerate_exact(model, data: dict, prepared: dict, interp, enumerate_paths: Callable[[], list], *,
                    strategy: str = "auto", max_table: int = DEFAULT_MAX_TABLE, path_threshold: int | None = None):
    """The exact measure of ``model`` on ``data`` (``prepared``: the entry's arguments):
    an ``EliminationResult``, or the path list of ``enumerate_paths()``.

    ``strategy``: "paths" (always enumerate paths), "elimination" (variable elimination or
    an error saying why it does not apply), "auto" (elimination where it applies and the
    program has more than ``path_threshold`` (default ``DEFAULT_PATH_THRESHOLD``) paths; otherwise paths, which also give the
    located errors of programs that fail)."""
    if strategy not in STRATEGIES:
        raise PPLError(f"unknown enumeration strategy {strategy!r}", hint="one of " + ", ".join(STRATEGIES))
    if strategy == "paths":
        return enumerate_paths()
    if path_threshold is None:
        path_threshold = DEFAULT_PATH_THRESHOLD
    runner = _Runner(interp, model.entry, exact_data(prepared))
    try:
        structure = _cached_structure(model, data, interp)
        if strategy == "auto" and structure is None and _path_bound(runner) <= path_threshold:
            return enumerate_paths()  # (a small program is not analysed: one run tells)
        if structure is None:
            structure = _analyse(model, data, interp)
        tables = _tables_without_runs(interp, structure, max_table, runner)
        if strategy == "auto" and (_path_bound(runner) <= path_threshold if tables is None else
                                   tables.fewest_paths <= path_threshold and  # (else the bound exceeds it too)
                                   _tables_path_bound(tables) <= path_threshold):
            return enumerate_paths()
        return eliminate_program(interp, model.entry, prepared, structure, max_table=max_table,
                                 enumerate_paths=enumerate_paths, runner=runner, tables=tables)
    except (NotApplicable, PPLError, RecursionError) as why:
        if strategy == "elimination":
            raise PPLError(f"variable elimination does not apply to this model: {why}",
                           hint="use strategy='auto' (elimination where it applies, else paths) or 'paths'") from None
        return enumerate_paths()


def _tables_without_runs(interp, structure: Structure, max_table: int, runner: _Runner) -> _Tables | None:
    """``_direct_tables`` (sharing the runner's supports), or None where they do not apply:
    the recipes evaluate the program's own statements, so an interpreter wrapped to change
    what its runs' effects see (``middleware.Rewritten``, e.g. SBC's ``observing``) is left
    to the covering runs, which go through it."""
    if not structure.decided or type(interp) is not Interpreter:
        return None
    try:
        return _direct_tables(interp, structure, max_table, runner.originals, runner.supports)
    except (NotApplicable, PPLError, RecursionError):
        return None


def _tables_path_bound(t: _Tables) -> int:
    """``_path_bound`` from tables: the product of the support sizes along the assignment
    that gives each choice its first value (the probe run's)."""
    first: dict = {}
    bound = 1
    kinds, rows, parents = t.kinds, t.rows, t.parents
    for a in t.order:
        if kinds[a] == "choice":
            support = rows[a][tuple([first[p] for p in parents[a]])]
            first[a] = support[0][0]
            bound *= len(support)
    return bound


def _cached_structure(model, data: dict, interp) -> Structure | None:
    """The ``Structure`` of an earlier ``_analyse`` of ``model`` on the same data, or None."""
    key = _structure_key(model, data, interp)
    cache = _STRUCTURES.get(model) if key is not None else None
    if cache is not None and key in cache and cache[key][0] is model.program:
        return cache[key][1]
    return None


def _analyse(model, data: dict, interp) -> Structure:
    structure = _cached_structure(model, data, interp)
    if structure is not None:
        return structure
    key = _structure_key(model, data, interp)
    try:
        structure = structure_of(model, data)
    except PPLError:
        raise
    except Exception as err:  # the analysis failed: paths remain correct
        raise NotApplicable(f"the dependency analysis failed ({type(err).__name__}: {err})") from None
    if key is not None:
        cache = _STRUCTURES.setdefault(model, {})
        if len(cache) >= _CACHED_PER_MODEL:
            del cache[next(iter(cache))]  # the oldest
        cache[key] = (model.program, structure)  # (holding the program keeps its id unique)
    return structure


#: model -> {``_structure_key``: (its program, its ``Structure``)}: the analysis of a model on
#: the same data is the same (the program is immutable IR, the prelude fixed), so repeated
#: ``enumerate`` runs skip it. Only plain Python data is a key (``_typed``); a tensor or any
#: other value is analysed every time.
_STRUCTURES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CACHED_PER_MODEL = 16


def _structure_key(model, data: dict, interp):
    """What the analysis of ``model`` on ``data`` depends on, as a hashable key (the
    program object's identity, its entry, the interpreter's limits, the bound data's plain
    values with their types), or None where it cannot be formed."""
    try:
        weakref.ref(model)
        bound = model.bind((), data or {})
        return (id(model.program), model.entry, interp.max_depth, interp.max_iterations,
                tuple([(k, type(v), v) if type(v) in _SCALARS else (k, _typed(v)) for k, v in sorted(bound.items())]))
    except (TypeError, AttributeError, PPLError):
        return None
