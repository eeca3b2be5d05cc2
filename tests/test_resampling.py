"""Resampling schemes (``ppl.inference.resampling``): exact laws, the torch code against
them, and numerical robustness.

* Unbiasedness, exactly: the law of every scheme (``ppl.testing.validity.
  resampling_distribution``, a finite enumeration) has E[C_i] = n w_i to 1e-12, total
  mass 1, and never gives an ancestor of weight zero.
* The torch implementation draws from that law: a chi-square goodness-of-fit test of the
  ancestor vectors it returns (fixed seed), and the mean counts within 4.5 Monte Carlo
  standard errors of n w_i.
* Numerics: N = 1,000,000 float32 log-weights with a few heavy particles, a million tiny
  ones and runs of zeros (first and last particles included), and float32 weight vectors
  whose cumulative sum ends below 1: every index in [0, N), never a zero-weight ancestor,
  length n, and the heavy particles' counts where each scheme puts them. Adversarial
  uniforms (0 and the largest double below 1) as well.
* Degenerate populations (one particle with all the weight, N = 1, all weights equal) and
  residual resampling's deterministic part: exactly floor(n w_i) copies, computed from
  integer weights in exact arithmetic (w = 1/49 makes 49 * w = 0.999... in floats).
"""
import math
from fractions import Fraction

import pytest
import scipy.stats as ss
import torch

from ppl.inference.resampling import SCHEMES, normalised, resample, residual_counts
from ppl.testing.validity import resampling_distribution

torch.set_num_threads(1)

SCHEME_NAMES = ["multinomial", "stratified", "systematic", "residual"]
Z = 4.5

WEIGHTS = [
    [0.2, 0.3, 0.5],
    [1 / 3, 1 / 3, 1 / 3],
    [0.7, 0.2, 0.1, 0.0],  # a trailing zero after a float sum that ends below 1
    [0.0, 0.5, 0.5],
    [0.1, 0.0, 0.6, 0.3, 0.0],
    [0.05, 0.15, 0.35, 0.45],
    [0.0, 1.0, 0.0],
    [0.999, 0.001],
    [1.0],
]


def _log(w):
    return torch.tensor([math.log(x) if x > 0 else -math.inf for x in w], dtype=torch.float64)


# ----------------------------------------------------------------------- the exact laws
@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_exact_law_is_unbiased_and_never_picks_a_zero_weight(scheme):
    for w in WEIGHTS:
        N = len(w)
        for n in sorted({N, 1, 2, 4}):
            law = resampling_distribution(w, scheme, n)
            assert abs(sum(law.values()) - 1) <= 1e-12, (w, scheme, n)
            for anc, p in law.items():
                assert p > 0 and len(anc) == n
                assert all(w[i] > 0 for i in anc), f"{scheme} {w} n={n}: zero-weight ancestor in {anc} (p={p})"
            for i in range(N):
                mean = sum(p * anc.count(i) for anc, p in law.items())
                assert abs(mean - n * w[i]) <= 1e-12, f"{scheme} {w} n={n}: E[C_{i}] = {mean} != {n * w[i]}"


def test_exact_laws_of_the_low_variance_schemes():
    """Stratified, systematic and residual keep every count within a particle's share:
    floor(n w_i) <= C_i <= ceil(n w_i) (+1 for stratified), unlike multinomial."""
    for w in WEIGHTS:
        n = len(w)
        for scheme, slack in (("systematic", 0), ("stratified", 1), ("residual", None)):
            for anc in resampling_distribution(w, scheme, n):
                for i, x in enumerate(w):
                    c = anc.count(i)
                    assert c >= math.floor(n * x + 1e-12) - (slack or 0), (scheme, w, anc)
                    if slack is not None:
                        assert c <= math.ceil(n * x - 1e-12) + slack, (scheme, w, anc)


