"""What building a result costs on top of the algorithm (issue 10 item 6).

A 10-site model (ten normal means, one observation each) under ``Model.run("mh")`` with
its default options (particles=1000, which mh takes as its chains; 1000 kept draws after
500 burn-in; the prior kernel). Each run is split into the ``inference.mh.mh`` call (the
algorithm) and everything else ``Model.run`` does around it (chain diagnostics, the result
object, its warnings): both in CPU seconds of this process (``time.process_time``), so that
other load on a shared machine does not blur the split. Prints the medians over
``--repeats`` runs. Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/bench_result_build.py``.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import ppl
import ppl.inference.methods as methods

SITES = 10
SOURCE = "def model(ys):\n" + "".join(
    f"    m{i} ~ normal(0, 1)\n    observe ys[{i}] ~ normal(m{i}, 1)\n" for i in range(SITES)
) + "    return m0\n"
DATA = {"ys": [0.1 * i for i in range(SITES)]}


def timed_run(model) -> tuple[float, float, object]:
    """(CPU seconds of the mh call, CPU seconds of the whole Model.run, the result)."""
    inner = methods.mh
    spent = []

    def timed_mh(*args, **kwargs):
        t0 = time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            spent.append(time.process_time() - t0)

    methods.mh = timed_mh
    try:
        t0 = time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = model.run("mh", DATA, seed=0)
        total = time.process_time() - t0
    finally:
        methods.mh = inner
    return spent[0], total, res


def run(repeats: int = 5, quick: bool = False) -> dict:
    model = ppl.model(SOURCE)
    with warnings.catch_warnings():  # warm up
        warnings.simplefilter("ignore")
        model.run("mh", DATA, seed=0, samples=10, burn_in=0, particles=10)
    runs = [timed_run(model)[:2] for _ in range(repeats)]
    alone = statistics.median(a for a, _ in runs)
    full = statistics.median(t for _, t in runs)
    overhead = statistics.median(t - a for a, t in runs)
    print(f"\nresult building on mh, {SITES} sites, CPU seconds (median of {repeats}):")
    print(f"  mh alone         {alone:8.3f} s")
    print(f"  Model.run('mh')  {full:8.3f} s")
    print(f"  overhead         {overhead:8.3f} s  ({100 * overhead / alone:+.1f}%)")
    return {"alone_s": alone, "full_s": full, "overhead_s": overhead}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    torch.set_num_threads(1)
    run(ap.parse_args().repeats)
