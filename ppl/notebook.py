"""ppl in Jupyter: a model's HTML view and the ``%%ppl`` cell magic.

* ``model_html(model, data)`` (``Model._repr_html_``, ``Model.html``): the source with the
  DSL's highlighting (``compiler.highlight``), the entry and its parameters, the sites with
  their distributions from the dependency graph (``Model.graph``), and the graph drawn
  inline (``Model.draw``) when it is small. The graph needs the entry's arguments: the
  model's defaults, or ``model.html(data)``; where the analysis does not apply, or data are
  missing, the view says so and shows the source alone. It never raises.
* ``%load_ext ppl`` registers ``%%ppl [NAME] [--entry F]``: the cell is a model's source,
  compiled and bound to ``NAME`` (default: the entry function's name) in the notebook's
  namespace. A syntax or check error is shown as the project's message, located in the
  cell (``<cell NAME>:LINE:COL``, lines counted from the first line after ``%%ppl``), with
  the source line, a caret and the hint: no Python traceback.

IPython is imported only by ``load_ipython_extension`` (the ``notebook`` extra).
"""
from __future__ import annotations

import argparse
import html
import shlex
import warnings
from typing import Any, Mapping

from .compiler.highlight import to_html as highlighted
from .semantics.errors import PPLError

#: the graph is drawn inline only up to this many nodes (plate-collapsed)
MAX_DRAWN_NODES = 30
#: at most this many sites are listed
MAX_LISTED_SITES = 40
#: the automatic view analyses the model only on data of at most this many numbers
MAX_DATA_ELEMENTS = 5_000

_BOX = "font-family:sans-serif;font-size:13px;margin:4px 0"
_TABLE = "border-collapse:collapse;font-family:monospace;font-size:12px;margin:4px 0"
_CELL = "padding:1px 8px;text-align:left;border-bottom:1px solid #eee"
_NOTE = "color:#666;font-size:12px;margin:2px 0"


# ------------------------------------------------------------------------------- HTML
def model_html(model, data: Mapping[str, Any] | None = None, *, graph: bool = True) -> str:
    """The HTML view of ``model`` (see the module docstring)."""
    try:
        parts = [_title(model), highlighted(_source(model))]
        if graph:
            parts.append(_structure_html(model, data))
        return f'<div class="ppl-model" style="{_BOX}">' + "".join(parts) + "</div>"
    except Exception:  # never fail in a notebook: the source as it is
        return f"<pre>{html.escape(getattr(model, 'source', '') or repr(model))}</pre>"


def _source(model) -> str:
    return model.source if model.source.strip() else model.pretty()


def _title(model) -> str:
    params = ", ".join(_parameter(model, p) for p in model.program.function(model.entry).params)
    where = "" if model.filename in ("<model>", "") else f" from {html.escape(model.filename)}"
    return (f"<div><b>ppl model</b> &mdash; entry <code>{html.escape(model.entry)}({html.escape(params)})"
            f"</code>{where}</div>")


def _parameter(model, p) -> str:
    """``name``, or ``name=default`` (the DSL's default, or the decorated function's)."""
    if p.name in model.defaults:
        text = repr(model.defaults[p.name])
        return f"{p.name}={text if len(text) <= 20 else text[:17] + '...'}"
    if p.default is not None:
        from .semantics.pretty import expr
        return f"{p.name}={expr(p.default)}"
    return p.name


def _structure_html(model, data: Mapping[str, Any] | None) -> str:
    """The sites table and the inline graph, or a note saying why they are missing."""
    arguments = dict(model.defaults)
    arguments.update(data or {})
    missing = [p.name for p in model.program.function(model.entry).params
               if p.name not in arguments and p.default is None]
    if missing:
        return (f'<p style="{_NOTE}">sites and graph: pass the data ({", ".join(missing)}) to '
                f'<code>model.html(data)</code> or <code>model.graph(data)</code></p>')
    size = sum(_elements(v) for v in arguments.values())
    if size > MAX_DATA_ELEMENTS:
        return (f'<p style="{_NOTE}">no graph in this view: the data hold {size:,} numbers (more than '
                f'{MAX_DATA_ELEMENTS:,}); <code>model.draw(data)</code> draws it</p>')
    try:
        g = model.graph(arguments, collapse=True)
    except Exception as err:  # noqa: BLE001 - the analysis' limits: the source alone
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f'<p style="{_NOTE}">no graph: {html.escape(reason)}</p>'
    return _sites_table(g) + _graph_picture(model, arguments, g)


def _elements(v: Any) -> int:
    """How many numbers a datum holds (lists, tuples, arrays, tensors; 1 otherwise)."""
    numel = getattr(v, "numel", None) or getattr(v, "size", None)
    if callable(numel):
        try:
            return int(numel())
        except Exception:  # noqa: BLE001
            return 1
    if isinstance(numel, int):
        return numel
    if isinstance(v, (list, tuple)):
        return sum(_elements(e) for e in v)
    return 1


