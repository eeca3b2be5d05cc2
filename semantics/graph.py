"""A model's dependency graph as a ``networkx.DiGraph``, d-separation and Markov blankets.

``build_graph(deps)`` turns a ``semantics.dependencies.Dependencies`` into a directed
graph: one node per site (random choice, observation, factor, condition; by address),
an edge from each parent choice to the site, optionally the named deterministic values
(``deterministic=True``) and the data the sites read (``data=True``: nodes ``data:NAME``).
Node attributes: ``kind``, ``observed`` (observations, factors and conditions are the
evidence the model conditions on), ``distribution``, ``span`` ("line:col"), ``name``
(the source name), ``plate`` (the enclosing loops as ``((var, size), ...)``, outermost
first; ``()`` outside loops), ``index`` (the loop indices), ``static``, ``from_traces``, ``shape`` (of one draw or observation:
``(8,)`` for a vectorised site; None when unknown).
Graph attributes: ``from_traces`` and ``reason`` (see ``dependencies``).

``collapse=True`` draws each plate's copies as one node (``z[3]`` -> ``z[t]``): a node's
``plate`` then names its loops with their sizes, and an edge between two copies of the
same node (``z[t-1] -> z[t]``, both named ``z[t]``) becomes the node attribute ``recurrent=True``.

The graph of the sites is a Bayesian network for the model's joint: each choice's
distribution, and each likelihood factor, is a function of its parents' values and the
data (parents are a superset of the true dependencies; a choice absent on a path takes
the value "absent", itself a function of its parents). So d-separation in it implies
conditional independence (``d_separated``), of the prior when only the given sites are
conditioned on, and of the posterior when the observations are added (``observed=True``).
"""
from __future__ import annotations

import re
from typing import Iterable

import networkx as nx

from .dependencies import Dependencies, Site

__all__ = ["build_graph", "collapsed_name", "stripped_name", "d_separated", "markov_blanket", "random_nodes"]

EVIDENCE_KINDS = ("observe", "factor", "condition")
_INDEX = re.compile(r"\[-?\d+\]")


def collapsed_name(address: str, plate: tuple = ()) -> str:
    """The plate-collapsed name of an address: each loop index replaced by its loop's
    variable (``z[3]`` in ``for t in ...`` -> ``z[t]``); without the plate (or when the
    indices do not match it), the indices dropped (``obs@5:9[2][0]`` -> ``obs@5:9``)."""
    found = _INDEX.findall(address)
    if plate and len(found) == len(plate):
        names = iter(p[0] for p in plate)
        return _INDEX.sub(lambda _: f"[{next(names)}]", address)
    return _INDEX.sub("", address)


def stripped_name(address: str) -> str:
    """An address without any loop index (``z[3]`` -> ``z``)."""
    return _INDEX.sub("", address)


def _node_attrs(s: Site) -> dict:
    span = f"{s.span.line}:{s.span.col}" if s.span is not None and getattr(s.span, "line", 0) else ""
    return dict(kind=s.kind, observed=s.kind in EVIDENCE_KINDS, distribution=s.distribution, span=span,
                name=s.name, plate=tuple((p.name, p.size) for p in s.loops),
                index=tuple(p.index for p in s.loops), static=s.static, from_traces=s.from_traces,
                data=tuple(sorted(s.data)), shape=s.shape)


def build_graph(deps: Dependencies, *, deterministic: bool = False, data: bool = True,
                collapse: bool = False) -> nx.DiGraph:
    """The dependency graph (see the module docstring)."""
    g = nx.DiGraph(from_traces=deps.from_traces, reason=deps.reason)
    sites = list(deps.sites)
    if deterministic:
        sites += [v for v in deps.values if v.kind == "deterministic"]
    for s in sites:
        g.add_node(s.address, **_node_attrs(s))
    for s in sites:
        for p in s.parents:
            if p not in g:  # a choice seen only in an earlier trace (trace fallback): still a node
                g.add_node(p, kind="choice", observed=False, distribution=None, span="", name=p, plate=(),
                           index=(), static=False, from_traces=True, data=())
            g.add_edge(p, s.address)
        if data:
            for name in s.data:
                g.add_node(f"data:{name}", kind="data", observed=True, distribution=None, span="", name=name,
                           plate=(), index=(), static=True, from_traces=False, data=())
                g.add_edge(f"data:{name}", s.address)
    return _collapse(g) if collapse else g


def _collapse(g: nx.DiGraph) -> nx.DiGraph:
    out = nx.DiGraph(**g.graph)
    names = {node: collapsed_name(node, attrs.get("plate", ())) for node, attrs in g.nodes(data=True)}
    for node, attrs in g.nodes(data=True):
        c = names[node]
        if c not in out:
            out.add_node(c, **{**attrs, "index": (), "copies": 0, "recurrent": False})
        out.nodes[c]["copies"] += 1
        out.nodes[c]["static"] = out.nodes[c]["static"] and attrs["static"]
        if len(attrs["plate"]) < len(out.nodes[c]["plate"]):
            out.nodes[c]["plate"] = attrs["plate"]
    for a, b in g.edges():
        ca, cb = names[a], names[b]
        if ca == cb:
            out.nodes[ca]["recurrent"] = True
        else:
            out.add_edge(ca, cb)
    return out


def random_nodes(g: nx.DiGraph) -> nx.DiGraph:
    """The subgraph of sites (data nodes are constants: dropped, never a path)."""
    return g.subgraph([n for n, k in g.nodes(data="kind") if k not in ("data",)])


def _d_separator(g, x, y, z) -> bool:
    if hasattr(nx, "is_d_separator"):  # networkx >= 3.3
        return nx.is_d_separator(g, x, y, z)
    return nx.d_separated(g, x, y, z)  # pragma: no cover  (networkx < 3.3)


def evidence(g: nx.DiGraph) -> set:
    return {n for n, attrs in g.nodes(data=True) if attrs.get("kind") in EVIDENCE_KINDS}


def d_separated(g: nx.DiGraph, xs: Iterable[str], ys: Iterable[str], given: Iterable[str] = (), *,
                observed: bool = True) -> bool:
    """Whether the sites ``xs`` and ``ys`` are d-separated given ``given`` (plus, when
    ``observed``, every observation, factor and condition: the posterior's independence)
    in the (uncollapsed) graph ``g``. Overlapping sets are never separated."""
    h = random_nodes(g)
    xs, ys, zs = set(xs), set(ys), set(given)
    if observed:
        zs |= evidence(h)
    if xs & ys:
        return False
    zs -= xs | ys
    if (xs | ys) <= zs:
        return True
    return _d_separator(h, xs - zs, ys - zs, zs)


def markov_blanket(g: nx.DiGraph, xs: Iterable[str]) -> set:
    """Parents, children and the children's other parents of the sites ``xs`` (data
    nodes excluded), minus ``xs`` themselves."""
    h = random_nodes(g)
    xs = set(xs)
    out: set = set()
    for x in xs:
        out |= set(h.predecessors(x))
        for c in h.successors(x):
            out.add(c)
            out |= set(h.predecessors(c))
    return out - xs
