"""Language models and reward models as primitives of the DSL (``ppl.stdlib.lm.dsl``),
checked exactly on the toy bigram model (``ppl.stdlib.lm.toy``).

* Exact enumeration of ``next_token`` / ``generate`` programs equals a hand computation
  from the table (an independent walk over ``DEFAULT_TABLE``), in rationals.
* ``allowed=`` is a constraint: the same exact measure (posterior and evidence) as a
  ``condition`` on the token, and the same as an ``allowed=`` list.
* IS and SMC (every resampling scheme) under "no token contains the letter e", "exactly
  K words" and a reward tilt ``factor rm(...) / beta`` (with and without a process
  reward as SMC twist): the posterior probability of every completion, and the evidence
  Z_hat / Z, against enumeration, within Z_T standard errors of R independent replicates
  (fixed seeds; SE floored at the binomial SE of the N * R particles, as in test_smc).
* ``check_proper`` accepts IS and SMC on these programs exactly (every draw and every
  resampling outcome enumerated, 2 particles), including a user proposal on top of a
  constraint.
* ``observe`` of a completion scores the sum of its tokens' log probabilities.
* One backend ``next_logprobs`` call per step for the whole population.
* Clear errors.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import ppl
from ppl.semantics.errors import PPLError
from ppl.stdlib.lm.dsl import Completion, Token, _Opts, decode_logprobs, decode_probs
from ppl.stdlib.lm.toy import DEFAULT_TABLE, EOS, START, ToyLM, ToyReward
from ppl.testing.validity import check_proper, importance_algorithm, smc_algorithm

torch.set_num_threads(1)

LM = ToyLM()
RM = ToyReward()
Z_T = 5.0
R = 20
N = 2000
SCHEMES = ["multinomial", "stratified", "systematic", "residual"]


# ------------------------------------------------------------------ hand computation
def p_next(prev: str, nxt: str) -> Fraction:
    """P(nxt | prev) straight from the table (a token without a row ends the text)."""
    row = DEFAULT_TABLE.get(prev)
    if row is None:
        return Fraction(1) if nxt == EOS else Fraction(0)
    return Fraction(row.get(nxt, "0"))


def sequences(steps: int):
    """Every token sequence of ``steps`` next_token draws (EOS absorbing) with its
    probability: [(tokens, p)]."""
    out = [((), Fraction(1))]
    for _ in range(steps):
        new = []
        for toks, p in out:
            if toks and toks[-1] == EOS:
                new.append((toks + (EOS,), p))
                continue
            prev = toks[-1] if toks else START
            for t in [EOS] + [t for t in LM.tokens[1:]]:
                q = p_next(prev, t)
                if q:
                    new.append((toks + (t,), p * q))
        out = new
    return out


def text(toks) -> str:
    return "".join(t for t in toks if t != EOS)


def hand_measure(steps: int, keep=lambda toks: True, weight=lambda toks: 1):
    """The program's measure on join(tokens): {text: mass}."""
    out: dict = {}
    for toks, p in sequences(steps):
        if keep(toks):
            out[text(toks)] = out.get(text(toks), 0) + p * weight(toks)
    return out


def normalised(m: dict) -> dict:
    z = sum(m.values())
    return {k: v / z for k, v in m.items()}


# ----------------------------------------------------------------------- the programs
NO_E_CONDITION = """
def m(lm):
    toks = []
    for i in range(3):
        tok ~ lm.next_token(toks)
        condition "e" not in tok
        toks = toks + [tok]
    return join(toks)
"""
NO_E_ALLOWED = """
def m(lm):
    toks = []
    for i in range(3):
        tok ~ lm.next_token(toks, allowed=lambda t: "e" not in t)
        toks = toks + [tok]
    return join(toks)
"""
NO_E_LIST = """
def m(lm):
    toks = []
    for i in range(3):
        tok ~ lm.next_token(toks, allowed=filter(lambda t: not contains(t, "e"), lm.vocab))
        toks = toks + [tok]
    return join(toks)
"""
K_WORDS = """
def m(lm, K):
    toks = []
    for i in range(4):
        tok ~ lm.next_token(toks)
        toks = toks + [tok]
        condition word_count(join(toks)) <= K
    condition word_count(join(toks)) == K
    return join(toks)
"""
K_WORDS_GENERATE = """
def m(lm, K):
    text ~ lm.generate("", max_tokens=4)
    condition word_count(text) == K
    return text
"""
REWARD = """
def m(lm, rm, beta):
    toks = []
    for i in range(3):
        tok ~ lm.next_token(toks)
        toks = toks + [tok]
    factor rm("", join(toks)) / beta
    return join(toks)
"""
# steering under a constraint with a process reward: the reward of the partial text is
# an SMC twist at each step (resampling at the conditions sees it); twist(0) takes it off
# before the final reward, so the last resampling targets the posterior itself. Twists
# do not change the measure: it is the constraint times the final reward.
REWARD_TWISTED = """
def m(lm, rm, beta):
    toks = []
    for i in range(3):
        tok ~ lm.next_token(toks)
        toks = toks + [tok]
        twist(rm("", join(toks)) / beta)
        condition "e" not in tok
    twist(0)
    factor rm("", join(toks)) / beta
    return join(toks)
"""


