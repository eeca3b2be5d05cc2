"""Populations sharded over processes (issue 15, item 1 and 4): global resampling has
exactly the single-process law, distributed IS/SMC agree with the closed form / Kalman
value and with single-process runs, and a failing, dead or silent rank stops the job.

The multi-process jobs are ``tests/distributed_worker.py``'s, run by forked processes
with the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT),
2 and 3 gloo ranks, all started at once by one module fixture; the command line under
real ``torchrun`` is checked once."""
from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from ppl.semantics import distributed as D
from ppl.semantics import resampling as R
from ppl.stdlib import rng

pytestmark = pytest.mark.skipif(not D.available(), reason="torch.distributed with gloo is not available")

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"
TIMEOUT = 6  # seconds: PPL_DISTRIBUTED_TIMEOUT of the failure jobs


# ------------------------------------------------------------------------ in one process
def _shards(lw: torch.Tensor, K: int) -> list[torch.Tensor]:
    N = lw.shape[0]
    return [lw[s:s + n] for s, n in (D.shard(N, K, r) for r in range(K))]


def _global(lw: torch.Tensor, K: int, scheme: str, seed: int) -> torch.Tensor:
    shards = _shards(lw, K)
    v = D.shared_uniforms(scheme, lw.shape[0], torch.Generator().manual_seed(seed))
    return D.global_ancestors([D.local_summary(s) for s in shards], lambda r: shards[r], v, lw.shape[0])


def test_shards_cover_the_population_in_rank_order():
    for N, K in ((10, 3), (7, 7), (1001, 4), (5, 2)):
        parts = [D.shard(N, K, r) for r in range(K)]
        assert [s for s, _ in parts] == [sum(n for _, n in parts[:r]) for r in range(K)]
        assert sum(n for _, n in parts) == N and max(n for _, n in parts) - min(n for _, n in parts) <= 1


@pytest.mark.parametrize("scheme", D.GLOBAL_SCHEMES)
def test_global_ancestors_equal_the_single_process_scheme_for_the_same_uniforms(scheme):
    """Slot for slot (systematic/stratified; multinomial sorts its draws in one process
    too), over random weights with dead particles and a rank of weight zero."""
    for trial in range(60):
        g = torch.Generator().manual_seed(trial)
        K = int(torch.randint(2, 6, (), generator=g))
        N = int(torch.randint(K, 50, (), generator=g))
        lw = torch.randn(N, generator=g, dtype=torch.float64) * 3
        lw[torch.rand(N, generator=g) < 0.3] = -math.inf
        if trial % 3 == 0:
            s, n = D.shard(N, K, trial % K)
            lw[s:s + n] = -math.inf
        if not bool(torch.isfinite(lw).any()):
            lw[-1] = 1.0
        with rng.run(trial):
            single = R.SCHEMES[scheme](R.normalised(lw), N)
        assert torch.equal(_global(lw, K, scheme, trial), single), (trial, K, N)


def test_global_weights_give_the_single_process_ess_and_evidence():
    g = torch.Generator().manual_seed(3)
    lw = torch.randn(101, generator=g, dtype=torch.float64) * 40 + 1e3  # large and spread: needs the max
    for K in (2, 3, 7):
        s = D.WeightSummary.combine([D.local_summary(x) for x in _shards(lw, K)], 101)
        assert s.ess == pytest.approx(R.ess(lw), rel=1e-12)
        assert s.log_mean == pytest.approx(R.log_mean_exp(lw), rel=1e-14)


@pytest.mark.parametrize("scheme,law", [("multinomial", R.multinomial_law), ("systematic", R.systematic_law),
                                        ("stratified", R.stratified_law)])
def test_offspring_law_of_global_resampling_is_the_exact_single_process_law(scheme, law):
    """N = 3 particles over K = 2 ranks (shards of 2 and 1): the frequencies of the
    ancestor vectors over 2,000 shared-uniform draws against the exact law
    (``resampling.*_law``, an enumeration): no outcome outside it, and a chi-square test."""
    w = [0.5, 0.15, 0.35]
    lw = torch.tensor(w, dtype=torch.float64).log()
    exact = law(w, 3)  # (multinomial: of sorted tuples, as one process sorts its draws and as the ranks give them)
    draws = 2000
    counts = Counter(tuple(_global(lw, 2, scheme, 10_000 + i).tolist()) for i in range(draws))
    assert set(counts) <= set(exact), set(counts) - set(exact)
    from scipy.stats import chisquare
    keys = sorted(exact)
    observed = [counts.get(k, 0) for k in keys]
    expected = [exact[k] * draws for k in keys]
    assert chisquare(observed, expected).pvalue > 1e-3


