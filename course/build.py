"""Writes the course's notebooks (course/NN_name.ipynb) from the cells below, without outputs.

    python course/build.py

Each unit is a list of cells: a string starting with "md:" is a markdown cell, any other a
code cell. The notebooks are committed without outputs (small, reviewable diffs; CI executes
them: tests/test_course.py). Edit the cells here, not the .ipynb files, and rebuild.
"""
from __future__ import annotations

import pathlib

import nbformat

HERE = pathlib.Path(__file__).resolve().parent

SETUP = '''import os, pathlib, warnings
warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm without ipywidgets
# run from the repository root, wherever the notebook was opened
ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents] if (p / "examples").is_dir())
os.chdir(ROOT)
import json, math
from fractions import Fraction as F
import matplotlib.pyplot as plt
import numpy as np
import ppl
from course import solutions'''

UNITS: dict[str, list[str]] = {}

UNITS["01_generative_models"] = [
    """md:# 1. Generative models and the DSL

A *generative model* is a program that makes random choices. In ppl it is written in a small
Python-like language: `x ~ flip(0.5)` makes a random choice named `x`. Running the program many
times (*forward sampling*) shows the distribution it denotes.""",
    SETUP,
    """md:## A first model

`flip(p)` is True with probability p; `normal(mu, sd)` (a Gaussian) is a real number. A model is a
`def`; its parameters are the data.""",
    '''first = ppl.model("""
def first(p):
    a ~ flip(p)
    b ~ flip(p)
    x ~ normal(0, 1)
    return (1 if a else 0) + (1 if b else 0) + x
""")
prior = first.run("prior", {"p": 0.5}, particles=5000, seed=0)
print(prior.mean(), prior.sd())
plt.hist(prior.samples["return"], bins=60, density=True)
plt.title("forward samples of a + b + x"); plt.show()''',
    """md:## Models in cells: `%%ppl`

`%load_ext ppl` adds a cell magic: `%%ppl NAME` compiles the cell into a model bound to `NAME`
(an error points at its line in the cell). A model shows itself as its source, its random
choices and its graph.""",
    "%load_ext ppl",
    '''%%ppl coin
def coin(flips):
    p ~ beta(1, 1)
    for f in flips:
        observe f ~ flip(p)
    return p''',
    "coin      # the model: source, choices, graph (as HTML in Jupyter)",
    '''coin.run("importance", {"flips": [True, True, False]}, particles=4000, seed=0)''',
    """md:## Functions, recursion and `mem`

Helper functions are ordinary `def`s; a choice inside a function is addressed by the call
(`geometric/b`). `mem(f)` memoises a random function: the *same* argument gives the same random
value every time it is asked, a random *value* per argument (here: each person's eye colour).""",
    '''people = ppl.model("""
def geometric(p):
    b ~ flip(p)
    return 0 if b else 1 + geometric(p)

def people():
    eyes = mem(lambda person: sample(uniform_draw(["blue", "brown", "green"])))
    same = eyes("alice") == eyes("alice")       # always True: mem
    n = geometric(0.5)
    return [same, n]
""")
r = people.run("prior", {}, particles=4000, seed=1)
same = [v[0] for v in r.samples["return"]]
n = [v[1] for v in r.samples["return"]]
print("alice's eyes agree with themselves:", all(same))
plt.hist(n, bins=range(0, 12), density=True, rwidth=0.8)
plt.plot(range(12), [0.5 ** (k + 1) for k in range(12)], "o", label="(1/2)^(n+1)")
plt.legend(); plt.title("geometric(0.5): failures before a success"); plt.show()''',
    """md:## `print` inside a model

`print(...)` shows what a model does without changing any result: the first few particles of a
sampling run, every path (with its probability) of an exact enumeration.""",
    '''noisy = ppl.model("""
def noisy():
    a ~ flip(0.5)
    b ~ flip(0.5)
    print("a =", a, "b =", b)
    return a and b
""")
noisy.run("prior", {}, particles=100, seed=0);
noisy.run("enumerate", {}).probs("return")''',
    """md:## Exercises

1. Write `heads(n, p)`: the number of heads in `n` flips of a coin with bias `p`. Enumerate it
   for n = 3, p = 1/2 (use `F(1, 2)` for an exact answer): you should find 1/8, 3/8, 3/8, 1/8.
2. Forward-sample it with n = 10, p = 0.3 and 4000 particles. Is the sample mean within two
   standard errors (sd / sqrt(N)) of n p = 3?

Solutions: `course/solutions.py` (`unit01_*`); the next cell prints them.""",
    "solutions.show(1)",
]

