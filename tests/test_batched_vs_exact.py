"""Batched execution means the same as running each particle alone.

The interpreter runs all particles at once and splits the batch wherever control flow
depends on a random value (``semantics.interpreter``). These tests take programs whose
control flow is as random as it gets -- recursion, ``while`` loops with random exits,
ragged lists built in loops, ``filter``/``map``/``fold`` over random lists, ``mem`` with
random arguments, early returns from inside loops -- and check two things:

1. *Per particle*: replaying one particle's choices from a batched importance run in a
   run of its own (one particle, plain Python values) visits exactly the addresses the
   batch recorded for it, returns the same value, and gives the same log weight.
2. *In distribution*: the weighted marginals of the batched run agree with exact
   enumeration of the same (finite) program, cell by cell within 4.5 standard errors
   (delta-method, with Kish's binomial SE as a floor for rare cells:
   ``ppl.testing.montecarlo.table_discrepancies``), and so does the log evidence.
"""
import math

import pytest
import torch

import ppl
from ppl.result import _to_key
from ppl.semantics.sampling import Replay, column, drive
from ppl.semantics.values import Particles
from ppl.testing.montecarlo import describe, evidence_se, table_discrepancies

torch.set_num_threads(1)
N = 20_000
Z = 4.5

PROGRAMS = {
    "recursion": ("""
def geo(d):
    b ~ flip(0.4)
    if b or d == 0:
        return 0
    return 1 + geo(d - 1)

def model():
    n = geo(5)
    m = geo(2)
    condition n + m >= 2 or n == 0
    return n - m
""", ["geo/geo/b", "geo#1/geo/b", "geo/geo/geo/geo/geo/b"]),
    "tree": ("""
def size(d):
    leaf ~ flip(0.5)
    if leaf or d == 0:
        return 1
    return size(d - 1) + size(d - 1)

def model():
    s = size(3)
    observe (s % 2 == 0) ~ bernoulli(0.7)
    return s
""", ["size/leaf", "size/size#1/leaf", "size/size#1/size#1/size#1/leaf"]),
    "while_walk": ("""
def model():
    x = 0
    steps = 0
    while x > -2 and x < 3 and steps < 6:
        s ~ flip(0.6)
        x = x + (1 if s else -1)
        steps = steps + 1
        if x == 0:
            observe True ~ bernoulli(0.5)
    return (x, steps)
""", ["s[2]", "s[5]"]),
    "ragged_lists": ("""
def model():
    n ~ categorical([1, 1, 1, 1])
    xs = []
    for i in range(n):
        v ~ categorical([1, 2, 1])
        xs = append(xs, v - 1)
    pos = filter(lambda x: x > 0, xs)
    k ~ flip(0.5)
    ys = filter(lambda x: sample(flip(0.5)) or k, xs)
    condition len(ys) < 3
    return (len(pos), sum(ys))
""", ["v[2]", "n"]),
    "mem_random_args": ("""
def model():
    f = mem(lambda i: sample(categorical([1, 2, 3])))
    i ~ categorical([1, 1, 1])
    j ~ categorical([2, 1])
    a = f(i)
    b = f(j)
    c = f(i + j)
    observe (a + b) % 3 ~ categorical([1, 1, 2])
    return (a == b, c)
""", ["f(3)/sample", "f(0)/sample"]),
    "early_return": ("""
def first(n, p):
    for i in range(n):
        c ~ flip(p)
        if c:
            if i == 0:
                return -1
            return i
    return n

def model():
    k ~ categorical([1, 1, 1])
    r = first(k + 1, 0.3)
    if r < 0:
        extra ~ flip(0.5)
        return 10 if extra else 11
    return r + k
""", ["first/c[1]", "extra"]),
    "map_fold_ragged": ("""
def model():
    n ~ categorical([1, 1, 1])
    xs = map(lambda i: sample(flip(0.3)), range(n + 1))
    t = fold(lambda acc, x: acc + (2 if x else -1), 0, xs)
    heads = filter(lambda x: x, xs)
    observe len(heads) ~ binomial(3, 0.5)
    return t
""", ["lambda[2]/sample"]),
    "scalar_left_operands": ("""
def model():
    k ~ binomial(3, 0.4)
    j ~ categorical([1, 2, 1])
    a = 2 > k
    b = 1 == j
    c = 0 <= k - j
    if 1 != k:
        return (a, b, c, 3 - k)
    return (a, b, c, 5 // (j + 1))
""", ["k"]),
    "random_range": ("""
def model():
    n ~ categorical([1, 1, 1, 1])
    s = sum(range(n))
    t = len(list(range(1, n + 1)))
    m = 2 in range(n)
    ys = map(lambda i: sample(flip(0.5)) and i > 0, range(n))
    total = 0
    for i in range(n):
        total = total + i
    return (s, t, m, len(filter(lambda y: y, ys)), total)
""", ["lambda[2]/sample"]),
    "bool_arithmetic": ("""
def model():
    a ~ flip(0.3)
    b ~ flip(0.6)
    return (a + b, a * 2 - b, -a, a - b, 2 - a, a * b)
""", ["b"]),
    "uniform_draw_of_random_items": ("""
def model():
    x ~ categorical([1, 1, 2])
    observe 2 ~ uniform_draw([x, x + 1, 5])
    y ~ uniform_draw([x, x + 1, 5])
    return y
""", ["x"]),
    "observe_lists": ("""
def model():
    p ~ uniform_draw([0.25, 0.5, 0.75])
    a ~ flip(0.5)
    observe [1, 0, 1] ~ bernoulli(p)
    observe [1, 0] ~ bernoulli([p, 0.5] if a else [0.5, p])
    t = (p, a)
    return (t in [(0.25, True), (0.75, False)], a)
""", ["p"]),
    "strings_and_branches": ("""
def model():
    w ~ uniform_draw(["ab", "c", "de"])
    if w == "c":
        k ~ binomial(2, 0.5)
        return w + str(k)
    elif len(w) == 2:
        z ~ flip(0.25)
        if z:
            return w
    return "none"
""", ["k", "z"]),
}


