"""The playground's worker process: runs one job at a time for the server.

The server (``ppl.playground.server``) starts ``python -m ppl.playground.worker FD`` and
sends it jobs over the socket FD (a ``multiprocessing`` Connection); a run that takes
longer than the time limit is ended by killing the process, so a student's model
cannot hang the server. A job is a dict (``source``, ``data`` as JSON text, ``method``,
``particles``, ``seed``, ``entry``, ``options``), already checked against the caps;
the answer is a JSON-able dict: ``{"ok": True, ...}`` with the summary table, the
result's ``to_json``, the plots as PNG data URIs and what ``print`` wrote, or
``{"ok": False, "error": error_json(...)}``. Nothing here evaluates Python: the model
is ppl source, compiled and run by the same API as ``ppl run`` (``Model.run``).
"""
from __future__ import annotations

import io
import os
import time
import warnings
from typing import Any

#: the names errors report for the editor's text and the data box's text
MODEL_FILE = "model.ppl"
DATA_FILE = "data.json"


def main(conn) -> None:
    """The worker loop: import ppl (so the first run is quick), say ready, answer jobs."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib
    matplotlib.use("Agg")
    import ppl  # noqa: F401  (warm: torch, the compiler, the methods)
    conn.send({"ready": True})
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(run_job(job))


def run_job(job: dict) -> dict:
    """One run: compile, bind the data, run, describe; every failure is an answer."""
    from ..semantics.errors import PPLError
    started = time.perf_counter()
    try:
        answer = _run(job)
    except PPLError as err:
        answer = {"ok": False, "error": error_json(err)}
    except RecursionError:
        answer = {"ok": False, "error": {"kind": "error", "message": "the model nests too deeply to compile or run",
                                         "hint": "write fewer nested expressions or loops"}}
    except Exception as err:  # noqa: BLE001 - a bug in ppl, not in the model: said so, never a traceback
        answer = {"ok": False, "error": {"kind": "internal error", "message": f"{type(err).__name__}: {err}",
                                         "hint": "this is a bug in ppl (run the model with `ppl run` and "
                                                 "PPL_DEBUG=1 to see the traceback)"}}
    answer["seconds"] = round(time.perf_counter() - started, 3)
    return answer


def _run(job: dict) -> dict:
    from ..api import compile_source
    from ..cli import _check_data, _in_data_file, parse_data
    from ..semantics.errors import PPLDiagnosticWarning, PPLError
    from ..stdlib import printing
    from ..results.text import summary_table
    model = compile_source(job["source"], MODEL_FILE, entry=job.get("entry") or None)
    data_text = job.get("data") or "{}"
    data = parse_data(data_text, DATA_FILE)
    try:
        _check_data(model, data, None)
    except PPLError as err:
        raise _in_data_box(err, data_text) from None
    options = dict(job.get("options") or {})
    from inspect import signature
    from ..inference import METHODS
    if "progress" in signature(METHODS[job["method"]]).parameters:
        options.setdefault("progress", False)
    output = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", PPLDiagnosticWarning)  # in result.warnings
        try:
            with printing.redirected(output):
                result = model.run(job["method"], data, particles=job["particles"], seed=job.get("seed", 0),
                                   **options)
        except PPLError as err:
            raise _in_data_file(err, data, None) from None
    header, rows, notes = summary_table(result)
    out = result.to_json()
    out.update(entry=model.entry, seed=job.get("seed", 0))
    graph, graph_note = _graph(model, data) if job.get("graph", True) else (None, None)
    return {"ok": True, "header": result._header(), "table": {"header": header, "rows": rows, "notes": notes},
            "warnings": list(result.warnings), "notes": _messages(caught), "result": out,
            "plot": _plot(result) if job.get("plot", True) else None, "graph": graph, "graph_note": graph_note,
            "output": output.getvalue()}


def _in_data_box(err, text: str):
    """The CLI's data errors phrased for the playground: located at the key in the data
    box; the hint names the data box, not ``--data``."""
    import json
    import re
    from ..cli import _text_span
    m = re.match(r"the data binds '([^']*)'", err.message)
    if m is not None and err.span is None:
        key = re.search(re.escape(json.dumps(m.group(1))) + r"\s*:", text)
        if key is not None:
            err.span = _text_span(text, DATA_FILE, key.start(), key.start() + len(json.dumps(m.group(1))) - 1)
    if err.hint and err.hint.startswith("pass a data file with --data DATA.json"):
        err.hint = "add it to the data box" + err.hint[len("pass a data file with --data DATA.json"):]
    return err


#: warnings of the libraries underneath (torch's deprecations, ...) say nothing to a student
_LIBRARY_DIRS = ("/torch/", "/pyro/", "/matplotlib/", "/numpy/", "/scipy/", "/networkx/")


def _messages(caught) -> list[str]:
    """The run's other warnings: ppl's own, deduplicated, in order (the libraries'
    deprecation notes are left out)."""
    seen: list[str] = []
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) or \
                any(d in str(w.filename).replace("\\", "/") for d in _LIBRARY_DIRS):
            continue
        text = str(w.message)
        if text not in seen:
            seen.append(text)
    return seen[:20]


def _plot(result) -> str | None:
    """``result.plot()`` as a PNG data URI (None where it cannot be drawn or is too large)."""
    from ..results.plots import figure_data_uri
    try:
        return figure_data_uri(result.plot())
    except Exception:  # noqa: BLE001 - the table is enough
        return None


def _graph(model, data: dict) -> tuple[str | None, str | None]:
    """``Model.draw`` as a PNG data URI, or a note saying why there is none (the
    notebook view's bounds: data size, number of nodes)."""
    from ..notebook import MAX_DATA_ELEMENTS, MAX_DRAWN_NODES, _elements
    from ..results.plots import figure_data_uri
    arguments = {**model.defaults, **data}
    size = sum(_elements(v) for v in arguments.values())
    if size > MAX_DATA_ELEMENTS:
        return None, f"no graph: the data hold {size:,} numbers (more than {MAX_DATA_ELEMENTS:,})"
    try:
        g = model.graph(arguments, collapse=True)
        if g.number_of_nodes() > MAX_DRAWN_NODES:
            return None, f"no graph: {g.number_of_nodes()} nodes (more than {MAX_DRAWN_NODES})"
        if g.number_of_nodes() == 0:
            return None, "no graph: the model makes no random choice"
        uri = figure_data_uri(model.draw(arguments))
    except Exception as err:  # noqa: BLE001 - the analysis' limits: the result without a graph
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return None, f"no graph: {reason}"
    return (uri, None) if uri is not None else (None, "no graph: the picture is too large")


def error_json(err: Any) -> dict:
    """A ``PPLError`` as JSON: kind, message, hint and, where it has a place, ``file``
    (``model.ppl`` or ``data.json``), ``line``/``col`` (1-based), ``end_line``/``end_col``,
    ``source_line`` and ``caret`` (spaces and ``^`` under the spot, as the CLI prints it),
    and ``text`` (the CLI's whole message)."""
    out: dict[str, Any] = {"kind": err.kind, "message": err.message, "hint": err.hint, "text": str(err)}
    span = err.span
    if span is not None and span.line > 0 and span.source is not None:
        line_text = span.source.line(span.line)
        if span.end_line == span.line and span.end_col >= span.col:
            width = max(1, span.end_col - span.col + 1)
        else:
            width = max(1, len(line_text.rstrip()) - span.col + 1)
        out.update(file=span.filename, line=span.display_line, col=span.col,
                   end_line=span.end_line or span.line, end_col=span.end_col or span.col,
                   source_line=line_text, caret=" " * (span.col - 1) + "^" * width)
    return out


if __name__ == "__main__":
    import sys
    from multiprocessing.connection import Connection
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m ppl.playground.worker FD  (started by `ppl playground`)")
    main(Connection(int(sys.argv[1])))
