"""The neural LM backends (stdlib/lm/hf.py, stdlib/lm/small.py) and their prefix cache
(stdlib/lm/cache.py): answers equal an uncached, unbatched forward pass of each context;
the cache is actually reused (fed tokens, hits) and stays bounded; everything offline.

The Hugging Face models are tiny, randomly initialised GPT-2s built here from a config,
with a word-level tokenizer built here from a vocabulary (no download), saved with
save_pretrained to a temporary directory and loaded back through the backends."""
from __future__ import annotations

import math
import random
import socket

import pytest
import torch

from ppl.semantics.errors import PPLError
from ppl.stdlib.lm.base import LanguageModel, RewardModel
from ppl.stdlib.lm.small import SmallLM, stdlib_corpus, train

transformers = pytest.importorskip("transformers")
from ppl.stdlib.lm.hf import HFCausalLM, HFRewardModel  # noqa: E402

torch.set_num_threads(1)

WORDS = ("the a cat dog bird sat ran flew on under over mat tree roof and then quickly slowly "
         "far away home . ,").split()


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="[EOS]"), len(vocab)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    tok, v = _tokenizer()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=v, n_positions=64,
                                  bos_token_id=2, eos_token_id=2, pad_token_id=0)
    lm_dir = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    rm_dir = tmp_path_factory.mktemp("gpt2rm")
    transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=v, n_positions=64, num_labels=1,
                                pad_token_id=0, bos_token_id=2, eos_token_id=2)).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    rm2_dir = tmp_path_factory.mktemp("gpt2rm2")
    transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=v, n_positions=64, num_labels=2,
                                pad_token_id=0, bos_token_id=2, eos_token_id=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                label2id={"NEGATIVE": 0, "POSITIVE": 1})).save_pretrained(rm2_dir)
    tok.save_pretrained(rm2_dir)
    return {"lm": str(lm_dir), "rm": str(rm_dir), "rm2": str(rm2_dir)}


@pytest.fixture(scope="module")
def small_lm():
    corpus = stdlib_corpus(max_chars=60_000)
    return train(corpus, steps=40, seed=0, embed=16, hidden=64, seq_len=48, batch=16)


def _hf_reference(lm: HFCausalLM):
    """An uncached, unbatched forward pass of one context."""
    def ref(ctx):
        with torch.no_grad():
            ids = torch.tensor([list(lm.prefix_ids) + list(ctx)], device=lm.device)
            logits = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            return torch.log_softmax(logits[0, -1].float(), -1)
    return ref


def _small_reference(lm: SmallLM):
    def ref(ctx):
        with torch.no_grad():
            x = torch.tensor([[lm.bos_input] + list(ctx)], device=lm.device)
            out, _ = lm.net.gru(lm.net.emb(x))
            return torch.log_softmax(lm.net.head(out[0, -1]), -1)
    return ref


@pytest.fixture(params=["hf", "small"])
def backend(request, hf_dirs, small_lm):
    """(a fresh LM with its own cache, the single-context reference, the shortest context)."""
    def make(**kw):
        if request.param == "hf":
            lm = HFCausalLM(hf_dirs["lm"], **kw)
            return lm, _hf_reference(lm), 1
        lm = SmallLM(small_lm.chars, **small_lm.hparams, **kw)
        lm.net.load_state_dict(small_lm.net.state_dict())
        return lm, _small_reference(lm), 0
    return make


def _max_err(out, ctxs, ref):
    return max(float((out[i] - ref(c)).abs().max()) for i, c in enumerate(ctxs))


