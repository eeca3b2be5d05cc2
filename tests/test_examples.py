"""The examples in examples/: each model is run the way its header says (the
``python -m ppl run ...`` commands in its comment header, through the CLI with --json,
plus the Python API), and its answer is compared with one computed independently here:
a closed form (scipy/numpy), a Kalman filter, a hand enumeration in Fractions, a dynamic
program, or a plain numpy simulation.

Tolerances (never loosened to make a test pass):
* exact enumeration: equality (Fractions where the model's numbers are exact);
* a posterior mean from importance sampling: within 4.5 Monte Carlo standard errors,
  MCSE = posterior sd / sqrt(ESS) (the sd is the exact one when it is known);
* a posterior sd (Gaussian-shaped posteriors only): within 4.5 * sd / sqrt(2 ESS), the
  standard error of a sample sd at kurtosis 3;
* a probability p: within 4.5 * sqrt(p (1 - p) / ESS);
* a log evidence: within 4.5 delta-method standard errors sqrt(var(w) / N) / mean(w)
  = sqrt((N / ESS - 1) / N) (ESS = 1 / sum of squared normalised weights);
* against a second Monte Carlo estimate (tug of war): 4.5 times the combined SE.

The headers' printed answers are checked too: each must contain the independently
computed numbers at the precision it prints them.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shlex
import subprocess
import sys
from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pytest
from scipy.special import betaln
from scipy.stats import multivariate_normal

import ppl
from ppl import cli

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
STEMS = ["coin", "medical", "trick_coin", "gaussian_mean", "linear_regression", "geometric",
         "state_space", "tug_of_war", "dice"]
Z = 4.5  # standard errors allowed


# ------------------------------------------------------------------------------ helpers
def load(stem):
    return ppl.model(str(EXAMPLES / f"{stem}.ppl")), data(stem)


def data(stem):
    return json.loads((EXAMPLES / f"{stem}.json").read_text())


def header(stem) -> str:
    lines = []
    for line in (EXAMPLES / f"{stem}.ppl").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def header_commands(stem) -> list[list[str]]:
    """The argv (after `python -m ppl`) of every command in the header."""
    cmds = []
    for line in header(stem).splitlines():
        m = re.match(r"#\s+python -m ppl (run .*)$", line)
        if m:
            cmds.append(shlex.split(m.group(1)))
    return cmds


def run_cli(argv) -> dict:
    """`python -m ppl ARGV --json` in this process (from the repository root)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(list(argv) + ["--json"])
    assert rc == 0, f"ppl {' '.join(argv)} exited with {rc}"
    return json.loads(out.getvalue())


def run_header(stem, index=0, *, monkeypatch) -> dict:
    monkeypatch.chdir(ROOT)
    cmds = header_commands(stem)
    assert cmds, f"{stem}.ppl: no `python -m ppl run` command in its header"
    return run_cli(cmds[index])


def logz_se(n, ess):
    """Delta-method SE of log(mean w): sqrt(var(w)/N)/mean(w) = sqrt((N/ESS - 1)/N)."""
    return math.sqrt(max(n / ess - 1.0, 0.0) / n)


def assert_mean(est, exact, sd, ess, what=""):
    mcse = sd / math.sqrt(ess)
    assert abs(est - exact) <= Z * mcse, f"{what}: {est} vs exact {exact} (MCSE {mcse:.3g}, ESS {ess:.0f})"


def assert_sd(est, exact, ess, what=""):
    se = exact / math.sqrt(2 * ess)
    assert abs(est - exact) <= Z * se, f"{what} sd: {est} vs exact {exact} (SE {se:.3g})"


def assert_prob(est, exact, ess, what=""):
    se = math.sqrt(exact * (1 - exact) / ess)
    assert abs(est - exact) <= Z * se, f"{what}: P = {est} vs exact {exact} (SE {se:.3g})"


def assert_logz(est, exact, n, ess, what="log evidence"):
    se = logz_se(n, ess)
    assert abs(est - exact) <= Z * se, f"{what}: {est} vs exact {exact} (SE {se:.3g})"


def assert_header_says(stem, *numbers):
    """Each formatted number appears in the header (the printed answer is right)."""
    h = header(stem)
    for s in numbers:
        assert s in h, f"{stem}.ppl header should state {s}"


