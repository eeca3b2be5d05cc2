"""Constrained generation: a lipogram (a text without the letter 'e'), by SMC with
``allowed=``.

    python examples/lm_lipogram.py            # ~10 s (+ ~15 s once to train the small LM)
    python examples/lm_lipogram.py --quick    # a few seconds

The model (DSL, below): T tokens, each ``tok ~ lm.next_token(toks, allowed=no_e)``,
where ``no_e(tok)`` holds for a token that is not the end of the text and has no 'e' or
'E' (so the text has exactly T tokens). ``allowed=`` is a constraint: the same measure
as drawing the token and then ``condition no_e(tok)`` (checked below by enumeration), so
the program's normalised target is

    p_LM(y | no 'e' in y)        and its evidence is   Z = P_LM(no 'e' in y).

SMC draws each token from the LM renormalised to the allowed tokens (the locally optimal
proposal), weights by the allowed mass p(allowed | prefix), and resamples after every
token; the product of the mean weights, Z_hat, estimates Z without bias.

1. Toy bigram LM (exact): 3 tokens; enumeration gives Z = 49/512 = 0.0957 and the
   posterior of every text (top: ' a dog runs' 0.2449). Expect: the same exact measure
   with ``condition`` as with ``allowed=``; SMC's Z_hat / Z = 1 within ~2 SE (mean over
   replicates +- SE, e.g. "0.991 +- 0.024"); every posterior probability within ~3 SE;
   no particle with an 'e'.
2. Small character-level LM (trained on stdlib docstrings; prompt "A list of "; the
   constraint is on the 40 generated characters). Expect: every SMC output without an
   'e' (10 of 10), texts like 'a runtiatibal instanding a call whichs t' (the LM is
   small); Z_hat = P_LM(40 characters without 'e') ~ 0.008 +- 0.0006, against the
   fraction of unconstrained LM samples that satisfy the constraint, ~1% (20 of 2000):
   two estimates of the same Z that agree within ~2 combined SE, and the reason
   sampling-then-filtering is hopeless for longer texts.
"""
from __future__ import annotations

import math

from lm_common import (banner, exact_measure, fmt_frac, in_se, mean_se, normalise, one_draw, parse, parser, pm,
                       show_texts, small_lm, Timer)

import ppl  # noqa: E402
from ppl.stdlib.lm import ToyLM  # noqa: E402

SOURCE = '''
def no_e(tok):
    # a character (token) other than the end of the text, without 'e' or 'E'
    return len(tok) > 0 and "e" not in lower(tok)

def lipogram(lm, prompt, T):
    toks = lm.encode(prompt)
    out = []
    for t in range(T):
        tok ~ lm.next_token(toks, allowed=no_e)
        toks = toks + [tok]
        out = out + [tok]
    return join(out)

def lipogram_condition(lm, prompt, T):
    toks = lm.encode(prompt)
    out = []
    for t in range(T):
        tok ~ lm.next_token(toks)
        condition no_e(tok)
        toks = toks + [tok]
        out = out + [tok]
    return join(out)

def free(lm, prompt, T):
    toks = lm.encode(prompt)
    out = []
    for t in range(T):
        tok ~ lm.next_token(toks)
        toks = toks + [tok]
        out = out + [tok]
    return join(out)
'''