# --------------------------------------------------------------- generic, both backends
def test_rows_normalised_and_cached_batched_equals_uncached_single(backend):
    lm, ref, lo = backend()
    assert isinstance(lm, LanguageModel)
    rng = random.Random(1)
    V = lm.vocab_size
    ctxs = [tuple(rng.randrange(V) for _ in range(rng.randint(lo, 12))) for _ in range(12)]
    errs = []
    for step in range(4):
        out = lm.next_logprobs(ctxs)
        assert out.shape == (len(ctxs), V) and out.dtype == torch.float32
        assert torch.allclose(out.logsumexp(-1), torch.zeros(len(ctxs)), atol=1e-5)
        errs.append(_max_err(out, ctxs, ref))
        # next call: mixed lengths — one new token, several new tokens, exact repeats,
        # a proper prefix of a cached context, an unrelated context
        nxt = []
        for c in ctxs:
            k = rng.random()
            if k < 0.4:
                nxt.append(c + (rng.randrange(V),))
            elif k < 0.6:
                nxt.append(c + tuple(rng.randrange(V) for _ in range(rng.randint(2, 5))))
            elif k < 0.75:
                nxt.append(c)
            elif k < 0.9 and len(c) > lo + 1:
                nxt.append(c[:len(c) - 1])
            else:
                nxt.append(tuple(rng.randrange(V) for _ in range(rng.randint(max(lo, 1), 6))))
        ctxs = [c[-40:] if len(c) > 40 else c for c in nxt]
    assert max(errs) < 1e-5, errs
    st = lm.cache_stats
    assert st.prefix_hits > 0 and st.hits > 0 and st.forward_passes == 4


def test_one_batched_forward_pass_per_call(backend):
    lm, _, lo = backend()
    calls = []
    orig = lm._compute
    lm._compute = lambda items: (calls.append(len(items)), orig(items))[1]
    lm.next_logprobs([(3,) * k for k in range(max(lo, 1), 9)])
    lm.next_logprobs([(3,) * k + (4,) for k in range(max(lo, 1), 9)] + [(5, 6, 7, 8)])
    assert calls == [8, 9]


def test_cache_reuse_and_sharing_after_resampling(backend):
    """SMC-shaped use: the prompt is computed once for all particles; each later step
    feeds exactly one token per distinct context; resampled copies are computed once."""
    lm, ref, _ = backend()
    N, prompt = 16, (3, 4, 5, 6, 7, 8)
    g = torch.Generator().manual_seed(0)
    out = lm.next_logprobs([prompt] * N)
    st = lm.cache_stats
    assert (st.unique, st.misses, st.fed_tokens) == (1, 1, len(prompt))
    ctxs = [prompt] * N
    for step in range(6):
        tok = torch.multinomial(out.exp(), 1, generator=g)[:, 0].tolist()
        ctxs = [c + (t,) for c, t in zip(ctxs, tok)]
        anc = torch.randint(0, N, (N,), generator=g).tolist()  # resample: copies share a context
        ctxs = [ctxs[a] for a in anc]
        before = lm.cache_stats.as_dict()
        out = lm.next_logprobs(ctxs)
        after = lm.cache_stats.as_dict()
        distinct = len(set(ctxs))
        assert after["fed_tokens"] - before["fed_tokens"] == distinct      # one new token each
        assert after["prefix_hits"] - before["prefix_hits"] == distinct
        assert after["misses"] == before["misses"]                         # the prompt is never recomputed
        assert _max_err(out, ctxs, ref) < 1e-5
    before = lm.cache_stats.as_dict()
    again = lm.next_logprobs(ctxs)  # the same contexts again: no forward pass at all
    assert torch.equal(again, out)
    assert lm.cache_stats.forward_passes == before["forward_passes"]
    assert lm.cache_stats.hits - before["hits"] == len(set(ctxs))


def test_eviction_bounds_memory(backend):
    """Entries unused for keep_calls calls are dropped, so a long run holds keep_calls + 1
    generations of contexts (this call's, the prefixes it extended, and older ones still
    within keep_calls); a byte budget caps it further; answers stay exact."""
    N, T = 8, 30
    for keep in (1, 2):
        lm, ref, _ = backend(keep_calls=keep)
        g = torch.Generator().manual_seed(1)
        ctxs = [(3, 4)] * N
        sizes = []
        for step in range(T):
            out = lm.next_logprobs(ctxs)
            sizes.append(len(lm.cache))
            tok = torch.multinomial(out.exp(), 1, generator=g)[:, 0].tolist()
            ctxs = [c + (t,) for c, t in zip(ctxs, tok)]
        assert max(sizes) <= (keep + 1) * N, sizes
        assert lm.cache_stats.evictions > 0
        assert all(len(k) >= len(ctxs[0]) - keep - 1 for k in lm.cache.entries)
    # a byte budget of about one generation: after each call only what that call touched stays
    lm2, ref2, _ = backend(keep_calls=100, max_cache_bytes=1)
    ctxs = [(3, 4)] * N
    for step in range(10):
        out = lm2.next_logprobs(ctxs)
        touched = sum(e.nbytes for e in lm2.cache.entries.values() if e.last_used == lm2.cache.call)
        assert lm2.cache.nbytes == touched
        assert len(lm2.cache) <= 2 * N
        assert _max_err(out, ctxs, ref2) < 1e-5
        tok = torch.multinomial(out.exp(), 1, generator=g)[:, 0].tolist()
        ctxs = [c + (t,) for c, t in zip(ctxs, tok)]