# ------------------------------------------------------------------------ the examples
def test_every_example_has_data_header_and_command():
    for stem in STEMS:
        assert (EXAMPLES / f"{stem}.json").exists(), stem
        h = header(stem)
        assert "Expected answer" in h and "Run:" in h, stem
        cmds = header_commands(stem)
        assert cmds and cmds[0][:4] == ["run", f"examples/{stem}.ppl", "--data", f"examples/{stem}.json"], stem
        assert f"{stem}.ppl" in (EXAMPLES / "README.md").read_text(), stem
        m, d = load(stem)
        assert set(d) <= set(m.params), stem


def coin_answer():
    flips = data("coin")["flips"]
    heads = sum(bool(f) for f in flips)
    a, b = 2 + heads, 2 + len(flips) - heads
    mean = a / (a + b)
    sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    # the probability of this particular sequence: B(a, b) / B(2, 2)
    return mean, sd, betaln(a, b) - betaln(2, 2)


def test_coin_cli(monkeypatch):
    mean, sd, logz = coin_answer()
    assert_header_says("coin", f"{mean:.4f}", f"{sd:.4f}", f"{logz:.4f}")
    out = run_header("coin", monkeypatch=monkeypatch)
    assert out["method"] == "importance" and out["n"] == 100_000
    post = out["posterior"]["p"]
    assert post == out["posterior"]["return"]
    assert_mean(post["mean"], mean, sd, out["ess"], "E[p]")
    assert_sd(post["sd"], sd, out["ess"], "p")
    assert_logz(out["log_evidence"], logz, out["n"], out["ess"])


def test_coin_api_decorator_matches_file():
    mean, sd, _ = coin_answer()

    @ppl.infer(method="importance", particles=50_000, seed=1)
    @ppl.model
    def coin(flips):
        """
        p ~ beta(2, 2)
        for f in flips:
            observe f ~ bernoulli(p)
        return p
        """

    r = coin(**data("coin"))
    assert_mean(r.mean("p"), mean, sd, r.ess, "E[p]")
    # the same program from the file with the same seed gives the same particles
    m, d = load("coin")
    r2 = m.run("importance", d, particles=50_000, seed=1)
    assert r2.mean() == pytest.approx(r.mean(), abs=1e-12)


def medical_answer():
    """Hand enumeration over the disease status, in Fractions."""
    d = data("medical")
    prior = F(1, 100)
    rates = {True: (F(9, 10), F(8, 10)), False: (F(8, 100), F(5, 100))}  # P(test positive | disease)
    joint = {}
    for disease in (True, False):
        w = prior if disease else 1 - prior
        for observed, p in zip((d["test1"], d["test2"]), rates[disease]):
            w *= p if observed else 1 - p
        joint[disease] = w
    z = sum(joint.values())
    return joint[True] / z, z


def test_medical_exact(monkeypatch):
    post, z = medical_answer()
    assert (post, z) == (F(20, 31), F(279, 25000))
    assert_header_says("medical", "20/31", "279/25000", f"{float(post):.4f}")
    m, d = load("medical")
    r = m.run("enumerate", d)
    assert r.marginal("disease") == {False: 1 - post, True: post}
    assert r.evidence == z and isinstance(r.evidence, F)
    assert r.mean() == post
    out = run_header("medical", monkeypatch=monkeypatch)
    assert out["method"] == "enumerate" and out["particles"] is None
    assert F(out["evidence"]) == z
    assert out["posterior"]["disease"]["probs"]["true"] == pytest.approx(float(post), abs=1e-12)
    # other test results, through the API: exact Bayes' rule each time
    for t1, t2 in [(True, False), (False, True), (False, False)]:
        r = m.run("enumerate", {"test1": t1, "test2": t2})
        lik = {True: (F(9, 10) if t1 else F(1, 10)) * (F(8, 10) if t2 else F(2, 10)),
               False: (F(8, 100) if t1 else F(92, 100)) * (F(5, 100) if t2 else F(95, 100))}
        zz = F(1, 100) * lik[True] + F(99, 100) * lik[False]
        assert r.marginal()[True] == F(1, 100) * lik[True] / zz


def trick_answer():
    """Hand enumeration over (trick, next flip), in Fractions."""
    flips = data("trick_coin")["flips"]
    joint = {}
    for trick in (True, False):
        prior = F(1, 10) if trick else F(9, 10)
        p = F(95, 100) if trick else F(1, 2)
        w = prior
        for f in flips:
            w *= p if f else 1 - p
        for nxt in (True, False):
            joint[(trick, nxt)] = w * (p if nxt else 1 - p)
    z = sum(joint.values())
    p_trick = (joint[(True, True)] + joint[(True, False)]) / z
    p_next = (joint[(True, True)] + joint[(False, True)]) / z
    return p_trick, p_next, z


