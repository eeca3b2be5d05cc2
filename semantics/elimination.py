"""Exact sum-product variable elimination over factor tables, and elimination orders.

A *factor* is a table over a tuple of variables: ``Factor(vars, table)`` where ``table``
maps a tuple of values (one per variable, in order) to a non-negative weight; a missing
key weighs 0. Weights are ``Fraction``s, ints or floats; the arithmetic is Python's, so
the answers are exact Fractions when every entry is one (a float anywhere makes the
answers that touch it floats). ``domains`` maps each variable to the tuple of its values.

The measure the factors denote is ``w(x) = prod_f f(x|vars(f))`` on assignments ``x`` of
every variable the factors mention to a value of its domain (an order lists exactly those).

**Invariant (what a transformation built on this must preserve).** For any order of the
variables, ``sum_product(factors, domains, order, keep)`` is the table over ``keep`` of
``sum_{x : x|keep = k} w(x)``, the same numbers the brute-force sum over all assignments
gives (exactly, in Fractions): summing a variable out of the product of the factors that
mention it is the distributive law. The order changes only the cost, which is the product
of the domain sizes of the largest scope formed (the induced width); ``elimination_order``
chooses one with networkx's treewidth heuristics (minimum fill-in or minimum degree). A
chain or a tree has induced width 1, so its cost is linear in its length.

:class:`BucketTree` keeps the forward pass's messages so that the marginal of every
variable (and of a set of variables that share a bucket) comes from one backward pass:
two passes give all marginals instead of one elimination per variable.

Used by ``semantics.exact_elimination`` (``enumerate`` by dynamic programming); the order
function is shared with the batched enumeration inside sampling methods.
"""
from __future__ import annotations

import itertools
import math
import operator
from fractions import Fraction
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx
from networkx.algorithms.approximation import treewidth as _tw

__all__ = ["Factor", "elimination_order", "interaction_graph", "sum_product", "exact_sum_product", "BucketTree",
           "induced_width", "TableTooLarge", "integer_tables", "EliminationPlan", "scaled_sum_product"]


class TableTooLarge(Exception):
    """An intermediate table would exceed the size limit (the caller falls back)."""


@dataclass(frozen=True, slots=True, init=False)
class Factor:
    """A table over ``vars``: value tuple -> weight (missing keys weigh 0)."""
    vars: tuple
    table: dict

    def __init__(self, vars: tuple, table: dict):
        _set_vars(self, vars)  # (the slots' own setters: a frozen dataclass's __init__ costs a
        _set_table(self, table)  # generic setattr per field, and elimination makes one per site)

    def scalar(self) -> Any:
        """The weight of a factor over no variables."""
        return self.table.get((), 0)


_set_vars, _set_table = Factor.vars.__set__, Factor.table.__set__


# ----------------------------------------------------------------------------------------
# elimination orders
# ----------------------------------------------------------------------------------------


def interaction_graph(scopes: Iterable[Iterable[Hashable]]) -> nx.Graph:
    """The undirected graph with an edge between every two variables that share a scope
    (the moral graph of a factorisation)."""
    g = nx.Graph()
    for scope in scopes:
        scope = list(dict.fromkeys(scope))
        g.add_nodes_from(scope)
        g.add_edges_from(itertools.combinations(scope, 2))
    return g


class _Candidates(Mapping):
    """The elimination graph seen by networkx's heuristics with some nodes held back: the
    heuristic picks among ``candidates`` but reads every node's neighbours."""

    def __init__(self, graph: dict, candidates: dict):
        self.graph, self.candidates = graph, candidates

    def __getitem__(self, node):
        return self.graph[node]

    def __iter__(self):
        return iter(self.candidates)

    def __len__(self):
        return len(self.graph)


def elimination_order(scopes: Iterable[Iterable[Hashable]], *, last: Iterable[Hashable] = (),
                      heuristic: str = "min_fill") -> list:
    """An order in which to sum out the variables of factors with these ``scopes``
    (every variable that occurs, and every variable of ``last``), chosen greedily on the
    interaction graph by networkx's treewidth heuristic (``"min_fill"``: fewest fill-in
    edges, ``networkx...treewidth.min_fill_in_heuristic``; ``"min_degree"``: fewest
    neighbours, ``MinDegreeHeuristic``). The variables of ``last`` (e.g. the ones whose
    joint is wanted) come last, in the order given. Ties break by first appearance, so
    the order is deterministic."""
    last = list(dict.fromkeys(last))
    g = interaction_graph(scopes)
    g.add_nodes_from(last)
    graph = {n: set(g[n]) - {n} for n in g}
    held = set(last)
    candidates = {n: None for n in g if n not in held}
    order = _leaves_first(graph, candidates)
    pick = _picker(heuristic, graph)
    while candidates:
        node = pick(_Candidates(graph, candidates))
        if node is None:  # the rest is one clique: any order is as good
            order.extend(candidates)
            break
        order.append(node)
        del candidates[node]
        _eliminate_node(graph, node)
    return order + last


