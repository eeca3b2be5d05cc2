"""MH on language-model choices (``inference.token_moves``, issue 14 item 3), on the toy LM.

* The suffix kernel leaves the posterior invariant EXACTLY: its transition matrix, built
  by enumerating the site pick, the cut, every regenerated suffix and the accept test
  (``token_kernel_check``), satisfies pi K = pi and detailed balance on programs with a
  ``generate`` choice of varying length (``allowed=`` mask, ``stop=``, temperature,
  top_k, top_p), a ``next_token`` choice and a flip, under condition/factor (posterior !=
  prior), and a trace whose shape changes with the text (fresh and stale choices).
* The broken kernels are caught by the same check: without the 1/n : 1/n' odds of the
  cut (completions of different lengths), and without the proposal ratio.
* ``method="mh", kernel="suffix"`` and ``method="resample_move", kernel="suffix"`` run
  on an LM program and agree with enumeration within 5 Monte Carlo standard errors
  (independent chains / replicates, fixed seeds).
"""
import math

import pytest
import torch

import ppl
from ppl.semantics.errors import PPLError
from ppl.stdlib.lm.toy import ToyLM
from ppl.testing.validity import token_kernel_check

torch.set_num_threads(1)

LM = ToyLM()

#: a completion of 1 to 3 tokens (2 to 3 draws), a next_token choice, a condition and a factor
LENGTHS = """
def m(lm):
    first ~ lm.next_token([], allowed=[" the", " a"])
    text ~ lm.generate([first], max_tokens=3, allowed=lambda t: t != " tree")
    condition "cat" in text
    factor 1.0 if "runs" in text else 0.0
    return text
"""

#: a numeric choice upstream of the prompt, stop strings, temperature and top_k
OPTIONS = """
def m(lm):
    k ~ flip(0.3)
    text ~ lm.generate(" the" if k else " a", max_tokens=3, stop=" sees", temperature=0.5, top_k=3)
    factor 2.0 if "s" in text else 0.0
    condition "dog" not in text
    return text
"""

#: the trace changes shape with the text (fresh and stale choices), a stop string, top_p
STRUCTURE = """
def m(lm):
    text ~ lm.generate(" a", max_tokens=3, stop="s")
    if "cat" in text:
        tok ~ lm.next_token(lm.encode(text), top_p=0.6)
        factor 1.0 if tok == "s" else 0.0
    else:
        b ~ flip(0.3)
        condition b or "dog" in text
    return text
"""


def _posterior(model):
    r = model.run("enumerate", {"lm": LM})
    z = float(r.evidence)
    out = {}
    for w, v in r.paths:
        out[str(v["return"])] = out.get(str(v["return"]), 0.0) + float(w) / z
    return out


@pytest.mark.parametrize("src", [LENGTHS, OPTIONS, STRUCTURE], ids=["lengths", "options", "structure"])
def test_suffix_kernel_is_exactly_invariant(src):
    check = token_kernel_check(ppl.model(src), {"lm": LM})
    assert len(check.pi) >= 10
    assert check.ok(1e-12), (check.invariance_error, check.row_sum_error)
    assert check.balance_error < 1e-12


def test_the_posterior_differs_from_the_prior():
    m = ppl.model(LENGTHS)
    prior = ppl.model(LENGTHS.replace('    condition "cat" in text\n', "").replace("    factor 1.0 if \"runs\" in text else 0.0\n", ""))
    post, pri = _posterior(m), _posterior(prior)
    assert max(abs(post.get(k, 0.0) - p) for k, p in pri.items()) > 0.1


def test_forgetting_the_cut_odds_is_caught():
    check = token_kernel_check(ppl.model(LENGTHS), {"lm": LM}, cut_odds=False)
    assert check.invariance_error > 1e-3  # 0.0136: completions of 2 and 3 draws
    assert check.row_sum_error < 1e-12  # still a kernel: only its stationary law is wrong


def test_forgetting_the_proposal_ratio_is_caught():
    check = token_kernel_check(ppl.model(LENGTHS), {"lm": LM}, hastings=False)
    assert check.invariance_error > 1e-3  # 0.034


def test_mh_with_the_suffix_kernel_matches_enumeration():
    m = ppl.model(LENGTHS)
    exact = _posterior(m)
    C, S = 40, 60
    r = m.run("mh", {"lm": LM}, chains=C, samples=S, burn_in=30, thin=2, kernel="suffix", seed=1)
    assert r.extra["kernel"] == "suffix"
    texts = [str(t) for t in r.sites["return"].value]
    assert len(texts) == C * S
    for text, p in exact.items():
        means = torch.tensor([sum(t == text for t in texts[c * S:(c + 1) * S]) / S for c in range(C)],
                             dtype=torch.float64)
        se = max(float(means.std()) / math.sqrt(C), math.sqrt(p * (1 - p) / (C * S)))
        assert abs(float(means.mean()) - p) < 5 * se, (text, float(means.mean()), p)


def test_resample_move_with_the_suffix_kernel_matches_enumeration():
    m = ppl.model(OPTIONS)
    exact = _posterior(m)
    R, N = 12, 200
    est = {k: [] for k in exact}
    for seed in range(R):
        r = m.run("resample_move", {"lm": LM}, particles=N, kernel="suffix", moves=2, seed=seed)
        w = torch.softmax(torch.as_tensor(r.log_weights, dtype=torch.float64), 0)
        texts = [str(t) for t in r.sites["return"].value]
        for k in exact:
            est[k].append(sum(float(wi) for wi, t in zip(w, texts) if t == k))
    for k, p in exact.items():
        x = torch.tensor(est[k], dtype=torch.float64)
        se = max(float(x.std()) / math.sqrt(R), math.sqrt(p * (1 - p) / (R * N)))
        assert abs(float(x.mean()) - p) < 5 * se, (k, float(x.mean()), p)


def test_suffix_kernel_refuses_options_it_has_no_use_for():
    with pytest.raises(PPLError, match="takes no scale="):
        ppl.model(LENGTHS).run("mh", {"lm": LM}, chains=2, samples=2, burn_in=0, kernel="suffix", scale=0.3)


def test_prior_kernel_still_refuses_string_choices_and_points_to_the_suffix_kernel():
    with pytest.raises(PPLError, match="numeric random choices only") as err:
        ppl.model(LENGTHS).run("mh", {"lm": LM}, chains=2, samples=2, burn_in=0)
    assert "kernel='suffix'" in str(err.value)


def test_suffix_kernel_under_a_regex_constraint_is_exactly_invariant():
    """A constraint whose mask depends on the text so far (``allowed=regex(...)``, issue 14
    item 1): the suffix is regenerated under the same per-prefix masks."""
    pytest.importorskip("ppl.stdlib.lm.constraints")
    m = ppl.model("""
def m(lm):
    text ~ lm.generate("", max_tokens=4, allowed=regex("( the| a)( cat| dog)s?( runs)?"))
    factor 1.0 if "runs" in text else 0.0
    return text
""")
    check = token_kernel_check(m, {"lm": LM})
    assert len(check.pi) == 16 and check.ok(1e-12) and check.balance_error < 1e-12
