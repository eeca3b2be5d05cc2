"""Language models and reward models as values of the DSL.

A ``LanguageModel`` (``stdlib.lm.base``) passed as data, or made by ``toy_lm()``,
reaches a model as an ``LMValue``. Only these attributes are reachable from a model
(anything else, and every ``_``-attribute, is an error):

* ``lm.next_token(context, temperature=1, top_k=None, top_p=None, allowed=None)``:
  the distribution of the next token (``tok ~ lm.next_token(toks)``);
* ``lm.generate(prompt, max_tokens=16, stop=None, temperature=1, top_k=None,
  top_p=None, allowed=None)``: the distribution of a whole completion, one choice;
* ``lm.eos`` (the end-of-sequence token, or None), ``lm.vocab`` (every token),
  ``lm.encode(text)`` (a token list), ``lm.decode(tokens)`` (a text), ``lm.name``.

Values. A token is a ``Token``: a ``str`` (its text, so ``"e" in tok``, ``tok ==
" cat"`` and ``text + tok`` work as for strings) that also remembers its id and model,
so a context built from sampled tokens is re-read without re-tokenising. The
end-of-sequence token ``lm.eos`` has the empty text (it never appears in a text). A
completion is a ``Completion``: the ``str`` of its text, remembering its token ids. A
context (or prompt) is a string (encoded with ``lm.encode``) or a list of tokens
(``Token``\\ s, token ids, or strings, which are encoded and concatenated). Contexts
that differ between particles are per-particle values (``toks = toks + [tok]``).

The next-token distribution. From the model's ``next_logprobs``: divide the log
probabilities by ``temperature`` and renormalise; keep the tokens whose probability is
at least the ``top_k``-th largest (ties kept) and renormalise; keep the tokens v for
which the probability of the tokens strictly more likely than v is below ``top_p``
(the smallest set closed under ties whose mass reaches ``top_p``) and renormalise. Those
options define the distribution (sampling and ``log_prob`` agree). Once a context ends
with the end-of-sequence token, the next token is ``lm.eos`` with probability 1 (options
and masks do not apply), so a fixed number of ``next_token`` steps is a generation padded
with ``lm.eos``.

Constraints. ``allowed=`` (a list of tokens/texts/ids, or a predicate on the token,
which sees ``lm.eos`` as the empty string) is a *constraint*: ``tok ~
lm.next_token(c, allowed=A)`` denotes the same measure as ``tok ~ lm.next_token(c)``
followed by ``condition tok in A``: mass p(v) on each allowed v, total mass Z_A(c) =
p(A | c) <= 1. The sampling semantics draw v from the renormalised p(v | A) (the locally
optimal proposal) and weight by Z_A: a factor right after the choice (a checkpoint where
SMC resamples); exact enumeration uses the masses p(v) directly. In ``generate`` the mask
applies at every step and the weight is the product of the steps' Z_A.

Constraints on the text (``constraints.py``): ``allowed=regex(pattern)``,
``allowed=grammar(lark_source)`` (Lark, LALR) and ``allowed=json_schema(schema)``. At each
step the allowed tokens are those after which the text is still a viable prefix of the
language (checked character by character, so a boundary inside a token is exact), the
end-of-sequence token where the text is a sentence, and, on a draw after which
``generate`` ends (the ``max_tokens``-th, or one completing a ``stop`` string), only the
tokens that make the text a sentence. So ``text ~ lm.generate(p, allowed=c)`` is ``text ~
lm.generate(p)`` followed by ``condition c.accepts(text)``, in law. In ``next_token`` the
text is the context's, less the constraint's ``prompt=``. One step's mask is one walk of
the vocabulary trie (``vocab_trie.py``), cached by the matcher's state.

``generate``: tokens are drawn one by one, at most ``max_tokens`` draws (the
end-of-sequence token counts as a draw); it stops at the end-of-sequence token (not part
of the text), or once the completion's text contains one of the ``stop`` strings (the
stop string is kept in the text), or after ``max_tokens`` draws. ``log_prob`` of a
completion is the sum of the log probabilities of its tokens, plus that of the
end-of-sequence token when it ended there: when it has fewer than ``max_tokens`` tokens
and contains no stop string. A completion given as plain text is scored by its
tokenisation ``lm.encode(text)`` (exactly the probability of generating it, when the
tokenisation is unique, as in the toy model), one given as a list of tokens by those
tokens. A completion that could not have been generated (a stop string before its last
token, too long, not tokenisable) has probability 0.

Batching: for all particles, each step asks the backend ONE ``next_logprobs`` question
with the distinct contexts of the particles that need it.
"""
from __future__ import annotations

import array
import itertools
import math
import operator
from fractions import Fraction
from typing import Any, Sequence

import torch

from ...semantics.dist_values import DistValue
from ...semantics.errors import PPLRuntimeError, did_you_mean
from ...semantics.interpreter import Builtin, Closure, Frame
from ...semantics.values import (Batched, Particles, PerParticle, is_batched, materialize, rows,
                                 to_bool_rows, describe)
from .. import rng
from ..prelude import bind_arguments
from . import masks as _masks
from .base import LanguageModel, RewardModel
from .constraints import Constraint, ConstraintMask

_MISSING = object()


# ---------------------------------------------------------------------------- values
class Token(str):
    """A token as a value of the DSL: its text (a ``str``), plus its id and model."""

    def __new__(cls, text: str, token_id: int, lm: LanguageModel):
        self = str.__new__(cls, text)
        self.id = token_id
        self.lm = lm
        return self

    def __reduce__(self):  # pickled/copied as its text
        return (str, (str(self),))


class Completion(str):
    """A completion as a value of the DSL: its text, plus its token ids and model."""

    def __new__(cls, text: str, ids: tuple, lm: LanguageModel):
        self = str.__new__(cls, text)
        self.ids = tuple(ids)
        self.lm = lm
        return self

    def __reduce__(self):
        return (str, (str(self),))


class _Opts:
    """The decoding options (same for every particle): temperature, top_k, top_p."""

    __slots__ = ("temperature", "top_k", "top_p")

    def __init__(self, temperature, top_k, top_p):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    @property
    def plain(self) -> bool:
        return self.temperature == 1 and self.top_k is None and self.top_p is None


class _GenOpts(_Opts):
    __slots__ = ("max_tokens", "stop")

    def __init__(self, temperature, top_k, top_p, max_tokens, stop):
        super().__init__(temperature, top_k, top_p)
        self.max_tokens, self.stop = max_tokens, stop


_ADDITIVE: dict = {}  # id(a _Mask's bool tensor [V]) -> (that tensor, dtype, its additive form: 0 / -inf)


class _Mask:
    """An allowed set of token ids, the same for every particle."""

    __slots__ = ("ids", "V", "_tensors")

    def __init__(self, ids, V: int):
        self.ids = frozenset(ids)
        self.V = V
        self._tensors: dict = {}

    def tensor(self, device) -> torch.Tensor:
        t = self._tensors.get(str(device))
        if t is None:
            t = torch.zeros(self.V, dtype=torch.bool)
            t[torch.tensor(sorted(self.ids), dtype=torch.long)] = True
            t = t.to(device)
            self._tensors[str(device)] = t
            if len(_ADDITIVE) >= 64:  # bounded: drop the oldest
                _ADDITIVE.pop(next(iter(_ADDITIVE)))
            _ADDITIVE[id(t)] = (t, None, None)  # its additive form is made on first use (_additive)
        return t


