"""``ppl.register_method`` (issue 10, item 5): a user-written algorithm runs through
``Model.run``, ``@ppl.infer`` and the CLI (``--plugin MODULE`` / ``PPL_PLUGINS``), with its
options checked and its result wrapped and diagnosed like a built-in method's.

The user algorithm here is likelihood weighting written with the public pieces
(``model.interpreter()``, ``model.prepare_data``, ``semantics.sampling``), returning a
``ppl.inference.Population``. The model has an exact posterior: a ~ flip(0.3), observe
x ~ normal(1 if a else 0, 1) at x = 1, so P(a | x) = 0.3 e^{-0} / (0.3 + 0.7 e^{-1/2})
(the common factor e^{-1/2 (x-1)^2} = 1 cancels).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

import ppl
from ppl.cli import main
from ppl.inference import METHODS, Population
from ppl.registry import _REGISTERED_OPTIONS

SRC = """
def model(x):
    a ~ flip(0.3)
    observe x ~ normal(1.0 if a else 0.0, 1.0)
    return a
"""
P_A = 0.3 / (0.3 + 0.7 * math.exp(-0.5))  # P(a | x = 1)

PLUGIN = textwrap.dedent('''
    """A ppl plugin: registers the method 'mine' (likelihood weighting by hand)."""
    import ppl
    from ppl.inference import Population
    from ppl.semantics.sampling import LikelihoodWeighting, column, drive
    from ppl.semantics.values import Particles


    def mine(model, data, *, particles, device, tempered=1.0):
        h = LikelihoodWeighting(particles, device)
        ctx = Particles.all(particles, device)
        ret = drive(model.interpreter().run(model.entry, model.prepare_data(data, device), ctx), h)
        sites = {"return": (column(ret, ctx), None), **h.trace.sites()}
        return Population("mine", sites, h.log_weights * tempered)


    ppl.register_method("mine", mine, options={"tempered": ppl.OptionSpec("number", low=0, low_open=True)})
''')


@pytest.fixture
def registry():
    """Restores ``METHODS`` (and the registered option specs) after the test."""
    methods, options = dict(METHODS), dict(_REGISTERED_OPTIONS)
    yield
    METHODS.clear()
    METHODS.update(methods)
    _REGISTERED_OPTIONS.clear()
    _REGISTERED_OPTIONS.update(options)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module ``face_plugin_mine`` on the path (and PYTHONPATH, for subprocesses)."""
    (tmp_path / "face_plugin_mine.py").write_text(PLUGIN)
    (tmp_path / "model.ppl").write_text(SRC)
    (tmp_path / "data.json").write_text(json.dumps({"x": 1.0}))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    yield tmp_path
    sys.modules.pop("face_plugin_mine", None)


def _mine(model, data, *, particles, device, tempered=1.0):
    """The plugin's algorithm, defined here for the in-process tests."""
    ns: dict = {}
    exec(PLUGIN.split("\n\nppl.register_method")[0], ns)
    return ns["mine"](model, data, particles=particles, device=device, tempered=tempered)


def _tolerance(p: float, particles: int) -> float:
    # self-normalised IS from the prior: the weights are bounded by 1, ESS >= N * 0.5 here
    return 5 * math.sqrt(p * (1 - p) / (0.5 * particles))


def test_registered_method_runs_through_model_run_and_infer(registry):
    ppl.register_method("mine", _mine, options={"tempered": ppl.OptionSpec("number", low=0, low_open=True)})
    m = ppl.model(SRC)
    res = m.run("mine", {"x": 1.0}, particles=20_000, seed=0)
    assert isinstance(res, ppl.WeightedResult) and res.method == "mine"
    assert float(res.mean()) == pytest.approx(P_A, abs=_tolerance(P_A, 20_000))
    exact = m.run("enumerate", {"x": 1.0})
    assert float(exact.mean()) == pytest.approx(P_A, rel=1e-12)
    # @ppl.infer sees the same method, with the same seed the same answer
    f = ppl.infer(m, method="mine", particles=20_000, seed=0)
    assert float(f(x=1.0).mean()) == float(res.mean())
    # its own option: passed through, and checked by its spec
    half = m.run("mine", {"x": 1.0}, particles=20_000, seed=0, tempered=0.5)
    assert float(half.mean()) != float(res.mean())
    with pytest.raises(ppl.PPLError, match=r"tempered must be a positive finite number \(got -1\)"):
        m.run("mine", {"x": 1.0}, tempered=-1)
    with pytest.raises(ppl.PPLError, match="method 'mine' has no option 'temperd'") as e:
        m.run("mine", {"x": 1.0}, temperd=0.5)
    assert "tempered" in str(e.value)  # did you mean


