"""Where progress bars appear (stdlib.progress.decide): terminals and notebooks, never in
pipes, tests or under the CLI's --json. The decision is tested, not the timing."""
from __future__ import annotations

import re

import pytest

from ppl.stdlib import progress
from ppl.stdlib.progress import AUTO_DELAY, NO_BAR, decide, progress_bar


@pytest.mark.parametrize("terminal,notebook,expected", [
    (False, False, (None, 0.0)),                 # a pipe, a log file, pytest: silent
    (True, False, ("terminal", AUTO_DELAY)),     # a terminal: after AUTO_DELAY
    (False, True, ("notebook", AUTO_DELAY)),     # a Jupyter kernel: after AUTO_DELAY too
    (True, True, ("notebook", AUTO_DELAY)),
])
def test_default_shows_where_someone_watches(terminal, notebook, expected):
    assert decide(None, terminal=terminal, notebook=notebook) == expected


def test_true_shows_at_once_and_false_never():
    assert decide(True, terminal=False, notebook=False) == ("terminal", 0.0)
    assert decide(True, terminal=False, notebook=True) == ("notebook", 0.0)
    for terminal in (False, True):
        for notebook in (False, True):
            assert decide(False, terminal=terminal, notebook=notebook) == (None, 0.0)


def test_no_bar_in_tests_and_no_bar_when_false():
    assert progress_bar(None, desc="x") is NO_BAR  # pytest captures stderr: no terminal, no kernel
    assert progress_bar(False, desc="x") is NO_BAR
    assert not progress.in_notebook()


def test_notebook_detected_from_an_ipython_kernel(monkeypatch):
    ipython = pytest.importorskip("IPython")

    class Kernel:
        config = {"IPKernelApp": {}}

    class Terminal:
        config = {}
    monkeypatch.setattr(ipython, "get_ipython", lambda: Kernel())
    assert progress.in_notebook()
    monkeypatch.setattr(ipython, "get_ipython", lambda: Terminal())
    assert not progress.in_notebook()  # IPython in a terminal: the terminal rule decides
    monkeypatch.setattr(ipython, "get_ipython", lambda: None)
    assert not progress.in_notebook()


def test_notebook_bar_is_made_in_a_kernel(monkeypatch):
    """In a kernel the bar exists (widget, or the stderr text bar without ipywidgets)
    although stderr is no terminal; it is erased on exit."""
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    with progress_bar(None, desc="enumerate", unit=" paths") as bar:
        assert bar is not NO_BAR
        assert bar.delay == AUTO_DELAY
        bar.update(3)
        assert bar.n == 3


def test_cli_json_passes_progress_false():
    """Under --json no bar is asked for (the method receives progress=False)."""
    from ppl import cli
    args = cli.build_parser().parse_args(["run", "m.ppl", "--json", "--method", "importance"])
    assert cli._method_options(args)["progress"] is False
    args = cli.build_parser().parse_args(["run", "m.ppl", "--json", "--progress"])
    assert cli._method_options(args)["progress"] is True
    args = cli.build_parser().parse_args(["run", "m.ppl"])
    assert "progress" not in cli._method_options(args)


def test_ticking_bar_for_work_without_steps(monkeypatch):
    """enumerate's elimination has no steps to count: a bar redrawn by a thread with the
    elapsed time, shown after the delay, stopped (idempotently) when paths take over."""
    import time
    assert progress.ticking(None, desc="x").bar is NO_BAR  # in tests: none, and no thread
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    clock = progress.ticking(True, desc="enumerate (elimination)")
    assert clock.bar is not NO_BAR and clock.delay == 0.0 and clock._thread.is_alive()
    refreshed = []
    monkeypatch.setattr(clock.bar, "refresh", lambda *a, **k: refreshed.append(1))
    time.sleep(0.03)
    clock.interval = 0.01
    deadline = time.monotonic() + 5
    while not refreshed and time.monotonic() < deadline:
        time.sleep(0.01)
    clock.stop()
    clock.stop()
    assert refreshed and not clock._thread.is_alive()


def test_enumerate_by_elimination_and_by_paths_give_the_same_with_a_bar(monkeypatch):
    import ppl
    monkeypatch.setattr(progress, "in_notebook", lambda: True)  # bars on (made, never timed)
    m = ppl.model("def c(n):\n    x ~ flip(0.5)\n    for i in range(n):\n        x ~ flip(0.9 if x else 0.2)\n"
                  "    return x\n")
    a = m.run("enumerate", {"n": 12}, strategy="elimination", progress=True)
    b = m.run("enumerate", {"n": 12}, strategy="paths", progress=True)
    assert a.strategy == "elimination" and a.marginal() == b.marginal()


@pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning")
def test_mcmc_bars_show_acceptance_and_divergences(monkeypatch):
    """MCMC bars (drawn here at every update) show the acceptance rate, and NUTS the
    divergences; the draws are the same with and without the bar."""
    import io
    import torch
    import ppl
    import ppl.inference.hmc as hmc_mod
    import ppl.inference.mh as mh_mod
    out = io.StringIO()

    def drawn_at_every_update(progress, **options):
        return progress_bar(progress, file=out, mininterval=0, miniters=1, **options)
    monkeypatch.setattr(hmc_mod, "progress_bar", drawn_at_every_update)
    monkeypatch.setattr(mh_mod, "progress_bar", drawn_at_every_update)
    m = ppl.model("def g(y):\n    mu ~ normal(0, 1)\n    observe y ~ normal(mu, 1)\n    return mu\n")
    for method, options in (("nuts", {"warmup": 10, "samples": 10}), ("mh", {"burn_in": 5, "samples": 30})):
        shown = m.run(method, {"y": 1.0}, particles=2, seed=3, progress=True, **options)
        hidden = m.run(method, {"y": 1.0}, particles=2, seed=3, progress=False, **options)
        assert torch.equal(shown.sites["mu"].value, hidden.sites["mu"].value)
    text = out.getvalue()
    assert "warm-up, divergences 0" in text and re.search(r"NUTS: .*acceptance \d\.\d\d, divergences \d+", text)
    assert re.search(r"MH: .*acceptance \d\.\d\d", text)


@pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning")
def test_nuts_shows_the_time_spent_preparing_the_log_density(monkeypatch):
    """A model's first NUTS run on a machine compiles its log density (up to minutes for a
    long unrolled loop): a ticking bar says so while it lasts, as for any long step."""
    import ppl
    import ppl.inference.gradient_mcmc as gradient_mcmc
    made = []

    def recorded(progress, *, desc):
        made.append((progress, desc))
        return NO_BAR
    monkeypatch.setattr(gradient_mcmc, "ticking", recorded)
    m = ppl.model("def g(y):\n    mu ~ normal(0, 1)\n    observe y ~ normal(mu, 1)\n    return mu\n")
    m.run("nuts", {"y": 1.0}, particles=2, seed=3, progress=True, warmup=5, samples=5)
    assert made == [(True, "NUTS: preparing the log density (a model's first run on this machine compiles it; "
                           "later runs load it)")]
