"""Best-of-N vs SMC under a constraint (no letter 'e'), at the same number of particles.

    python examples/lm_best_of_n.py            # ~25 s (+ ~15 s once to train the small LM)
    python examples/lm_best_of_n.py --quick    # a few seconds

The constraint C: T tokens, none of them the end of the text or containing 'e'/'E' (as
in ``lm_lipogram.py``). Every method below spends N sequences of T tokens (N * T LM
rows, one batched call per step), from one seed per replicate:

* best-of-N (``best_of_n``) on the model with ``condition no_e(tok)`` after each token:
  N unconstrained LM samples, the one with the highest total log weight returned. Here
  the score is 0 or -inf, so it returns the first sample that satisfies C, and fails
  when none does (a ZeroEvidenceError): P(success) = 1 - (1 - Z)^N. An optimiser, not a sampler: it has no
  evidence estimate, and with a real-valued score it returns the argmax, not a draw
  from any posterior.
* importance sampling on the same N draws (``best_of_n``'s side note): Z_hat = k / N,
  unbiased, useless once Z << 1 / N.
* SMC (``smc``) on the ``condition`` model: the LM proposes, particles with an 'e' die
  and the survivors are resampled after every token (fails only if all N die at once).
* SMC with ``allowed=`` (``smc``): draws from the LM renormalised to the allowed tokens
  and weights by their mass; never fails.
* SMC steering (``smc_steer``, N/4 parents x 4 children, selection without replacement)
  with ``allowed=``.

All the samplers target p_LM(y | C), and their Z_hat estimates Z = P_LM(C) without bias.
Printed per method: the share of replicates whose output satisfies C, Z_hat (mean +- SE
over replicates; '-' for best-of-N), and the time per run.

1. Toy LM (exact Z = 49/512 = 0.0957 for T = 3), N = 8, 200 replicates: expect
   best-of-N's success rate near 1 - (1 - Z)^8 = 0.5528 (0.625 +- 0.034 with the
   default seeds: 2.1 binomial SE, chance: 3000 replicates give 0.561), SMC with
   ``condition`` failing when all 8 particles die (~94% success), the SMCs with
   ``allowed=`` satisfying C in every run, and each Z_hat / Z within ~2 SE of 1.
2. Small LM (prompt "A list of "), N = 64, 10 replicates at T = 10, 20, 40 characters:
   Z ~ 0.22, 0.07, 0.008. Best-of-N (and IS) satisfy C in every run at T = 10 and 20
   but only in ~30-40% of runs at T = 40 (1 - (1 - Z)^64 ~ 0.40); all SMC variants
   satisfy C in every run, with Z_hat agreeing between methods within their SEs
   (~0.0080 +- 0.0006 with allowed=, the smallest SE). SMC is no slower per run (at
   T = 40 faster: resampled particles share prefixes, and the LM is asked once per
   distinct context).
"""
from __future__ import annotations

import math

from lm_common import banner, fmt_frac, in_se, mean_se, one_draw, parse, parser, small_lm, Timer
from lm_lipogram import SOURCE  # the same models: lipogram (allowed=) and lipogram_condition

import ppl  # noqa: E402
from ppl.stdlib.lm import ToyLM  # noqa: E402

METHODS = ["best-of-N", "IS (same draws)", "SMC, condition", "SMC, allowed=", "SMC steer x4, allowed="]


def satisfied(y, T: int, toy: bool) -> bool:
    if y is None:
        return False
    y = str(y)
    return "e" not in y.lower() and (toy or len(y) == T)  # small LM: T characters, no end of text