def _leaves_first(graph: dict, candidates: dict) -> list:
    """Eliminate candidates of degree 0 or 1, repeatedly (removing them from ``graph`` and
    ``candidates``): they add no fill-in, so both heuristics would pick such a node; doing
    it with a queue makes a chain's or a tree's order linear in its size (the networkx
    heuristics rescan every node at each step)."""
    order = []
    queue = [n for n in candidates if len(graph[n]) <= 1]
    while queue:
        node = queue.pop()
        if node not in candidates or len(graph[node]) > 1:
            continue
        order.append(node)
        del candidates[node]
        nbrs = graph[node]
        _eliminate_node(graph, node)
        queue.extend(u for u in nbrs if u in candidates and len(graph[u]) <= 1)
    return order


def _picker(heuristic: str, graph: dict):
    if heuristic == "min_fill":
        return _tw.min_fill_in_heuristic
    if heuristic == "min_degree":  # networkx's MinDegreeHeuristic's rule; its heap cannot hold nodes back
        return lambda view: min(view.candidates, key=lambda n: len(view.graph[n]))
    raise ValueError(f"unknown elimination heuristic {heuristic!r} (min_fill or min_degree)")


def _eliminate_node(graph: dict, node) -> None:
    nbrs = graph.pop(node)
    for u in nbrs:
        graph[u].discard(node)
        graph[u].update(nbrs - {u})


def induced_width(scopes: Iterable[Iterable[Hashable]], order: list) -> int:
    """The largest number of neighbours a variable has when it is eliminated in ``order``
    (1 for a chain in its natural order)."""
    g = interaction_graph(scopes)
    graph = {n: set(g[n]) - {n} for n in g}
    width = 0
    for node in order:
        if node in graph:
            width = max(width, len(graph[node]))
            _eliminate_node(graph, node)
    return width


# ----------------------------------------------------------------------------------------
# products and sums of tables
# ----------------------------------------------------------------------------------------


def _product_sum(factors: list[Factor], domains: Mapping, out_vars: tuple, sum_vars: tuple,
                 max_table: int | None) -> Factor:
    """sum over ``sum_vars`` of the product of ``factors``, as a table over ``out_vars``
    (``out_vars + sum_vars`` covers every factor's variables). Zero products are skipped."""
    step = _Step(list(range(len(factors))), [f.vars for f in factors], out_vars, sum_vars)
    return Factor(out_vars, step.run([f.table for f in factors], domains, max_table))


def _key_of(idx: tuple):
    """A function from an assignment (a tuple over a scope) to the tuple of its entries
    at ``idx`` (a factor's key): a slice where the positions are consecutive (one
    position, or none, included), else ``itemgetter`` (both run in C)."""
    if not idx:
        return operator.itemgetter(slice(0, 0))
    if idx == tuple(range(idx[0], idx[0] + len(idx))):
        return operator.itemgetter(slice(idx[0], idx[0] + len(idx)))
    return operator.itemgetter(*idx)


def _ordered_union(factors: Iterable[Factor]) -> tuple:
    return tuple(dict.fromkeys(v for f in factors for v in f.vars))


def sum_product(factors: Iterable[Factor], domains: Mapping, order: list, keep: Iterable[Hashable] = (),
                *, max_table: int | None = None) -> Factor:
    """The table over ``keep`` of the sum, over every other variable, of the product of
    ``factors`` (see the module's invariant), eliminating in ``order`` (variables of
    ``keep`` in it are skipped). ``keep=()``: a factor over no variables whose scalar is
    the total mass Z. ``max_table``: a bound on the entries of any table formed
    (``TableTooLarge`` beyond it). (``EliminationPlan`` + ``run``: the plan can be kept
    for other tables over the same scopes.)"""
    factors = list(factors)
    plan = EliminationPlan([f.vars for f in factors], order, keep)
    return plan.run([f.table for f in factors], domains, max_table=max_table)


