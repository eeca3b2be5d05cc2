"""Per-step ``allowed=`` mask time for a 50,000-token vocabulary (issue 14, item 2).

Vocabulary: a byte-level BPE tokenizer trained offline on this Python's standard-library
sources (``ppl.testing.bpe_vocab``, cached under ``$PPL_CACHE_DIR`` or the temp dir; the
first build takes ~35 s). Model: ``VocabLM`` (a fixed Zipf next-token law, so the model
itself costs nothing). Program: N particles draw T tokens, each step under the constraint
"no letter e", written three ways:

* ``text_lacks("eE")``: the vectorised helper;
* ``lambda v: not ("e" in v or "E" in v)``: a pure DSL predicate (one batched evaluation
  over the vocabulary, then cached);
* ``lambda v: not ("e" in v or "E" in v) or v == first``: the same, but reading a
  per-particle value (``first``), so evaluated per particle, token by token, every step:
  the path every predicate took before (timed on T = 2 steps only: ~1 s a step).

Figures (CPU time, ``time.process_time``, medians): the mask's own time per step (the
``allowed=`` evaluation, timed inside the run), first step and later steps (target: under
10 ms after the first), and the whole SMC step with and without the mask (what applying it
to the [N, V] rows adds).
"""
from __future__ import annotations

import statistics
import time

import torch

STEPS = 8
N = 32


def _program(allowed: str | None, T: int) -> str:
    arg = f", allowed={allowed}" if allowed else ""
    return f'''
def m(lm):
    toks = lm.encode("def f")
    first ~ lm.next_token(toks)
    toks = toks + [first]
    for t in range({T}):
        tok ~ lm.next_token(toks{arg})
        toks = toks + [tok]
    return lm.decode(toks)
'''


def run(repeats: int = 3, quick: bool = False) -> dict:
    import ppl
    from ppl.stdlib.lm import dsl
    from ppl.testing.bpe_vocab import VocabLM, bpe_tokenizer

    t0 = time.perf_counter()
    lm = VocabLM(bpe_tokenizer(50_000))
    print(f"\nLM masks: a byte-level BPE vocabulary of {lm.vocab_size:,} tokens (built or loaded in "
          f"{time.perf_counter() - t0:.1f} s), N = {N} particles, SMC")
    mask_times: list = []
    real = dsl.LMValue._mask

    def timed(self, *a, **k):
        c0 = time.process_time()
        out = real(self, *a, **k)
        if a[1] is not None:  # (where, allowed, ...): the steps with a constraint
            mask_times.append(time.process_time() - c0)
        return out
    dsl.LMValue._mask = timed
    contenders = {
        "text_lacks(\"eE\")": ('text_lacks("eE")', STEPS),
        "pure lambda": ('lambda v: not ("e" in v or "E" in v)', STEPS),
        "per-particle lambda": ('lambda v: not ("e" in v or "E" in v) or v == first', 2),
        "no mask": (None, STEPS),
    }
    out: dict = {}
    dsl.wrap(lm).all_tokens()  # the vocabulary's 50k token values, made once per model (not timed)
    try:
        step_times: dict = {name: [] for name in contenders}
        firsts: dict = {name: [] for name in contenders}
        laters: dict = {name: [] for name in contenders}
        for rep in range(repeats if not quick else 1):
            for name, (allowed, T) in contenders.items():
                if name == "per-particle lambda" and rep > 0:
                    continue  # one repeat: ~1 s a step
                lmv = dsl.wrap(lm)
                lmv._masks.clear()  # every repeat builds its mask again on its first step
                model = ppl.model(_program(allowed, T))
                mask_times.clear()
                c0 = time.process_time()
                model.run("smc", {"lm": lm}, particles=N, seed=rep)
                total = time.process_time() - c0
                step_times[name].append(total / (T + 1))
                if allowed:
                    firsts[name].append(mask_times[0])
                    laters[name].extend(mask_times[1:])
        print(f"  {'allowed=':<22} {'mask, 1st step':>15} {'mask, later (median)':>21} {'SMC step (median)':>18}")
        for name in contenders:
            f = f"{1e3 * statistics.median(firsts[name]):.1f} ms" if firsts[name] else "-"
            later = f"{1e3 * statistics.median(laters[name]):.3f} ms" if laters[name] else "-"
            print(f"  {name:<22} {f:>15} {later:>21} {1e3 * statistics.median(step_times[name]):>15.1f} ms")
            out[name] = {"first_ms": 1e3 * statistics.median(firsts[name]) if firsts[name] else None,
                         "later_ms": 1e3 * statistics.median(laters[name]) if laters[name] else None,
                         "step_ms": 1e3 * statistics.median(step_times[name])}
        ok = all(out[n]["later_ms"] < 10 for n in ("text_lacks(\"eE\")", "pure lambda"))
        print(f"  target: mask under 10 ms per step after the first at 50k tokens: {'OK' if ok else 'MISSED'} "
              f"(the SMC step itself is dominated by [N, V] tensor work: the masked draw and "
              f"torch.multinomial, which draws one exponential per vocabulary entry)")
    finally:
        dsl.LMValue._mask = real
    return out


if __name__ == "__main__":
    from common import script_main
    script_main(run, repeats=3)
