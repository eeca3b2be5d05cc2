"""MCMC chains and SBC simulations shared by the ranks of a job (issue 15, items 2 and 3).

The jobs are ``tests/distributed_chains_worker.py``'s, run by 2 and 3 gloo ranks on
127.0.0.1 forked with the launcher of ``tests/test_distributed.py`` (the environment
torchrun sets), all started at once by one module fixture.

What is equal to a single-process run, and how it is checked:
* chains (``mh``, ``nuts``): each rank runs its share of the C chains as one batch from its
  own stream (``derive_seed(seed, rank)``); a single process runs all C as one batch from
  one stream, so the draws are not the same numbers (a chain's random numbers are a row of
  a [C, ...] batch: they depend on C). Equal in law: C independent chains of the same
  kernel, with the same warm-up: NUTS adapts per chain; ``mh``'s scales are per chain
  during burn-in and frozen to the median over *all* chains (pooled with a collective,
  checked exactly here). Posterior moments are compared within the Monte Carlo error;
  R-hat and ESS are recomputed from the gathered draws of all chains.
* SBC: each simulation is seeded from its index alone, so the ranks, truths and ESS are
  exactly the single-process ones with the same seed (asserted equal).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl.semantics import distributed as D

pytestmark = pytest.mark.skipif(not D.available(), reason="torch.distributed with gloo is not available")

HERE = Path(__file__).parent
TIMEOUT = 6  # seconds: PPL_DISTRIBUTED_TIMEOUT of the failure jobs


def _modules():
    """(test_distributed: the launcher, distributed_chains_worker: the jobs)."""
    sys.path.insert(0, str(HERE))
    try:
        import distributed_chains_worker
        import test_distributed
    finally:
        sys.path.remove(str(HERE))
    return test_distributed, distributed_chains_worker


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Every job, started together; per job: (return codes, rank 0's log, seconds until
    every rank exited, out dir)."""
    launcher, worker = _modules()
    launcher._worker().JOBS.update(worker.JOBS)  # (the forked ranks run the launcher's worker module)
    base = tmp_path_factory.mktemp("dist_chains")
    specs = {"k2": (2, "chains15b,sbc15b,replicates15b,amortized15b,block15b", 60),
             "k3": (3, "chains15b,sbc15b,replicates15b,amortized15b", 60),
             "raise_mh": (2, "raise_mh15b", TIMEOUT), "raise_sbc": (2, "raise_sbc15b", TIMEOUT)}
    started = time.monotonic()
    procs = {name: launcher._start(K, job, base / name, t) for name, (K, job, t) in specs.items()}
    out = {}
    for name, ps in procs.items():
        for p in ps:
            p.join(timeout=max(0.1, started + 150 - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join()
        out[name] = ([p.exitcode for p in ps], (base / name / "rank0.log").read_text(),
                     time.monotonic() - started, base / name)
    return out


def _result(jobs, name: str, job: str) -> dict:
    rcs, log, _, where = jobs[name]
    assert rcs == [0] * len(rcs), log[-3000:]
    return json.loads((where / f"{job}.json").read_text())


@pytest.fixture(scope="module")
def single():
    """The single-process runs the distributed ones are compared with (same seed)."""
    import ppl
    from ppl.testing.sbc import sbc
    _, W = _modules()
    model = ppl.model(W.CONJUGATE)
    runs = {m: model.run(m, {"ys": W.CONJ_YS}, chains=W.CHAINS, seed=W.SEED, **o) for m, o in W.CHAIN_RUNS.items()}
    return runs, sbc(model, "importance", {"ys": W.CONJ_YS}, **W.SBC_ARGS)


def _mcse(draws: list[float], ess: float) -> float:
    return float(np.std(draws)) / math.sqrt(ess)


@pytest.mark.parametrize("method", ["mh", "nuts"])
@pytest.mark.parametrize("name,per_rank", [("k2", [3, 2]), ("k3", [2, 2, 1])])
def test_chains_across_ranks_have_the_single_process_posterior_and_diagnostics_over_all_chains(
        jobs, single, method, name, per_rank):
    """5 chains over 2 and 3 ranks (uneven shares): rank 0's MCMCResult holds all 5, laid
    out chain-major in rank order; its split R-hat and ESS are those of all 5 chains'
    draws (recomputed here); its JSON has the single-process fields; its posterior mean is
    within 4.5 combined MCSE of the single-process run's and of the closed form."""
    from ppl.inference.diagnostics import mcmc_ess, split_r_hat
    _, W = _modules()
    got = _result(jobs, name, "chains15b")[method]
    one = single[0][method]
    j = got["json"]
    assert got["type"] == type(one).__name__ and sorted(j) == sorted(one.to_json())
    assert got["per_rank"] == per_rank and j["chains"] == W.CHAINS and j["draws"] == W.CHAIN_RUNS[method]["samples"]
    x = torch.tensor(got["mu"], dtype=torch.float64).reshape(W.CHAINS, -1)
    assert j["r_hat"]["mu"] == pytest.approx(float(split_r_hat(x)), rel=1e-12)
    assert j["ess_per_site"]["mu"] == pytest.approx(float(mcmc_ess(x)), rel=1e-12)
    assert j["r_hat"]["mu"] < 1.05
    mean, var = W.mean_closed_form()
    mine = _mcse(got["mu"], j["ess_per_site"]["mu"])
    theirs = _mcse(one.sites["mu"].value.tolist(), one.ess_per_site["mu"])
    assert abs(got["mean"] - mean) <= 4.5 * mine
    assert abs(got["mean"] - one.mean()) <= 4.5 * math.hypot(mine, theirs)
    # the variance: its MCSE from the draws' fourth moment (var(x^2) / ESS), a loose proxy
    xs = np.asarray(got["mu"])
    assert abs(got["var"] - var) <= 4.5 * float(np.std((xs - xs.mean()) ** 2)) / math.sqrt(j["ess_per_site"]["mu"])


@pytest.mark.parametrize("name", ["k2", "k3"])
def test_mh_scales_are_frozen_to_the_median_over_every_ranks_chains(jobs, name):
    """Each rank adapts its own chains' scales during burn-in; at the freeze every rank
    gets the same scale: exp(median of all 5 chains' log scales, in rank order), as one
    process freezes its batch of 5 (torch.median of the [5] tensor)."""
    got = _result(jobs, name, "chains15b")["mh"]
    freezes = [f for per_rank in got["freezes"] for f in per_rank]
    assert len(freezes) == len(got["per_rank"])
    assert all(len(f["local"]["mu"]) == n for f, n in zip(freezes, got["per_rank"]))
    pooled = torch.tensor([s for f in freezes for s in f["local"]["mu"]], dtype=torch.float64)
    want = math.exp(float(torch.median(pooled)))
    assert all(f["frozen"]["mu"] == want for f in freezes)
    assert got["scales"]["mu"] == want


@pytest.mark.parametrize("name", ["k2", "k3"])
def test_sbc_over_ranks_is_exactly_the_single_process_sbc(jobs, single, name):
    """7 simulations over 2 (4 + 3) and 3 (3 + 2 + 2) ranks: the same ranks, truths and
    ESS as one process with the same seed, number for number."""
    got = _result(jobs, name, "sbc15b")
    one = single[1]
    assert got["parameters"] == one.parameters == ["mu"] and got["seed"] == one.seed
    assert got["ranks"] == one.ranks["mu"].tolist()
    assert got["truths"] == one.truths["mu"].tolist()
    assert got["ess"] == list(one.ess) and got["p"] == one.p_values["mu"]


def test_sbc_simulations_are_seeded_by_index_so_order_and_subsets_do_not_matter():
    """In one process: ranking the simulations in any order (what ranks do with their
    shares) gives every simulation the same rank as the sequential loop."""
    import importlib

    import ppl
    S = importlib.import_module("ppl.testing.sbc")
    _, W = _modules()
    model = ppl.model(W.CONJUGATE)
    base = S.sbc(model, "importance", {"ys": W.CONJ_YS}, **W.SBC_ARGS)
    order = [6, 2, 0, 5, 1, 4, 3]
    rows = S._sbc(model, None, "importance", {"ys": W.CONJ_YS}, 7, 9, None, 200, None, 5, "cpu", False,
                  {}, lambda one: [r for _, r in sorted((s, one(s)) for s in order)])
    assert rows.ranks["mu"].tolist() == base.ranks["mu"].tolist()
    assert rows.truths["mu"].tolist() == base.truths["mu"].tolist()


@pytest.mark.parametrize("name", ["k2", "k3"])
def test_replicate_runs_over_ranks_are_exactly_the_single_process_replicates(jobs, name):
    """5 SMC replicates over 2 and 3 ranks: each replicate's evidence, mean and ESS are the
    single-process replicate's (each seeded from its index), and they differ from one
    another (independent seeds)."""
    from ppl.testing.replicates import replicate_runs
    import ppl
    _, W = _modules()
    got = _result(jobs, name, "replicates15b")["runs"]
    one = replicate_runs(ppl.model(W.CONJUGATE), "smc", {"ys": W.CONJ_YS}, summary=W.replicate_summary,
                         **W.REPLICATE_ARGS)
    assert got == [list(x) for x in one]
    assert len({x[0] for x in got}) == 5


@pytest.mark.parametrize("name", ["k2", "k3"])
def test_amortized_training_over_ranks_keeps_one_network_and_learns_the_posterior(jobs, name):
    """forward KL on 64 simulations a step shared by 2 and 3 ranks: every rank ends with
    the same network, number for number (the combined gradient is summed in rank order
    on every rank), and the guide's posterior is the closed form's within the accuracy a
    single-process fit of the same size reaches here (its error is 0.02 sd; 0.25 sd and
    +-20% on the sd leave room for another stream of simulations); other objectives are
    refused."""
    _, W = _modules()
    got = _result(jobs, name, "amortized15b")
    mean, var = W.mean_closed_form()
    sd = math.sqrt(var)
    assert got["same"] and got["steps"] == W.FIT_ARGS["steps"]
    assert abs(got["mean"] - mean) <= 0.25 * sd and 0.8 <= got["sd"] / sd <= 1.2
    assert got["refused"] is not None and "objective='forward_kl'" in got["refused"]


def test_mh_block_is_refused_with_distributed_chains(jobs):
    got = _result(jobs, "k2", "block15b")
    assert got["error"] is not None and "block=True cannot run with distributed=True" in got["error"]


@pytest.mark.parametrize("name,message", [("raise_mh", "parameter 'scale' must be positive"),
                                          ("raise_sbc", "simulation failed on purpose")])
def test_a_raising_rank_stops_the_chains_or_the_simulations_with_its_error(jobs, name, message):
    """Rank 1 raises (its chains' model, or its SBC simulations' method): both ranks exit
    with an error, rank 0's naming rank 1's, well within the collectives' timeout."""
    rcs, log, seconds, _ = jobs[name]
    assert rcs == [1, 1], log[-2000:]
    assert "rank 1 of 2 failed" in log and message in log