UNITS["02_conditioning"] = [
    """md:# 2. Conditioning and exact enumeration

`observe v ~ d` says that the data `v` was drawn from `d` (it multiplies a run's weight by the
probability of `v`); `condition c` keeps only the runs where `c` holds. Inference asks: given the
observations, what is the distribution of the choices? For finite models `enumerate` answers
*exactly*, with fractions, by visiting every execution path.""",
    SETUP,
    '''medical = ppl.model("examples/medical.ppl")
print("def " + open("examples/medical.ppl").read().split("def ", 1)[1])
exact = medical.run("enumerate", {"test1": True, "test2": True})
exact.probs("disease"), exact.evidence''',
    """md:## Bayes' rule by hand

P(d | t1, t2) = P(d) P(t1 | d) P(t2 | d) / sum over d of the same. The enumeration did exactly
this sum over its paths; we redo it with fractions.""",
    '''# the model's numbers: prior 0.01; test1 positive with 0.9 (ill) or 0.08 (healthy), test2 0.8 or 0.05
prior, t1, t2 = F(1, 100), (F(9, 10), F(8, 100)), (F(8, 10), F(5, 100))
ill = prior * t1[0] * t2[0]
healthy = (1 - prior) * t1[1] * t2[1]
print("by hand: P(disease | +, +) =", ill / (ill + healthy), "  evidence =", ill + healthy)
print("paths of the enumeration (weight = prior x likelihood, unnormalised; disease):")
for weight, values in exact.paths:
    print("  ", weight, values["disease"])''',
    """md:## `condition`: rejection made exact

Two dice; we learn their sum is 7. `condition` removes every other path and renormalises.""",
    '''dice = ppl.model("""
def dice():
    a ~ uniform_draw([1, 2, 3, 4, 5, 6])
    b ~ uniform_draw([1, 2, 3, 4, 5, 6])
    condition a + b >= 10
    return a
""")
r = dice.run("enumerate", {})
print(r.probs("return"), "evidence", r.evidence)
plt.bar([str(k) for k in r.probs("return")], [float(v) for v in r.probs("return").values()])
plt.title("first die given a + b >= 10"); plt.show()''',
    """md:Sampling gets close to the same answer, with a Monte Carlo error:""",
    '''s = dice.run("importance", {}, particles=20000, seed=0)
print({k: round(v, 3) for k, v in sorted(s.marginal().items())}, "ESS", round(s.ess))''',
    """md:## Exercises

1. Two dice sum to 7. What is P(first die is 1)? (By hand: 1/6.)
2. A disease has prior 1/100; a test is positive with probability 9/10 if ill, 1/10 if not.
   Write the model with `observe positive ~ flip(...)`, enumerate it for a positive test, and
   compare with Bayes' rule by hand (1/12; evidence 27/250).""",
    "solutions.show(2)",
]