def _mask_ids(mask) -> frozenset | None:
    """The allowed ids of one particle's mask (a _Mask, or a list of bools from a row)."""
    if mask is None:
        return None
    if isinstance(mask, _Mask):
        return mask.ids
    if isinstance(mask, ConstraintMask):  # depends on the prefix: ask it per step
        return None
    if isinstance(mask, torch.Tensor):
        mask = mask.tolist()
    return frozenset(i for i, b in enumerate(mask) if b)


# ----------------------------------------------------------------------- the model
class LMValue:
    """A language model as a value of the DSL (see the module docstring)."""

    ATTRIBUTES = ("next_token", "generate", "eos", "vocab", "encode", "decode", "name")

    def __init__(self, lm: LanguageModel, name: str | None = None):
        if not isinstance(lm, LanguageModel):
            raise PPLRuntimeError(f"not a language model: {type(lm).__name__}")
        self.lm = lm
        self.name = name or getattr(lm, "name", "lm")
        self.V = int(lm.vocab_size)
        self.eos_id = lm.eos_id
        self._tokens: dict[int, Token] = {}
        self._by_text: dict[str, tuple] | None = None
        self._encoded: dict[str, tuple] = {}
        self._masks: dict = {}
        self._all_tokens: list | None = None
        self._ctx_memo: tuple | None = None  # (entries, full idx, lineage, per-particle tuples)
        self._end_rows: dict = {}
        self._methods = {
            "next_token": Builtin("next_token", self._next_token, (1, 5), higher_order=True),
            "generate": Builtin("generate", self._generate, (1, 7), higher_order=True),
            "encode": Builtin("encode", self._encode_fn, (1, 1)),
            "decode": Builtin("decode", self._decode_fn, (1, 1)),
        }

    def describe(self) -> str:
        return f"language model '{self.name}'"

    def __repr__(self) -> str:
        return f"<LMValue {self.name}>"

    # the only door from a model into the backend
    def ppl_attribute(self, name: str):
        if name in self._methods:
            return self._methods[name]
        if name == "eos":
            return None if self.eos_id is None else self.token(self.eos_id)
        if name == "vocab":
            return [self.token(i) for i in range(self.V)]
        if name == "name":
            return self.name
        raise PPLRuntimeError(f"a language model has no attribute '{name}'",
                              hint=did_you_mean(name, self.ATTRIBUTES) or
                              f"its attributes are: {', '.join(self.ATTRIBUTES)}")

    # ------------------------------------------------------------------ tokens
    def token(self, i: int) -> Token:
        t = self._tokens.get(i)
        if t is None:
            text = "" if i == self.eos_id else self.lm.token_text(i)
            t = self._tokens[i] = Token(text, i, self.lm)
        return t

    def ids_with_text(self, text: str) -> tuple:
        """Every token id whose text is ``text`` (the end-of-sequence token's is "")."""
        if self._by_text is None:
            table: dict[str, list] = {}
            for i in range(self.V):
                table.setdefault(str(self.token(i)), []).append(i)
            self._by_text = {k: tuple(v) for k, v in table.items()}
        return self._by_text.get(str(text), ())

    def encode(self, text: str) -> tuple:
        ids = self._encoded.get(text)
        if ids is None:
            try:
                ids = tuple(int(i) for i in self.lm.encode(str(text)))
            except PPLRuntimeError:
                raise
            except Exception as e:  # the backend cannot tokenise it
                raise PPLRuntimeError(f"{self.name}: cannot encode {str(text)!r}: {e}") from None
            if len(self._encoded) < 100_000:
                self._encoded[text] = ids
        return ids

    def ids_of(self, x, what: str = "context") -> tuple:
        """One particle's context (or prompt) as token ids."""
        if isinstance(x, Token) and x.lm is self.lm:
            return (x.id,)
        if isinstance(x, Completion) and x.lm is self.lm:
            return x.ids
        if isinstance(x, str):
            return self.encode(x)
        if isinstance(x, bool) or x is None:
            raise PPLRuntimeError(f"{self.name}: a {what} must be a string or a list of tokens, got {describe(x)}")
        if isinstance(x, Fraction) and x.denominator == 1:
            x = int(x)
        if isinstance(x, int):
            if not 0 <= x < self.V:
                raise PPLRuntimeError(f"{self.name}: token id {x} out of range (vocabulary of {self.V})")
            return (x,)
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() or x.dtype == torch.bool or x.dim() > 1:
                raise PPLRuntimeError(f"{self.name}: a {what} must be a string or a list of tokens, got {describe(x)}")
            return tuple(i for v in x.reshape(-1).tolist() for i in self.ids_of(int(v), what))
        if isinstance(x, (list, tuple)):
            lm = self.lm
            if all(type(item) is Token and item.lm is lm for item in x):  # tokens this model sampled
                return tuple(item.id for item in x)
            out: list = []
            for item in x:
                if isinstance(item, (list, tuple)):
                    raise PPLRuntimeError(f"{self.name}: a {what} is a flat list of tokens (got a nested list)")
                out.extend(self.ids_of(item, what))
            return tuple(out)
        raise PPLRuntimeError(f"{self.name}: a {what} must be a string or a list of tokens, got {describe(x)}")

    def contexts(self, value, ctx: Particles, what: str = "context") -> list:
        """Per particle of ctx: the context as a tuple of ids."""
        if isinstance(value, list):
            # (first: an extension of the remembered list holds its per-particle entries, so
            # it is deep-batched without walking every entry again)
            out = self._grown_contexts(value, ctx)
            if out is not None:
                return out
        if isinstance(value, list) and _deep_batched(value):
            cols = self._token_columns(value, ctx)
            if cols is not None:
                out = list(zip(*cols))
                self._remember_contexts(value, ctx, out)
                return out
        if _deep_batched(value):
            return [self.ids_of(x, what) for x in materialize(value, ctx)]
        return [self.ids_of(value, what)] * ctx.M

    def _grown_contexts(self, value: list, ctx: Particles) -> list | None:
        """The contexts of a token list that extends, by one entry, the list whose
        contexts were computed last (``toks = toks + [tok]`` in a loop): the remembered
        tuples (kept as a per-particle value, so they follow the run's resamplings) plus
        the new entry's ids, instead of re-reading every entry. None when the list is
        not such an extension (same entries, by identity, in the same run)."""
        memo = self._ctx_memo
        if memo is None or not ctx.is_full:
            return None
        cols, full, lineage, tuples = memo
        n = len(cols)
        if full is not ctx.full.idx or lineage is not ctx.generation[0] or len(value) not in (n, n + 1) \
                or not all(map(operator.is_, cols, value)):
            return None
        prev = rows(tuples, ctx)
        if len(value) == n:  # the same list again (e.g. scored after drawn)
            return prev
        last = self._token_columns(value[n:], ctx)
        if last is None:
            return None
        out = list(map(operator.add, prev, zip(last[0])))  # (= [p + (i,) for p, i in zip(prev, last[0])])
        self._remember_contexts(value, ctx, out)
        return out

    def _remember_contexts(self, value: list, ctx: Particles, out: list) -> None:
        if ctx.is_full:
            self._ctx_memo = (tuple(value), ctx.full.idx, ctx.generation[0], PerParticle(out, ctx.idx))

    def _token_columns(self, value: list, ctx: Particles) -> list | None:
        """A token list built step by step (``toks + [tok]``) is stored column-wise: one
        entry per position, each a token shared by all particles or one token per
        particle. Its ids, position by position ([T] columns of ctx.M ids), or None when
        an entry is anything else (then the general path converts it)."""
        lm = self.lm
        cols = []
        for x in value:
            if type(x) is Token and x.lm is lm:
                cols.append((x.id,) * ctx.M)
            elif isinstance(x, PerParticle):
                ids = _token_ids(rows(x, ctx), lm)
                if ids is None:
                    return None
                cols.append(ids)
            else:
                return None
        return cols

    def finished(self, ids: tuple) -> bool:
        return self.eos_id is not None and len(ids) > 0 and ids[-1] == self.eos_id

    def decode(self, ids) -> str:
        return self.lm.decode([i for i in ids if i != self.eos_id])

    def completion(self, ids) -> Completion:
        ids = tuple(ids)
        return Completion(self.decode(ids), ids, self.lm)

    # ------------------------------------------------------------------ backend calls
    def base_logprobs(self, contexts: list, device) -> torch.Tensor:
        """log p(next | context) for each context: [len(contexts), V], in ONE backend call
        for the distinct unfinished contexts (finished ones: the end-of-sequence token)."""
        R = len(contexts)
        dtype = torch.get_default_dtype()
        eos = self.eos_id
        if R and (eos is None or not _any_ends_with(contexts, eos)):  # the common case: none finished
            todo = dict.fromkeys(contexts)  # (the distinct contexts, in order of first appearance)
            lp = self._ask(list(todo), device, dtype)
            if len(todo) == R:
                return lp
            slot_of = dict(zip(todo, range(len(todo))))
            return lp.index_select(0, _long_tensor(list(map(slot_of.__getitem__, contexts)), device))
        # some rows finished: their row is the end-of-sequence token's (row 0, before the
        # backend's rows 1.., gathered like the others)
        todo: dict[tuple, int] = {}
        slots = [0 if c and c[-1] == eos else todo.setdefault(c, len(todo) + 1) for c in contexts]
        end = self._end_row(device, dtype)
        lp = torch.cat([end, self._ask(list(todo), device, dtype)]) if todo else end
        return lp.index_select(0, _long_tensor(slots, device))

    def _end_row(self, device, dtype) -> torch.Tensor:
        """[1, V]: log-probability 0 on the end-of-sequence token, -inf elsewhere (cached)."""
        key = (str(device), dtype)
        row = self._end_rows.get(key)
        if row is None:
            row = torch.full((1, self.V), -math.inf, dtype=dtype, device=device)
            row[0, self.eos_id] = 0.0
            self._end_rows[key] = row
        return row

    def _ask(self, todo: list, device, dtype) -> torch.Tensor:
        """The backend's ``next_logprobs`` for the distinct contexts ``todo``, checked."""
        lp = self.lm.next_logprobs(todo)
        if not isinstance(lp, torch.Tensor) or lp.shape != (len(todo), self.V):
            raise PPLRuntimeError(f"{self.name}: next_logprobs returned "
                                  f"{tuple(lp.shape) if isinstance(lp, torch.Tensor) else type(lp).__name__}, "
                                  f"expected a tensor of shape {(len(todo), self.V)}")
        if lp.dtype == dtype and lp.device.type == "cpu" and str(device) == "cpu":
            return lp  # (what ``to`` returns then, without its dispatch)
        return lp.to(device=device, dtype=dtype)

    def exact_probs(self, context: tuple) -> list:
        """The next-token probabilities of one context: exact rationals when the backend
        has them (``exact_next_probs``, as the toy model), else floats."""
        if self.finished(context):
            return [1 if i == self.eos_id else 0 for i in range(self.V)]
        exact = getattr(self.lm, "exact_next_probs", None)
        if exact is not None:
            return list(exact(context))
        with torch.no_grad():
            lp = self.lm.next_logprobs([context])[0].double()
        return torch.exp(lp).tolist()

    # ------------------------------------------------------------------ DSL methods
    def _next_token(self, interp, ctx, fr, span, *args, **kwargs):
        b = _bind("next_token", ("context", "temperature", "top_k", "top_p", "allowed"), 1, args, kwargs)
        opts = _opts("next_token", b.get("temperature", 1), b.get("top_k"), b.get("top_p"))
        mask = self._mask("next_token", b.get("allowed"), interp, ctx, fr, span)
        return TokenDist(self, b["context"], opts, mask)
        yield  # pragma: no cover  (a generator: predicates call back into the model)

    def _generate(self, interp, ctx, fr, span, *args, **kwargs):
        b = _bind("generate", ("prompt", "max_tokens", "stop", "temperature", "top_k", "top_p", "allowed"),
                  1, args, kwargs)
        max_tokens = _count("generate", "max_tokens", b.get("max_tokens", 16))
        stop = _stops(b.get("stop"))
        o = _opts("generate", b.get("temperature", 1), b.get("top_k"), b.get("top_p"))
        opts = _GenOpts(o.temperature, o.top_k, o.top_p, max_tokens, stop)
        mask = self._mask("generate", b.get("allowed"), interp, ctx, fr, span)
        return GenerateDist(self, b["prompt"], opts, mask)
        yield  # pragma: no cover

    def _encode_fn(self, ctx, text):
        def one(t):
            if not isinstance(t, str):
                raise PPLRuntimeError(f"encode() expects a string, got {describe(t)}")
            return [self.token(i) for i in self.encode(t)]
        if is_batched(text):
            return PerParticle([one(t) for t in materialize(text, ctx)], ctx.idx)
        return one(text)

    def _decode_fn(self, ctx, tokens):
        if _deep_batched(tokens):
            return _pack_strs([self.decode(ids) for ids in self.contexts(tokens, ctx)], ctx)
        return self.decode(self.ids_of(tokens))

    # ------------------------------------------------------------------ allowed=
    def _mask(self, where, allowed, interp, ctx, fr, span):
        """``allowed=`` as None, a _Mask (same for all particles) or a Batched bool [M, V]."""
        if allowed is None:
            return None
        if isinstance(allowed, str):
            raise PPLRuntimeError(f"{where}: allowed= must be a list of tokens or a predicate, not a string",
                                  hint='write allowed=[" cat", " dog"] or allowed=lambda t: "e" not in t')
        if isinstance(allowed, Constraint):  # regex(), grammar(), json_schema(): masks per prefix
            return allowed.bind(self)
        if isinstance(allowed, (Builtin, Closure)):
            return self._predicate_mask(where, allowed, interp, ctx, fr, span)
        if isinstance(allowed, (list, tuple, PerParticle)):
            if _deep_batched(allowed):
                masks = [self._list_ids(where, a) for a in materialize(allowed, ctx)]
                t = torch.zeros((ctx.M, self.V), dtype=torch.bool, device=ctx.device)
                for r, ids in enumerate(masks):
                    t[r, list(ids)] = True
                return Batched(t, ctx.idx)
            return _Mask(self._list_ids(where, allowed), self.V)
        raise PPLRuntimeError(f"{where}: allowed= must be a list of tokens or a predicate, got {describe(allowed)}")

    def _list_ids(self, where, items) -> set:
        if not isinstance(items, (list, tuple)):
            raise PPLRuntimeError(f"{where}: allowed= must be a list of tokens, got {describe(items)}")
        ids: set = set()
        for x in items:
            if isinstance(x, Token) and x.lm is self.lm:
                ids.add(x.id)
            elif isinstance(x, str):
                found = self.ids_with_text(x)
                if not found:
                    raise PPLRuntimeError(f"{where}: {str(x)!r} in allowed= is not a token of '{self.name}'",
                                          hint="allowed= lists single tokens; lm.encode(text) gives a text's tokens")
                ids.update(found)
            elif isinstance(x, (int, Fraction)) and not isinstance(x, bool) and int(x) == x and 0 <= x < self.V:
                ids.add(int(x))
            elif isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point() \
                    and 0 <= int(x) < self.V:
                ids.add(int(x))
            else:
                raise PPLRuntimeError(f"{where}: allowed= items must be tokens, token texts or ids, got "
                                      f"{x!r}" if isinstance(x, (int, float)) else
                                      f"{where}: allowed= items must be tokens, token texts or ids, got {describe(x)}")
        if not ids:
            raise PPLRuntimeError(f"{where}: allowed= is empty: no token could be generated")
        return ids

    def _predicate_mask(self, where, pred, interp, ctx, fr, span):
        """A predicate's mask: computed once over the whole vocabulary and cached when the
        predicate depends on the token alone (``masks.pure_key``), else evaluated token by
        token for every particle (it may read per-particle values)."""
        pure = _masks.pure_key(pred, lambda v: isinstance(v, LMValue))
        if pure is not None:
            key, anchors, batch_safe = pure
            hit = self._masks.get(key)
            if hit is not None and len(hit[0]) == len(anchors) and all(map(operator.is_, hit[0], anchors)):
                return hit[1]
            ok = None if not batch_safe else _masks.evaluate_batched(
                interp, pred, self.all_tokens(), span, getattr(fr, "path", ""), getattr(fr, "depth", 0))
            if ok is not None:
                mask = self._mask_of_bools(where, ok.tolist(), span)
                if len(self._masks) >= 64:  # bounded: drop the oldest
                    self._masks.pop(next(iter(self._masks)))
                self._masks[key] = (anchors, mask)
                return mask
        # token by token (also where the batched call failed: this gives the located error)
        cols = []
        batched = False
        caller = Frame(None, ctx, getattr(fr, "path", ""), getattr(fr, "depth", 0))  # the calls' addresses touch no real frame
        for i in range(self.V):
            tok = self.token(i)
            if isinstance(pred, Builtin) and not pred.higher_order:
                v = interp._call_builtin(pred, [tok], {}, ctx, span)
            else:
                gen = interp.call(pred, [tok], {}, ctx, span, caller)
                try:
                    next(gen)
                except StopIteration as stop:
                    v = stop.value
                else:
                    gen.close()
                    raise PPLRuntimeError(f"{where}: the allowed= predicate made a random choice or likelihood "
                                          "statement", span, "a predicate must be deterministic: tok -> True/False")
            try:
                c = to_bool_rows(v, ctx)
            except PPLRuntimeError:
                raise PPLRuntimeError(f"{where}: the allowed= predicate must return True or False, "
                                      f"got {describe(v)}", span) from None
            batched = batched or not isinstance(c, bool)
            cols.append(c)
        if not batched:
            mask = self._mask_of_bools(where, cols, span)
            if pure is not None:  # (not batch-safe, or the batched call failed and this one did not)
                if len(self._masks) >= 64:  # bounded: drop the oldest
                    self._masks.pop(next(iter(self._masks)))
                self._masks[pure[0]] = (pure[1], mask)
            return mask
        t = torch.stack([c if isinstance(c, torch.Tensor) else torch.full((ctx.M,), c, device=ctx.device)
                         for c in cols], 1).to(torch.bool)
        if not bool(t.any(1).all()):
            raise PPLRuntimeError(f"{where}: the allowed= predicate allows no token (for some particles)", span)
        return Batched(t, ctx.idx)

    def _mask_of_bools(self, where, bools: list, span) -> "_Mask":
        ids = [i for i, c in enumerate(bools) if c]
        if not ids:
            raise PPLRuntimeError(f"{where}: the allowed= predicate allows no token", span)
        return _Mask(ids, self.V)

    def all_tokens(self) -> list:
        """Every token of the vocabulary, by id (``Token`` values; the end-of-sequence
        token's text is ""), made once."""
        toks = self._all_tokens
        if toks is None:
            toks = self._all_tokens = [self.token(i) for i in range(self.V)]
        return toks


