"""Fast ``allowed=`` masks: predicates on tokens evaluated over the whole vocabulary at once.

A token predicate (``tok ~ lm.next_token(c, allowed=P)``) decides which of the V tokens
may be drawn. Evaluating a DSL predicate token by token costs one interpreter call per
token (about 25 us: 1.2 s for a 50k-token vocabulary), so:

* **Vectorised helpers** (``TokenPredicate``, in the prelude): ``text_contains(s)``,
  ``text_lacks(chars)``, ``text_startswith(p)``, ``text_endswith(s)``, ``text_only(cls)``,
  ``text_has(cls)`` and the combinators ``all_of``, ``any_of``, ``none_of`` build the mask
  with one Python comprehension over the token texts (a few ms for 50k tokens). Each is
  also an ordinary one-argument function of the DSL (``text_lacks("e")(tok)``, per
  particle too), so it composes with anything. Character classes (``cls``): a string of
  characters, or one of the names in ``CHAR_CLASSES``. The empty text (the
  end-of-sequence token) contains nothing, starts and ends with "" only, and consists
  only of characters of any class (``text_only`` is vacuously true of it,
  ``text_has`` false).
* **Pure predicates are evaluated once** (``pure_key``): a prelude/Python function, a
  helper above, or a DSL function whose free variables are constants, pure built-ins,
  language models, lists/tuples of constants or such functions (recursively) depends on
  the token alone. Its mask is computed once and cached on the language model value,
  keyed by the predicate's code and those values; later steps (and later runs) look it up.
  A DSL predicate is evaluated for the whole vocabulary in ONE batched interpreter call
  (``evaluate_batched``: the V tokens as V rows of a fresh population, as the
  interpreter runs particles), so the first step costs tens of ms, not a second.
* Anything else (a predicate reading per-particle values, mutable data, an impure
  built-in) is evaluated exactly per particle, every step (``dsl.LMValue._predicate_mask``).
"""
from __future__ import annotations

import string
from fractions import Fraction
from typing import Callable, Sequence

import torch

from ...semantics.errors import PPLError, PPLRuntimeError
from ...semantics.interpreter import Builtin, Closure, Frame
from ...semantics.values import (Batched, Particles, PerParticle, describe, is_batched, lineage_scope,
                                 materialize, to_bool_rows)

# ------------------------------------------------------------------------ character classes
_PUNCT = frozenset(string.punctuation)

#: named character classes: name -> a test of one character
CHAR_CLASSES: dict[str, Callable[[str], bool]] = {
    "alpha": str.isalpha, "digit": str.isdigit, "alnum": str.isalnum, "space": str.isspace,
    "upper": str.isupper, "lower": str.islower, "punct": _PUNCT.__contains__, "ascii": str.isascii,
}


def _char_class(where: str, cls) -> Callable[[str], bool] | frozenset:
    """A character class: a frozenset of characters, or a test of one character."""
    if not isinstance(cls, str) or is_batched(cls):
        raise PPLRuntimeError(f"{where}: the character class must be a string (the same for every particle), "
                              f"got {describe(cls)}", hint=f"a string of characters, or one of "
                              f"{', '.join(repr(n) for n in CHAR_CLASSES)}")
    if str(cls) in CHAR_CLASSES:
        return CHAR_CLASSES[str(cls)]
    if not cls:
        raise PPLRuntimeError(f"{where}: the character class is empty")
    return frozenset(str(cls))


