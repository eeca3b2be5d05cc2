"""Exact enumeration of a chain of k binary variables (issue 12, bench (c)).

Model (``CHAIN``): x_0 ~ flip(1/2), x_i ~ flip(0.9 if x_{i-1} else 0.2) for i = 1..k,
observe x_k ~ bernoulli(0.7), return x_k: 2^(k+1) execution paths.

Contenders, timed in alternation in one single-threaded process (``common``):

* ``ppl enumerate``: ``model.run("enumerate", {"k": k}).probs()`` -- the exact return
  distribution and evidence as Fractions; with the default strategy "auto" this is
  variable elimination (``semantics.exact_elimination``), including the dependency
  analysis, the covering runs of the program and the result object. The model is parsed
  once, outside the timing.
* ``forward (Fractions)``: the reference, a hand-written forward algorithm in plain
  Python over the same model with ``fractions.Fraction`` (the same exact answer; the
  benchmark checks that the two agree exactly).
* ``pyro TraceEnum`` (when pyro is importable): ``TraceEnum_ELBO`` with the chain under
  ``pyro.markov`` and parallel enumeration, float64 log evidence (not exact; a reference
  point for a PPL's dynamic programming). Pyro is timed in an alternation of its own with
  the forward algorithm, after ppl's: interleaved with ppl, its large working set evicted
  ppl's tables from the CPU caches before each ppl call (ppl/forward 5.8x at k = 10 with
  Pyro in the same alternation against 4.2-5.0x without, at the same load), a cost no
  user of ppl pays. Its ratio is still against the forward algorithm's median of ppl's
  alternation.

Reported per k = 10, 20, 50, 100, 200: median times, the ratio of ppl to the forward
algorithm (target: within 5x at every k), and the growth exponent of each contender (the
slope of log time against log k, least squares over the k's: 1 is linear). The path
enumeration that ``enumerate`` did before (``strategy="paths"``) is timed once at k = 10
for scale (2^11 paths; it doubles with each k).

Runnable alone: ``python bench/bench_enumerate.py [--quick]`` or ``bench/run.py --only enumerate``.
"""
from __future__ import annotations

import math
import os
import sys
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

CHAIN = """
def chain(k):
    x ~ flip(1/2)
    for i in range(k):
        x ~ flip(0.9 if x else 0.2)
    observe x ~ bernoulli(0.7)
    return x
"""
KS = (10, 20, 50, 100, 200)
TARGET = 5.0


def forward(k: int) -> dict:
    """{x_k: posterior probability} by the forward algorithm in Fractions."""
    hi, lo = Fraction(9, 10), Fraction(2, 10)
    a_true, a_false = Fraction(1, 2), Fraction(1, 2)
    for _ in range(k):
        t = a_true * hi + a_false * lo
        a_true, a_false = t, a_true + a_false - t
    a_true, a_false = a_true * Fraction(7, 10), a_false * Fraction(3, 10)
    z = a_true + a_false
    return {True: a_true / z, False: a_false / z}


def pyro_trace_enum(k: int):
    """A function computing the chain's log evidence with Pyro's TraceEnum_ELBO, or None."""
    try:
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro.infer import TraceEnum_ELBO, config_enumerate
    except ImportError:
        return None
    hi_lo = torch.tensor([0.2, 0.9], dtype=torch.float64)
    obs = torch.tensor(1.0, dtype=torch.float64)

    half = torch.tensor(0.5, dtype=torch.float64)
    likelihood = torch.tensor([0.3, 0.7], dtype=torch.float64)

    @config_enumerate
    def model():
        x = None
        for i in pyro.markov(range(k + 1)):  # the whole chain in one markov context
            x = pyro.sample(f"x_{i}", dist.Bernoulli(half if x is None else hi_lo[x.long()]))
            if i == k:
                pyro.sample("y", dist.Bernoulli(likelihood[x.long()]), obs=obs)

    def guide():
        pass

    elbo = TraceEnum_ELBO(max_plate_nesting=0)

    def run():
        return -elbo.loss(model, guide)
    return run


def growth(ks, medians) -> float:
    """The least-squares slope of log(median time) against log(k)."""
    xs, ys = [math.log(k) for k in ks], [math.log(t) for t in medians]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run(repeats: int = 9, quick: bool = False) -> dict:
    import ppl
    model = ppl.model(CHAIN)
    ks = KS[:3] if quick else KS
    medians: dict[str, list[float]] = {}
    ratios = []
    for k in ks:
        r = model.run("enumerate", {"k": k})
        assert r.strategy == "elimination" and r.probs() == forward(k), "ppl and the forward algorithm disagree"
        contenders = {"forward (Fractions)": lambda k=k: forward(k),
                      "ppl enumerate": lambda k=k: model.run("enumerate", {"k": k}).probs()}
        times = common.time_interleaved(contenders, repeats=repeats, warmup=1)
        pyro_run = pyro_trace_enum(k)
        if pyro_run is not None:  # (its own alternation with forward: see the module docstring)
            z = math.exp(float(pyro_run()))
            assert abs(z - float(r.evidence)) < 1e-9, (z, float(r.evidence))
            times["pyro TraceEnum"] = common.time_interleaved({"forward": lambda k=k: forward(k),
                                                               "pyro": pyro_run}, repeats=repeats, warmup=1)["pyro"]
        out = common.report(f"enumerate, chain of k = {k} binary variables (2^{k + 1} paths)", times,
                            "forward (Fractions)")
        ratios.append(out["ppl enumerate"][1])
        for name, (ms, _) in out.items():
            medians.setdefault(name, []).append(ms)
    print("\n  growth exponent (slope of log time vs log k, 1 = linear): " +
          ", ".join(f"{name} {growth(ks, ms):.2f}" for name, ms in medians.items()))
    worst = max(ratios)
    print(f"  ppl / forward at k = {', '.join(map(str, ks))}: {', '.join(f'{x:.1f}x' for x in ratios)}; "
          f"target within {TARGET:g}x at every k: {'OK' if worst <= TARGET else 'MISSED'} (worst {worst:.1f}x)")
    t0 = common.now()
    model.run("enumerate", {"k": 10}, strategy="paths")
    print(f"  for scale: path enumeration (strategy='paths') at k = 10 (2^11 paths): "
          f"{1000 * (common.now() - t0):.0f} ms once")
    return {"medians_ms": medians, "ratios": ratios, "ks": list(ks)}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    run(quick="--quick" in sys.argv)