# -------------------------------------------------------------- the torch implementation
@pytest.mark.parametrize("scheme", SCHEME_NAMES)
@pytest.mark.parametrize("w", [[0.1, 0.0, 0.6, 0.3], [0.05, 0.15, 0.35, 0.45, 0.0]])
def test_torch_draws_follow_the_exact_law(scheme, w):
    lw = _log(w)
    wn = normalised(lw).tolist()
    n = len(w)
    law = resampling_distribution(wn, scheme, n)
    draws = 2000
    torch.manual_seed(1234)
    seen: dict = {}
    counts = torch.zeros(draws, len(w), dtype=torch.float64)
    for k in range(draws):
        anc = resample(lw, scheme, n)
        assert anc.dtype == torch.long and anc.shape == (n,)
        key = tuple(anc.tolist())
        assert key in law, f"{scheme}: {key} has probability 0 under the exact law"
        seen[key] = seen.get(key, 0) + 1
        counts[k] = torch.bincount(anc, minlength=len(w)).double()
    # mean counts: unbiased within Monte Carlo error
    mean, se = counts.mean(0), counts.std(0) / math.sqrt(draws)
    for i, x in enumerate(wn):
        if se[i] == 0:  # a deterministic count (e.g. a zero weight): exact
            assert float(mean[i]) == pytest.approx(n * x, abs=1e-12)
        else:
            assert abs(float(mean[i]) - n * x) <= Z * float(se[i]), (scheme, w, i, float(mean[i]), n * x)
    # the whole law: chi-square over the outcomes (small cells pooled)
    keys = sorted(law, key=law.get)
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for key in keys:
        e = law[key] * draws
        if e < 5:
            pool_o += seen.get(key, 0)
            pool_e += e
        else:
            obs.append(seen.get(key, 0))
            exp.append(e)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    if len(obs) > 1:
        p = ss.chisquare(obs, exp).pvalue
        assert p > 1e-4, f"{scheme} {w}: chi-square p = {p:.3g}: {seen} vs {law}"
    else:
        assert obs[0] == draws


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_never_a_zero_weight_ancestor(scheme):
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    for trial in range(300):
        N = int(torch.randint(1, 40, (), generator=g))
        lw = torch.randn(N, generator=g, dtype=torch.float64) * float(torch.rand((), generator=g) * 20)
        lw[torch.rand(N, generator=g) < 0.6] = -math.inf
        if trial % 3 == 0:
            lw[-1] = -math.inf
        if trial % 5 == 0:
            lw[0] = -math.inf
        if bool(torch.isneginf(lw).all()):
            lw[int(torch.randint(0, N, (), generator=g))] = 0.0
        n = int(torch.randint(1, 2 * N + 2, (), generator=g))
        anc = resample(lw, scheme, n)
        assert anc.shape == (n,) and int(anc.min()) >= 0 and int(anc.max()) < N
        assert bool(torch.isfinite(lw[anc]).all()), (scheme, lw, anc)


