"""Exact checks of MH with custom proposal kernels (``ppl.inference.mh_proposals``).

A sibling of ``ppl.testing.validity.mh_kernel_check``: on a finite program, the
transition matrix K of one MH step with the proposal function ``kernel`` is built
exactly by enumerating every draw of the step (``EnumeratingMHRandomness``: the
proposal's own draws, prior draws of fresh choices, accept/reject) from every trace of
the program; pi comes from exact enumeration. Then pi K = pi and detailed balance
must hold to float64 rounding.

``batched_kernel_check`` checks that chains run as one batch are independent chains of
that same kernel: the exact two-chain matrix equals K (x) K for every pair of traces,
including pairs whose proposals or model runs take different branches (the
interpreter splits the batch there).
"""
from __future__ import annotations

import itertools
from collections import defaultdict

import torch

from ..inference.mh_proposals import ProposalKernel
from ..semantics import gfi
from .validity import EnumeratingMHRandomness, KernelCheck, _key, enumerate_outcomes, mh_kernel_check


def _kernel_step(kernel: str, hastings: bool, kernel_cls):
    """A ``step`` for ``mh_kernel_check``: one custom-kernel MH step."""
    built: dict = {}

    def step(interp, entry, data, state, rnd):
        k = built.get(id(interp))
        if k is None:
            k = built[id(interp)] = kernel_cls(interp, entry, kernel, hastings=hastings)
        new, _ = k.step(data, state, "cpu", rnd)
        return new
    return step


def proposal_kernel_check(model, kernel: str, data: dict | None = None, *, hastings: bool = True,
                          kernel_cls=ProposalKernel) -> KernelCheck:
    """The exact K of MH with the proposal function ``kernel`` on a finite program, with
    pi K and detailed balance (``KernelCheck``). ``kernel_cls`` substitutes a modified
    ``ProposalKernel`` (to check that a broken one fails)."""
    return mh_kernel_check(model, data, step=_kernel_step(kernel, hastings, kernel_cls))


def _traces(model, data):
    exact = model.run("enumerate", data)
    out = {}
    for _, vals in exact.paths:
        trace = {a: v for a, v in vals.items() if a != "return"}
        out[tuple(sorted((a, _key(v)) for a, v in trace.items()))] = trace
    return out


def _batch_state(interp, entry, data, traces: list[dict]):
    """The traced state of len(traces) chains, chain c in trace c (``gfi.generate``)."""
    addrs = list(dict.fromkeys(a for t in traces for a in t))
    values, present = {}, {}
    for a in addrs:
        fill = next(t[a] for t in traces if a in t)
        values[a] = torch.tensor([t.get(a, fill) for t in traces])
        present[a] = torch.tensor([a in t for t in traces])
    return gfi.generate(gfi.ModelRun(interp, entry, data), gfi.Choices(values, present))[0]


def _row_key(state, c: int) -> tuple:
    return tuple(sorted((a, _key(state.values[a][c].tolist())) for a in state.values if bool(state.present[a][c])))


def _spread(items: list, n: int) -> list:
    """n of the items, evenly spread (all of them if there are fewer)."""
    if n >= len(items):
        return items
    return [items[(i * len(items)) // n] for i in range(n)] if n > 0 else []


def batched_kernel_check(model, kernel: str, data: dict | None = None, *, max_pairs: int | None = None,
                         kernel_cls=ProposalKernel) -> float:
    """max |K2((x1, x2), (y1, y2)) - K(x1, y1) K(x2, y2)| over pairs of traces (all of
    them, or ``max_pairs`` pairs of distinct traces, evenly spread, half of them of
    different shapes where there are such), K2 the exact kernel of two chains run as one
    batch, K that of one chain."""
    data = data or {}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        K1 = proposal_kernel_check(model, kernel, data, kernel_cls=kernel_cls).K
        interp = model.interpreter()
        prepared = model.prepare_data(model.bind((), data), "cpu")
        k = kernel_cls(interp, model.entry, kernel)
        traces = _traces(model, data)
        worst = 0.0
        pairs = list(itertools.product(traces.items(), repeat=2))
        if max_pairs is not None:  # half of them from traces of different shapes, if any
            shape = lambda p: tuple(a for a, _ in p[0])  # noqa: E731
            apart = [(p, q) for p, q in pairs if shape(p) != shape(q)]
            alike = [(p, q) for p, q in pairs if shape(p) == shape(q) and p[0] != q[0]]
            n_apart = min(len(apart), max_pairs // 2 if alike else max_pairs)
            pairs = _spread(apart, n_apart) + _spread(alike, max_pairs - n_apart)
        for (x1, t1), (x2, t2) in pairs:
            state = _batch_state(interp, model.entry, prepared, [t1, t2])
            K2: dict = defaultdict(float)
            for prob, new in enumerate_outcomes(lambda rnd: k.step(prepared, state, "cpu", rnd)[0],
                                                randomness_cls=EnumeratingMHRandomness):
                K2[(_row_key(new, 0), _row_key(new, 1))] += prob
            for y1, y2 in itertools.product(traces, repeat=2):
                expected = K1.get((x1, y1), 0.0) * K1.get((x2, y2), 0.0)
                worst = max(worst, abs(K2.get((y1, y2), 0.0) - expected))
            assert set(K2) <= set(itertools.product(traces, repeat=2)), "a chain left the trace space"
    finally:
        torch.set_default_dtype(previous)
    return worst
