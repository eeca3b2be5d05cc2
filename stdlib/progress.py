"""Progress bars for long runs: one convention for every inference method.

``progress`` (an option of every method, ``--progress`` in the CLI):

* ``None`` (the default): a bar only where someone watches -- stderr is a terminal, or the
  code runs in a Jupyter (IPython kernel) notebook -- and only once the run has taken
  ``AUTO_DELAY`` seconds, so short runs, logs, pipes and tests stay clean;
* ``True``: a bar at once, terminal or not;
* ``False``: never (the CLI's ``--json`` passes it unless ``--progress`` is given).

In a notebook the bar is tqdm's widget (``tqdm.notebook``, which needs ``ipywidgets``);
without ``ipywidgets`` it is the text bar on stderr, which the notebook shows under the
cell. ``decide(progress, terminal=..., notebook=...)`` is the whole decision, a pure
function (tested without timing).

A bar is a context manager. Leaving the block, normally or by an exception (Ctrl-C's
``KeyboardInterrupt`` included), closes it, and a closed bar is erased (``leave=False``):
an interrupted run leaves no half-drawn line. Where no bar is shown, ``progress_bar``
returns ``NO_BAR``, whose methods do nothing, so callers need no ``if``.

Drawing a bar never touches a random generator, so a run gives the same result with a
bar and without one.
"""
from __future__ import annotations

import sys
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


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (an IPython kernel app is running): the
    place where stderr is no terminal but a person still watches the output."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # pragma: no cover - a broken IPython install
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def decide(progress: bool | None, *, terminal: bool, notebook: bool) -> tuple[str | None, float]:
    """Where a bar goes and after how many seconds: ``(None, 0)`` for no bar,
    ``("notebook", delay)`` for the notebook's bar, ``("terminal", delay)`` for the text
    bar on stderr. ``progress`` as in the module docstring."""
    if progress is False:
        return None, 0.0
    delay = 0.0 if progress else AUTO_DELAY
    if notebook:
        return "notebook", delay
    if terminal or progress:
        return "terminal", delay
    return None, 0.0


def _notebook_tqdm():
    """tqdm's widget bar class, or None where ``ipywidgets`` is missing."""
    try:
        import ipywidgets  # noqa: F401 - tqdm.notebook draws with it
        from tqdm.notebook import tqdm
    except ImportError:
        return None
    return tqdm


def progress_bar(progress: bool | None, *, desc: str, unit: str = "it", total: float | None = None,
                 **options: Any):
    """A tqdm bar following ``progress`` (see the module docstring), or ``NO_BAR`` where
    none is shown. ``total`` None: a counter (the number of steps is not known in
    advance). ``options`` go to tqdm (e.g. ``bar_format``)."""
    where, delay = decide(progress, terminal=stderr_is_terminal(), notebook=progress is not False and in_notebook())
    if where is None:
        return NO_BAR
    try:
        from tqdm.std import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return NO_BAR
    if where == "notebook":
        tqdm = _notebook_tqdm() or tqdm
    options = {"leave": False, "mininterval": 0.5, "delay": delay, "disable": False, "file": sys.stderr,
               **options}
    if tqdm.__module__ == "tqdm.notebook":
        options.pop("file")
    bar = tqdm(desc=desc, unit=unit, total=total, **options)
    return NO_BAR if bar.disable else bar


class Ticking:
    """A bar for work without steps to count (``ticking``): a background thread redraws
    it every ``interval`` seconds once ``delay`` has passed, showing the elapsed time.
    ``stop()`` (idempotent, also on leaving the block) ends the thread and erases the bar."""

    def __init__(self, bar, delay: float, interval: float = 0.5):
        self.bar, self.delay, self.interval = bar, delay, interval
        self._done = None  # (no bar: no thread to stop, and no Event made)
        self._thread = None
        self.shown = False
        if bar is not NO_BAR:
            import threading
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._run, name="ppl-progress", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        import time
        start = time.monotonic()
        while not self._done.wait(self.interval):
            if time.monotonic() - start >= self.delay:
                self.bar.refresh()
                self.shown = True

    def stop(self) -> None:
        if self._done is None:  # (NO_BAR: nothing runs, nothing to erase)
            return
        if self._done.is_set():
            return
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self.shown:
            self.bar.delay = 0  # (tqdm erases only a bar it knows was drawn)
        self.bar.close()

    def __enter__(self) -> "Ticking":
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False


def ticking(progress: bool | None, *, desc: str) -> Ticking:
    """A bar showing the elapsed time of one long step (``progress`` as for
    ``progress_bar``): for work that has no count, e.g. enumerate's variable elimination."""
    where, delay = decide(progress, terminal=stderr_is_terminal(), notebook=progress is not False and in_notebook())
    bar = progress_bar(progress, desc=desc, bar_format="{desc}: {elapsed}", delay=float("inf")) \
        if where is not None else NO_BAR
    return Ticking(bar, delay)


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