def test_all_weights_zero_is_an_error():
    for scheme in SCHEME_NAMES:
        with pytest.raises(ValueError):
            resample(torch.full((4,), -math.inf), scheme)
    with pytest.raises(ValueError):
        resample(torch.zeros(3), "no-such-scheme")


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0**-53])
@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_extreme_uniforms(monkeypatch, scheme, u):
    """Every uniform at 0 or at the largest double below 1: still in range, positive weight."""
    real_rand = torch.rand

    def rand(*shape, **kw):
        return torch.full_like(real_rand(*shape, **kw), u)

    monkeypatch.setattr(torch, "rand", rand)
    for N in (5, 49, 5000):
        lw = torch.log(torch.linspace(0.1, 3.0, N, dtype=torch.float64))
        lw[: N // 5] = -math.inf
        lw[-(N // 5):] = -math.inf
        for n in (1, N, 2 * N + 1):
            anc = resample(lw, scheme, n)
            assert anc.shape == (n,) and int(anc.min()) >= 0 and int(anc.max()) < N
            assert bool(torch.isfinite(lw[anc]).all()), (scheme, u, N, n)
        if scheme != "residual":  # one draw at u: the first / last particle of positive weight
            first, last = N // 5, N - N // 5 - 1
            assert resample(lw, scheme, 1).tolist() == [first if u == 0 else last]


# ------------------------------------------------------------------------------ hammer
def _hammer_log_weights(kind: int, N: int, g: torch.Generator) -> torch.Tensor:
    """float32 log weights: 3 heavy particles and a million tiny ones (about 1e-8 of the
    total each, below half an ulp of a float32 running sum near 1), zeros in runs."""
    lw = torch.full((N,), -19.0, dtype=torch.float32) + torch.rand(N, generator=g, dtype=torch.float32)
    heavy = torch.tensor([0, 1, 2]) if kind == 0 else torch.randint(0, N, (3,), generator=g)
    lw[heavy] = 0.0
    if kind >= 1:
        dead = torch.rand(N, generator=g) < 0.5
        dead[heavy] = False
        lw[dead] = -math.inf
        lw[-1000:] = -math.inf  # the last particles have weight zero
        lw[:2] = -math.inf if kind == 2 else lw[:2]
        lw[heavy] = 0.0
    return lw


def test_hammer_float32_million_particles():
    N = 1_000_000
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    for kind in range(3):
        lw = _hammer_log_weights(kind, N, g)
        w64 = normalised(lw)
        positive = torch.isfinite(lw)
        heavy = torch.nonzero(lw == 0).flatten()
        # float32 weights whose float32 cumulative sum ends below 1 (as after a float32
        # normalisation that came out short)
        w32 = (w64 * (1 - 2.0**-12)).float()
        assert float(torch.cumsum(w32, 0)[-1]) < 1.0
        assert float(w32.sum(dtype=torch.float32)) < 1.0
        for scheme, fn in SCHEMES.items():
            for rep in range(2):
                for anc in (resample(lw, scheme, N), fn(w32, N)):
                    assert anc.shape == (N,) and anc.dtype == torch.long, scheme
                    assert int(anc.min()) >= 0 and int(anc.max()) < N, scheme
                    assert bool(positive[anc].all()), f"{scheme}: a zero-weight ancestor"
                    c = torch.bincount(anc, minlength=N).double()
                    target = N * w64[heavy]
                    got = c[heavy]
                    if scheme == "multinomial":  # binomial counts: within 4.5 sd (+ the float32 shortfall)
                        sd = torch.sqrt(target * (1 - w64[heavy]))
                        assert bool(((got - target).abs() <= Z * sd + 1e-3 * target).all()), (got, target)
                    else:  # low-variance schemes: within a couple of copies of N w_i
                        assert bool(((got - target).abs() <= 2 + 1e-3 * target).all()), (scheme, got, target)


def test_hammer_many_populations():
    """Many moderately sized float32 populations of every shape, every scheme."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    for trial in range(400):
        N = int(torch.randint(1, 5000, (), generator=g))
        scale = float(torch.rand((), generator=g)) * 60
        lw = (torch.randn(N, generator=g) * scale).float()
        if trial % 2:
            lw[torch.rand(N, generator=g) < 0.7] = -math.inf
        if bool(torch.isneginf(lw).all()):
            lw[-1] = 0.0
        for scheme in SCHEME_NAMES:
            n = N if trial % 4 else int(torch.randint(1, 2 * N + 1, (), generator=g))
            anc = resample(lw, scheme, n)
            assert anc.shape == (n,) and int(anc.min()) >= 0 and int(anc.max()) < N
            assert bool(torch.isfinite(lw[anc]).all()), (trial, scheme)


# ----------------------------------------------------------------------------- degenerate
@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_degenerate_populations(scheme):
    torch.manual_seed(0)
    for N in (1, 2, 7, 49, 5000):
        for j in {0, N // 2, N - 1}:
            lw = torch.full((N,), -math.inf, dtype=torch.float64)
            lw[j] = -3.0
            for n in (1, N, 3 * N):
                assert torch.equal(resample(lw, scheme, n), torch.full((n,), j, dtype=torch.long))
        # N = 1 (any finite weight) and one tiny weight among zeros
        assert resample(torch.tensor([-700.0]), scheme, 1).tolist() == [0]
    # all weights equal: every low-variance scheme keeps each particle once
    for N in (1, 3, 49, 98, 103, 1000, 4096, 10_000):
        lw = torch.full((N,), -2.5, dtype=torch.float64)
        anc = resample(lw, scheme, N)
        assert anc.shape == (N,) and int(anc.min()) >= 0 and int(anc.max()) < N
        if scheme != "multinomial":
            assert torch.equal(anc, torch.arange(N)), f"{scheme}, N={N}: equal weights not kept once each"


def test_residual_deterministic_part_is_exactly_floor():
    """floor(n w_i) copies, with w_i = k_i / K from integer weights (exact floors)."""
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    cases = [[1] * N for N in (3, 49, 98, 103, 107, 161, 187, 196)]
    for _ in range(60):
        N = int(torch.randint(1, 300, (), generator=g))
        cases.append(torch.randint(0, 6, (N,), generator=g).tolist())
    for k in cases:
        if sum(k) == 0:
            k[0] = 1
        K = sum(k)
        lw = torch.tensor([math.log(x) if x else -math.inf for x in k], dtype=torch.float64)
        for n in {len(k), 1, 2 * len(k) + 1, 7}:
            floors = [int(Fraction(n * x, K)) for x in k]  # exact floor(n k_i / K)
            counts, _ = residual_counts(normalised(lw), n)
            assert counts.tolist() == floors, (k, n)
            anc = resample(lw, "residual", n)
            got = torch.bincount(anc, minlength=len(k)).tolist()
            assert len(anc) == n
            assert all(c >= f for c, f in zip(got, floors)), (k, n, got, floors)
            assert all(c == 0 for c, x in zip(got, k) if x == 0)
        # the exact law agrees: the deterministic part is in every outcome
        if len(k) <= 6:
            wn = normalised(lw).tolist()
            for anc in resampling_distribution(wn, "residual", len(k)):
                assert all(anc.count(i) >= int(Fraction(len(k) * x, K)) for i, x in enumerate(k))
