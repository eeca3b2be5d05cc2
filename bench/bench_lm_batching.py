"""Q concurrent LM queries served through one BatchingLM vs the same queries one at a time
(stdlib/lm/batcher.py, issue 14 item 7).

A query is one SMC steering run of N particles (``bench_lm.steer``: continue "Return
the " for T tokens without the letter e, resample every step; one ``next_logprobs`` call
per step for its live particles), or the same steering written in the DSL and run by
``Model.run("smc")`` (``--dsl``, or the second table). For Q = 1, 4, 16 queries (seeds
0 .. Q-1):

* one at a time: the Q queries run one after another on the backend directly (each
  batched over its own particles: one backend call per step);
* concurrent, batched: the Q queries in Q threads through one ``BatchingLM``
  (``run_concurrently``: each thread a registered client, so a tick fires as soon as
  every live query waits): one backend call per step for all of them;
* concurrent, unbatched: the Q threads call the backend directly, one call each
  (serialised by a lock): what threads alone give.

Figures per contender: tokens/s on the wall clock (tokens = particle-steps of live
particles, as in ``bench_lm``; the same for every contender with the same seeds), CPU
seconds of the process per 1,000 tokens (``time.process_time``, all threads), backend
forward calls per run and distinct rows per call; the medians over interleaved repeats.
The load average is printed before and after. The final particles of the batched runs
are compared with those made one at a time (same seeds).

Reading the figures on a shared machine: wall-clock tokens/s of the threaded contenders
also gain from the process getting more of the machine's cores while other processes
compete for them (see "concurrent, unbatched", which saves no work); tokens per CPU
second (the CPU column) is the load-independent measure of the work batching saves.

Backends: the small GRU (trained here, 40 steps with --quick, else 150) and
(``--backend hf``) a randomly initialised GPT-2 built from a config (``--hf-layers``,
``--hf-width``; tiny by default) on ``--device`` (cpu, cuda): what ``scripts/gpu_check.sh``
runs on a GPU. Nothing is downloaded.
"""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_lm import DSL_SOURCE, PROMPT, _CharTokenizer, steer  # noqa: E402
from common import load_average  # noqa: E402

QS = (1, 4, 16)



class _Counting:
    """Wraps a backend's next_logprobs to count calls and rows (the backend's own view)."""

    def __init__(self, lm):
        self.lm, self.calls, self.rows = lm, 0, 0
        self._orig = lm.next_logprobs
        self._lock = threading.Lock()

        def counted(contexts):
            with self._lock:
                self.calls += 1
                self.rows += len(contexts)
                return self._orig(contexts)
        lm.next_logprobs = counted

    def reset(self):
        self.calls = self.rows = 0


def _queries(kind: str, lm, n: int, T: int, Q: int):
    """Q query functions (seeds 0 .. Q-1) returning (texts, tokens)."""
    if kind == "loop":
        return [lambda s=s: steer(lm, n, T, s) for s in range(Q)]
    import ppl
    model = ppl.model(DSL_SOURCE)

    def one(s):
        res = model.run("smc", {"lm": lm, "prompt": PROMPT, "T": T}, particles=n, resampling="systematic",
                        ess_threshold=1.0, seed=s)
        return tuple(sorted(res.marginal())), None
    return [lambda s=s: one(s) for s in range(Q)]


def _dsl_tokens(lm, n: int, T: int, Q: int) -> list[int]:
    """Tokens of each DSL query (live particle-steps: the rows LMValue.base_logprobs sees
    before merging copies), from untimed runs, one per seed."""
    from ppl.stdlib.lm.dsl import LMValue
    orig = LMValue.base_logprobs
    count = [0]

    def counting(self, contexts, device):
        count[0] += sum(1 for c in contexts if not self.finished(c))
        return orig(self, contexts, device)
    LMValue.base_logprobs = counting
    out = []
    try:
        for fn in _queries("dsl", lm, n, T, Q):
            count[0] = 0
            fn()
            out.append(count[0])
    finally:
        LMValue.base_logprobs = orig
    return out