def _replay(model, trace: dict, n: int, prior_only=False):
    """Run the model scoring the given choices: (returns as keys, log joint [n], addresses)."""
    h = (_PriorOnly if prior_only else Replay)(trace, n, "cpu")
    ctx = Particles.all(n)
    ret = drive(model.interpreter().run(model.entry, model.prepare_data({}, "cpu"), ctx), h)
    col = column(ret, ctx)
    keys = [_to_key(x) for x in (col.tolist() if isinstance(col, torch.Tensor) else col)]
    return keys, h.log_weights.double(), set(h.trace.parts)


class _PriorOnly(Replay):
    """Replay that scores only the choices (the log prior of a trace)."""

    def observe(self, eff):
        pass

    def factor(self, eff):
        pass

    def condition(self, eff):
        pass


def _plain(v):
    return v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v


@pytest.fixture(scope="module", params=sorted(PROGRAMS))
def case(request):
    src, sites = PROGRAMS[request.param]
    m = ppl.model(src)
    return request.param, m, sites, m.run("enumerate"), m.run("importance", particles=N, seed=0)


def test_each_particle_alone_does_what_it_did_in_the_batch(case):
    name, m, _, _, r = case
    n_check = 150
    ret_keys = [_to_key(x) for x in (r.samples["return"][:n_check].tolist()
                                     if isinstance(r.samples["return"], torch.Tensor)
                                     else r.samples["return"][:n_check])]
    choice_sites = {a: s for a, s in r.sites.items() if a != "return"}
    for i in range(n_check):
        present = {a for a, s in choice_sites.items() if s.present is None or bool(s.present[i])}
        trace = {a: _plain(choice_sites[a].value[i]) for a in present}
        keys, lj, visited = _replay(m, trace, 1)
        _, lp, _ = _replay(m, trace, 1, prior_only=True)
        assert visited == present, f"{name}, particle {i}: addresses differ"
        assert keys[0] == ret_keys[i], f"{name}, particle {i}: return {keys[0]!r} vs batch {ret_keys[i]!r}"
        lw = float(r.log_weights[i])
        if lw == -math.inf:
            assert float(lj[0]) == -math.inf
        else:
            assert float(lj[0] - lp[0]) == pytest.approx(lw, abs=1e-5), f"{name}, particle {i}: weight"