# ------------------------------------------------------------------- argument parsing
def _bind(name, params, required, args, kwargs) -> dict:
    """The given arguments of ``name(params...)``; the first ``required`` must be given."""
    out = bind_arguments(name, params, args, kwargs, noun="argument")
    for p in params[:required]:
        if p not in out:
            raise PPLRuntimeError(f"{name}() is missing the argument '{p}'")
    return out


def _number(where, what, v):
    if is_batched(v):
        raise PPLRuntimeError(f"{where}: {what} must be the same for every particle")
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise PPLRuntimeError(f"{where}: {what} must be a number, got {describe(v)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float, Fraction)):
        raise PPLRuntimeError(f"{where}: {what} must be a number, got {describe(v)}")
    return v


def _opts(where, temperature, top_k, top_p) -> _Opts:
    if top_k is None and top_p is None and type(temperature) is int and temperature == 1:
        return _PLAIN_OPTS  # (the defaults: nothing to check)
    t = _number(where, "temperature", temperature)
    if not (t > 0 and math.isfinite(t)):
        raise PPLRuntimeError(f"{where}: temperature must be a positive number (got {t})",
                              hint="temperature 1 is the model's own distribution; for greedy decoding use top_k=1")
    if top_k is not None:
        top_k = _count(where, "top_k", top_k)
    if top_p is not None:
        top_p = _number(where, "top_p", top_p)
        if not 0 < top_p <= 1:
            raise PPLRuntimeError(f"{where}: top_p must be in (0, 1] (got {top_p})")
        if top_p == 1:
            top_p = None
    if t == 1:
        t = 1
    return _Opts(t, top_k, top_p)


_PLAIN_OPTS = _Opts(1, None, None)


def _count(where, what, v) -> int:
    v = _number(where, what, v)
    if v != int(v) or v < 1:
        raise PPLRuntimeError(f"{where}: {what} must be a positive integer (got {v})")
    return int(v)


def _stops(stop) -> tuple:
    if stop is None:
        return ()
    if is_batched(stop):
        raise PPLRuntimeError("generate: stop= must be the same for every particle")
    items = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) else None
    if items is None or not all(isinstance(s, str) and s for s in items):
        raise PPLRuntimeError("generate: stop= must be a non-empty string or a list of them")
    return tuple(str(s) for s in items)