def test_uncached_mode_is_the_same_answer(backend):
    lm, ref, _ = backend(use_cache=False)
    ctxs = [(3, 4, 5), (3, 4), (6,), (3, 4, 5)]
    out = lm.next_logprobs(ctxs)
    assert len(lm.cache) == 0 and _max_err(out, ctxs, ref) < 1e-5
    assert torch.equal(out[0], out[3])


def test_bad_token_ids_are_ppl_errors(backend):
    lm, _, _ = backend()
    with pytest.raises(PPLError, match="token id"):
        lm.next_logprobs([(3, lm.vocab_size)])
    with pytest.raises(PPLError, match="token id"):
        lm.next_logprobs([(3, -1)])
    with pytest.raises(PPLError, match="token id"):
        lm.next_logprobs([(3, "x")])


# ------------------------------------------------------------------------ Hugging Face
def test_hf_loads_from_directory_text_api(hf_dirs):
    lm = HFCausalLM(hf_dirs["lm"])
    ids = lm.encode("the cat sat on the mat")
    assert len(ids) == 6 and lm.decode(ids) == "the cat sat on the mat"
    assert lm.token_text(ids[1]) == "cat"
    assert lm.eos_id == 2 and lm.vocab_size == len(WORDS) + 3
    assert lm.name == "hf:gpt2"


def test_hf_empty_context_and_prefix_ids(hf_dirs):
    lm = HFCausalLM(hf_dirs["lm"])
    with pytest.raises(PPLError, match="empty context"):
        lm.next_logprobs([()])
    lm = HFCausalLM(hf_dirs["lm"], prefix_ids=(2,))
    ref = _hf_reference(lm)
    out = lm.next_logprobs([(), (3,), (3, 4)])
    assert _max_err(out, [(), (3,), (3, 4)], ref) < 1e-5
    out = lm.next_logprobs([(3, 4, 5), (6,)])
    assert _max_err(out, [(3, 4, 5), (6,)], ref) < 1e-5


def test_hf_too_long_context(hf_dirs):
    lm = HFCausalLM(hf_dirs["lm"])
    with pytest.raises(PPLError, match="longer than the model's 64 positions"):
        lm.next_logprobs([(3,) * 65])


def test_hf_local_files_only_no_network(tmp_path, monkeypatch):
    """A missing model is a PPLError, and loading never opens a connection."""
    def no_network(*a, **k):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(PPLError, match="cannot load") as e:
        HFCausalLM(str(tmp_path / "no-such-model"))
    assert "never downloads" in str(e.value)
    with pytest.raises(PPLError, match="cannot load"):
        HFCausalLM("some-org/some-model-that-is-not-cached")
    with pytest.raises(PPLError, match="cannot load"):
        HFRewardModel(str(tmp_path))  # an empty directory