def measure(kind: str, make_lm, n: int, T: int, repeats: int, qs=QS, max_wait_ms: float = 50.0) -> dict:
    """For each Q: the three contenders, interleaved ``repeats`` times; prints a table."""
    from ppl.stdlib.lm.batcher import BatchingLM, run_concurrently
    results = {}
    for Q in qs:
        backends = {name: make_lm(keep_calls=2 * Q + 2) for name in ("one at a time", "concurrent, batched",
                                                                    "concurrent, unbatched")}
        counters = {name: _Counting(lm) for name, lm in backends.items()}
        batcher = BatchingLM(backends["concurrent, batched"], max_batch=4096, max_wait_ms=max_wait_ms)
        locked = backends["concurrent, unbatched"]
        lock = threading.Lock()
        orig_locked = locked.next_logprobs

        def locked_call(contexts, orig=orig_locked):
            with lock:
                return orig(contexts)
        locked.next_logprobs = locked_call

        def sequential():
            return [fn() for fn in _queries(kind, backends["one at a time"], n, T, Q)]

        def batched():
            return run_concurrently(batcher, _queries(kind, batcher, n, T, Q))

        def unbatched():
            qfns = _queries(kind, locked, n, T, Q)
            out = [None] * Q
            threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, qfns[i]())) for i in range(Q)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return out
        contenders = {"one at a time": sequential, "concurrent, batched": batched, "concurrent, unbatched": unbatched}
        if kind == "loop":
            tokens = None
        else:
            tokens = sum(_dsl_tokens(make_lm(), n, T, Q))
        for fn in contenders.values():  # warm-up
            fn()
        wall = {k: [] for k in contenders}
        cpu = {k: [] for k in contenders}
        toks = {k: [] for k in contenders}
        calls = {k: [] for k in contenders}
        rows = {k: [] for k in contenders}
        outs = {}
        for _ in range(repeats):
            for name, fn in contenders.items():
                counters[name].reset()
                t0, c0 = time.perf_counter(), time.process_time()
                out = fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                toks[name].append(sum(r[1] for r in out) if tokens is None else tokens)
                calls[name].append(counters[name].calls)
                rows[name].append(counters[name].rows / max(counters[name].calls, 1))
                outs[name] = [r[0] for r in out]
        batcher.close()
        print(f"\n  Q = {Q} concurrent {'SMC loops' if kind == 'loop' else 'DSL Model.run(smc)'} of N = {n} "
              f"particles, T = {T} (load average {load_average()})")
        print(f"  {'contender':<24} {'tokens/s':>10} {'ratio':>6} {'wall ms':>9} {'CPU s/1k tok':>13} "
              f"{'calls/run':>10} {'rows/call':>10}")
        ref = statistics.median(t / w for t, w in zip(toks["one at a time"], wall["one at a time"]))
        res_q = {}
        for name in contenders:
            tps = statistics.median(t / w for t, w in zip(toks[name], wall[name]))
            cpk = statistics.median(1000 * c / t for c, t in zip(cpu[name], toks[name]))
            res_q[name] = {"tokens_per_s": tps, "cpu_s_per_1k_tokens": cpk, "wall_ms": 1000 * statistics.median(wall[name]),
                           "calls": statistics.median(calls[name]), "rows_per_call": statistics.median(rows[name])}
            print(f"  {name:<24} {tps:>10,.0f} {tps / ref:>6.2f} {res_q[name]['wall_ms']:>9.1f} {cpk:>13.3f} "
                  f"{res_q[name]['calls']:>10.0f} {res_q[name]['rows_per_call']:>10.1f}")
        same = sum(a == b for a, b in zip(outs["one at a time"], outs["concurrent, batched"]))
        cpu_ratio = res_q["one at a time"]["cpu_s_per_1k_tokens"] / res_q["concurrent, batched"]["cpu_s_per_1k_tokens"]
        print(f"  batched vs one at a time: {res_q['concurrent, batched']['tokens_per_s'] / ref:.2f}x tokens/s (wall), "
              f"{cpu_ratio:.2f}x tokens per CPU second; identical final particles in {same} of {Q} queries; "
              f"over all runs: {batcher.stats.ticks} ticks, mean requests per tick "
              f"{batcher.stats.mean_requests_per_tick:.1f} (full {batcher.stats.full_ticks}, "
              f"timed out {batcher.stats.timed_out_ticks})")
        res_q["cpu_ratio"] = cpu_ratio
        results[Q] = res_q
    return results