UNITS["03_causal_structure"] = [
    """md:# 3. Causal and statistical dependence

A model's code is a causal story: what is computed from what. ppl reads that structure:
`Model.graph` is the dependency graph of the random choices, `Model.draw` draws it,
`Model.independent` asks d-separation questions, `Model.markov_blanket` the blanket of a choice.
Independence in the graph is a claim about probabilities, which we check with `enumerate`.""",
    SETUP,
    '''alarm = ppl.model("""
def alarm(rings):
    burglary ~ flip(1/10)
    earthquake ~ flip(1/5)
    observe rings ~ flip(19/20 if burglary or earthquake else 1/100)
    return burglary
""")
data = {"rings": True}
g = alarm.graph(data)
print(sorted(g.edges()))
alarm.draw(data);''',
    """md:## Explaining away

Burglary and earthquake are independent causes; once the alarm rings (a common effect, a
*collider*) they become dependent: learning of an earthquake makes a burglary less likely.""",
    '''print("a priori independent:", alarm.independent("burglary", "earthquake", data=data, observed=False))
print("given the alarm:       ", alarm.independent("burglary", "earthquake", data=data, observed=True))
print("Markov blanket of burglary:", alarm.markov_blanket("burglary", data=data))''',
    '''joint = ppl.model("""
def joint(rings):
    burglary ~ flip(1/10)
    earthquake ~ flip(1/5)
    observe rings ~ flip(19/20 if burglary or earthquake else 1/100)
    return [burglary, earthquake]
""").run("enumerate", data).probs("return")
pb = sum(p for (b, e), p in joint.items() if b)
pe = sum(p for (b, e), p in joint.items() if e)
print("P(b | alarm) P(e | alarm) =", pb * pe, " P(b, e | alarm) =", joint[(True, True)])
print("P(b | alarm) =", pb, "  P(b | alarm, earthquake) =", joint[(True, True)] / pe)''',
    """md:## A chain: d-separation by an observed middle

In a hidden Markov model each state depends on the previous one. Given `z[1]`, `z[0]` tells
nothing more about `z[3]`; the plate (`z[t]`) is drawn as a box.""",
    '''hmm = ppl.model("examples/twisted_hmm.ppl")
hdata = {"ys": [0.1, 2.9, 3.2, -0.4]}
print(hmm.independent("z[0]", "z[3]", given=["z[1]"], data=hdata))
print(hmm.independent("z[0]", "z[3]", data=hdata))
hmm.draw(hdata);''',
    """md:## Exercises

1. With `Model.independent`, are burglary and earthquake independent a priori? Given the alarm?
   (Expect True, False.)
2. Compute P(burglary | alarm) and P(burglary | alarm, earthquake) exactly (add
   `condition earthquake`). By hand: 475/1366 and 1/10.""",
    "solutions.show(3)",
]

UNITS["04_hierarchical_workflow"] = [
    """md:# 4. Hierarchical models and the Bayesian workflow

Eight schools: each school's effect `theta[j]` is drawn from a population `normal(mu, tau)`.
Written *non-centred* (`theta = mu + tau * theta_tilde`) it suits NUTS. The workflow: run,
read the diagnostics (R-hat near 1, ESS large, no divergences), look at the traces, check that
the model can reproduce the data (predictive checks), compare models (LOO).""",
    SETUP + "\nimport arviz as az",
    '''es = ppl.model("examples/eight_schools.ppl")
data = json.load(open("examples/eight_schools.json"))
es''',
    """md:Its joint log density, as sympy reads it from the program (`Model.latex`, `Model.density`):""",
    '''from IPython.display import Math
Math(es.latex(data))''',
    '''r = es.run("nuts", data, particles=2, samples=200, burn_in=200, seed=0, progress=False)
print(r.summary())
print("split R-hat of tau:", round(r.r_hat["tau"], 3), " ESS of tau:", round(r.ess_per_site["tau"]))''',
    """md:## ArviZ: traces

`result.to_arviz()` is an `InferenceData`: the posterior with (chain, draw) dimensions, the
sampler's statistics and the pointwise log likelihood.""",
    '''idata = r.to_arviz()
az.plot_trace(idata, var_names=["mu", "tau"]); plt.tight_layout(); plt.show()''',
    """md:## Posterior predictive check

`model.predictive(result)` replays each posterior draw and draws fresh data `y` in place of
the observed one. If the observed statistic sits in the tail of the replicated ones, the model
misses something.""",
    '''pred = es.predictive(r)
print("replicated y:", pred["y"].shape, " p-values:",
      {s: round(pred.p_value(s), 2) for s in ("mean", "sd", "max")})
pred.plot(stat=("mean", "sd", "max")); plt.show()''',
    """md:## Model comparison with LOO

Complete pooling (one effect for all schools) against the hierarchical model.""",
    '''pooled = ppl.model("""
def pooled(y, sigma):
    mu ~ normal(0, 5)
    observe y ~ normal(mu + zeros(len(y)), sigma)
    return mu
""")
rp = pooled.run("nuts", data, particles=2, samples=200, burn_in=200, seed=0, progress=False)
import warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")     # Pareto k warnings: 8 points, see the table
    print(az.compare({"hierarchical": idata, "pooled": rp.to_arviz()}))''',
    """md:## Exercises

1. A coin with a Beta(2, 2) prior shows 7 heads and 3 tails. Give the exact posterior mean
   (conjugacy: Beta(9, 5), mean 9/14).
2. Run NUTS on the coin model and check that its posterior mean is within ~3 Monte Carlo
   standard errors (sd / sqrt(ESS)) of 9/14.""",
    "solutions.show(4)",
]

