"""Timing helpers shared by the benchmarks: interleaved repetitions, medians, ratios.

Contenders are timed in alternation (A, B, A, B, ...) so that a burst of load on the
shared machine hits both, and the reported figure is the ratio of medians. torch's
intra-op thread count is fixed for every contender (``--threads``, default 1).

``clock`` is what every benchmark times with: wall-clock time by default, or the
process's CPU time (``run.py --clock cpu``), which on a loaded shared machine leaves out
the time the process waits for a core (with one intra-op thread the process's CPU time
is the contender's own work; the ratios of the two clocks agree on an idle machine).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages ("n/a" where /proc is missing),
    printed next to every timing: figures taken under load are noisy."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def set_clock(name: str) -> None:
    """Time every benchmark with ``CLOCKS[name]`` from now on."""
    global clock
    clock = CLOCKS[name]


def now() -> float:
    """The current reading of the benchmarks' clock (seconds)."""
    return clock()


def time_interleaved(contenders: dict[str, Callable[[], object]], repeats: int = 9, warmup: int = 2,
                     results: dict[str, list] | None = None):
    """name -> list of wall-clock seconds, timing the contenders in alternation. When
    ``results`` is given, it receives name -> the return values of the timed calls."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = now()
            out = fn()
            times[name].append(now() - t0)
            if results is not None:
                results.setdefault(name, []).append(out)
    return times


def median_ms(ts: list[float]) -> float:
    return 1000 * statistics.median(ts)


def report(title: str, times: dict[str, list[float]], reference: str, target: float | None = None,
           extra: dict[str, str] | None = None) -> dict:
    """Print one table; returns {name: (median_ms, ratio_to_reference)}."""
    ref = statistics.median(times[reference])
    print(f"\n{title}")
    print(f"  {'contender':<28} {'median ms':>10} {'ratio':>7}")
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = med / ref
        out[name] = (1000 * med, ratio)
        note = (extra or {}).get(name, "")
        print(f"  {name:<28} {1000 * med:>10.2f} {ratio:>7.2f}  {note}")
    if target is not None:
        worst = max(r for n, (_, r) in out.items() if n != reference)
        verdict = "OK" if worst <= target else "MISSED"
        print(f"  target: within {target:.1f}x of {reference}: {verdict} ({worst:.2f}x)")
    return out


def script_main(run: Callable[[int, bool], object], repeats: int) -> None:
    """The command line of a benchmark run as a script: ``--threads`` (torch's intra-op
    threads, default 1), ``--repeats`` (default ``repeats``) and ``--quick``, then
    ``run(repeats, quick)``."""
    import argparse

    import torch
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run(a.repeats, a.quick)
