"""Per-step cost of traced vs interpreted random-walk MH on small static models.

`.venv/bin/python bench/mh_step_cost.py [--repeats 5] [--chains 8 1024]`

The figure docs/ARCHITECTURE.md quotes ("fewer microseconds per step" for
``inference/mh_traced.py``). Models: the two mixtures of ``bench_mh`` (2 sites, 20
points: one vectorised factor / 20 factors), ``examples/gaussian_mean.ppl`` (1 site, 20
observations) and ``examples/linear_regression.ppl`` (2 sites, 20 observations). For each,
``mh(kernel="rw", traced=True)`` against ``traced=False`` (the same kernel re-running the
interpreter at every step). Per-step microseconds = (time of a run of S2 steps - time of
a run of S1 steps) / (S2 - S1), which removes the fixed costs (building the trace, the
first eager run); repeats interleaved (the order alternates), medians, torch threads 1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import ppl  # noqa: E402
from ppl.inference.mh import mh  # noqa: E402

from bench_mh import PER_POINT, SIGMA, VECTORISED, W, make_data  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
S1, S2 = 100, 600


def _example(name):
    with open(os.path.join(EXAMPLES, f"{name}.json")) as fh:
        return ppl.model(os.path.join(EXAMPLES, f"{name}.ppl")), json.load(fh)


def cases() -> dict:
    mixture = {"ys": make_data(20).tolist(), "w": W, "sigma": SIGMA}
    return {
        "mixture, vectorised (2 sites, 20 points)": (ppl.model(VECTORISED), mixture),
        "mixture, per-point factor (2 sites, 20 factors)": (ppl.model(PER_POINT), mixture),
        "gaussian_mean.ppl (1 site, 20 obs)": _example("gaussian_mean"),
        "linear_regression.ppl (2 sites, 20 obs)": _example("linear_regression"),
    }


def per_step_us(model, data, chains: int, repeats: int) -> dict:
    """{traced: [us per step per repeat]} for True and False."""
    interp, prepared = model.interpreter(), model.prepare_data(model.bind((), data), "cpu")

    def run(traced, steps):
        info: dict = {}
        t = time.perf_counter()
        mh(interp, model.entry, prepared, chains=chains, samples=steps, burn_in=0, kernel="rw", scale=0.5,
           traced=traced, info=info)
        assert info["traced"] == traced, info
        return time.perf_counter() - t

    run(True, 10)   # warm-up
    run(False, 10)
    out = {True: [], False: []}
    for r in range(repeats):
        for traced in ((True, False) if r % 2 == 0 else (False, True)):
            out[traced].append((run(traced, S2) - run(traced, S1)) / (S2 - S1) * 1e6)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chains", type=int, nargs="+", default=[8, 1024])
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # diagnostics of these short runs are not the point here
    print(f"torch {torch.__version__}, 1 thread; {S2 - S1} steps measured per run, {args.repeats} repeats")
    for chains in args.chains:
        for name, (model, data) in cases().items():
            t = per_step_us(model, data, chains, args.repeats)
            tr, it = statistics.median(t[True]), statistics.median(t[False])
            each = sorted(b / a for a, b in zip(t[True], t[False]))
            print(f"{chains:5d} chains  {name:48s} traced {tr:7.0f} us/step  interpreted {it:7.0f} us/step  "
                  f"{it / tr:.2f}x (repeats {each[0]:.2f}..{each[-1]:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
