"""Seeded runs own their random number generators (issue 9, item 18).

Two threads running ``m.run(..., seed=1)`` and ``seed=2`` on one model must get exactly
what the same calls get one after the other; a seeded run neither reads nor changes
torch's global generator; ``seed=None`` runs are seeded from the global generator (so
``torch.manual_seed`` keeps them repeatable). The generator-aware samplers of
``ppl.stdlib.rng`` draw every distribution family exactly as torch's own ``.sample()``
does after ``torch.manual_seed`` with the same seed, bit for bit.
"""
from __future__ import annotations

import math
import threading

import pyro.distributions as pdist
import pytest
import torch

import ppl
from ppl.inference.randomness import TorchRandomness
from ppl.inference.smc import smc
from ppl.stdlib import distributions as D
from ppl.stdlib import rng
from ppl.stdlib.lm.toy import ToyLM

torch.set_num_threads(1)
# the small runs here are about reproducibility, not accuracy: their diagnostics are noise
pytestmark = pytest.mark.filterwarnings("ignore::ppl.semantics.errors.PPLDiagnosticWarning")

MIXED = ppl.model("""
def m(ys):
    mu ~ normal(0, 5)
    s ~ gamma(2, 2)
    k ~ poisson(3)
    b ~ flip(0.3)
    c ~ categorical([0.2, 0.3, 0.5])
    v ~ von_mises(0.0, 2.0)    # no generator-aware path: the locked fallback
    t ~ truncated_normal(0.0, 1.0, -0.5, 2.0)    # a class of ppl's own, drawing from the run's generator
    for i in range(len(ys)):
        observe ys[i] ~ normal(mu + 0.1 * c + 0.01 * (v + t), s)
    return mu
""")
CONTINUOUS = ppl.model("""
def m(ys):
    mu ~ normal(0, 5)
    s ~ gamma(2, 2)
    for i in range(len(ys)):
        observe ys[i] ~ normal(mu, s)
    return mu
""")
YS = {"ys": [0.3, 1.2, -0.4, 2.0, 0.9]}
WORDS = ppl.model("""
def m(lm):
    text ~ lm.generate("", max_tokens=4)
    factor -0.5 * len(text)
    return text
""")

# method -> (model, data, options): small runs, every draw site of the method exercised
RUNS = {
    "importance": (MIXED, YS, dict(particles=500)),
    "smc": (MIXED, YS, dict(particles=200)),
    "mh": (MIXED, YS, dict(chains=4, samples=20, burn_in=5)),
    "mh_traced": (CONTINUOUS, YS, dict(chains=4, samples=30, burn_in=10, kernel="rw", traced=True)),
    "tempering": (MIXED, YS, dict(particles=100)),
    "resample_move": (MIXED, YS, dict(particles=100, moves=1)),
    "pmmh": (CONTINUOUS, YS, dict(params=["mu"], particles=20, samples=20, burn_in=5)),
    "smc_steer": (WORDS, {"lm": ToyLM()}, dict(particles=20, expansion=3)),
    "best_of_n": (MIXED, YS, dict(particles=30)),
}


def run(name: str, seed):
    model, data, options = RUNS[name]
    method = "mh" if name == "mh_traced" else name
    return model.run(method, data, seed=seed, **options)


def fingerprint(result) -> list:
    """Everything a run drew: every site's values and presence, the log weights."""
    out = []
    for name in sorted(result.sites):
        site = result.sites[name]
        out.append((name, site.value.clone() if isinstance(site.value, torch.Tensor) else list(site.value),
                    None if site.present is None else site.present.clone()))
    out.append(("log_weights", result.log_weights.clone(), None))
    return out


def same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for (na, va, pa), (nb, vb, pb) in zip(a, b):
        if na != nb or type(va) is not type(vb) or (pa is None) != (pb is None):
            return False
        if isinstance(va, torch.Tensor):
            if va.shape != vb.shape or va.dtype != vb.dtype or not torch.equal(va, vb):
                return False
        elif str(va) != str(vb):
            return False
        if pa is not None and not torch.equal(pa, pb):
            return False
    return True


