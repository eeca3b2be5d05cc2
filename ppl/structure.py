"""The structure of a model, for people: ``Model.graph``, ``Model.independent``,
``Model.markov_blanket`` and ``Model.draw`` (see ``semantics.dependencies`` for the
analysis and ``semantics.graph`` for the graph and d-separation).

Names: a site is named by its address (``z[3]``, ``geometric/b``, ``obs@12:5``), by its
plate-collapsed name (``z[t]`` in ``for t in ...``: every copy ``z[0]``, ``z[1]``, ...), or,
when no address is that name, by the address without its indices (``x`` for every
``x[i]``), which stands for all its copies at once.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import networkx as nx

from .semantics.dependencies import analyse
from .semantics.errors import PPLError, did_you_mean
from .semantics.graph import build_graph, collapsed_name, d_separated, markov_blanket, random_nodes, stripped_name

__all__ = ["graph", "independent", "blanket", "draw", "resolve"]


def _data(model, data: Mapping[str, Any] | None, kwdata: Mapping[str, Any]) -> dict:
    out = dict(data or {})
    out.update(kwdata)
    return out


def graph(model, data=None, *, collapse: bool = False, deterministic: bool = False, **kwdata) -> nx.DiGraph:
    """The model's dependency graph on ``data`` (``semantics.graph.build_graph``)."""
    return build_graph(analyse(model, _data(model, data, kwdata)), deterministic=deterministic, collapse=collapse)


def resolve(g: nx.DiGraph, names: Any, what: str) -> set:
    """The sites a name (or list of names) stands for: an address, or a plate-collapsed
    name (all its copies). An unknown name is a PPLError listing the names there are."""
    if isinstance(names, str):
        names = [names]
    h = random_nodes(g)
    out: set = set()
    for name in names:
        if not isinstance(name, str):
            raise PPLError(f"{what}: a site name must be a string, got {type(name).__name__}")
        if name in h:
            out.add(name)
            continue
        copies = {n for n in h if collapsed_name(n, h.nodes[n]["plate"]) == name} or \
            {n for n in h if stripped_name(n) == name}
        if not copies:
            available = sorted({collapsed_name(n, h.nodes[n]["plate"]) for n in h})
            close = did_you_mean(name, available + sorted(h))
            hint = (close + " " if close else "") + f"the model's sites are: {', '.join(available)}"
            raise PPLError(f"{what}: the model has no site named '{name}'", hint=hint)
        out |= copies
    return out


def independent(model, a, b, given: Iterable[str] = (), data=None, *, observed: bool = True, **kwdata) -> bool:
    """Whether ``a`` and ``b`` are conditionally independent given ``given`` by
    d-separation; ``observed=True`` also conditions on every observation, factor and
    condition (independence in the posterior), ``observed=False`` reasons about the
    prior. True is a guarantee; False means the graph allows a dependence."""
    g = graph(model, data, **kwdata)
    xs, ys = resolve(g, a, "independent"), resolve(g, b, "independent")
    zs = resolve(g, [given] if isinstance(given, str) else list(given), "independent: given") if given else set()
    return d_separated(g, xs, ys, zs, observed=observed)


def blanket(model, x, data=None, *, collapse: bool = False, **kwdata) -> set:
    """The Markov blanket of ``x`` (an address or a plate-collapsed name): its parents,
    children and the children's other parents; collapsed names when ``collapse``."""
    g = graph(model, data, **kwdata)
    out = markov_blanket(g, resolve(g, x, "markov_blanket"))
    return {collapsed_name(n, g.nodes[n]["plate"]) for n in out} - {x} if collapse else out


# ------------------------------------------------------------------------------ drawing
_STYLE = {  # kind -> (marker, size)
    "choice": ("o", 4400), "observe": ("o", 4400), "factor": ("s", 900), "condition": ("s", 900),
    "deterministic": ("D", 1400), "data": ("s", 1100),
}


def _layout(g: nx.DiGraph) -> dict:
    """Layers from left to right in dependency order (a DAG); a spring layout otherwise."""
    if not nx.is_directed_acyclic_graph(g) or g.number_of_nodes() == 0:
        return nx.spring_layout(g, seed=0)
    pos = {}
    for x, layer in enumerate(nx.topological_generations(g)):
        layer = sorted(layer, key=lambda n: (g.nodes[n]["kind"] == "data", n))
        for y, n in enumerate(layer):
            pos[n] = (x * 2.0, -(y - (len(layer) - 1) / 2) * 1.6)
    return pos


