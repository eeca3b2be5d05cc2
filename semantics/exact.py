"""The exact semantics: the measure a finite program denotes, by enumeration.

For a program whose random choices all have finite support, the denotation of a call
is a finite measure on return values: a sum over execution paths of
``prod(choice probabilities) * prod(likelihood factors)`` at the path's return value.
``enumerate_paths`` lists those paths by re-execution: a path is identified by the
indices of its choices within their supports; running the program with a prefix of
indices fixed and the remaining choices at index 0 yields one path, and the unexplored
alternatives at each new choice point are pushed for later. Every path is visited
exactly once, so the sum of path weights is the evidence Z exactly.

Arithmetic is exact (``fractions.Fraction``) when every probability and factor is
rational: float literals are read as the decimals they spell, integer division is
exact. A factor ``exp(e)`` with e != 0, or a continuous density, makes weights floats.
A path whose weight hits 0 (a failed ``condition``) is cut at once.
"""
from __future__ import annotations

import math
import time
from fractions import Fraction
from collections import Counter
from typing import Any

import numpy as np
import torch

from . import ir
from .dist_values import broadcast_value_error, empty_parameter_error
from .errors import InfiniteSupportError, PPLError, PPLRuntimeError, ZeroEvidenceError
from .interpreter import Interpreter
from .sampling import drive
from .values import Particles, Vector, to_python, to_vector, truthy
from ..stdlib.progress import progress_bar
from ..stdlib import printing


class _Pruned(Exception):
    """Raised inside a run to stop a path whose weight became zero."""

    def __init__(self, span=None):
        super().__init__()
        self.span = span


class _PathHandler:
    def __init__(self, prefix: list[int]):
        self.prefix = prefix
        self.taken: list[int] = []
        self.sizes: list[int] = []
        self.weight: Any = 1
        self.values: dict[str, Any] = {}

    def _mul(self, p, span=None):
        if p != p:
            raise PPLRuntimeError("a likelihood or factor is NaN",
                                  hint="check the observed value and the distribution's parameters")
        if p == 0:
            self.weight = 0
            raise _Pruned(span)
        self.weight = self.weight * p

    def sample(self, eff):
        try:
            support = eff.dist.exact_support()
        except InfiniteSupportError as err:
            raise err.with_span(eff.span)
        nonzero = [(v, p) for v, p in support if p != 0]
        if not nonzero:
            if support:  # a choice of total mass 0 (a constraint nothing satisfies here): weight 0
                self._mul(0, eff.span)
            raise PPLRuntimeError(f"{eff.dist.spec.name}: empty support", eff.span)
        support = nonzero
        k = len(self.taken)
        i = self.prefix[k] if k < len(self.prefix) else 0
        self.taken.append(i)
        self.sizes.append(len(support))
        value, p = support[i]
        if getattr(getattr(eff.dist, "spec", None), "value_event_dim", 0) >= 1 and isinstance(value, (list, tuple)):
            value = to_vector(value)  # a vector-valued choice (multinomial): a vector, as under sampling
        self.values[eff.addr] = value
        self._mul(p)
        return value

    def observe(self, eff):
        dist = eff.dist
        self._mul(_observe_prob(dist.spec, to_python(eff.value), dist.python_args()), eff.span)

    def factor(self, eff):
        v = to_python(eff.value)
        if not isinstance(v, (int, float, Fraction)):
            raise PPLRuntimeError(f"factor needs a number, got {v!r}", eff.span)
        if v != v:
            raise PPLRuntimeError("factor received NaN", eff.span, "check the expression for 0/0 or log of a negative")
        if v == 0:
            return
        if v == -math.inf:
            self._mul(0, eff.span)
        try:
            w = math.exp(float(v))
        except OverflowError:
            w = math.inf
        if w == math.inf:
            raise PPLRuntimeError(f"factor {float(v):g} is too large: exp of it overflows a float weight", eff.span,
                                  "exact enumeration keeps weights as numbers; use importance sampling")
        self._mul(w)

    def condition(self, eff):
        if not truthy(eff.value):
            self._mul(0, eff.span)


def _observe_prob(spec, value, args):
    """P(value) under the distribution ``spec(*args)``. As in the sampling semantics, a
    list observed under a distribution of scalars (``observe flips ~ bernoulli(p)``,
    ``observe ys ~ bernoulli(ps)``) is a list of independent observations, paired
    elementwise with list parameters (length 1 broadcasts): the product of their
    probabilities."""
    if spec.value_event_dim == 0 and not spec.index_valued:
        elementwise = [ev == 0 and isinstance(a, (list, tuple)) for a, ev in zip(args, spec.param_event_dims)]
        seqs = [a for a, e in zip(args, elementwise) if e]
        for name, a, e in zip(spec.params, args, elementwise):
            if e and len(a) == 0:  # flip([]): no distribution at all (not one of no observations)
                raise empty_parameter_error(spec, name, [0])
        if isinstance(value, (list, tuple)):
            seqs.append(value)
        if seqs:
            n = max(len(x) for x in seqs)
            if any(len(x) not in (1, n) for x in seqs):
                raise PPLRuntimeError(f"{spec.name}: the observed values and the parameters have different lengths")
            got = len(value) if isinstance(value, (list, tuple)) else None
            if n > 1 and got != n:  # the value would be broadcast: scored n times
                raise broadcast_value_error(spec, [got] if got is not None else [], [n])

            def at(x, i):
                return x[i if len(x) > 1 else 0]
            p = 1
            for i in range(n):
                vi = at(value, i) if isinstance(value, (list, tuple)) else value
                p = p * _observe_prob(spec, vi, [at(a, i) if e else a for a, e in zip(args, elementwise)])
            return p
    return spec.exact_prob(value, *args)


