"""A small character-level language model that needs no download: trained in seconds on
CPU on text every Python installation has (the docstrings of a fixed list of standard
library modules), saved and loaded with ``torch.save``.

    from ppl.stdlib.lm.small import SmallLM, stdlib_corpus, train
    lm = train(stdlib_corpus(), steps=150, seed=0)     # ~15 s on one CPU thread
    lm.save("small.pt"); lm = SmallLM.load("small.pt")
    lm.next_logprobs([tuple(lm.encode("Return the ")), ()])   # [2, V], rows normalised

* Tokens: id 0 is end-of-sequence (``eos_id``, decodes to ""), id 1 stands for any
  character outside the vocabulary (decodes to U+FFFD), then one id per character seen at
  least twice in the training corpus, in code-point order. Deterministic: the same corpus
  gives the same vocabulary.
* Model: embedding -> GRU -> linear head (about 150K parameters at the defaults; the
  default 150 steps reach about 1.7 nats/char on the training stream and 1.9 on held-out
  docstrings, against log V = 4.6 for the uniform distribution). Every
  context is read after an implicit beginning-of-sequence input (an extra input id that is
  never an output), so the empty context has a distribution too.
* ``next_logprobs`` batches and caches like the transformer backend (``cache.py``): the
  "KV cache" of a recurrent net is its hidden state after a prefix, one small tensor per
  cached context; a context continues from the hidden state of its longest cached prefix,
  contexts with different numbers of new tokens go through one packed GRU call
  (``pack_padded_sequence``), and the common case of one new token each is one GRU step.
* Training is reproducible: ``train(corpus, steps, seed)`` seeds the parameters and the
  batch sampler from ``seed`` (same torch build and thread count: same weights).
  The corpus depends on the Python version (docstrings change between releases).
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
import time
import warnings
from collections import Counter
from typing import Iterable, Sequence

import torch
from torch import nn

from ...semantics.errors import PPLError
from ..files import check_fields, load_checked, save_checked
from .. import rng
from .cache import PrefixCachedLM

#: the standard-library modules whose docstrings make the default corpus (fixed order)
DEFAULT_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "heapq", "inspect",
    "io", "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle", "random", "re",
    "shlex", "shutil", "statistics", "string", "struct", "textwrap", "threading", "typing", "unittest",
    "urllib.parse", "uuid", "zipfile",
)

EOS, UNK = "<eos>", "<unk>"
_FORMAT = "ppl-small-lm/1"


def stdlib_corpus(modules: Iterable[str] = DEFAULT_MODULES, max_chars: int | None = None) -> list[str]:
    """The docstrings of ``modules``: each module's own, then those of its public
    functions and classes defined in it (sorted by name) and of their methods (sorted),
    each once, in that order; ASCII-only lines. Deterministic for a given Python."""
    docs: list[str] = []
    seen: set[str] = set()

    def add(obj):
        doc = getattr(obj, "__doc__", None)
        if not isinstance(doc, str):
            return
        doc = inspect.cleandoc(doc).strip()
        doc = "\n".join(line for line in doc.splitlines() if line.isascii())
        if len(doc) >= 20 and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io, ...) warn when touched
        for name in modules:
            _module_docs(importlib.import_module(name), add)
    if max_chars is not None:
        out, n = [], 0
        for d in docs:
            if n >= max_chars:
                break
            out.append(d)
            n += len(d) + 1
        docs = out
    return docs


def _module_docs(mod, add) -> None:
    add(mod)
    for attr in sorted(vars(mod)):
        if attr.startswith("_"):
            continue
        obj = vars(mod)[attr]
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        add(obj)
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                if not meth.startswith("_"):
                    add(vars(obj)[meth])


class _Net(nn.Module):
    def __init__(self, n_out: int, embed: int, hidden: int, layers: int):
        super().__init__()
        self.emb = nn.Embedding(n_out + 1, embed)  # the last input id is beginning-of-sequence
        self.gru = nn.GRU(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, n_out)


class SmallLM(PrefixCachedLM):
    """The small character-level GRU language model (see the module docstring).

    ``SmallLM(chars, embed=32, hidden=192, layers=1, seed=0, device="cpu")`` makes an
    untrained model over the vocabulary ``chars``; ``train`` makes a trained one."""

    eos_id = 0
    unk_id = 1

    def __init__(self, chars: Sequence[str], embed: int = 32, hidden: int = 192, layers: int = 1, seed: int = 0,
                 device="cpu", *, use_cache: bool = True, max_cache_bytes: int = 256 << 20, keep_calls: int = 2,
                 name: str = "small-lm"):
        chars = list(chars)
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise PPLError("SmallLM: the vocabulary must be distinct single characters")
        self.chars = chars
        self.itos = [EOS, UNK] + chars
        self.stoi = {c: i + 2 for i, c in enumerate(chars)}
        self.hparams = dict(embed=embed, hidden=hidden, layers=layers)
        self.name = name
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        with rng.drawing_from(torch.Generator().manual_seed(seed)):  # torch's global generator untouched
            self.net = _Net(len(self.itos), embed, hidden, layers)
        self.net.to(self.device).eval()
        self.bos_input = len(self.itos)
        self.train_info: dict = {}
        self._init_cache(use_cache, max_cache_bytes, keep_calls)

    # ------------------------------------------------------------------ text
    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def encode(self, text: str) -> list[int]:
        get = self.stoi.get
        return [get(c, 1) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join("" if i == 0 else "\ufffd" if i == 1 else self.itos[i] for i in map(int, ids))

    # --------------------------------------------------------------- forward
    def _compute(self, items):
        B = len(items)
        hidden, layers = self.hparams["hidden"], self.hparams["layers"]
        zero = None
        seqs, h = [], []
        for ctx, n, state in items:
            if state is None:
                seqs.append((self.bos_input,) + ctx)
                if zero is None:
                    zero = torch.zeros(layers, hidden, device=self.device)
                h.append(zero)
            else:
                seqs.append(ctx[n:])
                h.append(state)
        h0 = torch.stack(h, 1)  # [layers, B, hidden]
        lengths = [len(s) for s in seqs]
        M = max(lengths)
        if M == 1:
            ids = torch.tensor([s[0] for s in seqs], device=self.device)[:, None]
            _, hn = self.net.gru(self.net.emb(ids), h0)
        else:
            ids = torch.zeros(B, M, dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            x = self.net.emb(ids.to(self.device))
            packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), batch_first=True,
                                                       enforce_sorted=False)
            _, hn = self.net.gru(packed, h0)
        lps = torch.log_softmax(self.net.head(hn[-1]), dim=-1)
        states = list(hn.transpose(0, 1).clone().unbind(0)) if self.use_cache else []
        size = (layers * hidden + lps.shape[1]) * 4
        return states, lps, [size] * len(states)

    # ----------------------------------------------------------- evaluation
    @torch.no_grad()
    def loss(self, texts: Sequence[str]) -> float:
        """Mean negative log-likelihood in nats per token of ``texts`` (each followed by
        eos, read from the beginning of sequence); exp of it is the perplexity."""
        total, count = 0.0, 0
        for text in texts:
            ids = self.encode(text) + [self.eos_id]
            x = torch.tensor([[self.bos_input] + ids[:-1]], device=self.device)
            out, _ = self.net.gru(self.net.emb(x))
            lp = torch.log_softmax(self.net.head(out[0]), -1)
            total -= float(lp[torch.arange(len(ids)), torch.tensor(ids, device=self.device)].sum())
            count += len(ids)
        return total / max(count, 1)

    # ------------------------------------------------------------ save/load
    def save(self, path) -> None:
        """torch.save of the weights, vocabulary, sizes and training record, with a
        checksum of them (``stdlib.files``)."""
        save_checked({"format": _FORMAT, "chars": self.chars, "hparams": self.hparams,
                      "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                      "train_info": self.train_info}, path, "small LM")

    @classmethod
    def load(cls, path, device="cpu", **kwargs) -> "SmallLM":
        """The small LM saved at ``path`` by ``save`` (weights only: nothing in the file
        can run). A missing, empty, damaged or foreign file is a ``PPLError`` naming it;
        a checksum, when the file has one, must match."""
        hint = "make one with ppl.stdlib.lm.small.train(...).save(path)"
        blob, _ = load_checked(path, "small LM", hint=hint)
        if blob.get("format") != _FORMAT:
            raise PPLError(f"{str(path)!r} is not a saved SmallLM ({_FORMAT})", hint=hint)
        check_fields(blob, {"chars": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
                                      "a list of characters"),
                            "hparams": dict, "state_dict": dict}, path, "small LM")
        try:
            lm = cls(blob["chars"], device=device, **blob["hparams"], **kwargs)
            lm.net.load_state_dict(blob["state_dict"])
        except (TypeError, ValueError, RuntimeError) as e:
            raise PPLError(f"the small LM file {str(path)!r} does not describe a SmallLM: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
                           hint=hint) from None
        lm.net.to(lm.device).eval()
        lm.train_info = dict(blob.get("train_info") or {})
        return lm


def vocabulary(corpus: Sequence[str], min_count: int = 2) -> list[str]:
    """The characters seen at least ``min_count`` times in ``corpus``, in code-point order."""
    counts = Counter()
    for doc in corpus:
        counts.update(doc)
    return sorted(c for c, n in counts.items() if n >= min_count)


def train(corpus: Sequence[str] | str, steps: int = 150, seed: int = 0, *, embed: int = 32, hidden: int = 192,
          layers: int = 1, batch: int = 32, seq_len: int = 64, lr: float = 1e-2, device="cpu",
          min_count: int = 2, **kwargs) -> SmallLM:
    """Train a ``SmallLM`` on ``corpus`` (a list of documents, or one string) with Adam
    for ``steps`` steps of ``batch`` windows of ``seq_len`` characters (the documents
    joined, each followed by eos; half the windows start at a document's beginning, the
    rest anywhere; every window is read after the beginning-of-sequence input).
    ``lm.train_info`` records the losses (nats per token) and the time taken."""
    docs = [corpus] if isinstance(corpus, str) else list(corpus)
    if not docs or not any(docs):
        raise PPLError("train: the corpus is empty")
    lm = SmallLM(vocabulary(docs, min_count), embed=embed, hidden=hidden, layers=layers, seed=seed, device=device,
                 **kwargs)
    stream, starts = [], []
    for d in docs:
        starts.append(len(stream))
        stream.extend(lm.encode(d))
        stream.append(lm.eos_id)
    stream_t = torch.tensor(stream, dtype=torch.long)
    if len(stream) <= seq_len:
        stream_t = stream_t.repeat(seq_len // len(stream) + 2)
    last_start = len(stream_t) - seq_len
    starts_t = torch.tensor([s for s in starts if s < last_start] or [0], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    net = lm.net
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    offsets = torch.arange(seq_len)
    bos = torch.full((batch, 1), lm.bos_input, dtype=torch.long)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        anywhere = torch.randint(0, last_start, (batch,), generator=gen)
        at_doc = starts_t[torch.randint(0, len(starts_t), (batch,), generator=gen)]
        pick = torch.rand(batch, generator=gen) < 0.5
        s = torch.where(pick, at_doc, anywhere)
        y = stream_t[s[:, None] + offsets]
        x = torch.cat([bos, y[:, :-1]], 1)
        x, y = x.to(lm.device), y.to(lm.device)
        out, _ = net.gru(net.emb(x))
        loss = nn.functional.cross_entropy(net.head(out).reshape(-1, lm.vocab_size), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    net.eval()
    lm.train_info = {"steps": steps, "seed": seed, "batch": batch, "seq_len": seq_len, "lr": lr,
                     "corpus_chars": sum(len(d) for d in docs), "documents": len(docs),
                     "seconds": time.perf_counter() - t0, "losses": losses,
                     "uniform_loss": math.log(lm.vocab_size)}
    return lm


def load_or_train(path, steps: int = 150, seed: int = 0, device="cpu", **kwargs) -> SmallLM:
    """Load the small LM saved at ``path``, or train one on the stdlib corpus and save it
    there."""
    if os.path.exists(path):
        return SmallLM.load(path, device=device)
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(parent):
        raise PPLError(f"cannot save the small LM to {str(path)!r}: the directory {parent!r} does not exist",
                       hint="create it first, or pass a path in an existing directory")
    lm = train(stdlib_corpus(), steps=steps, seed=seed, device=device, **kwargs)
    lm.save(path)
    return lm
