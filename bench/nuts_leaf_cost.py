"""Per-leapfrog cost of ppl's NUTS on the benchmark's models (CPU time, one thread).

`.venv/bin/python bench/nuts_leaf_cost.py [--models eight_schools,ar,logistic_regression]
[--chains 4] [--warmup 300] [--samples 300] [--repeats 3] [--fused auto|on|off]`

For each model: ``Model.run("nuts", compile=True)`` (the potential compiled by
TorchInductor from the start, so that the figure is not the compile="auto" decision's),
then the sampling phase's CPU seconds / its leapfrog steps per chain (all chains advance
in lockstep, so this is the cost of one batched step of every chain, a slight
overestimate since the batch runs as long as its longest tree). ``--fused off`` sets
``PPL_NUTS_FUSED=0`` (the per-op leaf, for a before/after on one checkout); ``on``
builds the fused leaf whatever the run's length (``hmc.LOOP_BUILD_* = 0``: a free build pays);
``auto`` is the default behaviour (no fused leaf on runs this short). Medians of
``--repeats`` runs in one process; the load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="eight_schools,ar,logistic_regression")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fused", choices=("auto", "on", "off"), default="auto")
    args = ap.parse_args()
    if args.fused == "off":
        os.environ["PPL_NUTS_FUSED"] = "0"
    import torch
    torch.set_num_threads(1)
    import ppl
    from ppl.inference import hmc
    from nuts_models import MODELS
    if args.fused == "on":
        hmc.LOOP_BUILD_FIXED = hmc.LOOP_BUILD_PER_OP = 0.0
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}  fused={args.fused}")
    for name in args.models.split(","):
        spec = MODELS[name]
        m = ppl.model(str(spec.ppl_file))
        data = spec.data()
        per_leaf, totals = [], []
        for r in range(args.repeats):
            t0 = time.process_time()
            res = m.run("nuts", data, particles=args.chains, samples=args.samples, burn_in=args.warmup,
                        seed=r, compile=True)
            totals.append(time.process_time() - t0)
            extra = res.extra
            n = extra["leapfrog_steps"] / args.chains  # batched steps (a lower bound: chains in lockstep)
            per_leaf.append(extra["phase_seconds"]["sampling"]["cpu"] / n * 1e6)
        print(json.dumps({"model": name, "us_per_leapfrog": round(statistics.median(per_leaf), 1),
                          "all": [round(x, 1) for x in per_leaf], "total_cpu_s": round(statistics.median(totals), 2),
                          "fused": extra.get("fused_leaf"), "compiled": extra.get("compiled")}))
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