def compare(lm, prompt: str, T: int, n: int, reps: int, seed: int, toy: bool) -> dict:
    """Each method, ``reps`` runs: {method: {"ok": [bool], "z": [Z_hat] or None, "s": seconds}}."""
    data = {"lm": lm, "prompt": prompt, "T": T}
    cond = ppl.model(SOURCE, entry="lipogram_condition")
    allowed = ppl.model(SOURCE, entry="lipogram")
    out = {m: {"ok": [], "z": [], "s": 0.0, "example": None} for m in METHODS}
    for r in range(reps):
        s = seed + r
        with Timer() as t:
            try:
                res = cond.run("best_of_n", data, particles=n, seed=s)
                best, lz = res.samples["return"][0], res.extra["importance_log_evidence"]
            except ppl.ZeroEvidenceError:  # no candidate satisfies the constraint
                best, lz = None, None
        for m in METHODS[:2]:  # one run: best-of-N and importance sampling on its draws
            out[m]["ok"].append(satisfied(best, T, toy))
            out[m]["s"] += t.s
            out[m]["example"] = out[m]["example"] or best
        out["best-of-N"]["z"] = None
        out["IS (same draws)"]["z"].append(0.0 if lz is None or lz == -math.inf else math.exp(lz))
        runs = [("SMC, condition", cond, "smc", {}), ("SMC, allowed=", allowed, "smc", {}),
                ("SMC steer x4, allowed=", allowed, "smc_steer", {"particles": n // 4, "expansion": 4})]
        for m, model, method, opts in runs:
            with Timer() as t:
                try:
                    res = model.run(method, data, **{"particles": n, **opts}, seed=s)
                    z, y = math.exp(res.log_evidence), one_draw(res, s)
                except ppl.ZeroEvidenceError:  # every particle died
                    z, y = 0.0, None
            out[m]["ok"].append(satisfied(y, T, toy))
            out[m]["z"].append(z)
            out[m]["s"] += t.s
            out[m]["example"] = out[m]["example"] or y
    for m in METHODS:
        out[m]["s"] /= reps
    return out


def table(out: dict, Z=None, n: int = 0) -> None:
    print(f"  {'method':<24}{'outputs in C':>14}{'Z_hat (mean +- SE)':>24}{'Z_hat / Z':>18}{'ms/run':>8}")
    for m, o in out.items():
        ok = sum(o["ok"]) / len(o["ok"])
        se = math.sqrt(max(ok * (1 - ok), 1e-12) / len(o["ok"]))
        if o["z"] is None:
            zs, rs = "- (no estimate)", ""
        else:
            zm, zse = mean_se(o["z"])
            zs = f"{zm:.4f} +- {zse:.4f}"
            rs = f"{zm / Z:.3f} +- {zse / Z:.3f}" if Z else ""
        print(f"  {m:<24}{ok:>8.0%} +-{se:>3.0%}{zs:>24}{rs:>18}{o['s'] * 1e3:>8.0f}")


def toy_part(args) -> dict:
    T, n = 3, args.toy_particles
    banner(f"1. toy LM, T = {T} tokens, N = {n}, {args.toy_reps} replicates")
    lm = ToyLM()
    exact = ppl.model(SOURCE, entry="lipogram").run("enumerate", {"lm": lm, "prompt": "", "T": T})
    Z = exact.evidence
    success = 1 - (1 - Z) ** n
    print(f"exact: Z = P(C) = {fmt_frac(Z)}; best-of-N succeeds with probability 1 - (1 - Z)^{n} = "
          f"{float(success):.4f}")
    out = compare(lm, "", T, n, args.toy_reps, args.seed, toy=True)
    table(out, float(Z), n)
    ok = sum(out["best-of-N"]["ok"]) / args.toy_reps
    se = math.sqrt(float(success) * (1 - float(success)) / args.toy_reps)
    print(f"best-of-N's success rate {ok:.3f} vs exact {float(success):.4f}: {in_se(ok - float(success), se):.1f} SE")
    return {"Z": float(Z), "success": float(success), "out": out}


def small_part(args) -> dict:
    n = args.particles
    banner(f"2. small LM, prompt {args.prompt!r}, N = {n}, {args.reps} replicates per length")
    lm = small_lm(args)
    results = {}
    for T in args.lengths:
        print(f"\nT = {T} characters:")
        out = compare(lm, args.prompt, T, n, args.reps, args.seed, toy=False)
        z_ref = mean_se(out["SMC, allowed="]["z"])[0]
        table(out)
        print(f"  best-of-N's success probability from SMC's Z: 1 - (1 - Z)^{n} = {1 - (1 - z_ref) ** n:.3f}")
        for m in ("best-of-N", "SMC, allowed="):
            print(f"  e.g. {m}: {out[m]['example']!r}")
        results[T] = out
    return results


def main(argv=None) -> dict:
    p = parser(__doc__, particles=64, tokens=40, reps=10)
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="lengths T of the small-LM comparison (default 10 20 40; --tokens adds one)")
    p.add_argument("--toy-particles", type=int, default=8, help="N for the toy LM (default 8)")
    p.add_argument("--toy-reps", type=int, default=200, help="replicates for the toy LM (default 200)")
    p.add_argument("--prompt", default="A list of ", help="prompt of the small LM (default 'A list of ')")
    args = parse(p, argv, dict(particles=32, reps=5, toy_reps=60, lengths=[10, 20]))
    args.lengths = args.lengths or sorted({10, 20, args.tokens})
    return {"toy": toy_part(args), "small": small_part(args)}


if __name__ == "__main__":
    main()
