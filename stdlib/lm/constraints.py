"""Constraints as potentials: ``allowed=regex(p)``, ``allowed=grammar(g)``,
``allowed=json_schema(s)`` on ``lm.next_token`` and ``lm.generate``.

A constraint is a language of texts (``char_matcher``: a regular expression, a Lark
grammar, or the grammar of a JSON schema, ``json_schema.py``). As ``allowed=`` it is the
mask, at each step, of the tokens that keep the text inside the language:

* ``lm.generate(prompt, allowed=c)`` constrains the completion's text (the prompt is not
  part of it). A token is allowed when the text with the token appended is a *viable
  prefix* (some sentence of ``c`` begins with it), checked character by character, so a
  constraint boundary inside a token is exact; the end-of-sequence token is allowed when
  the text is a whole sentence. When generation ends after a token (it is the
  ``max_tokens``-th draw, or its text completes a ``stop`` string) the token is allowed
  only if the text with it is a whole sentence. So every completion of positive mass is a
  sentence, and ``text ~ lm.generate(p, allowed=c)`` denotes the same measure as ``text ~
  lm.generate(p)`` followed by ``condition c.accepts(text)`` (as for every ``allowed=``:
  the draw is from the renormalised masked distribution, weighted by the allowed mass).
* ``lm.next_token(context, allowed=c)`` constrains the text of the context (the
  concatenation of its tokens' texts) with the next token appended: allowed are the tokens
  after which that text is a viable prefix, and the end-of-sequence token when the text is
  a sentence. ``c = regex(p, prompt=P)`` leaves out the text of ``P`` (a string or a list
  of tokens) at the front of every context: the context must begin with it. A loop of
  ``next_token`` steps with ``allowed=c`` is thus ``condition`` "the generated text is a
  viable prefix, and a sentence if the end-of-sequence token was drawn".

When no token is allowed (a viable prefix that the vocabulary cannot continue within the
remaining tokens) the step has mass 0: the particle's weight is 0, as for any
``allowed=``; if every path dies, the run's usual zero-evidence error says so.

The masks are computed for the whole vocabulary at once by walking the vocabulary trie
(``vocab_trie.py``) with the matcher, and cached by matcher state (a regex automaton
state; for a grammar, the set of parser-stack/terminal configurations), so a state seen
before costs a dictionary lookup; the state after each generated prefix is cached by the
prefix's token ids, so each step advances the matcher over one token's characters.

In the DSL: ``regex(pattern, prompt=None)``, ``grammar(lark_source, prompt=None)`` (the
first rule is ``start``; Lark's LALR parser), ``json_schema(schema, prompt=None,
whitespace=False)`` (the schema as a JSON string in a model, or a dict from Python), and
``c.accepts(text)`` / ``c.viable(text)`` on any constraint. From Python:
``from ppl.stdlib.lm.constraints import regex, grammar, json_schema`` and pass the
constraint as data.
"""
from __future__ import annotations

import json
import weakref
from typing import Any

import torch

from ...semantics.errors import PPLRuntimeError, did_you_mean
from ...semantics.values import Batched, is_batched, materialize, describe
from .char_matcher import GrammarMatcher, Matcher, RegexMatcher
from .vocab_trie import token_texts, vocab_trie_of

#: compiled matchers, by (kind, source): a constraint written inside a loop compiles once
_MATCHERS: dict = {}
_MAX_MATCHERS = 256
#: cached masks per bound constraint: at most this many, and at most MASK_BYTES of them
MAX_MASKS = 4096
MASK_BYTES = 64_000_000
#: cached prefix states per bound constraint (keys are tuples of ids)
MAX_PREFIXES = 50_000
_MISSING = object()


def _matcher(kind: str, key, build) -> Matcher:
    m = _MATCHERS.get((kind, key))
    if m is None:
        m = build()
        if len(_MATCHERS) >= _MAX_MATCHERS:
            _MATCHERS.pop(next(iter(_MATCHERS)))
        _MATCHERS[(kind, key)] = m
    return m