def test_registered_method_results_are_diagnosed(registry):
    """The population diagnostics and warnings run for a user's method as for a built-in
    one: one particle carrying all the weight is a low-ESS warning."""
    def degenerate(model, data, *, particles, device):
        pop = _mine(model, data, particles=particles, device=device)
        lw = pop.log_weights.clone()
        lw[1:] = -math.inf
        return Population("degenerate", pop.sites, lw)

    ppl.register_method("degenerate", degenerate)
    with pytest.warns(ppl.PPLDiagnosticWarning, match="effective sample size"):
        res = ppl.model(SRC).run("degenerate", {"x": 1.0}, particles=500, seed=0)
    assert res.ess == pytest.approx(1.0) and res.warnings


def test_register_method_refuses_bad_registrations(registry):
    with pytest.raises(ppl.PPLError, match="'smc' is a built-in inference method"):
        ppl.register_method("smc", _mine)
    with pytest.raises(ppl.PPLError, match="must take the keyword argument 'particles'"):
        ppl.register_method("bad", lambda model, data, device: None)
    with pytest.raises(ppl.PPLError, match="option 'steps' is not a parameter of fn"):
        ppl.register_method("bad", _mine, options={"steps": None})
    with pytest.raises(ppl.PPLError, match="a method name must be a word"):
        ppl.register_method("two words", _mine)
    ppl.register_method("mine", _mine)
    with pytest.raises(ppl.PPLError, match="already registered"):
        ppl.register_method("mine", _mine)
    ppl.register_method("mine", _mine, replace=True)
    ppl.register_method("wrong", lambda model, data, *, particles, device: 42)
    with pytest.raises(ppl.PPLError, match="the inference method 'wrong' returned a int"):
        ppl.model(SRC).run("wrong", {"x": 1.0})


def test_cli_plugin_in_process(registry, plugin, capsys):
    rc = main(["run", str(plugin / "model.ppl"), "--data", str(plugin / "data.json"), "--plugin",
               "face_plugin_mine", "--method", "mine", "-n", "20000", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert res["method"] == "mine" and res["particles"] == 20_000 and res["seed"] == 0
    assert res["posterior"]["return"]["mean"] == pytest.approx(P_A, abs=_tolerance(P_A, 20_000))
    # the method's own option through -o, checked by its spec
    rc = main(["run", str(plugin / "model.ppl"), "--data", str(plugin / "data.json"), "--plugin",
               "face_plugin_mine", "--method", "mine", "-o", "tempered=0"])
    assert rc == 1 and "tempered must be a positive finite number" in capsys.readouterr().err


def test_cli_plugin_errors(registry, plugin, capsys):
    rc = main(["run", str(plugin / "model.ppl"), "--plugin", "no_such_plugin_xyz", "--method", "mine"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot import the plugin 'no_such_plugin_xyz'" in err and "Traceback" not in err
    (plugin / "face_plugin_broken.py").write_text("raise RuntimeError('boom')\n")
    rc = main(["run", str(plugin / "model.ppl"), "--plugin", "face_plugin_broken"])
    err = capsys.readouterr().err
    assert rc == 1 and "the plugin 'face_plugin_broken' failed to import: RuntimeError: boom" in err
    sys.modules.pop("face_plugin_broken", None)
    # without the plugin, the method is unknown
    rc = main(["run", str(plugin / "model.ppl"), "--method", "mine"])
    assert rc == 1 and "unknown inference method 'mine'" in capsys.readouterr().err


def test_cli_plugin_subprocess(plugin):
    """``python -m ppl run ... --plugin mod --method mine --json`` in a fresh interpreter,
    and the same through ``PPL_PLUGINS``."""
    args = [sys.executable, "-m", "ppl", "run", str(plugin / "model.ppl"), "--data", str(plugin / "data.json"),
            "--method", "mine", "-n", "20000", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for extra, env_plugins in ((["--plugin", "face_plugin_mine"], None), ([], "face_plugin_mine")):
        run_env = dict(env, **({"PPL_PLUGINS": env_plugins} if env_plugins else {}))
        p = subprocess.run(args + extra, capture_output=True, text=True, env=run_env, timeout=120)
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)
        assert res["method"] == "mine"
        assert res["posterior"]["return"]["mean"] == pytest.approx(P_A, abs=_tolerance(P_A, 20_000))