def test_the_traced_kernel_is_the_one_run():
    assert run("mh_traced", 0).extra["traced"] is True


@pytest.mark.parametrize("name", list(RUNS))
def test_concurrent_seeded_runs_equal_the_same_runs_made_in_turn(name):
    """Seeds 1, 2, 1, 2 in four threads at once, three times: each run bitwise equal to
    the run with its seed made alone (before: mh differed 10/10 times, tempering 5/5)."""
    seeds = [1, 2, 1, 2]
    alone = {s: fingerprint(run(name, s)) for s in (1, 2)}
    assert not same(alone[1], alone[2]), "different seeds must give different runs"
    for trial in range(3):
        got: dict = {}
        errors: list = []
        barrier = threading.Barrier(len(seeds))

        def work(k, s):
            try:
                barrier.wait()
                got[k] = fingerprint(run(name, s))
            except BaseException as e:  # reported below, not lost in the thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k, s)) for k, s in enumerate(seeds)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for k, s in enumerate(seeds):
            assert same(got[k], alone[s]), f"{name}: trial {trial}, thread {k} (seed {s}) differs from its run alone"


@pytest.mark.parametrize("name", list(RUNS))
def test_a_seeded_run_neither_reads_nor_changes_the_global_generator(name):
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = fingerprint(run(name, 3))
    assert torch.equal(torch.get_rng_state(), before), "a seeded run changed torch's global generator"
    torch.manual_seed(6)  # another global state: the run does not see it
    assert same(fingerprint(run(name, 3)), first)


def test_unseeded_runs_are_seeded_from_the_global_generator():
    torch.manual_seed(11)
    a = fingerprint(run("smc", None))
    b = fingerprint(run("smc", None))  # the global generator moved on: another run
    torch.manual_seed(11)
    assert same(fingerprint(run("smc", None)), a)
    assert not same(a, b)


def test_a_run_inside_a_seeded_block_shares_its_generators():
    """``seed=None`` inside a seeded block (``ppl.api.seeded``, as used by ``Product.run``
    and guide fitting) continues that block's stream: repeatable as a whole."""
    from ppl.api import seeded

    def twice():
        with seeded(4):
            return fingerprint(run("importance", None)), fingerprint(run("importance", None))

    (a1, a2), (b1, b2) = twice(), twice()
    assert same(a1, b1) and same(a2, b2) and not same(a1, a2)


def test_an_explicit_generator_in_the_randomness_object():
    def once(seed):
        before = torch.get_rng_state()
        r = TorchRandomness(torch.Generator().manual_seed(seed))
        sites, lw, _ = smc(MIXED.interpreter(), MIXED.entry, MIXED.prepare_data(MIXED.bind((), YS), "cpu"), 200,
                           randomness=r)
        assert torch.equal(torch.get_rng_state(), before)
        return [("mu", sites["mu"][0].clone(), None), ("k", sites["k"][0].clone(), None), ("lw", lw.clone(), None)]

    assert same(once(0), once(0))
    assert not same(once(0), once(1))