class EliminationPlan:
    """The symbolic part of ``sum_product`` for factors over given scopes, worked out once:
    each factor waits in the bucket of its first variable in the order; eliminating that
    variable multiplies its bucket, sums the variable out and puts the result (a
    message) in the bucket of its next variable; the last bucket holds what remains over
    ``keep``. ``run`` does the arithmetic on any tables over those scopes."""

    def __init__(self, scopes: list[tuple], order: list, keep: Iterable[Hashable] = ()):
        self.keep = keep = tuple(dict.fromkeys(keep))
        kept = set(keep)
        eliminated = [v for v in order if v not in kept]
        position = {v: i for i, v in enumerate(eliminated)}
        final = len(eliminated)
        buckets: list[list[int]] = [[] for _ in range(final + 1)]
        self.n_factors = len(scopes)
        self.scopes = [tuple(vs) for vs in scopes]
        slot_vars = list(self.scopes)  # slot i: factor i, then each step's message

        def put(slot: int) -> None:
            try:
                first = min((position[v] for v in slot_vars[slot] if v not in kept), default=final)
            except KeyError as missing:
                raise ValueError(f"variable not in the order: {missing.args[0]!r}") from None
            buckets[first].append(slot)

        for i in range(len(scopes)):
            put(i)
        self.steps: list[_Step] = []
        for i, var in enumerate(eliminated):
            if buckets[i]:
                rest = tuple(v for v in dict.fromkeys(v for j in buckets[i] for v in slot_vars[j]) if v != var)
                self.steps.append(_Step(buckets[i], [slot_vars[j] for j in buckets[i]], rest, (var,)))
                slot_vars.append(rest)
                put(len(slot_vars) - 1)
        self.last = _Step(buckets[final], [slot_vars[j] for j in buckets[final]], keep, ())
        #: the most variables any step's table spans
        self.widest = max(len(step.scope) for step in (*self.steps, self.last))

    def run(self, tables: list[dict], domains: Mapping, *, max_table: int | None = None) -> Factor:
        """The table over ``keep`` for factor tables over the plan's scopes (in order)."""
        if len(tables) != self.n_factors:
            raise ValueError(f"{len(tables)} tables for a plan of {self.n_factors} factors")
        if max_table is not None and domains and max(map(len, domains.values())) ** self.widest <= max_table:
            max_table = None  # (no step's table can exceed it: no step need count its entries)
        slots = list(tables)
        for step in self.steps:
            single = step.single
            if single is None or max_table is not None:
                slots.append(step.run(slots, domains, max_table))
                continue
            widest, j, key_of, out_key = single  # (``_Step.run``'s one-lookup case, unchecked: a chain)
            slots.append(_times_one_lookup(slots[widest], slots[j].get, key_of, out_key))
        return Factor(self.keep, self.last.run(slots, domains, max_table))


def _times_one_lookup(table: dict, get, key_of, out_key) -> dict:
    """The sum over the summed variables of ``table`` (spanning the scope) times the one
    other input (its ``get``, keyed by ``key_of`` of an assignment), as a table keyed by
    ``out_key``: ``_Step.run`` where one table spans the scope and one other is looked up."""
    out: dict = {}
    for assignment, w in table.items():
        if w:
            x = get(key_of(assignment), 0)
            if x:
                key, w = out_key(assignment), w * x
                out[key] = out[key] + w if key in out else w
    return out


