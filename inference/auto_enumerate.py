"""``enumerate="auto"`` for importance, SMC, NUTS and HMC: the method runs with the
discrete choices ``semantics.enumerate_auto.select`` chose summed out; where the
enumeration refuses a use the analysis did not see (a located error naming the choice),
that choice is left sampled and the method runs again (at most
``enumerate_auto.MAX_ATTEMPTS`` runs; the last with every chosen choice sampled). An
error that no chosen choice caused is raised as it is. The raw result's ``extra`` says
what was summed out (``enumerated``), what was left sampled and why
(``enumerate_sampled``) and how many runs it took (``enumerate_attempts``)."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from ..semantics import enumerate_auto
from ..semantics.errors import PPLError

R = TypeVar("R")


def with_enumeration(model, data: dict, option: Any, batch: int, attempt: Callable[[Any], R]) -> R:
    """``attempt(option)`` (one run of a method with ``enumerate=option``), or, when
    ``option`` is "auto", runs with the automatically chosen choices (``ExactAddresses``)
    until one succeeds (module docstring). ``batch``: the rows of the run's tables."""
    if not enumerate_auto.is_auto(option):
        return attempt(option)
    selection = enumerate_auto.select(model, data, batch)
    while True:
        try:
            raw = attempt(selection.chosen)
        except PPLError as err:
            nxt = selection.after_failure(err)
            if nxt is None:
                raise
            selection = nxt
            continue
        raw.extra.update(selection.extras())
        return raw
