"""A result as JSON (``to_json``: the CLI's ``--json``) and as HTML (notebooks)."""
from __future__ import annotations

import html
import json
import math
from fractions import Fraction
from typing import Any

import torch


def _json_scalar(v: Any) -> Any:
    """A json.dumps-able version of a statistic (NaN and infinities become None)."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        return _json_scalar(v.tolist())
    if isinstance(v, (list, tuple)):
        return [_json_scalar(e) for e in v]
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v
    f = float(v)
    return f if math.isfinite(f) else None


def _json_key_leaf(v: Any) -> Any:
    """A key element inside a JSON list key: numbers stay numbers."""
    if isinstance(v, tuple):
        return [_json_key_leaf(e) for e in v]
    if isinstance(v, Fraction):
        return float(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v.is_integer() and abs(v) < 1e15:
            return int(v)
    return v


def _json_key(k: Any) -> str:
    """JSON object key of a table entry: bool -> "true"/"false", int -> "3", str -> itself,
    tuple -> json.dumps(list). Whole floats print as ints ("1", "[0, 1]"), a Fraction
    as "1/3" (inside a list as a float)."""
    if isinstance(k, bool):
        return "true" if k else "false"
    if isinstance(k, int):
        return str(k)
    if isinstance(k, str):
        return k
    if isinstance(k, float):
        return str(int(k)) if k.is_integer() and abs(k) < 1e15 else repr(k)
    if isinstance(k, Fraction):
        return str(k)
    if isinstance(k, tuple):
        try:
            return json.dumps(_json_key_leaf(k))
        except TypeError:
            return repr(k)
    return str(k)


def to_json(result) -> dict:
    """A json.dumps-able dict: method, log_evidence, ess, n and "posterior": for
    "return" and each top-level site, mean/sd/q05/q50/q95 (None when not numeric,
    lists for vector sites) plus "probs" when the site is discrete, and "exists"
    (its probability) when the site does not exist everywhere. NaN/inf -> None.
    "warnings": the result's diagnostic warnings (``warnings``; empty when none);
    weighted results add "ess_before_resampling" and "unique_fraction" (None when
    not counted)."""
    posterior = {}
    for name in result._top_level():
        d = result._describe(name)
        entry = {k: _json_scalar(d[k]) for k in ("mean", "sd", "q05", "q50", "q95")}
        if d["probs"] is not None:
            probs: dict[str, float] = {}
            for k, p in d["probs"].items():
                jk = _json_key(k)
                probs[jk] = probs.get(jk, 0.0) + float(p)
            entry["probs"] = probs
        if d["presence"] != 1:
            entry["exists"] = _json_scalar(d["presence"])
        posterior[name] = entry
    out = {"method": result.method, "log_evidence": _json_scalar(result.log_evidence),
           "ess": _json_scalar(result.ess), "n": result.n}
    out.update(result._json_extra())
    out["warnings"] = result.warnings
    out["posterior"] = posterior
    return out


#: inline styles of the HTML summary (notebooks drop <style> blocks in some viewers)
_TABLE = "border-collapse:collapse;font-family:monospace;font-size:12px;margin:4px 0"
_HEAD_CELL = "border-bottom:1px solid #888;padding:2px 8px;text-align:right"
_CELL = "padding:2px 8px;text-align:right"
_NAME_CELL = "padding:2px 8px;text-align:left;font-weight:bold"
_WARNINGS = ("border:1px solid #e0a030;border-left:6px solid #e07b00;background:#fff6e5;color:#5a3700;"
             "padding:6px 10px;margin:6px 0;font-family:sans-serif;font-size:13px")
_NOTE = "color:#666;font-size:12px;margin:2px 0"


def to_html(result, *, plot: bool = True) -> str:
    """The summary as HTML for notebooks (``_repr_html_``): the header line (a ``<pre>``
    block first), the diagnostic warnings in a highlighted box, the table of
    ``summary()`` (the same cells: ``text.summary_table``) with its notes, and, when
    ``plot``, ``result.plot()`` inline as a PNG (left out where plotting fails or the
    picture is too large). Never raises: on any failure it is ``repr`` in a ``<pre>``."""
    try:
        parts = [f"<pre>{html.escape(result._header())}</pre>", warnings_html(result.warnings),
                 table_html(result)]
        if plot:
            parts.append(plot_html(result))
        return "".join(parts)
    except Exception:  # never fail in a notebook
        return f"<pre>{html.escape(repr(result))}</pre>"


def warnings_html(warnings: list[str]) -> str:
    """The diagnostic warnings as one highlighted box ("" when there are none)."""
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    title = "warning" if len(warnings) == 1 else f"{len(warnings)} warnings"
    return (f'<div class="ppl-warnings" style="{_WARNINGS}"><b>&#9888; {title}: this result may be '
            f'unreliable</b><ul style="margin:4px 0 0 0;padding-left:20px">{items}</ul></div>')


def table_html(result) -> str:
    """``summary()``'s table as an HTML table, then its notes."""
    from .text import summary_table
    header, rows, notes = summary_table(result)
    head = "".join(f'<th style="{_HEAD_CELL}">{html.escape(h)}</th>' for h in header)
    body = []
    for row in rows:
        cells = [f'<td style="{_NAME_CELL}">{html.escape(row[0])}</td>']
        cells += [f'<td style="{_CELL}">{html.escape(c)}</td>' for c in row[1:-1]]
        cells.append(f'<td style="{_CELL};text-align:left">{html.escape(row[-1])}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    out = f'<table class="ppl-summary" style="{_TABLE}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    return out + "".join(f'<p style="{_NOTE}">{html.escape(n)}</p>' for n in notes)


def plot_html(result) -> str:
    """``result.plot()`` as an inline ``<img>`` ("" where plotting fails or is too large)."""
    from .plots import figure_data_uri
    try:
        uri = figure_data_uri(result.plot())
    except Exception:  # a site that cannot be plotted, no matplotlib: the table is enough
        return ""
    if uri is None:
        return ""
    return f'<img class="ppl-plot" alt="posterior plot" style="max-width:100%" src="{uri}"/>'
