"""Several concurrent queries served by one backend through ``BatchingLM``
(stdlib/lm/batcher.py, issue 14 item 7): one backend call per tick for every waiting
query; each query receives exactly its rows (bit for bit the backend's rows for its
contexts); whole SMC runs in threads or asyncio tasks equal the same runs made alone
(bit for bit on the exact toy LM; to float32 rounding on the small GRU and a tiny
random GPT-2, whose batched matrix products differ from unbatched ones in the last
bit); bounded by max_batch / max_wait_ms; a backend error reaches only the query that
caused it; closing serves what waits and stops the worker. Nothing is downloaded."""
from __future__ import annotations

import asyncio
import copy
import threading
import time

import pytest
import torch

import ppl
from ppl.semantics.errors import PPLError
from ppl.stdlib.lm.base import LanguageModel
from ppl.stdlib.lm.batcher import BatchingLM, run_concurrently
from ppl.stdlib.lm.small import SmallLM
from ppl.stdlib.lm.toy import ToyLM

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::ppl.semantics.errors.PPLDiagnosticWarning")

CHARS = list(" abcdefghijklmnopqrstuvwxyz.")

STEPS = ppl.model('''
def m(lm, prompt, n):
    toks = lm.encode(prompt)
    for t in range(n):
        tok ~ lm.next_token(toks, allowed=lambda v: not ("e" in v))
        toks = toks + [tok]
    return lm.decode(toks)
''')


class _CharTokenizer:
    """A character tokenizer with the interface HFCausalLM uses (no download)."""

    eos_token_id = 0

    def __init__(self, chars):
        self.itos = ["<eos>"] + list(chars)
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.stoi[c] for c in text]}

    def decode(self, ids, **kw):
        return "".join(self.itos[i] if i else "" for i in ids)


def small_lm(**kw) -> SmallLM:
    """A randomly initialised small GRU (seeded): the same weights every time."""
    return SmallLM(CHARS, embed=16, hidden=32, seed=3, **kw)


_GPT2 = {}


def hf_lm(**kw):
    """HFCausalLM over one tiny randomly initialised GPT-2 built from a config."""
    transformers = pytest.importorskip("transformers")
    from ppl.stdlib.lm.hf import HFCausalLM
    if "model" not in _GPT2:
        g = torch.Generator().manual_seed(0)
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(CHARS) + 1, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        _GPT2["model"] = model
    return HFCausalLM(_GPT2["model"], _CharTokenizer(CHARS), **kw)


BACKENDS = {"toy": ToyLM, "small": small_lm, "hf": hf_lm}


class Recorder(LanguageModel):
    """A backend that records every call: (contexts, the answer)."""

    def __init__(self, lm, poison: int | None = None):
        self.lm, self.calls, self.poison = lm, [], poison
        self.name, self.eos_id = lm.name, lm.eos_id

    @property
    def vocab_size(self):
        return self.lm.vocab_size

    def encode(self, text):
        return self.lm.encode(text)

    def decode(self, ids):
        return self.lm.decode(ids)

    def next_logprobs(self, contexts):
        if self.poison is not None and any(self.poison in c for c in contexts):
            raise PPLError(f"poisoned context (token {self.poison})")
        out = self.lm.next_logprobs(contexts)
        self.calls.append((list(contexts), out.clone()))
        return out


# ------------------------------------------------------------------------ routing
@pytest.mark.parametrize("kind", ["toy", "small", "hf"])
def test_each_request_receives_exactly_its_rows_of_one_backend_call(kind):
    """Three requests (overlapping contexts, different orders, repeats) waiting at once
    are one backend call of their distinct contexts; each request's answer is exactly
    (torch.equal) the call's rows for its contexts, in its order."""
    base = BACKENDS[kind]()
    ids = base.encode(" the cat") if kind == "toy" else base.encode("a cat")
    p = tuple(ids)
    reqs = [[p, p[:1], p + (1,)], [p[:1], p + (2,), p[:1], p], [p + (1,)]]
    rec = Recorder(base)
    with BatchingLM(rec, max_wait_ms=10_000) as lm, lm.client(), lm.client(), lm.client():
        futs = [lm.submit(r) for r in reqs]  # the third client's request completes the tick
        outs = [f.result(timeout=30) for f in futs]
    assert len(rec.calls) == 1
    ctxs, answer = rec.calls[0]
    assert ctxs == [p, p[:1], p + (1,), p + (2,)]  # distinct, in order of first appearance
    for r, out in zip(reqs, outs):
        assert out.shape == (len(r), base.vocab_size)
        assert torch.equal(out, answer[[ctxs.index(c) for c in r]])
    assert lm.stats.ticks == 1 and lm.stats.full_ticks == 1 and lm.stats.max_requests_per_tick == 3
    # and the same as asking the backend alone, to float32 rounding (bitwise for the exact toy LM)
    fresh = BACKENDS[kind]()
    for r, out in zip(reqs, outs):
        alone = fresh.next_logprobs(r)
        if kind == "toy":
            assert torch.equal(out, alone)
        else:
            assert float((out - alone).abs().max()) < 1e-5