class _Step:
    """One bucket of an ``EliminationPlan``: the sum over ``sum_vars`` of the product of
    the tables in ``inputs`` (slot numbers), as a table over ``out_vars``, with the key
    functions worked out once. Where one input spans the whole scope its nonzero entries
    are iterated (each looked up in the others) instead of every assignment of the
    scope; zero products are skipped either way."""

    def __init__(self, inputs: list[int], input_vars: list[tuple], out_vars: tuple, sum_vars: tuple):
        self.out_vars, self.scope = out_vars, out_vars + sum_vars
        widest = max(range(len(inputs)), key=lambda j: len(input_vars[j]), default=None)
        if widest is not None and len(input_vars[widest]) == len(self.scope):
            self.widest = inputs[widest]
            pos = {v: i for i, v in enumerate(input_vars[widest])}
            others = [j for j in range(len(inputs)) if j != widest]
            self.out_key = _key_of(tuple(pos[v] for v in out_vars))
        else:
            self.widest = None
            pos = {v: i for i, v in enumerate(self.scope)}
            others = range(len(inputs))
        self.lookups = [(inputs[j], _key_of(tuple(pos[v] for v in input_vars[j]))) for j in others]
        #: (widest slot, the other slot, its key function, the output key function) where the
        #: widest input spans the scope and one other input is looked up in it; else None
        self.single = (self.widest, *self.lookups[0], self.out_key) \
            if self.widest is not None and len(self.lookups) == 1 else None

    def run(self, slots: list, domains: Mapping, max_table: int | None) -> dict:
        if max_table is not None:
            size = 1
            for v in self.scope:
                size *= len(domains[v])
            if size > max_table:
                raise TableTooLarge(f"a table over {len(self.scope)} variables has {size} entries (limit {max_table})")
        out: dict = {}
        if self.widest is not None:
            out_key = self.out_key
            if len(self.lookups) == 1:  # (the common case, e.g. a chain's link times the message before it)
                j, key_of = self.lookups[0]
                return _times_one_lookup(slots[self.widest], slots[j].get, key_of, out_key)
            lookups = [(slots[j].get, key_of) for j, key_of in self.lookups]
            for assignment, w in slots[self.widest].items():
                if not w:
                    continue
                for get, key_of in lookups:
                    x = get(key_of(assignment), 0)
                    if not x:
                        break
                    w = w * x
                else:
                    key = out_key(assignment)
                    out[key] = out[key] + w if key in out else w
            return out
        lookups = [(slots[j].get, key_of) for j, key_of in self.lookups]
        n_out = len(self.out_vars)
        for assignment in itertools.product(*(domains[v] for v in self.scope)):
            w = None  # (no `1 *`: a product of Fractions makes one Fraction per factor only)
            for get, key_of in lookups:
                x = get(key_of(assignment), 0)
                if not x:
                    break
                w = x if w is None else w * x
            else:
                if w is None:
                    w = 1
                key = assignment[:n_out]
                out[key] = out[key] + w if key in out else w
        return out


def exact_sum_product(factors: Iterable[Factor], domains: Mapping, order: list, keep: Iterable[Hashable] = (),
                      *, max_table: int | None = None, plan: EliminationPlan | None = None) -> Factor:
    """``sum_product`` with the arithmetic on integers where every weight is exact: each
    factor's table is scaled to integers by the least common multiple of its
    denominators (``integer_tables``), the elimination multiplies and adds Python ints
    only (no gcd per operation, as each ``Fraction`` operation has), and every entry of
    the result is divided by the product of the scales once at the end. Each factor
    enters every product exactly once, so that product is the result's one common
    denominator: the answers are the same Fractions ``sum_product`` gives. With a float
    weight anywhere this is ``sum_product`` itself. ``plan``: an ``EliminationPlan`` of
    these factors' scopes, ``order`` and ``keep`` (made here when not given)."""
    factors = list(factors)
    if plan is None:
        plan = EliminationPlan([f.vars for f in factors], order, keep)
    table, denominator = scaled_sum_product([f.table for f in factors], domains, plan, max_table=max_table)
    if denominator is None:
        return Factor(plan.keep, table)
    return Factor(plan.keep, {k: Fraction(w, denominator) for k, w in table.items()})


def scaled_sum_product(tables: list[dict], domains: Mapping, plan: "EliminationPlan", *,
                       max_table: int | None = None) -> tuple[dict, int | None]:
    """``exact_sum_product`` before its final division: (the table over ``plan.keep``
    of integers, their common denominator), or (the plain table, None) when no weight
    is a Fraction or some weight is not exact (the table is then ``plan.run``'s).
    ``tables``: the factors' tables over the plan's scopes."""
    scaled = _integer_tables(tables)
    if scaled is None:
        return plan.run(tables, domains, max_table=max_table).table, None
    ints, denominator = scaled
    return plan.run(ints, domains, max_table=max_table).table, denominator


def integer_tables(factors: list[Factor]) -> tuple[list[Factor], int] | None:
    """(the factors with every weight multiplied by its factor's scale, the product of the
    scales), where a factor's scale is the least common multiple of its weights'
    denominators; None when a weight is not an int or a Fraction, or when no weight is a
    Fraction (plain ints need no scaling)."""
    scaled = _integer_tables([f.table for f in factors])
    if scaled is None:
        return None
    return [Factor(f.vars, t) for f, t in zip(factors, scaled[0])], scaled[1]


def _integer_tables(tables: list[dict]) -> tuple[list[dict], int] | None:
    """``integer_tables`` on the tables alone."""
    out, denominator, any_fraction = [], 1, False
    done: dict = {}  # id of a table shared by several factors -> (its integer table, its scale)
    for table in tables:
        hit = done.get(id(table))
        if hit is None:
            hit = done[id(table)] = _integer_table(table)
            if hit is None:
                return None
        out.append(hit[0])
        if hit[1] is not None:
            any_fraction = True
            denominator *= hit[1]
    return (out, denominator) if any_fraction else None