def test_trick_coin_exact(monkeypatch):
    p_trick, p_next, z = trick_answer()
    assert_header_says("trick_coin", str(p_trick), f"{float(p_trick):.4f}", f"{float(p_next):.4f}",
                       f"{float(z):.5f}")
    m, d = load("trick_coin")
    r = m.run("enumerate", d)
    assert r.marginal("trick")[True] == p_trick
    assert r.marginal("next_heads")[True] == p_next
    assert r.marginal("return") == r.marginal("trick")
    assert r.evidence == z
    out = run_header("trick_coin", monkeypatch=monkeypatch)
    assert out["posterior"]["next_heads"]["probs"]["true"] == pytest.approx(float(p_next), abs=1e-12)
    assert F(out["evidence"]) == z
    # importance sampling agrees within its Monte Carlo error
    r = m.run("importance", d, particles=20_000, seed=0)
    assert_prob(float(r.marginal("trick")[True]), float(p_trick), r.ess, "P(trick)")
    assert_logz(r.log_evidence, math.log(z), r.n, r.ess)


def gaussian_mean_answer():
    d = data("gaussian_mean")
    ys, s = np.array(d["ys"]), d["sigma"]
    m0, s0 = 0.0, 5.0
    prec = 1 / s0**2 + len(ys) / s**2
    mean = (m0 / s0**2 + ys.sum() / s**2) / prec
    cov = s0**2 * np.ones((len(ys), len(ys))) + s**2 * np.eye(len(ys))
    logz = multivariate_normal(np.full(len(ys), m0), cov).logpdf(ys)
    return mean, prec**-0.5, logz


def test_gaussian_mean(monkeypatch):
    mean, sd, logz = gaussian_mean_answer()
    assert_header_says("gaussian_mean", f"{mean:.4f}", f"{sd:.4f}", f"{logz:.4f}")
    out = run_header("gaussian_mean", monkeypatch=monkeypatch)
    post = out["posterior"]["mu"]
    assert_mean(post["mean"], mean, sd, out["ess"], "E[mu]")
    assert_sd(post["sd"], sd, out["ess"], "mu")
    assert_logz(out["log_evidence"], logz, out["n"], out["ess"])


def linear_regression_answer():
    d = data("linear_regression")
    x, y, s = np.array(d["xs"]), np.array(d["ys"]), d["sigma"]
    X = np.stack([np.ones_like(x), x], 1)
    S0 = 2.0**2 * np.eye(2)
    C = np.linalg.inv(np.linalg.inv(S0) + X.T @ X / s**2)
    mean = C @ X.T @ y / s**2
    logz = multivariate_normal(np.zeros(len(y)), X @ S0 @ X.T + s**2 * np.eye(len(y))).logpdf(y)
    return mean, np.sqrt(np.diag(C)), logz


def test_linear_regression(monkeypatch):
    mean, sd, logz = linear_regression_answer()
    assert_header_says("linear_regression", *(f"{v:.4f}" for v in [*mean, *sd, logz]))
    out = run_header("linear_regression", monkeypatch=monkeypatch)
    post = out["posterior"]
    for i, name in enumerate(["w0", "w1"]):
        assert_mean(post[name]["mean"], mean[i], sd[i], out["ess"], f"E[{name}]")
        assert_sd(post[name]["sd"], sd[i], out["ess"], name)
    assert post["return"] == post["w1"]
    assert_logz(out["log_evidence"], logz, out["n"], out["ess"])


def test_geometric_conditioned(monkeypatch):
    d = data("geometric")
    p, k = d["p"], d["k"]
    mean, sd = k + (1 - p) / p, math.sqrt(1 - p) / p
    assert_header_says("geometric", f"{(1 - p) / p:.4f}", f"{mean:.4f}", f"{sd:.4f}",
                       f"{(1 - p) ** k:.2f}", f"{k * math.log(1 - p):.4f}")
    out = run_header("geometric", 0, monkeypatch=monkeypatch)
    post = out["posterior"]["return"]
    ess, n = out["ess"], out["n"]
    assert_mean(post["mean"], mean, sd, ess, "E[n | n >= k]")
    assert min(int(v) for v in post["probs"]) == k
    for j in range(k, k + 4):  # P(n = j | n >= k) = (1-p)^(j-k) p
        assert_prob(post["probs"].get(str(j), 0.0), (1 - p) ** (j - k) * p, ess, f"P(n={j} | n>={k})")
    # the weights are 0 or 1: log evidence is log(fraction accepted), exactly (1-p)^k
    assert_logz(out["log_evidence"], k * math.log(1 - p), n, ess)