def _fingerprint(res):
    return (res.log_evidence, [float(w) for w in res.log_weights], res.samples)


@pytest.mark.parametrize("kind", ["toy", "small", "hf"])
def test_concurrent_smc_runs_equal_the_same_runs_made_alone(kind):
    """Four seeded SMC runs of a DSL program in four threads through one batcher give the
    runs made one after another on the backend directly: bit for bit on the exact toy LM;
    the same particles, with log evidences within 1e-5, on the float32 backends."""
    prompt = " the" if kind == "toy" else "a"
    n = 3 if kind == "toy" else 4

    def query(lm, seed):
        return STEPS.run("smc", {"lm": lm, "prompt": prompt, "n": n}, particles=16, seed=seed)
    alone = [query(BACKENDS[kind](), s) for s in range(4)]
    backend = BACKENDS[kind]()
    with BatchingLM(backend, max_wait_ms=200) as lm:
        together = run_concurrently(lm, [lambda s=s: query(lm, s) for s in range(4)])
        st = lm.stats
    assert st.ticks < st.requests and st.max_requests_per_tick >= 2  # calls were shared
    for a, b in zip(alone, together):
        fa, fb = _fingerprint(a), _fingerprint(b)
        assert fa[2] == fb[2]  # the same particles
        if kind == "toy":
            assert fa == fb
        else:
            assert abs(fa[0] - fb[0]) < 1e-5 and max(abs(x - y) for x, y in zip(fa[1], fb[1])) < 1e-5


def test_asyncio_tasks_share_ticks_and_get_their_rows():
    """Five asyncio tasks, each a hand-written greedy decoding loop awaiting
    anext_logprobs: one tick per step for all five, each the same tokens as alone."""
    base = ToyLM()
    starts = [" the", " a", " cat", " dog", " the dog"]

    def greedy_alone(prompt):
        ctx = tuple(base.encode(prompt))
        for _ in range(4):
            ctx += (int(base.next_logprobs([ctx])[0].argmax()),)
        return ctx

    async def greedy(lm, prompt):
        ctx = tuple(lm.encode(prompt))
        for _ in range(4):
            ctx += (int((await lm.anext_logprobs([ctx]))[0].argmax()),)
        return ctx

    async def main(lm):
        with lm.client(), lm.client(), lm.client(), lm.client(), lm.client():
            return await asyncio.gather(*(greedy(lm, p) for p in starts))
    with BatchingLM(base, max_wait_ms=10_000) as lm:
        got = asyncio.run(main(lm))
        assert lm.stats.ticks == 4 and lm.stats.requests == 20
    assert got == [greedy_alone(p) for p in starts]


def test_exact_backend_passes_through_for_enumeration():
    lm = BatchingLM(ToyLM())
    try:
        data = {"prompt": " the", "n": 2}
        e1 = STEPS.run("enumerate", {**data, "lm": lm})
        e2 = STEPS.run("enumerate", {**data, "lm": ToyLM()})
        assert e1.probs() == e2.probs() and e1.log_evidence == e2.log_evidence
    finally:
        lm.close()


# ----------------------------------------------------------------------- bounds
def test_max_batch_bounds_the_rows_of_a_tick():
    """Requests are never split: ticks take whole requests while they fit in max_batch;
    one larger than max_batch runs alone."""
    rec = Recorder(ToyLM())
    v = rec.lm.encode(" the cat runs")
    with BatchingLM(rec, max_batch=4, max_wait_ms=10_000) as lm:
        with lm.client(), lm.client(), lm.client(), lm.client():
            reqs = [[(v[0],), (v[1],), (v[2],)], [(v[1],), (v[0], v[1])],
                    [(v[2], v[1]), (v[2], v[0])], [(i,) for i in range(rec.lm.vocab_size)]]
            futs = [lm.submit(r) for r in reqs]
            outs = [f.result(timeout=30) for f in futs]
        sizes = [len(c) for c, _ in rec.calls]
        assert sizes == [4, 2, rec.lm.vocab_size]  # {r0 + r1: 4 distinct}, {r2}, {r3 alone}
        assert lm.stats.size_ticks >= 1 and lm.stats.max_rows_per_tick == rec.lm.vocab_size
    for r, out in zip(reqs, outs):
        assert torch.equal(out, ToyLM().next_logprobs(r))


