"""``smc_steer`` (N parents x K expansion, selection without replacement) and
``best_of_n`` (``ppl.inference.steer``).

* Exact properness: ``check_proper`` enumerates every prior draw of every slot and the
  exact law of every selection (``without_replacement_distribution``) and finds
  E[Z_hat * sum_i w_i 1{x_i = v}] = gamma({v}) to ~1e-15 on small programs with random
  branches, observations inside branches and functions, factors, conditions, loops,
  adaptive selection, outcomes where most or all slots die, and token-by-token
  language-model programs (the toy LM of ``ppl.stdlib.lm``).
* The selection's exact law: E[new_i 1{i kept}] = p_i for every particle (to 1e-12),
  exactly n distinct indices, no weight for a zero-weight particle; the torch sampler
  draws exactly that law (compared on a grid of its uniform) and keeps n distinct
  indices at 2e5 particles.
* Broken variants fail the checker by a large margin: uniform weights after selection,
  no replication into K slots, copies that each keep the survivor's whole weight,
  and beam search (the N heaviest children kept).
* Statistical: log-evidence and the final state's mean on the state-space example
  (examples/state_space.ppl) against a Kalman filter, over R = 20 seeded replicates
  (Z_T = 5 replicate SEs, as in tests/test_smc.py).
* ``best_of_n`` finds the highest-scoring path of finite programs (checked against
  enumeration), maximises the likelihood rather than the posterior, reports no
  evidence, and rejects bad N.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats as ss
import torch

import ppl
from ppl.inference.resampling import without_replacement
from ppl.inference.steer import SteerHandler
from ppl.semantics.errors import PPLError, ZeroEvidenceError
from ppl.testing.validity import (check_proper, steer_algorithm, without_replacement_distribution,
                                  without_replacement_pieces)

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Z_T = 5.0
R = 20


def assert_proper(check, what):
    assert check.ok(), f"{what}:\n{check}"
    assert check.outcomes > 1


# ------------------------------------------------------------------ exact properness
BRANCH = """
def m():
    z ~ flip(0.4)
    if z:
        observe True ~ bernoulli(0.9)
    else:
        factor -1
    observe z ~ bernoulli(0.3)
    return z
"""

TWO_STEPS = """
def m():
    z ~ flip(0.4)
    observe z ~ bernoulli(0.2)
    k ~ categorical([1, 2])
    observe k ~ bernoulli(0.3 if z else 0.8)
    return (z, k)
"""

CALL = """
def f(z):
    observe z ~ bernoulli(0.8)
    return 1

def m():
    z ~ flip(0.5)
    k = 0
    if z:
        k = f(z)
    observe z ~ bernoulli(0.3)
    return k
"""

LOOP = """
def m(ys):
    z ~ flip(0.5)
    for y in ys:
        b ~ flip(0.5)
        observe y ~ bernoulli(0.9 if b == z else 0.2)
    return z
"""

CONDITION = """
def m():
    a ~ categorical([1, 1, 2])
    condition a > 0
    b ~ flip(0.3)
    factor 1.5 if b else 0.0
    return a + (1 if b else 0)
"""

CONDITION_FLIPS = """
def m():
    a ~ flip(0.6)
    condition a
    b ~ flip(0.3)
    factor 1.5 if b else 0.0
    condition a or b
    return b
"""

DIES = """
def m():
    a ~ flip(0.5)
    condition a
    b ~ flip(0.4)
    observe b ~ bernoulli(0.25)
    return b
