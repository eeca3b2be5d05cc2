"""Reward-tilted generation: ``factor rm(prompt, text) / beta`` after ``lm.generate``.

    python examples/lm_reward.py            # ~10 s (+ ~15 s once to train the small LM)
    python examples/lm_reward.py --quick    # a few seconds

The model (DSL, below) generates a completion and multiplies its weight by
exp(r(prompt, y) / beta). Its normalised target is the reward-tilted LM

    pi(y) = p_LM(y) exp(r(y) / beta) / Z,      Z = E_{p_LM}[exp(r(y) / beta)],

which is what RLHF's KL-regularised objective max E_pi[r] - beta KL(pi || p_LM) is
maximised by: a distribution, not the single best text (compare best-of-N in
``lm_best_of_n.py``). Importance sampling with the LM as proposal weights each of N
completions by exp(r / beta): the weighted particles estimate pi, their mean weight Z.

Reward models (both need no download):
* toy LM: ``ToyReward``, the word-score table made for the toy vocabulary ("cats" +2,
  "cat" +1, "dog" -1, ...), so that enumeration gives the exact tilted distribution;
* small LM: ``KeywordReward`` (``ppl.stdlib.lm.rewards``): +1 per occurrence of each of
  "return", "value", "list", "string", "object" as a whole word, case-insensitive: a
  lexical scorer, deterministic and offline, whose value you can check by reading the
  text. A learned reward model (``HFRewardModel``) plugs in the same way.

1. Toy LM, 3 tokens, beta = 0.5 (exact): Z = 11.6176; E_p[r] = 0.4043 under the LM
   and E_pi[r] = 1.7574 under the tilt (top text ' the cats': 0.0625 -> 0.2937);
   importance sampling's estimates of E_pi[r] and of Z within ~2 SE of exact (e.g.
   "1.756 +- 0.013", "Z_hat / Z = 0.987 +- 0.024").
2. Small LM, prompt "Return the ", 40 characters, beta = 0.5, N = 512: expect a mean
   reward of ~0.18 +- 0.01 for untilted samples and ~1.1 +- 0.08 for the tilted
   distribution (a difference of > 5 SE, ~12), an ESS of ~60 of 512; the heaviest
   tilted texts contain the keywords (e.g. 'object is a dict of trier an object moun').
"""
from __future__ import annotations

import math

from lm_common import (banner, exact_measure, mean_se, one_draw, parse, parser, pm, show_texts,
                       small_lm, Timer, weighted_mean_se)

import ppl  # noqa: E402
from ppl.stdlib.lm import ToyLM, ToyReward  # noqa: E402
from ppl.stdlib.lm.rewards import KeywordReward  # noqa: E402

SOURCE = '''
def tilted(lm, rm, prompt, T, beta):
    text ~ lm.generate(prompt, max_tokens=T)
    factor rm(prompt, text) / beta
    return text

def untilted(lm, prompt, T):
    text ~ lm.generate(prompt, max_tokens=T)
    return text
'''

KEYWORDS = ["return", "value", "list", "string", "object"]


