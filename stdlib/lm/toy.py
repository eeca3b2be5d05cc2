"""A finite "toy" language model and a toy reward model, for tests and teaching.

``ToyLM`` is a bigram table: the next token depends on the last token of the context
only (the start row ``"<s>"`` for an empty context). Its probabilities are exact
rationals (``fractions.Fraction``), so a program that generates a few tokens can be
enumerated exactly (``model.run("enumerate")``) and every inference algorithm checked
against that answer. Nothing is downloaded; the whole model is the table.

Tokens are strings, written exactly as they appear in text: word tokens carry their
leading space (``" cat"``), a suffix token does not (``"s"``, so ``" cat" + "s"`` is
``" cats"``). The end-of-sequence token is ``"<eos>"`` in the table; its text is empty.

``ToyLM.encode`` tokenises by greedy longest match after normalising whitespace: the
words of the text (``text.split()``) each get one leading space, so ``"the  cats"``
encodes as ``[" the", " cat", "s"]`` and ``decode(encode(t)) == " " + " ".join(t.split())``
for any text made of vocabulary tokens (the default vocabulary is chosen so that this
tokenisation is the only one). A word it cannot tokenise is a ``ValueError``.

``ToyReward`` scores a text by a word table: the sum of the scores of its words
(``text.split()``), unknown words scoring 0; the prompt is not used.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Mapping, Sequence

import torch

from .base import LanguageModel, RewardModel

START = "<s>"
EOS = "<eos>"

#: the default table: P(next token | last token); rows sum to 1 exactly
DEFAULT_TABLE: dict[str, dict[str, str]] = {
    START:   {" the": "1/2", " a": "1/4", " cat": "1/8", " dog": "1/8"},
    " the":  {" cat": "1/2", " dog": "1/4", " tree": "1/4"},
    " a":    {" cat": "1/4", " dog": "1/4", " tree": "1/2"},
    " cat":  {"s": "1/4", " sees": "1/4", " runs": "1/4", EOS: "1/4"},
    " dog":  {"s": "1/4", " sees": "1/8", " runs": "3/8", EOS: "1/4"},
    " tree": {"s": "1/2", EOS: "1/2"},
    "s":     {" sees": "1/4", " runs": "1/4", EOS: "1/2"},
    " sees": {" the": "1/2", " a": "1/4", EOS: "1/4"},
    " runs": {EOS: "3/4", " the": "1/8", " a": "1/8"},
}

#: the default word scores of ``ToyReward``
DEFAULT_SCORES: dict[str, float] = {
    "cat": 1.0, "cats": 2.0, "dog": -1.0, "dogs": -0.5, "runs": 0.5, "sees": 0.25, "tree": -0.25,
}


def _prob(x, where: str) -> Fraction:
    """A table probability as an exact rational: Fractions and ints as they are, strings
    like "1/3" or "0.25", floats as the decimal they print as (0.1 is 1/10)."""
    try:
        if isinstance(x, bool):
            raise TypeError
        if isinstance(x, (Fraction, int)):
            p = Fraction(x)
        elif isinstance(x, float):
            p = Fraction(repr(x))
        elif isinstance(x, str):
            p = Fraction(x.strip())
        else:
            raise TypeError
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(f"toy LM: {where}: probability {x!r} is not a number") from None
    if p < 0:
        raise ValueError(f"toy LM: {where}: probability {x} is negative")
    return p


class ToyLM(LanguageModel):
    """A bigram language model given by a table (see the module docstring).

    ``table`` maps a previous token (or ``start``, for the empty context) to a row
    ``{next token: probability}``; each row must sum to 1 exactly; tokens missing from a
    row have probability 0. A token with no row of its own is followed by the
    end-of-sequence token with probability 1. After the end-of-sequence token the model
    stays there (probability 1)."""

    def __init__(self, table: Mapping[str, Mapping[str, object]] | None = None, *, eos: str = EOS,
                 start: str = START, name: str = "toy"):
        table = DEFAULT_TABLE if table is None else table
        self.name = name
        self._start_key = start
        vocab: list[str] = [eos]
        for prev, row in table.items():
            for t in ([prev] if prev != start else []) + list(row):
                if t not in vocab:
                    vocab.append(t)
        for t in vocab:
            if t != eos and (not isinstance(t, str) or t == ""):
                raise ValueError(f"toy LM: a token must be a non-empty string, got {t!r}")
        self.tokens: list[str] = vocab
        self.eos_id = 0
        self._index = {t: i for i, t in enumerate(vocab)}
        V = len(vocab)
        rows: list[list[Fraction]] = []
        for key in [start] + vocab:  # row 0: the start; row 1 + i: after token i
            row = [Fraction(0)] * V
            if key == eos:
                row[0] = Fraction(1)
            elif key not in table:
                row[0] = Fraction(1)
            else:
                for t, p in table[key].items():
                    row[self._index[t]] += _prob(p, f"row {key!r}, token {t!r}")
                total = sum(row)
                if total != 1:
                    raise ValueError(f"toy LM: row {key!r} sums to {total}, not 1")
            rows.append(row)
        self._rows = rows
        with torch.no_grad():
            p = torch.tensor([[float(x) for x in r] for r in rows], dtype=torch.float64)
            self._log_table = torch.log(p)  # [1 + V, V], float64
        self._texts = ["" if i == 0 else t for i, t in enumerate(vocab)]
        # greedy longest match: candidate tokens by length, longest first
        self._by_length = sorted((t for t in vocab[1:]), key=len, reverse=True)

    # ------------------------------------------------------------------ the protocol
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_text(self, token_id: int) -> str:
        return self._texts[token_id]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._texts[int(i)] for i in ids)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for word in text.split():
            s, i = " " + word, 0
            while i < len(s):
                for t in self._by_length:
                    if s.startswith(t, i):
                        out.append(self._index[t])
                        i += len(t)
                        break
                else:
                    raise ValueError(f"toy LM '{self.name}' cannot tokenise {word!r} "
                                     f"(its tokens are: {', '.join(repr(t) for t in self.tokens[1:])})")
        return out

    def _row_index(self, context: Sequence[int]) -> int:
        return 0 if len(context) == 0 else 1 + int(context[-1])

    def next_logprobs(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        idx = torch.tensor([self._row_index(c) for c in contexts], dtype=torch.long)
        return self._log_table.index_select(0, idx).to(torch.get_default_dtype())

    # ------------------------------------------------------------------ exact extras
    def exact_next_probs(self, context: Sequence[int]) -> list[Fraction]:
        """The next-token probabilities as exact rationals (what exact enumeration uses;
        ``next_logprobs`` is their float logarithm)."""
        return list(self._rows[self._row_index(context)])

    def prob(self, text: str, prompt: str = "", *, eos: bool = True) -> Fraction:
        """P(the model continues ``prompt`` with ``text``, then stops if ``eos``), exactly:
        for hand computations in tests."""
        ctx = list(self.encode(prompt)) if prompt else []
        p = Fraction(1)
        for t in self.encode(text) + ([self.eos_id] if eos else []):
            p *= self.exact_next_probs(ctx)[t]
            ctx.append(t)
        return p

    def __repr__(self) -> str:
        return f"ToyLM({self.name!r}, {self.vocab_size} tokens)"


class ToyReward(RewardModel):
    """A reward model given by a word table: score = sum of the scores of the words of
    the text (``text.split()``), 0 for unknown words; the prompt is ignored."""

    def __init__(self, scores: Mapping[str, float] | None = None, *, name: str = "toy_reward"):
        self.scores = dict(DEFAULT_SCORES if scores is None else scores)
        for w, s in self.scores.items():
            if not isinstance(s, (int, float, Fraction)) or isinstance(s, bool) or not math.isfinite(float(s)):
                raise ValueError(f"toy reward: the score of {w!r} must be a finite number, got {s!r}")
        self.name = name

    def score_one(self, text: str) -> float:
        return float(sum(float(self.scores.get(w, 0.0)) for w in str(text).split()))

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.score_one(t) for t in texts], dtype=torch.get_default_dtype())

    def __repr__(self) -> str:
        return f"ToyReward({len(self.scores)} words)"
