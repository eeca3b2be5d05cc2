"""Progress bars and Ctrl-C (issue 9, item 13: "give every long run progress and Ctrl-C
that returns cleanly").

Every method takes ``progress`` (None: a bar on a terminal after 2 s; True: always; False:
never; ``ppl.stdlib.progress``). A bar never changes a result, and a run interrupted by
``KeyboardInterrupt`` (what Ctrl-C raises) leaves no bar drawn and no global state changed:
the next run on the same model gives what a fresh model gives.
"""
from __future__ import annotations

import io
import sys

import pytest
import torch
from tqdm.auto import tqdm

import ppl
from ppl.cli import main
from ppl.semantics import limits as limits_mod
from ppl.semantics.values import current_lineage
from ppl.stdlib import progress as progress_mod
from ppl.stdlib import rng
from ppl.stdlib.distributions import _DEFERRED

SRC = '''
def m(f, ys):
    mu ~ normal(0, 1)
    for y in ys:
        observe y ~ normal(f(mu), 1)
    return mu
'''

DISCRETE = '''
def m(f, ys):
    b ~ flip(0.3)
    c ~ flip(0.6)
    for y in ys:
        observe y ~ normal(f(b + c), 1)
    return b + c
'''

YS = [0.1, 0.5, 1.0, 0.7]

#: method -> (options, the name its bar shows)
METHODS = {
    "importance": ({}, "importance"),
    "prior": ({}, "prior"),
    "best_of_n": ({}, "best_of_n"),
    "smc": ({}, "smc"),
    "resample_move": ({}, "resample_move"),
    "smc_steer": ({"expansion": 2}, "smc_steer"),
    "tempering": ({"moves": 2}, "tempering"),
    "mh": ({"samples": 30, "burn_in": 10, "chains": 2}, "MH"),
    "pmmh": ({"params": ["mu"], "samples": 8, "burn_in": 2, "chains": 1, "particles": 20}, "PMMH"),
    "enumerate": ({}, "enumerate"),
}


def tripwire(at: int | None = None):
    """A Python function passed as data: the identity, counting its calls in ``.calls``,
    that raises ``KeyboardInterrupt`` (as Ctrl-C does) on call number ``at``."""
    def f(x):
        f.calls += 1
        if f.calls == at:
            raise KeyboardInterrupt
        return x
    f.calls = 0
    return f


def _run(model, method, f, progress):
    options, _ = METHODS[method]
    options = dict(options)
    particles = options.pop("particles", 40)
    return model.run(method, {"f": f, "ys": YS}, particles=particles, seed=7, progress=progress, **options)


def _summary(res):
    """What must repeat exactly: the posterior mean and, where there is one, the evidence."""
    return float(res.mean()), getattr(res, "log_evidence", None)


def _model(method):
    return ppl.model(DISCRETE if method == "enumerate" else SRC)


@pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning")
@pytest.mark.parametrize("method", list(METHODS))
def test_bar_with_progress_true_none_with_false_and_same_result(method, capsys):
    model = _model(method)
    shown = _summary(_run(model, method, tripwire(), True))
    err = capsys.readouterr().err
    assert METHODS[method][1] + ":" in err  # the bar was drawn on stderr ...
    assert err.split("\r")[-2].strip() == ""  # ... and erased when the run ended
    hidden = _summary(_run(model, method, tripwire(), False))
    assert capsys.readouterr().err == ""
    assert shown == hidden
    auto = _summary(_run(model, method, tripwire(), None))  # stderr is not a terminal here
    assert capsys.readouterr().err == ""
    assert auto == shown


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_progress_appears_on_a_terminal_after_the_delay(monkeypatch):
    """progress=None: a bar on a terminal once the run has taken AUTO_DELAY seconds (here
    0), none when stderr is not a terminal."""
    model = ppl.model(SRC)
    monkeypatch.setattr(progress_mod, "AUTO_DELAY", 0.0)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _run(model, "smc", tripwire(), None)
    assert "smc:" in terminal.getvalue()
    monkeypatch.setattr(progress_mod, "AUTO_DELAY", 1e6)  # a run shorter than the delay: no bar
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _run(model, "smc", tripwire(), None)
    assert terminal.getvalue() == ""


def test_bar_postfix_shows_ess_and_temperature(monkeypatch):
    """smc's counter shows the ESS at the last checkpoint; tempering's bar the temperature
    and the number of steps (drawn here at every update)."""
    import ppl.inference.smc as smc_mod
    import ppl.inference.tempering as tempering_mod
    out = io.StringIO()

    def drawn_at_every_update(progress, **options):
        return progress_mod.progress_bar(progress, file=out, mininterval=0, miniters=1, **options)

    monkeypatch.setattr(smc_mod, "progress_bar", drawn_at_every_update)
    res = _run(ppl.model(SRC), "smc", tripwire(), True)
    assert f"smc: {len(YS)} checkpoints" in out.getvalue()
    assert f"ESS {res.ess_history[-1]:.0f}/40]" in out.getvalue(), out.getvalue()
    monkeypatch.setattr(tempering_mod, "progress_bar", drawn_at_every_update)
    res = _run(ppl.model(SRC), "tempering", tripwire(), True)
    steps = len(res.extra["schedule"]) - 1
    assert f"tempering: 100%" in out.getvalue() and f"beta=1, step {steps}]" in out.getvalue(), out.getvalue()