# ------------------------------------------------------------------------- the predicates
class TokenPredicate(Builtin):
    """A predicate on token texts, evaluated for many texts at once: ``test(texts)`` is
    the list of their truth values. ``key`` identifies it by value (two
    ``text_lacks("e")`` made at different steps share one cached mask). As a DSL value it
    is a one-argument function (of a token or any string; per particle too)."""

    __slots__ = ("test", "key")

    def __init__(self, name: str, test: Callable[[Sequence[str]], list], key: tuple):
        self.test = test
        self.key = key
        super().__init__(name, self._call, (1, 1))

    def describe(self) -> str:
        return f"token predicate {self.name}"

    def _call(self, ctx, tok):
        if is_batched(tok):
            items = materialize(tok, ctx)
            for x in items:
                self._check(x)
            return Batched(torch.tensor(self.test([str(x) for x in items]), dtype=torch.bool, device=ctx.device),
                           ctx.idx)
        self._check(tok)
        return bool(self.test([str(tok)])[0])

    def _check(self, x) -> None:
        if not isinstance(x, str):
            raise PPLRuntimeError(f"{self.name}: expects a token or a string, got {describe(x)}")


def _strings(where: str, what: str, v) -> tuple:
    """One string or a list of strings (the same for every particle), as a tuple."""
    items = [v] if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else None
    if is_batched(v) or items is None or not items or not all(isinstance(s, str) and not is_batched(s)
                                                              for s in items):
        raise PPLRuntimeError(f"{where}: {what} must be a string or a non-empty list of strings, the same for "
                              f"every particle; got {describe(v)}")
    return tuple(str(s) for s in items)


def text_contains(ctx, sub) -> TokenPredicate:
    """Tokens whose text contains ``sub`` (a string, or any of a list of strings)."""
    subs = _strings("text_contains", "the substring", sub)
    if len(subs) == 1:
        s = subs[0]
        return TokenPredicate("text_contains", lambda texts: [s in t for t in texts], ("contains", subs))
    return TokenPredicate("text_contains", lambda texts: [any(s in t for s in subs) for t in texts],
                          ("contains", subs))


def text_lacks(ctx, chars) -> TokenPredicate:
    """Tokens whose text contains none of the characters of ``chars`` (a string), or,
    given a list of strings, none of them as a substring."""
    if isinstance(chars, str) and not is_batched(chars):
        if not chars:
            raise PPLRuntimeError("text_lacks: the characters are empty")
        cs = frozenset(str(chars))
        return TokenPredicate("text_lacks", lambda texts: [cs.isdisjoint(t) for t in texts],
                              ("lacks", tuple(sorted(cs))))
    subs = _strings("text_lacks", "the substrings", chars)
    return TokenPredicate("text_lacks", lambda texts: [not any(s in t for s in subs) for t in texts],
                          ("lacks_sub", subs))


def text_startswith(ctx, prefix) -> TokenPredicate:
    """Tokens whose text starts with ``prefix`` (a string, or any of a list)."""
    ps = _strings("text_startswith", "the prefix", prefix)
    return TokenPredicate("text_startswith", lambda texts: [t.startswith(ps) for t in texts], ("starts", ps))


def text_endswith(ctx, suffix) -> TokenPredicate:
    """Tokens whose text ends with ``suffix`` (a string, or any of a list)."""
    ss = _strings("text_endswith", "the suffix", suffix)
    return TokenPredicate("text_endswith", lambda texts: [t.endswith(ss) for t in texts], ("ends", ss))


def text_only(ctx, cls) -> TokenPredicate:
    """Tokens whose every character is in the class ``cls`` (true of the empty text)."""
    c = _char_class("text_only", cls)
    if isinstance(c, frozenset):
        return TokenPredicate("text_only", lambda texts: [c.issuperset(t) for t in texts], ("only", str(cls)))
    return TokenPredicate("text_only", lambda texts: [all(map(c, t)) for t in texts], ("only", str(cls)))


def text_has(ctx, cls) -> TokenPredicate:
    """Tokens with at least one character in the class ``cls`` (false of the empty text)."""
    c = _char_class("text_has", cls)
    if isinstance(c, frozenset):
        return TokenPredicate("text_has", lambda texts: [not c.isdisjoint(t) for t in texts], ("has", str(cls)))
    return TokenPredicate("text_has", lambda texts: [any(map(c, t)) for t in texts], ("has", str(cls)))


