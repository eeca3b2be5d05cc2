"""Run every benchmark: `.venv/bin/python bench/run.py [--threads 1] [--repeats 9] [--quick] [--clock wall|cpu]`.

Prints, per benchmark, the median time of each contender and its ratio to the reference
measured in the same run. torch's thread count is fixed for all contenders (and the
OpenMP/MKL/OpenBLAS thread counts set to it before torch is imported, unless already
set). ``--clock cpu`` times with the process's CPU time instead of the wall clock (for a
loaded shared machine: see ``common``).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, for every contender")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--only", default=None, help="run only benchmarks whose module name contains this")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall-clock time (default) or the process's CPU time")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    import torch
    import common
    torch.set_num_threads(args.threads)
    common.set_clock(args.clock)
    print(f"torch {torch.__version__}, {args.threads} intra-op thread(s), python {platform.python_version()}, "
          f"{os.cpu_count()} cpus, clock: {args.clock}, load average: {common.load_average()}")
    import bench_amortized
    import bench_enumerate_sites
    import bench_delayed
    import bench_distributed
    import bench_enumerate
    import bench_importance
    import bench_lm
    import bench_lm_batching
    import bench_lm_constraints
    import bench_lm_masks
    import bench_lm_scaling
    import bench_memory
    import bench_mh
    import bench_nuts
    import bench_smc
    for mod in [bench_importance, bench_smc, bench_mh, bench_lm, bench_lm_batching, bench_lm_constraints, bench_lm_masks, bench_lm_scaling, bench_amortized, bench_memory,
                bench_nuts, bench_delayed, bench_enumerate, bench_enumerate_sites, bench_distributed]:
        if args.only and args.only not in mod.__name__:
            continue
        mod.run(repeats=args.repeats, quick=args.quick)
    print(f"\nload average at the end: {common.load_average()}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
