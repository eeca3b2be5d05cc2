"""The inference-time scaling study (examples/lm_scaling.py, issue 14 item 5): its exact
step checker, the noisy process reward model, the token counts, and the --quick study's
machinery (not its timing).

The arithmetic LM is trained once per session into a temporary directory (the study is
told the directory with --cache), so examples/out/ is not touched and nothing is
downloaded.
"""
from __future__ import annotations

import contextlib
import io
import math
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import lm_scaling as S  # noqa: E402

TRAIN_STEPS = 600


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("arith_lm")
    with contextlib.redirect_stdout(io.StringIO()):
        S.task_lm(path, TRAIN_STEPS)
    return path


@pytest.fixture(scope="module")
def study(cache):
    lm = S.task_lm(cache, TRAIN_STEPS, verbose=False)
    return S.Study(lm, lam=3.0)


# ------------------------------------------------------------------- the exact checker
def test_worked_solution_and_exact_verdicts():
    assert S.worked_steps(37, 45) == ["7+5=12;", "3+4+1=8;", "=82."]
    assert S.worked_steps(99, 99) == ["9+9=18;", "9+9+1=19;", "=198."]
    assert S.worked_steps(12, 34) == ["2+4=6;", "1+3=4;", "=46."]
    p = S.problem_prompt(37, 45)
    assert p == "37+45:" and S.parse_prompt(p) == (37, 45)
    # a right solution, its prefixes, and wrong steps of each kind
    assert S.exact_verdicts(p, "7+5=12;3+4+1=8;=82.") == [True, True, True]
    assert S.exact_verdicts(p, "7+5=12;3+4+") == [True]           # the unfinished step is not judged
    assert S.exact_verdicts(p, "") == []
    assert S.exact_verdicts(p, "7+5=13;3+4+1=8;=82.") == [False, True, True]   # a wrong sum
    assert S.exact_verdicts(p, "7+5=12;3+4=7;=77.") == [True, False, False]    # a lost carry
    assert S.exact_verdicts(p, "5+7=12;") == [False]                           # digits swapped: not the worked step
    assert S.exact_verdicts(p, "7+5=12;3+4+1=8;0+0=0;=82.") == [True, True, False, False]  # a step too many
    assert S.exact_verdicts(p, "7+5=12;3+4+1=8;=82.=82.") == [True, True, True, False]      # after the answer
    assert S.final_answer("7+5=12;3+4+1=8;=82.") == "82"
    assert S.final_answer("7+5=12;3+4+1=8;=82") is None and S.final_answer("7+5=12;") is None
    assert S.is_correct(p, "7+5=12;3+4=7;=82.")  # the answer decides correctness, not the steps
    assert not S.is_correct(p, "7+5=12;3+4+1=8;=72.")


def test_noisy_prm_is_exact_at_eps_0_flips_all_at_1_and_is_systematic():
    p, texts = "37+45:", ["7+5=12;3+4+1=8;=82.", "7+5=13;3+4+1=8;=82.", "7+5=12;3+4=7;=77.", "7+5="]
    exact = [S.exact_verdicts(p, t) for t in texts]
    assert [S.NoisyPRM(0.0).verdicts(p, t) for t in texts] == exact
    assert [S.NoisyPRM(1.0).verdicts(p, t) for t in texts] == [[not v for v in e] for e in exact]
    assert S.NoisyPRM(0.0).score([p] * 4, texts).tolist() == [0.0, -1.0, -2.0, 0.0]
    prm = S.NoisyPRM(0.3, seed=5)
    assert prm.score([p] * 4, texts).tolist() == S.NoisyPRM(0.3, seed=5).score([p] * 4, texts).tolist()
    # a verdict depends on the text up to its step only: extending a text keeps its verdicts
    assert prm.verdicts(p, texts[0])[:2] == prm.verdicts(p, "7+5=12;3+4+1=8;")
    with pytest.raises(ValueError):
        S.NoisyPRM(1.5)


def test_noisy_prm_flip_rate_is_eps():
    """Over 3000 distinct one-step texts, the share of verdicts that differ from the exact
    checker is eps within 4 binomial SEs."""
    eps, n = 0.2, 3000
    prm = S.NoisyPRM(eps, seed=1)
    flips = 0
    for i in range(n):
        p, t = f"{10 + i % 90}+{10 + i // 90}:", f"{i % 10}+{i % 7}={i % 19};"
        flips += prm.verdicts(p, t) != S.exact_verdicts(p, t)
    assert abs(flips / n - eps) <= 4 * math.sqrt(eps * (1 - eps) / n), flips / n


# ------------------------------------------------------------------- tokens counted
def _draws(text: str) -> int:
    """The tokens one generated solution drew: its characters, plus the end-of-sequence
    token when its last step ended there (unfinished and shorter than the step limit)."""
    steps, rest = S.split_steps(text)
    return len(text) + (1 if rest and len(rest) < S.STEP_MAX_TOKENS or not text else 0)


