"""Grammar, regex and JSON-schema constraints at a 50,000-token vocabulary (issue 14, item 1).

Vocabulary: the byte-level BPE of ``ppl.testing.bpe_vocab`` (trained offline on the
standard-library sources, cached); model: ``VocabLM`` (a fixed Zipf next-token law, so the
model costs nothing and the figures are the constraint's). Program: ``text ~
lm.generate("", max_tokens=T, allowed=c)`` under SMC with N particles, for a regex, a Lark
grammar (arithmetic with calls, whitespace ignored) and a JSON schema.

Figures (CPU time, ``time.process_time``, medians over repeats): the vocabulary trie's
build; the constraint's own time per generation step (``ConstraintMask.generate_rows``:
the matcher advanced over the new tokens, the masks looked up or computed by one trie walk
per new matcher state), on a cold run (fresh matcher and caches) and on a warm run (the
same constraint again: the masks of the states seen before are cached); the whole run
against the unconstrained one; and the fraction of completions that the constraint
accepts (must be 100%).
"""
from __future__ import annotations

import json
import os
import statistics
import time

N = 32
T = 24

GRAMMAR = r'''
start: expr
?expr: term (("+"|"-") term)*
?term: atom (("*"|"/") atom)*
?atom: NUMBER | NAME | NAME "(" [expr ("," expr)*] ")" | "(" expr ")"
%import common.NUMBER
%import common.CNAME -> NAME
%import common.WS
%ignore WS
'''
SCHEMA = {"type": "object", "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}
CONSTRAINTS = {
    "regex": "regex(" + json.dumps(r"[A-Z][a-z]+( [a-z]+)*[.!?]") + ")",
    "grammar": "grammar(" + json.dumps(GRAMMAR) + ")",
    "json_schema": "json_schema(" + json.dumps(json.dumps(SCHEMA)) + ")",
}


def _program(allowed: str | None) -> str:
    arg = f", allowed={allowed}" if allowed else ""
    return f'''
def m(lm):
    text ~ lm.generate("", max_tokens={T}{arg})
    return text
'''


def run(repeats: int = 3, quick: bool = False) -> dict:
    import ppl
    from ppl.stdlib.lm import constraints as C
    from ppl.stdlib.lm import dsl
    from ppl.stdlib.lm.vocab_trie import vocab_trie_of
    from ppl.testing.bpe_vocab import VocabLM, bpe_tokenizer

    lm = VocabLM(bpe_tokenizer(50_000))
    lmv = dsl.wrap(lm)
    c0 = time.process_time()
    trie = vocab_trie_of(lmv)
    print(f"\nLM constraints: {lm.vocab_size:,}-token BPE vocabulary, trie of {trie.n_nodes:,} nodes built in "
          f"{time.process_time() - c0:.2f} s; SMC, N = {N}, generate max_tokens = {T}; load "
          f"{os.getloadavg()[0]:.1f}")
    spent: list = []
    real = C.ConstraintMask.generate_rows

    def timed(self, *a, **k):
        t = time.process_time()
        out = real(self, *a, **k)
        spent.append(time.process_time() - t)
        return out
    C.ConstraintMask.generate_rows = timed
    out: dict = {}
    try:
        base = []
        for rep in range(1 if quick else repeats):
            t = time.process_time()
            ppl.model(_program(None)).run("smc", {"lm": lm}, particles=N, seed=rep)
            base.append(time.process_time() - t)
        print(f"  {'constraint':<12} {'cold: per step':>15} {'warm: per step':>15} {'run (warm)':>11} "
              f"{'unconstrained':>14} {'accepted':>9}")
        for name, src in CONSTRAINTS.items():
            cold, warm, runs, accepted = [], [], [], []
            for rep in range(1 if quick else repeats):
                C._MATCHERS.clear()
                C._BOUND.clear()
                model = ppl.model(_program(src))
                for phase in ("cold", "warm"):
                    spent.clear()
                    t = time.process_time()
                    res = model.run("smc", {"lm": lm}, particles=N, seed=rep)
                    total = time.process_time() - t
                    (cold if phase == "cold" else warm).append(sum(spent) / max(len(spent), 1))
                    if phase == "warm":
                        runs.append(total)
                texts = list(res.samples["return"])
                matcher = next(iter(C._MATCHERS.values()))  # this constraint's (the cache was cleared)
                accepted.append(sum(matcher.accepts(x) for x in texts) / len(texts))
            row = {"cold_step_ms": 1e3 * statistics.median(cold), "warm_step_ms": 1e3 * statistics.median(warm),
                   "run_s": statistics.median(runs), "unconstrained_run_s": statistics.median(base),
                   "accepted": min(accepted)}
            out[name] = row
            print(f"  {name:<12} {row['cold_step_ms']:>12.1f} ms {row['warm_step_ms']:>12.2f} ms "
                  f"{row['run_s']:>9.2f} s {row['unconstrained_run_s']:>12.2f} s {100 * row['accepted']:>8.0f}%")
    finally:
        C.ConstraintMask.generate_rows = real
    return out


if __name__ == "__main__":
    from common import script_main
    script_main(run, repeats=3)
