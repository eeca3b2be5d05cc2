"""Beam search (``method="beam"``, ``inference.beam``; issue 14 item 4), on the toy LM.

* With a width at least the number of the program's paths, the beams are exactly the
  paths of exact enumeration, ranked by their log joint density (LM log probability plus
  factors/conditions/rewards), so the first k are the exact top k.
* Width 1 is greedy decoding, and width 2 finds the better path greedy misses (hand
  computation on a table without ties).
* Diverse beam search (groups and a Hamming diversity penalty) returns distinct beams
  where plain groups coincide. Stochastic beam search (values drawn without replacement)
  with enough values per beam is the exhaustive search, and with one beam of one value
  ancestral sampling (frequencies within 5 binomial SEs of the model's).
* The CLI runs ``--method beam``; its ``--json`` has best_of_n's keys (plus the beams).
* Errors: ``lm.generate``, a choice inside a branch, a width that groups do not divide.
"""
import json
import math
from fractions import Fraction

import pytest
import torch

import ppl
from ppl.cli import main
from ppl.semantics.errors import PPLError
from ppl.stdlib.lm.toy import EOS, START, ToyLM, ToyReward

torch.set_num_threads(1)

LM = ToyLM()
RM = ToyReward()

#: a flip, three next_token steps with a mask, a condition per token and a reward on the text
REWARDED = """
def m(lm, rm):
    k ~ flip(0.3)
    toks = [" the"] if k else []
    for i in range(3):
        tok ~ lm.next_token(toks, allowed=lambda t: t != " dog")
        condition tok != " tree"
        toks = toks + [tok]
    factor rm("", lm.decode(toks))
    return ("k" if k else "-") + lm.decode(toks)
"""

#: a table without ties: greedy takes " a" (0.6) then " x" (0.5): 0.30; the best path is " b z": 0.36
TABLE = {START: {" a": "3/5", " b": "2/5"}, " a": {" x": "1/2", " y": "3/10", EOS: "1/5"},
         " b": {" z": "9/10", EOS: "1/10"}}
TWO_STEPS = """
def m(lm):
    toks = []
    for i in range(2):
        tok ~ lm.next_token(toks)
        toks = toks + [tok]
    return lm.decode(toks)
"""


def _exact_paths(model, data):
    """[(log weight, return text)] of every path of positive weight, best first."""
    r = model.run("enumerate", data)
    out = {}
    for w, v in r.paths:
        if w > 0:
            out[str(v["return"])] = out.get(str(v["return"]), Fraction(0)) + w
    return sorted(((math.log(w), t) for t, w in out.items()), key=lambda x: -x[0])


def test_a_wide_beam_finds_every_path_ranked_exactly():
    m = ppl.model(REWARDED)
    data = {"lm": LM, "rm": RM}
    exact = _exact_paths(m, data)
    assert len(exact) >= 20
    r = m.run("beam", data, beam_width=len(exact))
    beams = r.extra["beams"]
    assert len(beams) == len(exact)
    got = {b["return"]: b["score"] for b in beams}
    for lw, text in exact:
        assert got[text] == pytest.approx(lw, abs=1e-5)
    assert [b["score"] for b in beams] == sorted((b["score"] for b in beams), reverse=True)
    for k in (1, 3, 5):  # the exact top k (by score: the toy table has ties)
        assert [b["score"] for b in beams[:k]] == pytest.approx([lw for lw, _ in exact[:k]], abs=1e-5)
    assert r.score == pytest.approx(exact[0][0], abs=1e-5)
    assert str(r.sites["return"].value[0]) == beams[0]["return"]


def test_width_one_is_greedy_and_width_two_finds_the_better_path():
    lm = ToyLM(TABLE)
    m = ppl.model(TWO_STEPS)
    greedy = m.run("beam", {"lm": lm}, beam_width=1)
    assert greedy.extra["beams"] == [{"score": pytest.approx(math.log(0.6 * 0.5), abs=1e-6), "return": " a x"}]
    wide = m.run("beam", {"lm": lm}, beam_width=2)
    assert [b["return"] for b in wide.extra["beams"]] == [" b z", " a x"]
    assert wide.score == pytest.approx(math.log(0.4 * 0.9), abs=1e-6)
    assert _exact_paths(m, {"lm": lm})[0] == (pytest.approx(math.log(0.36)), " b z")


def test_expand_limits_the_values_per_beam():
    lm = ToyLM(TABLE)
    m = ppl.model(TWO_STEPS)
    assert m.run("beam", {"lm": lm}, beam_width=3, expand=1).extra["beams"] == \
        m.run("beam", {"lm": lm}, beam_width=1).extra["beams"]  # one value per beam: greedy
    two = m.run("beam", {"lm": lm}, beam_width=3, expand=2)
    # " a" -> " x", " y" and " b" -> " z", end (0.04): the best three of those four
    assert [b["return"] for b in two.extra["beams"]] == [" b z", " a x", " a y"]
    assert two.candidates == 2 + 4
    assert m.run("beam", {"lm": lm}, beam_width=3).candidates == 2 + 5  # expand = width: " a" has 3 values