def _global_state():
    return (torch.get_rng_state().clone(), rng.current(), current_lineage(), limits_mod.current(),
            _DEFERRED.checks, len(tqdm._instances))


@pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning")
@pytest.mark.parametrize("method", list(METHODS))
def test_ctrl_c_returns_cleanly(method, capsys):
    """KeyboardInterrupt from inside a run (half way through its calls of a data
    function) propagates as it is; no bar is left drawn or open; torch's global RNG,
    the thread's generators and lineage, the limits and the deferred checks are as
    before; and the next run of the same model is what a fresh model gives."""
    counter = tripwire()
    _run(_model(method), method, counter, False)
    fresh = _summary(_run(_model(method), method, tripwire(), False))
    model = _model(method)
    before = _global_state()
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt) as interrupted:  # it holds the run's frames, as a handler does
        _run(model, method, tripwire(at=counter.calls // 2 + 1), True)
    after = _global_state()
    assert torch.equal(before[0], after[0])
    assert before[1:] == after[1:]
    err = capsys.readouterr().err
    assert METHODS[method][1] + ":" in err and err.split("\r")[-2].strip() == ""  # drawn, then erased
    del interrupted
    assert _summary(_run(model, method, tripwire(), False)) == fresh


def test_cli_progress_for_every_method(tmp_path, capsys):
    """``--progress`` draws the method's bar for methods that had none before."""
    model = tmp_path / "m.ppl"
    model.write_text("def m(ys):\n    mu ~ normal(0, 1)\n    for y in ys:\n        observe y ~ normal(mu, 1)\n"
                     "    return mu\n")
    data = tmp_path / "d.json"
    data.write_text('{"ys": [0.1, 0.5]}')
    for method, name in (("smc", "smc"), ("tempering", "tempering"), ("importance", "importance"),
                         ("best_of_n", "best_of_n")):
        assert main(["run", str(model), "--data", str(data), "--method", method, "-n", "30", "--seed", "0",
                     "--progress"]) == 0
        assert name + ":" in capsys.readouterr().err
        assert main(["run", str(model), "--data", str(data), "--method", method, "-n", "30", "--seed", "0"]) == 0
        assert name + ":" not in capsys.readouterr().err


def test_guide_fit_and_sbc_use_the_same_bars(capsys):
    """``Guide.fit`` (progress=True by default) and ``ppl.testing.sbc`` draw their bars
    with the same helper: drawn and erased with True, none with False, the same result;
    SBC shows one bar (its simulations'), not one per inference run."""
    from ppl.testing.sbc import sbc
    model = ppl.model(SRC)
    data = {"f": tripwire(), "ys": YS}
    shown = ppl.guide(model, data).fit(data, objective="elbo", steps=4, seed=0, progress=True).history
    err = capsys.readouterr().err
    assert "fit elbo:" in err and err.split("\r")[-2].strip() == ""
    hidden = ppl.guide(model, data).fit(data, objective="elbo", steps=4, seed=0, progress=False).history
    assert capsys.readouterr().err == "" and shown == hidden
    ranks = sbc(model, "importance", data, simulations=3, draws=4, particles=20, progress=True).ranks
    err = capsys.readouterr().err
    assert "SBC importance:" in err and "\rimportance:" not in err
    again = sbc(model, "importance", data, simulations=3, draws=4, particles=20, progress=False).ranks
    assert ranks.keys() == again.keys() and all((ranks[k] == again[k]).all() for k in ranks)
    assert capsys.readouterr().err == ""


def test_cli_ctrl_c_erases_the_bar_before_its_message(tmp_path, capsys, monkeypatch):
    """Ctrl-C in ``ppl run --progress``: status 130, and the bar is erased before the line
    ``interrupted (Ctrl-C)`` (not left half-drawn above or after it)."""
    import ppl.inference.smc as smc_mod
    checkpoint = smc_mod.SMCHandler._checkpoint
    seen = []

    def interrupted_at_the_second(self, eff):
        seen.append(eff)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return checkpoint(self, eff)

    monkeypatch.setattr(smc_mod.SMCHandler, "_checkpoint", interrupted_at_the_second)
    model = tmp_path / "m.ppl"
    model.write_text("def m(ys):\n    mu ~ normal(0, 1)\n    for y in ys:\n        observe y ~ normal(mu, 1)\n"
                     "    return mu\n")
    data = tmp_path / "d.json"
    data.write_text('{"ys": [0.1, 0.5, 0.3]}')
    assert main(["run", str(model), "--data", str(data), "--method", "smc", "-n", "30", "--progress"]) == 130
    err = capsys.readouterr().err
    drawn, message = err.rsplit("\r", 1)
    assert message == "interrupted (Ctrl-C)\n"
    assert "smc:" in drawn and drawn.split("\r")[-1].strip() == ""