class Constraint:
    """A constraint as a value of the DSL (see the module docstring)."""

    ATTRIBUTES = ("accepts", "viable", "kind", "source")

    def __init__(self, kind: str, source: str, matcher: Matcher, prompt=None):
        self.kind, self.source, self.matcher, self.prompt = kind, source, matcher, prompt
        from ...semantics.interpreter import Builtin
        self._methods = {
            "accepts": Builtin("accepts", self._accepts_fn, (1, 1)),
            "viable": Builtin("viable", self._viable_fn, (1, 1)),
        }

    # ---- Python
    def accepts(self, text: str) -> bool:
        """Whether ``text`` is a sentence of the constraint."""
        return self.matcher.accepts(str(text))

    def viable(self, text: str) -> bool:
        """Whether some sentence of the constraint begins with ``text``."""
        return self.matcher.viable(str(text))

    # ---- the DSL
    def describe(self) -> str:
        src = self.source if len(self.source) <= 40 else self.source[:37] + "..."
        return f"{self.kind} constraint {src!r}"

    def __repr__(self) -> str:
        return f"<{self.describe()}>"

    def ppl_attribute(self, name: str):
        if name in self._methods:
            return self._methods[name]
        if name == "kind":
            return self.kind
        if name == "source":
            return self.source
        raise PPLRuntimeError(f"a constraint has no attribute '{name}'",
                              hint=did_you_mean(name, self.ATTRIBUTES) or
                              f"its attributes are: {', '.join(self.ATTRIBUTES)}")

    def _text_fn(self, test, what):
        def one(t):
            if not isinstance(t, str):
                raise PPLRuntimeError(f"{what}() expects a string, got {describe(t)}")
            return test(str(t))

        def call(ctx, text):
            if is_batched(text):
                vals = [one(t) for t in materialize(text, ctx)]
                return Batched(torch.tensor(vals, dtype=torch.bool, device=ctx.device), ctx.idx)
            return one(text)
        return call

    def _accepts_fn(self, ctx, text):
        return self._text_fn(self.matcher.accepts, "accepts")(ctx, text)

    def _viable_fn(self, ctx, text):
        return self._text_fn(self.matcher.viable, "viable")(ctx, text)

    # ---- as allowed=
    def bind(self, lmv) -> "ConstraintMask":
        """This constraint's masks over ``lmv``'s vocabulary (one object per language
        model, matcher and prompt, so its caches outlive the call)."""
        table = _BOUND.get(lmv)
        if table is None:
            table = _BOUND[lmv] = {}
        key = (id(self.matcher), _prompt_key(self.prompt))
        hit = table.get(key)
        if hit is None or hit.matcher is not self.matcher:
            if len(table) >= 64:
                table.pop(next(iter(table)))
            hit = table[key] = ConstraintMask(self, lmv)
        return hit


_BOUND: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _prompt_key(prompt):
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return ("text", str(prompt))
    try:
        return ("list", tuple((type(x).__name__, getattr(x, "id", None), str(x)) for x in prompt))
    except TypeError:
        return ("other", id(prompt))


# ------------------------------------------------------------------- constructors
def regex(pattern: str, prompt=None) -> Constraint:
    """A regular expression (Python syntax) that the whole text must match."""
    if not isinstance(pattern, str):
        raise PPLRuntimeError(f"regex(): the pattern must be a string, got {describe(pattern)}",
                              hint='e.g. regex(r"[0-9]+")')
    m = _matcher("regex", pattern, lambda: RegexMatcher(pattern))
    return Constraint("regex", pattern, m, _check_prompt("regex", prompt))


def grammar(source: str, prompt=None) -> Constraint:
    """A Lark grammar (LALR; first rule ``start``) whose sentences the text must be."""
    if not isinstance(source, str):
        raise PPLRuntimeError(f"grammar(): the grammar must be a string of Lark source, got {describe(source)}",
                              hint="e.g. grammar('start: \"(\" start \")\" | \"x\"')")
    m = _matcher("grammar", source, lambda: GrammarMatcher(source))
    return Constraint("grammar", source, m, _check_prompt("grammar", prompt))


