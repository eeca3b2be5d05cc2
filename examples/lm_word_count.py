"""Constrained generation: a sentence of exactly K words, by SMC with per-particle
``allowed=`` sets that depend on the text so far.

    python examples/lm_word_count.py            # ~20 s (+ ~15 s once to train the small LM)
    python examples/lm_word_count.py --quick    # a few seconds

The constraint C(y): the text y, read up to its first *ending* token (the end-of-text
token for the toy LM, "." for the small LM), exists within T tokens, has exactly K
whitespace-separated words, and its ending is attached to the K-th word (no space before
a "."). The model (DSL, below) writes C as ``allowed=`` sets chosen per particle from
the words so far: before the K-th word anything but an ending; at the K-th word only
tokens without whitespace (continuing the word, or ending the sentence); after the
ending anything (those tokens are not part of the sentence and have mass 1). A token
outside the set would make C false whatever follows, so the masks lose no satisfying
text; the only dead end is running out of tokens, caught by a final ``condition``.
The normalised target is therefore

    p_LM(y | C(y))      and the evidence is      Z = P_LM(C).

1. Toy bigram LM (exact): K = 2 words then the end of text, within 4 tokens. Expect the
   allowed= model's exact measure to equal the unconstrained model's enumeration
   filtered by C in Python ("True"), Z = 59/128 = 0.4609 (top: ' the cat' 0.1356), and
   SMC's Z_hat / Z = 1 within ~2 SE, with every SMC particle having 2 words.
2. Small character LM (prompt "Return the "): K = 5 words ending with ".", within 60
   characters. Expect every SMC output to satisfy C (10 of 10), sentences like
   'integer frot mode, and type.' (the LM is small); Z_hat ~ 0.05-0.06 against the
   fraction of unconstrained samples that satisfy C, ~6%: two estimates of the same Z,
   agreeing within ~2 combined SE. The share of SMC particles that end in time is
   printed (the masks do not look ahead to the length limit; here ~100%).
"""
from __future__ import annotations

import math

from lm_common import (banner, exact_measure, fmt_frac, in_se, mean_se, one_draw, parse, parser, pm, show_texts,
                       small_lm, Timer)

import ppl  # noqa: E402
from ppl.stdlib.lm import ToyLM  # noqa: E402

SOURCE = '''
def no_space(v):
    return v == join(words(v))

def sentence(lm, prompt, K, T, ends):
    # ends: the texts of the tokens that end the sentence ("" is the end-of-text token)
    anything = lm.vocab
    before = filter(lambda v: len(v) > 0 and not (v in ends), lm.vocab)     # fewer than K words
    last = filter(lambda v: no_space(v) and (len(v) > 0 or v in ends), lm.vocab)  # at the K-th word
    toks = lm.encode(prompt)
    text = ""
    done = False
    for t in range(T):
        allowed = anything if done else (before if word_count(text) < K else last)
        tok ~ lm.next_token(toks, allowed=allowed)
        toks = toks + [tok]
        text = text if done else text + tok
        done = done or tok in ends
    condition done
    return text

def free(lm, prompt, T):
    toks = lm.encode(prompt)
    out = []
    for t in range(T):
        tok ~ lm.next_token(toks)
        toks = toks + [tok]
        out = out + [tok]
    return out
'''


def satisfies(tokens, K: int, ends) -> tuple[bool, str]:
    """C, checked in Python on a token list: (holds, the sentence)."""
    for i, t in enumerate(tokens):
        if t in ends:
            s = "".join(tokens[:i + 1])
            ok = len(s.split()) == K and (t == "" or not s[:-len(t)][-1:].isspace())
            return ok, s
    return False, "".join(tokens)


