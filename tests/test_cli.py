"""The command line (``ppl.cli``, ``python -m ppl``): output, JSON, exit codes, errors.

Most tests call ``ppl.cli.main([...])`` in-process and read stdout/stderr with capsys;
two run a real ``python -m ppl`` subprocess. Model and data files live in tmp_path.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

from ppl.cli import main
from ppl.inference import METHODS

torch.set_num_threads(1)

COIN = """\
def coin(flips, a=1, b=1):
    p ~ beta(a, b)
    for f in flips:
        observe f ~ bernoulli(p)
    return p
"""

# fair (p = 1/2) or trick (p = 9/10) coin, a priori equally likely
TRICK = """\
def trick(flips, prior=0.5):
    fair ~ bernoulli(prior)
    p = 0.5 if fair else 0.9
    for f in flips:
        observe f ~ bernoulli(p)
    return fair
"""

TWO = """\
def first(n):
    k ~ categorical([1, 1, 1, 1])
    return k + n

def second(x):
    return x
"""


@pytest.fixture
def files(tmp_path):
    """Write files into tmp_path: files(name=text, ...) -> {name: path string}."""
    def write(**named):
        out = {}
        for name, text in named.items():
            path = tmp_path / name.replace("_", ".", 1) if "." not in name else tmp_path / name
            path.write_text(text if isinstance(text, str) else json.dumps(text))
            out[name] = str(path)
        return out
    return write


def cli(capsys, *args):
    """(exit code, stdout, stderr) of ``ppl.cli.main(args)``."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, out, err, *fragments):
    assert rc == 1, err
    assert out == ""
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, f"{f!r} not in:\n{err}"


# --------------------------------------------------------------------------------- run
def test_run_prints_summary(capsys, files):
    f = files(coin_ppl=COIN, data_json={"flips": [1, 1, 0, 1]})
    rc, out, err = cli(capsys, "run", f["coin_ppl"], "--data", f["data_json"])
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("importance: N=1000, ESS=")  # the defaults: importance, 1000
    assert lines[1].split()[:6] == ["name", "mean", "sd", "5%", "50%", "95%"]
    assert [l.split()[0] for l in lines[2:]] == ["return", "p"]
    assert "Traceback" not in err


def test_enumerate_json_is_exact(capsys, files):
    flips = [1, 1, 0, 1]
    f = files(trick_ppl=TRICK, data_json={"flips": flips})
    rc, out, err = cli(capsys, "run", f["trick_ppl"], "--data", f["data_json"], "--method", "enumerate", "--json")
    assert rc == 0, err
    res = json.loads(out)  # exactly one JSON object on stdout
    # by hand: P(flips | fair) = (1/2)^4, P(flips | trick) = (9/10)^3 (1/10)
    like_fair, like_trick = Fraction(1, 16), Fraction(729, 10000)
    z = Fraction(1, 2) * like_fair + Fraction(1, 2) * like_trick
    p_fair = Fraction(1, 2) * like_fair / z
    assert p_fair == Fraction(625, 1354)
    assert res["method"] == "enumerate"
    assert res["ess"] is None and res["particles"] is None
    assert res["entry"] == "trick" and res["model"] == f["trick_ppl"] and res["seed"] == 0
    assert Fraction(res["evidence"]) == z
    assert res["log_evidence"] == pytest.approx(math.log(z), rel=1e-12)
    for site in ("return", "fair"):
        post = res["posterior"][site]
        assert post["probs"] == pytest.approx({"true": float(p_fair), "false": float(1 - p_fair)}, rel=1e-12)
        assert post["mean"] == pytest.approx(float(p_fair), rel=1e-12)
        assert post["sd"] == pytest.approx(math.sqrt(float(p_fair * (1 - p_fair))), rel=1e-12)


def test_data_overrides_defaults(capsys, files):
    f = files(trick_ppl=TRICK, data_json={"flips": [1], "prior": 0.2})
    rc, out, err = cli(capsys, "run", f["trick_ppl"], "--data", f["data_json"], "--method", "enumerate", "--json")
    assert rc == 0, err
    p_fair = Fraction(1, 5) * Fraction(1, 2) / (Fraction(1, 5) * Fraction(1, 2) + Fraction(4, 5) * Fraction(9, 10))
    assert json.loads(out)["posterior"]["fair"]["probs"]["true"] == pytest.approx(float(p_fair), rel=1e-12)


