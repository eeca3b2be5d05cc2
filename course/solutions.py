"""Solutions to the course's exercises, one function per exercise (``unitNN_name``).

Each function answers its exercise with ppl and returns the answer; ``tests/test_course.py``
checks every answer against the exact value worked out by hand (written in the function's
docstring). A notebook's last cell calls ``show(N)`` to print unit N's answers.
"""
from __future__ import annotations

import math
from fractions import Fraction as F

import ppl


# ----------------------------------------------------------------- 01 generative models
HEADS = '''
def heads(n, p):
    k = 0
    for i in range(n):
        c ~ flip(p)
        k = k + (1 if c else 0)
    return k
'''


def unit01_heads():
    """The number of heads in 3 fair flips: by hand (3 choose k) / 8 = 1/8, 3/8, 3/8, 1/8."""
    return ppl.model(HEADS).run("enumerate", {"n": 3, "p": F(1, 2)}).probs("return")


def unit01_sampled_mean(particles: int = 4000, seed: int = 0):
    """Forward sampling of the same model (p = 0.3, n = 10): (sample mean, its standard error).
    Exact mean n p = 3."""
    res = ppl.model(HEADS).run("prior", {"n": 10, "p": 0.3}, particles=particles, seed=seed)
    return res.mean(), res.sd() / math.sqrt(particles)


# ----------------------------------------------------------------- 02 conditioning
DICE = '''
def dice():
    a ~ uniform_draw([1, 2, 3, 4, 5, 6])
    b ~ uniform_draw([1, 2, 3, 4, 5, 6])
    condition a + b == 7
    return a == 1
'''

TEST = '''
def diagnose(positive):
    ill ~ flip(1/100)
    observe positive ~ flip(9/10 if ill else 1/10)
    return ill
'''


def unit02_dice():
    """P(first die is 1 | the two dice sum to 7) = 1/6 (six equally likely pairs)."""
    return ppl.model(DICE).run("enumerate", {}).probs("return")[True]


def unit02_test():
    """P(ill | positive) with prior 1/100, sensitivity 9/10, false positives 1/10:
    (9/1000) / (9/1000 + 99/1000) = 1/12; the evidence P(positive) = 108/1000 = 27/250."""
    r = ppl.model(TEST).run("enumerate", {"positive": True})
    return r.probs("return")[True], r.evidence


# ----------------------------------------------------------------- 03 causal structure
ALARM = '''
def alarm(rings):
    burglary ~ flip(1/10)
    earthquake ~ flip(1/5)
    observe rings ~ flip(19/20 if burglary or earthquake else 1/100)
    return burglary
'''

ALARM_KNOWN_QUAKE = '''
def alarm_quake(rings):
    burglary ~ flip(1/10)
    earthquake ~ flip(1/5)
    condition earthquake
    observe rings ~ flip(19/20 if burglary or earthquake else 1/100)
    return burglary
'''


def unit03_independence():
    """(burglary and earthquake independent a priori, independent given the alarm):
    (True, False) -- a collider. Asked of the graph with observed=False (no alarm) and
    observed=True (the alarm's observation in the conditioning set)."""
    m = ppl.model(ALARM)
    data = {"rings": True}
    return (m.independent("burglary", "earthquake", data=data, observed=False),
            m.independent("burglary", "earthquake", data=data, observed=True))


def unit03_explaining_away():
    """P(burglary | alarm) and P(burglary | alarm, earthquake).
    By hand: P(b, alarm) = 1/10 * 19/20 = 19/200; P(not b, alarm) = 9/10 (1/5 * 19/20 + 4/5 * 1/100)
    = 9/10 * 99/500 = 891/5000, so P(b | alarm) = 475 / (475 + 891) = 475/1366.
    Given the earthquake the alarm rings with 19/20 either way: P(b | alarm, quake) = 1/10."""
    alarm = ppl.model(ALARM).run("enumerate", {"rings": True}).probs("return")[True]
    quake = ppl.model(ALARM_KNOWN_QUAKE).run("enumerate", {"rings": True}).probs("return")[True]
    return alarm, quake


# ----------------------------------------------------------------- 04 workflow
COIN = '''
def coin(flips):
    p ~ beta(2, 2)
    for f in flips:
        observe f ~ flip(p)
    return p
'''
COIN_FLIPS = [True] * 7 + [False] * 3


def unit04_exact_coin():
    """Beta(2, 2) prior, 7 heads and 3 tails: the posterior is Beta(9, 5), mean 9/14."""
    return F(2 + 7, 2 + 7 + 2 + 3)


def unit04_nuts_coin(seed: int = 0):
    """NUTS on the coin: (posterior mean of p, its Monte Carlo standard error sd / sqrt(ESS))."""
    r = ppl.model(COIN).run("nuts", {"flips": COIN_FLIPS}, particles=4, samples=250, burn_in=200, seed=seed,
                            progress=False)
    return r.mean("p"), r.sd("p") / math.sqrt(r.ess_per_site["p"])


# ----------------------------------------------------------------- 05 marginalisation
TWO_CLUSTERS = '''
def cluster(y, w):
    z ~ flip(w) @enumerate
    observe y ~ normal(-2 if z else 2, 1)
    return z
'''