_LM_OF = operator.attrgetter("lm")
_ID_OF = operator.attrgetter("id")


def _token_ids(items: list, lm) -> list | None:
    """``[t.id for t in items]`` when every item is a ``Token`` of ``lm`` (by identity),
    else None: the tests as C-level maps over the items (one step's tokens)."""
    if not all(map(operator.is_, map(type, items), itertools.repeat(Token))) or \
            not all(map(operator.is_, map(_LM_OF, items), itertools.repeat(lm))):
        return None
    return list(map(_ID_OF, items))


_LAST = operator.itemgetter(-1)


def _any_ends_with(contexts: list, eos: int) -> bool:
    """Whether some context (a tuple of ids) ends with ``eos`` (a C-level scan; an empty
    context ends with nothing)."""
    try:
        return eos in map(_LAST, contexts)
    except IndexError:  # an empty context
        return any(c and c[-1] == eos for c in contexts)


def _deep_batched(v) -> bool:
    if isinstance(v, (list, tuple)) and not isinstance(v, str):
        return any(_deep_batched(x) for x in v)
    return is_batched(v)


def _pack_strs(items: list, ctx: Particles):
    first = items[0] if items else None
    if items and all(x == first for x in items):
        return first
    return PerParticle(list(items), ctx.idx)


# ------------------------------------------------------------- decoding transforms
def decode_logprobs(lp: torch.Tensor, opts: _Opts) -> torch.Tensor:
    """Temperature, top-k and top-p applied to rows of log probabilities (normalised)."""
    if opts.temperature != 1:
        lp = torch.log_softmax(lp / float(opts.temperature), -1)
    if opts.top_k is not None and opts.top_k < lp.shape[-1]:
        kth = torch.topk(lp, opts.top_k, dim=-1).values[..., -1:]
        lp = torch.log_softmax(torch.where(lp >= kth, lp, torch.full_like(lp, -math.inf)), -1)
    if opts.top_p is not None:
        p = torch.exp(lp)
        desc = torch.sort(p, dim=-1, descending=True).values
        asc = torch.flip(desc, (-1,))
        greater = lp.shape[-1] - torch.searchsorted(asc.contiguous(), p.contiguous(), right=True)
        before = torch.cat([torch.zeros_like(desc[..., :1]), torch.cumsum(desc, -1)], -1)
        mass_greater = torch.gather(before, -1, greater)
        lp = torch.log_softmax(torch.where(mass_greater < float(opts.top_p), lp, torch.full_like(lp, -math.inf)), -1)
    return lp