def small_maker(quick: bool):
    from ppl.stdlib.lm.small import SmallLM, stdlib_corpus, train
    steps = 40 if quick else 150
    base = train(stdlib_corpus(), steps=steps, seed=0)

    def make(**kw):
        lm = SmallLM(base.chars, **base.hparams, **kw)
        lm.net.load_state_dict(base.net.state_dict())
        return lm
    return make, base, f"small GRU LM ({base.num_parameters:,} parameters, trained {steps} steps)"


def hf_maker(itos, T: int, layers: int, width: int, device: str):
    import transformers
    from ppl.stdlib.lm.hf import HFCausalLM
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers, n_head=max(1, width // 64), n_embd=width, vocab_size=len(itos),
                                  n_positions=len(PROMPT) + T + 1, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).to(device).eval()
    tok = _CharTokenizer(itos)

    def make(**kw):
        return HFCausalLM(model, tok, device=device, **kw)
    return make, (f"random GPT-2 ({layers} layers, width {width}, "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters) on {device}")


def run(repeats: int = 5, quick: bool = False, backend: str = "both", device: str = "cpu",
        hf_layers: int = 2, hf_width: int = 64, dsl: bool | None = None) -> dict:
    repeats = min(repeats, 3) if quick else min(repeats, 5)
    n, T = 8, (16 if quick else 32)
    print(f"\nBatching concurrent LM queries (stdlib/lm/batcher.py), torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cpus, load average {load_average()}")
    out = {}
    if backend in ("both", "small"):
        make_small, base, what = small_maker(quick)
        itos = base.itos
        print(f"\n{what}, on cpu: tokens/s of Q queries (ratio = tokens/s / one at a time)")
        out["small_loop"] = measure("loop", make_small, n, T, repeats)
        if dsl is not False:
            out["small_dsl"] = measure("dsl", make_small, n, T if not quick else 8, repeats,
                                       qs=(1, 4) if quick else QS)
    else:  # the HF backend alone: the small LM's characters as its vocabulary, no training
        from ppl.stdlib.lm.small import EOS, UNK, stdlib_corpus, vocabulary
        itos = [EOS, UNK] + vocabulary(stdlib_corpus())
    if backend in ("both", "hf"):
        try:
            make_hf, what = hf_maker(itos, T, hf_layers, hf_width, device)
        except ImportError as e:
            print(f"\n  HF backend skipped: {e}")
        else:
            print(f"\nHFCausalLM: {what}: tokens/s of Q queries")
            out["hf_loop"] = measure("loop", make_hf, n, T, repeats)
            if dsl:
                out["hf_dsl"] = measure("dsl", make_hf, n, T, repeats)
    print(f"\nload average at the end: {load_average()}")
    return out


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backend", choices=["both", "small", "hf"], default="both")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hf-layers", type=int, default=2)
    ap.add_argument("--hf-width", type=int, default=64)
    ap.add_argument("--dsl", action="store_true", default=None, help="also the DSL queries on the HF backend")
    ap.add_argument("--no-dsl", dest="dsl", action="store_false")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    figures = run(a.repeats, a.quick, a.backend, a.device, a.hf_layers, a.hf_width, a.dsl)
    if a.json:
        import json
        with open(a.json, "w") as f:
            json.dump({"load_average": load_average(), "device": a.device, "figures": figures}, f, indent=1)
