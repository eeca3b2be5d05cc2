"""SMC (``ppl.inference.smc``, ``Model.run("smc", ...)``) against Kalman filters, exact
enumeration and closed forms.

Error bars. After resampling, the particles are correlated copies, so the spread of the
final weights (``ppl.testing.montecarlo``) understates an SMC estimate's error. Every
comparison here instead runs R independent replicates (seeds 0..R-1) and uses the
replicates' own standard error sd / sqrt(R):

* the evidence: Z_hat is unbiased, so mean(Z_hat / Z) must be within Z_T SEs of 1; and
  log Z_hat is asymptotically normal with mean log Z - s^2 / 2 (s^2 its variance), so
  mean(log Z_hat) + s^2 / 2 must be within Z_T SEs of log Z;
* a posterior expectation (self-normalised, bias O(1/N), negligible here): the mean of the
  replicates' estimates within Z_T SEs of the truth.

With R = 20 replicates the standardised error is a t statistic with 19 degrees of freedom:
|t| > Z_T = 5 has probability ~1e-4 for a correct sampler. For a rare value of a discrete
return, hit only a few times per run, the replicates' SE is itself unreliable (skewed,
often 0): it is floored at the binomial SE of the N * R equally weighted particles that
the runs end with, as ``montecarlo.kish_se`` does for importance sampling. Seeds are
fixed, so the tests are deterministic.
"""
import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats as ss
import torch

import ppl
from ppl.inference.smc import SMCHandler, smc
from ppl.testing.montecarlo import particle_keys

torch.set_num_threads(1)

SCHEMES = ["multinomial", "stratified", "systematic", "residual"]
Z_T = 5.0
R = 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def t_check(values, truth, what, floor=0.0):
    """mean(values) within Z_T replicate standard errors of truth (the SE at least ``floor``)."""
    v = np.asarray(values, dtype=np.float64)
    mean, se = v.mean(), max(v.std(ddof=1) / math.sqrt(len(v)), floor)
    if se == 0:
        assert mean == pytest.approx(truth, abs=1e-9), f"{what}: {mean} vs {truth} (no spread)"
        return
    assert abs(mean - truth) <= Z_T * se, \
        f"{what}: mean {mean:.6g} vs truth {truth:.6g}: {abs(mean - truth) / se:.2f} SE (SE {se:.3g})"


def check_evidence(log_zs, log_z, what="evidence"):
    lz = np.asarray(log_zs, dtype=np.float64)
    t_check(np.exp(lz - log_z), 1.0, f"{what}: Z_hat / Z")
    t_check(lz + lz.var(ddof=1) / 2, log_z, f"{what}: log Z_hat + s^2/2")


# ------------------------------------------------------------------ linear-Gaussian SSM
SSM = """
def ssm(ys, a, q, r, s0):
    x ~ normal(0, s0)
    for t in range(len(ys)):
        if t > 0:
            x ~ normal(a * x, q)
        observe ys[t] ~ normal(x, r)
    return x
"""
A, Q, RR, S0, T = 0.9, 0.5, 1.0, 1.0, 50


def simulate(T, seed=1, a=A, q=Q, r=RR, s0=S0):
    rng = np.random.default_rng(seed)
    x, ys = rng.normal(0, s0), []
    for t in range(T):
        if t > 0:
            x = a * x + rng.normal(0, q)
        ys.append(float(x + rng.normal(0, r)))
    return ys


def kalman(ys, a, q, r, s0, transition_first=False):
    """log p(y_1..T) and the filtering mean/sd of the last state. ``transition_first``:
    x_0 ~ N(0, s0^2) and every observation follows a transition (examples/state_space)."""
    m, v, ll = 0.0, s0**2, 0.0
    for t, y in enumerate(ys):
        if t > 0 or transition_first:
            m, v = a * m, a * a * v + q * q
        sv = v + r * r
        ll += ss.norm.logpdf(y, m, math.sqrt(sv))
        k = v / sv
        m, v = m + k * (y - m), (1 - k) * v
    return ll, m, math.sqrt(v)


YS = simulate(T)
DATA = {"ys": YS, "a": A, "q": Q, "r": RR, "s0": S0}
SSM_MODEL = ppl.model(SSM)