def toy_part(args) -> dict:
    banner("1. toy bigram LM, 3 tokens, no 'e': exact enumeration vs SMC with allowed=")
    lm = ToyLM()
    data = {"lm": lm, "prompt": "", "T": 3}
    m_allowed = ppl.model(SOURCE, entry="lipogram")
    exact = exact_measure(m_allowed, data)
    same = exact == exact_measure(ppl.model(SOURCE, entry="lipogram_condition"), data)
    Z = sum(exact.values())
    post = normalise(exact)
    print(f"exact: Z = P(no 'e' in 3 tokens) = {fmt_frac(Z)}   (log Z = {math.log(Z):.4f})")
    print(f"allowed= and `condition` denote the same measure (enumeration): {same}")
    print("exact posterior p(y | no 'e'), top 5:")
    for y, p in sorted(post.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {float(p):.4f}  {y!r}")
    ratios, margs, outputs = [], [], []
    n = args.particles
    with Timer() as tm:
        for r in range(args.reps):
            res = m_allowed.run("smc", data, particles=n, seed=args.seed + r)
            ratios.append(math.exp(res.log_evidence - math.log(Z)))
            margs.append(res.marginal())
            outputs += list(res.samples["return"])
    rm, rse = mean_se(ratios)
    # the posterior, from all replicates: each text's probability, mean +- SE over replicates
    worst = max((abs(m - float(p)) / max(se, math.sqrt(float(p) * (1 - float(p)) / (n * args.reps))), y, m, p)
                for y, p in post.items() for m, se in [mean_se([mg.get(y, 0.0) for mg in margs])])
    bad = sum("e" in str(y).lower() for y in outputs)
    print(f"SMC, N={n}, {args.reps} replicates ({tm.s / args.reps * 1e3:.0f} ms each):")
    print(f"  Z_hat / Z = {pm(rm, rse)}  (unbiased: expect 1 within ~2 SE; |diff| = {in_se(rm - 1, rse):.1f} SE)")
    print(f"  posterior: the text furthest from the exact one is {worst[1]!r}: {worst[2]:.4f} vs {float(worst[3]):.4f}"
          f" ({worst[0]:.1f} SE)")
    print(f"  particles with an 'e': {bad} of {len(outputs)}")
    return {"Z": Z, "log_Z": math.log(Z), "same_measure": same, "ratio": rm, "ratio_se": rse,
            "worst_se": worst[0], "outputs": outputs, "with_e": bad}


def small_part(args) -> dict:
    T, n, prompt = args.tokens, args.particles, args.prompt
    banner(f"2. small character LM, {T} characters after {prompt!r}, no 'e': SMC with allowed=")
    lm = small_lm(args)
    data = {"lm": lm, "prompt": prompt, "T": T}
    model = ppl.model(SOURCE, entry="lipogram")
    log_zs, outputs, min_ess, all_with_e = [], [], [], 0
    with Timer() as tm:
        for r in range(args.reps):
            res = model.run("smc", data, particles=n, seed=args.seed + r)
            log_zs.append(res.log_evidence)
            outputs.append(one_draw(res, args.seed + r))
            min_ess.append(min(res.ess_history))
            all_with_e += sum("e" in str(y).lower() for y in res.samples["return"])
            if r == 0:
                print(f"SMC, N={n}: the first run's particles (share of the weight):")
                show_texts(res.samples["return"], res.weights.tolist())
    z_hats = [math.exp(v) for v in log_zs]
    zm, zse = mean_se(z_hats)
    bad = [y for y in outputs if "e" in str(y).lower()]
    print(f"SMC over {args.reps} replicates ({tm.s / args.reps:.2f} s each), one output each:")
    print(f"  outputs without 'e': {len(outputs) - len(bad)} of {len(outputs)}; particles with an 'e' in all "
          f"runs: {all_with_e}")
    print(f"  Z_hat = P_LM(no 'e') estimate: mean {pm(zm, zse, 4)}  (log of mean {math.log(zm):.3f}; "
          f"mean log Z_hat {mean_se(log_zs)[0]:.3f})")
    print(f"  smallest ESS before resampling, mean over runs: {mean_se(min_ess)[0]:.1f} of {n}")
    # the same Z by brute force: unconstrained samples from the LM, counted
    free = ppl.model(SOURCE, entry="free")
    with Timer() as tf:
        res = free.run("importance", data, particles=args.ref_draws, seed=args.seed + 1000)
    texts = [str(y) for y in res.samples["return"]]
    k = sum(len(y) == T and "e" not in y.lower() for y in texts)  # T characters: no end-of-text
    rate = k / len(texts)
    rse = math.sqrt(max(rate * (1 - rate), 1e-12) / len(texts))
    diff = in_se(zm - rate, math.sqrt(zse ** 2 + rse ** 2))
    print(f"unconstrained LM, {len(texts)} samples ({tf.s:.1f} s): {k} without 'e' = {pm(rate, rse, 4)}; "
          f"SMC's Z_hat differs by {diff:.1f} combined SE")
    print("  unconstrained samples, e.g.:")
    for y in texts[:3]:
        print(f"         {y!r}")
    return {"outputs": outputs, "with_e": len(bad), "particles_with_e": all_with_e, "Z_mean": zm, "Z_se": zse,
            "rate": rate, "rate_se": rse, "diff_se": diff, "log_zs": log_zs}


def main(argv=None) -> dict:
    p = parser(__doc__, particles=64, tokens=40, reps=10)
    p.add_argument("--prompt", default="A list of ", help="prompt of the small LM (default 'A list of ')")
    p.add_argument("--ref-draws", type=int, default=2000, help="unconstrained samples for the reference rate")
    args = parse(p, argv, dict(particles=32, tokens=20, reps=5, ref_draws=600))
    return {"toy": toy_part(args), "small": small_part(args)}


if __name__ == "__main__":
    main()
