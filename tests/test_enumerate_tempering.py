"""Tempering and resample-move with discrete choices summed out (issue 12, item 3).

``enumerate=[...]`` / ``"auto"`` / ``@enumerate`` for ``tempering`` (fixed and adaptive
moves) and ``resample_move``: every target is the program with those choices summed out
(tempering: prior * marginal likelihood^beta; resample-move: the truncated program), the
MH re-executions run through the same ``Enumerating`` middleware (so they compare the
marginal densities), and the summed-out choices are drawn back at the end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import ppl
from ppl.inference.tempering import tempered_smc
from ppl.semantics.enumerate_sites import Enumerating, EnumRun, site_selector
from ppl.testing.validity import check_proper, checkable

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

FINITE = """
def model():
    z ~ flip(0.3) @enumerate
    x ~ flip(0.4)
    observe 1 ~ bernoulli(0.9 if z else (0.2 if x else 0.6))
    return (z, x)
"""

def _load(name):
    return ppl.model((EXAMPLES / f"{name}.ppl").read_text()), json.loads((EXAMPLES / f"{name}.json").read_text())


def _enumerated_tempering(particles, schedule, moves=1, run_cls=None):
    def run(interp, entry, data, rnd):
        return tempered_smc(Enumerating(interp, site_selector(None), run_cls=run_cls), entry, data, particles, "cpu",
                            moves=moves, kernel="prior", schedule=schedule, randomness=rnd)
    return checkable(run, particles)


class _NoPrior(EnumRun):
    """Broken: the summed-out choice's prior is never a factor (z summed uniformly), in the
    tempered targets and in the moves' densities alike."""

    def add_prior(self, v, dims, logp, ctx):
        super().add_prior(v, dims, torch.zeros_like(logp) - math.log(v.K), ctx)


# ---------------------------------------------------------------- exact checks
def test_enumerated_tempering_is_proper_exactly():
    """Fixed schedule, two particles, z summed out (moves on x only), drawn back at the
    end: E[Z_hat sum w f] equals the exact measure of the program."""
    check = check_proper(ppl.model(FINITE), _enumerated_tempering(2, [0.5, 1.0]))
    assert check.ok(), check


def test_a_broken_enumeration_inside_tempering_is_caught():
    check = check_proper(ppl.model(FINITE), _enumerated_tempering(2, [0.5, 1.0], run_cls=_NoPrior))
    assert not check.ok(), check


def _replicates(model, data, method, seeds, **options):
    """One run per seed: the replicate estimates whose spread gives the Monte Carlo standard
    error (moves and resampling correlate particles, so a run's own ESS would not)."""
    return [model.run(method, data, seed=s, **options) for s in seeds]


def _assert_within_mcse(estimates, truth, z=4.5):
    """The mean of independent replicate estimates lies within z standard errors
    (sd across replicates / sqrt(R)) of the exact value."""
    xs = torch.tensor(estimates, dtype=torch.float64)
    se = xs.std() / len(xs) ** 0.5
    assert abs(xs.mean().item() - truth) < z * se.item(), (xs.tolist(), truth, se.item())


@pytest.mark.parametrize("method,options", [("tempering", {"particles": 500}),
                                            ("tempering", {"particles": 250, "adapt": True}),
                                            ("resample_move", {"particles": 1000, "kernel": "rw"})])
def test_mixture_with_z_summed_out_matches_the_reference(method, options):
    """mixture_enumerated.ppl: E[mu1] = -2.6004, E[mu2] = 1.3281, P(z[4]) = 0.9397 (grid
    integration, the example's header). Tolerance: 4.5 Monte Carlo standard errors from
    8 independent replicates."""
    model, data = _load("mixture_enumerated")
    runs = _replicates(model, data, method, range(8), **options)
    _assert_within_mcse([r.mean("mu1") for r in runs], -2.6004)
    _assert_within_mcse([r.mean("mu2") for r in runs], 1.3281)
    _assert_within_mcse([r.mean("z[4]") for r in runs], 0.9397)


@pytest.mark.parametrize("method,options", [("tempering", {"particles": 500}),
                                            ("resample_move", {"particles": 500, "kernel": "rw"})])
def test_changepoint_with_tau_summed_out_matches_the_exact_answer(method, options):
    """changepoint_enumerated.ppl: log Z = -51.175 and P(tau = 11) = 0.765 (exact, the
    references of tests/test_enumerate_sites.py). The evidence estimate is unbiased on the
    natural scale, so Z_hat / Z averages to 1 over replicates; both within 4.5 Monte Carlo
    standard errors from 8 independent replicates."""
    model = ppl.model((EXAMPLES / "changepoint_enumerated.ppl").read_text())
    data = json.loads((EXAMPLES / "changepoint.json").read_text())
    runs = _replicates(model, data, method, range(8), **options)
    _assert_within_mcse([math.exp(r.log_evidence - -51.175) for r in runs], 1.0)
    _assert_within_mcse([r.marginal("return").get(11, 0.0) for r in runs], 0.765)


@pytest.mark.parametrize("method", ["tempering", "resample_move"])
def test_auto_sums_out_the_assignments_of_the_unmarked_mixture(method):
    model, data = _load("mixture")
    r = model.run(method, data, particles=2000, seed=1, enumerate="auto")
    assert r.extra["enumerated"] == [f"z[{i}]" for i in range(6)]
    assert abs(r.mean("mu1") + 2.6004) < 5 * 0.597 / 500 ** 0.5


# ------------------------------------------------------- resample-move: exact checks
def _enumerated_resample_move(particles, moves=1, run_cls=None):
    from ppl.inference.resample_move import resample_move

    def run(interp, entry, data, rnd):
        return resample_move(Enumerating(interp, site_selector(None), run_cls=run_cls), entry, data, particles,
                             "cpu", moves=moves, randomness=rnd)
    return checkable(run, particles)


def test_enumerated_resample_move_is_proper_exactly():
    """Two particles, resampled at the observation and moved (one single-site MH step on x,
    whose target is the program with z summed out), z drawn back at the end:
    E[Z_hat sum w f] equals the exact measure of the program, to 1e-12."""
    check = check_proper(ppl.model(FINITE), _enumerated_resample_move(2))
    assert check.ok(), check


def test_a_broken_enumeration_inside_resample_move_is_caught():
    check = check_proper(ppl.model(FINITE), _enumerated_resample_move(2, run_cls=_NoPrior))
    assert not check.ok(), check
