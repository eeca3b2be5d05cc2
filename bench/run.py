"""Run every benchmark: `.venv/bin/python bench/run.py [--threads 1] [--repeats 9] [--quick]`.

Prints, per benchmark, the median wall time of each contender and its ratio to the
reference measured in the same run. torch's thread count is fixed for all contenders.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, for every contender")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--only", default=None, help="run only benchmarks whose module name contains this")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} intra-op thread(s), python {platform.python_version()}, "
          f"{os.cpu_count()} cpus")
    import bench_amortized
    import bench_importance
    import bench_lm
    import bench_mh
    import bench_smc
    for mod in [bench_importance, bench_smc, bench_mh, bench_lm, bench_amortized]:
        if args.only and args.only not in mod.__name__:
            continue
        mod.run(repeats=args.repeats, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
