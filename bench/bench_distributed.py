"""Distributed SMC (issue 15): what moves between ranks, and weak/strong scaling with 1
and 2 gloo ranks on this machine.

    .venv/bin/python bench/bench_distributed.py [--quick]

1. **Rows moved per resampling** (one process, no ranks: the transfer plan of
   ``semantics.distributed`` for i.i.d. log-normal weights of a given ESS fraction): the
   simulated count against the cost model of docs/distributed_cost.md,
   rows ~ K sqrt(N pi / 32) sqrt(1/ess - 1).
2. **Collectives** with 2 ranks: the status all_gather (one per checkpoint) and one
   point-to-point buffer of 4 MB (the bandwidth rows move at).
3. **Scaling**: SMC on a linear-Gaussian state-space model (T = 20 and 200 checkpoints,
   resampling at each) with 1 and 2 ranks: weak (N per rank fixed) and strong (N total
   fixed), the median wall time of rank 0 over repeats, CPU time per rank (the mean over
   the ranks), the rows moved and the resamplings whose live state moved.
4. **The live-state move** in one process: the walk of the suspended run and its digest
   (``semantics.live_state``), per resampling, at checkpoint 1 and T of the SSM (the same:
   no growth with the checkpoint).
5. **Prediction** at 8-64 ranks from the cost model with the constants measured in 2-4.
Ranks are forked from this process (as the tests do); the machine is shared, so the load
average is printed with the timings.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from common import load_average  # noqa: E402

SSM = """
def main(ys):
    x = 0.0
    for t in range(len(ys)):
        x ~ normal(0.8 * x, 1.0)
        observe ys[t] ~ normal(x, 0.7)
    return x