def _normalise(q: list) -> list:
    total = sum(q)
    if total == 0:
        return q
    return [x / total for x in q]


def decode_probs(probs: list, opts: _Opts) -> list:
    """``decode_logprobs`` for one row of probabilities, in exact arithmetic where the
    probabilities are rational (an integer 1/temperature keeps them rational)."""
    q = list(probs)
    T = opts.temperature
    if T != 1:
        inv = 1 / Fraction(T) if isinstance(T, (int, Fraction)) else None
        if inv is not None and inv.denominator == 1 and all(isinstance(x, (int, Fraction)) for x in q):
            q = [Fraction(x) ** int(inv) for x in q]
        else:
            e = 1.0 / float(T)
            q = [float(x) ** e for x in q]
        q = _normalise(q)
    if opts.top_k is not None and opts.top_k < len(q):
        kth = sorted(q, reverse=True)[opts.top_k - 1]
        q = _normalise([x if x >= kth else 0 for x in q])
    if opts.top_p is not None:
        greater, acc = {}, 0
        for val in sorted(set(q), reverse=True):
            greater[val] = acc
            acc += val * sum(1 for x in q if x == val)
        q = _normalise([x if greater[x] < opts.top_p else 0 for x in q])
    return q


def _step_exact(lmv: LMValue, context: tuple, opts: _Opts, allowed: frozenset | None, fold: bool) -> list:
    """One step in exact arithmetic: [(token id, mass)] over the tokens of positive mass.
    ``fold``: the constraint's masses p(v) (total Z_A); else the renormalised p(v | A)
    (uniform over A when Z_A = 0: the draw law of the sampling semantics)."""
    if lmv.finished(context):
        return [(lmv.eos_id, 1)]
    q = lmv.exact_probs(context)
    if not opts.plain:
        q = decode_probs(q, opts)
    if allowed is None:
        return [(i, p) for i, p in enumerate(q) if p > 0]
    kept = [(i, q[i]) for i in sorted(allowed)]
    if fold:
        return [(i, p) for i, p in kept if p > 0]
    z = sum(p for _, p in kept)
    if z == 0:
        return [(i, Fraction(1, len(kept))) for i, _ in kept] if kept else []
    return [(i, p / z) for i, p in kept if p > 0]


# ------------------------------------------------------------------- distributions
class _LMSpec:
    """What the semantics read from ``dist.spec``. ``exact_support(*args)`` with the
    dist's ``args`` is the draw law (renormalised under a constraint: the checker draws
    from it); the exact semantics call it through ``python_args()``, which asks for the
    constraint's masses instead."""

    value_event_dim = 0
    index_valued = True  # values are Python objects (per-particle strings), not tensors
    value_dtype = "str"
    param_event_dims = ()

    def __init__(self, name, support, prob):
        self.name, self._support, self._prob = name, support, prob

    def exact_support(self, *args):
        return self._support(*args)

    def exact_prob(self, value, *args):
        return self._prob(value, *args)


class _LMDist(DistValue):
    """Common part of the two LM distributions; ``args`` = (lm value, context, options,
    mask, fold)."""

    __slots__ = ("lmv", "context", "opts", "mask", "_cache", "_last")

    def __init__(self, spec, lmv, context, opts, mask):
        DistValue.__init__(self, spec, (lmv, context, opts, mask, False))
        self.lmv, self.context, self.opts, self.mask = lmv, context, opts, mask
        self._cache = None  # (ctx.idx, *ctx.generation) -> computed rows
        self._last = None   # (value, log_prob, log_mass) of the last draw (log_prob: maybe a function
        #                     that computes it: ``TokenDist.sample``'s direct draw)

    def python_args(self) -> list:
        return [self.lmv, self.context, self.opts, self.mask, True]

    def torch_dist(self, ctx):
        raise PPLRuntimeError(f"{self.spec.name}: a language-model distribution has no torch form")

    def sample_with_log_prob(self, ctx):
        v = self.sample(ctx)
        return v, self.log_prob(v, ctx)

    def _mask_rows(self, ctx: Particles, sel=None):
        """The mask as a bool tensor [M, V] (or [V]) for ctx, or None."""
        m = self.mask
        if m is None:
            return None
        if isinstance(m, _Mask):
            return m.tensor(ctx.device)
        if isinstance(m, ConstraintMask):  # rows per prefix: the callers ask it step by step
            return m
        t = rows(m, ctx)
        return t if sel is None else t[sel]

    def _ctx_key(self, ctx):
        return (ctx.idx, *ctx.generation)

    def _same_key(self, a, b) -> bool:
        return a is not None and b is not None and a[0] is b[0] and a[1:] == b[1:]

    def _remember(self, value, lp, lmass, ctx):
        self._last = (value, lp, lmass, self._ctx_key(ctx))

    def _recall(self, value, ctx):
        last = self._last
        if last is not None and last[0] is value and self._same_key(last[3], self._ctx_key(ctx)):
            return last
        return None

    def log_mass(self, value, ctx):
        """log of the constraint's mass for this choice (a factor the interpreter adds
        right after it), or None without ``allowed=``."""
        if self.mask is None:
            return None
        hit = self._recall(value, ctx)
        if hit is None:
            self.log_prob(value, ctx)
            hit = self._recall(value, ctx)
        lmass, dtype = hit[2], torch.get_default_dtype()
        return Batched(lmass if lmass.dtype == dtype else lmass.to(dtype), ctx.idx)


def _draw_rows(lmv: LMValue, contexts: list, opts: _Opts, mask_rows, device, base=None):
    """Rows of the draw law and the constraint's log mass: (log q [R, V], log Z [R]);
    ``base``: the backend's rows for ``contexts``, when already asked for."""
    if base is None:
        base = lmv.base_logprobs(contexts, device)
    finished = [lmv.finished(c) for c in contexts]
    any_finished = any(finished)
    fin = torch.frombuffer(bytearray(finished), dtype=torch.bool).to(device) if any_finished else None
    lp = base if opts.plain else decode_logprobs(base, opts)
    if any_finished and not opts.plain:
        lp = torch.where(fin[:, None], base, lp)
    if mask_rows is None:
        return lp, torch.zeros(len(contexts), dtype=lp.dtype, device=device)
    if mask_rows.dim() == 1:  # one mask for every row: one pass (+ 0 or + -inf), nothing [R, V] built
        m = mask_rows.expand(lp.shape)
        masked = lp + _additive(mask_rows, lp.dtype)  # (= the torch.where below, value for value)
        if any_finished:  # after the end: the end-of-sequence token, unconstrained (never of mass 0,
            masked = torch.where(fin[:, None], lp, masked)  # so m's rows there are never read)
    else:
        m = mask_rows
        if any_finished:
            m = m | fin[:, None]  # after the end: the end-of-sequence token, unconstrained
        masked = torch.where(m, lp, torch.full_like(lp, -math.inf))
    logz = torch.logsumexp(masked, -1)
    empty = torch.isneginf(logz)
    if bool(empty.any()):  # mass zero: draw uniformly from the allowed set (weight 0 anyway)
        draw = masked - torch.where(empty, torch.zeros_like(logz), logz)[:, None]
        m = m | ~m.any(-1, keepdim=True)  # (a constraint that allows nothing here: any token)
        uniform = torch.where(m, -torch.log(m.sum(-1, keepdim=True).to(lp.dtype)), torch.full_like(lp, -math.inf))
        draw = torch.where(empty[:, None], uniform, draw)
    else:  # (the same values as above, two ops fewer)
        draw = masked - logz[:, None]
    if any_finished:
        logz = torch.where(fin, torch.zeros_like(logz), logz)
    return draw, logz