def no_e(toks):
    return not any("e" in t for t in toks if t != EOS)


def k_words(k):
    return lambda toks: len(text(toks).split()) == k


def reward(beta):
    return lambda toks: math.exp(RM.score_one(text(toks)) / beta)


CASES = {  # name -> (source, data, exact measure by hand)
    "no_e_condition": (NO_E_CONDITION, {}, hand_measure(3, no_e)),
    "no_e_allowed": (NO_E_ALLOWED, {}, hand_measure(3, no_e)),
    "k_words": (K_WORDS, {"K": 2}, hand_measure(4, k_words(2))),
    "reward": (REWARD, {"rm": RM, "beta": 0.5}, hand_measure(3, weight=reward(0.5))),
    "reward_twisted": (REWARD_TWISTED, {"rm": RM, "beta": 0.5}, hand_measure(3, no_e, weight=reward(0.5))),
}


def data_of(case):
    src, data, _ = CASES[case]
    return ppl.model(src), {"lm": LM, **data}


def exact_measure(model, data) -> dict:
    res = model.run("enumerate", data)
    out: dict = {}
    for w, vals in res.paths:
        out[vals["return"]] = out.get(vals["return"], 0) + w
    return out


# ------------------------------------------------------------------ (1) enumeration
@pytest.mark.parametrize("case", list(CASES))
def test_enumeration_equals_the_hand_computation(case):
    model, data = data_of(case)
    got = exact_measure(model, data)
    want = {k: v for k, v in CASES[case][2].items() if v}
    assert set(got) == set(want)
    for k in want:
        if isinstance(want[k], Fraction):
            assert got[k] == want[k], (k, got[k], want[k])  # exactly, in rationals
        else:
            assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-12)


def test_generate_enumerates_every_completion_exactly():
    model = ppl.model("""
def m(lm):
    text ~ lm.generate("", max_tokens=3)
    return text
""")
    res = model.run("enumerate", {"lm": LM})
    assert res.evidence == 1
    # by hand: at most 3 draws, EOS counting as one; a text of 3 tokens is cut there
    want: dict = {}
    for toks, p in sequences(3):
        want[text(toks)] = want.get(text(toks), 0) + p
    assert res.marginal() == want
    assert res.marginal()[" the cat"] == Fraction(1, 2) * Fraction(1, 2) * Fraction(1, 4)  # EOS after " cat"
    assert res.marginal()[" the cat runs"] == Fraction(1, 2) * Fraction(1, 2) * Fraction(1, 4)  # cut, no EOS term


def test_generate_with_stop_strings():
    model = ppl.model("""
def m(lm):
    text ~ lm.generate("", max_tokens=4, stop=["s", "tree"])
    return text
""")
    res = model.run("enumerate", {"lm": LM})
    m = res.marginal()
    assert res.evidence == 1
    for t in m:  # generation stops at the first token whose text completes a stop string
        prefix = LM.decode(LM.encode(t)[:-1])
        assert "s" not in prefix and "tree" not in prefix
    # " the cats": stops at "s" (no EOS term); " a tree": stops at " tree"
    assert m[" the cats"] == Fraction(1, 2) * Fraction(1, 2) * Fraction(1, 4)
    assert m[" a tree"] == Fraction(1, 4) * Fraction(1, 2)
    assert m[" dog"] == Fraction(1, 8) * Fraction(1, 4)


