"""Plots of a result: weighted histograms of continuous sites, bar charts of discrete ones
(matplotlib, imported on first use)."""
from __future__ import annotations

import math
import os
import sys
from typing import Iterable

import numpy as np
import torch

from ppl.semantics.errors import PPLError

from .text import _fmt
from .values import _is_number, _sort_table

# plot(): at most this many panels by default, bars per discrete panel, overlaid components.
_PLOT_MAX_SITES = 6
_PLOT_MAX_BARS = 30
_PLOT_MAX_COMPONENTS = 6


def _pyplot():
    """matplotlib.pyplot, switching to the Agg backend first when there is no display."""
    import matplotlib

    if (
        "matplotlib.pyplot" not in sys.modules
        and not os.environ.get("MPLBACKEND")
        and sys.platform.startswith("linux")
        and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    ):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(result, names: str | Iterable[str] | None = None, bins: int = 50, ax=None):
    """Weighted histograms (continuous sites) or bar charts (discrete sites), one panel
    per name. Default: "return" plus the top-level scalar sites, at most 6. ``ax``: an
    Axes (for one name) or a sequence of Axes (one per name). Returns the Figure."""
    chosen = result._as_names(names)
    if chosen is None:
        chosen = [n for n in result._top_level() if n == "return" or result._view(n).shape == ()]
        chosen = chosen[:_PLOT_MAX_SITES]
    for n in chosen:
        result._view(n)  # unknown names fail before anything is drawn
    if not chosen:
        raise PPLError("nothing to plot: this result has no sites")
    plt = _pyplot()
    if ax is not None:
        axes = list(np.ravel(np.asarray(ax, dtype=object)))
        if len(axes) != len(chosen):
            raise PPLError(f"plot got {len(axes)} axes for {len(chosen)} sites ({', '.join(chosen)})")
        fig = axes[0].figure
    else:
        ncols = min(3, len(chosen))
        nrows = math.ceil(len(chosen) / ncols)
        fig, grid = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
        axes = list(grid.ravel())
        for extra in axes[len(chosen):]:
            extra.set_visible(False)
    for name, a in zip(chosen, axes):
        _plot_site(result, name, a, bins)
    if ax is None:
        fig.tight_layout()
    return fig

def _plot_site(result, name: str, ax, bins: int) -> None:
    v = result._view(name)
    title = name
    if v.presence != 1:
        title += f" (exists w.p. {_fmt(float(v.presence))})"
    ax.set_title(title)
    if v.discrete:
        table = v.table()
        if not table:
            ax.text(0.5, 0.5, "no particle with positive weight", ha="center", va="center",
                    transform=ax.transAxes)
            return
        items = list(table.items())
        if len(items) > _PLOT_MAX_BARS:
            top = sorted(items, key=lambda kv: -float(kv[1]))[:_PLOT_MAX_BARS]
            items = list(_sort_table(dict(top)).items())
            ax.set_title(title + f" (top {_PLOT_MAX_BARS})")
        keys = [k for k, _ in items]
        ps = [float(p) for _, p in items]
        if all(_is_number(k) and not isinstance(k, bool) for k in keys):
            xs = [float(k) for k in keys]
            gaps = np.diff(sorted(xs))
            width = 0.8 * (float(gaps.min()) if len(gaps) else 1.0)
            ax.bar(xs, ps, width=width)
        else:
            ax.bar(range(len(keys)), ps)
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels([_fmt(k) for k in keys], rotation=45 if len(keys) > 6 else 0,
                               ha="right" if len(keys) > 6 else "center")
        ax.set_ylabel("probability")
        return
    x, w = v.plot_data
    if x.shape[0] == 0:
        ax.text(0.5, 0.5, "no particle with positive weight", ha="center", va="center",
                transform=ax.transAxes)
        return
    xf = x.to(torch.float64).reshape(x.shape[0], -1).numpy()
    wn = w.numpy()
    if xf.shape[1] == 1:
        ax.hist(xf[:, 0], bins=bins, weights=wn, density=True)
    else:
        for j in range(min(xf.shape[1], _PLOT_MAX_COMPONENTS)):
            index = np.unravel_index(j, v.shape)
            ax.hist(xf[:, j], bins=bins, weights=wn, density=True, alpha=0.5, histtype="stepfilled",
                    label=f"{name}[{','.join(str(int(i)) for i in index)}]")
        ax.legend(fontsize="small")
    ax.set_ylabel("density")


#: an inline picture (``figure_data_uri``) is left out when its PNG is larger than this
MAX_INLINE_PNG_BYTES = 400_000


def figure_data_uri(fig, *, dpi: int = 72, max_bytes: int = MAX_INLINE_PNG_BYTES) -> str | None:
    """``fig`` as a ``data:image/png;base64,...`` URI for inline HTML, or None when the
    PNG would exceed ``max_bytes``. The figure is closed either way, so a notebook does not
    draw it a second time."""
    import base64
    import io
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    data = buffer.getvalue()
    if len(data) > max_bytes:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
