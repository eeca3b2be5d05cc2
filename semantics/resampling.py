"""Resampling: choose N ancestors in proportion to the weights.

Invariant (unbiasedness): every scheme draws ancestor counts C_i with E[C_i] = N w_i
(w normalised), so replacing the weighted population by the equally weighted resampled
one preserves the measure in expectation: E[(1/N) sum_j f(x_{a_j})] = sum_i w_i f(x_i).
A *weighted* scheme returns new log weights lw' with its ancestors, under the contract
E[(1/N) sum_j exp(lw'_j) f(x_{a_j})] = sum_i w_i f(x_i).

Schemes are registered by name together with their exact law (``register_resampling``):
the law of the ancestor vector (and new weights) as a finite table, which the exact
checker (testing/validity.py) enumerates, so ``check_proper`` verifies a user's scheme
exactly. The built-in schemes (multinomial, stratified, systematic, residual) are
registered the same way, at the end of this module.

Numerics: cumulative sums are taken in float64 and the uniforms are scaled by the actual
total, so a float32 cumulative sum that ends below 1 can never produce an index out of
range; and an index is never given to a particle of zero weight (a search for u returns
the first i with cdf_i > u, and any overshoot is clamped to the last particle of positive
weight).
"""
from __future__ import annotations

import array
import bisect
import functools
import itertools
import math
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..stdlib import rng