def test_allowed_is_a_constraint_like_condition():
    """allowed= (a predicate, or a list) denotes the measure of the condition: the same
    posterior AND the same evidence, exactly."""
    want = exact_measure(*data_of("no_e_condition"))
    for src in (NO_E_ALLOWED, NO_E_LIST):
        assert exact_measure(ppl.model(src), {"lm": LM}) == want
    assert sum(want.values()) == sum(hand_measure(3, no_e).values()) == Fraction(143, 512)


def test_options_enumerate_exactly():
    """temperature with integer 1/T, top-k and top-p keep the probabilities rational."""
    model = ppl.model("""
def m(lm):
    a ~ lm.next_token([], temperature=0.5)
    b ~ lm.next_token([a], top_k=2)
    c ~ lm.next_token([a, b], top_p=0.6)
    return a + b + c
""")
    res = model.run("enumerate", {"lm": LM})
    assert res.evidence == 1 and isinstance(res.evidence, Fraction)
    # start row (1/2, 1/4, 1/8, 1/8) at T = 1/2: squares, renormalised
    pa = {" the": Fraction(16, 22), " a": Fraction(4, 22), " cat": Fraction(1, 22), " dog": Fraction(1, 22)}
    assert res.marginal("a") == pa
    # after " the": top-2 of (cat 1/2, dog 1/4, tree 1/4) keeps the tie: all three
    # after " cat": top_p 0.6 of (1/4, 1/4, 1/4, 1/4): nothing is strictly more likely: all kept
    assert res.marginal()[" the cat runs"] == pa[" the"] * Fraction(1, 2) * Fraction(1, 4)
    # after " a" (cat 1/4, dog 1/4, tree 1/2) top_k=2 keeps all three (tie at 1/4); after
    # " a tree" (s 1/2, EOS 1/2): top_p 0.6 keeps both (neither is strictly more likely)
    assert res.marginal()[" a trees"] == pa[" a"] * Fraction(1, 2) * Fraction(1, 2)
    # after " the dog" (s 1/4, sees 1/8, runs 3/8, EOS 1/4): top_p 0.6 keeps runs (0 above it)
    # and s, EOS (3/8 above them), not sees (3/8 + 1/2 above it)
    assert " the dog sees" not in res.marginal()
    assert res.marginal()[" the dog runs"] == pa[" the"] * Fraction(1, 4) * Fraction(3, 8) / Fraction(7, 8)


def test_torch_and_exact_decoding_agree():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        worst = 0.0
        for T in (1, Fraction(1, 2), 2, 0.7):
            for k in (None, 1, 2, 3):
                for p in (None, Fraction(3, 10), Fraction(6, 10), 0.9):
                    o = _Opts(T, k, p)
                    for ctx in [()] + [(i,) for i in range(LM.vocab_size)]:
                        ex = decode_probs(LM.exact_next_probs(ctx), o)
                        t = torch.exp(decode_logprobs(LM.next_logprobs([ctx]), o))[0].tolist()
                        worst = max(worst, max(abs(float(a) - b) for a, b in zip(ex, t)))
        assert worst < 1e-12
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------- (2, 3) IS and SMC against enumeration
def t_check(values, truth, what, floor=0.0):
    v = np.asarray(values, dtype=np.float64)
    mean, se = v.mean(), max(v.std(ddof=1) / math.sqrt(len(v)), floor)
    if se == 0:
        assert mean == pytest.approx(truth, abs=1e-9), f"{what}: {mean} vs {truth} (no spread)"
        return
    assert abs(mean - truth) <= Z_T * se, \
        f"{what}: mean {mean:.6g} vs truth {truth:.6g}: {abs(mean - truth) / se:.2f} SE (SE {se:.3g})"


def check_against_exact(model, data, method, **options):
    exact = exact_measure(model, data)
    z = float(sum(exact.values()))
    post = {k: float(v) / z for k, v in exact.items()}
    estimates = {k: [] for k in post}
    log_zs = []
    for seed in range(R):
        res = model.run(method, data, particles=N, seed=seed, **options)
        marg = res.marginal()
        assert set(marg) <= set(post), f"impossible completions: {set(marg) - set(post)}"
        for k in post:
            estimates[k].append(marg.get(k, 0.0))
        log_zs.append(res.log_evidence)
    for k, p in post.items():
        t_check(estimates[k], p, f"{method} {options} P({k!r})", floor=math.sqrt(p * (1 - p) / (N * R)))
    # the evidence: Z_hat is unbiased
    lz = np.asarray(log_zs)
    t_check(np.exp(lz - math.log(z)), 1.0, f"{method} {options}: Z_hat / Z")
    return post, lz