def test_max_wait_bounds_the_wait_for_more_requests():
    """Without registered clients, a lone request waits max_wait_ms for company, then its
    tick fires; with max_wait_ms=0 it fires at once."""
    for wait_ms in (80, 0):
        with BatchingLM(ToyLM(), max_wait_ms=wait_ms) as lm:
            t0 = time.perf_counter()
            lm.next_logprobs([(1,)])
            took = time.perf_counter() - t0
            assert lm.stats.ticks == 1
            if wait_ms:
                assert took >= 0.075 and lm.stats.timed_out_ticks == 1
            else:
                assert took < 0.075


def test_bad_settings_are_errors():
    for kw in ({"max_batch": 0}, {"max_batch": 2.5}, {"max_wait_ms": -1}, {"max_wait_ms": float("nan")}):
        with pytest.raises(PPLError, match="max_"):
            BatchingLM(ToyLM(), **kw)
    with pytest.raises(PPLError, match="LanguageModel"):
        BatchingLM(object())


# ----------------------------------------------------------------------- errors
def test_a_backend_error_reaches_only_the_request_that_caused_it():
    """One tick of three requests, the second poisoned: it receives the backend's error
    (the same exception), the others their rows; the batcher keeps serving."""
    rec = Recorder(ToyLM(), poison=5)
    with BatchingLM(rec, max_wait_ms=10_000) as lm:
        with lm.client(), lm.client(), lm.client():
            futs = [lm.submit([(1,), (2,)]), lm.submit([(3, 5)]), lm.submit([(2,)])]
            with pytest.raises(PPLError, match="poisoned context"):
                futs[1].result(timeout=30)
            assert torch.equal(futs[0].result(timeout=30), ToyLM().next_logprobs([(1,), (2,)]))
            assert torch.equal(futs[2].result(timeout=30), ToyLM().next_logprobs([(2,)]))
        assert lm.stats.errors == 1 and lm.stats.isolated_retries == 3
        with lm.client():
            assert torch.equal(lm.next_logprobs([(4,)]), ToyLM().next_logprobs([(4,)]))  # still serving
            with pytest.raises(PPLError, match="poisoned"):  # and a lone failing request gets its error
                lm.next_logprobs([(5,)])
        assert lm.stats.errors == 2 and lm.stats.isolated_retries == 3


def test_a_failing_query_among_concurrent_smc_runs():
    """Four SMC runs in threads; the backend rejects every context of one of them (its
    prompt holds the poisoned token): that run fails with the backend's error, the other
    three equal their runs made alone."""
    base = ToyLM()
    poison = base.encode(" tree")[0]  # has an "e": never drawn under the constraint
    prompts = [" the", " a", " tree", " cat"]

    def query(lm, i):
        return STEPS.run("smc", {"lm": lm, "prompt": prompts[i], "n": 2}, particles=8, seed=i)
    with BatchingLM(Recorder(base, poison=poison), max_wait_ms=200) as lm:
        out = run_concurrently(lm, [lambda i=i: query(lm, i) for i in range(4)], return_exceptions=True)
    assert isinstance(out[2], PPLError) and "poisoned context" in str(out[2])
    for i in (0, 1, 3):
        assert _fingerprint(out[i]) == _fingerprint(query(ToyLM(), i))
    with BatchingLM(Recorder(base, poison=poison)) as lm:  # without return_exceptions: raised after all end
        with pytest.raises(PPLError, match="poisoned context"):
            run_concurrently(lm, [lambda i=i: query(lm, i) for i in range(4)])


def test_a_wrong_shape_from_the_backend_is_an_error():
    class Broken(Recorder):
        def next_logprobs(self, contexts):
            return self.lm.next_logprobs(contexts)[:1]
    with BatchingLM(Broken(ToyLM())) as lm:
        with pytest.raises(PPLError, match="returned"):
            lm.next_logprobs([(1,), (2,)])