def test_transfer_plan_moves_only_the_rows_other_ranks_hold():
    # 6 particles over 2 ranks; rank 0 drew slots 0..4, rank 1 slot 5: rank 0 sends slots 3, 4
    plan = D.TransferPlan.make([(0, 5), (5, 6)], 6)
    assert plan.count(0, 1) == 2 and plan.count(1, 0) == 0 and plan.rows(0, 1) == slice(3, 5)
    assert plan.rows_moved() == 2 and plan.self_contained(0) and not plan.self_contained(1)
    assert not D.TransferPlan.make([(0, 3), (3, 6)], 6).moves


def test_distributed_needs_torchrun_and_refuses_what_it_cannot_do_yet():
    import ppl
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    try:
        with pytest.raises(ppl.PPLError, match="torchrun"):
            ppl.model("def main():\n    x ~ normal(0.0, 1.0)\n    return x\n").run("importance", distributed=True)
        with pytest.raises(ppl.PPLError, match="no distributed form"):
            ppl.model("def main():\n    x ~ normal(0.0, 1.0)\n    return x\n").run("smc_steer", distributed=True)
        with pytest.raises(ppl.PPLError, match="option enumerate of 'resample_move' cannot be used with distrib"):
            ppl.model("def main():\n    x ~ normal(0.0, 1.0)\n    return x\n").run("resample_move", distributed=True,
                                                                                   enumerate="auto")
        with pytest.raises(ppl.PPLError, match="option delayed of 'smc' cannot be used with distributed=True"):
            ppl.model("def main():\n    x ~ normal(0.0, 1.0)\n    return x\n").run("smc", distributed=True,
                                                                                   delayed=True)
        with pytest.raises(ppl.PPLError, match="option enumerate of 'tempering' cannot be used with distributed"):
            ppl.model("def main():\n    x ~ normal(0.0, 1.0)\n    return x\n").run("tempering", distributed=True,
                                                                                   enumerate="auto")
        with pytest.raises(ppl.PPLError, match="@enumerate"):
            ppl.model("def main():\n    z ~ flip(0.5) @enumerate\n    observe 1.0 ~ normal(0.0 if z else 1.0, 1.0)\n"
                      "    return z\n").run("smc", distributed=True)
    finally:
        os.environ.update(env)