def test_batched_replay_equals_per_particle_replay(case):
    name, m, _, _, r = case
    choice_sites = {a: s for a, s in r.sites.items() if a != "return"}
    if name == "strings_and_branches":  # log_joint replays tensors only, not lists of strings
        assert not isinstance(choice_sites["w"].value, torch.Tensor)
        return
    assert all(isinstance(s.value, torch.Tensor) for s in choice_sites.values())
    n = 300
    trace = {a: s.value[:n] for a, s in choice_sites.items()}
    keys, lj, _ = _replay(m, trace, n)
    for i in range(0, n, 7):
        one = {a: _plain(s.value[i]) for a, s in choice_sites.items()
               if s.present is None or bool(s.present[i])}
        k1, lj1, _ = _replay(m, one, 1)
        assert k1[0] == keys[i]
        assert float(lj1[0]) == pytest.approx(float(lj[i]), abs=1e-5) or float(lj1[0]) == float(lj[i])


def test_batched_marginals_match_exact_enumeration(case):
    name, m, sites, exact, r = case
    assert r.ess > 2000
    failures = table_discrepancies(r, exact, "return", Z)
    for s in sites:
        assert s in exact.names, f"{name}: exact run has no site {s}"
        failures += table_discrepancies(r, exact, s, Z)
    assert not failures, f"{name}:\n" + "\n".join(failures)


def test_batched_evidence_matches_exact(case):
    name, m, _, exact, r = case
    log_z, se = evidence_se(r.log_weights)
    truth = float(exact.log_evidence)
    if se == 0:  # every weight equal: no likelihood at all, Z = 1 exactly
        assert truth == 0 and log_z == pytest.approx(0, abs=1e-6)
    else:
        assert abs(log_z - truth) <= Z * se, f"{name}: {describe(log_z, truth, se)}"


def test_every_exact_site_is_sampled(case):
    name, m, _, exact, r = case
    # every address the program can reach is reached by some particle (20k particles,
    # no address here has prior probability below 1e-3), and no particle invents one
    assert set(exact.names) == set(r.names), (set(exact.names) ^ set(r.names))


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "known limitation: after a random `if` whose branches make different numbers of "
    "same-named choices/calls, the batch continues every particle from the larger "
    "counter (addresses stay unique in the batch), while a particle run alone (and "
    "exact enumeration) continues from its own branch's count: z is 'coin#2/c' in the "
    "batch but 'coin#1/c' for an a=False particle run alone"))
def test_addresses_after_unequal_branches_are_per_particle():
    m = ppl.model("""
def coin():
    c ~ flip(0.5)
    return c

def model():
    a ~ flip(0.5)
    if a:
        x = coin()
        y = coin()
    else:
        x = coin()
    z = coin()
    return z
""")
    r = m.run("importance", particles=200, seed=0)
    a = r.samples["a"]
    i = int((~a).nonzero()[0])  # a particle that took the else branch
    present = {n for n, s in r.sites.items() if n != "return" and (s.present is None or bool(s.present[i]))}
    trace = {n: _plain(s.value[i]) for n, s in r.sites.items() if n != "return"}  # every address has a value
    _, _, visited = _replay(m, trace, 1)
    assert visited == present
