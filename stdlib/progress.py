"""Progress bars for long runs: one convention for every inference method.

``progress`` (an option of every method, ``--progress`` in the CLI):

* ``None`` (the default): a bar on stderr only when stderr is a terminal, and only once
  the run has taken ``AUTO_DELAY`` seconds, so short runs, logs and pipes stay clean;
* ``True``: a bar on stderr at once, terminal or not;
* ``False``: never.

A bar is a context manager. Leaving the block, normally or by an exception (Ctrl-C's
``KeyboardInterrupt`` included), closes it, and a closed bar is erased (``leave=False``):
an interrupted run leaves no half-drawn line. Where no bar is shown, ``progress_bar``
returns ``NO_BAR``, whose methods do nothing, so callers need no ``if``.

Drawing a bar never touches a random generator, so a run gives the same result with a
bar and without one.
"""
from __future__ import annotations

from typing import Any, Generator

#: seconds a run takes before its bar appears on a terminal (progress=None)
AUTO_DELAY = 2.0


class _NoBar:
    """The bar that is not shown: tqdm's methods used by ppl, doing nothing."""

    disable = True

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc) -> bool:
        return False


NO_BAR = _NoBar()


def progress_bar(progress: bool | None, *, desc: str, unit: str = "it", total: float | None = None,
                 **options: Any):
    """A tqdm bar on stderr following ``progress`` (see the module docstring), or
    ``NO_BAR`` where none is shown. ``total`` None: a counter (the number of steps is not
    known in advance). ``options`` go to tqdm (e.g. ``bar_format``)."""
    if progress is False:
        return NO_BAR
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return NO_BAR
    options = {"leave": False, "mininterval": 0.5, "delay": 0 if progress else AUTO_DELAY,
               "disable": None if progress is None else False, **options}
    bar = tqdm(desc=desc, unit=unit, total=total, **options)
    return NO_BAR if bar.disable else bar  # tqdm disables itself (progress=None) off a terminal


def counted(gen: Generator, bar) -> Generator:
    """``gen`` (a generator driven with ``send``) with each item it yields counted on
    ``bar``; its return value is passed on."""
    try:
        item = next(gen)
        while True:
            bar.update(1)
            reply = yield item
            item = gen.send(reply)
    except StopIteration as stop:
        return stop.value
