"""Reward models that need no download: lexical scores of a text.

``KeywordReward(words)`` scores a text by the keywords it contains: the sum over
keywords k of ``weight_k * count_k(text)``, where ``count_k`` is the number of
occurrences of k (as a whole word, case-insensitive, by default), optionally capped at
``max_count`` per keyword. The prompt is not used. It is deterministic, cheap, exact to
reason about, and it can be asked about partial texts, so it serves as a *process*
reward too (``rm(prompt, join(toks))`` after every token).

It is a stand-in for a learned reward model (``stdlib/lm/hf.py``'s ``HFRewardModel``),
for examples and tests that must run offline: any ``RewardModel`` plugs into the DSL
the same way (``factor rm(prompt, text) / beta``).

    rm = KeywordReward({"return": 1.0, "file": 1.0, "error": -1.0})
    rm.score(["", ""], ["Return the file.", "An error"])   # tensor([2., -1.])
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import torch

from .base import RewardModel


class KeywordReward(RewardModel):
    """score(text) = sum_k weights[k] * min(count_k(text), max_count) (see the module
    docstring).

    ``words``: a list of keywords (weight 1 each) or a mapping keyword -> weight.
    ``whole_word``: count only occurrences not inside a longer word (regex ``\\b``
    boundaries; at the end of a partial text a keyword counts, since nothing follows
    it yet). ``case_sensitive``: match case exactly (default: ignore case).
    ``max_count``: count each keyword at most this many times (None: no cap)."""

    def __init__(self, words: Mapping[str, float] | Sequence[str], *, whole_word: bool = True,
                 case_sensitive: bool = False, max_count: int | None = None, name: str = "keywords"):
        table = dict(words) if isinstance(words, Mapping) else {w: 1.0 for w in words}
        if not table:
            raise ValueError("KeywordReward: no keywords")
        for w, s in table.items():
            if not isinstance(w, str) or not w:
                raise ValueError(f"KeywordReward: a keyword must be a non-empty string, got {w!r}")
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(float(s)):
                raise ValueError(f"KeywordReward: the weight of {w!r} must be a finite number, got {s!r}")
        if max_count is not None and (isinstance(max_count, bool) or not isinstance(max_count, int)
                                      or max_count < 1):
            raise ValueError(f"KeywordReward: max_count must be a positive integer or None, got {max_count!r}")
        self.weights = {w: float(s) for w, s in table.items()}
        self.whole_word, self.case_sensitive, self.max_count = whole_word, case_sensitive, max_count
        self.name = name
        flags = 0 if case_sensitive else re.IGNORECASE
        self._patterns = [(re.compile(rf"\b{re.escape(w)}\b" if whole_word else re.escape(w), flags), s)
                          for w, s in self.weights.items()]

    def counts(self, text: str) -> dict:
        """keyword -> its (uncapped) number of occurrences in ``text``."""
        return {w: len(p.findall(str(text))) for w, (p, _) in zip(self.weights, self._patterns)}

    def score_one(self, text: str) -> float:
        total = 0.0
        for p, s in self._patterns:
            n = len(p.findall(str(text)))
            if self.max_count is not None:
                n = min(n, self.max_count)
            total += s * n
        return total

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.score_one(t) for t in texts], dtype=torch.get_default_dtype())

    def __repr__(self) -> str:
        return f"KeywordReward({self.weights})"
