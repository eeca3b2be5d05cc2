"""Effect-rewriting middleware: a run whose effects are changed on their way to the handler.

The interpreter yields effects and a handler answers them (``sampling.drive``). A piece of
middleware sits between the two: it sees each effect first and may pass it on unchanged,
pass on a rewritten one, or answer it itself (Pyro's ``minipyro.replay``/``condition`` and
NumPyro's ``condition.process_message`` in the generator form this interpreter uses).

* ``rewriting(gen, rewrite)``: the generator that yields ``rewrite(eff)`` for each effect of
  ``gen``. ``rewrite`` returns the effect to pass on (``eff`` itself, or a new one), or an
  ``Answer(value, effect)``: ``gen`` receives ``value`` instead of the handler's reply,
  after ``effect`` (if not None) has been passed on for the handler to weight. Replies
  are sent and errors thrown by the driver are passed into ``gen`` (so the program's own
  frames see them), and ``gen`` is closed with the wrapper.
* ``Rewritten(interp, rewrite)``: an interpreter whose runs are ``rewriting``'s (every other
  attribute is the wrapped interpreter's), so every method runs the rewritten program.

Rewrites (functions of one effect, to pass as ``rewrite``):

* ``observed_values(value_at)``: each ``observe v ~ d`` sees ``value_at(eff)`` instead of v
  (a mapping address -> value, or a function of the effect): simulated data sets (SBC),
  one data set per particle (amortized training).
* ``condition(values)``: a choice ``x ~ d`` at an address of ``values`` takes that value
  and is scored as an observation of it (the program conditioned on x; a checkpoint).
* ``substitute(values)``: a choice at an address of ``values`` takes that value and the
  handler never sees it (no weight, no trace entry): the program with x fixed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator, Mapping

from .errors import PPLRuntimeError
from .interpreter import ObserveEffect, SampleEffect


@dataclass
class Answer:
    """A rewrite's answer to an effect: the program receives ``value``; ``effect`` (if
    not None) is passed on to the handler first, whose reply is then dropped."""
    value: Any
    effect: Any = None


def rewriting(gen: Generator, rewrite: Callable) -> Generator:
    """``gen`` with every effect passed through ``rewrite`` (see the module docstring)."""
    try:
        eff = next(gen)
        while True:
            out = rewrite(eff)
            answer = out if isinstance(out, Answer) else None
            if answer is not None and answer.effect is None:
                eff = gen.send(answer.value)
                continue
            try:
                reply = yield (out if answer is None else answer.effect)
            except GeneratorExit:
                raise
            except BaseException as err:  # thrown in by the driver: the program's frames see it
                eff = gen.throw(err)
                continue
            eff = gen.send(reply if answer is None else answer.value)
    except StopIteration as stop:
        return stop.value
    finally:
        gen.close()


class Rewritten:
    """An interpreter whose runs have their effects rewritten by ``rewrite``; every other
    attribute is the wrapped interpreter's."""

    def __init__(self, inner, rewrite: Callable):
        self._inner = inner
        self._rewrite = rewrite

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def run(self, entry: str, data: dict, ctx) -> Generator:
        return rewriting(self._inner.run(entry, data, ctx), self._rewrite)


def _lookup(values) -> Callable:
    """``values`` as a function of an effect: a mapping is read at the effect's address
    (None where it has none)."""
    if callable(values):
        return values
    return lambda eff: values.get(eff.addr)


def observed_values(value_at: Mapping | Callable) -> Callable:
    """A rewrite: each ``ObserveEffect`` carries ``value_at(eff)`` (or ``value_at[addr]``)
    as its observed value; an address without one is a located error."""
    value_of = _lookup(value_at)

    def rewrite(eff):
        if type(eff) is not ObserveEffect:
            return eff
        value = value_of(eff)
        if value is None:
            raise PPLRuntimeError(f"no value for the observation '{eff.addr}'", eff.span)
        return ObserveEffect(eff.addr, eff.dist, value, eff.ctx, eff.span)
    return rewrite


def condition(values: Mapping | Callable) -> Callable:
    """A rewrite: a ``SampleEffect`` at an address with a value becomes an observation of
    that value (scored by the handler, a checkpoint), and the program receives it."""
    value_of = _lookup(values)

    def rewrite(eff):
        value = value_of(eff) if type(eff) is SampleEffect else None
        if value is None:
            return eff
        return Answer(value, ObserveEffect(eff.addr, eff.dist, value, eff.ctx, eff.span))
    return rewrite


def substitute(values: Mapping | Callable) -> Callable:
    """A rewrite: a ``SampleEffect`` at an address with a value is answered with it; the
    handler never sees that choice."""
    value_of = _lookup(values)

    def rewrite(eff):
        value = value_of(eff) if type(eff) is SampleEffect else None
        return eff if value is None else Answer(value)
    return rewrite