def _generate_step_mask(mask, gens: list, sel, opts, device):
    """One ``generate`` step's allowed= rows for the active rows ``sel`` (their generated
    ids so far ``gens``): a per-prefix constraint's rows, the shared mask [V], the active
    rows of a per-particle mask, or None without a mask."""
    if mask is None:
        return None
    if isinstance(mask, ConstraintMask):
        return mask.generate_rows(gens, opts, device)
    return mask if mask.dim() == 1 else mask[sel]


def _long_tensor(items: list, device) -> torch.Tensor:
    """A LongTensor of a list of ints (from a buffer: ~5x faster than torch.tensor(list))."""
    t = torch.frombuffer(array.array("q", items), dtype=torch.long) if items else torch.zeros(0, dtype=torch.long)
    return t if str(device) == "cpu" else t.to(device)


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """A shared bool mask [V] as a float row to add to log-probabilities (cached: the
    masks of ``_Mask.tensor`` live as long as their ``_Mask``)."""
    hit = _ADDITIVE.get(id(mask))
    if hit is not None and hit[0] is mask and hit[1] == dtype:
        return hit[2]
    add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)
    if hit is not None and hit[0] is mask:  # a _Mask's tensor (registered by _Mask.tensor): keep it
        _ADDITIVE[id(mask)] = (mask, dtype, add)
    return add


def _sample_rows(draw: torch.Tensor, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of the log-probabilities ``draw`` (-inf on the tokens a row rules
    out), from the run's generator: ``_invert_cdf`` of each row's probabilities.
    ``uniforms``: the U's [R, 1] to use, already drawn (``_draw_plain``'s, when it declined)."""
    cdf = torch.cumsum(torch.exp(draw.double()), -1)
    total = cdf[:, -1:]
    if not _positive_finite(total):
        raise PPLRuntimeError("the language model's next-token probabilities are not finite and positive "
                              "(NaN, infinite, or all zero)")
    return _invert_cdf(cdf, total, uniforms=uniforms)


def _positive_finite(total: torch.Tensor) -> bool:
    """Whether every row total is finite and above zero (one reduction, one sync; NaN fails)."""
    lo, hi = torch.aminmax(total)
    return lo.item() > 0 and hi.item() < math.inf


def _invert_cdf(cdf: torch.Tensor, total: torch.Tensor, squeeze: bool = True,
                uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse-CDF sampling, one uniform per row: for the cumulative sums ``cdf`` [R, V]
    (float64) of non-negative weights with row totals ``total`` [R, 1] (finite, > 0), the
    index of the first entry whose cumulative sum exceeds u = U * total, U ~ [0, 1).

    Token i is drawn with probability (cdf_i - cdf_{i-1}) / total, whatever the row's
    total (no renormalisation needed: probabilities summing to slightly under 1 are drawn
    in proportion). A token of weight zero is never drawn: the index found has
    cdf_{i-1} <= u < cdf_i, and adding a zero leaves the sum unchanged. The index is never
    past the end: U < 1 gives U * total < total in floating point (round to nearest:
    the exact product lies within half a unit of the last place below the total, or is
    representable; for a normal total), so some cdf_i = total exceeds u. (Tested in
    tests/test_lm_overhead.py: masked and tiny probabilities, the largest uniform, and
    the law.) ``squeeze=False``: the indices as [R, 1]. ``uniforms``: the U's [R, 1]
    (default: drawn here from the run's generator)."""
    if uniforms is None:
        uniforms = rng.rand(total.shape, dtype=cdf.dtype, device=cdf.device)
    ids = torch.searchsorted(cdf, uniforms * total, right=True)
    return ids.squeeze(1) if squeeze else ids


def _draw_plain(lmv, base: torch.Tensor, contexts: list, mask_rows, eos_allowed: bool):
    """A draw straight from the backend's rows ``base`` for plain decoding options and a
    mask shared by every row (or none; ``eos_allowed``: whether it allows the
    end-of-sequence token), without building the normalised rows: (the ids as a list,
    log q(ids) as a function that computes it, log Z [R]), with q the masked
    distribution renormalised and Z its mass. (Under SMC's prior draws log q is never
    asked for: its gather and subtraction are left to ``TokenDist.log_prob``.)

    Where some row has no mass (or is not finite): the uniforms drawn [R, 1] instead; the
    caller then goes the general way with them (``_draw_rows``: uniform over the allowed
    set, or the backend's error; ``_sample_rows(draw, uniforms)``: the same random numbers).
    Such a row is recognised by its index, not by a reduction and a sync before the draw:
    U * total is NaN, +inf or 0 there (total NaN, +inf or 0), and no cumulative sum
    exceeds it, so the search returns the row length V; a row of finite positive total
    never gives V (``_invert_cdf``), except for a subnormal total, which goes the general
    way too (it normalises first).

    The probabilities are exponentiated in the rows' dtype and summed in float64
    (``_invert_cdf``); a token whose probability underflows there (log p below about
    -100 in float32) is not drawn (its chance, below 1e-43, is not representable), and a
    row whose every allowed token underflows has total 0 and goes the general way, which
    normalises first."""
    masked = base
    if mask_rows is not None:
        masked = base + _additive(mask_rows, base.dtype)
        if not eos_allowed:  # (else a finished row, the end-of-sequence token's, is unchanged by the mask)
            finished = [lmv.finished(c) for c in contexts]
            if any(finished):  # after the end: the end-of-sequence token, unconstrained
                fin = torch.frombuffer(bytearray(finished), dtype=torch.bool).to(base.device)
                masked = torch.where(fin[:, None], base, masked)
    cdf = torch.cumsum(torch.exp(masked), -1, dtype=torch.float64)
    total = cdf[:, -1:]
    uniforms = rng.rand(total.shape, dtype=cdf.dtype, device=cdf.device)
    ids = _invert_cdf(cdf, total, squeeze=False, uniforms=uniforms)
    id_list = ids.view(-1).tolist()
    if id_list and max(id_list) >= cdf.shape[1]:  # a row of mass zero, NaN or infinite
        return uniforms
    if mask_rows is None:  # (what the general rows give: the backend's log q, no constraint mass)
        return id_list, lambda: base.gather(1, ids).squeeze(1), torch.zeros(len(contexts), dtype=base.dtype,
                                                                              device=base.device)
    logz = torch.log(total).view(-1)  # (0 on a finished row: its total is exp(0) = 1)
    logz = logz.float() if base.dtype == torch.float32 else logz.to(base.dtype)  # (.float(): less dispatch)
    return id_list, lambda: masked.gather(1, ids).squeeze(1) - logz, logz


def _sample_plain(lmv, base: torch.Tensor, contexts: list, mask_rows, eos_allowed: bool):
    """``_draw_plain``'s draw as tensors: (ids, log q(ids), log Z), each [R]; None where a
    row has no mass (or is not finite)."""
    drawn = _draw_plain(lmv, base, contexts, mask_rows, eos_allowed)
    if type(drawn) is not tuple:
        return None
    id_list, log_q, logz = drawn
    return torch.tensor(id_list, dtype=torch.long, device=base.device), log_q(), logz