@pytest.mark.parametrize("case", ["no_e_condition", "no_e_allowed", "k_words", "reward", "reward_twisted"])
def test_importance_sampling_matches_enumeration(case):
    check_against_exact(*data_of(case), "importance")


@pytest.mark.parametrize("case, scheme", [("no_e_allowed", s) for s in SCHEMES] + [
    (c, s) for c in ["no_e_condition", "k_words", "reward", "reward_twisted"] for s in ["systematic", "multinomial"]])
def test_smc_matches_enumeration(case, scheme):
    check_against_exact(*data_of(case), "smc", resampling=scheme)


def test_smc_resamples_after_each_constrained_token():
    """allowed= weights by its mass in a factor right after the choice: a checkpoint."""
    model, data = data_of("no_e_allowed")
    res = model.run("smc", data, particles=200, seed=0)
    hist = res.extra["history"]
    assert len(hist) == 3 and all(h.address.startswith("mass@") and h.resampled for h in hist)


def test_smc_with_generate_and_a_condition():
    model = ppl.model(K_WORDS_GENERATE)
    check_against_exact(model, {"lm": LM, "K": 2}, "smc", resampling="systematic")


def test_decoding_options_sample_what_they_score():
    model = ppl.model("""
def m(lm):
    toks = []
    for i in range(3):
        tok ~ lm.next_token(toks, temperature=2, top_p=0.9, allowed=lambda t: t != " sees")
        toks = toks + [tok]
    return join(toks)
""")
    check_against_exact(model, {"lm": LM}, "smc", resampling="multinomial")


# --------------------------------------------------------------- (4) exact properness
PROPER = {
    "no_e_condition": (NO_E_CONDITION.replace("range(3)", "range(2)"), {}),
    "no_e_allowed": (NO_E_ALLOWED.replace("range(3)", "range(2)"), {}),
    "k_words": (K_WORDS.replace("range(4)", "range(2)"), {"K": 1}),
    "reward": (REWARD.replace("range(3)", "range(2)"), {"rm": RM, "beta": 0.5}),
    "reward_twisted": (REWARD_TWISTED.replace("range(3)", "range(2)"), {"rm": RM, "beta": 0.5}),
    "generate_allowed": ("""
def m(lm, rm):
    text ~ lm.generate("", max_tokens=2, allowed=[" a", " cat", " dog", "s", lm.eos])
    factor rm("", text)
    return text
""", {"rm": RM}),
    "proposal_on_constraint": ("""
def m(lm):
    toks = []
    for i in range(2):
        tok ~ propose(lm.next_token(toks, allowed=lambda t: "e" not in t), lm.next_token(toks, top_k=3))
        toks = toks + [tok]
    return join(toks)
""", {}),
}


@pytest.mark.parametrize("algorithm", [importance_algorithm(2), smc_algorithm(2, "systematic"),
                                       smc_algorithm(2, "multinomial")], ids=["is", "smc-systematic",
                                                                             "smc-multinomial"])
@pytest.mark.parametrize("case", list(PROPER))
def test_checker_accepts_lm_programs_exactly(case, algorithm):
    src, data = PROPER[case]
    c = check_proper(ppl.model(src), algorithm, {"lm": LM, **data})
    assert c.ok(), c


@pytest.mark.parametrize("scheme", ["stratified", "residual"])
def test_checker_accepts_other_schemes(scheme):
    src, data = PROPER["no_e_allowed"]
    c = check_proper(ppl.model(src), smc_algorithm(2, scheme), {"lm": LM, **data})
    assert c.ok(), c


def test_checker_catches_a_constraint_without_its_mass():
    """Sampling the renormalised constraint without the mass factor is not proper."""
    from ppl.inference.smc import SMCHandler
    from ppl.semantics.interpreter import FactorEffect

    class NoMass(SMCHandler):
        def factor(self, eff: FactorEffect):
            if "mass@" not in eff.addr:
                super().factor(eff)

    src, data = PROPER["no_e_allowed"]
    c = check_proper(ppl.model(src), smc_algorithm(2, "systematic", handler=NoMass), {"lm": LM, **data})
    assert not c.ok() and c.max_error > 0.01