# ---------------------------------------------------------------------- shutdown
def test_close_serves_what_waits_then_refuses():
    lm = BatchingLM(ToyLM(), max_wait_ms=10_000)
    fut = lm.submit([(1,)])  # would wait 10 s for company; closing fires it now
    t0 = time.perf_counter()
    lm.close()
    assert time.perf_counter() - t0 < 5 and lm.closed
    assert torch.equal(fut.result(timeout=1), ToyLM().next_logprobs([(1,)]))
    with pytest.raises(PPLError, match="takes no more requests"):
        lm.next_logprobs([(1,)])
    lm.close()  # twice is fine
    assert not any(t.name.startswith("BatchingLM(") and t.is_alive() for t in threading.enumerate()
                   if t is lm._worker)


def test_the_text_api_passes_through():
    base = ToyLM()
    with BatchingLM(base) as lm:
        assert lm.vocab_size == base.vocab_size and lm.eos_id == base.eos_id and lm.name == base.name
        assert lm.encode(" the cat") == base.encode(" the cat") and lm.decode([1, 2]) == base.decode([1, 2])
        assert lm.token_text(3) == base.token_text(3)
        assert lm.next_logprobs([]).shape == (0, base.vocab_size)


def test_the_caller_completing_a_tick_runs_it_itself():
    """With one registered client each request completes its tick: the backend runs in the
    caller's thread (no hand-over to the worker); a request that waits for company is run
    by the worker."""
    seen = []

    class Where(Recorder):
        def next_logprobs(self, contexts):
            seen.append(threading.current_thread())
            return super().next_logprobs(contexts)
    with BatchingLM(Where(ToyLM()), max_wait_ms=20) as lm:
        with lm.client():
            lm.next_logprobs([(1,)])
            lm.next_logprobs([(2,)])
        assert seen == [threading.current_thread()] * 2
        lm.next_logprobs([(3,)])  # no client registered: the worker fires it after 20 ms
        assert seen[-1] is lm._worker and lm.stats.timed_out_ticks == 1 and lm.stats.full_ticks == 2


# ------------------------------------------------------------- on a CUDA GPU (scripts/gpu_check.sh)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["small", "hf"])
def test_cuda_backend_serves_concurrent_queries_like_cpu(kind):
    """The backend on the GPU behind a batcher: each request's rows on the GPU equal the
    CPU backend's to 1e-4, and four concurrent SMC runs give the CPU runs' particles."""
    if kind == "small":
        gpu = small_lm(device="cuda")
    else:
        from ppl.stdlib.lm.hf import HFCausalLM
        hf_lm()  # builds the CPU model
        gpu = HFCausalLM(copy.deepcopy(_GPT2["model"]), _CharTokenizer(CHARS), device="cuda")
    cpu = BACKENDS[kind]()
    p = tuple(cpu.encode("a cat"))
    ctxs = [p, p[:2], p + (3,), p + (4, 5)]
    with BatchingLM(gpu, max_wait_ms=10_000) as lm, lm.client(), lm.client():
        f1, f2 = lm.submit(ctxs[:3]), lm.submit(ctxs[2:])
        a, b = f1.result(timeout=120), f2.result(timeout=120)
    assert a.device.type == "cuda" and b.device.type == "cuda"
    assert float((a.cpu() - cpu.next_logprobs(ctxs[:3])).abs().max()) < 1e-4
    assert float((b.cpu() - cpu.next_logprobs(ctxs[2:])).abs().max()) < 1e-4

    def query(lm, seed):
        return STEPS.run("smc", {"lm": lm, "prompt": "a", "n": 4}, particles=16, seed=seed)
    alone = [query(BACKENDS[kind](), s) for s in range(4)]
    with BatchingLM(gpu, max_wait_ms=200) as lm:
        together = run_concurrently(lm, [lambda s=s: query(lm, s) for s in range(4)])
    for x, y in zip(alone, together):
        assert x.samples == y.samples and abs(x.log_evidence - y.log_evidence) < 1e-4


def test_a_registered_client_that_does_not_ask_does_not_stall_the_others():
    """Two clients registered, one asks: its tick fires after max_wait_ms, not never."""
    with BatchingLM(ToyLM(), max_wait_ms=30) as lm, lm.client(), lm.client():
        t0 = time.perf_counter()
        out = lm.next_logprobs([(2,)])
        assert time.perf_counter() - t0 >= 0.025 and lm.stats.timed_out_ticks == 1
        assert torch.equal(out, ToyLM().next_logprobs([(2,)]))