def test_geometric_unconditioned(monkeypatch):
    p = data("geometric")["p"]
    out = run_header("geometric", 1, monkeypatch=monkeypatch)
    assert out["entry"] == "geometric" and out["ess"] == pytest.approx(out["n"])
    assert out["log_evidence"] == pytest.approx(0.0, abs=1e-12)
    post = out["posterior"]["return"]
    assert_mean(post["mean"], (1 - p) / p, math.sqrt(1 - p) / p, out["ess"], "E[n]")
    for j in range(4):
        assert_prob(post["probs"].get(str(j), 0.0), (1 - p) ** j * p, out["ess"], f"P(n={j})")
    # exact enumeration cannot finish an unbounded recursion: it says so
    m, d = load("geometric")
    with pytest.raises(ppl.PPLError, match="recursion"):
        m.run("enumerate", d)


def kalman(ys, a, q, r, x0_sd):
    """Filtering mean and sd of the last state and the log evidence log p(y_1..T)."""
    mean, var, ll = 0.0, x0_sd**2, 0.0
    for y in ys:
        mean, var = a * mean, a * a * var + q * q  # predict x_t
        s = var + r * r  # predictive variance of y_t
        ll += -0.5 * (math.log(2 * math.pi * s) + (y - mean) ** 2 / s)
        gain = var / s
        mean, var = mean + gain * (y - mean), (1 - gain) * var
    return mean, math.sqrt(var), ll


def test_state_space_kalman(monkeypatch):
    d = data("state_space")
    assert len(d["ys"]) == 25
    mean, sd, logz = kalman(**d)
    assert_header_says("state_space", f"{mean:.4f}", f"{sd:.4f}", f"{logz:.4f}")
    out = run_header("state_space", monkeypatch=monkeypatch)
    post = out["posterior"]["return"]
    assert_mean(post["mean"], mean, sd, out["ess"], "E[x_T]")
    assert_sd(post["sd"], sd, out["ess"], "x_T")
    assert_logz(out["log_evidence"], logz, out["n"], out["ess"])


def batch_gaussian(ys, a, q, r, x0_sd):
    """The exact joint posterior of the latents z = (x0, eps_1..T) by Gaussian conditioning
    (x = A z is linear in z, y = x + noise): (mean of z, cov of z, A)."""
    T = len(ys)
    A = np.zeros((T, T + 1))  # x_t = a^t x0 + sum_{s<=t} a^(t-s) eps_s
    for t in range(1, T + 1):
        A[t - 1, 0] = a**t
        for s in range(1, t + 1):
            A[t - 1, s] = a ** (t - s)
    prior = np.diag([x0_sd**2] + [q**2] * T)
    gain = prior @ A.T @ np.linalg.inv(A @ prior @ A.T + r**2 * np.eye(T))
    return gain @ np.asarray(ys), prior - gain @ A @ prior, A


def test_state_space_api_other_seed_all_states():
    m, d = load("state_space")
    mean, sd, logz = kalman(**d)
    zm, zc, A = batch_gaussian(**d)
    # two independent exact computations agree on the final state
    assert (A @ zm)[-1] == pytest.approx(mean, abs=1e-9)
    assert math.sqrt((A @ zc @ A.T)[-1, -1]) == pytest.approx(sd, abs=1e-9)
    r = m.run("importance", d, particles=100_000, seed=7)
    assert_mean(r.mean(), mean, sd, r.ess, "E[x_T]")
    assert_logz(r.log_evidence, logz, r.n, r.ess)
    # the smoothed posterior of the first state and of some of the noise terms
    for name, i in [("x0", 0), ("eps[0]", 1), ("eps[12]", 13), ("eps[24]", 25)]:
        assert_mean(r.mean(name), zm[i], math.sqrt(zc[i, i]), r.ess, f"E[{name}]")
        assert_sd(r.sd(name), math.sqrt(zc[i, i]), r.ess, name)


def tug_of_war_simulation(n=1_000_000, seed=0):
    """Rejection sampling in numpy: (E[alice], its SE, P(matches), sd of alice)."""
    matches = data("tug_of_war")["matches"]
    people = sorted({p for match in matches for team in match for p in team})
    col = {p: i for i, p in enumerate(people)}
    rng = np.random.default_rng(seed)
    strength = rng.standard_normal((n, len(people)))
    ok = np.ones(n, bool)
    for winners, losers in matches:
        lazy = rng.random((n, len(people))) < 0.25
        pulling = np.where(lazy, strength / 2, strength)
        ok &= pulling[:, [col[p] for p in winners]].sum(1) > pulling[:, [col[p] for p in losers]].sum(1)
    alice = strength[ok, col["alice"]]
    return alice.mean(), alice.std() / math.sqrt(len(alice)), ok.mean(), alice.std()