def json_schema(schema: Any, prompt=None, whitespace: bool = False) -> Constraint:
    """The JSON texts of a schema's instances (a subset of JSON schema: see
    ``json_schema.py``); ``schema`` is a dict or a JSON string."""
    from .json_schema import schema_to_lark
    if not isinstance(whitespace, bool):
        raise PPLRuntimeError(f"json_schema(): whitespace= must be True or False, got {describe(whitespace)}")
    if not isinstance(schema, (str, dict, bool)):
        raise PPLRuntimeError(f"json_schema(): the schema must be a JSON string or a dict, got {describe(schema)}",
                              hint='e.g. json_schema(\'{"type": "integer"}\')')
    try:
        key = (json.dumps(json.loads(schema) if isinstance(schema, str) else schema, sort_keys=True), whitespace)
    except (TypeError, ValueError):
        key = None
    build = lambda: GrammarMatcher(schema_to_lark(schema, whitespace))  # noqa: E731
    m = build() if key is None else _matcher("json_schema", key, build)
    text = schema if isinstance(schema, str) else json.dumps(schema, default=str)
    return Constraint("json_schema", text, m, _check_prompt("json_schema", prompt))


def _check_prompt(where, prompt):
    if prompt is None or isinstance(prompt, str):
        return prompt
    if is_batched(prompt) or (isinstance(prompt, (list, tuple)) and any(is_batched(x) for x in prompt)):
        raise PPLRuntimeError(f"{where}(): prompt= must be the same for every particle")
    if isinstance(prompt, (list, tuple)):
        return list(prompt)
    raise PPLRuntimeError(f"{where}(): prompt= must be a string or a list of tokens, got {describe(prompt)}")


def _dsl_constructor(name, fn, params):
    """A prelude built-in for one constructor: the same for every particle."""
    from ..prelude import bind_arguments
    from ...semantics.interpreter import Builtin

    def call(ctx, *args, **kwargs):
        b = bind_arguments(name, params, args, kwargs, noun="argument")
        if params[0] not in b:
            raise PPLRuntimeError(f"{name}() is missing the argument '{params[0]}'")
        for k, v in b.items():
            if k != "prompt" and is_batched(v):
                raise PPLRuntimeError(f"{name}(): {k} must be the same for every particle")
        return fn(**b)
    return Builtin(name, call, (1, len(params)))


def prelude_builtins() -> dict:
    """``regex``, ``grammar`` and ``json_schema`` for the prelude."""
    return {
        "regex": _dsl_constructor("regex", regex, ("pattern", "prompt")),
        "grammar": _dsl_constructor("grammar", grammar, ("source", "prompt")),
        "json_schema": _dsl_constructor("json_schema", json_schema, ("schema", "prompt", "whitespace")),
    }