def test_concurrent_guide_fits_are_reproducible():
    """Guide fitting (module initialisation included) under threads."""
    def fit(seed):
        g = ppl.guide(CONTINUOUS, YS, family="normal").fit(steps=15, seed=seed, progress=False)
        return [(k, v.detach().clone(), None) for k, v in sorted(g.net.state_dict().items())]

    before = torch.get_rng_state()
    alone = {s: fit(s) for s in (1, 2)}
    assert torch.equal(torch.get_rng_state(), before)
    got: dict = {}
    threads = [threading.Thread(target=lambda k=k, s=s: got.__setitem__(k, fit(s))) for k, s in enumerate([1, 2])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert same(got[0], alone[1]) and same(got[1], alone[2])


# ------------------------------------------------------------- the samplers themselves
PARAMS = {
    "normal": (0.5, 2.0), "lognormal": (0.1, 0.5), "half_normal": (2.0,), "student_t": (5.0, 1.0, 2.0),
    "cauchy": (0.0, 1.0), "laplace": (1.0, 2.0), "uniform": (-1.0, 3.0), "beta": (2.0, 3.0), "gamma": (2.0, 3.0),
    "inverse_gamma": (4.0, 2.0), "exponential": (2.0,), "dirichlet": (torch.tensor([1.0, 2.0, 3.0]),),
    "mv_normal": (torch.zeros(2), torch.tensor([[2.0, 0.5], [0.5, 1.0]])), "bernoulli": (0.3,), "flip": (0.5,),
    "binomial": (10.0, 0.3), "beta_binomial": (10.0, 2.0, 3.0), "categorical": (torch.tensor([0.2, 0.3, 0.5]),),
    "delta": (1.5,), "poisson": (4.0,), "geometric": (0.3,), "negative_binomial": (3.0, 0.4),
    "chi2": (3.0,), "half_cauchy": (2.0,), "half_student_t": (4.0, 2.0), "lkj_cholesky": (3, 1.5),
    "multinomial": (10, torch.tensor([0.2, 0.3, 0.5])), "pareto": (1.0, 3.0), "truncated_normal": (0.0, 1.0, -0.5, 2.0),
    "von_mises": (0.5, 2.0), "weibull": (2.0, 1.5), "zero_inflated_poisson": (3.0, 0.2),
}
# families whose torch/pyro sampler has no generator-aware path: drawn through the
# serialised fallback (torch's global generator swapped in under a lock, for one call)
FALLBACK = {"von_mises", "lkj_cholesky", "zero_inflated_poisson"}
# batched parameters too: one row per particle, as the interpreter builds them
BATCHED = {
    "normal": (torch.linspace(-1, 1, 4), torch.linspace(0.5, 2, 4)), "gamma": (torch.linspace(0.5, 3, 4), 2.0),
    "beta": (torch.linspace(0.5, 3, 4), 2.0), "poisson": (torch.linspace(0.5, 30, 4),),
    "bernoulli": (torch.linspace(0.1, 0.9, 4),), "categorical": (torch.softmax(torch.randn(4, 3), -1),),
    "dirichlet": (torch.rand(4, 3) + 0.5,), "negative_binomial": (torch.linspace(0.5, 3, 4), 0.4),
    "beta_binomial": (torch.tensor([1.0, 5.0, 10.0, 20.0]), 2.0, 3.0), "student_t": (torch.linspace(1, 9, 4),),
}


def cases():
    for name in PARAMS:
        yield pytest.param(name, PARAMS[name], id=name)
    for name in BATCHED:
        yield pytest.param(name, BATCHED[name], id=name + "-batched")


@pytest.mark.parametrize("name,args", list(cases()))
def test_each_family_draws_as_torch_does_from_its_own_generator(name, args):
    d = D.DISTRIBUTIONS[name].make(*args)
    fast = rng._resolve(type(d), "sample") is not None
    assert fast == (name not in FALLBACK), f"{name}: {'a' if fast else 'no'} generator-aware path"
    for shape in [(), (7,), (3, 2)]:
        torch.manual_seed(7)
        want = d.sample(shape)
        before = torch.get_rng_state()
        g = torch.Generator().manual_seed(7)
        got = rng.sample(d, shape, g)
        assert torch.equal(torch.get_rng_state(), before)
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want), name
        again = rng.sample(d, shape, torch.Generator().manual_seed(7))
        assert torch.equal(again, got)
    if name != "delta":
        a = rng.sample(d, (50,), torch.Generator().manual_seed(1))
        b = rng.sample(d, (50,), torch.Generator().manual_seed(2))
        assert not torch.equal(a, b), f"{name}: seeds 1 and 2 gave the same 50 draws"


