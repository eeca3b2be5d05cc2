"""A realistic 50k-token vocabulary, built offline, for mask tests and benchmarks.

``bpe_tokenizer(vocab_size)`` trains a byte-level BPE tokenizer (the ``tokenizers``
library, GPT-2's pre-tokenisation) on the source files of this Python's standard library
(every ``*.py`` under ``sysconfig``'s stdlib directory, outside ``site-packages``, in
sorted order: about 30 MB, which gives the full 50,000 tokens), so nothing is downloaded.
Training takes about 35 s on one core; the result is cached as JSON under
``$PPL_CACHE_DIR`` (default ``<tempdir>/ppl-cache``), keyed by the vocabulary size and the
Python version, and later calls load it in a fraction of a second.

``VocabLM(tokenizer)`` is a ``LanguageModel`` over that vocabulary whose next-token law is
fixed and cheap (a Zipf law over the ids, the same for every context, end-of-sequence
included): what a mask benchmark needs (every step costs the same, the model's own time
is negligible) without a neural network.
"""
from __future__ import annotations

import glob
import os
import sys
import sysconfig
import tempfile
from typing import Sequence

import torch

from ..stdlib.lm.base import LanguageModel

EOS_TEXT = "<|endoftext|>"


def cache_dir() -> str:
    """Where built vocabularies are kept (``$PPL_CACHE_DIR`` or ``<tempdir>/ppl-cache``)."""
    return os.environ.get("PPL_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "ppl-cache")


def stdlib_sources() -> list[str]:
    """The standard library's ``*.py`` files (not ``site-packages``), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    return sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                  if f"{os.sep}site-packages{os.sep}" not in f)


def _texts(files: Sequence[str]):
    for f in files:
        try:
            with open(f, encoding="utf-8", errors="replace") as h:
                yield h.read()
        except OSError:  # an unreadable file: skipped (the cache key has the Python version)
            continue


def bpe_tokenizer(vocab_size: int = 50_000):
    """A byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` tokens (id 0 is
    ``<|endoftext|>``), trained on the standard library's sources, cached (see above)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    path = os.path.join(cache_dir(), f"bpe-{vocab_size}-py{sys.version_info[0]}.{sys.version_info[1]}.json")
    if os.path.exists(path):
        try:
            return Tokenizer.from_file(path)
        except Exception:  # a damaged cache file: rebuilt below
            pass
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_texts(stdlib_sources()), trainer)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    tok.save(tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return tok


class VocabLM(LanguageModel):
    """A language model over a ``tokenizers`` vocabulary with a fixed next-token law:
    p(id) proportional to 1 / (rank(id) + 1), ranks a fixed permutation of the ids (so
    the likely tokens are spread over the vocabulary), the same for every context."""

    def __init__(self, tokenizer, name: str = "bpe-vocab", seed: int = 0):
        self.tokenizer = tokenizer
        self.name = name
        self._V = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(EOS_TEXT)
        ranks = torch.randperm(self._V, generator=torch.Generator().manual_seed(seed)).to(torch.float64)
        self._row = torch.log_softmax(-torch.log(ranks + 1), 0).to(torch.get_default_dtype())

    @property
    def vocab_size(self) -> int:
        return self._V

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def next_logprobs(self, contexts) -> torch.Tensor:
        return self._row.expand(len(contexts), self._V).clone()


__all__ = ["bpe_tokenizer", "VocabLM", "cache_dir", "stdlib_sources", "EOS_TEXT"]