# ------------------------------------------------------------------------ several processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, K: int, port: int, jobs: str, out: str, timeout: float) -> None:
    """One rank, in a forked child (ppl already imported): the environment torchrun
    would set, output to rank{r}.log, and the exit code of the jobs (never back into
    pytest)."""
    code = 1
    try:
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(K), "LOCAL_RANK": str(rank),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                           "PPL_DISTRIBUTED_TIMEOUT": str(timeout)})
        log = os.open(os.path.join(out, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdout = sys.stderr = os.fdopen(log, "w", buffering=1)  # (not pytest's capture)
        torch.set_num_threads(1)
        _worker().run_jobs(jobs.split(","), out)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


CLI_MODEL = ("def main(ys):\n    mu ~ normal(0.0, 2.0)\n    for y in ys:\n        observe y ~ normal(mu, 1.0)\n"
             "    return mu\n")
CLI_ARGS = ["--method", "smc", "-n", "301", "--seed", "3", "-o", "resampling=stratified", "--json"]


def _start_cli(out: Path):
    """``torchrun --nproc_per_node=2 -m ppl run MODEL --distributed --json`` (the README's
    command line)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "m.ppl").write_text(CLI_MODEL)
    (out / "d.json").write_text(json.dumps({"ys": [0.3, -0.5, 1.2, 0.8, 0.1]}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "ppl", "run", str(out / "m.ppl"), "--data", str(out / "d.json"),
           "--distributed", *CLI_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PPL_DISTRIBUTED_TIMEOUT": "60"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _start(K: int, jobs: str, out: Path, timeout: float = 60) -> list:
    """K ranks of ``jobs`` (forked: no interpreter start-up and import per rank)."""
    import multiprocessing
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_rank, args=(r, K, port, jobs, str(out), timeout)) for r in range(K)]
    for p in procs:
        p.start()
    return procs


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Every multi-process job, started together; per job: (return codes, rank 0's log,
    seconds until rank 0 exited, out dir)."""
    base = tmp_path_factory.mktemp("dist")
    specs = {"k3": (3, "law,runs,live,oracle,pool,pyvalues", 60),
             "k2": (2, "law,runs,chains,live,oracle,pool,pyvalues", 60), "raise": (2, "raise", TIMEOUT),
             "diverge": (2, "diverge", TIMEOUT),
             "kill": (2, "kill", TIMEOUT), "hang": (2, "hang", TIMEOUT)}
    started = time.monotonic()
    cli = _start_cli(base / "cli")  # the slowest to start (two fresh interpreters and torchrun's agent)
    procs = {name: _start(K, job, base / name, t) for name, (K, job, t) in specs.items()}
    done: dict = {}
    deadline = started + 150
    while len(done) < len(procs) and time.monotonic() < deadline:
        for name, ps in procs.items():
            if name not in done and ps[0].exitcode is not None:
                done[name] = time.monotonic() - started
        time.sleep(0.05)
    out = {}
    for name, ps in procs.items():
        for p in ps:  # the other ranks get a few seconds to stop, then are ended (the silent rank)
            p.join(timeout=max(0.1, deadline - time.monotonic()) if name != "hang" else 0.5)
            if p.exitcode is None:
                p.kill()
                p.join()
        out[name] = ([p.exitcode for p in ps], (base / name / "rank0.log").read_text(), done.get(name),
                     base / name)
    try:
        stdout, stderr = cli.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        cli.kill()
        stdout, stderr = cli.communicate()
    out["cli"] = (cli.returncode, stdout, stderr)
    return out


def _result(jobs, name: str, job: str) -> dict:
    rcs, log, _, where = jobs[name]
    assert rcs == [0] * len(rcs), log[-3000:]
    return json.loads((where / f"{job}.json").read_text())


@pytest.mark.parametrize("name", ["k2", "k3"])
def test_global_resampling_through_the_ranks_moves_rows_to_the_single_process_ancestors(jobs, name):
    """Through the real collectives and row moves: each rank's new rows (its particles'
    global ids, and a second float column) are, in rank order, the ancestors of the
    single-process scheme with the same uniforms, slot for slot; each rank ends with its
    shard's size; rows did move (an empty plan would not test the exchange)."""
    cases = _result(jobs, name, "law")["cases"]
    K = 2 if name == "k2" else 3
    assert len(cases) == 75
    for c in cases:
        assert c["ids"] == c["single"], c
        assert c["twice_ok"]
        assert c["sizes"] == D.shard_sizes(c["N"], K)
    assert sum(c["moved"] for c in cases) > 50


def _kalman(ys, a=0.8, q=1.0, r=0.7):
    m, P, ll = 0.0, 0.0, 0.0
    for y in ys:
        m, P = a * m, a * a * P + q
        S = P + r * r
        ll += -0.5 * (math.log(2 * math.pi * S) + (y - m) ** 2 / S)
        K = P / S
        m, P = m + K * (y - m), (1 - K) * P
    return ll, m, P


def _branchy(y: float) -> tuple[float, float, None]:
    """distributed_worker.BRANCHY's log evidence and P(z) (the twist cancels): z = 0 in
    closed form, z = 1 by quadrature over u (a fine grid: error far below the MCSE)."""
    def normal(x, m, s):
        return torch.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    s_v = math.sqrt(1 + 0.25)  # v integrated out: 1.0 ~ normal(x, sqrt(1 + 0.5^2))
    zero = float(normal(torch.tensor(y, dtype=torch.float64), 0.0, 1.0) *
                 normal(torch.tensor(1.0, dtype=torch.float64), 0.0, s_v))
    u = torch.linspace(-12.0, 16.0, 400_001, dtype=torch.float64)
    one = float(torch.trapezoid(normal(u, 2.0, 1.0) * normal(y, u, 1.0) * normal(1.0, u, s_v), u))
    Z = 0.7 * zero + 0.3 * one
    return math.log(Z), 0.3 * one / Z, None


def _conjugate(ys, s0=2.0):
    n = len(ys)
    cov = torch.eye(n, dtype=torch.float64) + s0 * s0 * torch.ones(n, n, dtype=torch.float64)
    ll = float(torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(
        torch.tensor(ys, dtype=torch.float64)))
    prec = 1 / s0 ** 2 + n
    return ll, sum(ys) / prec, 1 / prec


def _worker():
    sys.path.insert(0, str(HERE))
    try:
        import distributed_worker
    finally:
        sys.path.remove(str(HERE))
    return distributed_worker


@functools.lru_cache(maxsize=None)
def _single(key: str) -> list[dict]:
    """The same runs in one process (4 other seeds), for the comparison."""
    import ppl
    source, method, data, n, opts = _worker().RUNS[key]
    m = ppl.model(source)
    out = []
    for rep in range(4):
        res = m.run(method, data, particles=n, seed=500 + rep, **opts)
        out.append({"log_evidence": res.log_evidence, "mean": res.mean(), "var": res.var(),
                    "json_keys": sorted(res.to_json())})
    return out


def _mean_sd(xs):
    mu = sum(xs) / len(xs)
    return mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


@pytest.mark.parametrize("name", ["k2", "k3"])
@pytest.mark.parametrize("key", ["conj_is", "conj_smc", "ssm_smc", "ssm_smc_mult", "branchy_smc", "conj_temper",
                                 "ssm_rm", "conj_temper_adapt", "conj_rm_adapt"])
def test_distributed_is_smc_tempering_match_the_closed_form_and_one_process(jobs, name, key):
    """Evidence and posterior mean of 4 seeded distributed runs (uneven shards: 2001,
    1000, 700, 701, 1001, 601 and 401 particles over 2 or 3 ranks; "branchy" has a choice
    some particles make, a bool choice and a twist; tempering's next beta bisects the
    global ESS; resample-move moves each rank's particles by random-walk MH; adaptive
    tempering's walk takes its covariance, scale and stopping rule from all ranks) within 4.5 Monte Carlo standard errors of the closed form (normal-normal) /
    Kalman filter (linear-Gaussian SSM) / quadrature and of 4 single-process runs; the
    standard error is the pooled spread of the 8 runs (t with 6 degrees of freedom:
    P(|t| > 4.5) = 0.004)."""
    W = _worker()
    dist = _result(jobs, name, "runs")[key]
    assert all(d["n"] == W.RUNS[key][3] for d in dist)
    single = _single(key)
    assert dist[0]["json_keys"] == single[0]["json_keys"]  # the single-process result's JSON fields
    ll, mean, _ = _conjugate(W.CONJ_YS) if key.startswith("conj") else _branchy(1.5) if key.startswith("branchy") \
        else _kalman(W.SSM_YS)
    for field, truth in (("log_evidence", ll), ("mean", mean)):
        d_mu, d_sd = _mean_sd([d[field] for d in dist])
        s_mu, s_sd = _mean_sd([s[field] for s in single])
        sd = math.sqrt((d_sd ** 2 + s_sd ** 2) / 2)
        assert abs(d_mu - truth) <= 4.5 * sd / 2 + 1e-9, (field, d_mu, truth, sd)
        assert abs(d_mu - s_mu) <= 4.5 * sd * math.sqrt(0.5) + 1e-9, (field, d_mu, s_mu, sd)
    if key != "conj_is":
        assert any(d["rows_moved"] for d in dist)  # particles did cross ranks


@pytest.mark.parametrize("name", ["k2", "k3"])
@pytest.mark.parametrize("key", ["list_ssm", "branchy"])
def test_smc_moves_the_live_state_between_ranks_without_replaying(jobs, name, key):
    """Particles that cross ranks take their live state with them (``semantics.live_state``):
    each rank starts the program once per SMC run (no replay of the prefix, which made a
    run O(T^2)), the state moved at most resamplings, and the answers are the model's:
    the list-state SSM (a list that grows, the checkpoint inside a called function)
    against the Kalman filter, BRANCHY (a variable only some particles assign, a bool, a
    twist) against quadrature, within 4.5 standard errors of the 4 seeds' spread."""
    W = _worker()
    reps = _result(jobs, name, "live")[key]
    K = 2 if name == "k2" else 3
    assert all(r["runs_per_rank"] == [1] * K for r in reps), reps
    assert sum(r["state_moves"] for r in reps) >= 4 and all(r["rows_moved"] for r in reps)
    if key == "list_ssm":
        ll, mean, _ = _kalman(W.SSM_YS)
        assert reps[0]["sites"] == ["return"] + [f"step[{t}]/x" for t in range(len(W.SSM_YS))]
    else:
        ll, mean, _ = _branchy(1.5)
        assert reps[0]["sites"] == ["return", "u", "v", "z"]
    for field, truth in (("log_evidence", ll), ("mean", mean)):
        mu, sd = _mean_sd([r[field] for r in reps])
        assert abs(mu - truth) <= 4.5 * sd / 2 + 1e-9, (field, mu, truth, sd)


@pytest.mark.parametrize("name", ["k2", "k3"])
@pytest.mark.parametrize("key", ["ssm", "branchy", "list_ssm", "discrete", "mapped", "ssm_adaptive", "memo"])
def test_moving_the_live_state_gives_the_population_replaying_gave(jobs, name, key):
    """The same seeded distributed SMC run, once moving the live state and once replaying
    the moved traces up to the checkpoint (the mechanism before, whose law is the single-
    process one): the final populations agree exactly, every site (values, presence) and
    every log weight, and the live state did move. Models: the SSM, BRANCHY (a variable only
    some particles assign, a twist), the list-state SSM (a checkpoint inside a called
    function), a state updated on one branch only, a checkpoint inside ``map``'s lambda,
    the SSM resampled when the ESS falls below 0.6 N (the digests then compared by one
    more all_gather at a resampling), a memoised random function (its table's entries
    move, one of them computed by the particles of one branch only)."""
    got = _result(jobs, name, "oracle")[key]
    assert got["same_sites"] and got["same_weights"], got
    assert got["state_moves"] > 0 and "return" in got["sites"]


@pytest.mark.parametrize("name", ["k2", "k3"])
def test_the_adaptive_moves_statistics_over_ranks_are_the_whole_populations(jobs, name):
    """Adaptive tempering over ranks shapes, scales and stops its walk by ``RankPool``:
    the weighted covariance, the largest correlation with the start, the mean acceptance,
    any and the agreed block over the shards equal ``population_moves``' on the whole
    population (up to the summation order: 1e-12)."""
    for case in _result(jobs, name, "pool")["cases"]:
        got, want = case["got"], case["want"]
        assert torch.allclose(torch.tensor(got["cov"]), torch.tensor(want["cov"]), rtol=1e-12, atol=1e-12)
        assert got["corr"] == pytest.approx(want["corr"], rel=1e-12, abs=1e-12)
        assert got["mean"] == pytest.approx(want["mean"], rel=1e-12) and got["any"] == want["any"]
        assert tuple(got["block"]) == tuple(want["block"])


@pytest.mark.parametrize("name", ["k2", "k3"])
def test_a_live_state_that_cannot_move_is_an_error_on_every_rank(jobs, name):
    """A per-particle value that is not data (a function) alive when particles must cross
    ranks: every rank stops with the same error naming the variable (never a silently
    different run). (A per-particle string moves: ``test_per_particle_strings_move_...``.)"""
    errors = _result(jobs, name, "live")["unmovable"]
    assert errors[0] is not None and all(e == errors[0] for e in errors)
    assert "cannot move per-particle Python values" in errors[0] and "the variable 's'" in errors[0]


@pytest.mark.parametrize("name", ["k2", "k3"])
def test_per_particle_strings_move_between_ranks_as_the_numbers_they_encode(jobs, name):
    """A per-particle string state (Python objects, moved as JSON rows) and its numeric
    twin (the int whose bits are the letters; a batched value, whose move is the replay's
    bit for bit), seeded alike: every particle's string is its twin's int, the choices and
    the log weights are identical, and the state did move between ranks."""
    got = _result(jobs, name, "pyvalues")["string"]
    assert got["same_return"] and got["same_z"] and got["same_weights"], got
    assert got["lengths"] == [len(_worker().STRING_YS)] and got["state_moves"] > 0


def _lm_model(key: str):
    import ppl
    from ppl.stdlib.lm.toy import ToyLM
    W = _worker()
    source, data = {"lm_data": (W.LM_STEER, {"lm": ToyLM()}), "lm_toy": (W.LM_STEER_TOY, {}),
                    "lm_gru": (W.LM_STEER_GRU, {"lm": W.small_gru()})}[key]
    return ppl.model(source), data


@functools.lru_cache(maxsize=None)
def _lm_exact(key: str) -> tuple[dict, float]:
    """The exact posterior over completions and the log evidence (enumeration)."""
    model, data = _lm_model(key)
    res = model.run("enumerate", data)
    return {str(k): float(v) for k, v in res.marginal().items()}, float(res.log_evidence)


@functools.lru_cache(maxsize=None)
def _lm_single(key: str) -> list[dict]:
    """The worker's 4 seeded runs in one process."""
    model, data = _lm_model(key)
    out = []
    for rep in range(4):
        res = model.run("smc", data, particles=600, seed=40 + rep)
        out.append({"law": {str(k): float(v) for k, v in res.marginal().items()}, "log_evidence": res.log_evidence})
    return out


def _t_ok(values, truth, floor) -> tuple[bool, float, float]:
    mu, sd = _mean_sd(values)
    se = max(sd / math.sqrt(len(values)), floor)
    return abs(mu - truth) <= 4.5 * se + 1e-12, mu, se


@pytest.mark.parametrize("name", ["k2", "k3"])
@pytest.mark.parametrize("key", ["lm_data", "lm_toy", "lm_gru"])
def test_steering_the_toy_lm_over_ranks_matches_enumeration(jobs, name, key):
    """The toy LM steered token by token (contexts are lists of per-particle tokens that
    move between ranks with their particles; the LM's per-particle memo is dropped and
    recomputed; a model given as data, and toy_lm() in the program with allowed=), and a
    tiny GRU given as data (its prefix cache of hidden states stays on each rank: a moved
    context is computed again where it arrives, the same answer up to float rounding, as
    a cache miss in one process; enumeration with its float probabilities): the
    weighted law of the completions over 4 seeds of 600 particles against the exact
    posterior by enumeration (4.5 SE, the SE floored at the binomial SE of the 2400
    particles), and Z_hat / Z against 1 (Z_hat is unbiased)."""
    reps = _result(jobs, name, "pyvalues")[key]
    post, log_z = _lm_exact(key)
    assert sum(r["state_moves"] for r in reps) >= 4
    n = 600 * len(reps)
    for completion, p in post.items():
        ok, mu, se = _t_ok([r["law"].get(completion, 0.0) for r in reps], p, math.sqrt(p * (1 - p) / n))
        assert ok, (completion, mu, p, se)
    assert all(set(r["law"]) <= set(post) for r in reps)  # no impossible completion
    ok, mu, se = _t_ok([math.exp(r["log_evidence"] - log_z) for r in reps], 1.0, 0.0)
    assert ok, (mu, se)
    single = _lm_single(key)  # and one process: the same law (difference of the means within 4.5 SE)
    for completion, p in post.items():
        d, o = ([r["law"].get(completion, 0.0) for r in rs] for rs in (reps, single))
        floor = math.sqrt(2 * p * (1 - p) / n)
        se = max(math.sqrt(_mean_sd(d)[1] ** 2 / len(d) + _mean_sd(o)[1] ** 2 / len(o)), floor)
        assert abs(_mean_sd(d)[0] - _mean_sd(o)[0]) <= 4.5 * se + 1e-12, (completion, d, o)


@pytest.mark.parametrize("name", ["k2", "k3"])
def test_a_memo_table_whose_keys_differ_between_ranks_is_refused_on_every_rank(jobs, name):
    """A memoised function whose table holds other arguments on each rank (a key per
    particle's continuous draw) alive at a resampling that moves particles: every rank
    stops with the same error naming it."""
    errors = _result(jobs, name, "pyvalues")["memo"]
    assert errors[0] is not None and all(e == errors[0] for e in errors)
    assert "cannot move the memoised function 'f' (its table holds other arguments on each rank)" in errors[0]
    assert "the variable 'f'" in errors[0]


def test_a_raising_rank_stops_every_rank_with_its_error(jobs):
    rcs, log, seconds, _ = jobs["raise"]
    assert rcs == [1, 1]
    assert "rank 1 of 2 failed" in log and "parameter 'scale' must be positive" in log
    assert seconds is not None


def test_a_killed_rank_makes_the_others_fail_not_hang(jobs):
    rcs, log, seconds, _ = jobs["kill"]
    assert rcs[1] == 17 and rcs[0] == 1
    assert "CollectiveError" in log and "another rank failed" in log
    assert seconds is not None


def test_a_silent_rank_makes_the_others_time_out(jobs):
    """Rank 1 stops answering mid-run: rank 0 fails at its next collective after the
    group's timeout (6 s here), not later."""
    rcs, log, seconds, _ = jobs["hang"]
    assert rcs[0] == 1
    assert "Timed out" in log or "timed out" in log
    assert "6000ms" in log and seconds is not None and seconds < 60


def test_cli_under_torchrun_prints_one_json_like_a_single_process_run(jobs, tmp_path, capsys):
    """Rank 0 prints the one JSON object (the single-process run's fields), rank 1 nothing."""
    rc, stdout, stderr = jobs["cli"]
    assert rc == 0, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    got = json.loads(lines[0])
    from ppl.cli import main
    (tmp_path / "m.ppl").write_text(CLI_MODEL)
    (tmp_path / "d.json").write_text(json.dumps({"ys": [0.3, -0.5, 1.2, 0.8, 0.1]}))
    assert main(["run", str(tmp_path / "m.ppl"), "--data", str(tmp_path / "d.json"), *CLI_ARGS]) == 0
    single = json.loads(capsys.readouterr().out)
    assert sorted(got) == sorted(single) and got["particles"] == 301 and got["method"] == "smc"
    assert sorted(got["posterior"]) == sorted(single["posterior"]) == ["mu", "return"]
    # the posterior mean within 5 standard errors (sd / sqrt(301) each, after resampling) of the closed form
    _, mean, var = _conjugate([0.3, -0.5, 1.2, 0.8, 0.1])
    assert abs(got["posterior"]["mu"]["mean"] - mean) <= 5 * math.sqrt(var / 301 * 2)


def test_rows_of_mixed_dtypes_pack_and_unpack_unchanged():
    """A float column after a bool one starts at an unaligned byte offset (the bug this
    catches: viewing it in place raised)."""
    specs = [D.ColumnSpec("b", torch.bool, ()), D.ColumnSpec("f", torch.float32, (2,)),
             D.ColumnSpec("k", torch.int64, ())]
    cols = [torch.tensor([True, False, True]), torch.arange(6, dtype=torch.float32).reshape(3, 2),
            torch.tensor([5, -1, 7])]
    for got, want in zip(D._unpack(D._pack(cols), specs, 3), cols):
        assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["mh", "nuts"])
def test_chains_across_ranks_are_gathered_with_diagnostics_over_all_chains(jobs, method):
    """5 chains over 2 ranks (3 + 2): rank 0's result has all 5 chains, R-hat over them,
    the single-process JSON fields, and a posterior mean within 5 standard errors
    (sd / sqrt(ESS)) of the closed form."""
    import ppl
    got = _result(jobs, "k2", "chains")[method]
    W = _worker()
    assert got["chains"] == 5 and got["per_rank"] == [3, 2] and got["draws"] == W.CHAINS[method]["samples"]
    assert set(got["r_hat"]) == {"mu", "return"} and all(0.9 < r < 1.1 for r in got["r_hat"].values())
    import warnings
    with warnings.catch_warnings():  # (a short run, for its JSON fields only: its diagnostics warn)
        warnings.simplefilter("ignore", ppl.PPLDiagnosticWarning)
        single = ppl.model(W.CONJUGATE).run(method, {"ys": W.CONJ_YS}, particles=2, seed=1,
                                            **{**W.CHAINS[method], "samples": 20, "burn_in": 20})
    assert got["json_keys"] == sorted(single.to_json())
    _, mean, var = _conjugate(W.CONJ_YS)
    assert abs(got["mean"] - mean) <= 5 * math.sqrt(var / got["ess"])
    assert abs(got["var"] - var) <= 5 * var * math.sqrt(2 / got["ess"])  # (the sd of a normal's sample variance)


def test_ranks_at_different_checkpoints_stop_with_an_error_naming_them(jobs):
    """Both ranks reach their first checkpoint, at different observes (rank 1's data take
    the other branch): resampling them together would mix particles at different points of
    the program, so every rank stops with an error naming both addresses."""
    rcs, log, seconds, where = jobs["diverge"]
    assert rcs == [1, 1]
    other = (where / "rank1.log").read_text()
    for text in (log, other):
        assert "reached different points" in text and "obs@5:9" in text and "obs@7:9" in text, text[-2000:]