# ------------------------------------------------------------------ (5) observe
def test_observe_a_completion_scores_its_tokens():
    model = ppl.model("""
def m(lm, text, n):
    observe text ~ lm.generate("", max_tokens=n)
    return 0
""")
    table = Fraction(1, 2) * Fraction(1, 2) * Fraction(1, 4)  # " the", " cat", then EOS
    for method in ("enumerate", "importance", "smc"):
        res = model.run(method, {"lm": LM, "text": " the cat", "n": 5}, particles=3)
        assert float(res.log_evidence) == pytest.approx(math.log(table), abs=1e-6)
    # cut at max_tokens: no EOS term
    res = model.run("enumerate", {"lm": LM, "text": " the cat", "n": 2})
    assert res.evidence == Fraction(1, 4)
    # a plain text is scored by its tokenisation (" cats" = " cat" + "s")
    res = model.run("enumerate", {"lm": LM, "text": "cats", "n": 5})
    assert res.evidence == Fraction(1, 8) * Fraction(1, 4) * Fraction(1, 2)
    with pytest.raises(PPLError, match="weight zero"):  # too long to have been generated
        model.run("enumerate", {"lm": LM, "text": " the cat runs", "n": 2})
    with pytest.raises(PPLError, match="weight zero"):  # not a tokenisable text
        model.run("importance", {"lm": LM, "text": " zebra", "n": 3}, particles=2)


def test_log_joint_of_tokens_and_completions():
    model = ppl.model("""
def m(lm):
    a ~ lm.next_token([])
    b ~ lm.next_token([a], allowed=[" cat", " dog"])
    c ~ lm.generate([a, b], max_tokens=2)
    return c
""")
    lj = model.log_joint({"a": " the", "b": " dog", "c": " runs"}, lm=LM)
    # a: 1/2; b: restricted to {cat, dog}: mass p(dog) = 1/4 (renormalised 1/3, times Z = 3/4);
    # c: " runs" after " dog" (3/8), then EOS after " runs" (3/4)
    want = Fraction(1, 2) * Fraction(1, 4) * Fraction(3, 8) * Fraction(3, 4)
    assert float(lj) == pytest.approx(math.log(want), abs=1e-6)
    assert model.log_joint({"a": " the", "b": " tree", "c": ""}, lm=LM).item() == -math.inf


def test_observe_a_token_under_a_constraint_is_the_condition():
    m1 = ppl.model("""
def m(lm):
    a ~ lm.next_token([])
    observe " cat" ~ lm.next_token([a], allowed=[" cat", " dog"])
    return a
""")
    m2 = ppl.model("""
def m(lm):
    a ~ lm.next_token([])
    b ~ lm.next_token([a])
    condition b == " cat"
    return a
""")
    e1, e2 = m1.run("enumerate", {"lm": LM}), m2.run("enumerate", {"lm": LM})
    assert e1.evidence == e2.evidence and e1.marginal() == e2.marginal()
    r = m1.run("importance", {"lm": LM}, particles=4000, seed=0)
    assert r.marginal()[" the"] == pytest.approx(float(e1.marginal()[" the"]), abs=0.03)


# -------------------------------------------------------------- batching and values
class Counting(ToyLM):
    def __init__(self):
        super().__init__()
        self.calls = []

    def next_logprobs(self, contexts):
        self.calls.append(len(contexts))
        return super().next_logprobs(contexts)


def test_one_backend_call_per_step_for_the_population():
    lm = Counting()
    ppl.model(NO_E_ALLOWED).run("smc", {"lm": lm}, particles=500, seed=0)
    assert len(lm.calls) == 3 and lm.calls[0] == 1  # one call per step; distinct contexts only
    lm.calls.clear()
    model = ppl.model("""
def m(lm):
    text ~ lm.generate("", max_tokens=4, allowed=lambda t: "e" not in t)
    return text
""")
    model.run("importance", {"lm": lm}, particles=500, seed=0)
    assert len(lm.calls) <= 4
    lm.calls.clear()
    obs = ppl.model("""
def m(lm, texts):
    i ~ categorical([0.25, 0.25, 0.25, 0.25])
    observe texts[i] ~ lm.generate("", max_tokens=4)
    return i
""")
    obs.run("importance", {"lm": lm, "texts": [" the cat", " a dogs runs", " cat", " dog sees a"]},
            particles=300, seed=0)
    assert len(lm.calls) == 4  # one per scoring step (at most 4 draws, EOS included)