@pytest.mark.parametrize("scheme, threshold", [(s, 1.0) for s in SCHEMES] + [("systematic", 0.5)])
def test_ssm_against_kalman(scheme, threshold):
    ll, m, sd = kalman(YS, A, Q, RR, S0)
    N = 1000
    log_zs, means, second = [], [], []
    for seed in range(R):
        r = SSM_MODEL.run("smc", DATA, particles=N, seed=seed, resampling=scheme, ess_threshold=threshold)
        log_zs.append(r.log_evidence)
        x = r.samples["return"].double()
        means.append(float((r.weights * x).sum()))
        second.append(float((r.weights * (x - m) ** 2).sum()))
        hist = r.extra["history"]
        assert len(hist) == T and r.ess_history == [h.ess for h in hist]
        if threshold == 1.0:
            assert all(h.resampled for h in hist)
        assert hist[-1].log_evidence == pytest.approx(r.log_evidence, abs=1e-9)
    check_evidence(log_zs, ll, f"{scheme} log evidence")
    t_check(means, m, f"{scheme}: E[x_T | ys]")
    t_check(second, sd**2, f"{scheme}: Var[x_T | ys]")


def test_adaptive_resampling_follows_the_ess():
    """ess_threshold = 0.5: resample exactly when ESS < N / 2, the ESS being that of the
    weights accumulated since the last resampling."""
    N = 500
    before, after = [], []

    class Recording(SMCHandler):
        def _checkpoint(self, eff):
            sync = eff.ctx.M == self.N
            if sync:
                before.append(self.log_weights.clone())
            super()._checkpoint(eff)
            if sync:
                after.append(self.log_weights.clone())

    m = SSM_MODEL
    torch.manual_seed(4)
    _, lw, h = smc(m.interpreter(), m.entry, m.prepare_data(DATA, "cpu"), N, "cpu",
                   resampling="stratified", ess_threshold=0.5, handler_cls=Recording)
    assert len(h.history) == len(before) == T
    flags = [rec.resampled for rec in h.history]
    assert 0 < sum(flags) < T, "the ESS threshold should resample at some steps, not all"
    for rec, pre, post in zip(h.history, before, after):
        w = torch.softmax(pre, 0)
        assert rec.ess == pytest.approx(float(1 / (w * w).sum()), rel=1e-9)
        assert rec.resampled == (rec.ess < 0.5 * N)
        # a resampling resets the weights; otherwise they keep accumulating
        assert torch.equal(post, torch.zeros_like(pre)) if rec.resampled else torch.equal(post, pre)
    assert torch.equal(lw, after[-1] + h.log_z)
    # the result's history is the same through Model.run
    r = m.run("smc", DATA, particles=N, seed=4, resampling="stratified", ess_threshold=0.5)
    assert [x.resampled for x in r.extra["history"]] == flags
    assert r.ess_history == [x.ess for x in h.history]
    assert r.log_evidence == pytest.approx(h.history[-1].log_evidence, abs=1e-9)


def test_no_resampling_is_likelihood_weighting():
    """ess_threshold = 0 never resamples: the same draws and weights as importance sampling."""
    data = {**DATA, "ys": YS[:10]}
    a = SSM_MODEL.run("smc", data, particles=2000, seed=9, ess_threshold=0.0)
    b = SSM_MODEL.run("importance", data, particles=2000, seed=9)
    assert not any(h.resampled for h in a.extra["history"])
    assert torch.equal(a.samples["return"], b.samples["return"])
    assert torch.allclose(a.log_weights.double(), b.log_weights.double(), rtol=1e-5, atol=1e-4)
    assert a.log_evidence == pytest.approx(b.log_evidence, abs=1e-4)


def test_seeds_reproduce_exactly():
    runs = [SSM_MODEL.run("smc", DATA, particles=300, seed=s, resampling=sch)
            for s, sch in [(7, "multinomial"), (7, "multinomial"), (8, "multinomial"), (7, "residual"),
                           (7, "residual")]]
    same, other = runs[0], runs[1]
    assert torch.equal(same.log_weights, other.log_weights)
    for name in same.names:
        assert torch.equal(same.samples[name], other.samples[name]), name
    assert [h.ess for h in same.extra["history"]] == [h.ess for h in other.extra["history"]]
    assert runs[0].log_evidence != runs[2].log_evidence
    assert torch.equal(runs[3].samples["return"], runs[4].samples["return"])