class TokenDist(_LMDist):
    """``lm.next_token(context, ...)``: a distribution over tokens (``Token`` values)."""

    __slots__ = ()

    def __init__(self, lmv, context, opts, mask):
        super().__init__(_TOKEN_SPEC, lmv, context, opts, mask)

    def describe(self) -> str:
        return f"next-token distribution of '{self.lmv.name}'"

    def _rows(self, ctx, contexts=None, base=None):
        key = self._ctx_key(ctx)
        if self._cache is not None and self._same_key(self._cache[0], key):
            return self._cache[1]
        if contexts is None:
            contexts = self.lmv.contexts(self.context, ctx)
        m = self.mask.next_token_rows(contexts, ctx.device) if isinstance(self.mask, ConstraintMask) \
            else self._mask_rows(ctx)
        draw, logz = _draw_rows(self.lmv, contexts, self.opts, m, ctx.device, base)
        self._cache = (key, (draw, logz))
        return draw, logz

    def sample(self, ctx):
        drawn = None
        if self.opts.plain and (self.mask is None or isinstance(self.mask, _Mask)) and \
                (self._cache is None or not self._same_key(self._cache[0], self._ctx_key(ctx))):
            # the common case: straight from the backend's rows (no normalised rows built)
            contexts = self.lmv.contexts(self.context, ctx)
            base = self.lmv.base_logprobs(contexts, ctx.device)
            drawn = _draw_plain(self.lmv, base, contexts, self._mask_rows(ctx),
                                self.mask is None or self.lmv.eos_id in self.mask.ids)
            if type(drawn) is not tuple:  # a row of mass zero (or not finite): the general way,
                self._rows(ctx, contexts, base)  # same backend rows, same uniforms (``drawn``)
        if type(drawn) is tuple:
            id_list, lp, logz = drawn  # (lp: a function, called if log_prob is asked for)
        else:
            draw, logz = self._rows(ctx)
            ids = _sample_rows(draw, drawn)
            lp = draw.gather(1, ids[:, None]).squeeze(1)
            id_list = ids.tolist()
        toks = list(map(self.lmv._tokens.get, id_list))  # (the tokens made before)
        if None in toks:
            token = self.lmv.token
            toks = [t if t is not None else token(i) for t, i in zip(toks, id_list)]
        value = PerParticle(toks, ctx.idx)
        self._remember(value, lp, logz, ctx)
        return value

    def log_prob(self, value, ctx):
        hit = self._recall(value, ctx)
        if hit is not None:
            lp = hit[1]
            if not isinstance(lp, torch.Tensor):  # the direct draw's, computed now
                lp = lp()
                self._last = (hit[0], lp, *hit[2:])
            return lp
        draw, logz = self._rows(ctx)
        vals = materialize(value, ctx)
        lmv = self.lmv
        cols = []
        for r, v in enumerate(vals):
            if isinstance(v, Token) and v.lm is lmv.lm:
                cols.append((v.id,))
            elif isinstance(v, str):
                cols.append(lmv.ids_with_text(v))
            elif isinstance(v, (int, Fraction)) and not isinstance(v, bool) and int(v) == v and 0 <= v < lmv.V:
                cols.append((int(v),))
            else:
                cols.append(())
        lp = torch.full((ctx.M,), -math.inf, dtype=draw.dtype, device=draw.device)
        single = [r for r, c in enumerate(cols) if len(c) == 1]
        if single:
            r_idx = torch.tensor(single, dtype=torch.long, device=draw.device)
            i_idx = torch.tensor([cols[r][0] for r in single], dtype=torch.long, device=draw.device)
            lp[r_idx] = draw[r_idx, i_idx]
        for r, c in enumerate(cols):
            if len(c) > 1:  # a plain text shared by several ids: their total
                lp[r] = torch.logsumexp(draw[r, list(c)], 0)
        self._remember(value, lp, logz, ctx)
        return lp

    def exact_support(self):
        return self.spec.exact_support(*self.python_args())

    def exact_prob(self, value):
        return self.spec.exact_prob(value, *self.python_args())


def _token_support(lmv, context, opts, mask, fold):
    ids = lmv.ids_of(context)
    allowed = mask.next_token_ids(ids) if isinstance(mask, ConstraintMask) else _mask_ids(mask)
    out = [(lmv.token(i), p) for i, p in _step_exact(lmv, ids, opts, allowed, fold)]
    if not out:  # a constraint of mass zero here: the choice has weight 0
        out = [(lmv.token(i), 0) for i in (sorted(allowed)[:1] or [lmv.eos_id or 0])]
    return out


def _token_prob(value, lmv, context, opts, mask, fold):
    ids = lmv.ids_of(context)
    allowed = mask.next_token_ids(ids) if isinstance(mask, ConstraintMask) else _mask_ids(mask)
    step = dict(_step_exact(lmv, ids, opts, allowed, fold))
    if isinstance(value, Token) and value.lm is lmv.lm:
        return step.get(value.id, 0)
    if isinstance(value, str):
        return sum((step.get(i, 0) for i in lmv.ids_with_text(value)), 0)
    if isinstance(value, int) and not isinstance(value, bool):
        return step.get(value, 0)
    return 0


_TOKEN_SPEC = _LMSpec("next_token", _token_support, _token_prob)


class GenerateDist(_LMDist):
    """``lm.generate(prompt, ...)``: a distribution over completions (``Completion``)."""

    __slots__ = ()

    def __init__(self, lmv, prompt, opts: _GenOpts, mask):
        super().__init__(_GENERATE_SPEC, lmv, prompt, opts, mask)

    def describe(self) -> str:
        return f"completion distribution of '{self.lmv.name}'"

    def _stopped(self, ids) -> bool:
        stop = self.opts.stop
        if not stop:
            return False
        text = self.lmv.decode(ids)
        return any(s in text for s in stop)

    def sample(self, ctx):
        lmv, opts = self.lmv, self.opts
        prompts = lmv.contexts(self.context, ctx, "prompt")
        mask = self._mask_rows(ctx)
        M = ctx.M
        gen: list[list] = [[] for _ in range(M)]
        done = [False] * M
        dtype = torch.get_default_dtype()
        lp = torch.zeros(M, dtype=dtype, device=ctx.device)
        lmass = torch.zeros(M, dtype=dtype, device=ctx.device)
        for _ in range(opts.max_tokens):
            act = [r for r in range(M) if not done[r]]
            if not act:
                break
            sel = torch.tensor(act, dtype=torch.long, device=ctx.device)
            m = _generate_step_mask(mask, [gen[r] for r in act], sel, opts, ctx.device)
            draw, logz = _draw_rows(lmv, [prompts[r] + tuple(gen[r]) for r in act], opts, m, ctx.device)
            ids = _sample_rows(draw)
            lp[sel] += draw.gather(1, ids[:, None]).squeeze(1).to(dtype)
            lmass[sel] += logz.to(dtype)
            for r, t in zip(act, ids.tolist()):
                if t == lmv.eos_id:
                    done[r] = True
                else:
                    gen[r].append(t)
                    if self._stopped(gen[r]):
                        done[r] = True
        value = PerParticle([lmv.completion(g) for g in gen], ctx.idx)
        self._remember(value, lp, lmass, ctx)
        return value

    def _steps(self, ids: tuple):
        """The tokens a completion was generated with (its ids, plus the end-of-sequence
        token where it ended there), or None if it could not have been generated."""
        n, opts = len(ids), self.opts
        if n > opts.max_tokens or (self.lmv.eos_id is not None and self.lmv.eos_id in ids):
            return None
        for k in range(1, n):
            if self._stopped(ids[:k]):
                return None
        if n == opts.max_tokens or (n > 0 and self._stopped(ids)):
            return list(ids)
        if self.lmv.eos_id is None:
            return None
        return list(ids) + [self.lmv.eos_id]

    def _value_ids(self, v):
        lmv = self.lmv
        if isinstance(v, Completion) and v.lm is lmv.lm:
            return v.ids
        if isinstance(v, (str, list, tuple)):  # a text (its tokenisation), or a list of tokens
            try:
                return lmv.ids_of(v, "completion")
            except PPLRuntimeError:
                return None
        return None

    def log_prob(self, value, ctx):
        hit = self._recall(value, ctx)
        if hit is not None:
            return hit[1]
        lmv = self.lmv
        prompts = lmv.contexts(self.context, ctx, "prompt")
        mask = self._mask_rows(ctx)
        M = ctx.M
        dtype = torch.get_default_dtype()
        lp = torch.zeros(M, dtype=dtype, device=ctx.device)
        lmass = torch.zeros(M, dtype=dtype, device=ctx.device)
        steps = []
        for r, v in enumerate(materialize(value, ctx)):
            ids = self._value_ids(v)
            s = None if ids is None else self._steps(tuple(ids))
            if s is None:
                lp[r] = -math.inf
                steps.append([])
            else:
                steps.append(s)
        for k in range(max((len(s) for s in steps), default=0)):
            act = [r for r in range(M) if len(steps[r]) > k]
            sel = torch.tensor(act, dtype=torch.long, device=ctx.device)
            gens = [steps[r][:k] for r in act]
            m = _generate_step_mask(mask, gens, sel, self.opts, ctx.device)
            draw, logz = _draw_rows(lmv, [prompts[r] + tuple(g) for r, g in zip(act, gens)], self.opts, m, ctx.device)
            tok = torch.tensor([steps[r][k] for r in act], dtype=torch.long, device=ctx.device)
            lp[sel] += draw.gather(1, tok[:, None]).squeeze(1).to(dtype)
            lmass[sel] += logz.to(dtype)
        self._remember(value, lp, lmass, ctx)
        return lp

    def exact_support(self):
        return self.spec.exact_support(*self.python_args())

    def exact_prob(self, value):
        return self.spec.exact_prob(value, *self.python_args())


