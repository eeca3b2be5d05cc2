"""Draws of a result as replayable traces, and a model's observations as named variables:
what ``to_arviz`` (``ppl.results.arviz``) and ``Model.predictive`` (``ppl.predictive``) share.

* ``posterior_draws(result, draws, seed)``: the rows of a result that stand for its
  posterior, with a (chains, draws) layout: every kept draw of an MCMC result (chain-major);
  for a weighted population, ``draws`` (default N) indices resampled multinomially by the
  weights with ``numpy.random.default_rng(seed)`` (a population of equal weights is taken as
  it is, unless ``draws`` asks for another number); for an exact result, paths drawn by
  probability the same way. Returned as ``Draws``: per site a column (tensor [M, ...] or a
  list of M objects) and a presence mask, ready to replay with ``semantics.predictive``.
* ``observation_variables(program, addresses)``: observe addresses grouped by statement
  (the address without loop indices and call counters), each group named after the
  observed variable (``observe y ~ ...`` and ``observe ys[i] ~ ...``: "y", "ys"), else after
  the statement's address; and ``stack`` turns a group's per-address arrays into one array.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ppl.semantics import ir
from ppl.semantics.errors import PPLError
from ppl.semantics.trace import choice_name
from ppl.semantics.values import is_batched

from .values import _objects_to_tensor, _to_key


@dataclass
class Draws:
    """M = chains * draws rows standing for a posterior: ``columns`` (site -> tensor [M, ...]
    or list of M values), ``present`` (site -> bool tensor [M] or None), ``chains``,
    ``draws``, ``index`` (the rows of the result taken, None for exact paths), ``how``
    (a sentence for docstrings and attrs)."""
    columns: dict
    present: dict
    chains: int
    draws: int
    index: np.ndarray | None
    how: str
    dropped: list = field(default_factory=list)

    @property
    def M(self) -> int:
        return self.chains * self.draws


def result_kind(result) -> str:
    """What a result's rows are (by its documented attributes: this part does not import
    ``ppl.result``): "optimum" (best_of_n: ``candidates``), "chains" (MCMC: ``chains``),
    "exact" (enumeration: ``paths``, no weights) or "weighted" (a population)."""
    if hasattr(result, "candidates"):
        return "optimum"
    if hasattr(result, "chains") and hasattr(result, "acceptance_rate"):
        return "chains"
    if not hasattr(result, "weights"):
        return "exact"
    return "weighted"


def resampled_indices(weights: torch.Tensor, draws: int, seed: int) -> np.ndarray:
    """``draws`` indices drawn with replacement in proportion to ``weights`` (float64 [N])
    by ``numpy.random.default_rng(seed)``."""
    w = weights.detach().cpu().double().numpy()
    return np.random.default_rng(seed).choice(w.shape[0], size=int(draws), p=w / w.sum())


def posterior_draws(result, draws: int | None = None, seed: int = 0) -> Draws:
    """The result's posterior as rows to replay (module docstring)."""
    kind = result_kind(result)
    if kind == "optimum":
        raise PPLError("best_of_n's result is an optimum, not a posterior: it has no posterior draws",
                       hint="run a posterior method (importance, smc, nuts, ...) for draws")
    if draws is not None and (isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 1):
        raise PPLError(f"draws must be a positive whole number (got {draws!r})")
    if kind == "exact":
        return _exact_draws(result, int(draws or 1000), seed)
    dropped = list(result.extra.get("dropped_sites") or ())
    if kind == "chains" and draws is None:
        index = np.arange(result.n)
        chains, per_chain = result.chains, result.draws
        how = f"every kept draw of {result.chains} chains"
    elif kind == "chains":
        index = (np.arange(draws) * result.n) // draws
        chains, per_chain = 1, int(draws)
        how = f"{draws} of the {result.n} kept draws, evenly spaced (chain-major)"
    elif draws is None and bool((result.weights == result.weights[0]).all()):
        index = np.arange(result.n)
        chains, per_chain = 1, result.n
        how = f"the {result.n} particles as they are (equal weights)"
    else:
        n = int(draws or result.n)
        index = resampled_indices(result.weights, n, seed)
        chains, per_chain = 1, n
        how = f"{n} particles resampled multinomially by weight (numpy default_rng({seed}))"
    at = torch.as_tensor(index)
    columns, present = {}, {}
    for name, site in result.sites.items():
        v = site.value
        columns[name] = v[at] if isinstance(v, torch.Tensor) else [v[i] for i in index.tolist()]
        present[name] = None if site.present is None else torch.as_tensor(site.present).bool()[at]
    return Draws(columns, present, chains, per_chain, index, how, dropped)


def _exact_draws(result, n: int, seed: int) -> Draws:
    """``n`` paths of an exact result drawn by probability; values as tensors where numeric."""
    paths = [(float(w), vals) for w, vals in result.paths if w > 0]
    p = np.array([w for w, _ in paths], dtype=np.float64)
    idx = np.random.default_rng(seed).choice(len(paths), size=n, p=p / p.sum())
    columns, present = {}, {}
    for name in result.names:
        has = [name in paths[i][1] for i in idx]
        keys = [_to_key(paths[i][1][name]) if h else None for i, h in zip(idx, has)]
        filler = next((k for k in keys if k is not None), None)
        filled = [k if h else filler for k, h in zip(keys, has)]
        t = _objects_to_tensor(filled)
        columns[name] = t if t is not None else filled
        present[name] = None if all(has) else torch.tensor(has)
    how = f"{n} paths drawn by probability (numpy default_rng({seed}))"
    return Draws(columns, present, 1, n, None, how)


# ------------------------------------------------------------------------- observations
def observation_variables(program: ir.Program, addresses) -> dict[str, list[str]]:
    """Observe addresses (in the order given) grouped by statement and named (module
    docstring): variable name -> its addresses."""
    named: dict[str, str] = {}
    for node in ir.walk(program):
        if isinstance(node, ir.Observe):
            named[f"obs@{node.span.line}:{node.span.col}"] = _observed_name(node.value)
    groups: dict[str, list[str]] = {}
    for a in addresses:
        groups.setdefault(choice_name(a), []).append(a)
    names: dict[str, str] = {}
    for statement in groups:
        tail = statement.rsplit("/", 1)[-1]
        prefix = statement[:len(statement) - len(tail)]
        name = named.get(tail)
        names[statement] = statement if name is None else prefix + name
    counts: dict[str, int] = {}
    for v in names.values():
        counts[v] = counts.get(v, 0) + 1
    return {(names[s] if counts[names[s]] == 1 else s): addrs for s, addrs in groups.items()}


def _observed_name(e: Any) -> str | None:
    """The variable an observe observes: ``y`` for ``y``, ``ys`` for ``ys[i]``; else None."""
    while isinstance(e, ir.Index):
        e = e.value
    return e.name if isinstance(e, ir.Var) else None


def data_array(value: Any) -> np.ndarray | None:
    """An observed value as a numpy array (None when it is not numeric data: a value that
    depends on the draw, strings, ragged lists)."""
    if is_batched(value):
        return None
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return t.detach().cpu().numpy()


def stack(arrays: list[np.ndarray], leading: int) -> np.ndarray | None:
    """One array for a group of addresses: each of ``arrays`` is [leading, *shape_a];
    one address -> itself; equal shapes -> [leading, A, *shape]; else the flattened
    values concatenated [leading, sum of sizes]. None when there is nothing."""
    if not arrays:
        return None
    if len(arrays) == 1:
        return arrays[0]
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays, axis=1)
    return np.concatenate([a.reshape(leading, -1) for a in arrays], axis=1)