def _sites_table(g) -> str:
    rows = []
    nodes = [(n, a) for n, a in g.nodes(data=True) if a.get("kind") != "data"]
    for n, a in nodes[:MAX_LISTED_SITES]:
        parents = ", ".join(sorted(str(p) for p in g.predecessors(n)))
        plate = " × ".join(str(p[0]) if isinstance(p, tuple) else str(p) for p in (a.get("plate") or ()))
        cells = [str(n), a.get("kind", ""), a.get("distribution") or "", parents, plate]
        rows.append("<tr>" + "".join(f'<td style="{_CELL}">{html.escape(c)}</td>' for c in cells) + "</tr>")
    head = "".join(f'<th style="{_CELL};font-weight:bold">{h}</th>'
                   for h in ("site", "kind", "distribution", "parents", "plates"))
    more = (f'<p style="{_NOTE}">... and {len(nodes) - MAX_LISTED_SITES} more sites</p>'
            if len(nodes) > MAX_LISTED_SITES else "")
    note = (f'<p style="{_NOTE}">structure from executed traces (it depends on random choices)</p>'
            if g.graph.get("from_traces") else "")
    return (f'<table class="ppl-sites" style="{_TABLE}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}'
            f"</tbody></table>{more}{note}")


def _graph_picture(model, arguments: dict, g) -> str:
    if g.number_of_nodes() == 0 or g.number_of_nodes() > MAX_DRAWN_NODES:
        return ""
    try:
        from .results.plots import figure_data_uri
        with warnings.catch_warnings():  # (matplotlib's layout remarks are not the user's business here)
            warnings.simplefilter("ignore")
            uri = figure_data_uri(model.draw(arguments))
    except Exception:  # noqa: BLE001 - no matplotlib, a drawing failure: the table is enough
        return ""
    return "" if uri is None else \
        f'<img class="ppl-graph" alt="dependency graph" style="max-width:100%;max-height:480px" src="{uri}"/>'


# ---------------------------------------------------------------------------- %%ppl
def _magic_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="%%ppl", add_help=False,
                                     description="define a ppl model from the cell's source")
    parser.add_argument("name", nargs="?", help="the notebook variable to bind (default: the entry's name)")
    parser.add_argument("--entry", "-e", help="the entry function (default: the last def)")
    return parser


class _LineError(Exception):
    """A bad ``%%ppl`` line (shown by IPython as a usage error)."""


def parse_magic_line(line: str) -> argparse.Namespace:
    """``%%ppl``'s options: NAME and ``--entry F``."""
    parser = _magic_parser()
    try:
        words = shlex.split(line)
    except ValueError as err:
        raise _LineError(f"%%ppl: {err}") from None
    args, unknown = parser.parse_known_args(words)
    if unknown:
        raise _LineError(f"%%ppl: unknown option(s) {' '.join(unknown)} (usage: %%ppl [NAME] [--entry F])")
    if args.name is not None and not args.name.isidentifier():
        raise _LineError(f"%%ppl: {args.name!r} is not a Python name to bind the model to")
    return args


def define_from_cell(line: str, cell: str, namespace: dict):
    """The ``%%ppl`` magic's work: compile ``cell``, bind it in ``namespace``, return it.
    A ``PPLError`` is located in the cell and renders without a traceback in IPython."""
    from .api import compile_source
    args = parse_magic_line(line)
    label = f"<cell {args.name}>" if args.name else "<cell>"
    try:
        model = compile_source(cell, label, entry=args.entry)
    except PPLError as err:
        raise clean_error(err) from None
    namespace[args.name or model.entry] = model
    return model


def clean_error(err: PPLError) -> PPLError:
    """``err`` rendered by IPython as its own message (file:line:col, the line, the
    caret, the hint), not as a Python traceback (IPython's ``_render_traceback_``)."""
    lines = str(err).splitlines()
    err._render_traceback_ = lambda: [f"\x1b[31m{lines[0]}\x1b[0m", *lines[1:]] if lines else [repr(err)]
    return err


def load_ipython_extension(ipython) -> None:
    """``%load_ext ppl``: registers the ``%%ppl`` cell magic."""
    from IPython.core.error import UsageError

    def ppl(line: str, cell: str):
        """%%ppl [NAME] [--entry F]: define a ppl model from this cell and bind it to NAME."""
        try:
            define_from_cell(line, cell, ipython.user_ns)
        except _LineError as err:
            raise UsageError(str(err)) from None
    ipython.register_magic_function(ppl, magic_kind="cell", magic_name="ppl")