def _parts(where: str, preds) -> tuple:
    if not preds:
        raise PPLRuntimeError(f"{where}() needs at least one token predicate")
    for p in preds:
        if not isinstance(p, TokenPredicate):
            raise PPLRuntimeError(f"{where}() combines token predicates (text_contains(...), text_lacks(...), ...), "
                                  f"got {describe(p)}",
                                  hint="for any other test write a function: allowed=lambda t: ...")
    return tuple(preds)


def all_of(ctx, *preds) -> TokenPredicate:
    """Tokens every one of the token predicates holds for."""
    ps = _parts("all_of", preds)
    return TokenPredicate("all_of", lambda texts: [all(col) for col in zip(*(p.test(texts) for p in ps))],
                          ("all", tuple(p.key for p in ps)))


def any_of(ctx, *preds) -> TokenPredicate:
    """Tokens at least one of the token predicates holds for."""
    ps = _parts("any_of", preds)
    return TokenPredicate("any_of", lambda texts: [any(col) for col in zip(*(p.test(texts) for p in ps))],
                          ("any", tuple(p.key for p in ps)))


def none_of(ctx, *preds) -> TokenPredicate:
    """Tokens none of the token predicates holds for."""
    ps = _parts("none_of", preds)
    return TokenPredicate("none_of", lambda texts: [not any(col) for col in zip(*(p.test(texts) for p in ps))],
                          ("none", tuple(p.key for p in ps)))


def prelude_builtins() -> dict:
    """The helpers above as prelude entries (name -> Builtin)."""
    one = (1, 1)
    return {
        "text_contains": Builtin("text_contains", text_contains, one),
        "text_lacks": Builtin("text_lacks", text_lacks, one),
        "text_startswith": Builtin("text_startswith", text_startswith, one),
        "text_endswith": Builtin("text_endswith", text_endswith, one),
        "text_only": Builtin("text_only", text_only, one),
        "text_has": Builtin("text_has", text_has, one),
        "all_of": Builtin("all_of", all_of, (1, None)),
        "any_of": Builtin("any_of", any_of, (1, None)),
        "none_of": Builtin("none_of", none_of, (1, None)),
    }


# -------------------------------------------------------------------- purity and cache keys
_CONSTANTS = (bool, int, float, str, Fraction, type(None))
#: the prelude's higher-order functions that are pure when the functions they call are
#: (those are free variables of the predicate, or defined in it, and checked as such)
_PURE_HIGHER_ORDER = ("map", "filter", "fold")
#: impure prelude functions a predicate's mask must not be cached over
_EFFECTFUL = ("print", "param")


def _prelude_fn(name: str):
    from ..prelude import builtins
    b = builtins().get(name)
    return getattr(b, "fn", None)
_MAX_DEPTH = 8
_FREE_NAMES: dict = {}  # id(body) -> (body, free names read by it, in order)


def _free_names(fn: Closure) -> tuple:
    """The names a DSL function's body reads that are not its parameters (memoised per body)."""
    hit = _FREE_NAMES.get(id(fn.body))
    if hit is not None and hit[0] is fn.body:
        return hit[1]
    from ...semantics import ir
    body = fn.body
    params = {p.name for p in fn.params}
    nodes = ir.walk(body) if isinstance(body, ir.Expr) else (n for s in body for n in ir.walk(s))
    names = tuple(dict.fromkeys(n.name for n in nodes if isinstance(n, ir.Var) and n.name not in params))
    if len(_FREE_NAMES) >= 4096:
        _FREE_NAMES.clear()
    _FREE_NAMES[id(fn.body)] = (body, names)
    return names