def test_tug_of_war_against_simulation(monkeypatch):
    sim_mean, sim_se, sim_p, sim_sd = tug_of_war_simulation()
    n_sim = 1_000_000
    assert_header_says("tug_of_war", f"{sim_mean:.2f}", f"{sim_p:.3f}")
    out = run_header("tug_of_war", monkeypatch=monkeypatch)
    post = out["posterior"]["return"]
    se = math.hypot(post["sd"] / math.sqrt(out["ess"]), sim_se)
    assert abs(post["mean"] - sim_mean) <= Z * se, (post["mean"], sim_mean, se)
    se_logz = math.hypot(logz_se(out["n"], out["ess"]), math.sqrt((1 - sim_p) / (sim_p * n_sim)))
    assert abs(out["log_evidence"] - math.log(sim_p)) <= Z * se_logz, (out["log_evidence"], math.log(sim_p))
    # hard conditions: every weight is 0 or 1, so the ESS is the number accepted
    assert out["ess"] == pytest.approx(round(out["ess"]), abs=1e-6)


def dice_answer(target):
    """Exact, by dynamic programming: (P(hit target exactly), {rolls: P(rolls | hit)},
    {first roll: P(first roll | hit)})."""
    # reach[k][t] = P(after k rolls the total is t, and every earlier total was < target)
    reach = [{0: F(1)}]
    hit = {}
    while reach[-1]:
        k = len(reach)
        nxt = {}
        for t, pr in reach[-1].items():
            for face in range(1, 7):
                u = t + face
                if u < target:
                    nxt[u] = nxt.get(u, 0) + pr / 6
                elif u == target:
                    hit[k] = hit.get(k, 0) + pr / 6
        reach.append(nxt)
    z = sum(hit.values())
    # first roll j: then the remaining total target - j must be hit exactly from 0
    h = [F(1)] + [F(0)] * target
    for s in range(1, target + 1):
        h[s] = sum(h[s - j] for j in range(1, 7) if j <= s) / 6
    first = {j: F(1, 6) * h[target - j] / h[target] for j in range(1, 7) if j <= target}
    assert h[target] == z
    return z, {k: v / z for k, v in hit.items()}, first


def test_dice_exact(monkeypatch):
    target = data("dice")["target"]
    z, rolls, first = dice_answer(target)
    mean = sum(k * p for k, p in rolls.items())
    assert_header_says("dice", f"{float(z):.4f}", f"{float(mean):.3f}",
                       *(f"{float(rolls[k]):.4f}" for k in (2, 3, 4, 5)))
    m, d = load("dice")
    r = m.run("enumerate", d)
    assert r.evidence == z
    assert r.marginal() == rolls
    assert r.mean() == mean
    assert r.marginal("roll[0]") == first
    assert r.presence("roll[2]") == sum(p for k, p in rolls.items() if k > 2)
    out = run_header("dice", 0, monkeypatch=monkeypatch)
    assert F(out["evidence"]) == z
    assert out["posterior"]["return"]["mean"] == pytest.approx(float(mean), rel=1e-12)


def test_dice_importance(monkeypatch):
    target = data("dice")["target"]
    z, rolls, first = dice_answer(target)
    mean = float(sum(k * p for k, p in rolls.items()))
    sd = math.sqrt(float(sum(k * k * p for k, p in rolls.items())) - mean**2)
    out = run_header("dice", 1, monkeypatch=monkeypatch)
    assert out["method"] == "importance"
    post = out["posterior"]["return"]
    assert_mean(post["mean"], mean, sd, out["ess"], "E[rolls]")
    for k in (2, 3, 4):
        assert_prob(post["probs"].get(str(k), 0.0), float(rolls[k]), out["ess"], f"P(rolls={k})")
    assert_logz(out["log_evidence"], math.log(z), out["n"], out["ess"])


def test_cli_subprocess_medical():
    """The real command line, as a user types it (one subprocess: torch imports are slow)."""
    cmd = header_commands("medical")[0]
    proc = subprocess.run([sys.executable, "-m", "ppl", *cmd, "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert F(out["evidence"]) == medical_answer()[1]
    assert out["posterior"]["return"]["probs"]["true"] == pytest.approx(20 / 31, abs=1e-12)
