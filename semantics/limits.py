"""Bounds on the work and memory a model may use: every bound is a clear error, never a
hang, a raw ``MemoryError`` or a machine brought to its knees.

Process-wide limits (one ``Limits`` object, read by the runtime where it allocates or
computes something whose size the program controls):

=================  ===================  =========================================================
limit              environment          meaning
=================  ===================  =========================================================
``max_memory``     ``PPL_MAX_MEMORY``   bytes one allocation a program asks for may take (a list
                                        or string built by ``*``, ``list(range(n))``,
                                        ``zeros(n)``, a run's particle tensors); "4GB", "512MB"
``max_int_bits``   ``PPL_MAX_INT_BITS`` bits of an integer a program computes (``10 ** 10 ** 8``)
                                        or is given as data
``regex_timeout``  ``PPL_REGEX_TIMEOUT`` seconds one ``regex_match``/``regex_search`` may take
``max_iterations`` ``PPL_MAX_ITERATIONS`` iterations of one loop (``for``, ``while``, ``map``,
                                        ``filter``, ``fold``); a model option overrides it
``max_depth``      ``PPL_MAX_DEPTH``    nested calls (recursion); a model option overrides it
=================  ===================  =========================================================

Change them with ``ppl.set_limits(max_memory="8GB")`` (returns the previous limits),
``with ppl.limits(max_int_bits=100_000): ...`` (restored afterwards), the environment
variables above, or the CLI's ``--limit KEY=VALUE``. Limits are shared by all threads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from typing import Any

from .errors import PPLError, PPLRuntimeError, did_you_mean

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Limits:
    """The process-wide bounds (see the module docstring)."""

    max_memory: int = 4 * GiB
    max_int_bits: int = 10_000
    regex_timeout: float = 0.5
    max_regex_length: int = 1000
    max_iterations: int = 100_000
    max_depth: int = 200


ENV_VARS = {"max_memory": "PPL_MAX_MEMORY", "max_int_bits": "PPL_MAX_INT_BITS",
            "regex_timeout": "PPL_REGEX_TIMEOUT", "max_iterations": "PPL_MAX_ITERATIONS",
            "max_depth": "PPL_MAX_DEPTH"}

_current: Limits | None = None

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
          "mib": 1024 ** 2, "g": GiB, "gb": GiB, "gib": GiB, "t": 1024 ** 4, "tb": 1024 ** 4, "tib": 1024 ** 4}


def parse_bytes(value: Any, name: str = "max_memory") -> int:
    """A number of bytes from an int or text such as "4GB", "512 MiB", "1e9"."""
    if isinstance(value, bool):
        raise PPLError(f"{name} must be a number of bytes such as 4GB (got {value!r})")
    if isinstance(value, (int, float)):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(value))
        try:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()] if m else None
        except (ValueError, KeyError):
            n = None
    if n is None or not (isinstance(n, (int, float)) and math.isfinite(n) and n > 0):
        raise PPLError(f"{name} must be a positive number of bytes such as 4GB or 512MB (got {value!r})")
    return int(n)


def _convert(name: str, value: Any) -> Any:
    """A limit's value, checked (text from the environment or the CLI is converted)."""
    if name == "max_memory":
        return parse_bytes(value, name)
    kind = float if name == "regex_timeout" else int
    try:
        if isinstance(value, bool):
            raise ValueError
        v = kind(float(value)) if isinstance(value, str) else kind(value)
        if kind is int and float(value) != v:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise PPLError(f"limit {name} must be a positive {'number' if kind is float else 'integer'} "
                       f"(got {value!r})") from None
    if not (math.isfinite(v) and v > 0):
        raise PPLError(f"limit {name} must be positive (got {value!r})")
    return v


def _from_env() -> Limits:
    out = {}
    for name, var in ENV_VARS.items():
        raw = os.environ.get(var)
        if raw is not None and raw.strip():
            try:
                out[name] = _convert(name, raw)
            except PPLError as e:
                raise PPLError(f"environment variable {var}: {e.message}") from None
    return Limits(**out)


def current() -> Limits:
    """The limits in force (first read from the environment)."""
    global _current
    if _current is None:
        _current = _from_env()
    return _current