def test_hf_device_is_threaded(hf_dirs):
    """Every tensor the backend feeds the model is on lm.device, and so are its answers
    and cached states: device="cuda" runs this same code (no GPU here)."""
    lm = HFCausalLM(hf_dirs["lm"], device=torch.device("cpu"))
    seen = []
    orig = lm.model.forward

    def spy(**kw):
        seen.extend(v.device for v in kw.values() if isinstance(v, torch.Tensor))
        seen.extend(t.device for layer in kw[lm._cache_kwarg].layers if layer.is_initialized
                    for t in (layer.keys, layer.values))
        return orig(**kw)
    lm.model.forward = spy
    lm.next_logprobs([(3, 4)])
    out = lm.next_logprobs([(3, 4, 5), (3, 4, 6, 7)])
    assert seen and all(d == lm.device for d in seen)
    assert out.device == lm.device
    assert all(e.state.device == lm.device for e in lm.cache.entries.values())
    assert next(lm.model.parameters()).device == lm.device
    assert HFCausalLM(hf_dirs["lm"], device="auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_hf_dtype(hf_dirs):
    lm = HFCausalLM(hf_dirs["lm"], dtype=torch.float64)
    assert lm.dtype == torch.float64
    out = lm.next_logprobs([(3, 4), (5,)])
    assert out.dtype == torch.float32 and torch.allclose(out.logsumexp(-1), torch.zeros(2), atol=1e-6)


def test_hf_accepts_loaded_model_objects(hf_dirs):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["lm"], local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dirs["lm"], local_files_only=True)
    lm = HFCausalLM(model, tok)
    assert _max_err(lm.next_logprobs([(3, 4)]), [(3, 4)], _hf_reference(lm)) < 1e-5
    with pytest.raises(PPLError, match="needs a tokenizer"):
        HFCausalLM(model)


def test_hf_reward_model(hf_dirs):
    rm = HFRewardModel(hf_dirs["rm"])
    assert isinstance(rm, RewardModel)
    prompts = ["the cat", "a dog ran", "the bird", "the cat"]
    texts = ["sat on the mat .", "home", "flew far away over the tree and then home .", "sat"]
    s = rm.score(prompts, texts)
    assert s.shape == (4,) and s.dtype == torch.float32
    singles = torch.cat([rm.score([p], [t]) for p, t in zip(prompts, texts)])
    assert float((s - singles).abs().max()) < 1e-5  # right padding does not change a score
    with torch.no_grad():  # = the model's single logit on the pair encoding
        enc = rm.tokenizer(prompts[2], texts[2], return_tensors="pt")
        assert abs(float(rm.model(**enc).logits[0, 0]) - float(s[2])) < 1e-5
    tpl = HFRewardModel(hf_dirs["rm"], template="{prompt} {text}")
    assert float((tpl.score(prompts, texts) - s).abs().max()) < 1e-5  # word-level: the same tokens
    assert rm.score([], []).shape == (0,)
    with pytest.raises(PPLError, match="2 prompts for 1 texts"):
        rm.score(["a", "b"], ["c"])


def test_hf_reward_model_labels(hf_dirs):
    with pytest.raises(PPLError, match="2 labels; say which"):
        HFRewardModel(hf_dirs["rm2"])
    with pytest.raises(PPLError, match="no label 'GOOD'"):
        HFRewardModel(hf_dirs["rm2"], label="GOOD")
    pos = HFRewardModel(hf_dirs["rm2"], label="POSITIVE")
    neg = HFRewardModel(hf_dirs["rm2"], label=0)
    with torch.no_grad():
        enc = pos.tokenizer(["the cat"], ["sat"], return_tensors="pt")
        logits = pos.model(**enc).logits[0]
    assert abs(float(pos.score(["the cat"], ["sat"])[0]) - float(logits[1])) < 1e-5
    assert abs(float(neg.score(["the cat"], ["sat"])[0]) - float(logits[0])) < 1e-5


# ------------------------------------------------------------------------- the small LM
def test_stdlib_corpus_is_deterministic():
    a, b = stdlib_corpus(), stdlib_corpus()
    assert a == b and len(a) > 500 and sum(map(len, a)) > 100_000
    assert all(d.isascii() for d in a)
    assert stdlib_corpus(max_chars=10_000) == a[:len(stdlib_corpus(max_chars=10_000))]


