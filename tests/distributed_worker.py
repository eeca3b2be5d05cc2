"""One rank of the jobs tests/test_distributed.py launches (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in the environment, as torchrun sets them). ``python distributed_worker.py
JOB[,JOB...] OUT_DIR``: rank 0 writes OUT_DIR/JOB.json for each.

Jobs: ``law`` (global resampling through the real collectives and row moves, against the
single-process schemes with the same uniforms), ``runs`` (distributed importance and SMC
on a conjugate model and a linear-Gaussian state-space model), ``raise`` (rank 1 raises
inside the model), ``kill`` (rank 1 dies mid-run), ``hang`` (rank 1 stops answering
mid-run)."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

torch.set_num_threads(1)

import ppl  # noqa: E402
from ppl.semantics import distributed as D  # noqa: E402
from ppl.semantics import resampling as R  # noqa: E402
from ppl.stdlib import rng  # noqa: E402

CONJUGATE = """
def main(ys):
    mu ~ normal(0.0, 2.0)
    for y in ys:
        observe y ~ normal(mu, 1.0)
    return mu
"""

SSM = """
def main(ys):
    x = 0.0
    for t in range(len(ys)):
        x ~ normal(0.8 * x, 1.0)
        observe ys[t] ~ normal(x, 0.7)
    return x
"""

#: the last statement before the checkpoint: a model that fails on one rank only
#: (the data differ per rank below), at its first observe
RAISING = """
def main(bad):
    x ~ normal(0.0, 1.0)
    observe 0.5 ~ normal(x, 1.0)
    s = -1.0 if bad else 1.0
    observe 0.2 ~ normal(x, s)
    return x
"""


def law_job(group: D.Group) -> dict:
    """For random weights (the same on every rank: seeded by the trial), each rank holds
    its shard and a column of its particles' global ids; a global resampling moves the
    ids as rows; rank 0 gathers every rank's new ids (= the global ancestors in slot
    order) and compares them with the single-process scheme on the whole population
    with the same uniforms."""
    results = []
    for trial in range(25):
        g = torch.Generator().manual_seed(trial)
        N = int(torch.randint(group.size, 30, (), generator=g))
        lw = torch.randn(N, generator=g, dtype=torch.float64) * 2
        lw[torch.rand(N, generator=g) < 0.25] = -math.inf
        if trial % 4 == 0:
            s0, n0 = D.shard(N, group.size, group.size - 1)
            lw[s0:s0 + n0] = -math.inf  # the last rank has no weight
        if not bool(torch.isfinite(lw).any()):
            lw[0] = 0.0
        start, n = D.shard(N, group.size, group.rank)
        mine = lw[start:start + n]
        rows = group.status(D.AT_CHECKPOINT, trial, *D.local_summary(mine))
        summary = D.WeightSummary.combine([r[2:5] for r in rows], N)
        for scheme in D.GLOBAL_SCHEMES:
            seed = 7919 * trial + len(scheme)
            v = D.shared_uniforms(scheme, N, torch.Generator().manual_seed(seed))
            ranges = D.slot_ranges(summary, v)
            plan = D.TransferPlan.make(ranges, N)
            drawn = D.local_ancestors(mine, summary, group.rank, v, *ranges[group.rank])
            ids = torch.arange(start, start + n)
            # (a bool column first: the float column after it starts at an unaligned byte)
            columns = {"odd": ids % 2 == 1, "id": ids, "twice": (2.0 * ids)[:, None].float()}
            specs = D.agree_on_columns(group, columns)
            moved = D.exchange_rows(group, plan, columns, specs, drawn)
            got = group.gather_object((moved["id"].tolist(), moved["twice"][:, 0].tolist(), moved["odd"].tolist()))
            if group.is_root:
                ids = [i for part in got for i in part[0]]
                twice = [x for part in got for x in part[1]]
                with rng.run(seed):
                    single = R.SCHEMES[scheme](R.normalised(lw), N).tolist()
                odd = [x for part in got for x in part[2]]
                results.append({"trial": trial, "scheme": scheme, "N": N, "ids": ids, "single": single,
                                "twice_ok": twice == [2.0 * i for i in ids] and odd == [i % 2 == 1 for i in ids],
                                "moved": plan.rows_moved(),
                                "sizes": [len(p[0]) for p in got]})
    return {"cases": results}


CONJ_YS = [0.3, -0.5, 1.2, 0.8, 0.1]
SSM_YS = [0.5, 1.1, 0.3, -0.4, -1.0, 0.2, 0.9, 1.5]

#: a choice some particles make (a presence mask), a bool choice and a twist: the moved rows
#: mix dtypes and the replay rebuilds the twist potentials
BRANCHY = """
def main(y):
    z ~ flip(0.3)
    x = 0.0
    if z:
        u ~ normal(2.0, 1.0)
        x = u
    observe y ~ normal(x, 1.0)
    twist(-0.1 * x * x)
    v ~ normal(x, 1.0)
    observe 1.0 ~ normal(v, 0.5)
    return z