def toy_part(args) -> dict:
    K, T = 2, 4
    banner(f"1. toy bigram LM: exactly {K} words, then the end of text, within {T} tokens")
    lm = ToyLM()
    data = {"lm": lm, "prompt": "", "K": K, "T": T, "ends": [""]}
    model = ppl.model(SOURCE, entry="sentence")
    exact = exact_measure(model, data)
    by_hand: dict = {}
    for toks, w in exact_measure(ppl.model(SOURCE, entry="free"), {"lm": lm, "prompt": "", "T": T}).items():
        ok, s = satisfies(list(toks), K, [""])
        if ok:
            by_hand[s] = by_hand.get(s, 0) + w
    same = exact == by_hand
    Z = sum(exact.values())
    print(f"exact: Z = P(C) = {fmt_frac(Z)}; the allowed= model's measure equals the unconstrained "
          f"enumeration filtered by C: {same}")
    for y, w in sorted(exact.items(), key=lambda kv: -kv[1])[:4]:
        print(f"  {float(w / Z):.4f}  {y!r}")
    ratios, outputs = [], []
    with Timer() as tm:
        for r in range(args.reps):
            res = model.run("smc", data, particles=args.particles, seed=args.seed + r)
            ratios.append(math.exp(res.log_evidence - math.log(Z)))
            outputs += [y for y, w in zip(res.samples["return"], res.weights.tolist()) if w > 0]
    rm, rse = mean_se(ratios)
    good = sum(len(str(y).split()) == K for y in outputs)
    print(f"SMC, N={args.particles}, {args.reps} replicates ({tm.s / args.reps * 1e3:.0f} ms each): "
          f"Z_hat / Z = {pm(rm, rse)} ({in_se(rm - 1, rse):.1f} SE from 1); "
          f"particles with {K} words: {good} of {len(outputs)}")
    return {"Z": Z, "same_measure": same, "ratio": rm, "ratio_se": rse, "good": good, "n_out": len(outputs)}


def small_part(args) -> dict:
    K, T, n = args.words, args.tokens, args.particles
    banner(f"2. small character LM: after {args.prompt!r}, exactly {K} words ending with '.', within {T} characters")
    lm = small_lm(args)
    data = {"lm": lm, "prompt": args.prompt, "K": K, "T": T, "ends": ["."]}
    model = ppl.model(SOURCE, entry="sentence")
    log_zs, outputs, alive = [], [], []
    with Timer() as tm:
        for r in range(args.reps):
            res = model.run("smc", data, particles=n, seed=args.seed + r)
            log_zs.append(res.log_evidence)
            outputs.append(str(one_draw(res, args.seed + r)))
            # the weights are equal after the last token's resampling, so the ESS at the final
            # condition (before resampling) is the number of particles that ended in time
            alive.append(res.extra["history"][-1].ess / n)
            if r == 0:
                print(f"SMC, N={n}: the first run's sentences (share of the weight):")
                show_texts(res.samples["return"], res.weights.tolist())
    ok = [s for s in outputs if s.endswith(".") and len(s.split()) == K and "." not in s[:-1] and not s[-2:-1].isspace()]
    zm, zse = mean_se([math.exp(v) for v in log_zs])
    print(f"SMC over {args.reps} replicates ({tm.s / args.reps:.2f} s each), one output each:")
    print(f"  outputs satisfying C: {len(ok)} of {len(outputs)}, e.g. {outputs[0]!r}")
    print(f"  Z_hat = P_LM(C) estimate: {pm(zm, zse, 4)}  (log {math.log(zm):.3f})")
    print(f"  particles alive at the end (not cut by the length limit): {mean_se(alive)[0]:.0%}")
    free = ppl.model(SOURCE, entry="free")
    with Timer() as tf:
        res = free.run("importance", {"lm": lm, "prompt": args.prompt, "T": T}, particles=args.ref_draws,
                       seed=args.seed + 1000)
    checked = [satisfies([str(t) for t in toks], K, ["."]) for toks in res.samples["return"]]
    k = sum(c for c, _ in checked)
    rate = k / len(checked)
    rse = math.sqrt(max(rate * (1 - rate), 1e-12) / len(checked))
    diff = in_se(zm - rate, math.sqrt(zse ** 2 + rse ** 2))
    print(f"unconstrained LM, {len(checked)} samples ({tf.s:.1f} s): {k} satisfy C = {pm(rate, rse, 4)}; "
          f"SMC's Z_hat differs by {diff:.1f} combined SE")
    print("  unconstrained sentences, e.g.:")
    for _, s in checked[:3]:
        print(f"         {s!r}")
    return {"outputs": outputs, "ok": len(ok), "Z_mean": zm, "Z_se": zse, "rate": rate, "rate_se": rse,
            "diff_se": diff, "alive": mean_se(alive)[0]}


def main(argv=None) -> dict:
    p = parser(__doc__, particles=64, tokens=60, reps=10)
    p.add_argument("--words", "-K", type=int, default=5, help="K, the number of words (small LM; default 5)")
    p.add_argument("--prompt", default="Return the ", help="prompt of the small LM (default 'Return the ')")
    p.add_argument("--ref-draws", type=int, default=2000, help="unconstrained samples for the reference rate")
    args = parse(p, argv, dict(particles=32, tokens=30, words=3, reps=5, ref_draws=600))
    return {"toy": toy_part(args), "small": small_part(args)}


if __name__ == "__main__":
    main()