def test_every_distribution_is_checked_here():
    missing = sorted(set(D.DISTRIBUTIONS) - set(PARAMS) - {"uniform_draw"})  # uniform_draw: a randint
    assert not missing, f"add parameters for {missing} to PARAMS in tests/test_threads.py"


@pytest.mark.parametrize("name", [n for n in PARAMS if n not in ("cauchy", "delta", "half_cauchy", "von_mises",
                                                                 "lkj_cholesky")])
def test_each_family_has_its_mean(name):
    """The generator-aware draws have the distribution's mean: |sample mean - mean| <
    5 standard errors (4000 draws, fixed seed)."""
    d = D.DISTRIBUTIONS[name].make(*PARAMS[name])
    n = 4000
    x = rng.sample(d, (n,), torch.Generator().manual_seed(0)).double()
    if name == "categorical":  # torch's Categorical has no mean: the values are indices
        k = torch.arange(3, dtype=torch.float64)
        p = d.probs.double()
        mean, var = (k * p).sum(), (k * k * p).sum() - (k * p).sum() ** 2
    else:
        mean, var = d.mean.double(), d.variance.double()
    se = torch.sqrt(var / n)
    assert bool((torch.abs(x.mean(0) - mean) < 5 * se + 1e-12).all()), (name, x.mean(0), mean, se)


def test_a_distribution_without_a_path_falls_back_to_a_swapped_global_generator():
    class Custom(pdist.Normal):  # a sampler of its own: rng has no path for it
        def sample(self, sample_shape=torch.Size()):
            return super().sample(sample_shape) + torch.rand(())

    d = Custom(torch.zeros(3), torch.ones(3))
    assert rng._resolve(Custom, "sample") is None
    torch.manual_seed(9)
    want = [d.sample((2,)) for _ in range(3)]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    g = torch.Generator().manual_seed(9)
    got = [rng.sample(d, (2,), g) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(got, want))

    # four threads, each with its own generator, drawing at once through the lock
    results: dict = {}

    def work(k):
        gen = torch.Generator().manual_seed(100 + k % 2)
        results[k] = torch.stack([rng.sample(d, (2,), gen) for _ in range(50)])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])
    assert not torch.equal(results[0], results[1])
    assert torch.equal(torch.get_rng_state(), before)


def test_rsample_keeps_gradients_and_torch_draws():
    loc = torch.tensor([0.5, -1.0], requires_grad=True)
    scale = torch.tensor([1.0, 2.0], requires_grad=True)
    for d in [pdist.Normal(loc, scale), pdist.LogNormal(loc, scale),
              torch.distributions.LowRankMultivariateNormal(loc, torch.ones(2, 1), scale * scale)]:
        torch.manual_seed(3)
        want = d.rsample((4,))
        got = rng.rsample(d, (4,), torch.Generator().manual_seed(3))
        assert torch.equal(got.detach(), want.detach())
        got.sum().backward()
        assert loc.grad is not None and bool(torch.isfinite(loc.grad).all()) and float(loc.grad.abs().sum()) > 0
        loc.grad = scale.grad = None


def test_outside_a_run_draws_come_from_the_global_generator():
    """Code that samples a DistValue outside any run (tests, notebooks) still follows
    ``torch.manual_seed``, as before."""
    from ppl.semantics.dist_values import DistValue
    from ppl.semantics.values import Particles
    dv = DistValue(D.get("normal"), (0.0, 1.0))
    assert rng.generator("cpu") is None
    torch.manual_seed(2)
    a = dv.sample(Particles.all(5)).t
    torch.manual_seed(2)
    assert torch.equal(dv.sample(Particles.all(5)).t, a)
    assert math.isfinite(float(a.sum()))
