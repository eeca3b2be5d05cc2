"""print(...) inside a model (stdlib.printing): per path under exact enumeration, per
particle (the first few) under batched methods, bounded per run, silent on the CLI's JSON
stdout, and never changing a result (same seeded numbers with and without print)."""
from __future__ import annotations

import json

import pytest
import torch

import ppl
from ppl.stdlib import printing

COINS = """
def f():
    a ~ flip(0.5)
    b ~ flip(0.25)
    print("a =", a, "b =", b, 1/3)
    condition a or b
    return a
"""

NORMAL = """
def g(ys):
    mu ~ normal(0, 1)
    {line}
    for y in ys:
        observe y ~ normal(mu, 1)
    return mu
"""


def _model(line: str):
    return ppl.model(NORMAL.format(line=line))


def test_enumerate_prints_each_path_with_its_posterior_probability(capsys):
    r = ppl.model(COINS).run("enumerate", strategy="paths")
    assert r.marginal() == {True: pytest.approx(0.8), False: pytest.approx(0.2)}
    assert capsys.readouterr().out.splitlines() == [
        "[path 0 | p=1/5] a = True b = True 1/3",   # 1/2 * 1/4 / (5/8)
        "[path 1 | p=3/5] a = True b = False 1/3",  # 1/2 * 3/4 / (5/8)
        "[path 2 | p=1/5] a = False b = True 1/3",
        "[path 3 | p=0, cut] a = False b = False 1/3",  # the condition fails on this path
    ]


def test_importance_prints_the_first_particles_with_their_values(capsys):
    r = _model('print("mu", mu)').run("importance", {"ys": [1.0, 2.0]}, particles=100, seed=3)
    lines = capsys.readouterr().out.splitlines()
    mu = r.sites["mu"].value
    k = printing.MAX_PARTICLES
    assert lines == [f"[particle {i}] mu {float(mu[i]):.6g}" for i in range(k)] + [f"... ({100 - k} more particles)"]


def test_a_shared_value_is_printed_once(capsys):
    ppl.model("def h():\n    x ~ flip(0.5)\n    print('start', 2)\n    return x\n").run("importance", particles=10, seed=0)
    assert capsys.readouterr().out.splitlines() == ["[10 particles] start 2"]


@pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning")
@pytest.mark.parametrize("method,options", [
    ("importance", {"particles": 200}),
    ("smc", {"particles": 200}),
    ("mh", {"particles": 2, "samples": 50, "burn_in": 10}),
    ("tempering", {"particles": 100}),
    ("resample_move", {"particles": 100}),
    ("importance", {"particles": 200, "delayed": True}),  # a delayed (lazy) value is shown, not realised
])
def test_results_are_the_same_with_and_without_print(method, options, capsys):
    data = {"ys": [0.5, 1.5, 1.0]}
    plain = _model("pass").run(method, data, seed=11, **options)
    printed = _model('print("mu is", mu, [mu, 1])').run(method, data, seed=11, **options)
    assert capsys.readouterr().out  # it did print
    assert torch.equal(plain.sites["mu"].value, printed.sites["mu"].value)
    if hasattr(plain, "log_weights"):
        assert torch.equal(plain.log_weights, printed.log_weights)
    assert plain.mean("mu") == printed.mean("mu")


def test_enumerate_is_the_same_with_and_without_print(capsys):
    quiet = ppl.model(COINS.replace('print("a =", a, "b =", b, 1/3)', "pass")).run("enumerate")
    loud = ppl.model(COINS).run("enumerate")
    assert quiet.marginal() == loud.marginal() and quiet.log_evidence == loud.log_evidence


def test_output_is_bounded_per_run(capsys, monkeypatch):
    monkeypatch.setattr(printing, "MAX_LINES", 7)
    m = ppl.model("def f(n):\n    for i in range(n):\n        print('step', i)\n    return n\n")
    m.run("importance", {"n": 20}, particles=1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:7] == [f"[particle 0] step {i}" for i in range(7)]
    assert lines[7:] == ["[print] ... 13 more lines not shown (at most 7 per run: ppl.stdlib.printing.MAX_LINES)"]
    m.run("importance", {"n": 2}, particles=1)  # the budget is per run
    assert capsys.readouterr().out.splitlines() == ["[particle 0] step 0", "[particle 0] step 1"]


def test_elimination_prints_nothing_but_says_so(capsys):
    chain = """
def chain(n):
    x ~ flip(0.5)
    for i in range(n):
        x ~ flip(0.9 if x else 0.1)
    print("x", x)
    return x
"""
    r = ppl.model(chain).run("enumerate", {"n": 12}, strategy="elimination")
    assert r.strategy == "elimination"
    out = capsys.readouterr().out.splitlines()
    assert out == ["[print] enumerate ran by variable elimination: the model's print output is not shown "
                   "(strategy='paths' shows it per path)"]


def test_structure_analysis_and_outside_runs_print_nothing(capsys):
    m = _model('print("mu", mu)')
    m.graph({"ys": [1.0]})
    assert capsys.readouterr().out == ""


def test_cli_json_keeps_stdout_json_and_prints_to_stderr(tmp_path, capsys):
    from ppl import cli
    path = tmp_path / "m.ppl"
    path.write_text("def f():\n    a ~ flip(0.5)\n    print('a is', a)\n    return a\n")
    assert cli.main(["run", str(path), "--json", "-n", "3", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n"] == 3
    assert [l.split("]")[0] for l in err.splitlines() if l.startswith("[particle")] == \
        ["[particle 0", "[particle 1", "[particle 2"]


def test_print_is_a_checked_builtin():
    with pytest.raises(ppl.PPLError):
        ppl.model("def f():\n    x ~ flip(0.5)\n    return prnt(x)\n")


@pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning")
def test_mcmc_labels_chains(capsys):
    _model('print("mu", mu)').run("mh", {"ys": [1.0]}, particles=2, seed=0, samples=2, burn_in=0)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[chain 0] mu ") and lines[1].startswith("[chain 1] mu ")