"""


# ------------------------------------------------------------------ 1. the plan, simulated
def predicted_rows(N: int, K: int, ess: float) -> float:
    """The cost model: expected rows moved per resampling (docs/distributed_cost.md)."""
    return K * math.sqrt(N * math.pi / 32) * math.sqrt(max(0.0, 1 / ess - 1))


def predicted_costs(N: int, K: int, ess: float, status_s: float, bytes_per_s: float, t_step: float,
                    walk_s: float, state_bytes: int = 4) -> tuple[float, float, float]:
    """Seconds per resampling on one rank (docs/distributed_cost.md): (communication:
    the status collective (a ring: K - 1 latencies) and the rank's share R / K of the
    moved rows, each ``state_bytes`` (the live state: one float32 for the SSM); the step
    itself (n = N / K particles advance one checkpoint); the live-state move's own work,
    the walk of the suspended run, whatever N and the checkpoint)."""
    n = N / K
    rows = predicted_rows(N, K, ess) / K
    comm = (K - 1) * status_s + rows * state_bytes / bytes_per_s
    return comm, n * t_step, walk_s


def simulated_rows(N: int, K: int, sigma: float, trials: int, seed: int = 0) -> tuple[float, float]:
    """(mean rows moved, mean ESS fraction) over ``trials`` log-normal weight draws."""
    from ppl.semantics import distributed as D
    g = torch.Generator().manual_seed(seed)
    rows, esses = [], []
    for _ in range(trials):
        lw = torch.randn(N, generator=g, dtype=torch.float64) * sigma
        shards = [lw[s:s + n] for s, n in (D.shard(N, K, r) for r in range(K))]
        summary = D.WeightSummary.combine([D.local_summary(x) for x in shards], N)
        v = D.shared_uniforms("systematic", N, g)
        rows.append(D.TransferPlan.make(D.slot_ranges(summary, v), N).rows_moved())
        esses.append(summary.ess / N)
    return statistics.mean(rows), statistics.mean(esses)


def plan_table(quick: bool) -> list[dict]:
    out = []
    sizes = (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)
    for N in sizes:
        for K in (8, 64):
            for sigma in (0.3, 1.0):
                rows, ess = simulated_rows(N, K, sigma, trials=8 if N >= 1_000_000 else 40)
                out.append({"N": N, "K": K, "ess": ess, "rows": rows, "model": predicted_rows(N, K, ess)})
    return out


# ------------------------------------------------------------------ 2-3. ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, K: int, port: int, task: dict, out: str) -> None:
    code = 1
    try:
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(K), "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port), "PPL_DISTRIBUTED_TIMEOUT": "120"})
        torch.set_num_threads(1)
        result = _TASKS[task["name"]](task)
        with open(os.path.join(out, f"{task['name']}.{rank}.json"), "w") as f:
            json.dump(result, f)
        code = 0
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _collectives(task: dict) -> dict:
    from ppl.semantics import distributed as D
    import torch.distributed as dist
    with D.process_group() as group:
        lat = []
        for _ in range(task["repeats"]):
            t = time.perf_counter()
            group.status(D.AT_CHECKPOINT, 1, 0.0, 1.0, 1.0)
            lat.append(time.perf_counter() - t)
        buf = torch.zeros(4 * 2 ** 20, dtype=torch.uint8)
        bw = []
        for _ in range(5):
            group.status(D.AT_CHECKPOINT, 2)
            t = time.perf_counter()
            if group.rank == 0:
                dist.send(buf, dst=1)
            elif group.rank == 1:
                dist.recv(buf, src=0)
            group.status(D.AT_CHECKPOINT, 3)
            bw.append(time.perf_counter() - t)
        return {"status_s": statistics.median(lat), "p2p_4MB_s": statistics.median(bw)}


def _smc(task: dict) -> dict:
    import ppl
    from ppl.semantics import distributed as D
    model = ppl.model(SSM)
    ys = [math.sin(t / 3) for t in range(task["T"])]
    with D.process_group() as group:
        walls, cpus, moved = [], [], []
        for rep in range(task["repeats"]):
            group.status(D.AT_CHECKPOINT, rep)
            w, c = time.perf_counter(), time.process_time()
            res = model.run("smc", {"ys": ys}, particles=task["N"], seed=rep, distributed=True)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
            if res is not None:
                moved.append(res.extra["rows_moved"])
        return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
                "rows_moved": statistics.median(moved) if moved else None,
                "state_moves": res.extra.get("state_moves") if res is not None else None}


_TASKS = {"collectives": _collectives, "smc": _smc}


def launch(K: int, task: dict) -> list[dict]:
    out = tempfile.mkdtemp()
    fork = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [fork.Process(target=_rank_main, args=(r, K, port, task, out)) for r in range(K)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a rank failed: {[p.exitcode for p in procs]}")
    return [json.load(open(os.path.join(out, f"{task['name']}.{r}.json"))) for r in range(K)]


def single_smc(N: int, T: int, repeats: int) -> dict:
    import ppl
    model = ppl.model(SSM)
    ys = [math.sin(t / 3) for t in range(T)]
    walls = []
    for rep in range(repeats):
        w = time.perf_counter()
        model.run("smc", {"ys": ys}, particles=N, seed=rep)
        walls.append(time.perf_counter() - w)
    return {"wall_s": statistics.median(walls)}


def walk_seconds(T: int, N: int = 2000, repeats: int = 20) -> tuple[float, float]:
    """The live-state walk (and its digest) of the SSM suspended at checkpoint 1 and at
    checkpoint T, in one process: median seconds each."""
    import ppl
    from ppl.inference.methods import _program
    from ppl.inference.smc import SMCHandler
    from ppl.semantics import live_state
    from ppl.semantics.sampling import drive
    from ppl.semantics.values import Lineage, Particles, lineage_scope
    interp, entry, data = _program(ppl.model(SSM), {"ys": [math.sin(t / 3) for t in range(T)]}, "cpu")
    times: dict[int, float] = {}

    class Timing(SMCHandler):
        seen = 0

        def _checkpoint(self, eff):
            super()._checkpoint(eff)
            self.seen += 1
            if self.seen in (1, T):
                self.trace.parts.clear()  # (as distributed SMC sets the trace aside)
                runs = []
                for _ in range(repeats):
                    t = time.process_time()
                    live_state.walk([("run", self.gen), ("effect", eff), ("twist", self._twist)],
                                    self.lineage, data).digest()
                    runs.append(time.process_time() - t)
                times[self.seen] = statistics.median(runs)
    ctx = Particles.all(N)
    with lineage_scope(Lineage(ctx.idx)) as lineage:
        h = Timing(N, "cpu", lineage)
        h.gen = interp.run(entry, data, ctx)
        drive(h.gen, h)
    return times[1], times[T]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    return run(quick=args.quick)


def run(repeats: int | None = None, quick: bool = False) -> int:
    """The whole benchmark (as bench/run.py calls it); ``repeats`` None: 3 quick, 5 full."""
    torch.set_num_threads(1)
    print(f"\nDistributed SMC (1 and 2 gloo ranks on 127.0.0.1)")
    print(f"load average: {load_average()}, {os.cpu_count()} cpus")
    print("\n1. rows moved per resampling (systematic, i.i.d. log-normal weights): simulated vs model")
    print(f"{'N':>9} {'K':>4} {'ESS/N':>6} {'rows':>10} {'model':>10}")
    for r in plan_table(quick):
        print(f"{r['N']:>9} {r['K']:>4} {r['ess']:>6.2f} {r['rows']:>10.0f} {r['model']:>10.0f}")
    if repeats is None:
        repeats = 3 if quick else 5
    c = launch(2, {"name": "collectives", "repeats": 50})[0]
    print(f"\n2. collectives, 2 ranks: status all_gather {c['status_s'] * 1e6:.0f} us; 4 MB point-to-point "
          f"{c['p2p_4MB_s'] * 1e3:.1f} ms ({4 / max(c['p2p_4MB_s'], 1e-9):.0f} MB/s)")
    Ts = (10, 50) if quick else (20, 200)
    per_rank = 1000 if quick else 2000
    single_cpu = {}
    for T in Ts:
        print(f"\n3. SMC, linear-Gaussian SSM, T={T} checkpoints, resampling at each (load {load_average()})")
        print(f"{'scaling':>8} {'ranks':>5} {'N':>7} {'wall s':>8} {'cpu s/rank':>10} {'rows moved':>10} "
              f"{'state moves':>11}")
        for kind, sizes in (("weak", ((1, per_rank), (2, 2 * per_rank))), ("strong", ((1, 2 * per_rank),
                                                                                     (2, 2 * per_rank)))):
            for K, N in sizes:
                r = launch(K, {"name": "smc", "N": N, "T": T, "repeats": repeats})
                cpu = statistics.mean(x['cpu_s'] for x in r)
                if K == 1:
                    single_cpu[(T, N)] = cpu
                print(f"{kind:>8} {K:>5} {N:>7} {r[0]['wall_s']:>8.2f} {cpu:>10.3f} {r[0]['rows_moved']:>10} "
                      f"{r[0]['state_moves'] if r[0]['state_moves'] is not None else '-':>11}")
        s = single_smc(2 * per_rank, T, repeats)
        print(f"{'single':>8} {'-':>5} {2 * per_rank:>7} {s['wall_s']:>8.2f}   (Model.run without distributed)")
    T = Ts[-1]
    first, last = walk_seconds(T)
    print(f"\n4. the live-state walk per resampling (one process, N = 2000): checkpoint 1 {first * 1e3:.2f} ms, "
          f"checkpoint {T} {last * 1e3:.2f} ms")
    t_step = single_cpu[(T, 2 * per_rank)] / (T * 2 * per_rank)
    print(f"\n5. predicted communication share per resampling (docs/distributed_cost.md), with the constants "
          f"measured above: status {c['status_s'] * 1e6:.0f} us at K=2 (x (K-1) for a ring), "
          f"{4 / max(c['p2p_4MB_s'], 1e-9):.0f} MB/s, {t_step * 1e6:.2f} us per particle-checkpoint (CPU), "
          f"walk {last * 1e3:.2f} ms")
    print(f"{'N':>9} {'K':>4} {'ESS/N':>6} {'comm ms':>8} {'step ms':>8} {'walk ms':>8} {'comm share':>10}")
    for N in (10 ** 6, 10 ** 7):
        for K in (8, 16, 32, 64):
            comm, step, walk = predicted_costs(N, K, 0.5, c["status_s"], 4e6 / c["p2p_4MB_s"], t_step, last)
            print(f"{N:>9} {K:>4} {0.5:>6.2f} {comm * 1e3:>8.2f} {step * 1e3:>8.1f} {walk * 1e3:>8.2f} "
                  f"{comm / (comm + step + walk):>10.4f}")
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
