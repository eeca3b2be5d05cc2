"""Loading files that are damaged, foreign or hostile (issue 9, items 6, 16 and 17): every
failure is a PPLError that names the file and what is wrong, a changed file never loads
silently (saved guides and small LMs carry a checksum of their contents), and a Hugging
Face directory can never make ppl run its Python code."""
from __future__ import annotations

import json
import os
import random
import zipfile

import pytest
import torch

import ppl
from ppl.semantics.errors import PPLError
from ppl.stdlib.files import CHECKSUM_KEY
from ppl.stdlib.lm.small import SmallLM, load_or_train

torch.set_num_threads(1)

MODEL = """
def m(ys):
    mu ~ normal(0, 5)
    s ~ gamma(2, 2)
    for y in ys:
        observe y ~ normal(mu, s)
    return mu
"""
DATA = {"ys": [1.0, 2.0, 0.5]}


@pytest.fixture(scope="module")
def guide_file(tmp_path_factory):
    """(model, path of a saved amortized guide with a few thousand weights, its state)."""
    m = ppl.model(MODEL)
    g = ppl.guide(m, DATA, encoder="auto", hidden=(16, 16))
    path = tmp_path_factory.mktemp("guide") / "g.pt"
    g.save(path)
    return m, path, {k: v.clone() for k, v in g.net.state_dict().items()}


def _storage_spans(path) -> list[tuple[int, int]]:
    """(start, end) byte offsets of the tensor storages inside a torch.save zip file."""
    spans = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as fh:
        for info in z.infolist():
            if "/data/" not in info.filename:
                continue
            fh.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
            start = info.header_offset + 30 + name_len + extra_len
            spans.append((start, start + info.compress_size))
    return spans


def _flip(raw: bytes, positions) -> bytes:
    out = bytearray(raw)
    for i in positions:
        out[i] ^= 0x5A
    return bytes(out)


def _resave_without_checksum(src, dst, change=None):
    """The saved blob as an older ppl wrote it (no checksum), optionally changed."""
    blob = torch.load(src, weights_only=True)
    del blob[CHECKSUM_KEY]
    if change:
        change(blob)
    torch.save(blob, dst)


# ------------------------------------------------------------------------ guides
def test_guide_with_64_flipped_weight_bytes_is_refused(guide_file, tmp_path):
    m, path, _ = guide_file
    raw = path.read_bytes()
    weights = [i for a, b in _storage_spans(path) for i in range(a, b)]
    assert len(weights) > 1000
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(_flip(raw, random.Random(0).sample(weights, 64)))
    with pytest.raises(PPLError, match="is corrupt: its contents do not match the checksum") as e:
        ppl.Guide.load(bad, m)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("seed", range(8))
def test_guide_with_64_flipped_bytes_anywhere_never_loads_changed(guide_file, tmp_path, seed):
    # wherever the flips land (zip headers, pickle, weights, padding), the guide either
    # fails to load with a PPLError or loads exactly the saved parameters
    m, path, state = guide_file
    raw = path.read_bytes()
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(_flip(raw, random.Random(seed).sample(range(len(raw)), 64)))
    try:
        g = ppl.Guide.load(bad, m)
    except PPLError as e:
        assert str(bad) in str(e)
        return
    assert all(torch.equal(v, state[k]) for k, v in g.net.state_dict().items())


def test_guide_saved_without_checksum_loads_with_a_warning(guide_file, tmp_path):
    m, path, state = guide_file
    old = tmp_path / "old.pt"
    _resave_without_checksum(path, old)
    with pytest.warns(UserWarning, match="has no checksum"):
        g = ppl.Guide.load(old, m)
    assert all(torch.equal(v, state[k]) for k, v in g.net.state_dict().items())


def test_guide_round_trip_keeps_checksum_and_loads_quietly(guide_file, recwarn):
    m, path, state = guide_file
    blob = torch.load(path, weights_only=True)
    assert len(blob[CHECKSUM_KEY]) == 64  # sha256 hex
    g = ppl.Guide.load(path, m)
    assert not [w for w in recwarn if "checksum" in str(w.message)]
    assert all(torch.equal(v, state[k]) for k, v in g.net.state_dict().items())