"""

CASES = [
    ("branch", BRANCH, None, 2, 2),
    ("branch", BRANCH, None, 1, 3),
    ("two steps", TWO_STEPS, None, 2, 2),
    ("two steps", TWO_STEPS, None, 1, 3),
    ("call", CALL, None, 2, 2),
    ("loop", LOOP, {"ys": [True, False]}, 1, 2),
    ("condition", CONDITION, None, 1, 3),
    ("condition flips", CONDITION_FLIPS, None, 2, 2),
    ("dies", DIES, None, 1, 3),
]


@pytest.mark.parametrize("name, src, data, N, K", CASES, ids=[f"{c[0]}-N{c[3]}K{c[4]}" for c in CASES])
def test_steer_is_exactly_proper(name, src, data, N, K):
    m = ppl.model(src)
    assert_proper(check_proper(m, steer_algorithm(N, K), data), f"{name}, smc_steer N = {N}, K = {K}")


def test_adaptive_steer_and_no_expansion_are_exactly_proper():
    """Selection only when the ESS of the children is low (some checkpoints skip it);
    K = 1 (which never drops a particle: importance sampling)."""
    m = ppl.model(TWO_STEPS)
    assert_proper(check_proper(m, steer_algorithm(2, 2, ess_threshold=0.7)), "adaptive, N = 2, K = 2")
    assert_proper(check_proper(m, steer_algorithm(3, 1)), "N = 3, K = 1")


def test_the_dies_program_exercises_the_zero_weight_fill():
    """In the "dies" program (N = 2, K = 2: exactly proper) some selections see fewer live
    children than parents (the empty slots are filled with dead children), and some
    runs lose every slot."""
    m = ppl.model(DIES)
    seen = {"fill": 0, "all dead": 0}

    class Spy(SteerHandler):
        def _resample(self, lw, w, s):
            if int(torch.isfinite(lw).sum()) < self.parents:
                seen["fill"] += 1
            return super()._resample(lw, w, s)

    alg = steer_algorithm(2, 2, handler=Spy)
    check = check_proper(m, alg)
    assert_proper(check, "dies with a spy")
    assert seen["fill"] > 0
    interp = m.interpreter()
    from ppl.inference.steer import smc_steer
    for seed in range(40):
        torch.manual_seed(seed)
        try:
            smc_steer(interp, m.entry, {}, 1, 2)
        except ZeroEvidenceError:
            seen["all dead"] += 1
    assert seen["all dead"] > 0


# language-model programs (stdlib/lm: a token is a random choice like any other)
LM_PROGRAMS = {
    "constrained tokens": ("""
def m(lm):
    toks = []
    for i in range(2):
        tok ~ lm.next_token(toks, allowed=lambda t: "e" not in t)
        toks = toks + [tok]
    return join(toks)
""", {}),
    "reward": ("""
def m(lm, rm, beta):
    toks = []
    for i in range(2):
        tok ~ lm.next_token(toks)
        toks = toks + [tok]
    factor rm("", join(toks)) / beta
    return join(toks)