# ------------------------------------------------------------ discrete models vs exact
def replicate_vs_exact(model, data=None, *, particles, schemes, seeds=R, projections=None):
    """R replicate SMC runs per scheme, compared with exact enumeration: the probability of
    every value of the return value (or of each of its ``projections``, functions of it),
    t-tested over the replicates; no weight on impossible values; the evidence. Returns the
    last result."""
    data = data or {}
    exact = model.run("enumerate", data)
    truth = {k: float(p) for k, p in exact.probs().items()}
    projections = projections or [lambda v: v]
    last = None
    for scheme in schemes:
        tables = [[] for _ in projections]
        log_zs = []
        for seed in range(seeds):
            r = model.run("smc", data, particles=particles, seed=seed, resampling=scheme)
            keys = particle_keys(r.sites["return"])
            weighted = [(k, w) for k, w in zip(keys, r.weights.tolist()) if w > 0]
            impossible = {k for k, _ in weighted if k not in truth}
            assert not impossible, f"{scheme}: values {impossible} have weight but probability 0"
            for proj, tabs in zip(projections, tables):
                t: dict = {}
                for k, w in weighted:
                    t[proj(k)] = t.get(proj(k), 0.0) + w
                tabs.append(t)
            log_zs.append(r.log_evidence)
            last = r
        for j, (proj, tabs) in enumerate(zip(projections, tables)):
            marginal: dict = {}
            for k, p in truth.items():
                marginal[proj(k)] = marginal.get(proj(k), 0.0) + p
            for v, p in marginal.items():
                # a rare value is hit a few times per run, if at all: its replicate SE is
                # itself unreliable, so it is floored at the binomial SE of the N * R
                # equally weighted particles the runs end with (as montecarlo.kish_se)
                floor = math.sqrt(p * (1 - p) / (particles * seeds))
                t_check([t.get(v, 0.0) for t in tabs], p, f"{scheme}: P(projection {j} = {v!r})", floor)
        check_evidence(log_zs, float(exact.log_evidence), f"{scheme} evidence")
    return last


BRANCHY = """
def m():
    z ~ flip(0.3)
    k ~ categorical([1, 2, 3])
    if z:
        observe True ~ bernoulli(0.9)
        j ~ categorical([1, 1])
        observe k % 2 ~ bernoulli(0.8)
        k = k + j
    else:
        observe True ~ bernoulli(0.2)
    always ~ flip(1.0)
    if always:
        observe k ~ categorical([1, 2, 3, 1])
    observe (k + 1) % 2 ~ bernoulli(0.7)
    return (z, k)
"""


def test_random_control_flow_matches_enumeration():
    """Observations inside a branch taken by some particles are not synchronisation points
    (their weight accumulates); inside a branch taken by all, they are."""
    m = ppl.model(BRANCHY)
    r = replicate_vs_exact(m, particles=1000, schemes=SCHEMES)
    lines = [int(h.address.split("@")[1].split(":")[0]) for h in r.extra["history"]]
    assert lines == [14, 15], r.extra["history"]  # never lines 6, 8 or 11 (inside `if z`)


def test_loops_and_calls_with_observations_inside_branches():
    m = ppl.model("""
def step(k, y):
    observe y ~ bernoulli(0.2 + 0.2 * k)
    return k + 1

def m(ys):
    k = 0
    go ~ flip(0.7)
    while go and k < 3:
        k = step(k, ys[k])
        go ~ flip(0.6)
    n ~ categorical([1, 1, 1])
    for i in range(n + 1):
        b ~ flip(0.5)
        observe b ~ bernoulli(0.75)
    observe (k + n) % 2 ~ bernoulli(0.4)
    return (k, n)
""")
    replicate_vs_exact(m, {"ys": [True, False, True]}, particles=1000, schemes=["stratified", "multinomial"])


@pytest.mark.parametrize("name, scheme", [("medical", "systematic"), ("trick_coin", "residual"),
                                          ("trick_coin", "multinomial")])
def test_discrete_examples_match_enumeration(name, scheme):
    m = ppl.model(os.path.join(ROOT, "examples", f"{name}.ppl"))
    with open(os.path.join(ROOT, "examples", f"{name}.json")) as fh:
        data = json.load(fh)
    replicate_vs_exact(m, data, particles=2000, schemes=[scheme])
    if name == "medical":
        assert m.run("enumerate", data).probs()[True] == Fraction(20, 31)


# ------------------------------------------ values held in lists, closures, memo tables
HELD = """
def m(ys):
    xs = []
    for i in range(3):
        x ~ categorical([1, 2, 1])
        xs = xs + [x]
    pair = (xs[0], xs[2])
    f = lambda j: xs[j] * 2 + xs[0]
    c = mem(lambda i: sample(flip(0.3)))
    first = c(0)
    n ~ categorical([1, 1])
    zs = []
    for i in range(n + 1):
        z ~ categorical([1, 2])
        zs = zs + [z]
    for y in ys:
        observe y ~ categorical([1 + xs[0], 1 + xs[1], 1 + xs[2]])
        observe c(0) ~ bernoulli(0.55)
        observe zs[0] ~ categorical([5, 4])
    return (xs[0], xs[1], pair[1], f(0), first, c(0), zs[0], len(zs))
"""