def _generate_support(lmv, prompt, opts, mask, fold):
    prompt_ids = lmv.ids_of(prompt, "prompt")
    allowed = _mask_ids(mask)
    stop = opts.stop
    out = []

    def stopped(ids):
        return bool(stop) and any(s in lmv.decode(ids) for s in stop)

    def walk(ids: list, prob):
        if len(ids) == opts.max_tokens:
            out.append((lmv.completion(ids), prob))
            return
        here = mask.generate_ids(tuple(ids), opts) if isinstance(mask, ConstraintMask) else allowed
        for t, p in _step_exact(lmv, prompt_ids + tuple(ids), opts, here, fold):
            if t == lmv.eos_id:
                out.append((lmv.completion(ids), prob * p))
            elif stopped(ids + [t]):
                out.append((lmv.completion(ids + [t]), prob * p))
            else:
                walk(ids + [t], prob * p)

    walk([], 1)
    if not out:
        out = [(lmv.completion([]), 0)]
    return out


def _generate_prob(value, lmv, prompt, opts, mask, fold):
    d = GenerateDist(lmv, prompt, opts, mask)
    ids = d._value_ids(value)
    steps = None if ids is None else d._steps(tuple(ids))
    if steps is None:
        return 0
    prompt_ids = lmv.ids_of(prompt, "prompt")
    allowed = _mask_ids(mask)
    p = 1
    for k, t in enumerate(steps):
        here = mask.generate_ids(tuple(steps[:k]), opts) if isinstance(mask, ConstraintMask) else allowed
        step = dict(_step_exact(lmv, prompt_ids + tuple(steps[:k]), opts, here, fold))
        p = p * step.get(t, 0)
        if p == 0:
            return 0
    return p


_GENERATE_SPEC = _LMSpec("generate", _generate_support, _generate_prob)


# --------------------------------------------------------------------- reward models
class RewardFn(Builtin):
    """A reward model as a function of the DSL: ``rm(prompt, text)`` is one score per
    particle, from ONE ``score`` call with the distinct (prompt, text) pairs."""

    __slots__ = ("rm",)

    def __init__(self, rm: RewardModel, name: str | None = None):
        self.rm = rm
        super().__init__(name or getattr(rm, "name", "reward"), self._score, (2, 2), pure=False)

    def describe(self) -> str:
        return f"reward model '{self.name}'"

    def _score(self, ctx, prompt, text):
        def as_text(x, what):
            if isinstance(x, str):
                return str(x)
            if isinstance(x, (list, tuple)) and all(isinstance(t, str) for t in x):
                return "".join(x)
            raise PPLRuntimeError(f"{self.name}(): the {what} must be a string or a list of tokens, "
                                  f"got {describe(x)}")
        batched = _deep_batched(prompt) or _deep_batched(text)
        ps = materialize(prompt, ctx) if _deep_batched(prompt) else [prompt] * ctx.M
        ts = materialize(text, ctx) if _deep_batched(text) else [text] * ctx.M
        pairs = [(as_text(p, "prompt"), as_text(t, "text")) for p, t in zip(ps, ts)]
        if not batched:
            pairs = pairs[:1]
        uniq: dict = {}
        where = [uniq.setdefault(pr, len(uniq)) for pr in pairs]
        keys = list(uniq)
        try:
            s = self.rm.score([p for p, _ in keys], [t for _, t in keys])
        except PPLRuntimeError:
            raise
        except Exception as e:
            raise PPLRuntimeError(f"reward model '{self.name}' raised {type(e).__name__}: {e}") from e
        s = torch.as_tensor(s).to(torch.get_default_dtype()).reshape(-1)
        if s.shape[0] != len(keys):
            raise PPLRuntimeError(f"reward model '{self.name}' returned {s.shape[0]} scores for {len(keys)} texts")
        if not batched:
            return float(s[0])
        return Batched(s.to(ctx.device)[torch.tensor(where, dtype=torch.long, device=ctx.device)], ctx.idx)


# ------------------------------------------------------------------------- binding
def wrap(v: Any, name: str = ""):
    """A Python language model or reward model as a value of the DSL (None for other
    objects). A language model keeps one DSL value (with its caches of tokens, encodings
    and allowed= masks) for as long as it lives (stored on it as ``_ppl_dsl_value``)."""
    if isinstance(v, LanguageModel):
        hit = getattr(v, "_ppl_dsl_value", None)
        if isinstance(hit, LMValue) and hit.lm is v:
            return hit
        own = getattr(v, "name", None)
        out = LMValue(v, own if own and own != LanguageModel.name else name or "lm")
        try:
            v._ppl_dsl_value = out
        except (AttributeError, TypeError):  # slots or frozen: no reuse
            pass
        return out
    if isinstance(v, RewardModel):
        own = getattr(v, "name", None)
        return RewardFn(v, own if own and own != RewardModel.name else name or "reward")
    return None


_DEFAULTS: dict = {}


def toy_lm_value() -> LMValue:
    """The default toy language model (``toy_lm()`` in a model)."""
    if "lm" not in _DEFAULTS:
        from .toy import ToyLM
        _DEFAULTS["lm"] = LMValue(ToyLM())
    return _DEFAULTS["lm"]


def toy_reward_value() -> RewardFn:
    """The default toy reward model (``toy_reward()`` in a model)."""
    if "rm" not in _DEFAULTS:
        from .toy import ToyReward
        _DEFAULTS["rm"] = RewardFn(ToyReward())
    return _DEFAULTS["rm"]