def _label(node: str, attrs: dict) -> str:
    kind = attrs["kind"]
    if kind == "data":
        return attrs["name"]
    shape = attrs.get("shape")
    size = f" [{'x'.join(map(str, shape))}]" if shape else ""  # a vectorised site
    if kind in ("observe", "factor", "condition"):
        head = {"observe": "observe", "factor": "factor", "condition": "condition"}[kind]
        return f"{head}{size}\n{attrs['distribution']}" if attrs.get("distribution") else head
    dist = attrs.get("distribution")
    return f"{node}{size}\n{dist}" if dist else f"{node}{size}"


def draw(model, data=None, path=None, *, collapse: bool = True, deterministic: bool = False,
         title: str | None = None, **kwdata):
    """A matplotlib Figure of the model's graph: random choices as white circles,
    observations shaded, factors and conditions as small squares, data as grey squares,
    plates (loops) as boxes labelled with their variable and size; recurrent plate nodes
    (``z[t-1] -> z[t]``) are marked with a loop arrow. Saved to ``path`` when given."""
    try:
        import matplotlib
        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.patches import FancyBboxPatch
    except ImportError:
        raise PPLError("Model.draw needs matplotlib, which is not installed",
                       hint="pip install matplotlib  (a dependency of ppl: reinstalling ppl brings it back)") from None
    g = graph(model, data, collapse=collapse, deterministic=deterministic, **kwdata)
    pos = _layout(g)
    xs = [p[0] for p in pos.values()] or [0]
    ys = [p[1] for p in pos.values()] or [0]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * (max(xs) - min(xs)) + 3), max(4.0, 1.3 * (max(ys) - min(ys)) + 3)))
    _draw_plates(ax, g, pos, FancyBboxPatch)
    for kind, (marker, size) in _STYLE.items():
        nodes = [n for n, k in g.nodes(data="kind") if k == kind]
        if not nodes:
            continue
        colour = "#bbbbbb" if kind in ("observe", "data") else ("#333333" if kind in ("factor", "condition")
                                                                 else "white")
        nx.draw_networkx_nodes(g, pos, nodelist=nodes, node_shape=marker, node_size=size, node_color=colour,
                               edgecolors="black", linewidths=1.5, ax=ax)
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=18, node_size=4400, width=1.3,
                           connectionstyle="arc3,rad=0.05")
    labels = {n: _label(n, a) for n, a in g.nodes(data=True)}
    for n, (x, y) in pos.items():
        kind = g.nodes[n]["kind"]
        below = kind in ("factor", "condition", "data")
        ax.text(x, y - (0.45 if below else 0), labels[n], ha="center", va="top" if below else "center",
                fontsize=9, color="black")
        if g.nodes[n].get("recurrent"):
            ax.annotate("", xy=(x + 0.25, y + 0.3), xytext=(x - 0.25, y + 0.3),
                        arrowprops=dict(arrowstyle="->", connectionstyle="arc3,rad=-1.2", lw=1.3))
    name = title or getattr(model, "name", "model")
    note = " (structure from executed traces)" if g.graph.get("from_traces") else ""
    ax.set_title(f"{name}{note}", fontsize=13)
    ax.set_axis_off()
    ax.margins(0.15)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


def _draw_plates(ax, g: nx.DiGraph, pos: dict, box) -> None:
    """A rounded box around the nodes of each plate, labelled ``var = 1..size`` (``× n``
    around vectorised sites of n elements)."""
    plates: dict = {}
    for n, plate in g.nodes(data="plate"):
        for depth in range(1, len(plate or ()) + 1):
            plates.setdefault(tuple(plate[:depth]), []).append(n)
        shape = g.nodes[n].get("shape")
        if shape and g.nodes[n]["kind"] != "data":  # a vectorised site: a plate of its own size
            plates.setdefault(tuple(plate or ()) + (("×", shape[0]),), []).append(n)
    for key, nodes in sorted(plates.items(), key=lambda kv: -len(kv[0])):
        pad = 0.6 + 0.25 * (3 - min(len(key), 3))
        x0 = min(pos[n][0] for n in nodes) - pad
        x1 = max(pos[n][0] for n in nodes) + pad
        y0 = min(pos[n][1] for n in nodes) - pad - 0.3
        y1 = max(pos[n][1] for n in nodes) + pad
        ax.add_patch(box((x0, y0), x1 - x0, y1 - y0, boxstyle="round,pad=0.02,rounding_size=0.2",
                         fill=False, linewidth=1.3, edgecolor="#555555"))
        var, size = key[-1]
        text = f"{var} {size}" if var == "×" else f"{var} = 1..{size}" if size is not None else f"{var}"
        ax.text(x1 - 0.1, y0 + 0.1, text, ha="right",
                va="bottom", fontsize=10, color="#333333")