def test_values_in_lists_closures_and_memo_tables_follow_resampling():
    """Latent values stored before a run of observations (a list, a tuple, a closure, a
    memo table, a ragged list) are read after several resampling steps: every copy must
    describe the same particle as the weights do."""
    m = ppl.model(HELD)
    data = {"ys": [0, 1, 2, 1, 0, 0]}
    # the marginal of every component, and the joint of the first two (after 18
    # resamplings the early values of a run share few ancestors: a rare joint cell is hit
    # in clumps, so the full joint table is compared only through these)
    projections = [(lambda j: lambda v: v[j])(j) for j in range(8)] + [lambda v: (v[0], v[1], v[4])]
    r = replicate_vs_exact(m, data, particles=2000, schemes=["multinomial"], projections=projections)
    assert sum(h.resampled for h in r.extra["history"]) >= 3 * len(data["ys"])
    # inside every particle, the copies agree with each other
    for x0, x1, x2, fx, first, c0, z0, nz in particle_keys(r.sites["return"]):
        assert fx == 3 * x0 and first == c0 and z0 in (0, 1) and nz in (1, 2)
    # and with the recorded choices
    ret = particle_keys(r.sites["return"])
    assert [k[0] for k in ret] == r.samples["x[0]"].tolist()
    assert [k[2] for k in ret] == r.samples["x[2]"].tolist()


SSM_HELD = """
def ssm(ys, a, q, r, s0):
    x ~ normal(0, s0)
    x0 = x
    f = lambda: x0 * 2
    xs = [x]
    observe ys[0] ~ normal(x, r)
    for t in range(1, len(ys)):
        x ~ normal(a * x, q)
        xs = xs + [x]
        observe ys[t] ~ normal(x, r)
    return f() + xs[1]
"""


def test_smoothing_of_early_states_against_closed_form():
    """E[2 x_0 + x_1 | y_0..y_T-1] read from a closure and a list after T resamplings,
    against Gaussian conditioning."""
    Tn = 8
    ys = simulate(Tn, seed=3)
    # joint Gaussian of (x_0..x_{T-1}, y_0..y_{T-1})
    cov_x = np.zeros((Tn, Tn))
    var = [S0**2]
    for t in range(1, Tn):
        var.append(A * A * var[-1] + Q * Q)
    for s in range(Tn):
        for t in range(Tn):
            lo, hi = min(s, t), max(s, t)
            cov_x[s, t] = A ** (hi - lo) * var[lo]
    cov_y = cov_x + RR**2 * np.eye(Tn)
    g = np.zeros(Tn)
    g[0], g[1] = 2.0, 1.0
    mean = g @ cov_x @ np.linalg.solve(cov_y, np.asarray(ys))
    m = ppl.model(SSM_HELD)
    data = {"ys": ys, "a": A, "q": Q, "r": RR, "s0": S0}
    ests = []
    for seed in range(R):
        r = m.run("smc", data, particles=2000, seed=seed, resampling="systematic")
        ests.append(float((r.weights * r.samples["return"].double()).sum()))
    t_check(ests, mean, "E[2 x_0 + x_1 | ys]")


# ----------------------------------------------------------------------------- the CLI
def test_cli_smc_on_the_state_space_example():
    path = os.path.join(ROOT, "examples", "state_space.ppl")
    data_path = os.path.join(ROOT, "examples", "state_space.json")
    env = dict(os.environ)
    env.pop("PPL_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "ppl", "run", path, "--data", data_path, "--method", "smc",
                           "-n", "2000", "--json"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["method"] == "smc" and out["n"] == 2000
    # the value the example's header states is the Kalman filter's
    with open(data_path) as fh:
        data = json.load(fh)
    ll, m, sd = kalman(data["ys"], data["a"], data["q"], data["r"], data["x0_sd"], transition_first=True)
    assert ll == pytest.approx(-43.0751, abs=1e-4) and m == pytest.approx(-0.2619, abs=1e-4)
    # the CLI's run is the library's run with seed 0
    model = ppl.model(path)
    assert out["log_evidence"] == pytest.approx(model.run("smc", data, particles=2000, seed=0).log_evidence,
                                                abs=1e-12)
    # within the replicates' spread of the truth (the bias -s^2/2 of log Z_hat allowed for)
    reps = [model.run("smc", data, particles=2000, seed=s) for s in range(1, 11)]
    lz = np.array([r.log_evidence for r in reps])
    s = lz.std(ddof=1)
    assert abs(out["log_evidence"] + s * s / 2 - ll) <= Z_T * s, (out["log_evidence"], ll, s)
    means = np.array([r.mean() for r in reps])
    assert abs(out["posterior"]["return"]["mean"] - m) <= Z_T * means.std(ddof=1), (out["posterior"], m)