"""

#: key -> (model source, method, data, particles, options): the runs compared in the tests
RUNS = {
    "conj_is": (CONJUGATE, "importance", {"ys": CONJ_YS}, 2001, {}),
    "conj_smc": (CONJUGATE, "smc", {"ys": CONJ_YS}, 1000, {"resampling": "systematic"}),
    "ssm_smc": (SSM, "smc", {"ys": SSM_YS}, 700, {"resampling": "stratified"}),
    "ssm_smc_mult": (SSM, "smc", {"ys": SSM_YS}, 701, {"resampling": "multinomial", "ess_threshold": 0.5}),
    "branchy_smc": (BRANCHY, "smc", {"y": 1.5}, 1001, {"resampling": "systematic"}),
    "conj_temper": (CONJUGATE, "tempering", {"ys": CONJ_YS}, 601, {"resampling": "stratified"}),
    "ssm_rm": (SSM, "resample_move", {"ys": SSM_YS}, 401, {"moves": 2, "kernel": "rw"}),
    "conj_temper_adapt": (CONJUGATE, "tempering", {"ys": CONJ_YS}, 501, {"adapt": True}),
    "conj_rm_adapt": (CONJUGATE, "resample_move", {"ys": CONJ_YS}, 301, {"adapt": True, "moves": 3}),
}


def runs_job(group: D.Group) -> dict:
    out = {}
    for key, (source, method, data, n, opts) in RUNS.items():
        model = ppl.model(source)
        reps = []
        for rep in range(4):
            res = model.run(method, data, particles=n, seed=100 + rep, distributed=True, **opts)
            if group.is_root:
                reps.append({"log_evidence": res.log_evidence, "mean": res.mean(), "var": res.var(), "n": res.n,
                             "ess": res.ess, "json_keys": sorted(res.to_json()),
                             "rows_moved": res.extra.get("rows_moved")})
            else:
                assert res is None
        out[key] = reps
    return out


#: method -> options of the chains job (5 chains: uneven over 2 ranks)
CHAINS = {"mh": {"samples": 400, "burn_in": 200, "kernel": "rw"}, "nuts": {"samples": 150, "burn_in": 150}}


def chains_job(group: D.Group) -> dict:
    """MH and NUTS chains shared by the ranks, on the conjugate model."""
    out = {}
    model = ppl.model(CONJUGATE)
    for method, opts in CHAINS.items():
        res = model.run(method, {"ys": CONJ_YS}, particles=5, seed=11, distributed=True, **opts)
        if group.is_root:
            j = res.to_json()
            out[method] = {"mean": res.mean(), "var": res.var(), "ess": res.ess_per_site["mu"] if hasattr(
                res, "ess_per_site") else j["ess_per_site"]["mu"], "r_hat": j["r_hat"], "chains": j["chains"],
                "draws": j["draws"], "per_rank": res.extra["chains_per_rank"], "json_keys": sorted(j)}
        else:
            assert res is None
    return out


#: the state a list that grows (a row per past step moves with each particle) and the
#: checkpoint inside a called function (nested frames); the Kalman filter's answer
LIST_SSM = """
def step(prev, y, a):
    x ~ normal(a * prev, 1.0)
    observe y ~ normal(x, 0.7)
    return x

