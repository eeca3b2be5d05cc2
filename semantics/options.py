"""Typed options: what one named option may be (an integer or a number in a range, a name
from a fixed set, or a flag), checked with a ``PPLError`` naming the option, the value and
what is allowed. ``inference.methods.OPTION_SPECS`` holds the inference methods' table."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from .errors import PPLError


@dataclass(frozen=True)
class OptionSpec:
    """What one method option may be: an integer or a number in a range, a name from a
    fixed set, or a flag. ``check`` returns the value (integers as ``int``, numbers as
    ``float``) or raises a ``PPLError`` naming the option, the value and what is allowed."""

    kind: str  # "int" | "number" | "choice" | "flag"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    nullable: bool = False  # None means "the method's default"

    def allowed(self) -> str:
        """The allowed values in words, e.g. "a positive integer (at least 1)"."""
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "flag":
            return "true, false" + (" or 'auto'" if "auto" in self.choices else "")
        if self.kind == "int":
            if self.low == 1 and self.high is None:
                return "a positive integer (at least 1)"
            return "an integer" + self._range()
        if self.low == 0 and self.low_open and self.high is None:
            return "a positive finite number"
        return "a number" + self._range()

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            return f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def check(self, name: str, value: Any) -> Any:
        if value is None and self.nullable:
            return None
        out = self._convert(value)
        if out is _BAD or (self.kind in ("int", "number") and not self._in_range(out)):
            raise PPLError(f"{name} must be {self.allowed()} (got {value!r})")
        return out

    def _convert(self, value: Any) -> Any:
        if self.kind == "choice":
            return value if isinstance(value, str) and value in self.choices else _BAD
        if self.kind == "flag":
            if isinstance(value, bool) or value in self.choices:
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            return _BAD
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return _BAD  # True is not 1 particle, "5" is not a number here
        if self.kind == "int":
            try:
                return int(value) if float(value).is_integer() else _BAD
            except (OverflowError, ValueError):  # inf, nan
                return _BAD
        return float(value)

    def _in_range(self, v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))


_BAD = object()
