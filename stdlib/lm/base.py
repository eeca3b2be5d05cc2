"""What a language model and a reward model are to ppl: the backend protocols.

A backend only answers batched questions; everything probabilistic (sampling, scoring,
masks, temperature, SMC) is done by ppl on top of these answers, the same way for every
backend. That keeps each backend small and lets the exact toy backend stand in for a
neural one in tests.

* ``LanguageModel.next_logprobs(contexts)``: for a batch of token-id contexts, the log
  probabilities of the next token, one row per context, in ONE call (one forward pass for
  all live particles). A backend may cache per prefix (KV caches keyed by the token
  prefix), so that a context extending an earlier one, or sharing a prompt with other
  particles after resampling, costs one new token, not a whole re-run; the answer must be
  the same with or without its cache.
* ``RewardModel.score(prompts, texts)``: one real score per (prompt, text) pair, batched;
  a process reward model is one that is asked about partial texts.
"""
from __future__ import annotations

import abc
from typing import Sequence

import torch


class LanguageModel(abc.ABC):
    """A distribution over next tokens given a context of token ids."""

    #: a short name for messages
    name: str = "lm"
    #: the id of the end-of-sequence token, or None if the model has none
    eos_id: int | None = None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (0 .. vocab_size - 1)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of a sequence of token ids."""

    def token_text(self, token_id: int) -> str:
        """The text of one token (what masks such as "no letter e" look at)."""
        return self.decode([token_id])

    @abc.abstractmethod
    def next_logprobs(self, contexts: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """log p(next token | context) for each context: a float tensor [len(contexts),
        vocab_size] whose rows are normalised (logsumexp 0), computed in one batched call."""


class RewardModel(abc.ABC):
    """A deterministic score of a text given a prompt (higher is better)."""

    name: str = "reward"

    @abc.abstractmethod
    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        """One score per (prompt, text) pair: a float tensor [len(texts)], batched."""