def main(ys):
    xs = [0.0]
    a = 0.8
    for t in range(len(ys)):
        xs = xs + [step(xs[-1], ys[t], a)]
    return xs[-1]
"""

#: a per-particle function alive at a resampling that moves particles: not data, cannot
#: move (a per-particle string moves now: ``pyvalues_job``)
UNMOVABLE = """
def main():
    z ~ flip(0.5)
    s = (lambda x: x + 1.0) if z else (lambda x: x - 1.0)
    observe 1.0 ~ normal(3.0 if z else 0.0, 1.0)
    return s(1.0)
"""


def live_job(group: D.Group) -> dict:
    """Distributed SMC moving the live state (``semantics.live_state``): the list-state
    SSM and BRANCHY (4 seeds each), with the number of program runs each rank started
    (1 per SMC run: no replay) and how many resamplings moved the state; then the
    unmovable model's error on every rank."""
    from ppl.semantics.interpreter import Interpreter
    runs = [0]
    original = Interpreter.run

    def counted(self, *args, **kwargs):
        runs[0] += 1
        return original(self, *args, **kwargs)
    Interpreter.run = counted
    out = {}
    try:
        for key, source, data, n in (("list_ssm", LIST_SSM, {"ys": SSM_YS}, 601), ("branchy", BRANCHY, {"y": 1.5}, 801)):
            reps = []
            for rep in range(4):
                before = runs[0]
                res = ppl.model(source).run("smc", data, particles=n, seed=300 + rep, distributed=True)
                started = group.all_gather_object(runs[0] - before)
                if group.is_root:
                    reps.append({"log_evidence": res.log_evidence, "mean": res.mean(), "runs_per_rank": started,
                                 "state_moves": res.extra["state_moves"], "rows_moved": res.extra["rows_moved"],
                                 "sites": sorted(res.sites), "n": res.n})
            out[key] = reps
    finally:
        Interpreter.run = original
    try:
        ppl.model(UNMOVABLE).run("smc", {}, particles=400, seed=2, distributed=True)
        error = None
    except ppl.PPLError as err:
        error = str(err)
    out["unmovable"] = group.all_gather_object(error)
    return out


#: a state a discrete choice updates on one branch only (an unbatched value on one rank can
#: be batched on another) and a checkpoint inside a lambda that ``map`` calls
DISCRETE = """
def main(ys):
    p ~ beta(2.0, 2.0)
    state = 0
    for y in ys:
        flipz ~ flip(p)
        if flipz:
            state = state + 1
            w = 2.0
        else:
            w = 0.5
        observe y ~ normal(state * 0.5, w)
    return state
"""
MAPPED = """
def main(ys):
    s ~ gamma(2.0, 2.0)
    def obs(y):
        observe y ~ normal(0.0, s)
        return y * s
    zs = map(lambda y: obs(y), ys)
    return s
"""

#: a memoised random function (its table's entries move: coverage and value), with an entry
#: only the particles of one branch compute
MEMO_SSM = """
def main(ys):
    def level(i):
        v ~ normal(0.0, 1.0)
        return v
    f = mem(level)
    z ~ flip(0.4)
    b = f(2) if z else 0.0
    for t in range(len(ys)):
        observe ys[t] ~ normal(f(t % 2) + b, 1.0)
    return f(0) - f(1) + b
"""