""", {"beta": 0.5}),
}


@pytest.mark.parametrize("name", list(LM_PROGRAMS))
def test_steer_is_exactly_proper_on_language_model_programs(name):
    toy = pytest.importorskip("ppl.stdlib.lm.toy")
    src, data = LM_PROGRAMS[name]
    data = {"lm": toy.ToyLM(), **({"rm": toy.ToyReward()} if "rm" in src else {}), **data}
    assert_proper(check_proper(ppl.model(src), steer_algorithm(1, 2), data), f"{name}, N = 1, K = 2")


# ------------------------------------------------------------ the selection's exact law
def weight_vectors():
    g = torch.Generator().manual_seed(0)
    yield "equal", [1.0] * 6
    yield "one dominant", [100.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    yield "two dominant", [10.0, 10.0, 1.0, 0.1, 0.1, 0.01]
    yield "ties and zeros", [0.2, 0.0, 0.2, 0.1, 0.0, 0.3, 0.2]
    yield "few positive", [0.0, 3.0, 0.0, 0.0, 1.0, 0.0]
    yield "tiny", [1.0, 1e-12, 1e-300, 2.0, 1e-9]
    for k in range(6):
        yield f"dirichlet {k}", torch.distributions.Dirichlet(torch.full((7,), 0.3)).sample().tolist()
    yield "heavy tail", (torch.rand(9, generator=g) ** 8).tolist()


@pytest.mark.parametrize("name, w", list(weight_vectors()), ids=[n for n, _ in weight_vectors()])
def test_selection_law_is_unbiased_and_never_duplicates(name, w):
    M = len(w)
    p = [x / math.fsum(w) for x in w]
    for n in range(1, M + 1):
        law = without_replacement_distribution(w, n)
        assert math.fsum(law.values()) == pytest.approx(1.0, abs=1e-12)
        mass = [0.0] * M
        for (idx, lw), prob in law.items():
            assert len(idx) == n and len(set(idx)) == n and list(idx) == sorted(idx), (name, n, idx)
            for i, l in zip(idx, lw):
                if p[i] == 0:
                    assert l == -math.inf, (name, n, idx, lw)
                mass[i] += prob * math.exp(l) / n  # new weight of i: exp(lw) / n
        for i in range(M):
            assert mass[i] == pytest.approx(p[i], abs=1e-12, rel=1e-9), (name, n, i, mass, p)
        # a particle is kept for sure with its own weight, or kept with probability
        # p_i / c < 1 with the one weight c shared by all such particles
        uncertain = set()
        for (idx, lw), prob in law.items():
            for i, l in zip(idx, lw):
                if p[i] == 0:
                    continue
                keep_prob = sum(q for (jdx, _), q in law.items() if i in jdx)
                if keep_prob < 1 - 1e-12:
                    uncertain.add(l)
                else:
                    assert l == pytest.approx(math.log(n * p[i]), abs=1e-12)
        assert len(uncertain) <= 1, (name, n, uncertain)


@pytest.mark.parametrize("name, w", list(weight_vectors()), ids=[n for n, _ in weight_vectors()])
def test_torch_selection_draws_the_exact_law(name, w):
    """The sampler's outcome as a function of its uniform U is the law's, piece by piece:
    the same indices and weights at the middle and near both ends of every piece (but
    slivers of width < 1e-9, which exist only by rounding)."""
    wt = torch.tensor(w, dtype=torch.float64)
    for n in range(1, len(w) + 1):
        for lo, hi, (idx, lw) in without_replacement_pieces(w, n):
            if hi - lo < 1e-9:  # a sliver from rounding (1/3 vs frac(4/3)): where both may differ
                continue
            for u in (lo + 1e-6 * (hi - lo), (lo + hi) / 2, hi - 1e-6 * (hi - lo)):
                got, got_lw = without_replacement(wt / wt.sum(), n, u=u)
                assert tuple(got.tolist()) == idx, (name, n, u, got, idx)
                np.testing.assert_allclose(got_lw.tolist(), lw, rtol=1e-12, atol=1e-12)


def test_selection_at_scale_keeps_n_distinct_particles():
    """5e4 particles with weights over 600 orders of magnitude, n from 1 to M/2: always
    n distinct indices, finite weights exactly for the positive particles, and the mean
    selected weight near 1 (E[sum_kept new_i] = 1; spread checked over 30 draws)."""
    torch.manual_seed(0)
    M = 50_000
    lw = torch.randn(M, dtype=torch.float64) * 3.0
    lw[::7] -= 600.0
    lw[::11] = -math.inf
    from ppl.inference.resampling import normalised
    w = normalised(lw)
    for n in (1, 17, 1000, 24_999, 25_000):
        totals = []
        for _ in range(40):
            idx, new = without_replacement(w, n)
            assert idx.shape == (n,) and int(torch.unique(idx).shape[0]) == n
            assert bool((w[idx] > 0).all()) and bool(torch.isfinite(new).all())
            totals.append(float(torch.exp(new).sum()) / n)
        t = np.array(totals)
        se = max(t.std(ddof=1) / math.sqrt(len(t)), 1e-12)
        assert abs(t.mean() - 1.0) <= Z_T * se, (n, t.mean(), se)


# ------------------------------------------------------------------ broken variants
class _Wrapped:
    def __init__(self, inner):
        self.inner = inner

    def sample(self, dist, ctx):
        return self.inner.sample(dist, ctx)


class UniformAfterSelection(_Wrapped):
    """Selects without replacement, then forgets the survivors' weights (all equal)."""

    def select_without_replacement(self, log_weights, n):
        idx, lw = self.inner.select_without_replacement(log_weights, n)
        return idx, torch.zeros_like(lw)


class NoReplication(SteerHandler):
    """Each survivor fills one slot; the other (K-1) N slots are left dead."""

    def _resample(self, lw, w, s):
        idx, new = self.randomness.select_without_replacement(lw, self.parents)
        dead = torch.full((self.N - self.parents,), -math.inf, dtype=lw.dtype)
        return idx.repeat(self.expansion), torch.cat([new.to(lw.dtype), dead])


class CopiesKeepWholeWeight(SteerHandler):
    """Replicates, but every copy carries the survivor's whole weight (K times too much)."""

    def _resample(self, lw, w, s):
        idx, new = super()._resample(lw, w, s)
        return idx, new + math.log(self.expansion)


class BeamSearch(SteerHandler):
    """Keeps the N heaviest children (deterministically) with their own weights."""

    def _resample(self, lw, w, s):
        top = torch.sort(torch.topk(lw, self.parents).indices).values
        p = w / s
        return top.repeat(self.expansion), torch.log(self.parents * p[top]).repeat(self.expansion)