def test_tokens_counted_are_the_draws_of_the_samples(study):
    prompt = S.problem_prompt(37, 45)
    for n in (1, 5):
        study.lm.rows = study.lm.sampled = 0
        res = study.models["outcome_scored"].run("importance", study.data(prompt, 0.0), particles=n, seed=3)
        texts = [str(t) for t in res.samples["return"]]
        assert study.lm.sampled == sum(_draws(t) for t in texts) > 0
        assert 0 < study.lm.rows <= study.lm.sampled  # equal contexts asked once
    r = study.solve("best_of_n", prompt, 8, 0.0, seed=3)
    study.lm.sampled = 0
    res = study.models["outcome_scored"].run("importance", study.data(prompt, 0.0), particles=8, seed=3)
    assert r["tokens"] == study.lm.sampled == sum(_draws(str(t)) for t in res.samples["return"])
    # beam search with one beam is greedy decoding: one draw per token of its text, and the
    # end-of-sequence token (the fixed loop's later steps ask nothing of a finished context)
    if S._has_method("beam"):
        study.lm.sampled = 0
        res = study.models["prm_tokens"].run("beam", {"lm": study.lm, "prm": study.prm(0.0), "prompt": prompt,
                                                      "max_tokens": S.SOLUTION_MAX_TOKENS, "lam": 3.0},
                                             beam_width=1)
        text = str(res.samples["return"][0])
        assert study.lm.sampled == len(text) + (len(text) < S.SOLUTION_MAX_TOKENS)
    # SMC: every particle draws every step until it finishes, resampled copies included
    r = study.solve("smc", prompt, 8, 0.0, seed=3)
    assert r["tokens"] >= 8 * len(S.worked_steps(37, 45)) and r["rows"] <= r["tokens"]


def test_best_of_n_with_exact_verifier_is_right_iff_a_candidate_is(study):
    """With eps = 0 a right solution scores 0 and every other finished one less, so
    best-of-N answers right exactly when one of its N candidates (the same draws as
    importance sampling from the same seed) is right."""
    for i, (a, b) in enumerate(S.problems(6, 99)):
        prompt = S.problem_prompt(a, b)
        r = study.solve("best_of_n", prompt, 4, 0.0, seed=i)
        res = study.models["outcome_scored"].run("importance", study.data(prompt, 0.0), particles=4, seed=i)
        assert r["correct"][0] == any(S.is_correct(prompt, str(t)) for t in res.samples["return"])


def test_learned_prm_scores_steps_and_beats_the_base_rate(cache, study):
    """The learned PRM: one probability per completed step, score = their log sum (0 with
    no completed step), and on held-out samples it calls steps right or wrong better than
    always answering the more common verdict."""
    with contextlib.redirect_stdout(io.StringIO()):
        prm = S.train_learned_prm(study.lm, cache, n_problems=150, per_problem=8, steps=200)
    p = "37+45:"
    texts = ["7+5=12;3+4+1=8;=82.", "7+5=12;3+", ""]
    probs = [prm.step_probs(p, t) for t in texts]
    assert [len(x) for x in probs] == [3, 1, 0] and all(0 < q < 1 for x in probs for q in x)
    scores = prm.score([p] * 3, texts).tolist()
    for sc, x in zip(scores, probs):
        assert sc == pytest.approx(sum(math.log(q) for q in x), abs=1e-5)
    info = prm.info
    assert info["step_accuracy"] > max(info["right_share"], 1 - info["right_share"]) + 0.05, info


# ------------------------------------------------------------------- the quick study
def test_quick_study(cache, tmp_path):
    buf = io.StringIO()
    png = tmp_path / "scaling.png"
    with contextlib.redirect_stdout(buf):
        out = S.main(["--quick", "--problems", "10", "--cache", str(cache), "--train-steps", str(TRAIN_STEPS),
                      "--prm-steps", "200", "--plot", str(png)])
    s, budgets = out["summary"], out["budgets"]
    assert budgets == [1, 2, 4, 8] and png.stat().st_size > 10_000
    nmax = budgets[-1]
    assert out["verifiers"] == [0.0, 0.2, S.LEARNED]
    for eps in out["verifiers"]:
        for m in ("best_of_n", "smc", "smc_steer", "weighted_majority") + (("beam",) if S._has_method("beam") else ()):
            assert (m, eps, nmax) in s and s[(m, eps, nmax)]["n"] == 10
    # with the exact verifier more candidates cannot hurt best-of-N on the same problems:
    # it is right iff one of its candidates is (test above); checked here on the study's numbers
    assert s[("best_of_n", 0.0, nmax)]["acc"] >= s[("best_of_n", 0.0, 1)]["acc"]
    assert s[("best_of_n", 0.0, nmax)]["acc"] > s[("best_of_n", 0.0, 1)]["acc"] + 0.1  # the LM is partial
    assert s[("smc", 0.0, nmax)]["acc"] >= s[("best_of_n", 0.0, 1)]["acc"]
    # tokens: N particles of a ~18-character solution; every method spends about the same
    for key, v in s.items():
        n = key[2]
        assert 10 * n <= v["tokens"] <= 40 * n, (key, v)
        assert v["rows"] <= v["tokens"]
    # the markdown table has a row per method line and a column per budget
    assert "| eps = 0 | best-of-N (PRM) |" in out["table"] and "| none | majority vote |" in out["table"]