#: key -> (model, data, particles): the same seeded run with the live state moved and with
#: the moved traces replayed (the mechanism before), which must agree bit for bit
ORACLE = {"ssm": (SSM, {"ys": SSM_YS}, 301, {}), "branchy": (BRANCHY, {"y": 1.5}, 302, {}),
          "list_ssm": (LIST_SSM, {"ys": SSM_YS[:5]}, 203, {}),
          "discrete": (DISCRETE, {"ys": [0.6, 1.1, 0.2, 1.9]}, 301, {}),
          "mapped": (MAPPED, {"ys": [0.3, -1.2, 0.8, 2.0]}, 301, {}),
          "ssm_adaptive": (SSM, {"ys": SSM_YS}, 301, {"ess_threshold": 0.6, "resampling": "multinomial"}),
          "memo": (MEMO_SSM, {"ys": [0.4, -0.3, 1.1, 0.2, 0.9]}, 301, {})}


def _replayed_smc(interp, entry, data, particles, device, group, shared, **options):
    """Distributed SMC as it was before the live state moved: at each resampling the
    traces move as rows and each rank rebuilds its shard by replaying them up to the
    checkpoint (resample-move's handler and loop with no moves)."""
    from ppl.inference import distributed as ID
    from ppl.inference.resample_move import drive_rebuilding
    sizes = D.shard_sizes(particles, group.size)
    n = sizes[group.rank]
    h = ID._DistributedResampleMove(n, device, None, group=group, total=particles, shared=shared, **options)

    def arrived():
        incoming, h.incoming = h.incoming, None
        return {a: c for a, c in incoming.items() if not a.startswith("present ")}
    sites = drive_rebuilding(interp, entry, data, h, n, device, arrived)
    group.status(D.FINISHED, h.checkpoints, where="end of the run")
    return ID.gather_population(group, "smc", sites, h.log_weights + h.log_z, {}, sizes)


def oracle_job(group: D.Group) -> dict:
    """Each ORACLE model, seeded alike, through ``distributed_smc`` (the live state moves)
    and ``_replayed_smc``: rank 0 compares the populations (every site's values and
    presence, the log weights) exactly."""
    from ppl.inference import distributed as ID
    from ppl.inference.methods import _program
    out = {}
    for key, (source, data, n, options) in ORACLE.items():
        model = ppl.model(source)
        pops = []
        for run in (ID.distributed_smc, _replayed_smc):
            shared = torch.Generator().manual_seed(D.derive_seed(17, -1))
            with rng.run(D.derive_seed(17, group.rank)):
                pops.append(run(*_program(model, data, "cpu"), n, "cpu", group, shared, **options))
        if group.is_root:
            live, replayed = pops
            same_sites = list(live.sites) == list(replayed.sites) and all(
                _same(live.sites[a][0], replayed.sites[a][0]) and _same(live.sites[a][1], replayed.sites[a][1])
                for a in live.sites)
            out[key] = {"sites": list(live.sites), "same_sites": same_sites,
                        "same_weights": torch.equal(live.log_weights, replayed.log_weights),
                        "state_moves": live.extra["state_moves"]}
    return out


def pool_job(group: D.Group) -> dict:
    """``RankPool`` (the adaptive moves' statistics over every rank) against
    ``population_moves``' single-process functions on the whole population: random
    populations (the same on every rank: seeded by the trial), each rank holding its
    shard; rank 0 records both."""
    from ppl.inference import population_moves as pm
    from ppl.inference.distributed import RankPool
    out = []
    for trial in range(6):
        g = torch.Generator().manual_seed(trial)
        N, F = 40 + trial, 1 + trial % 3
        start = torch.randn(N, F, generator=g, dtype=torch.float64)
        now = 0.6 * start + torch.randn(N, F, generator=g, dtype=torch.float64)
        lw = torch.randn(N, generator=g, dtype=torch.float64)
        lw[::7] = -math.inf
        accepted = torch.rand(N, generator=g) < 0.3
        s, n = D.shard(N, group.size, group.rank)
        pool = RankPool(group, N)
        got = {"cov": pool.covariance(start[s:s + n], lw[s:s + n]).tolist(),
               "corr": pool.max_correlation(start[s:s + n], now[s:s + n]),
               "mean": pool.mean(accepted[s:s + n]), "any": pool.any(bool(accepted[s:s + n].any())),
               "block": pool.block(tuple(["a", "b", f"c{group.rank}", "d"]))}
        want = {"cov": pm.population_covariance(start, lw).tolist(), "corr": pm.max_correlation(start, now),
                "mean": float(accepted.double().mean()), "any": bool(accepted.any()),
                "block": ("a", "b", "d") if group.size > 1 else ("a", "b", "c0", "d")}
        out.append({"got": got, "want": want})
    return {"cases": out}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


