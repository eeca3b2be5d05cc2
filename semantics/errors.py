"""User-facing errors. Each carries a source span and a hint, and prints as

    model.ppl:3:9: error: normal: scale must be positive (got -1.0)
        3 |     x ~ normal(0, -1)
          |         ^^^^^^^^^^^^^
    hint: ...

A user mistake must surface as one of these, never as a raw Python or Lark traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable

from .source import Span


class PPLError(Exception):
    """Base class of every error a model's author can cause."""

    kind = "error"

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint

    def with_span(self, span: Span | None) -> "PPLError":
        """Attach a span if this error has none yet (errors raised deep in the runtime
        get the span of the statement that triggered them)."""
        if self.span is None or self.span.source is None:
            self.span = span
        return self

    def __str__(self) -> str:
        parts = []
        if self.span is not None and self.span.line > 0:
            parts.append(f"{self.span.location()}: {self.kind}: {self.message}")
            ex = self.span.excerpt()
            if ex:
                parts.append(ex)
        else:
            parts.append(f"{self.kind}: {self.message}")
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)


class PPLSyntaxError(PPLError):
    kind = "syntax error"


class PPLCheckError(PPLError):
    """Static errors: unknown names, wrong arity, unknown distributions."""

    kind = "error"


class PPLRuntimeError(PPLError):
    """Errors while running a model: bad parameter values, type errors, bounds."""

    kind = "runtime error"


class PPLRecursionError(PPLRuntimeError):
    pass


class ZeroEvidenceError(PPLRuntimeError):
    """Every particle (or every path) has weight zero: the posterior is undefined."""


class InfiniteSupportError(PPLRuntimeError):
    """Exact enumeration met a random choice whose support is infinite or continuous."""


class PPLDiagnosticWarning(UserWarning):
    """An inference result that ran but may be unreliable: split R-hat above 1.01, Pareto
    k above 0.7, a small effective sample size, or a collapsed particle population (see
    ``ppl.inference.diagnostics`` for the rules). The same messages are in the result's
    ``warnings`` list, its ``summary()`` and the CLI's ``--json`` output."""


def distribution_as_value(call: str, use: str) -> tuple[str, str]:
    """The message and hint for a distribution (``call``, e.g. ``flip(0.1)``) used as a
    value (``use``: "as a condition", ...): the checker's and the runtime's."""
    return (f"{call} is a distribution, not a value: it cannot be used {use}",
            f"draw it: `x ~ {call}` or `sample({call})`")


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """A hint naming the closest candidate, or None."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