def toy_part(args) -> dict:
    beta, T = args.beta, 3
    banner(f"1. toy LM and ToyReward, {T} tokens, beta = {beta}: exact tilt vs importance sampling")
    lm, rm = ToyLM(), ToyReward()
    data = {"lm": lm, "rm": rm, "prompt": "", "T": T, "beta": beta}
    model = ppl.model(SOURCE, entry="tilted")
    tilt = exact_measure(model, data)
    prior = exact_measure(ppl.model(SOURCE, entry="untilted"), {"lm": lm, "prompt": "", "T": T})
    Z = float(sum(tilt.values()))
    e_prior = sum(float(p) * rm.score_one(y) for y, p in prior.items())
    e_tilt = sum(float(w) * rm.score_one(y) for y, w in tilt.items()) / Z
    print(f"exact: Z = E_p[exp(r/beta)] = {Z:.6f} (log Z = {math.log(Z):.4f}); "
          f"E_p[r] = {e_prior:.4f} (LM), E_pi[r] = {e_tilt:.4f} (tilted)")
    print("exact tilted distribution, top 4 (LM probability -> tilted):")
    for y, w in sorted(tilt.items(), key=lambda kv: -kv[1])[:4]:
        print(f"  {float(prior[y]):.4f} -> {float(w) / Z:.4f}  {y!r}  (r = {rm.score_one(y):+.2f})")
    ests, ratios = [], []
    with Timer() as tm:
        for r in range(args.reps):
            res = model.run("importance", data, particles=args.particles, seed=args.seed + r)
            ests.append(weighted_mean_se([rm.score_one(y) for y in res.samples["return"]], res.weights)[0])
            ratios.append(math.exp(res.log_evidence) / Z)
    em, ese = mean_se(ests)
    rm_, rse = mean_se(ratios)
    print(f"importance sampling, N={args.particles}, {args.reps} replicates ({tm.s / args.reps * 1e3:.0f} ms each):")
    print(f"  E_pi[r] estimate {pm(em, ese)} vs exact {e_tilt:.4f} ({_in_se(em - e_tilt, ese)} SE; "
          f"self-normalised, so biased by O(1/N))")
    print(f"  Z_hat / Z = {pm(rm_, rse)} ({_in_se(rm_ - 1, rse)} SE from 1)")
    return {"Z": Z, "e_prior": e_prior, "e_tilt": e_tilt, "est": em, "est_se": ese, "ratio": rm_, "ratio_se": rse}


def _in_se(diff: float, se: float) -> str:
    return f"{abs(diff) / se:.1f}" if se > 0 else "n/a"


def small_part(args) -> dict:
    beta, T, n = args.beta, args.tokens, args.particles
    banner(f"2. small LM and KeywordReward{tuple(KEYWORDS)}, {T} characters, beta = {beta}")
    lm = small_lm(args)
    rm = KeywordReward(KEYWORDS)
    data = {"lm": lm, "rm": rm, "prompt": args.prompt, "T": T, "beta": beta}
    model = ppl.model(SOURCE, entry="tilted")
    ests, esss, log_zs, outputs, prior_r = [], [], [], [], []
    with Timer() as tm:
        for r in range(args.reps):
            res = model.run("importance", data, particles=n, seed=args.seed + r)
            rs = [rm.score_one(y) for y in res.samples["return"]]
            prior_r += rs  # the proposals are untilted LM samples
            ests.append(weighted_mean_se(rs, res.weights)[0])
            esss.append(res.ess)
            log_zs.append(res.log_evidence)
            outputs.append(str(one_draw(res, args.seed + r)))
            if r == 0:
                print(f"importance sampling, N={n}: the heaviest texts of the first run (share of the weight):")
                show_texts(res.samples["return"], res.weights.tolist())
    pm_, pse = mean_se(prior_r)
    tm_, tse = mean_se(ests)
    se = math.sqrt(pse ** 2 + tse ** 2)
    diff = (tm_ - pm_) / se if se > 0 else float("nan")  # nan: too few distinct values for an SE
    print(f"{args.reps} replicates ({tm.s / args.reps:.2f} s each); ESS {mean_se(esss)[0]:.0f} of {n} on average")
    print(f"  mean reward, untilted LM samples ({len(prior_r)}): {pm(pm_, pse)}")
    print(f"  mean reward, tilted (E_pi[r] estimate, mean over replicates): {pm(tm_, tse)}   "
          f"difference {diff:.1f} SE")
    print(f"  log Z_hat = log E_p[exp(r/beta)]: {pm(*mean_se(log_zs))}")
    print(f"  one tilted output per replicate: mean reward {mean_se([rm.score_one(y) for y in outputs])[0]:.2f}, "
          f"e.g. {outputs[0]!r}")
    return {"prior_mean": pm_, "prior_se": pse, "tilt_mean": tm_, "tilt_se": tse, "diff_se": diff,
            "outputs": outputs, "ess": mean_se(esss)[0]}


def main(argv=None) -> dict:
    p = parser(__doc__, particles=512, tokens=40, reps=10)
    p.add_argument("--beta", type=float, default=0.5, help="temperature of the tilt (default 0.5)")
    p.add_argument("--prompt", default="Return the ", help="prompt of the small LM (default 'Return the ')")
    args = parse(p, argv, dict(particles=256, tokens=30, reps=5))
    return {"toy": toy_part(args), "small": small_part(args)}


if __name__ == "__main__":
    main()