UNITS["05_mixtures_marginalisation"] = [
    """md:# 5. Mixtures and marginalisation

A mixture draws a discrete assignment `z[i]` per data point. Sampling the assignments makes
importance sampling's weights very uneven; *summing them out* (each `z[i]` carried with all its
values at once) leaves only the continuous parameters to sample. In ppl: `enumerate=["z"]` as
an option, or `z ~ flip(w) @enumerate` in the model.""",
    SETUP,
    '''mix = ppl.model("examples/mixture.ppl")
data = json.load(open("examples/mixture.json"))
sampled = mix.run("importance", data, particles=20000, seed=0)
summed = mix.run("importance", data, particles=20000, seed=0, enumerate=["z"])
print("ESS with z sampled:", round(sampled.ess), "  with z summed out:", round(summed.ess))
print("mu1", round(summed.mean("mu1"), 3), "(grid: -2.6004)  mu2", round(summed.mean("mu2"), 3), "(grid: 1.3281)")
print("P(z[4]) =", round(summed.mean("z[4]"), 3), "(grid: 0.9397)")''',
    '''fig, ax = plt.subplots(1, 2, figsize=(9, 3))
for a, res, title in [(ax[0], sampled, "z sampled"), (ax[1], summed, "z summed out")]:
    a.hist(np.asarray(res.samples["mu1"]), weights=res.weights.numpy(), bins=50, range=(-5, 1))
    a.set_title(f"{title}: ESS {res.ess:.0f}"); a.set_xlabel("mu1")
plt.show()''',
    """md:The same with `@enumerate` written in the model (`examples/mixture_enumerated.ppl`):""",
    '''print(open("examples/mixture_enumerated.ppl").read().split("def ", 1)[1])
me = ppl.model("examples/mixture_enumerated.ppl")
res = me.run("importance", json.load(open("examples/mixture_enumerated.json")), particles=20000, seed=0)
print("mu1", round(res.mean("mu1"), 3), " ESS", round(res.ess))''',
    """md:## Continuous marginalisation: the Kalman filter

`delayed=True` keeps a Gaussian choice as a distribution until its value is needed; every
observation of a linear-Gaussian state-space model then adds its exact predictive density. SMC
with *one* particle is the Kalman filter: the log evidence is exact.""",
    '''lg = ppl.model("examples/lgssm.ppl")
ldata = json.load(open("examples/lgssm.json"))
kalman = lg.run("smc", ldata, particles=1, delayed=True, seed=0)
boot = lg.run("smc", ldata, particles=1000, seed=0)
print("log evidence: delayed, 1 particle", round(kalman.log_evidence, 4), "(Kalman: -166.8099)")
print("              bootstrap, 1000 particles", round(boot.log_evidence, 4))''',
    """md:## Exercises

1. Two clusters at -2 and 2 (sd 1), prior w = 0.3 on the left one; a point y = 0.5. Compute
   P(left | y) by hand and by `enumerate` (0.0548).
2. Write the model with `z ~ flip(w) @enumerate` and run importance with 8 particles: its
   evidence equals w N(y; -2, 1) + (1 - w) N(y; 2, 1) exactly. Why does any particle count do?""",
    "solutions.show(5)",
]