def test_guide_empty_directory_truncated_and_foreign_files(guide_file, tmp_path):
    m, path, _ = guide_file
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    cases = [(empty, "is empty \\(0 bytes\\)"), (tmp_path, "is a directory, not a saved guide"),
             (tmp_path / "missing.pt", "no guide file at")]
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    cases.append((trunc, "is damaged, truncated or not a saved guide"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04junk" * 10)
    cases.append((junk, "is damaged, truncated or not a saved guide"))
    listing = tmp_path / "list.pt"
    torch.save([1, 2], listing)
    cases.append((listing, "holds a list, not a dict"))
    for p, msg in cases:
        with pytest.raises(PPLError, match=msg) as e:
            ppl.Guide.load(p, m)
        assert str(p) in str(e.value)


@pytest.mark.parametrize("change, msg", [
    (lambda b: b.pop("state"), "has no 'state' entry"),
    (lambda b: b.pop("options"), "has no 'options' entry"),
    (lambda b: b.pop("entry"), "has no 'entry' entry"),
    (lambda b: b.__setitem__("options", 3), "bad 'options' entry: expected dict, got int"),
    (lambda b: b.__setitem__("state", "x"), "bad 'state' entry: expected a dict of tensors, got str"),
    (lambda b: b.__setitem__("history", 5), "bad 'history' entry: expected a list of numbers, got int"),
    (lambda b: b.__setitem__("family", 7), "bad 'family' entry"),
    (lambda b: b["options"].pop("hidden"), "has no 'hidden' entry"),
    (lambda b: b["options"].__setitem__("rank", "a"), "bad 'rank' entry: expected int, got str"),
    (lambda b: b.__setitem__("format", "something/9"), "is not a saved ppl guide"),
])
def test_guide_with_missing_or_mistyped_fields(guide_file, tmp_path, change, msg):
    m, path, _ = guide_file
    bad = tmp_path / "bad.pt"
    _resave_without_checksum(path, bad, change)
    with pytest.warns(UserWarning, match="no checksum"), pytest.raises(PPLError, match=msg):
        ppl.Guide.load(bad, m)


def test_program_guide_carries_a_checksum(tmp_path):
    m = ppl.model("def m(y):\n    mu ~ normal(0, 1)\n    observe y ~ normal(mu, 1)\n    return mu\n")
    g = ppl.guide(m, {"y": 1.0}, program="""
def q(y):
    loc = param("loc", 0.0)
    mu ~ normal(loc, 1)
""")
    path = tmp_path / "pg.pt"
    g.save(path)
    assert CHECKSUM_KEY in torch.load(path, weights_only=True)
    ppl.Guide.load(path, m, {"y": 1.0})
    _resave_without_checksum(path, tmp_path / "bad.pt", lambda b: b.pop("params"))
    with pytest.warns(UserWarning), pytest.raises(PPLError, match="has no 'params' entry"):
        ppl.Guide.load(tmp_path / "bad.pt", m, {"y": 1.0})


# ------------------------------------------------------------------------ small LM
@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    lm = SmallLM(list("abcdefgh "), embed=4, hidden=8, seed=0)
    path = tmp_path_factory.mktemp("small") / "small.pt"
    lm.save(path)
    return lm, path


def test_small_lm_round_trip_and_checksum(small_file, tmp_path):
    lm, path = small_file
    back = SmallLM.load(path)
    ctxs = [(), tuple(lm.encode("abc"))]
    assert torch.equal(back.next_logprobs(ctxs), lm.next_logprobs(ctxs))
    raw = path.read_bytes()
    weights = [i for a, b in _storage_spans(path) for i in range(a, b)]
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(_flip(raw, random.Random(1).sample(weights, 64)))
    with pytest.raises(PPLError, match="is corrupt"):
        SmallLM.load(bad)


def test_small_lm_bad_files(small_file, tmp_path, guide_file):
    _, path = small_file
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04junk" * 10)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(path.read_bytes()[:300])
    no_state = tmp_path / "no_state.pt"
    _resave_without_checksum(path, no_state, lambda b: b.pop("state_dict"))
    bad_hparams = tmp_path / "bad_hparams.pt"
    _resave_without_checksum(path, bad_hparams, lambda b: b["hparams"].__setitem__("hidden", 9))
    for p, msg in [(empty, "is empty"), (tmp_path, "is a directory"), (junk, "is damaged, truncated"),
                   (trunc, "is damaged, truncated"), (guide_file[1], "is not a saved SmallLM"),
                   (no_state, "has no 'state_dict' entry"), (bad_hparams, "does not describe a SmallLM")]:
        with pytest.raises(PPLError, match=msg) as e:
            SmallLM.load(p)
        assert str(p) in str(e.value)


def test_load_or_train_bad_paths(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(PPLError, match="is empty"):
        load_or_train(empty)
    with pytest.raises(PPLError, match="is a directory"):
        load_or_train(tmp_path)
    with pytest.raises(PPLError, match="does not exist"):
        load_or_train(tmp_path / "no" / "such" / "small.pt", steps=1)
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers")

WORDS = "the a cat dog sat on mat".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="[EOS]"), len(vocab)


def _config(v, **kw):
    return transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=v, n_positions=32,
                                   bos_token_id=2, eos_token_id=2, pad_token_id=0, **kw)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tok, v = _tokenizer()
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(_config(v)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_hf_truncated_or_empty_safetensors(hf_dir, tmp_path):
    from ppl.stdlib.lm.hf import HFCausalLM
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(hf_dir, d)
    weights = d / "model.safetensors"
    raw = weights.read_bytes()
    assert HFCausalLM(str(d)).vocab_size == len(WORDS) + 3
    for cut in (raw[:len(raw) // 2], raw[:len(raw) - 16], raw[:50], b""):
        weights.write_bytes(cut)
        with pytest.raises(PPLError, match="damaged or truncated") as e:
            HFCausalLM(str(d))
        assert str(d) in str(e.value)


def _crafted_dir(src, dst, *, model_class: str):
    """A copy of a saved model whose config asks for custom code (``auto_map``, an
    unknown model_type) in evil.py, which would write MARKER if it ever ran; the
    tokenizer config asks for custom code too."""
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "evilgpt"
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", model_class: "evil.EvilModel"}
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "evil.py").write_text(
        f"open({str(dst / 'MARKER')!r}, 'w').write('ran')\n"
        "from transformers import GPT2Config as EvilConfig, GPT2LMHeadModel as EvilModel\n"
        "from transformers import PreTrainedTokenizerFast as EvilTok\n")
    tok_dir = dst / "tok"
    tok_dir.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(dst / f, tok_dir / f)
    shutil.copy(dst / "evil.py", tok_dir / "evil.py")
    tcfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTok", "evil.EvilTok"]}
    tcfg["tokenizer_class"] = "EvilTok"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return dst


def test_hf_folder_with_custom_code_is_refused_without_a_prompt(hf_dir, tmp_path, monkeypatch):
    from ppl.stdlib.lm.hf import HFCausalLM, HFRewardModel
    lm_dir = _crafted_dir(hf_dir, tmp_path / "evil_lm", model_class="AutoModelForCausalLM")
    rm_dir = _crafted_dir(hf_dir, tmp_path / "evil_rm", model_class="AutoModelForSequenceClassification")
    prompts = []

    def yes(prompt=""):  # a user who would answer "y" to "run the custom code? [y/N]"
        prompts.append(prompt)
        return "y"
    monkeypatch.setattr("builtins.input", yes)
    good = transformers.GPT2LMHeadModel.from_pretrained(str(hf_dir))
    for make in (lambda: HFCausalLM(str(lm_dir)), lambda: HFRewardModel(str(rm_dir)),
                 lambda: HFCausalLM(good, tokenizer=str(lm_dir / "tok"))):
        with pytest.raises(PPLError, match="refusing to load .* needs custom Python code"):
            make()
    assert prompts == []
    assert not (lm_dir / "MARKER").exists() and not (rm_dir / "MARKER").exists()
    assert not (lm_dir / "tok" / "MARKER").exists()


def test_every_from_pretrained_call_refuses_remote_code(monkeypatch, hf_dir):
    from ppl.stdlib.lm import hf
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    real_tok = transformers.AutoTokenizer.from_pretrained

    def spy(real_fn):
        def f(path, **kw):
            seen.append(kw)
            return real_fn(path, **kw)
        return f
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy(real))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy(real_tok))
    hf.HFCausalLM(str(hf_dir))
    assert len(seen) == 2
    assert all(kw.get("trust_remote_code") is False and kw.get("local_files_only") is True for kw in seen)
