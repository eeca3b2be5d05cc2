"""The inference-time scaling study's methods at equal budget: time per problem, tokens
per second, accuracy (examples/lm_scaling.py, issue 14 item 5).

Language model: the small character-level GRU of ``stdlib/lm/small.py`` trained on
2-digit additions written in steps (``lm_scaling.task_lm``: 1000 Adam steps, ``--quick``
400; cached under bench/results/), on CPU, torch threads fixed (``bench/run.py
--threads``, default 1). Verifier: ``NoisyPRM(eps = 0.2)``.

Contenders (each a DSL model run by ``Model.run``, budget N particles/candidates; one
sample = the same K problems solved once each, from the same seeds in every sample):

* best-of-N: ``best_of_n`` on ``outcome_scored``;
* majority: ``importance`` on ``outcome_scored`` (plain and PRM-weighted votes);
* SMC: ``smc`` on ``prm_twisted`` (the PRM as the twist, resampling after every step);
* SMC steer: ``smc_steer``, N/4 parents x 4 children;
* beam: ``method="beam"``, when the project has it.

Figures: median time per problem over the repeats (contenders interleaved), its ratio to
best-of-N, tokens drawn per second (every particle's draws, copies included) and distinct
next-token rows the LM computed per problem (SMC's resampled copies share contexts),
and the accuracy over the K problems (a smoke figure: the study has the SEs). Then the
CPU time of the whole ``--quick`` study (target: under 60 s), and, without ``--quick``,
the CPU time of the full study at its defaults is the example's own printout (target
<= 10 min).
"""
from __future__ import annotations

import contextlib
import io
import os
import pathlib
import statistics
import sys
import time
import warnings

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

from common import load_average, report, time_interleaved  # noqa: E402


def run(repeats: int = 9, quick: bool = False) -> dict:
    import lm_scaling as S
    from ppl.semantics.errors import PPLDiagnosticWarning

    cache = HERE / "results"
    cache.mkdir(exist_ok=True)
    steps = 400 if quick else 1000
    lm = S.task_lm(cache, steps)
    study = S.Study(lm, lam=3.0)
    n, eps = (8, 0.2) if quick else (32, 0.2)
    k = 3 if quick else 8
    reps = min(repeats, 3) if quick else repeats
    probs = [S.problem_prompt(a, b) for a, b in S.problems(k, 4242)]
    methods = ["best_of_n", "majority", "smc", "smc_steer"] + (["beam"] if study.has_beam else [])
    outcomes: dict = {}

    def contender(m):
        def fn():
            recs = [study.solve(m, p, n, eps, seed=i) for i, p in enumerate(probs)]
            outcomes[m] = recs
            return recs
        return fn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PPLDiagnosticWarning)
        times = time_interleaved({m: contender(m) for m in methods}, reps, warmup=1)
    per_problem = {m: [t / k for t in ts] for m, ts in times.items()}
    notes = {}
    for m in methods:
        recs = outcomes[m]
        tokens = statistics.mean(r["tokens"] for r in recs)
        rows = statistics.mean(r["rows"] for r in recs)
        acc = statistics.mean(r["correct"][0] for r in recs)
        notes[m] = (f"{tokens / statistics.median(per_problem[m]):>8,.0f} tok/s; {tokens:.0f} tokens, "
                    f"{rows:.0f} LM rows per problem; accuracy {acc:.2f} on {k}")
    out = report(f"Inference-time scaling methods, 2-digit addition in steps, N = {n}, PRM eps = {eps}, "
                 f"{k} problems per sample (ms per problem; ratio to best-of-N)", per_problem, "best_of_n",
                 extra=notes)
    t0 = time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        S.main(["--quick", "--cache", str(cache), "--train-steps", str(steps), "--plot", ""])
    quick_cpu = time.process_time() - t0
    print(f"  the --quick study (16 problems, N = 1..8, three verifiers, every method): {quick_cpu:.1f} s CPU "
          f"(target < 60 s: {'OK' if quick_cpu < 60 else 'MISSED'}); load average {load_average()}")
    out["quick_study_cpu_s"] = quick_cpu
    return out



if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch
    torch.set_num_threads(a.threads)
    run(a.repeats, a.quick)
