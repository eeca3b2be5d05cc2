"""The trace interface (``semantics.gfi``): its laws, checked exactly on small finite programs.

* ``assess`` of any trace equals the exact semantics' density of that trace, and of a
  simulated trace its log joint; ``generate``'s weight is the log joint minus the drawn part;
* ``regenerate`` with an empty selection and ``update`` with no change are the identity
  with log term 0; ``update`` to another ``beta`` in closed form equals re-execution;
* ``update``'s weight is log p(x')/p(x) - fresh + stale (against ``assess`` by hand);
* single-site MH composed by hand from ``regenerate`` + ``metropolis`` satisfies detailed
  balance for the whole program, for a truncated target (``stop_after``, twist included)
  and for a tempered one (``beta``), by exact enumeration of its draws
  (``ppl.testing.validity.mh_kernel_check``); a ``regenerate`` that drops the fresh/stale
  terms is caught.
"""
from __future__ import annotations

import math

import pytest
import torch

import ppl
from ppl.inference.mh import single_site_selection
from ppl.inference.randomness import TorchRandomness
from ppl.semantics import gfi
from ppl.semantics.errors import PPLRuntimeError
from ppl.testing.validity import mh_kernel_check

EXACT = 1e-12


@pytest.fixture(autouse=True)
def _float64():
    """Densities in float64 (as the exact kernel checks compute them): float32 log
    densities of the distributions would be off by ~1e-8."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

# random control flow: 2 or 3 choices, a likelihood in each branch
BRANCHES = """
def model():
    a ~ flip(0.4)
    if a:
        b ~ categorical([1, 2, 3])
        observe b ~ categorical([3, 2, 1])
    else:
        c ~ binomial(2, 0.3)
        d ~ flip(0.5)
        observe c > 0 ~ bernoulli(0.8)
    return a
"""

# a twist before the first checkpoint, then more choices and likelihoods after it
TWISTED = """
def model():
    a ~ flip(0.3)
    if a:
        b ~ flip(0.4)
        twist(1.5 if b else -0.5)
    observe True ~ bernoulli(0.9 if a else 0.2)
    c ~ flip(0.5)
    observe c ~ bernoulli(0.7 if a else 0.1)
    return a
"""

# TWISTED truncated after its first checkpoint: the twist's potential counts as a factor
TWISTED_FIRST_TARGET = """
def model():
    a ~ flip(0.3)
    if a:
        b ~ flip(0.4)
        factor 1.5 if b else -0.5
    observe True ~ bernoulli(0.9 if a else 0.2)
    return a
"""

TEMPERED = """
def model():
    a ~ flip(0.3)
    b ~ categorical([1, 1, 2])
    observe True ~ bernoulli(0.9 if a else 0.2)
    observe b ~ categorical([1, 3, 1] if a else [2, 1, 1])
    return a
"""

# TEMPERED at beta = 1/2: each likelihood factor to the power 1/2
TEMPERED_HALF = """
def model():
    a ~ flip(0.3)
    b ~ categorical([1, 1, 2])
    factor 0.5 * log(0.9 if a else 0.2)
    factor 0.5 * log([1, 3, 1][b] / 5 if a else [2, 1, 1][b] / 4)
    return a
