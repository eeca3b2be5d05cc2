"""The fixed per-step cost of SMC: ppl vs the hand-written filter on the state-space model.

`.venv/bin/python bench/smc_step_cost.py [--steps 200] [--particles 10 1000] [--repeats 9]`

At N = 1,000 the work per step is small and the ratio to the hand-written filter
(``bench_smc.hand_pf``) is set by what each side does per step besides arithmetic on N
numbers. This prints, for the bootstrap filter on ``bench_importance.SSM`` (systematic
resampling at every observation):

* microseconds per step of ``inference.smc.smc`` and of ``hand_pf`` (the process's CPU
  time, interleaved repeats, medians; at N = 10 both are almost all fixed cost), and
  their ratio;
* two counts that do not depend on the machine's load, so a change to the per-step path
  can be compared across runs on a shared machine: Python function calls per step
  (cProfile's count) and top-level torch operator calls per step (torch.profiler), each
  for ppl and for the hand-written filter.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import ppl  # noqa: E402
from ppl.inference.smc import smc  # noqa: E402

from bench_importance import SSM  # noqa: E402
from bench_smc import hand_pf  # noqa: E402


def _contenders(steps: int, n: int):
    torch.manual_seed(0)
    ys = 1.5 * torch.randn(steps)
    model = ppl.model(SSM)
    interp = model.interpreter()
    data = model.prepare_data(model.bind((), {"ys": ys}), "cpu")
    return {"ppl smc": lambda: smc(interp, "ssm", data, n, "cpu", resampling="systematic", ess_threshold=1.0),
            "hand-written torch": lambda: hand_pf(ys, n)}


def python_calls(fn) -> int:
    """Python function calls (cProfile's total, builtins included) of one call of fn."""
    fn()
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    return pstats.Stats(prof).total_calls


def torch_ops(fn) -> int:
    """Top-level torch operator calls of one call of fn."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.cpu_parent is None)


def step_times(contenders: dict, repeats: int) -> dict:
    """name -> median CPU seconds of one run (interleaved, after a warm-up)."""
    for fn in contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--particles", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--counts-only", action="store_true", help="only the load-independent counts")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"SMC on the state-space model, T = {args.steps}, per step (CPU time, medians of {args.repeats})")
    for n in args.particles:
        contenders = _contenders(args.steps, n)
        calls = {k: python_calls(fn) / args.steps for k, fn in contenders.items()}
        ops = {k: torch_ops(fn) / args.steps for k, fn in contenders.items()}
        line = (f"  N = {n:>7,}: Python calls {calls['ppl smc']:.0f} vs {calls['hand-written torch']:.0f}, "
                f"torch ops {ops['ppl smc']:.1f} vs {ops['hand-written torch']:.1f}")
        if not args.counts_only:
            t = step_times(contenders, args.repeats)
            ppl_us, hand_us = (1e6 * t[k] / args.steps for k in ("ppl smc", "hand-written torch"))
            line += f"; {ppl_us:.0f} us vs {hand_us:.0f} us, ratio {ppl_us / hand_us:.2f}"
        print(line + "  (ppl vs hand-written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