def unit05_cluster_closed_form(y: float = 0.5, w: float = 0.3):
    """P(z | y) for a point y between clusters at -2 and 2 (sd 1), prior w on the left one:
    w N(y; -2, 1) / (w N(y; -2, 1) + (1 - w) N(y; 2, 1)) = w e^{-2y} / (w e^{-2y} + (1 - w) e^{2y})."""
    left, right = w * math.exp(-2 * y), (1 - w) * math.exp(2 * y)
    return left / (left + right)


def unit05_cluster(y: float = 0.5, w: float = 0.3):
    """The same by exact enumeration of z (the normal density is a float, so the answer is one)."""
    return ppl.model(TWO_CLUSTERS).run("enumerate", {"y": y, "w": w}).probs("return")[True]


def unit05_evidence_closed_form(y: float = 0.5, w: float = 0.3):
    """p(y) = w N(y; -2, 1) + (1 - w) N(y; 2, 1)."""
    def phi(x):
        return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    return w * phi(y + 2) + (1 - w) * phi(y - 2)


def unit05_evidence_summed_out(y: float = 0.5, w: float = 0.3):
    """Importance sampling with z summed out (@enumerate): nothing is left to sample, so its
    evidence is exact with any number of particles (8 here)."""
    r = ppl.model(TWO_CLUSTERS).run("importance", {"y": y, "w": w}, particles=8, seed=0)
    return math.exp(r.log_evidence)


# ----------------------------------------------------------------- 06 sampling at work
def unit06_ess(log_weights):
    """Kish's effective sample size of normalised weights: (sum w)^2 / sum w^2."""
    top = max(log_weights)
    w = [math.exp(v - top) for v in log_weights]
    return sum(w) ** 2 / sum(x * x for x in w)


def unit06_coin_evidence_exact():
    """log p(7 heads, 3 tails in that order) under a Beta(2, 2) prior = log B(9, 5) - log B(2, 2)."""
    def log_beta(a, b):
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return log_beta(9, 5) - log_beta(2, 2)


def unit06_coin_evidence_is(particles: int = 20000, seed: int = 0):
    """Importance sampling's log evidence for the coin (and the run, for its ESS)."""
    return ppl.model(COIN).run("importance", {"flips": COIN_FLIPS}, particles=particles, seed=seed)


# ----------------------------------------------------------------- 07 nested inference
RSA_TWO = '''
def meaning(utt, state):
    if utt == "none":
        return state == 0
    if utt == "some":
        return state > 0
    return state == 2

def literal_listener(utt):
    state ~ uniform_draw([0, 1, 2])
    condition meaning(utt, state)
    return state

def speaker(state):
    utt ~ uniform_draw(["none", "some", "all"])
    observe state ~ infer(lambda: literal_listener(utt))
    return utt

def pragmatic_listener(utt):
    state ~ uniform_draw([0, 1, 2])
    observe utt ~ infer(lambda: speaker(state))
    return state
'''


def unit07_two_apples():
    """Two apples, states 0, 1, 2. L0(. | some) = uniform on {1, 2}, L0(2 | all) = 1.
    S1(some | 1) = 1; S1(some | 2) = (1/2) / (1/2 + 1) = 1/3; L1(. | some) ∝ (0, 1, 1/3):
    P(1 | some) = 3/4, P(2 | some) = 1/4."""
    return ppl.model(RSA_TWO, entry="pragmatic_listener").run("enumerate", {"utt": "some"}).probs("return")


# ----------------------------------------------------------------- 08 language models
FIRST_WORD = '''
def two_tokens(lm, second):
    first ~ lm.next_token([])
    observe second ~ lm.next_token([first])
    return first
'''


def unit08_first_word():
    """Toy bigram LM: P(first = " the" | second = " cat").
    P(the) P(cat | the) = 1/2 * 1/2 = 1/4; P(a) P(cat | a) = 1/4 * 1/4 = 1/16; no other first
    token is followed by " cat". So 1/4 / (1/4 + 1/16) = 4/5."""
    from ppl.stdlib.lm import ToyLM
    r = ppl.model(FIRST_WORD).run("enumerate", {"lm": ToyLM(), "second": " cat"})
    return r.probs("return")[" the"]


# ----------------------------------------------------------------- show
ANSWERS = {
    1: [unit01_heads, unit01_sampled_mean],
    2: [unit02_dice, unit02_test],
    3: [unit03_independence, unit03_explaining_away],
    4: [unit04_exact_coin, unit04_nuts_coin],
    5: [unit05_cluster_closed_form, unit05_cluster, unit05_evidence_closed_form, unit05_evidence_summed_out],
    6: [unit06_coin_evidence_exact, lambda: unit06_coin_evidence_is().log_evidence],
    7: [unit07_two_apples],
    8: [unit08_first_word],
}


def show(unit: int) -> None:
    """Print each exercise's solution for a unit (run at the end of its notebook)."""
    for fn in ANSWERS[unit]:
        name = getattr(fn, "__name__", "")
        print(f"{name if name != '<lambda>' else 'answer'}: {fn()}")