"""


def _model_run(src: str, **target) -> gfi.ModelRun:
    m = ppl.model(src)
    return gfi.ModelRun(m.interpreter(), m.entry, m.prepare_data(m.bind((), {}), "cpu"), "cpu", **target)


def _exact_paths(src: str):
    """(log density, complete choices of one chain) for every trace of the program."""
    out = []
    for w, vals in ppl.model(src).run("enumerate", {}).paths:
        choices = {a: torch.tensor([v]) for a, v in vals.items() if a != "return"}
        out.append((math.log(float(w)) if w > 0 else -math.inf, gfi.Choices.of(choices)))
    return out


# ------------------------------------------------------------------- assess / generate
@pytest.mark.parametrize("src", [BRANCHES, TWISTED, TEMPERED])
def test_assess_of_every_trace_is_its_exact_density(src):
    model = _model_run(src)
    for log_w, choices in _exact_paths(src):
        assert float(gfi.assess(model, choices)[0]) == pytest.approx(log_w, abs=EXACT)


def test_assess_of_a_simulated_trace_is_its_log_joint():
    model = _model_run(BRANCHES)
    torch.manual_seed(0)
    state = gfi.simulate(model, 64, TorchRandomness())
    assert bool(state.present["b"].any()) and bool(state.present["c"].any())  # both branches
    assert torch.equal(gfi.assess(model, state), state.log_joint)
    again, weight = gfi.generate(model, state)  # all choices given: the weight is the log joint
    assert torch.equal(weight, state.log_joint) and torch.equal(again.ret, state.ret)


def test_generate_draws_the_missing_choices_and_weights_by_the_given_part():
    model = _model_run(BRANCHES)
    torch.manual_seed(1)
    given = gfi.Choices.of({"a": torch.tensor([True, False, True, False])})
    state, weight = gfi.generate(model, given, TorchRandomness())
    assert state.values["a"].tolist() == [True, False, True, False]
    drawn = sum(torch.where(state.present[a], state.site_lp[a], torch.zeros(4, dtype=torch.float64))
                for a in ("b", "c", "d"))
    assert torch.allclose(weight, state.log_joint - drawn, atol=EXACT, rtol=0)
    assert torch.allclose(weight, state.site_lp["a"] + state.log_lik, atol=EXACT, rtol=0)


def test_assess_names_a_missing_choice():
    model = _model_run(BRANCHES)
    with pytest.raises(PPLRuntimeError, match="no value for the choice 'b'") as err:
        gfi.assess(model, gfi.Choices.of({"a": torch.tensor([True])}))
    assert err.value.span is not None and err.value.span.line == 5


# ----------------------------------------------------------------- identities
def test_regenerate_with_an_empty_selection_is_the_identity():
    model = _model_run(BRANCHES)
    torch.manual_seed(2)
    state = gfi.simulate(model, 32, TorchRandomness())
    for selection in ({}, {"a": torch.zeros(32, dtype=torch.bool)}):
        new, log_w = gfi.regenerate(model, state, selection, TorchRandomness())
        assert torch.equal(log_w, torch.zeros(32, dtype=torch.float64))
        assert torch.equal(new.log_joint, state.log_joint)
        for a in state.values:
            assert torch.equal(new.present[a], state.present[a])
            assert torch.equal(new.values[a][state.present[a]], state.values[a][state.present[a]])


def test_update_without_change_is_the_identity_and_a_beta_change_is_a_closed_form_rescore():
    model = _model_run(TEMPERED)
    torch.manual_seed(3)
    state = gfi.simulate(model.at(beta=0.0), 16, TorchRandomness())
    same, w = gfi.update(model.at(beta=0.0), state)
    assert torch.equal(same.log_joint, state.log_joint) and torch.equal(w, torch.zeros(16, dtype=torch.float64))
    closed, w_closed = gfi.update(model.at(beta=0.5), state)
    rerun, w_rerun = gfi.update(model.at(beta=0.5), state, gfi.Choices({}, {}))  # re-executes the program
    assert closed.beta == rerun.beta == 0.5
    assert torch.allclose(closed.log_joint, rerun.log_joint, atol=EXACT, rtol=0)
    assert torch.allclose(w_closed, w_rerun, atol=EXACT, rtol=0)
    assert torch.allclose(w_closed, 0.5 * state.log_lik, atol=EXACT, rtol=0)


def test_update_weight_is_the_density_ratio_with_fresh_and_stale_terms():
    """Flip a in every trace of BRANCHES: the branch changes, so the old branch's choices
    are stale and the new branch's fresh; the weight is log p(x')/p(x) - fresh + stale."""
    model = _model_run(BRANCHES)
    rnd = TorchRandomness()
    torch.manual_seed(4)
    for _, choices in _exact_paths(BRANCHES):
        state, _ = gfi.generate(model, choices)
        flipped = gfi.Choices.of({"a": ~state.values["a"]})
        new, weight = gfi.update(model, state, flipped, rnd)
        fresh = sum(float(new.site_lp[a][0]) for a in new.values if a != "a" and bool(new.present[a][0]))
        stale = sum(float(state.site_lp[a][0]) for a in state.values if a != "a" and bool(state.present[a][0]))
        expected = float(gfi.assess(model, new)[0] - gfi.assess(model, state)[0]) - fresh + stale
        assert float(weight[0]) == pytest.approx(expected, abs=EXACT)


# ------------------------------------------------------------ MH composed from regenerate
def _mh_from_regenerate(target: gfi.ModelRun | None = None, *, drop_fresh_stale: bool = False):
    """A ``step`` for ``mh_kernel_check``: single-site MH written as a composition of the
    interface (on ``target``, else the checked model itself). ``drop_fresh_stale``: the
    broken variant whose acceptance ratio forgets the fresh and stale prior terms."""
    def step(interp, entry, data, state, rnd):
        model = target or gfi.ModelRun(interp, entry, data)
        sizes = state.sizes
        selection = single_site_selection(state, rnd.choose(sizes))
        new, log_w = gfi.regenerate(model, state, selection, rnd)
        if drop_fresh_stale:  # fresh = the new trace's choices the old one lacks: stale_lp(new, old)
            log_w = log_w - gfi.stale_lp(state, new) + gfi.stale_lp(new, state)
        log_alpha = log_w + torch.log(sizes.double()) - torch.log(new.sizes.double())
        return gfi.metropolis(state, new, log_alpha, rnd)[0]
    return step


def _assert_exact(kc):
    assert kc.row_sum_error <= EXACT and kc.invariance_error <= EXACT and kc.balance_error <= EXACT, \
        (kc.row_sum_error, kc.invariance_error, kc.balance_error)


def test_mh_from_regenerate_satisfies_detailed_balance():
    _assert_exact(mh_kernel_check(ppl.model(BRANCHES), step=_mh_from_regenerate()))


def test_mh_from_regenerate_without_fresh_and_stale_terms_is_caught():
    kc = mh_kernel_check(ppl.model(BRANCHES), step=_mh_from_regenerate(drop_fresh_stale=True))
    assert kc.row_sum_error <= EXACT  # still a Markov kernel, with the wrong stationary law
    assert kc.invariance_error > 1e-3 and kc.balance_error > 1e-3


def test_mh_on_a_truncated_target_leaves_it_invariant_twist_included():
    """regenerate on TWISTED at stop_after=1 is detailed-balanced for the program up to
    its first checkpoint, with the twist's potential as a factor (written out as
    TWISTED_FIRST_TARGET, which gives pi and the traces)."""
    step = _mh_from_regenerate(_model_run(TWISTED, stop_after=1))
    _assert_exact(mh_kernel_check(ppl.model(TWISTED_FIRST_TARGET), step=step))
    # ignoring the twist (the whole-program target has none) is a different law: caught
    step = _mh_from_regenerate(_model_run(TWISTED_FIRST_TARGET.replace("factor 1.5 if b else -0.5", "pass")))
    assert mh_kernel_check(ppl.model(TWISTED_FIRST_TARGET), step=step).invariance_error > 1e-3


def test_mh_on_a_tempered_target_leaves_it_invariant():
    """regenerate on TEMPERED at beta = 1/2 is detailed-balanced for prior * L^(1/2)."""
    half = ppl.model(TEMPERED_HALF)
    _assert_exact(mh_kernel_check(half, step=_mh_from_regenerate(_model_run(TEMPERED, beta=0.5))))
    # the moves at beta = 1 instead (tempering's classic bug) do not leave it invariant
    assert mh_kernel_check(half, step=_mh_from_regenerate(_model_run(TEMPERED))).invariance_error > 1e-3


def test_update_to_a_longer_target_weights_by_the_new_likelihood_and_twist():
    """A state of TWISTED's first SMC target (stop_after=1) updated to the whole program:
    the choices after the checkpoint are fresh, and the weight is log p(x') - log p_1(x)
    - fresh: the likelihood after the checkpoint minus the twist potential reached."""
    first, whole = _model_run(TWISTED, stop_after=1), _model_run(TWISTED)
    torch.manual_seed(5)
    state = gfi.simulate(first, 64, TorchRandomness())
    assert "c" not in state.values and state.stop_after == 1
    new, weight = gfi.update(whole, state, None, TorchRandomness())
    assert bool(new.present["c"].all()) and new.stop_after is None
    assert torch.allclose(weight, gfi.assess(whole, new) - gfi.assess(first, state) - new.site_lp["c"],
                          atol=EXACT, rtol=0)
    a, b, c = new.values["a"], new.values["b"], new.values["c"]
    twist = torch.where(a, torch.where(b, 1.5, -0.5), 0.0).double()
    second = torch.log(torch.where(c, torch.where(a, 0.7, 0.1), torch.where(a, 0.3, 0.9))).double()
    assert torch.allclose(weight, second - twist, atol=EXACT, rtol=0)
