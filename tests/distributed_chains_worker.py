"""Jobs of tests/test_distributed_chains.py (issue 15, items 2 and 3), run by the ranks
tests/test_distributed.py's launcher forks (its ``distributed_worker.JOBS`` gets these
added): MCMC chains shared by the ranks, SBC simulations shared by the ranks, and
failures (mh's block=True refused; a rank that raises in a chain or in a simulation)."""
from __future__ import annotations

import ppl
from ppl.semantics import distributed as D
from ppl.testing.sbc import sbc

CONJUGATE = """
def main(ys):
    mu ~ normal(0.0, 2.0)
    for y in ys:
        observe y ~ normal(mu, 1.0)
    return mu
"""
CONJ_YS = [0.3, -0.5, 1.2, 0.8, 0.1]

#: a model whose run fails on the rank given bad=True (a negative scale)
RAISING = """
def main(bad):
    x ~ normal(0.0, 1.0)
    s = -1.0 if bad else 1.0
    observe 0.2 ~ normal(x, s)
    return x
"""

#: method -> options; 5 chains: 3 + 2 over 2 ranks, 2 + 2 + 1 over 3
CHAIN_RUNS = {"mh": {"samples": 400, "burn_in": 200, "kernel": "rw"}, "nuts": {"samples": 150, "burn_in": 150}}
CHAINS, SEED = 5, 11
#: the SBC of the tests: 7 simulations (4 + 3 over 2 ranks, 3 + 2 + 2 over 3)
SBC_ARGS = dict(simulations=7, draws=9, particles=200, seed=5)


def _recording_freeze(log: list):
    """mh_adapt.ScaleAdaptation.freeze, recording this rank's per-chain log scales
    before the pooling and the frozen scales after it."""
    from ppl.inference.mh_adapt import ScaleAdaptation
    original = ScaleAdaptation.freeze

    def freeze(self):
        local = {a: v.tolist() for a, v in self.log_scales.items()}
        frozen = original(self)
        log.append({"local": local, "frozen": dict(frozen)})
        return frozen
    ScaleAdaptation.freeze = freeze
    return original


def chains_job(group: D.Group) -> dict:
    """MH (adapted random walk) and NUTS, 5 chains shared by the ranks, on the conjugate
    model: rank 0's result, its chains' draws of mu, and every rank's freeze record."""
    from ppl.inference.mh_adapt import ScaleAdaptation
    out = {}
    model = ppl.model(CONJUGATE)
    for method, opts in CHAIN_RUNS.items():
        log: list = []
        original = _recording_freeze(log)
        try:
            res = model.run(method, {"ys": CONJ_YS}, chains=CHAINS, seed=SEED, distributed=True, **opts)
        finally:
            ScaleAdaptation.freeze = original
        freezes = group.gather_object(log)
        if group.is_root:
            j = res.to_json()
            out[method] = {"mean": res.mean(), "var": res.var(), "json": j, "mu": res.sites["mu"].value.tolist(),
                           "per_rank": res.extra["chains_per_rank"], "scales": res.extra.get("scales"),
                           "freezes": freezes, "type": type(res).__name__}
        else:
            assert res is None
    return out


def sbc_job(group: D.Group) -> dict:
    res = sbc(ppl.model(CONJUGATE), "importance", {"ys": CONJ_YS}, distributed=True, **SBC_ARGS)
    if not group.is_root:
        assert res is None
        return {}
    return {"ranks": res.ranks["mu"].tolist(), "truths": res.truths["mu"].tolist(), "ess": list(res.ess),
            "parameters": res.parameters, "p": res.p_values["mu"], "seed": res.seed}


#: the replicate runs of the tests: 5 (3 + 2 over 2 ranks, 2 + 2 + 1 over 3)
REPLICATE_ARGS = dict(replicates=5, particles=300, seed=3)


def replicate_summary(result) -> list:
    return [result.log_evidence, result.mean(), result.ess]


def replicates_job(group: D.Group) -> dict:
    from ppl.testing.replicates import replicate_runs
    got = replicate_runs(ppl.model(CONJUGATE), "smc", {"ys": CONJ_YS}, summary=replicate_summary, distributed=True,
                         **REPLICATE_ARGS)
    if not group.is_root:
        assert got is None
        return {}
    return {"runs": got}


#: amortized training of the tests: forward KL, 400 steps of 64 simulations (32 + 32 over
#: 2 ranks, 22 + 21 + 21 over 3)
FIT_ARGS = dict(objective="forward_kl", steps=400, batch_size=64, seed=0, progress=False)


def amortized_job(group: D.Group) -> dict:
    """A Normal amortized guide trained on simulations shared by the ranks: every rank's
    network (number for number), and rank 0's guide posterior for CONJ_YS."""
    model = ppl.model(CONJUGATE)
    g = ppl.guide(model, {"ys": CONJ_YS}, family="normal", encoder="auto").fit(distributed=True, **FIT_ARGS)
    params = [p.detach().reshape(-1).tolist() for p in g.net.parameters()]
    every = group.gather_object(params)
    try:
        g2 = ppl.guide(model, {"ys": CONJ_YS}, family="normal", encoder="auto")
        g2.fit(distributed=True, **{**FIT_ARGS, "objective": "elbo", "steps": 2})
        refused = None
    except ppl.PPLError as err:
        refused = str(err)
    if not group.is_root:
        return {}
    q = g.posterior({"ys": CONJ_YS}, particles=4000, seed=1)
    return {"same": all(p == every[0] for p in every), "mean": q.mean("mu"), "sd": q.sd("mu"),
            "steps": len(g.history), "refused": refused}


def block_job(group: D.Group) -> dict:
    """mh block=True pools the chains at every burn-in step: refused on every rank."""
    try:
        ppl.model(CONJUGATE).run("mh", {"ys": CONJ_YS}, chains=4, seed=1, distributed=True, samples=30,
                                 burn_in=40, kernel="rw", block=True)
    except ppl.PPLError as err:
        return {"error": str(err)}
    return {"error": None}


def raise_mh_job(group: D.Group) -> dict:
    """Rank 1's chains fail at once (a negative scale); rank 0 learns it at the pooling of
    the scales (the end of burn-in), long before the end of its 2000 draws."""
    ppl.model(RAISING).run("mh", {"bad": group.rank == 1}, chains=4, seed=1, distributed=True, samples=2000,
                           burn_in=100, kernel="rw")
    return {}


def raise_sbc_job(group: D.Group) -> dict:
    """An inference method that fails on rank 1's simulations only."""
    def method(model, data, *, particles, device, **options):
        if group.rank == 1:
            raise ppl.PPLError("simulation failed on purpose")
        return model.run("importance", data, particles=particles, device=device)
    sbc(ppl.model(CONJUGATE), method, {"ys": CONJ_YS}, distributed=True, **SBC_ARGS)
    return {}


JOBS = {"chains15b": chains_job, "sbc15b": sbc_job, "replicates15b": replicates_job,
        "amortized15b": amortized_job, "block15b": block_job, "raise_mh15b": raise_mh_job,
        "raise_sbc15b": raise_sbc_job}


def mean_closed_form() -> tuple[float, float]:
    """The conjugate posterior of mu: (mean, variance)."""
    precision = 1 / 4.0 + len(CONJ_YS)
    return sum(CONJ_YS) / precision, 1 / precision