def _integer_table(table: dict) -> tuple[dict, int | None] | None:
    """(the table times its scale, the scale: the lcm of its Fractions' denominators), or
    (the table, None) when it holds ints only, or None when it holds anything else."""
    types = set(map(type, table.values()))
    if not types <= _EXACT_TYPES:
        return None
    if Fraction not in types:
        return table, None
    scale = math.lcm(*{w.denominator for w in table.values()})
    return {k: w.numerator * (scale // w.denominator) for k, w in table.items()}, scale


_EXACT_TYPES = frozenset((int, Fraction))


class BucketTree:
    """Variable elimination that keeps its messages, for every marginal in two passes.

    Bucket i belongs to ``order[i]``: it holds the factors whose first variable in the
    order is ``order[i]`` and the messages of its children; its message (the product
    summed over ``order[i]``) goes to the bucket of the first remaining variable in the
    order (its parent), or, over no variables, multiplies the total mass. The backward
    pass sends each bucket the product of everything outside its subtree, so that a
    bucket's belief (its product times that message) is the unnormalised marginal of its
    scope within its connected component."""

    def __init__(self, factors: Iterable[Factor], domains: Mapping, order: list, *, max_table: int | None = None):
        self.domains, self.order, self.max_table = domains, list(order), max_table
        self.position = {v: i for i, v in enumerate(self.order)}
        n = len(self.order)
        self.own: list[list[Factor]] = [[] for _ in range(n)]
        self.constants: list[Factor] = []
        for f in factors:
            if f.vars:
                self.own[min(self.position[v] for v in f.vars)].append(f)
            else:
                self.constants.append(f)
        self.children: list[list[int]] = [[] for _ in range(n)]
        self.parent: list[int | None] = [None] * n
        self.message: list[Factor | None] = [None] * n
        self._down: list[Factor | None] = [None] * n
        self._forward()

    def _scope(self, i: int) -> tuple:
        """The variables of bucket i's product (its own variable first)."""
        parts = self.own[i] + [self.message[c] for c in self.children[i]]
        rest = tuple(v for v in _ordered_union(parts) if v != self.order[i])
        return (self.order[i],) + rest

    def _forward(self) -> None:
        roots = []
        for i, var in enumerate(self.order):
            parts = self.own[i] + [self.message[c] for c in self.children[i]]
            rest = self._scope(i)[1:]
            self.message[i] = _product_sum(parts, self.domains, rest, (var,), self.max_table)
            if rest:
                p = min(self.position[v] for v in rest)
                self.parent[i] = p
                self.children[p].append(i)
            else:
                roots.append(i)
        self.roots = roots
        z = 1
        for f in self.constants + [self.message[r] for r in roots]:
            z = z * f.scalar()
        self.total = z

    def _down_message(self, i: int) -> Factor:
        """The product of every factor outside bucket i's subtree, summed down to the
        variables bucket i shares with its parent (over no variables at a root: 1)."""
        if self._down[i] is None:
            p = self.parent[i]
            if p is None:
                self._down[i] = Factor((), {(): 1})
            else:
                parts = self.own[p] + [self.message[c] for c in self.children[p] if c != i] + [self._down_message(p)]
                sep = self.message[i].vars
                others = tuple(v for v in self._scope(p) if v not in sep)
                self._down[i] = _product_sum(parts, self.domains, sep, others, self.max_table)
        return self._down[i]

    def marginal(self, variables: Iterable[Hashable]) -> dict:
        """The normalised joint table {value tuple: probability} of ``variables``, which
        must lie in one bucket's scope (a single variable always does)."""
        variables = tuple(variables)
        for i in sorted({self.position[v] for v in variables}):
            scope = self._scope(i)
            if set(variables) <= set(scope):
                break
        else:
            raise ValueError(f"{variables!r} share no bucket")
        parts = self.own[i] + [self.message[c] for c in self.children[i]] + [self._down_message(i)]
        others = tuple(v for v in scope if v not in variables)
        belief = _product_sum(parts, self.domains, variables, others, self.max_table).table
        mass = sum(belief.values())
        return {k: _ratio(w, mass) for k, w in belief.items()}


def _ratio(a, b):
    """a / b, a Fraction when both are exact."""
    if isinstance(a, int) and isinstance(b, int):
        return Fraction(a, b)
    return a / b
