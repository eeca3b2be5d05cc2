"""The fixed-width summary table of a result (``summary``, also its ``repr``) and the
short number format (``_fmt``) every report shares."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Iterable

import numpy as np
import torch

# summary(): at most this many sites by default, this many components per vector site,
# and this many entries of a probability table.
_SUMMARY_MAX_SITES = 20
_SUMMARY_MAX_COMPONENTS = 8
_SUMMARY_TOP_PROBS = 3


def _fmt(v: Any) -> str:
    """A short human-readable number/value for summary tables."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, Fraction):
        s = str(v)
        return s if len(s) <= 9 else _fmt(float(v))
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.4g}"
    if isinstance(v, str):
        return v
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(e) for e in v) + ("," if len(v) == 1 else "") + ")"
    return str(v)


def summary(result, names: str | Iterable[str] | None = None, *, show_warnings: bool = True) -> str:
    """A fixed-width table: name, mean, sd, 5%, 50%, 95%, for MCMC draws the bulk ESS and
    split R-hat of each scalar site or component, and, for discrete scalar sites, the most
    probable values. Default: "return" and the top-level sites (at most 20).
    Vector sites get one row per component (at most 8). Then a "warning: ..." line per
    diagnostic warning (``warnings``; ``show_warnings=False`` leaves them out)."""
    header, rows, notes = summary_table(result, names)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header) - 1)]

    def line(r):
        head = r[0].ljust(widths[0])
        mid = "  ".join(c.rjust(w) for c, w in zip(r[1:-1], widths[1:]))
        return f"{head}  {mid}  {r[-1]}".rstrip()

    out = [result._header(), line(header)] + [line(r) for r in rows] + notes
    if show_warnings:
        out += [f"warning: {w}" for w in result.warnings]
    return "\n".join(out)


def summary_table(result, names: str | Iterable[str] | None = None) -> tuple[list[str], list[list[str]], list[str]]:
    """The cells of ``summary``'s table, formatted: (header, rows, notes). Every row has
    the header's length; the last column is the probabilities (or a remark); ``notes``
    are the lines printed under the table (omitted sites, conditional statistics). The
    text summary and the HTML one (``results.export.to_html``) show these same cells."""
    chosen = result._as_names(names)
    omitted = 0
    if chosen is None:
        chosen = result._top_level()
        omitted = max(0, len(chosen) - _SUMMARY_MAX_SITES)
        chosen = chosen[:_SUMMARY_MAX_SITES]
    descs = [(n, result._describe(n)) for n in chosen]
    partial = any(d["presence"] != 1 for _, d in descs)
    chains = getattr(result, "r_hat", None) is not None  # MCMC: per-site ESS and split R-hat columns
    rows = []

    def diagnostics(label):
        if not chains:
            return []
        ess, r_hat = result.ess_per_site.get(label), result.r_hat.get(label)
        return [f"{ess:.0f}" if ess is not None and math.isfinite(ess) else "-",
                f"{r_hat:.3f}" if r_hat is not None and math.isfinite(r_hat) else "-"]

    for name, d in descs:
        exists = _fmt(float(d["presence"])) if partial else None
        shape = d["shape"]
        if not shape:
            probs = ""
            if d["probs"] is not None:
                top = sorted(d["probs"].items(), key=lambda kv: -float(kv[1]))
                probs = ", ".join(f"{_fmt(k)}: {_fmt(p)}" for k, p in top[:_SUMMARY_TOP_PROBS])
                if len(top) > _SUMMARY_TOP_PROBS:
                    probs += f", ... ({len(top) - _SUMMARY_TOP_PROBS} more)"
            cells = [d[k] for k in ("mean", "sd", "q05", "q50", "q95")]
            rows.append([name] + [_fmt(c) for c in cells] + ([exists] if partial else []) + diagnostics(name)
                        + [probs])
            continue
        size = math.prod(shape)
        for j in range(min(size, _SUMMARY_MAX_COMPONENTS)):
            index = np.unravel_index(j, shape)
            label = f"{name}[{','.join(str(int(i)) for i in index)}]"
            cells = [_component(d[k], index) for k in ("mean", "sd", "q05", "q50", "q95")]
            rows.append([label] + [_fmt(c) for c in cells] + ([exists] if partial else []) + diagnostics(label)
                        + [""])
        if size > _SUMMARY_MAX_COMPONENTS:
            rows.append([f"{name}[...]"] + [""] * (5 + partial + 2 * chains)
                        + [f"({size - _SUMMARY_MAX_COMPONENTS} more components)"])
    header = ["name", "mean", "sd", "5%", "50%", "95%"] + (["exists"] if partial else []) + \
        (["ess", "r_hat"] if chains else []) + ["probabilities"]
    notes = []
    if omitted:
        notes.append(f"... and {omitted} more sites (pass names=[...] to choose)")
    if partial:
        notes.append("(statistics of sites with exists < 1 are conditional on the site existing)")
    dropped = getattr(result, "extra", {}).get("dropped_sites")
    if dropped:
        notes.append(f"({len(dropped)} earlier sites of this long run were not kept: pass keep=[...] or "
                     "keep='all' to keep them)")
    return header, rows, notes


def _component(v: Any, index: tuple) -> Any:
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        return v[tuple(int(i) for i in index)].item()
    for i in index:
        v = v[int(i)]
    return v