def test_importance_json_matches_beta_posterior(capsys, files):
    flips = [1, 1, 0, 1, 1, 0, 1, 1]
    a, b = 2, 2
    f = files(coin_ppl=COIN, data_json={"flips": flips, "a": a, "b": b})
    n = 4000
    rc, out, err = cli(capsys, "run", f["coin_ppl"], "--data", f["data_json"], "-n", n, "--seed", 3, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert set(res) >= {"method", "log_evidence", "ess", "posterior", "model", "entry", "particles", "seed"}
    assert res["method"] == "importance" and res["particles"] == n and res["seed"] == 3 and res["entry"] == "coin"
    assert 1 < res["ess"] <= n
    heads = sum(flips)
    a1, b1 = a + heads, b + len(flips) - heads  # Beta(8, 4)
    exact_mean = a1 / (a1 + b1)
    exact_sd = math.sqrt(a1 * b1 / ((a1 + b1) ** 2 * (a1 + b1 + 1)))
    post = res["posterior"]["p"]
    mcse = post["sd"] / math.sqrt(res["ess"])  # self-normalised IS: sd / sqrt(ESS)
    assert abs(post["mean"] - exact_mean) < 4 * mcse
    assert post["sd"] == pytest.approx(exact_sd, rel=0.1)
    assert post["q05"] < post["q50"] < post["q95"]
    assert res["posterior"]["return"]["mean"] == post["mean"]
    # evidence: B(a1, b1) / B(a, b)
    log_beta = lambda x, y: math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)  # noqa: E731
    assert res["log_evidence"] == pytest.approx(log_beta(a1, b1) - log_beta(a, b), abs=0.08)


def test_reproducible_by_default(capsys, files):
    f = files(coin_ppl=COIN, data_json={"flips": [1, 0, 1]})
    args = ["run", f["coin_ppl"], "--data", f["data_json"], "--json", "-n", "200"]
    first = cli(capsys, *args)
    again = cli(capsys, *args)
    seed0 = cli(capsys, *args, "--seed", "0")
    other = cli(capsys, *args, "--seed", "1")
    assert first[0] == again[0] == seed0[0] == other[0] == 0
    assert first[1] == again[1] == seed0[1]
    assert json.loads(first[1])["posterior"]["p"]["mean"] != json.loads(other[1])["posterior"]["p"]["mean"]