def test_tokens_are_strings_that_remember_their_ids():
    model = ppl.model("""
def m(lm):
    toks = lm.encode("the cats")
    tok ~ lm.next_token(toks)
    text = lm.decode(toks) + tok
    return [tok == lm.eos, len(tok), startswith(text, " the"), text]
""")
    res = model.run("enumerate", {"lm": LM})
    # after "s": sees 1/4, runs 1/4, EOS 1/2 (the EOS token's text is "")
    assert res.marginal() == {(True, 0, True, " the cats"): Fraction(1, 2),
                              (False, 5, True, " the cats sees"): Fraction(1, 4),
                              (False, 5, True, " the cats runs"): Fraction(1, 4)}
    r = model.run("importance", {"lm": LM}, particles=50, seed=0)
    assert set(r.marginal("tok")) <= {"", " sees", " runs"}
    t = Token(" cat", 3, LM)
    assert t == " cat" and hash(t) == hash(" cat") and "a" in t and t + "s" == " cats"
    assert Completion(" a cat", (2, 3), LM) == " a cat"


def test_string_and_token_list_contexts_agree():
    m1 = ppl.model("""
def m(lm):
    tok ~ lm.next_token(" the dog")
    return tok
""")
    m2 = ppl.model("""
def m(lm):
    tok ~ lm.next_token([" the", " dog"])
    return tok
""")
    assert m1.run("enumerate", {"lm": LM}).marginal() == m2.run("enumerate", {"lm": LM}).marginal()


def test_eos_is_absorbing():
    model = ppl.model("""
def m(lm):
    a ~ lm.next_token([" runs"], allowed=[lm.eos])
    b ~ lm.next_token([" runs", a], temperature=3, allowed=[" cat"])
    return b == lm.eos
""")
    res = model.run("enumerate", {"lm": LM})
    assert res.marginal() == {True: 1} and res.evidence == Fraction(3, 4)


def test_per_particle_allowed_sets():
    model = ppl.model("""
def m(lm):
    first ~ lm.next_token([])
    second ~ lm.next_token([first], allowed=lambda t: len(t) != len(first))
    return second
""")
    check_against_exact(model, {"lm": LM}, "importance")


def test_reward_model_is_one_batched_call():
    class CountingReward(ToyReward):
        calls = 0

        def score(self, prompts, texts):
            CountingReward.calls += 1
            return super().score(prompts, texts)

    rm = CountingReward()
    model, data = data_of("reward")
    model.run("smc", {**data, "rm": rm}, particles=300, seed=0)
    assert CountingReward.calls == 1


def test_prelude_models_and_decorator_binding():
    model = ppl.model("""
def m():
    lm = toy_lm()
    rm = toy_reward()
    text ~ lm.generate("", max_tokens=2)
    factor rm("", text)
    return word_count(text)
""")
    res = model.enumerate()
    assert set(res.marginal()) == {1, 2}

    @ppl.infer(method="enumerate")
    @ppl.model
    def steer(lm, rm, beta=1.0):
        """
        text ~ lm.generate("", max_tokens=2, allowed=lambda t: "e" not in t)
        factor rm("", text) / beta
        return text
        """
    assert steer(lm=LM, rm=RM).marginal() == pytest.approx(res_of("""
def m(lm, rm):
    text ~ lm.generate("", max_tokens=2)
    condition all(map(lambda w: "e" not in w, words(text)))
    factor rm("", text)
    return text
""", {"lm": LM, "rm": RM}))


def res_of(src, data):
    return {k: float(v) for k, v in ppl.model(src).run("enumerate", data).marginal().items()}


def test_string_helpers_per_particle():
    model = ppl.model("""
def m(lm):
    text ~ lm.generate("", max_tokens=3)
    return [startswith(text, " the"), endswith(text, "s"), word_count(text),
            regex_match(" (the|a) \\\\w+", text), regex_search("ca", text), contains(text, "dog"),
            "e" not in text, join(words(text), "_"), upper(strip(text))]
""")
    res = model.run("enumerate", {"lm": LM})
    for w, vals in res.paths:
        t = vals["text"]
        import re
        assert vals["return"] == (t.startswith(" the"), t.endswith("s"), len(t.split()),
                                  re.fullmatch(r" (the|a) \w+", t) is not None, "ca" in t, "dog" in t,
                                  "e" not in t, "_".join(t.split()), t.strip().upper())
    r = model.run("importance", {"lm": LM}, particles=200, seed=0)
    assert len(r.marginal()) > 5


