"""Random continuous conjugate models (``ppl.testing.strategies.conjugate_programs``):
importance sampling against the closed-form posterior mean and evidence, within 4.5
Monte Carlo standard errors (mean: sd / sqrt(ESS); evidence: the delta-method SE from the
weights). (Plain SMC is not checked here: on these static-parameter models with data in
the prior's tail it degenerates, as bootstrap SMC does; that is resample-move's job.)"""
import math

import torch
from hypothesis import given, settings

import ppl
from ppl.testing.strategies import conjugate_programs

torch.set_num_threads(1)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(conjugate_programs())
def test_importance_matches_closed_form(case):
    src, data, answer = case
    r = ppl.model(src).run("importance", data, particles=40_000, seed=0)
    assert abs(r.mean() - answer["mean"]) < 4.5 * answer["sd"] / math.sqrt(r.ess)
    w = torch.exp(r.log_weights.double() - r.log_weights.double().max())
    se = float(w.std() / w.mean()) / math.sqrt(len(w))
    assert abs(r.log_evidence - answer["log_evidence"]) < 4.5 * se + 1e-6