# ------------------------------------------------------------------- masks
class ConstraintMask:
    """A constraint over one language model's vocabulary: the allowed tokens after each
    prefix, as rows of bool masks (sampling) or sets of ids (exact enumeration)."""

    def __init__(self, constraint: Constraint, lmv):
        self.constraint = constraint
        self.matcher = constraint.matcher
        self.lmv = lmv
        self.trie = vocab_trie_of(lmv)
        self.V = lmv.V
        self.eos_id = lmv.eos_id
        self._texts = token_texts(lmv)
        self._states: dict = {}    # generated ids -> matcher state (None: dead)
        self._masks: dict = {}     # matcher state -> (viable [V], complete [V], ends)
        self._stop_masks: dict = {}
        self._prompt_text = None
        self._prompt_ids = None
        self._max_masks = max(16, min(MAX_MASKS, MASK_BYTES // (2 * max(self.V, 1))))
        if constraint.prompt is not None:
            ids = lmv.ids_of(constraint.prompt, "prompt")
            self._prompt_ids = ids
            self._prompt_text = "".join(self._texts[i] for i in ids)

    def describe(self) -> str:
        return self.constraint.describe()

    # ---- states
    def state(self, ids: tuple):
        """The matcher state after the text of ``ids`` (cached by prefix)."""
        states = self._states
        hit = states.get(ids, _MISSING)
        if hit is not _MISSING:
            return hit
        n = len(ids)
        k = n
        while k > 0 and ids[:k] not in states:  # the longest cached prefix
            k -= 1
            if n - k > 64:
                k = 0
                break
        s = states[ids[:k]] if k else self.matcher.start
        for j in range(k, n):
            if s is not None:
                s = self.matcher.advance(s, self._texts[ids[j]])
            if len(states) >= MAX_PREFIXES:
                states.clear()
            states[ids[:j + 1]] = s
        return s

    def context_state(self, context: tuple):
        """The state for a next_token context: its text less the prompt's."""
        p = self._prompt_ids
        if p is None:
            return self.state(tuple(context))
        if tuple(context[:len(p)]) == tuple(p):
            return self.state(tuple(context[len(p):]))
        text = "".join(self._texts[i] for i in context)
        if not text.startswith(self._prompt_text):
            raise PPLRuntimeError(f"{self.describe()}: the context {text[:60]!r} does not begin with the "
                                  f"constraint's prompt {self._prompt_text[:60]!r}",
                                  hint="prompt= is the part of every context that the constraint leaves out")
        return self.matcher.advance(self.matcher.start, text[len(self._prompt_text):])

    def masks(self, s):
        """(viable [V] bool, complete [V] bool, accepting) for state ``s``."""
        hit = self._masks.get(s)
        if hit is None:
            if s is None:
                empty = torch.zeros(self.V, dtype=torch.bool)
                hit = (empty, empty, False)
            else:
                viable, complete = self.trie.walk(self.matcher.step, self.matcher.accepting, s)
                hit = (self.trie.mask(viable), self.trie.mask(complete), self.matcher.accepting(s))
            if len(self._masks) >= self._max_masks:
                self._masks.pop(next(iter(self._masks)))
            self._masks[s] = hit
        return hit

    # ---- one row
    def next_token_row(self, context: tuple) -> torch.Tensor:
        viable, _, acc = self.masks(self.context_state(context))
        return self._with_eos(viable, acc)

    def generate_row(self, gen: tuple, opts) -> torch.Tensor:
        """The allowed tokens after the generated ids ``gen`` of ``lm.generate``."""
        s = self.state(tuple(gen))
        viable, complete, acc = self.masks(s)
        if len(gen) + 1 >= opts.max_tokens:  # the last draw: the text must be whole after it
            row = complete
        elif opts.stop:
            row = self._stop_row(s, gen, viable, complete, opts.stop)
        else:
            row = viable
        return self._with_eos(row, acc)

    def _with_eos(self, row, accepting):
        if accepting and self.eos_id is not None:
            row = row.clone()
            row[self.eos_id] = True
        return row

    def _stop_row(self, s, gen, viable, complete, stop) -> torch.Tensor:
        """A token that completes a stop string ends generation: allowed only if whole."""
        width = max(len(x) for x in stop) - 1
        tail = ""
        for i in reversed(gen):  # the text's last ``width`` characters
            if len(tail) >= width:
                break
            tail = self._texts[i] + tail
        tail = tail[len(tail) - width:] if width else ""
        key = (s, tail, stop)
        hit = self._stop_masks.get(key)
        if hit is None:
            ids = torch.nonzero(viable).flatten().tolist()
            ends = [i for i in ids if any(x in tail + self._texts[i] for x in stop)]
            hit = viable.clone()
            if ends:
                e = torch.tensor(ends, dtype=torch.long)
                hit[e] = complete[e]
            if len(self._stop_masks) >= self._max_masks:
                self._stop_masks.pop(next(iter(self._stop_masks)))
            self._stop_masks[key] = hit
        return hit

    # ---- many rows / exact sets
    def next_token_rows(self, contexts: list, device) -> torch.Tensor:
        return torch.stack([self.next_token_row(tuple(c)) for c in contexts]).to(device)

    def generate_rows(self, gens: list, opts, device) -> torch.Tensor:
        return torch.stack([self.generate_row(tuple(g), opts) for g in gens]).to(device)

    def next_token_ids(self, context: tuple) -> frozenset:
        return frozenset(torch.nonzero(self.next_token_row(tuple(context))).flatten().tolist())

    def generate_ids(self, gen: tuple, opts) -> frozenset:
        return frozenset(torch.nonzero(self.generate_row(tuple(gen), opts)).flatten().tolist())