#: rank 1's data send its particles down the other branch: both ranks reach their first
#: checkpoint together, at different observes
DIVERGING = """
def main(a):
    x ~ normal(0.0, 1.0)
    if a:
        observe 1.0 ~ normal(x, 1.0)
    else:
        observe 2.0 ~ normal(x, 1.0)
    return x
"""


def diverge_job(group: D.Group) -> dict:
    ppl.model(DIVERGING).run("smc", {"a": group.rank == 1}, particles=40, seed=1, distributed=True)
    return {}


def raise_job(group: D.Group) -> dict:
    model = ppl.model(RAISING)
    model.run("smc", {"bad": group.rank == 1}, particles=40, seed=1, distributed=True)
    return {}


def _at_second_checkpoint(group: D.Group, action) -> None:
    """On rank 1, do ``action`` at the run's second checkpoint (mid-run)."""
    from ppl.inference.distributed import DistributedSMCHandler
    original = DistributedSMCHandler._checkpoint

    def checkpoint(self, eff):
        if group.rank == 1 and self.checkpoints == 1:
            action()
        return original(self, eff)
    DistributedSMCHandler._checkpoint = checkpoint


def kill_job(group: D.Group) -> dict:
    """Rank 1 dies (exit 17) in the middle of the run."""
    _at_second_checkpoint(group, lambda: os._exit(17))
    ppl.model(CONJUGATE).run("smc", {"ys": [0.1, 0.2, 0.3]}, particles=40, seed=1, distributed=True)
    return {}


def hang_job(group: D.Group) -> dict:
    """Rank 1 stops answering (sleeps) in the middle of the run: rank 0 must time out."""
    import time
    _at_second_checkpoint(group, lambda: time.sleep(120))
    ppl.model(CONJUGATE).run("smc", {"ys": [0.1, 0.2, 0.3]}, particles=40, seed=1, distributed=True)
    return {}


#: a per-particle string state (Python objects that move as JSON rows) and its numeric twin
#: (bit k of the int = the k-th letter): the same seeded run must give the same population
STRING_SSM = """
def main(ys):
    s = ""
    for y in ys:
        z ~ flip(0.6)
        s = s + ("a" if z else "b")
        mu = 1.5 if endswith(s, "ab") else (1.0 if z else 0.0)
        observe y ~ normal(mu, 0.8)
    return s
"""
STRING_TWIN = """
def main(ys):
    k = 0
    for y in ys:
        z ~ flip(0.6)
        k = 2 * k + (1 if z else 0)
        mu = 1.5 if k % 4 == 2 else (1.0 if z else 0.0)
        observe y ~ normal(mu, 0.8)
    return k
"""
STRING_YS = [0.9, 0.2, 1.4, 1.1, -0.3, 1.6]

#: steering the toy language model token by token (contexts grow as lists of per-particle
#: tokens; a factor after each token resamples): the exact posterior by enumeration
LM_STEER = """
def main(lm):
    toks = []
    for t in range(3):
        tok ~ lm.next_token(toks)
        toks = toks + [tok]
        factor 1.0 if endswith(lm.decode(toks), "s") else -0.5
    return lm.decode(toks)
"""
LM_STEER_TOY = """
def main():
    lm = toy_lm()
    toks = []
    for t in range(3):
        tok ~ lm.next_token(toks, allowed=lambda w: w != " tree")
        toks = toks + [tok]
        factor 0.8 if tok == " cat" or tok == "s" else 0.0
    return lm.decode(toks)
"""

