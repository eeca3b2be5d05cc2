"""Peak memory (RSS) of SMC on the state-space model, against a hand-written filter.

Model: the 1-D linear-Gaussian state-space model of ``bench_smc`` (x_0 ~ N(0, 1),
x_t = 0.9 x_{t-1} + N(0, 1), y_t ~ N(x_t, 1)), bootstrap SMC with systematic resampling
after every observation. Each configuration runs in a fresh single-threaded subprocess
(``OMP_NUM_THREADS=1``), which reports its peak resident set size (``VmHWM`` of
``/proc/self/status``; ``ru_maxrss`` where there is no ``/proc``) and its RSS after the
imports (torch, ppl), so "run" = peak - imports is what the run itself added.

Configurations:

* hand-written torch, T = 1000, N = 10^6: ``bench_smc.hand_pf`` (keeps the current
  particles only): the reference.
* ppl smc ``keep=["return"]``, T = 1000, N = 10^6: only the return value is kept, so the
  run's memory must not grow with T (target: peak under 2 GB).
* ppl smc, default ``keep``, T = 100, N = 10^6: a filtering-size run, which keeps the
  return value and the last value of each re-drawn address (the rule of
  ``inference.smc``).

Runnable alone: ``python bench/bench_memory.py [--quick]`` (``--quick``: N = 10^5), or
through ``bench/run.py --only memory``. The whole benchmark takes a few minutes.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GB = 2 ** 30
TARGET_BYTES = 2 * GB  # ppl smc, keep=["return"], T = 1000, N = 10^6


def _peak_and_current_rss() -> tuple[int, int]:
    """(peak RSS, current RSS) of this process in bytes."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024
    except (OSError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak


def _data(T: int):
    """Observations of length T from the model (seed 0)."""
    import torch
    g = torch.Generator().manual_seed(0)
    x, ys = 0.0, []
    for _ in range(T):
        x = 0.9 * x + float(torch.randn((), generator=g))
        ys.append(x + float(torch.randn((), generator=g)))
    return torch.tensor(ys)


def _one(config: dict) -> dict:
    """Run one configuration in this process; returns its figures."""
    import torch
    torch.set_num_threads(1)
    import ppl
    from bench_importance import SSM, kalman_log_evidence
    from bench_smc import hand_pf
    ys = _data(config["T"])
    torch.manual_seed(1)
    if config["kind"] == "ppl":
        model = ppl.model(SSM)
    _, imports = _peak_and_current_rss()
    t0 = time.perf_counter()
    extra = {}
    if config["kind"] == "hand":
        log_z = hand_pf(ys, config["N"])
    else:
        options = {} if config.get("keep", "default") == "default" else {"keep": config["keep"]}
        res = model.run("smc", {"ys": ys}, particles=config["N"], resampling="systematic", ess_threshold=1.0,
                        seed=1, **options)
        log_z = res.log_evidence
        extra["sites"] = sorted(res.sites) if hasattr(res, "sites") else None
        extra["dropped_sites"] = len(res.extra.get("dropped_sites", ()))
    seconds = time.perf_counter() - t0
    peak, _ = _peak_and_current_rss()
    return {"peak": peak, "imports": imports, "seconds": seconds, "log_z": float(log_z),
            "kalman": kalman_log_evidence(ys), **extra}


def measure(config: dict, timeout: float = 600) -> dict:
    """Run one configuration in a fresh single-threaded subprocess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(config)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _label(config: dict) -> str:
    name = "hand-written torch" if config["kind"] == "hand" else f"ppl smc keep={config.get('keep', 'default')}"
    return f"{name}, T = {config['T']:,}, N = {config['N']:,}"


def run(repeats: int = 1, quick: bool = False) -> dict:
    """Measure every configuration (``repeats`` is ignored: one run each)."""
    n = 100_000 if quick else 1_000_000
    configs = [
        {"kind": "hand", "T": 1000, "N": n},
        {"kind": "ppl", "T": 1000, "N": n, "keep": ["return"]},
        {"kind": "ppl", "T": 100, "N": n, "keep": "default"},
    ]
    print(f"\nPeak RSS of SMC on the state-space model (each configuration in a fresh single-threaded "
          f"process; 'run' = peak - RSS after imports)")
    print(f"  {'configuration':<52} {'peak MB':>9} {'run MB':>8} {'seconds':>8}  log Z (Kalman)")
    results = {}
    for config in configs:
        r = measure(config)
        results[_label(config)] = r
        if "error" in r:
            print(f"  {_label(config):<52} failed: {r['error']}")
            continue
        note = f"{r['log_z']:.2f} ({r['kalman']:.2f})"
        if r.get("dropped_sites"):
            note += f"; {r['dropped_sites']} sites dropped, kept {r['sites']}"
        print(f"  {_label(config):<52} {r['peak'] / 2**20:>9.0f} {(r['peak'] - r['imports']) / 2**20:>8.0f} "
              f"{r['seconds']:>8.1f}  {note}")
    kept_only_return = results[_label(configs[1])]
    if not quick and "peak" in kept_only_return:
        ok = kept_only_return["peak"] < TARGET_BYTES
        print(f"  target: ppl smc keep=['return'] at T = 1000, N = 10^6 under 2 GB peak: "
              f"{'OK' if ok else 'MISSED'} ({kept_only_return['peak'] / GB:.2f} GB)")
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(_one(json.loads(sys.argv[2]))))
    else:
        run(quick="--quick" in sys.argv)