UNEVEN = """
def m():
    z ~ flip(0.5)
    factor 3.0 if z else 0.0
    k ~ flip(0.5)
    observe k ~ bernoulli(0.9 if z else 0.2)
    return (z, k)
"""

BROKEN = {
    "uniform weights after selection": dict(wrap=UniformAfterSelection),
    "no replication into K slots": dict(handler=NoReplication),
    "copies keep the whole weight": dict(handler=CopiesKeepWholeWeight),
    "beam search": dict(handler=BeamSearch),
}


_INTACT: list = []


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_steer_variants_are_caught(name):
    m = ppl.model(UNEVEN)
    if not _INTACT:  # the intact algorithm passes on the same program
        assert_proper(check_proper(m, steer_algorithm(2, 2)), "intact")
        _INTACT.append(True)
    check = check_proper(m, steer_algorithm(2, 2, **BROKEN[name]))
    scale = max(float(v) for v in check.expected.values())
    assert not check.ok(), f"{name} was not caught:\n{check}"
    assert check.max_error > 0.02 * scale, f"{name}: only a small error:\n{check}"


# ------------------------------------------------------- statistical: state-space model
def kalman(ys, a, q, r, s0):
    """log p(y_1..T) and the filtering mean of the last state for examples/state_space:
    x_0 ~ N(0, s0^2), every observation follows a transition (tests/test_smc.py)."""
    m, v, ll = 0.0, s0**2, 0.0
    for y in ys:
        m, v = a * m, a * a * v + q * q
        sv = v + r * r
        ll += ss.norm.logpdf(y, m, math.sqrt(sv))
        k = v / sv
        m, v = m + k * (y - m), (1 - k) * v
    return ll, m, math.sqrt(v)


def _example():
    with open(os.path.join(ROOT, "examples", "state_space.json")) as fh:
        data = json.load(fh)
    return ppl.model(os.path.join(ROOT, "examples", "state_space.ppl")), data


def t_check(values, truth, what):
    v = np.asarray(values, dtype=np.float64)
    mean, se = v.mean(), v.std(ddof=1) / math.sqrt(len(v))
    assert abs(mean - truth) <= Z_T * se, \
        f"{what}: mean {mean:.6g} vs truth {truth:.6g}: {abs(mean - truth) / se:.2f} SE (SE {se:.3g})"


@pytest.mark.parametrize("N, K, threshold", [(100, 4, 1.0), (50, 8, 0.5)])
def test_steer_on_the_state_space_example_against_kalman(N, K, threshold):
    model, data = _example()
    ll, mean, sd = kalman(data["ys"], data["a"], data["q"], data["r"], data["x0_sd"])
    assert ll == pytest.approx(-43.0751, abs=1e-4)
    log_zs, means = [], []
    for seed in range(R):
        r = model.run("smc_steer", data, particles=N, expansion=K, ess_threshold=threshold, seed=seed)
        assert r.n == N * K and r.extra["parents"] == N and r.extra["expansion"] == K
        hist = r.extra["history"]
        assert len(hist) == len(data["ys"]) and hist[-1].log_evidence == pytest.approx(r.log_evidence, abs=1e-9)
        if threshold == 1.0:
            assert all(h.resampled for h in hist)
        else:
            assert 0 < sum(h.resampled for h in hist) < len(hist)
        log_zs.append(r.log_evidence)
        means.append(float(r.mean()))
    lz = np.array(log_zs)
    t_check(np.exp(lz - ll), 1.0, "Z_hat / Z")
    t_check(lz + lz.var(ddof=1) / 2, ll, "log Z_hat + s^2/2")
    t_check(means, mean, "E[x_T | ys]")
    assert abs(np.mean(log_zs) - ll) < 0.5  # and close in absolute terms