# -------------------------------------------------------------------- (6) errors
def run_stmt(stmt, method="importance"):
    src = f"def m(lm, rm, s):\n    x = 3\n    {stmt}\n    return 1\n"
    return ppl.model(src).run(method, {"lm": LM, "rm": RM, "s": "gpt2"}, particles=2)


@pytest.mark.parametrize("stmt, message", [
    ("tok ~ lm.next_tokens([])", "a language model has no attribute 'next_tokens'"),
    ("tok ~ lm.lm.next_token([])", "a language model has no attribute 'lm'"),
    ("tok ~ lm.next_token([], temperature=-1)", "temperature must be a positive number"),
    ("tok ~ lm.next_token([], temperature=0)", "temperature must be a positive number"),
    ("tok ~ lm.next_token([], top_k=0)", "top_k must be a positive integer"),
    ("tok ~ lm.next_token([], top_p=1.5)", r"top_p must be in \(0, 1\]"),
    ("tok ~ lm.next_token([], temprature=2)", "has no argument 'temprature'"),
    ("tok ~ lm.next_token([], allowed=[])", "allowed= is empty"),
    ("tok ~ lm.next_token([], allowed=lambda t: False)", "allows no token"),
    ("tok ~ lm.next_token([], allowed=[' zebra'])", "is not a token"),
    ("tok ~ lm.next_token([], allowed='cat')", "not a string"),
    ("tok ~ lm.next_token([], allowed=lambda t: sample(flip(0.5)))", "must be deterministic|random choice"),
    ("tok ~ lm.next_token(3.5)", "a context must be a string or a list of tokens"),
    ("tok ~ lm.next_token('zebra')", "cannot encode"),
    ("tok ~ x.next_token([])", "number has no attribute 'next_token'"),
    ("tok ~ s.generate('')", "string has no attribute 'generate'"),
    ("tok ~ lm.generate('', max_tokens=0)", "max_tokens must be a positive integer"),
    ("tok ~ lm.generate('', stop=3)", "stop= must be"),
    ("factor s('a', 'b')", "string is not callable"),
    ("factor rm('a', 3)", "the text must be a string"),
])
def test_clear_errors(stmt, message):
    for method in ("importance", "enumerate"):
        with pytest.raises(PPLError, match=message) as err:
            run_stmt(stmt, method)
        assert err.value.span is not None and err.value.span.line == 3


def test_non_lm_hint_and_private_attributes():
    with pytest.raises(PPLError) as err:
        run_stmt("tok ~ x.next_token([])")
    assert "language model" in str(err.value)
    with pytest.raises(PPLError, match="not allowed"):
        ppl.model("def m(lm):\n    return lm._lm\n")


def test_mh_refuses_string_choices_clearly():
    with pytest.raises(PPLError, match="numeric random choices only"):
        ppl.model(NO_E_CONDITION).run("mh", {"lm": LM}, particles=2, samples=5, burn_in=0)


def test_binding_rejects_unknown_objects():
    with pytest.raises(PPLError, match="type a model cannot use"):
        ppl.model(NO_E_CONDITION).run("importance", {"lm": object()}, particles=2)


def test_generate_from_per_particle_prompts():
    model = ppl.model("""
def m(lm):
    first ~ lm.next_token([])
    text ~ lm.generate([first], max_tokens=2, allowed=lambda t: t != " tree")
    return first + text
""")
    check_against_exact(model, {"lm": LM}, "smc", resampling="systematic")


def test_observe_a_list_of_tokens_and_the_dsl_value_is_reused():
    from ppl.stdlib.lm.dsl import wrap
    model = ppl.model("""
def m(lm):
    observe [" the", " cat"] ~ lm.generate("", max_tokens=5)
    observe lm.encode("a cats") ~ lm.generate("", max_tokens=5)
    return 1
""")
    want = Fraction(1, 16) * (Fraction(1, 4) * Fraction(1, 4) * Fraction(1, 4) * Fraction(1, 2))
    assert model.run("enumerate", {"lm": LM}).evidence == want
    assert model.run("importance", {"lm": LM}, particles=2).log_evidence == pytest.approx(math.log(want), abs=1e-6)
    assert wrap(LM) is wrap(LM)  # its token, encoding and mask caches live as long as the model