UNITS["06_sampling_at_work"] = [
    """md:# 6. Importance sampling, SMC and MH at work

* Importance sampling draws from the prior and weights by the likelihood: its quality is the
  *effective sample size* ESS = 1 / sum w_i^2 of the normalised weights.
* SMC reweights at each observation and *resamples* when the ESS falls, so weights never
  degenerate over a long series.
* MH walks a Markov chain: look at the chains (do they mix? do several agree, R-hat?).""",
    SETUP,
    '''coin = ppl.model(solutions.COIN)
flips = solutions.COIN_FLIPS
is_run = coin.run("importance", {"flips": flips}, particles=2000, seed=0)
w = is_run.weights.numpy()
fig, ax = plt.subplots(1, 2, figsize=(9, 3))
ax[0].scatter(np.asarray(is_run.samples["p"]), w, s=3); ax[0].set_xlabel("p"); ax[0].set_ylabel("weight")
ax[1].hist(np.asarray(is_run.samples["p"]), weights=w, bins=40, density=True)
xs = np.linspace(0, 1, 200)
ax[1].plot(xs, xs ** 8 * (1 - xs) ** 4 / math.exp(math.lgamma(9) + math.lgamma(5) - math.lgamma(14)), label="Beta(9, 5)")
ax[1].legend(); plt.show()
print("ESS", round(is_run.ess), "of", is_run.n, "  log evidence", round(is_run.log_evidence, 4),
      "(exact", round(solutions.unit06_coin_evidence_exact(), 4), ")")''',
    """md:## SMC on a state-space model

The ESS history of SMC on 25 observations: it drops at each observation and is restored by
resampling (every step here; with `ess_threshold=0.5` only when it falls below N/2).""",
    '''ss = ppl.model("examples/state_space.ppl")
sdata = json.load(open("examples/state_space.json"))
fig, ax = plt.subplots(figsize=(10, 3))
for thr in (1.0, 0.5):
    res = ss.run("smc", sdata, particles=500, seed=0, ess_threshold=thr)
    hist = res.extra["history"]
    ax.plot([h.ess for h in hist], marker="o", ms=3, label=f"ess_threshold={thr}: log Z {res.log_evidence:.2f}")
    marks = [i for i, h in enumerate(hist) if h.resampled]
    if thr < 1:
        ax.plot(marks, [hist[i].ess for i in marks], "kx", ms=9, label="resampled (threshold 0.5)")
    print(f"threshold {thr}: resampled at {len(marks)} of {len(hist)} steps")
ax.set_xlabel("observation"); ax.set_ylabel("ESS before resampling"); ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
ax.set_title("SMC, 500 particles, state-space model (Kalman: log Z = -43.08)"); fig.tight_layout()
plt.savefig("docs/course_smc.png", dpi=80) if os.environ.get("COURSE_SAVE_FIGURES") else None
plt.show()
print("Kalman filter: log evidence -43.0751")''',
    """md:## MH chains

Random-walk MH on the coin, 4 chains: the traces of `p`, the autocorrelation that makes the
ESS smaller than the number of draws, and the split R-hat (near 1 when the chains agree).""",
    '''mh = coin.run("mh", {"flips": flips}, particles=4, kernel="rw", scale=1.5, samples=500, burn_in=100,
              seed=0, progress=False)
trace = np.asarray(mh.samples["p"]).reshape(mh.chains, mh.draws)
fig, ax = plt.subplots(1, 2, figsize=(10, 3))
for c in range(mh.chains):
    ax[0].plot(trace[c], lw=0.6, label=f"chain {c}")
ax[0].set_ylabel("p"); ax[0].set_xlabel("draw"); ax[0].legend(fontsize=7)
lags = range(30)
ax[1].plot(lags, [np.corrcoef(trace[0][:-k or None], trace[0][k:])[0, 1] if k else 1.0 for k in lags], "o-")
ax[1].set_xlabel("lag"); ax[1].set_title("autocorrelation, chain 0"); plt.show()
print("acceptance", round(mh.acceptance_rate, 2), " R-hat(p)", round(mh.r_hat["p"], 3),
      " ESS(p)", round(mh.ess_per_site["p"]), "of", mh.chains * mh.draws, " mean", round(mh.mean("p"), 3), "(exact 9/14 = 0.643)")''',
    """md:## Exercises

1. Write the ESS of a set of log weights, (sum w)^2 / sum w^2, and check it against
   `is_run.ess` above.
2. The coin's exact log evidence is log B(9, 5) - log B(2, 2) (for this order of flips). Is
   importance sampling's estimate with 20000 particles within a few hundredths of it?""",
    '''print("your ESS:", round(solutions.unit06_ess(is_run.log_weights.tolist()), 3), " ppl's:", round(is_run.ess, 3))
solutions.show(6)''',
]

