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


def to_html(result) -> str:
    """The summary (``repr``) as an HTML ``<pre>`` block."""
    return f"<pre>{html.escape(repr(result))}</pre>"