def normalise_log_weights(log_weights: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(normalised weights, log of the sum of the unnormalised weights), stably, in float64.

    The maximum is subtracted in float64 before exponentiating and the weights are divided
    by their own sum. (Never ``exp(lw - logsumexp(lw))``: for log weights above ~1e16 in
    size, ``logsumexp(lw)`` rounds to ``max(lw)``, and such "normalised" weights sum to the
    number of tied maxima.) Every weight zero (all -inf, or no weights): (all-zero weights,
    -inf). A NaN or +inf log weight is the caller's to reject."""
    lw = log_weights.detach().double()
    if lw.numel() == 0:
        return lw.clone(), -math.inf
    m = lw.max()
    if not bool(torch.isfinite(m)):
        return torch.zeros_like(lw), -math.inf
    w = torch.exp(lw - m)
    s = w.sum()
    return w / s, float(m) + math.log(float(s))


def normalised(log_weights: torch.Tensor) -> torch.Tensor:
    """Normalised weights (float64) from log weights; raises if all are -inf."""
    w, log_total = normalise_log_weights(log_weights)
    if log_total == -math.inf:
        raise ValueError("cannot resample: every weight is zero")
    return w


def ess(log_weights: torch.Tensor) -> float:
    """Effective sample size 1 / sum(w^2) of normalised weights (0 when every weight is zero)."""
    w, log_total = normalise_log_weights(log_weights)
    if log_total == -math.inf:
        return 0.0
    return float(1.0 / (w * w).sum())


def _search(w: torch.Tensor, u: torch.Tensor, evenly_spread: bool = False) -> torch.Tensor:
    """Indices i with cdf_{i-1} <= u < cdf_i for uniforms u in [0, 1). ``evenly_spread``:
    u is non-decreasing with about one value per 1/n (systematic, stratified), which
    allows the same indices to be found by counting instead of binary search. Any
    overshoot (u * total rounded up to the total) is clamped to the last particle of
    positive weight."""
    cdf = torch.cumsum(w, 0)
    v = u * cdf[-1]
    if evenly_spread and v.shape[0] >= _COUNT_MIN and v.device.type == "cpu":  # measured on CPU only
        idx = _count_search(w, cdf, v)
        if idx is not None:
            return idx.clamp_(max=_last_positive(w))
    return _sorted_search(cdf, v, w)


def _last_positive(w: torch.Tensor) -> int:
    """The index of the last particle of positive weight (usually the last one: no search
    needed)."""
    return w.shape[0] - 1 if float(w[-1]) > 0 else int(torch.nonzero(w > 0).max())


def _sorted_search(cdf: torch.Tensor, v: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.searchsorted(cdf, v, right=True)``; given the weights w (cdf = cumsum(w)),
    clamped to ``_last_positive(w)``. On the CPU (float64, no gradients) numpy's
    searchsorted gives the same indices, faster for sorted queries: it starts each binary
    search from the previous query's answer, torch's does not (N = 1,000 systematic
    queries: ~14 vs ~40 us, measured here; bench/smc_step_cost.py); the clamp and the
    last weight's test are then done on the arrays too (a torch op with a Python number
    costs a few us: SMC's fixed cost per step)."""
    if cdf.device.type == "cpu" and cdf.dtype == v.dtype == torch.float64 and not (cdf.requires_grad or
                                                                                   v.requires_grad):
        # (the array's own method: np.searchsorted adds three Python calls around it)
        idx = cdf.numpy().searchsorted(v.numpy(), side="right")
        if w is not None:  # (w, like its cumsum, is float64 without gradients)
            wn = w.numpy()
            last = w.shape[0] - 1 if wn[-1] > 0 else int(np.flatnonzero(wn > 0).max())
            np.minimum(idx, last, out=idx)
        return torch.from_numpy(idx)
    idx = torch.searchsorted(cdf, v, right=True)
    return idx if w is None else idx.clamp_(max=_last_positive(w))


_COUNT_MIN = 3072  # below this, a binary search is as fast
_ENDS: dict = {}


def _count_search(w: torch.Tensor, cdf: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """``torch.searchsorted(cdf, v, right=True)`` (the number of i with cdf_i <= v_k) for
    a non-decreasing cdf and non-decreasing queries v spread evenly over [0, cdf[-1]],
    in O(N) vector operations: torch's binary search costs ~0.1 us per query.

    With c_i = #{k : v_k < cdf_i} (a prefix of v, as v is sorted), cdf_i <= v_k exactly
    when k >= c_i, so the answer is the running count of the c_i. Each c_i is guessed
    from the even spread and then checked (and moved) against v itself:
    v[c_i - 1] < cdf_i <= v[c_i], so the result is exactly torch's. None when the guess
    does not settle in a few rounds, or the weights are not finite and non-negative (the
    caller then searches)."""
    if cdf.dtype != v.dtype or not (float(w.min()) >= 0 and math.isfinite(float(cdf[-1]))):
        return None
    n = v.shape[0]
    key = (v.dtype, str(v.device))
    ends = _ENDS.get(key)
    if ends is None:
        ends = _ENDS[key] = torch.tensor([-math.inf, math.inf], dtype=v.dtype, device=v.device)
    ext = torch.cat([ends[:1], v, ends[1:]])  # ext[c] = v[c - 1], ext[c + 1] = v[c]
    # v_k ~ (k + U) T / n with T = cdf[-1] and U = v_0 n / T: c_i ~ ceil((cdf_i - v_0) n / T)
    c = ((cdf - v[0]) * (n / cdf[-1])).ceil_().long().clamp_(0, n)
    for _ in range(4):
        low = ext.index_select(0, c + 1) < cdf  # v[c] < cdf_i: c_i is larger
        high = ext.index_select(0, c) >= cdf  # v[c - 1] >= cdf_i: c_i is smaller
        if not bool((low | high).any()):
            return torch.bincount(c, minlength=n + 1).cumsum_(0)[:n]
        c = c + low.long() - high.long()
    return None


@functools.lru_cache(maxsize=16)
def _grid(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(torch.arange(n), n as a 0-d tensor), float64 on ``device``, cached (never written
    to). Dividing by the 0-d tensor gives the same bits as dividing by the Python number
    n, without torch wrapping the number into a tensor on every call (~4 us on CPU)."""
    return (torch.arange(n, dtype=torch.float64, device=device),
            torch.tensor(float(n), dtype=torch.float64, device=device))


def multinomial(w: torch.Tensor, n: int) -> torch.Tensor:
    """n independent draws from the categorical distribution w."""
    u = rng.rand(n, dtype=torch.float64, device=w.device)
    return torch.sort(_search(w, u)).values


def stratified(w: torch.Tensor, n: int) -> torch.Tensor:
    """One uniform in each stratum [k/n, (k+1)/n)."""
    if _on_numpy(w, n):
        if _on_lists(w, n):
            return _list_search(w.tolist(), rng.rand(n, dtype=torch.float64).tolist(), n)
        return _numpy_search(w, rng.rand(n, dtype=torch.float64).numpy(), n)
    grid, n_t = _grid(n, w.device)
    u = (grid + rng.rand(n, dtype=torch.float64, device=w.device)) / n_t
    return _search(w, u, evenly_spread=True)


def systematic(w: torch.Tensor, n: int) -> torch.Tensor:
    """One shared uniform offset: u_k = (k + U) / n."""
    if _on_numpy(w, n):
        if _on_lists(w, n):
            return _list_search(w.tolist(), rng.rand((), dtype=torch.float64).item(), n)
        return _numpy_search(w, rng.rand((), dtype=torch.float64).item(), n)
    grid, n_t = _grid(n, w.device)
    u = (grid + rng.rand((), dtype=torch.float64, device=w.device)) / n_t
    return _search(w, u, evenly_spread=True)


def _on_numpy(w: torch.Tensor, n: int) -> bool:
    """Whether ``_numpy_search`` serves this draw: CPU float64 weights without gradients,
    fewer than ``_COUNT_MIN`` draws (where ``_search`` would binary-search)."""
    return n < _COUNT_MIN and w.device.type == "cpu" and w.dtype == torch.float64 and not w.requires_grad


_LIST_MAX = 64  # at most this many particles and draws: the search runs on Python lists


def _on_lists(w: torch.Tensor, n: int) -> bool:
    """Whether ``_list_search`` serves a draw ``_on_numpy`` would serve: a small population
    (at most ``_LIST_MAX`` particles and draws)."""
    return n <= _LIST_MAX and w.shape[0] <= _LIST_MAX


@functools.lru_cache(maxsize=16)
def _float_grid(n: int) -> list:
    """[0.0, 1.0, ..., n - 1.0] (``k + u`` is the same sum for k int or float)."""
    return [float(k) for k in range(n)]


def _list_search(w: list, offsets, n: int) -> torch.Tensor:
    """``_numpy_search`` on Python floats, for a small population: the same float64
    operations in the same order (a sequential cumulative sum, then ``(k + offset) / n *
    total``, each correctly rounded), so the same indices (``bisect_right`` is
    ``searchsorted(side="right")``). Between the language model's large kernels each numpy
    call costs several times its warm cost (cold code): on lists the search of 32
    particles takes about a third of its time within an SMC step. ``w``: the normalised
    weights (a list); ``offsets``: one uniform (systematic) or a list of n (stratified)."""
    cdf = list(itertools.accumulate(w))
    total = cdf[-1]
    grid = _float_grid(n)
    if type(offsets) is float:
        v = [(k + offsets) / n * total for k in grid]
    else:
        v = [(k + u) / n * total for k, u in zip(grid, offsets)]
    idx = list(map(bisect.bisect_right, itertools.repeat(cdf, n), v))
    last = len(w) - 1
    if not w[last] > 0:  # (the last particle of positive weight: the clamp of any overshoot)
        last = max(i for i, x in enumerate(w) if x > 0)
    if idx[-1] > last:
        idx = [i if i <= last else last for i in idx]
    return torch.frombuffer(array.array("q", idx), dtype=torch.long)


def normalised_draw(draw: Callable, w: torch.Tensor, s: torch.Tensor, n: int) -> torch.Tensor:
    """``draw(w / s, n)`` (``s``: the sum of the weights ``w``, a 0-d tensor): for the
    built-in systematic or stratified draw of a small CPU population the weights are
    divided as Python floats (the same correctly rounded quotients as the tensor
    division) and searched on lists (``_list_search``), without a tensor op for the
    division."""
    if (draw is systematic or draw is stratified) and _on_lists(w, n) and _on_numpy(w, n):
        total = s.item()
        wl = [x / total for x in w.tolist()]
        if draw is systematic:
            return _list_search(wl, _one_uniform(), n)
        return _list_search(wl, rng.rand(n, dtype=torch.float64).tolist(), n)
    return draw(w / s, n)


class _Buffers(threading.local):
    uniform = None  # this thread's 0-d float64 CPU tensor for ``_one_uniform``


_BUFFERS = _Buffers()


def _one_uniform() -> float:
    """``rng.rand((), dtype=torch.float64).item()``: the same number from the same
    generator state (``torch.rand`` is ``empty`` then ``uniform_``), drawn into a reused
    0-d tensor: no allocation and no dtype/device arguments to parse."""
    buf = _BUFFERS.uniform
    if buf is None:
        buf = _BUFFERS.uniform = torch.empty((), dtype=torch.float64)
    return buf.uniform_(generator=rng.generator("cpu")).item()


@functools.lru_cache(maxsize=16)
def _np_grid(n: int) -> np.ndarray:
    """np.arange(n) in float64 (read only)."""
    return np.arange(n, dtype=np.float64)


def _numpy_search(w: torch.Tensor, offsets, n: int) -> torch.Tensor:
    """``_search(w, (arange(n) + offsets) / n, evenly_spread=True)`` for a small draw on the
    CPU, on numpy arrays: the same float64 operations in the same order (a sequential
    cumulative sum, elementwise +, / and *, each correctly rounded), so the same indices,
    without a torch op per step (each costs a few us: most of a small SMC step's
    resampling). tests/test_lm_overhead.py checks it against the torch path."""
    grid = _np_grid(n)
    wn = w.numpy()
    cdf = wn.cumsum()
    v = (grid + offsets) / n * cdf[-1]
    idx = cdf.searchsorted(v, side="right")
    last = wn.shape[0] - 1 if wn[-1] > 0 else int(np.flatnonzero(wn > 0).max())
    np.minimum(idx, last, out=idx)
    return torch.from_numpy(idx)


def residual_counts(w: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(floor(n w_i), n w_i): residual resampling's deterministic copies, w normalised
    here, in float64. An n w_i within rounding of an integer counts as that integer:
    w_i = 1/49 gives 49 * w_i = 0.999..., whose floor would lose the particle's copy
    (equal weights would then be resampled multinomially instead of kept)."""
    w = w.double()
    nw = w * (n / w.sum())
    counts = torch.floor(nw)
    near = torch.round(nw)
    counts = torch.where((nw - near).abs() <= 1e-12 * near.clamp(min=1.0), near, counts)
    if float(counts.sum()) > n:  # never more than n copies
        counts = torch.floor(nw)
    return counts.long(), nw


def residual(w: torch.Tensor, n: int) -> torch.Tensor:
    """floor(n w_i) copies of each i, the remaining R draws multinomial on the residuals."""
    counts, nw = residual_counts(w, n)
    r = n - int(counts.sum())
    base = torch.repeat_interleave(torch.arange(w.shape[0], device=w.device), counts)
    if r > 0:
        res = (nw - counts.double()).clamp_(min=0)
        extra = multinomial(res / res.sum(), r)
        base = torch.cat([base, extra])
    return torch.sort(base).values


@dataclass(frozen=True)
class Scheme:
    """A registered resampling scheme.

    ``draw(w, n)``: from normalised float64 weights w (a tensor [N]), n ancestor indices
    (a long tensor), or for a ``weighted`` scheme the pair (ancestors, new log weights).
    ``law(w, n)`` (w a list of floats summing to 1): the exact distribution of what draw
    returns, a dict outcome -> probability; an outcome is the tuple of ancestors (as
    ``tuple(draw(w, n).tolist())``), or for a weighted scheme the pair (ancestors, log
    weights) of tuples."""
    draw: Callable
    law: Callable
    weighted: bool = False


#: name -> Scheme; and name -> its draw (what SMC calls), kept in step by the functions below
RESAMPLING: dict[str, Scheme] = {}
SCHEMES: dict[str, Callable] = {}


def register_resampling(name: str, draw: Callable, law: Callable, *, weighted: bool = False,
                        replace: bool = False) -> None:
    """Make ``name`` a resampling scheme (``resampling=name`` in SMC, resample-move and
    ``Model.run``; ``smc_algorithm(n, resampling=name)`` in the exact checker). See
    ``Scheme`` for ``draw``, ``law`` and ``weighted``."""
    if not isinstance(name, str) or not name:
        raise ValueError("a resampling scheme needs a non-empty name")
    if name in RESAMPLING and not replace:
        raise ValueError(f"resampling scheme '{name}' is already registered (pass replace=True to replace it)")
    RESAMPLING[name] = Scheme(draw, law, weighted)
    SCHEMES[name] = draw


def unregister_resampling(name: str) -> None:
    """Remove a scheme registered with ``register_resampling``."""
    RESAMPLING.pop(name, None)
    SCHEMES.pop(name, None)


def resample(log_weights: torch.Tensor, scheme: str = "systematic", n: int | None = None):
    """Ancestor indices (long, on the weights' device) drawn by ``scheme`` (a weighted
    scheme: the pair (ancestors, new log weights))."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling scheme '{scheme}' (choose from {', '.join(SCHEMES)})")
    w = normalised(log_weights)
    return SCHEMES[scheme](w, n if n is not None else w.shape[0])


def is_weighted(scheme: str) -> bool:
    """Whether ``scheme`` returns new log weights with its ancestors."""
    return scheme in RESAMPLING and RESAMPLING[scheme].weighted


def log_mean_exp(log_weights: torch.Tensor) -> float:
    lw = log_weights.double()
    m = lw.max()
    if not torch.isfinite(m):
        return -math.inf
    return float(m + torch.log(torch.exp(lw - m).mean()))


def without_replacement(w: torch.Tensor, n: int, u: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Select n of the M = len(w) particles *without replacement* (Fearnhead & Clifford
    2003, "optimal resampling"), with weights that keep the population proper.

    With p = w / sum(w), let c solve sum_i min(1, p_i / c) = n. A particle with p_i >= c
    is kept for certain with its own weight p_i; the others are kept with probability
    p_i / c (< 1) by one systematic sweep over their cumulative sum (points U, U + 1, ...,
    so no particle is picked twice) and weighted c. Hence E[new_i 1{i kept}] = p_i for
    every i (unbiased, like E[count_i] = n w_i for the with-replacement schemes), exactly
    n distinct particles are kept, and no weight is ever given to a particle of weight
    zero. When at most n particles have positive weight they are all kept with their own
    weights, and the remaining slots go to the first zero-weight particles (weight 0).

    Returns (indices, log_weights): n distinct indices in increasing order and log(n *
    new_i), so that E[(1/n) sum_k exp(log_weights_k) f(x_{indices_k})] = sum_i p_i f(x_i)
    (the contract of a weighted resampler in ``SMCHandler._resample``; an unweighted
    scheme's log weights would be all 0). ``u`` fixes the sweep's uniform (for tests).
    """
    w = w.double()
    M = w.shape[0]
    if not 1 <= n <= M:
        raise ValueError(f"cannot select {n} of {M} particles without replacement")
    p = w / w.sum()
    device = p.device
    positive = p > 0
    n_pos = int(positive.sum())
    if n_pos <= n:  # keep every particle of positive weight; fill with zero-weight ones
        idx = torch.cat([torch.nonzero(positive).flatten(), torch.nonzero(~positive).flatten()[: n - n_pos]])
        idx = torch.sort(idx).values
        return idx, torch.log(n * p[idx])
    ps, order = torch.sort(p, descending=True, stable=True)
    tail = torch.flip(torch.cumsum(torch.flip(ps, (0,)), 0), (0,))  # tail[a] = sum(ps[a:])
    cs = tail[:n] / torch.arange(n, 0, -1, dtype=torch.float64, device=device)  # c if the a largest are kept
    ok = ps[:n] < cs  # true from the right number of certainly-kept particles on
    a = int(torch.argmax(ok.to(torch.int8))) if bool(ok.any()) else n - 1
    c = cs[a]
    keep = order[:a]
    rest = torch.sort(order[a:]).values
    R = n - a
    cum = torch.cumsum(p[rest] / c, 0)
    cum = (cum * (R / cum[-1])).clamp_(max=R)
    cum[-1] = R  # sum of the inclusion probabilities: exactly R points land
    if u is None:
        U = rng.rand((), dtype=torch.float64, device=device)
    else:
        U = torch.tensor(float(u), dtype=torch.float64, device=device)
    hits = torch.ceil(cum - U)  # points U + k below cum_j
    counts = torch.diff(hits, prepend=torch.zeros(1, dtype=torch.float64, device=device))
    chosen = rest[counts > 0]
    if chosen.shape[0] < R:  # float rounding only (two points in one gap of width <= 1)
        left = rest[counts <= 0]
        extra = left[torch.argsort(p[left], descending=True, stable=True)[: R - chosen.shape[0]]]
        chosen = torch.cat([chosen, extra])
    idx = torch.sort(torch.cat([keep, chosen])).values
    certain = torch.zeros(M, dtype=torch.bool, device=device)
    certain[keep] = True
    new = torch.where(certain[idx], p[idx], c)
    return idx, torch.log(n * new)


# ------------------------------------------------------------------- the exact laws
def _cdf(w: list[float]) -> list[float]:
    """The normalised cdf, exactly 1 from the last particle of positive weight on (a
    rounded cdf could end below 1 and give a trailing zero-weight particle some mass)."""
    total = math.fsum(w)
    last = max(i for i, x in enumerate(w) if x > 0)
    c, out = 0.0, []
    for i, x in enumerate(w):
        c += x
        out.append(c / total if i < last else 1.0)
    return out


def _find(c: list[float], u: float) -> int:
    return next((i for i, ci in enumerate(c) if u < ci), len(c) - 1)


def multinomial_law(w: list[float], n: int) -> dict[tuple, float]:
    """n independent categorical draws, sorted."""
    out: dict = defaultdict(float)
    for combo in itertools.product(range(len(w)), repeat=n):
        p = math.prod(w[i] for i in combo)
        if p > 0:
            out[tuple(sorted(combo))] += p
    return dict(out)


def stratified_law(w: list[float], n: int) -> dict[tuple, float]:
    """Independent draws, the k-th uniform on [k/n, (k+1)/n): P(a_k = i) is the overlap of
    that stratum with particle i's cdf interval, times n."""
    c = _cdf(w)
    lows = [0.0] + c[:-1]
    marg = [[max(0.0, min((k + 1) / n, c[i]) - max(k / n, lows[i])) * n for i in range(len(w))] for k in range(n)]
    out: dict = defaultdict(float)
    for combo in itertools.product(range(len(w)), repeat=n):
        p = math.prod(marg[k][i] for k, i in enumerate(combo))
        if p > 0:
            out[combo] += p
    return dict(out)


def systematic_law(w: list[float], n: int) -> dict[tuple, float]:
    """One uniform U: the ancestors are piecewise constant in U, with cuts where some
    (k + U) / n crosses a cdf value."""
    c = _cdf(w)
    cuts = sorted({0.0, 1.0} | {n * ci - k for ci in c for k in range(n) if 0.0 < n * ci - k < 1.0})
    out: dict = defaultdict(float)
    for a, b in zip(cuts, cuts[1:]):
        if b > a:
            out[tuple(_find(c, (k + (a + b) / 2) / n) for k in range(n))] += b - a
    return dict(out)


def residual_law(w: list[float], n: int) -> dict[tuple, float]:
    """floor(n w_i) copies of each i, then a multinomial law on the residuals."""
    counts, nw = residual_counts(torch.tensor(w, dtype=torch.float64), n)
    counts, nw = counts.tolist(), nw.tolist()
    base = [i for i, k in enumerate(counts) for _ in range(k)]
    r = n - sum(counts)
    if r == 0:
        return {tuple(base): 1.0}
    res = [max(0.0, x - k) for x, k in zip(nw, counts)]
    out: dict = defaultdict(float)
    s = sum(res)
    for extra, p in multinomial_law([x / s for x in res], r).items():
        out[tuple(sorted(base + list(extra)))] += p
    return dict(out)


for _name, _draw, _law in (("multinomial", multinomial, multinomial_law), ("stratified", stratified, stratified_law),
                           ("systematic", systematic, systematic_law), ("residual", residual, residual_law)):
    register_resampling(_name, _draw, _law)