def test_steer_entry_points_and_seeds():
    """Model.run, @ppl.infer and the CLI (-o expansion=K) run the same algorithm."""
    model, data = _example()
    a = model.run("smc_steer", data, particles=20, expansion=3, seed=7)
    b = ppl.infer(model, method="smc_steer", particles=20, expansion=3, seed=7)(**data)
    assert torch.equal(a.log_weights, b.log_weights) and a.log_evidence == b.log_evidence
    assert torch.equal(a.samples["return"], b.samples["return"])
    c = model.run("smc_steer", data, particles=20, expansion=3, seed=8)
    assert not torch.equal(a.samples["return"], c.samples["return"])
    proc = subprocess.run([sys.executable, "-m", "ppl", "run", os.path.join(ROOT, "examples", "state_space.ppl"),
                           "--data", os.path.join(ROOT, "examples", "state_space.json"), "--method", "smc_steer",
                           "-n", "20", "-o", "expansion=3", "--seed", "7", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["method"] == "smc_steer" and out["n"] == 60
    assert out["log_evidence"] == pytest.approx(a.log_evidence, abs=1e-12)


@pytest.mark.parametrize("options", [dict(expansion=0), dict(expansion=1.5), dict(expansion=True),
                                     dict(expansion="two"), dict(ess_threshold=1.5), dict(resampling="multinomial")])
def test_steer_rejects_bad_options(options):
    model, data = _example()
    with pytest.raises(PPLError):
        model.run("smc_steer", data, particles=10, **options)


# ------------------------------------------------------------------------ best of N
UNIFORM = """
def m():
    a ~ categorical([1, 1, 1, 1])
    b ~ flip(0.5)
    observe a ~ poisson(2.5)
    factor -0.7 if b else 0.0
    condition a != 2 or b
    return (a, b)
"""

RARE = """
def m():
    z ~ flip(0.02)
    observe True ~ bernoulli(0.9 if z else 0.5)
    return z
"""


def _scores(model, prior_of_path):
    """Each path's return value and score (log weight - log prior) from enumeration."""
    out = []
    for w, vals in model.run("enumerate").paths:
        if w > 0:
            out.append((vals["return"], math.log(float(w)) - math.log(prior_of_path(vals))))
    return out


def test_best_of_n_finds_the_highest_scoring_path():
    m = ppl.model(UNIFORM)
    scores = _scores(m, lambda vals: 1 / 8)  # 8 equally likely paths
    best_value, best_score = max(scores, key=lambda vs: vs[1])
    assert sorted(s for _, s in scores)[-2] < best_score - 1e-6  # a unique maximum
    for seed in range(5):
        r = m.run("best_of_n", particles=300, seed=seed)  # P(missing it) = (7/8)^300 ~ 4e-18
        assert r.n == 1 and r.extra["candidates"] == 300 and r.candidates == 300
        got = (int(r.samples["a"][0]), bool(r.samples["b"][0]))
        assert got == best_value
        assert r.score == pytest.approx(best_score, abs=1e-5) and r.extra["score"] == r.score
        assert r.log_evidence is None and r.ess == 1.0
        assert r.mean("a") == best_value[0]
    # one candidate: the prior draw itself, whatever its score
    r = m.run("best_of_n", particles=1, seed=0)
    assert r.extra["candidates"] == 1 and math.isfinite(r.score)


def test_best_of_n_maximises_the_score_not_the_posterior():
    """z = True has prior 0.02 but the higher likelihood: the posterior mode is False,
    the best of 1000 candidates (P(no True among them) = 0.98^1000 ~ 2e-9) is True."""
    m = ppl.model(RARE)
    post = m.run("enumerate")
    assert post.marginal()[False] > 0.9
    r = m.run("best_of_n", particles=1000, seed=0)
    assert bool(r.samples["return"][0]) is True
    assert r.score == pytest.approx(math.log(0.9))


def test_best_of_n_states_it_is_not_a_posterior():
    m = ppl.model(UNIFORM)
    r = m.run("best_of_n", particles=50, seed=1)
    text = r.summary()
    assert "not a posterior" in text and "best of 50" in text
    out = r.to_json()
    assert out["log_evidence"] is None and out["not_a_posterior"] is True
    assert out["candidates"] == 50 and out["score"] == pytest.approx(r.score)
    # the importance-sampling estimate of the same draws is kept as a side note
    is_run = m.run("importance", particles=50, seed=1)
    assert r.extra["importance_log_evidence"] == pytest.approx(is_run.log_evidence, abs=1e-9)
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "many", None])
def test_best_of_n_rejects_bad_n(bad):
    m = ppl.model(UNIFORM)
    with pytest.raises(PPLError, match="particles must be a positive integer"):
        m.run("best_of_n", particles=bad)


def test_best_of_n_when_no_candidate_satisfies_the_program():
    m = ppl.model("""
def m():
    a ~ flip(0.5)
    condition a and not a
    return a
""")
    with pytest.raises(ZeroEvidenceError):
        m.run("best_of_n", particles=20, seed=0)