def test_entry_option(capsys, files):
    f = files(two_ppl=TWO, data_json={"n": 10})
    rc, out, err = cli(capsys, "run", f["two_ppl"], "--data", f["data_json"], "--entry", "first",
                       "--method", "enumerate", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["entry"] == "first"
    assert res["posterior"]["return"]["probs"] == {str(k): 0.25 for k in range(10, 14)}


def test_prior_method_and_registry_choices(capsys, files):
    f = files(coin_ppl=COIN, data_json={"flips": [1, 1, 1, 1, 1, 1]})
    rc, out, err = cli(capsys, "run", f["coin_ppl"], "--data", f["data_json"], "--method", "prior", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["method"] == "prior"
    assert res["posterior"]["p"]["mean"] == pytest.approx(0.5, abs=0.05)  # observations ignored
    # --help lists every registered method
    assert main(["run", "--help"]) == 0
    help_text = capsys.readouterr().out
    for name in METHODS:
        assert name in help_text


def test_new_methods_are_accepted_automatically(capsys, files, monkeypatch):
    seen = {}

    def fake(model, data, **options):
        seen.update(options, data=data)
        return METHODS["enumerate"](model, data)

    monkeypatch.setitem(METHODS, "fake_exact", fake)
    f = files(trick_ppl=TRICK, data_json={"flips": [1]})
    rc, out, err = cli(capsys, "run", f["trick_ppl"], "--data", f["data_json"], "--method", "fake_exact", "-n", 7)
    assert rc == 0, err
    assert seen["particles"] == 7 and seen["data"] == {"flips": [1]}
    assert out.startswith("enumerate:")


def test_plot_writes_png(capsys, files, tmp_path):
    f = files(coin_ppl=COIN, data_json={"flips": [1, 0]})
    png = tmp_path / "post.png"
    rc, out, err = cli(capsys, "run", f["coin_ppl"], "--data", f["data_json"], "-n", "200", "--json",
                       "--plot", png)
    assert rc == 0, err
    json.loads(out)  # the message about the plot went to stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in err


# ------------------------------------------------------------------------------- check
def test_check_ok(capsys, files):
    f = files(two_ppl=TWO, coin_ppl=COIN)
    rc, out, err = cli(capsys, "check", f["two_ppl"])
    assert (rc, err) == (0, "")
    assert out == f"ok: {f['two_ppl']} (functions: first, second; entry: second(x))\n"
    rc, out, _ = cli(capsys, "check", f["two_ppl"], "--entry", "first")
    assert rc == 0 and out.endswith("entry: first(n))\n")
    rc, out, _ = cli(capsys, "check", f["coin_ppl"])
    assert rc == 0 and out.endswith("(functions: coin; entry: coin(flips, a=1, b=1))\n")


def test_check_failures(capsys, files):
    f = files(bad_ppl="def m(x):\n    y ~ normall(x, 1)\n    return y\n", two_ppl=TWO)
    rc, out, err = cli(capsys, "check", f["bad_ppl"])
    assert_user_error(rc, out, err, f"{f['bad_ppl']}:2:9: error: unknown name 'normall'",
                      "    y ~ normall(x, 1)", "^^^^^^^", "hint: did you mean 'normal'?")
    rc, out, err = cli(capsys, "check", f["two_ppl"], "--entry", "frist")
    assert_user_error(rc, out, err, "no function named 'frist'", "did you mean 'first'?")


# ------------------------------------------------------------------------------ errors
def test_syntax_error(capsys, files):
    f = files(bad_ppl="def m(x)\n    return x\n", data_json={"x": 1})
    rc, out, err = cli(capsys, "run", f["bad_ppl"], "--data", f["data_json"])
    assert_user_error(rc, out, err, f"{f['bad_ppl']}:1:9: syntax error: expected ':'", "def m(x)",
                      "hint: end the 'def' line with ':'")
    lines = err.splitlines()
    caret = next(l for l in lines if l.strip() == "^")
    assert caret.index("^") == lines[1].index("def m(x)") + len("def m(x)")


def test_unknown_distribution(capsys, files):
    f = files(bad_ppl="def m():\n    b ~ bernouli(0.5)\n    return b\n")
    rc, out, err = cli(capsys, "run", f["bad_ppl"], "--method", "enumerate")
    assert_user_error(rc, out, err, ":2:9: error: unknown name 'bernouli'", "did you mean 'bernoulli'?")


def test_missing_data_for_required_parameter(capsys, files):
    f = files(coin_ppl=COIN, data_json={"a": 2})
    rc, out, err = cli(capsys, "run", f["coin_ppl"])
    assert_user_error(rc, out, err, f"{f['coin_ppl']}:1:10: error: no data for the required parameter 'flips'",
                      "def coin(flips, a=1, b=1):", "--data")
    rc, out, err = cli(capsys, "run", f["coin_ppl"], "--data", f["data_json"])
    assert_user_error(rc, out, err, "'flips'", f"add it to {f['data_json']}")


def test_data_naming_no_parameter(capsys, files):
    f = files(coin_ppl=COIN, data_json={"flip": [1, 0]})
    rc, out, err = cli(capsys, "run", f["coin_ppl"], "--data", f["data_json"])
    assert_user_error(rc, out, err, "'flip'", "has no such parameter", "did you mean 'flips'?")


def test_bad_json(capsys, files):
    f = files(coin_ppl=COIN, data_json='{"flips": [1, 0,\n  1,, 0]}\n')
    rc, out, err = cli(capsys, "run", f["coin_ppl"], "--data", f["data_json"])
    assert_user_error(rc, out, err, f"{f['data_json']}:2:5: error: invalid JSON", "line 2, column 5",
                      "  1,, 0]}")
    lines = err.splitlines()
    assert lines[2].index("^") == lines[1].index(",,") + 1  # the caret under the second comma


def test_data_must_be_object(capsys, files):
    f = files(coin_ppl=COIN, data_json="[1, 0, 1]")
    rc, out, err = cli(capsys, "run", f["coin_ppl"], "--data", f["data_json"])
    assert_user_error(rc, out, err, "must contain a JSON object, not a JSON array")


def test_unusable_data_value(capsys, files):
    f = files(coin_ppl=COIN, data_json={"flips": {"0": 1}})
    rc, out, err = cli(capsys, "run", f["coin_ppl"], "--data", f["data_json"])
    assert_user_error(rc, out, err, "data 'flips' has a type a model cannot use: dict")


def test_unknown_method(capsys, files):
    f = files(coin_ppl=COIN, data_json={"flips": [1]})
    rc, out, err = cli(capsys, "run", f["coin_ppl"], "--data", f["data_json"], "--method", "enumrate")
    assert_user_error(rc, out, err, "unknown inference method 'enumrate'", "did you mean 'enumerate'?")


@pytest.mark.parametrize("method", ["importance", "enumerate"])
def test_zero_evidence(capsys, files, method):
    f = files(m_ppl="def m():\n    x ~ bernoulli(0.5)\n    condition False\n    return x\n")
    rc, out, err = cli(capsys, "run", f["m_ppl"], "--method", method, "-n", "50")
    assert_user_error(rc, out, err, "weight zero", "hint:")


def test_runtime_error_points_at_statement(capsys, files):
    f = files(m_ppl="def m():\n    s ~ uniform(1, 2)\n    x ~ normal(0, -s)\n    return x\n")
    rc, out, err = cli(capsys, "run", f["m_ppl"], "-n", "20")
    assert_user_error(rc, out, err, f"{f['m_ppl']}:3:5: runtime error: normal: parameter 'scale' must be positive",
                      "    x ~ normal(0, -s)", "^^^^")


def test_enumerate_continuous(capsys, files):
    f = files(m_ppl="def m():\n    x ~ normal(0, 1)\n    return x\n")
    rc, out, err = cli(capsys, "run", f["m_ppl"], "--method", "enumerate")
    assert_user_error(rc, out, err, ":2:5: runtime error: normal is a continuous distribution", "hint:")


def test_missing_files(capsys, tmp_path, files):
    rc, out, err = cli(capsys, "run", tmp_path / "nope.ppl")
    assert_user_error(rc, out, err, "model file", "nope.ppl", "not found")
    rc, out, err = cli(capsys, "check", tmp_path / "nope.ppl")
    assert_user_error(rc, out, err, "not found")
    f = files(coin_ppl=COIN)
    rc, out, err = cli(capsys, "run", f["coin_ppl"], "--data", tmp_path / "nope.json")
    assert_user_error(rc, out, err, "data file", "nope.json", "not found")


def test_bad_particles(capsys, files):
    f = files(coin_ppl=COIN, data_json={"flips": [1]})
    rc, out, err = cli(capsys, "run", f["coin_ppl"], "--data", f["data_json"], "-n", "0")
    assert_user_error(rc, out, err, "--particles must be at least 1")


def test_usage_errors_exit_2(capsys, files):
    f = files(coin_ppl=COIN)
    assert main([]) == 2
    assert main(["run", f["coin_ppl"], "--device", "gpu"]) == 2
    assert main(["run", f["coin_ppl"], "-n", "many"]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def test_internal_error(capsys, files, monkeypatch):
    def broken(model, data, **options):
        raise KeyError("oops")

    monkeypatch.setitem(METHODS, "broken", broken)
    f = files(trick_ppl=TRICK, data_json={"flips": [1]})
    args = ["run", f["trick_ppl"], "--data", f["data_json"], "--method", "broken"]
    monkeypatch.delenv("PPL_DEBUG", raising=False)
    rc, out, err = cli(capsys, *args)
    assert rc == 2 and out == ""
    assert err.startswith("internal error: KeyError") and "Traceback" not in err and "PPL_DEBUG=1" in err
    monkeypatch.setenv("PPL_DEBUG", "1")
    rc, out, err = cli(capsys, *args)
    assert rc == 2 and err.startswith("internal error: KeyError")
    assert "Traceback (most recent call last)" in err and "in broken" in err


# -------------------------------------------------------------------------- subprocess
def _python_m_ppl(*args, cwd):
    env = dict(os.environ)
    env.pop("PPL_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "ppl", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_python_dash_m_ppl(files, tmp_path):
    f = files(trick_ppl=TRICK, data_json={"flips": [1, 1, 0, 1]}, bad_ppl="def m():\n    import os\n")
    ok = _python_m_ppl("run", f["trick_ppl"], "--data", f["data_json"], "--method", "enumerate", "--json",
                       "--plot", tmp_path / "p.png", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    res = json.loads(ok.stdout)  # stdout is exactly one JSON document
    assert res["posterior"]["fair"]["probs"]["true"] == pytest.approx(625 / 1354, rel=1e-12)
    assert (tmp_path / "p.png").exists()

    bad = _python_m_ppl("run", f["bad_ppl"], cwd=tmp_path)
    assert bad.returncode == 1 and bad.stdout == ""
    assert f"{f['bad_ppl']}:2:5: syntax error: 'import' is not supported in ppl" in bad.stderr
    assert "^^^^^^" in bad.stderr and "hint: models cannot import" in bad.stderr
    assert "Traceback" not in bad.stderr