def set_limits(**changes) -> Limits:
    """Change some limits for the whole process; returns the previous ``Limits``."""
    global _current
    old = current()
    unknown = [k for k in changes if k not in ENV_VARS and k != "max_regex_length"]
    if unknown:
        raise PPLError(f"unknown limit '{unknown[0]}'",
                       hint=did_you_mean(unknown[0], ENV_VARS) or f"limits: {', '.join(ENV_VARS)}")
    _current = dataclasses.replace(old, **{k: _convert(k, v) for k, v in changes.items()})
    return old


@contextlib.contextmanager
def limits(**changes):
    """``with limits(max_memory="1GB"): ...``: the limits changed inside the block only."""
    global _current
    old = set_limits(**changes)
    try:
        yield current()
    finally:
        _current = old


# ------------------------------------------------------------------------------ checks
def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"  # pragma: no cover


MEMORY_HINT = "raise the budget with ppl.set_limits(max_memory=...), the environment variable " \
              "PPL_MAX_MEMORY or the CLI's --limit max_memory=..., or build something smaller"


def check_memory(nbytes: float, what: str, hint: str | None = None) -> None:
    """Refuse an allocation of about ``nbytes`` above the memory budget, before making it."""
    budget = current().max_memory
    if nbytes > budget:
        raise PPLRuntimeError(f"{what} would need about {human_bytes(nbytes)}, more than the memory budget "
                              f"of {human_bytes(budget)} (max_memory)", hint=hint or MEMORY_HINT)


#: estimated bytes per element: a Python list slot, a Python int in a list, a tensor element
LIST_SLOT_BYTES = 8
INT_ITEM_BYTES = 36


def check_items(n: int, what: str, item_bytes: int = LIST_SLOT_BYTES) -> None:
    check_memory(n * item_bytes, f"{what} of {n:,} elements")


INT_HINT = "integers are bounded; raise the bound with ppl.set_limits(max_int_bits=...), PPL_MAX_INT_BITS " \
           "or --limit max_int_bits=..., or compute with floats (e.g. 10.0 ** 400 is inf)"


def check_int(v: int, what: str = "an integer result") -> int:
    """``v`` if its size is within ``max_int_bits``, else an error."""
    bits = v.bit_length()
    limit = current().max_int_bits
    if bits > limit:
        raise PPLRuntimeError(f"{what} has {bits:,} bits, more than the limit of {limit:,} bits (max_int_bits)",
                              hint=INT_HINT)
    return v


def check_fraction(v, what: str = "an exact rational result") -> None:
    """An exact rational (``Fraction``) whose numerator or denominator has more than
    ``max_int_bits`` bits is an error (exact arithmetic in a loop can grow without bound)."""
    check_int(max(abs(v.numerator), v.denominator, key=int.bit_length), what)


def check_power(base, exponent) -> None:
    """Refuse ``base ** exponent`` (ints or Fractions, integer exponent) before computing
    it when its result would have more than ``max_int_bits`` bits."""
    from fractions import Fraction
    if isinstance(exponent, Fraction) and exponent.denominator == 1:
        exponent = exponent.numerator  # Python computes x ** Fraction(n) exactly, as x ** n
    if isinstance(base, bool) or isinstance(exponent, bool) or not isinstance(exponent, int):
        return
    if isinstance(base, Fraction):
        exponent = abs(exponent)  # (3/2) ** -n is (2/3) ** n, exactly
    if exponent <= 1:
        return
    if isinstance(base, int):
        size = abs(base).bit_length() - 1 if base else 0  # log2|base| rounded down
    elif isinstance(base, Fraction):
        size = max(abs(base.numerator).bit_length(), base.denominator.bit_length()) - 1
    else:
        return
    limit = current().max_int_bits
    if size and size * exponent > limit:
        raise PPLRuntimeError(f"{_short(base)} ** {_short(exponent)} would have more than {_count(size * exponent)} bits, "
                              f"more than the limit of {limit:,} bits (max_int_bits)", hint=INT_HINT)


def _count(n: int) -> str:
    """``n`` with thousands separators, or ``10^k`` when it is huge."""
    return f"{n:,}" if n < 10 ** 18 else f"10^{len(str(n)) - 1}"


def _short(v) -> str:
    s = str(v) if not isinstance(v, int) or v.bit_length() < 200 else f"<an integer of {v.bit_length()} bits>"
    return s if len(s) <= 60 else s[:57] + "..."