def test_small_training_lowers_the_loss_and_is_reproducible(small_lm):
    """40 steps (about 1 s): the training loss falls from log V (uniform) to well below
    it, and held-out docstrings score well below uniform too."""
    info = small_lm.train_info
    uniform = math.log(small_lm.vocab_size)
    first, last = info["losses"][0], sum(info["losses"][-5:]) / 5
    held_out = stdlib_corpus(modules=("email.message", "http.cookies"), max_chars=5_000)
    held = small_lm.loss(held_out)
    print(f"\nsmall LM: V={small_lm.vocab_size} params={small_lm.num_parameters} log V={uniform:.3f} "
          f"first loss={first:.3f} last={last:.3f} held-out={held:.3f} nats/char ({info['seconds']:.1f}s)")
    assert abs(first - uniform) < 0.3
    assert last < uniform - 1.0
    assert held < uniform - 0.8
    again = train(stdlib_corpus(max_chars=60_000), steps=40, seed=0, embed=16, hidden=64, seq_len=48, batch=16)
    assert again.chars == small_lm.chars
    for (k, v), (k2, v2) in zip(small_lm.net.state_dict().items(), again.net.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    other = train(stdlib_corpus(max_chars=60_000), steps=3, seed=1, embed=16, hidden=64, seq_len=48, batch=16)
    assert not torch.equal(other.net.head.weight, small_lm.net.head.weight)


def test_small_save_load_round_trip(small_lm, tmp_path):
    path = tmp_path / "small.pt"
    small_lm.save(path)
    lm = SmallLM.load(path)
    assert lm.chars == small_lm.chars and lm.hparams == small_lm.hparams
    assert lm.train_info["steps"] == 40
    ctxs = [(), tuple(lm.encode("Return the ")), tuple(lm.encode("x"))]
    assert torch.equal(lm.next_logprobs(ctxs), small_lm.__class__.next_logprobs(small_lm, ctxs))
    with pytest.raises(PPLError, match="no small LM"):
        SmallLM.load(tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(PPLError, match="not a saved SmallLM"):
        SmallLM.load(tmp_path / "other.pt")


def test_small_text_api(small_lm):
    text = "Return a new list."
    ids = small_lm.encode(text)
    assert small_lm.decode(ids) == text and len(ids) == len(text)
    assert small_lm.eos_id == 0 and small_lm.token_text(0) == ""
    assert small_lm.decode(small_lm.encode("\u00e9")) == "\ufffd"  # outside the vocabulary
    assert small_lm.next_logprobs([()]).shape == (1, small_lm.vocab_size)  # the empty context


def test_small_device_is_threaded(small_lm):
    """The whole next_logprobs path on torch's "meta" device: any tensor made on the CPU
    by mistake would fail to mix with it, as it would with "cuda"."""
    lm = SmallLM(small_lm.chars, **small_lm.hparams, device="meta")
    out = lm.next_logprobs([(), (3, 4)])
    out = lm.next_logprobs([(3, 4, 5), (3, 4, 5, 6, 7), (9,)])
    assert out.device.type == "meta" and out.shape == (3, lm.vocab_size)
    assert all(e.state.device.type == "meta" for e in lm.cache.entries.values())


# ---------------------------------------------------------------- through the DSL's SMC
STEER = '''
def gen(lm, prompt, T):
    toks = lm.encode(prompt)
    for t in range(T):
        tok ~ lm.next_token(toks, allowed=lambda v: not ("x" in v))
        toks = toks + [tok]
    return lm.decode(toks)
'''


def test_backends_drive_a_dsl_program(backend):
    """lm.next_token (stdlib/lm/dsl.py) over these backends in ppl's SMC: one backend
    call per step for all live particles, the prompt computed once, the rest one new
    token per distinct context."""
    import ppl
    lm, _, _ = backend()
    prompt = "the cat" if isinstance(lm, HFCausalLM) else "Return the "
    T = 5
    res = ppl.model(STEER).run("smc", {"lm": lm, "prompt": prompt, "T": T}, particles=12,
                               resampling="systematic", ess_threshold=1.0, seed=0)
    texts = list(res.samples["return"])
    assert len(texts) == 12 and all(t.startswith(prompt) and "x" not in t[len(prompt):] for t in texts)
    st = lm.cache_stats
    assert st.calls == st.forward_passes <= T
    assert st.misses == 1 and st.fed_tokens == len(lm.encode(prompt)) + st.prefix_hits