def exact_data(data: dict) -> dict:
    """Data for the exact semantics: tensors and arrays (also inside lists) become
    ``Vector``s of Python numbers, so they stay vectors (elementwise arithmetic)."""
    return {k: _exact_datum(v) for k, v in data.items()}


def _exact_datum(v: Any) -> Any:
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return to_vector(v.tolist())
    if isinstance(v, (list, tuple)) and not isinstance(v, Vector):
        return type(v)(_exact_datum(x) for x in v)
    return v


def _hashable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    return v


DEFAULT_MAX_PATHS = 1_000_000
DEFAULT_MAX_SECONDS = 300.0
_ALTERNATIVES = ("this model has too many execution paths to enumerate; use a sampling method instead: "
                 "importance, smc, mh or tempering (e.g. --method smc), or raise {what}")


def enumerate_paths(program: ir.Program, builtins: dict, entry: str, data: dict, *,
                    max_paths: int = DEFAULT_MAX_PATHS, max_depth: int | None = None,
                    max_iterations: int | None = None, interp=None,
                    max_seconds: float | None = DEFAULT_MAX_SECONDS, progress: bool | None = None):
    """All execution paths of ``entry(**data)``: a list of (weight, values), where values
    maps "return" and each choice address to its value on that path. Zero-weight paths
    are dropped. ``interp``: the exact interpreter to run (default: a new one for
    ``program``; ``Model.interpreter(exact=True)`` passes a model's own, e.g. one that
    rewrites observed values).

    Bounded: more than ``max_paths`` paths, or more than ``max_seconds`` seconds (None:
    no time bound), is an error naming the sampling methods. ``progress``: a progress
    counter on stderr (None: only on a terminal, and only after 2 seconds)."""
    if interp is None:
        interp = Interpreter(program, builtins, exact=True, max_depth=max_depth, max_iterations=max_iterations)
    data = exact_data(data)
    ctx = Particles.all(1)
    paths = []
    stack: list[list[int]] = [[]]
    visited = 0
    cuts: Counter = Counter()  # where zero-weight paths were cut
    start = time.monotonic()
    printed = printing.path_output()  # None unless the model prints (stdlib.printing)
    try:
        with progress_bar(progress, desc="enumerate", unit=" paths") as bar:  # a counter of visited paths
            while stack:
                prefix = stack.pop()
                visited += 1
                _check_bounds(visited, len(stack), start, max_paths, max_seconds)
                bar.update(1)
                _visit(interp, entry, data, ctx, prefix, stack, paths, cuts, printed)
    finally:  # (also when a path fails: its output helps to see why)
        if printed is not None:
            printed.emit(_probability_text)
    if not paths:
        span, k = cuts.most_common(1)[0] if cuts else (None, 0)
        where = f"all {visited} paths were cut here" if k == visited else \
            f"{k} of the {visited} paths were cut here, the rest at " + \
            ", ".join(sp.location() for sp in cuts if sp is not span and sp is not None)
        raise ZeroEvidenceError(
            "every path has weight zero: the conditions/observations are impossible", span,
            where + "; check the data and the conditions")
    return paths


def _probability_text(p) -> str:
    """A path's probability as printed: a short fraction, else 4 significant digits."""
    if isinstance(p, Fraction) and len(str(p)) <= 9:
        return str(p)
    return f"{float(p):.4g}"


def _check_bounds(visited: int, pending: int, start: float, max_paths: int, max_seconds: float | None) -> None:
    """The enumeration's bounds on paths and time, as errors that name the alternatives."""
    if visited > max_paths:
        raise PPLRuntimeError(f"exact enumeration exceeded {max_paths:,} paths ({pending:,} more were waiting)",
                              hint=_ALTERNATIVES.format(what="max_paths (-o max_paths=N)"))
    if max_seconds is not None:
        elapsed = time.monotonic() - start
        if elapsed > max_seconds:
            raise PPLRuntimeError(
                f"exact enumeration stopped after {elapsed:.1f} s (max_seconds={max_seconds:g}): {visited:,} paths "
                f"visited and at least {pending:,} more to go",
                hint=_ALTERNATIVES.format(what="max_seconds (-o max_seconds=S)"))


def _visit(interp, entry, data, ctx, prefix, stack, paths, cuts, printed=None) -> None:
    """Run the path ``prefix`` (the rest at index 0): record it, or where it was cut,
    and push the unexplored alternatives of every choice it made beyond the prefix.
    ``printed``: the ``printing.PathOutput`` collecting the path's ``print`` lines."""
    h = _PathHandler(prefix)
    if printed is not None:
        printed.begin()
    try:
        ret = drive(interp.run(entry, data, ctx), h)
        h.values["return"] = _hashable(ret)
        paths.append((h.weight, {k: _hashable(v) for k, v in h.values.items()}))
    except _Pruned as cut:
        cuts[cut.span] += 1
    finally:
        if printed is not None:
            printed.end(h.weight if h.weight != 0 else None)
    # push the unexplored alternatives of every choice made beyond the prefix
    for j in range(len(prefix), len(h.taken)):
        for alt in range(h.sizes[j] - 1, 0, -1):
            stack.append(h.taken[:j] + [alt])
