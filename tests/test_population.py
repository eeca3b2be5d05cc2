"""Every algorithm function of ``ppl.inference`` returns the one result type itself
(issue 10, item 3): a ``Population`` (likelihood weighting, SMC, resample-move, SMC
steering, tempering), ``Chains`` (MH, PMMH) or an ``Optimum`` (best-of-N).

* ``METHODS[name]`` adds no adapter: under the same seed it returns what the algorithm
  function returns (same type, method, log weights, sites and extras).
* The extras each method's results carried before are all there, under the same keys in
  the same order.
* Code written against the old tuples keeps working: a result unpacks (and indexes) to
  the tuple the function returned before, made of the very objects in its fields.
"""
import math

import pytest
import torch

import ppl
from ppl.inference.importance import likelihood_weighting
from ppl.inference.methods import METHODS
from ppl.inference.mh import mh
from ppl.inference.pmmh import pmmh
from ppl.inference.population import Chains, Optimum, Population
from ppl.inference.resample_move import resample_move
from ppl.inference.smc import smc
from ppl.inference.steer import best_of_n, smc_steer
from ppl.inference.tempering import tempered_smc
from ppl.stdlib import rng

SRC = """
def m(ys):
    mu ~ normal(0, 1)
    for y in ys:
        observe y ~ normal(mu, 1)
    return mu
"""
MODEL = ppl.model(SRC)
DATA = {"ys": [0.5, 1.0, 0.2]}
N = 40

#: method -> (options for METHODS and the function, the function on (interp, entry, data), extra keys)
CASES = {
    "importance": ({}, lambda i, e, d: likelihood_weighting(i, e, d, N), []),
    "smc": ({"keep": "all"}, lambda i, e, d: smc(i, e, d, N, keep="all"), ["history", "resampling", "ess_threshold"]),
    "resample_move": ({"moves": 2}, lambda i, e, d: resample_move(i, e, d, N, moves=2),
                      ["history", "acceptance", "moves"]),
    "smc_steer": ({"particles": N // 4, "expansion": 4}, lambda i, e, d: smc_steer(i, e, d, N // 4, 4),
                  ["history", "parents", "expansion", "ess_threshold"]),
    "tempering": ({"schedule": [0.5, 1.0], "moves": 2},
                  lambda i, e, d: tempered_smc(i, e, d, N, schedule=[0.5, 1.0], moves=2),
                  ["schedule", "moves", "ess_history"]),
    "mh": ({"chains": 3, "samples": 20, "burn_in": 5},
           lambda i, e, d: mh(i, e, d, chains=3, samples=20, burn_in=5), ["kernel", "burn_in", "thin", "traced"]),
    "pmmh": ({"params": ["mu"], "particles": 8, "samples": 10, "burn_in": 2, "chains": 2},
             lambda i, e, d: pmmh(i, e, d, ["mu"], particles=8, samples=10, burn_in=2, chains=2),
             ["params", "particles"]),
    "best_of_n": ({}, lambda i, e, d: best_of_n(i, e, d, N), []),
}


def _direct(name):
    opts, run, _ = CASES[name]
    with rng.run(0):
        return run(MODEL.interpreter(), MODEL.entry, MODEL.prepare_data(MODEL.bind((), DATA), "cpu"))


def _via_methods(name):
    opts = {"particles": N, **CASES[name][0]}
    with rng.run(0):
        return METHODS[name](MODEL, MODEL.bind((), DATA), device="cpu", progress=False, **opts)


def _same_sites(a: dict, b: dict):
    assert list(a) == list(b)
    for name in a:
        (va, pa), (vb, pb) = a[name], b[name]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, name
        assert (pa is None and pb is None) or torch.equal(pa, pb), name


@pytest.mark.parametrize("name", list(CASES))
def test_the_method_is_the_algorithm_function_with_its_options(name):
    direct, via = _direct(name), _via_methods(name)
    kind = {"mh": Chains, "pmmh": Chains, "best_of_n": Optimum}.get(name, Population)
    assert type(direct) is kind and type(via) is kind
    assert direct.method == via.method == name
    _same_sites(direct.sites, via.sites)
    if kind is Population:
        assert direct.log_weights.dtype == torch.float64
        assert torch.equal(direct.log_weights, via.log_weights)
    elif kind is Chains:
        assert (direct.chains, direct.draws, direct.acceptance_rate) == (via.chains, via.draws, via.acceptance_rate)
        assert direct.draws * direct.chains == len(direct.sites["return"][0])
    else:
        assert (direct.score, direct.candidates) == (via.score, via.candidates)
    assert list(direct.extra) == list(via.extra) == CASES[name][2]


def test_smc_and_steer_unpack_to_sites_log_weights_and_handler():
    for pop in (_direct("smc"), _direct("smc_steer")):
        sites, lw, h = pop
        assert sites is pop.sites and lw is pop.log_weights and h.history is pop.extra["history"]
        assert pop[1] is pop.log_weights
    assert _direct("smc_steer").extra["parents"] == N // 4


def test_importance_and_resample_move_unpack_to_their_old_tuples():
    pop = _direct("importance")
    sites, lw = pop
    assert sites is pop.sites and lw is pop.log_weights
    pop = _direct("resample_move")
    sites, lw, h, acceptance = pop
    assert sites is pop.sites and lw is pop.log_weights and acceptance is pop.extra["acceptance"]
    assert len(acceptance) == len(h.history) == len(DATA["ys"])  # resampled (and moved) at each observe


def test_tempering_unpacks_to_state_evidence_and_schedule():
    pop = _direct("tempering")
    state, log_z, schedule = pop
    assert schedule is pop.extra["schedule"] and schedule == [0.0, 0.5, 1.0]
    assert torch.equal(pop.log_weights, torch.full((N,), log_z, dtype=torch.float64))
    assert math.isclose(pop.log_evidence, log_z, rel_tol=1e-12)
    assert torch.equal(pop.sites["mu"][0], state.values["mu"]) and pop.sites["return"][0] is state.ret


def test_mh_unpacks_to_kept_states_and_rate():
    chains = _direct("mh")
    kept, rate = chains
    assert len(kept) == chains.draws == 20 and rate == chains.acceptance_rate
    assert torch.equal(chains.sites["mu"][0].reshape(3, 20)[:, 7], kept[7].values["mu"])  # chain-major


def test_one_pmmh_chain_unpacks_to_draws_and_rate():
    interp, prepared = MODEL.interpreter(), MODEL.prepare_data(MODEL.bind((), DATA), "cpu")
    with rng.run(0):
        one = pmmh(interp, MODEL.entry, prepared, ["mu"], particles=8, samples=10, burn_in=2)
    draws, rate = one
    assert one.chains == 1 and rate == one.acceptance_rate
    assert [float(d["mu"]) for d in draws] == one.sites["mu"][0].tolist()
    with pytest.raises(TypeError, match="not a tuple"):
        tuple(_direct("pmmh"))  # two chains: no older tuple to give


def test_best_of_n_is_the_best_of_likelihood_weightings_draws():
    best = _direct("best_of_n")
    pop = _direct("importance")  # the same draws (same seed)
    i = int(torch.argmax(pop.log_weights))
    assert best.score == float(pop.log_weights.max()) and best.candidates == N
    assert best.sites["mu"][0].tolist() == [float(pop.sites["mu"][0][i])]
    assert math.isclose(best.importance_log_evidence, pop.log_evidence, rel_tol=1e-12)
