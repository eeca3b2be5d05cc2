"""``print(...)`` inside a model: readable, bounded output that never changes a result.

The prelude's ``print`` (``stdlib.prelude``) formats its arguments and hands the lines to
the run's ``RunLog``; this module decides where they go and how many:

* **Per run.** ``Model.run`` opens a log for each run of a model that calls ``print``
  (``run_output``): at most ``MAX_LINES`` lines, then one line saying how many more were
  left out. Outside a run (no log) ``print`` does nothing.
* **Batched methods** (importance, smc, MCMC, ...): a ``print`` reached by M particles
  writes one line per particle for the first ``MAX_PARTICLES`` of them,
  ``[particle 3] x = 1.25``, then ``... (M - K more particles)``; a value every particle
  shares is written once, ``[1000 particles] ...``. MCMC methods say ``chain`` (every
  evaluation of the model prints: each MH step, each leapfrog step of NUTS, until the
  run's budget is spent).
* **Exact enumeration by paths**: each path's lines are kept until the enumeration ends
  and written with the path's number and posterior probability, ``[path 2 | p=1/4] ...``
  (a path cut by a zero-probability condition or observation: ``p=0, cut``). A path is a
  whole execution, so a ``print`` before a branch shows on every path through it. Under
  the elimination strategy the program is run with values fixed for tabulation, not
  executed path by path, so nothing is printed and one line says so.
* **Where**: ``sys.stdout`` as it is at the time of writing (a notebook's cell output,
  the terminal), or the stream of ``redirected(stream)``: the CLI's ``--json`` sends model
  output to stderr, so stdout holds exactly one JSON object.

Printing only reads values: it draws nothing, forces no delayed or enumerated (lazy)
value, and never raises (a value it cannot read, e.g. while a graph is being traced, is
shown as ``<...>``), so results are the same with and without ``print``. Internal
re-executions that are not the run itself (the dependency analysis, elimination's
tabulation) are ``silenced``.
"""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TextIO

#: at most this many printed lines per run (then one line counting the rest)
MAX_LINES = 200
#: a batched ``print`` writes the values of at most this many particles
MAX_PARTICLES = 5

_local = threading.local()


class RunLog:
    """The printed output of one run: a line budget, and the paths' buffers during exact
    enumeration."""

    def __init__(self, stream: TextIO | None, max_lines: int, max_particles: int, unit: str = "particle"):
        self.stream = stream
        self.unit = unit  # what a batch row is: "particle", or "chain" for MCMC
        self.max_lines = max_lines
        self.max_particles = max_particles
        self.written = 0
        self.dropped = 0
        self.silenced = 0
        self.path_lines: list[str] | None = None  # the current enumerated path's lines

    @property
    def in_path(self) -> bool:
        """Whether lines go to an enumerated path's buffer (exact enumeration)."""
        return self.path_lines is not None

    def line(self, text: str) -> None:
        """One printed line: to the current path's buffer, or written (within budget)."""
        if self.silenced:
            return
        if self.path_lines is not None:
            self.path_lines.append(text)
        else:
            self.write(text)

    def write(self, text: str) -> None:
        if self.written >= self.max_lines:
            self.dropped += 1
            return
        stream = self.stream or _stream()
        stream.write(text + "\n")
        self.written += 1

    def close(self) -> None:
        if self.dropped:
            self.write_note(f"[print] ... {self.dropped} more lines not shown (at most {self.max_lines} per run: "
                            "ppl.stdlib.printing.MAX_LINES)")
        stream = self.stream or _stream()
        flush = getattr(stream, "flush", None)
        if flush is not None:
            flush()

    def write_note(self, text: str) -> None:
        """A line about the output itself, outside the budget."""
        (self.stream or _stream()).write(text + "\n")


def _stream() -> TextIO:
    return getattr(_local, "stream", None) or sys.stdout


def current() -> RunLog | None:
    """The log of the run going on in this thread, or None (``print`` then does nothing)."""
    return getattr(_local, "log", None)


def active() -> bool:
    """Whether a ``print`` now would write (or buffer) anything."""
    log = current()
    return log is not None and not log.silenced


@contextmanager
def run_output(enabled: bool = True, *, stream: TextIO | None = None, max_lines: int | None = None,
               max_particles: int | None = None, unit: str = "particle") -> Iterator[RunLog | None]:
    """The log of one run (``Model.run`` opens it when the model calls ``print``). A run
    inside another's (nested inference) writes into the outer run's log. ``unit``: the
    label of a batch row ("particle"; "chain" for MCMC methods)."""
    outer = current()
    if not enabled or outer is not None:
        yield outer
        return
    log = RunLog(stream, MAX_LINES if max_lines is None else max_lines,
                 MAX_PARTICLES if max_particles is None else max_particles, unit)
    _local.log = log
    try:
        yield log
    finally:
        _local.log = None
        log.close()


@contextmanager
def redirected(stream: TextIO) -> Iterator[None]:
    """Model output goes to ``stream`` in this block (the CLI's ``--json``: stderr)."""
    previous = getattr(_local, "stream", None)
    _local.stream = stream
    try:
        yield
    finally:
        _local.stream = previous


@contextmanager
def silenced() -> Iterator[None]:
    """No model output in this block (re-executions that are not the run itself)."""
    log = current()
    if log is not None:
        log.silenced += 1
    try:
        yield
    finally:
        if log is not None:
            log.silenced -= 1


@contextmanager
def unsilenced() -> Iterator[None]:
    """Model output again inside a ``silenced`` block (the path enumeration that follows
    an analysis)."""
    log = current()
    saved = log.silenced if log is not None else 0
    if log is not None:
        log.silenced = 0
    try:
        yield
    finally:
        if log is not None:
            log.silenced = saved


class PathOutput:
    """The printed lines of an exact enumeration, path by path (``semantics.exact``):
    ``begin()`` before a path runs, ``end(weight)`` after (weight None: the path was cut),
    ``emit(fmt)`` at the end writes every path's lines labelled with its number and
    posterior probability (``fmt`` formats the probability)."""

    def __init__(self, log: RunLog):
        self.log = log
        self.paths: list[tuple[list[str], Any]] = []
        self.outer: list[str] | None = None

    def begin(self) -> None:
        self.outer = self.log.path_lines
        self.log.path_lines = []

    def end(self, weight: Any) -> None:
        lines, self.log.path_lines = self.log.path_lines, self.outer
        if lines:
            self.paths.append((len(self.paths), lines, weight))
        else:
            self.paths.append((len(self.paths), None, weight))

    def emit(self, fmt: Callable[[Any], str]) -> None:
        total = sum(w for _, _, w in self.paths if w is not None)
        for k, lines, weight in self.paths:
            if not lines:
                continue
            if weight is None:
                label = f"[path {k} | p=0, cut]"
            else:
                label = f"[path {k} | p={fmt(weight / total) if total else '?'}]"
            for text in lines:
                self.log.line(f"{label} {text}")


def path_output() -> PathOutput | None:
    """A ``PathOutput`` for an enumeration about to run, or None when nothing prints."""
    log = current()
    return PathOutput(log) if log is not None and not log.silenced else None


def silent(fn: Callable) -> Callable:
    """``fn`` run ``silenced`` (a decorator for analyses that re-execute a model)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with silenced():
            return fn(*args, **kwargs)
    return wrapper