UNITS["07_nested_inference"] = [
    """md:# 7. Nested inference: models about models

A speaker chooses words by reasoning about how a listener would *infer* the meaning. In ppl,
`infer(lambda: ...)` inside a model is the distribution of that inner program's result (WebPPL's
`Infer`), usable with `~`, `observe` and `.prob(x)`. With the default `method="enumerate"` it is
exact, so the whole model stays exact.""",
    SETUP,
    """md:## Scalar implicature (rational speech acts)

Three apples; "some" is literally true of 1, 2 or 3 eaten. The literal listener L0 believes the
literal meaning; the speaker S1 picks words in proportion to how likely L0 gets the state right;
the pragmatic listener L1 reasons about S1.""",
    '''print(open("examples/rsa.ppl").read().split("def meaning", 1)[1].join(["def meaning", ""]))''',
    '''rsa = ppl.model("examples/rsa.ppl")
L1 = rsa.run("enumerate", {"utt": "some"})
print("L1(state | some):", L1.probs("return"), "evidence", L1.evidence)
levels = ppl.model(open("examples/rsa.ppl").read() + """
def levels(state):
    L0 = infer(lambda: literal_listener("some"))
    S1 = infer(lambda: speaker(state, lambda u: infer(lambda: literal_listener(u))))
    return [L0.prob(state), S1.prob("some")]
""", entry="levels")
table = {s: levels.run("enumerate", {"state": s}).paths[0][1]["return"] for s in range(4)}
for s, (l0, s1) in table.items():
    print(f"state {s}: L0(s | some) = {l0}   S1(some | s) = {s1}")''',
    '''states = list(range(4))
plt.bar(np.array(states) - 0.2, [float(table[s][0]) for s in states], 0.4, label="literal L0(s | some)")
plt.bar(np.array(states) + 0.2, [float(L1.probs("return").get(s, 0)) for s in states], 0.4, label="pragmatic L1(s | some)")
plt.xlabel("apples eaten"); plt.legend(); plt.title('"some" implies "not all"'); plt.show()''',
    """md:## Goal inference

An agent acts to reach its goal; an observer infers the goal from the action. The agent's
choice is itself an inference (which action makes the goal likely).""",
    '''goals = ppl.model("""
def outcome(action):
    got_apple ~ flip(0.9 if action == "left" else 0.3)
    return "apple" if got_apple else "banana"

def act(goal):
    action ~ uniform_draw(["left", "right"])
    condition outcome(action) == goal
    return action

def observer(action):
    goal ~ categorical([0.3, 0.7])
    goal_name = ["apple", "banana"][goal]
    observe action ~ infer(lambda: act(goal_name))
    return goal_name
""")
for a in ("left", "right"):
    print(a, goals.run("enumerate", {"action": a}).marginal())''',
    """md:## Exercises

1. Two apples (states 0, 1, 2; "all" means 2). Compute the pragmatic listener's
   L1(state | "some") by hand and with `infer`: (0, 3/4, 1/4).
2. (Open) Add a speaker rationality `alpha` with `factor alpha * L0(utt).log_prob(state)` instead
   of `observe`. What happens to P(3 | some) as alpha grows?""",
    "solutions.show(7)",
]