#: steering a tiny untrained GRU (``SmallLM``, seeded: the same weights on every rank; its
#: prefix cache of hidden states stays on each rank, a moved context is recomputed there)
LM_STEER_GRU = """
def main(lm):
    toks = []
    for t in range(3):
        tok ~ lm.next_token(toks)
        toks = toks + [tok]
        factor 1.0 if tok == "a" else 0.0
    return lm.decode(toks)
"""


def small_gru():
    from ppl.stdlib.lm.small import SmallLM
    return SmallLM(list("abc"), embed=8, hidden=16, seed=3)


#: a memoised function whose table's keys differ between ranks (a key per particle's draw):
#: refused
MEMO = """
def main():
    x ~ normal(0.0, 1.0)
    f = mem(lambda i: i * 2.0)
    a = f(x)
    observe 1.0 ~ normal(x, 1.0)
    observe 0.5 ~ normal(a, 1.0)
    return f(x)
"""


def pyvalues_job(group: D.Group) -> dict:
    """Per-particle Python values moved between ranks: the string SSM against its numeric
    twin, seeded alike (rank 0 compares every particle: letters vs bits, z, log weights);
    the toy LM steered token by token (a model given as data and toy_lm() in the program),
    4 seeds each: the law of the completions and the evidence; a memo table with entries,
    still refused, on every rank."""
    from ppl.inference import distributed as ID
    from ppl.inference.methods import _program
    from ppl.stdlib.lm.toy import ToyLM
    out: dict = {}
    pops = []
    for source in (STRING_SSM, STRING_TWIN):
        shared = torch.Generator().manual_seed(D.derive_seed(23, -1))
        with rng.run(D.derive_seed(23, group.rank)):
            pops.append(ID.distributed_smc(*_program(ppl.model(source), {"ys": STRING_YS}, "cpu"), 401, "cpu",
                                           group, shared))
    if group.is_root:
        text, twin = pops
        letters = [sum((1 if c == "a" else 0) << (len(s) - 1 - i) for i, c in enumerate(s))
                   for s in text.sites["return"][0]]
        out["string"] = {"same_return": letters == [int(k) for k in twin.sites["return"][0]],
                         "lengths": sorted({len(s) for s in text.sites["return"][0]}),
                         "same_z": all(_same(text.sites[a][0], twin.sites[a][0]) for a in text.sites if a != "return"),
                         "sites": sorted(text.sites), "same_weights": torch.equal(text.log_weights, twin.log_weights),
                         "state_moves": text.extra["state_moves"], "log_evidence": text.log_evidence}
    lm = ToyLM()
    for key, source, data in (("lm_data", LM_STEER, {"lm": lm}), ("lm_toy", LM_STEER_TOY, {}),
                              ("lm_gru", LM_STEER_GRU, {"lm": small_gru()})):
        reps = []
        for rep in range(4):
            res = ppl.model(source).run("smc", data, particles=600, seed=40 + rep, distributed=True)
            if group.is_root:
                reps.append({"law": {str(k): float(v) for k, v in res.marginal().items()},
                             "log_evidence": res.log_evidence, "state_moves": res.extra["state_moves"]})
        out[key] = reps
    try:
        ppl.model(MEMO).run("smc", {}, particles=400, seed=2, distributed=True)
        error = None
    except ppl.PPLError as err:
        error = str(err)
    out["memo"] = group.all_gather_object(error)
    return out


JOBS = {"pyvalues": pyvalues_job, "law": law_job, "runs": runs_job, "live": live_job, "oracle": oracle_job, "pool": pool_job, "chains": chains_job, "raise": raise_job, "diverge": diverge_job, "kill": kill_job, "hang": hang_job}


def main() -> None:
    run_jobs(sys.argv[1].split(","), sys.argv[2])


def run_jobs(jobs: list[str], out_dir: str) -> None:
    with D.process_group() as group:
        for job in jobs:
            started = time.perf_counter()
            result = JOBS[job](group)
            result["seconds"] = time.perf_counter() - started
            if group.is_root:
                with open(os.path.join(out_dir, f"{job}.json"), "w") as f:
                    json.dump(result, f)


if __name__ == "__main__":
    main()