def test_diverse_groups_find_distinct_beams():
    lm = ToyLM(TABLE)
    m = ppl.model(TWO_STEPS)
    same = m.run("beam", {"lm": lm}, beam_width=2, groups=2, diversity=0.0)
    assert [b["return"] for b in same.extra["beams"]] == [" a x"]  # the two greedy groups coincide
    diverse = m.run("beam", {"lm": lm}, beam_width=2, groups=2, diversity=10.0)
    assert [b["return"] for b in diverse.extra["beams"]] == [" b z", " a x"]
    assert diverse.extra["beams"][0]["score"] == pytest.approx(math.log(0.36), abs=1e-6)  # never penalised


def test_stochastic_beam_with_enough_values_is_the_exhaustive_search():
    m = ppl.model(REWARDED)
    data = {"lm": LM, "rm": RM}
    exhaustive = m.run("beam", data, beam_width=28).extra["beams"]
    sampled = m.run("beam", data, beam_width=28, sample=True, seed=3).extra
    assert sampled["sample"] is True
    assert sorted((b["return"], round(b["score"], 6)) for b in sampled["beams"]) == \
        sorted((b["return"], round(b["score"], 6)) for b in exhaustive)


def test_stochastic_beam_of_one_value_is_ancestral_sampling():
    lm = ToyLM(TABLE)
    m = ppl.model(TWO_STEPS)
    exact = {" a x": 0.30, " a y": 0.18, " a": 0.12, " b z": 0.36, " b": 0.04}
    R = 400
    seen = {}
    for seed in range(R):
        text = m.run("beam", {"lm": lm}, beam_width=1, expand=1, sample=True, seed=seed).extra["beams"][0]["return"]
        seen[text] = seen.get(text, 0) + 1
    assert set(seen) <= set(exact)
    for text, p in exact.items():
        assert abs(seen.get(text, 0) / R - p) < 5 * math.sqrt(p * (1 - p) / R), (text, seen.get(text, 0) / R, p)


def test_beam_draws_continuous_choices_from_the_prior():
    m = ppl.model("""
def m():
    mu ~ normal(0, 1)
    b ~ flip(0.2)
    observe 1.0 ~ normal(mu if b else 0.0, 1.0)
    return b
""")
    r = m.run("beam", beam_width=2, seed=0)
    assert len(r.extra["beams"]) == 2 and r.extra["expansions"] == 1


def test_cli_beam_json_has_best_of_n_shape(tmp_path, capsys):
    f = tmp_path / "m.ppl"
    f.write_text("""
def m():
    lm = toy_lm()
    toks = []
    for i in range(3):
        tok ~ lm.next_token(toks)
        condition "e" not in tok
        toks = toks + [tok]
    return lm.decode(toks)
""")
    assert main(["run", str(f), "--method", "beam", "-n", "3", "--json"]) == 0
    beam = json.loads(capsys.readouterr().out)
    assert main(["run", str(f), "--method", "best_of_n", "-n", "30", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert set(best) <= set(beam)
    assert beam["method"] == "beam" and beam["not_a_posterior"] is True
    assert beam["score"] == pytest.approx(math.log(Fraction(1, 32)), abs=1e-6)  # " cat", then the end
    assert [b["return"] for b in beam["beams"]] == [" cat", " a dog runs", " a cat"]
    assert main(["run", str(f), "--method", "beam", "-n", "3"]) == 0
    assert "beam: the best of 3 beams" in capsys.readouterr().out


@pytest.mark.parametrize("src, message, line", [
    ("    text ~ lm.generate('', max_tokens=2)\n    return text\n", "lm.generate is one choice", 3),
    ("    k ~ flip(0.5)\n    if k:\n        t ~ lm.next_token([])\n    return k\n", "reached by all beams", 5),
])
def test_beam_errors_are_located(src, message, line):
    m = ppl.model("def m():\n    lm = toy_lm()\n" + src)
    with pytest.raises(PPLError, match=message) as err:
        m.run("beam", beam_width=2)
    assert err.value.span is not None and err.value.span.line == line


def test_groups_must_divide_the_width():
    with pytest.raises(PPLError, match="multiple of groups"):
        ppl.model(TWO_STEPS).run("beam", {"lm": LM}, beam_width=3, groups=2)


def test_beam_under_a_regex_constraint_finds_every_path():
    """``allowed=regex(...)`` on next_token (issue 14 item 1): the mask's mass is part of the score."""
    pytest.importorskip("ppl.stdlib.lm.constraints")
    m = ppl.model("""
def m(lm):
    toks = []
    for i in range(3):
        tok ~ lm.next_token(toks, allowed=regex("( the| a)( cat| dog)s?"))
        toks = toks + [tok]
    return lm.decode(toks)
""")
    exact = _exact_paths(m, {"lm": LM})
    assert len(exact) == 8
    beams = m.run("beam", {"lm": LM}, beam_width=8).extra["beams"]
    assert {b["return"]: pytest.approx(b["score"], abs=1e-5) for b in beams} == {t: lw for lw, t in exact}