UNITS["08_steering_language_models"] = [
    """md:# 8. Steering a language model with SMC

A language model is a distribution over token sequences: a generative model. Constraints and
rewards turn it into a *posterior* over texts, and SMC samples it token by token. Here the LM is
ppl's exact toy bigram model (`ppl.stdlib.lm.ToyLM`: a table of fractions, nothing downloaded),
so enumeration gives the exact answer to compare with.""",
    SETUP + "\nfrom ppl.stdlib.lm import ToyLM\nlm = ToyLM()",
    '''from ppl.stdlib.lm.toy import DEFAULT_TABLE      # P(next token | last token), exact fractions
for last, row in DEFAULT_TABLE.items():
    print(f"{last!r:>8} -> " + ", ".join(f"{t!r}: {p}" for t, p in row.items()))''',
    """md:## A lipogram: no letter 'e'

`tok ~ lm.next_token(toks, allowed=no_e)` draws a token from the LM restricted to allowed
tokens: the same measure as drawing it and then `condition no_e(tok)`. The evidence Z is the
LM's probability of a text without 'e'.""",
    '''LIPO = """
def no_e(tok):
    return len(tok) > 0 and "e" not in lower(tok)

def lipogram(lm, T):
    toks = []
    for t in range(T):
        tok ~ lm.next_token(toks, allowed=no_e)
        toks = toks + [tok]
    return join(toks)
"""
lipo = ppl.model(LIPO, entry="lipogram")
data = {"lm": lm, "T": 3}
exact = lipo.run("enumerate", data)
post = exact.probs("return")
print("Z = P(no 'e' in 3 tokens) =", exact.evidence)
for text, p in sorted(post.items(), key=lambda kv: -kv[1])[:5]:
    print(f"  {float(p):.4f} {text!r}")''',
    '''ratios = []
for seed in range(20):
    res = lipo.run("smc", data, particles=50, seed=seed)
    ratios.append(math.exp(res.log_evidence) / float(exact.evidence))
print(f"SMC Z_hat / Z over 20 runs: {np.mean(ratios):.3f} +- {np.std(ratios) / math.sqrt(20):.3f} (unbiased: 1)")
smc = lipo.run("smc", data, particles=2000, seed=0)
texts = sorted(post, key=lambda t: -post[t])[:6]
plt.barh(range(6), [float(post[t]) for t in texts], 0.4, label="exact")
plt.barh(np.arange(6) + 0.4, [smc.marginal().get(t, 0) for t in texts], 0.4, label="SMC, 2000 particles")
plt.yticks(np.arange(6) + 0.2, [repr(t) for t in texts]); plt.legend(); plt.show()''',
    """md:## Reward-tilted generation

`factor r(text) / beta` tilts the LM towards texts with a high reward: the target is
p_LM(y) exp(r(y) / beta). `ToyReward` scores the words (cat +1, cats +2, dog -1, ...).""",
    '''from ppl.stdlib.lm import ToyReward
TILT = """
def tilted(lm, rm, T, beta):
    toks = []
    for t in range(T):
        tok ~ lm.next_token(toks)
        toks = toks + [tok]
    text = join(toks)
    factor rm("", text) / beta
    return text
"""
tilt = ppl.model(TILT)
tdata = {"lm": lm, "rm": ToyReward(), "T": 3, "beta": 0.5}
rm = ToyReward()
for method, kw in [("enumerate", {}), ("smc", {"particles": 1000, "seed": 0})]:
    res = tilt.run(method, tdata, **kw)
    top = sorted(res.marginal().items(), key=lambda kv: -kv[1])[:3]
    print(method, [(t, round(float(p), 3)) for t, p in top])''',
    """md:## Exercises

1. With the toy LM, what is P(first token is " the" | the second token is " cat")? Write it with
   `observe second ~ lm.next_token([first])` and enumerate; by hand from the table: 4/5.
2. (Open) Raise `T` in the lipogram: how does Z shrink, and how does the spread of SMC's Z_hat
   with 50 particles change?""",
    "solutions.show(8)",
]


def cell(text: str):
    """A markdown cell for text starting with "md:", else a code cell."""
    if text.startswith("md:"):
        return nbformat.v4.new_markdown_cell(text[3:].lstrip("\n"))
    return nbformat.v4.new_code_cell(text)


def notebook(cells: list[str]):
    nb = nbformat.v4.new_notebook(cells=[cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def paths() -> list[pathlib.Path]:
    """The notebooks, in course order."""
    return [HERE / f"{name}.ipynb" for name in UNITS]


def main() -> None:
    for name, cells in UNITS.items():
        nb = notebook(cells)
        for i, c in enumerate(nb.cells):
            c["id"] = f"{name[:2]}-{i:02d}"         # stable ids: rebuilding gives the same files
        nbformat.write(nb, HERE / f"{name}.ipynb")
        print("wrote", HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