def pure_key(pred, is_lm: Callable[[object], bool] = lambda v: False):
    """(key, anchors, batch_safe) for a predicate whose value depends on the token alone,
    or None. ``key`` is hashable and identifies the predicate's results; ``anchors`` are
    the objects whose identity the key uses (kept alive with the cached mask, and
    compared on a hit, so an id is never mistaken for a recycled one). ``is_lm`` tells
    language model values (fixed for the run) apart. A Python function passed as data
    (an impure ``Builtin`` other than ``print``/``param``) is taken as a fixed function
    of its arguments, as ``allowed=`` always took it, but it is not ``batch_safe``: it
    would see a population's rows as one object, so the mask is then computed token by
    token (once)."""
    if type(pred) is Closure and not _free_names(pred):  # (``lambda v: ...`` of the token alone: the
        return ("closure", id(pred.body), ()), (pred.body,), True  # key ``_value_key`` gives it, directly)
    anchors: list = []
    unsafe: list = []
    key = _value_key(pred, anchors, is_lm, 0, unsafe)
    return None if key is None else (key, tuple(anchors), not unsafe)


def _value_key(v, anchors: list, is_lm, depth: int, unsafe: list):
    if isinstance(v, TokenPredicate):
        return ("tokpred", v.key)
    if isinstance(v, Builtin):
        if not (v.pure or v.higher_order and v.name in _PURE_HIGHER_ORDER and v.fn is _prelude_fn(v.name)):
            if v.higher_order or v.name in _EFFECTFUL or v.fn is _prelude_fn(v.name):
                return None
            unsafe.append(v)  # a Python function from data (or a reward model): fixed, not batch-safe
        anchors.append(v)
        return ("builtin", id(v))
    if isinstance(v, Closure):
        if depth > _MAX_DEPTH:
            return None
        anchors.append(v.body)
        free = []
        for name in _free_names(v):
            try:
                x = v.env.lookup(name)
            except KeyError:  # a local of the body (assigned in it): not a free variable
                continue
            k = _value_key(x, anchors, is_lm, depth + 1, unsafe)
            if k is None:
                return None
            free.append((name, k))
        return ("closure", id(v.body), tuple(free))
    if is_batched(v):
        return None
    if isinstance(v, _CONSTANTS):
        return (type(v).__name__, v)
    if isinstance(v, (list, tuple)):
        if depth > _MAX_DEPTH or len(v) > 10_000:
            return None
        items = []
        for x in v:
            k = _value_key(x, anchors, is_lm, depth + 1, unsafe)
            if k is None:
                return None
            items.append(k)
        return (type(v).__name__, tuple(items))
    if is_lm(v):
        anchors.append(v)
        return ("lm", id(v))
    return None


# ------------------------------------------------------------------ evaluation over the vocabulary
def evaluate_batched(interp, pred, tokens: list, span, path: str = "", depth: int = 0) -> torch.Tensor | None:
    """A pure predicate's truth value for every token of ``tokens`` (a bool tensor
    [len(tokens)]), from ONE call of the predicate in a fresh population of
    len(tokens) rows (row i holds tokens[i]); None when that call fails (an error, a
    random choice, a value that is not a truth value): the caller then evaluates token by
    token, which gives the located error."""
    if isinstance(pred, TokenPredicate):
        return torch.tensor(pred.test([str(t) for t in tokens]), dtype=torch.bool)
    K = len(tokens)
    with lineage_scope(None):  # a population of its own: nothing follows the run's resamplings
        vctx = Particles.all(K)
        arg = PerParticle(list(tokens), vctx.idx)
        try:
            if isinstance(pred, Builtin) and not pred.higher_order:
                v = interp._call_builtin(pred, [arg], {}, vctx, span)
            else:
                gen = interp.call(pred, [arg], {}, vctx, span, Frame(None, vctx, path, depth))
                try:
                    next(gen)
                except StopIteration as stop:
                    v = stop.value
                else:  # a random choice or likelihood statement: the token-by-token path reports it
                    gen.close()
                    return None
            c = to_bool_rows(v, vctx)
        except (PPLError, TypeError, ValueError, IndexError, KeyError, AttributeError, ZeroDivisionError,
                OverflowError, RecursionError):
            return None
    if isinstance(c, bool):
        return torch.full((K,), c, dtype=torch.bool)
    return c.to(torch.bool).cpu()
