"""Incremental character-level matchers: which texts are viable prefixes of a language.

A matcher reads a text one character at a time. Its states are hashable values:

* ``start``: the state of the empty text;
* ``step(state, ch)``: the state after one more character, or None when no sentence of
  the language begins with the text read so far (a dead prefix);
* ``accepting(state)``: whether the text read so far is itself a sentence;
* ``advance(state, text)``: ``step`` over the characters of ``text``.

So a text is a *viable prefix* iff ``advance(start, text)`` is not None, and it is a
sentence iff that state is accepting. Both answers are exact (no lookahead heuristics),
which is what makes a token mask computed from them exact (``constraints.py``).

Two matchers:

``RegexMatcher(pattern)``: Python regex syntax, matched against the whole text (like
``re.fullmatch``). The pattern is compiled to a deterministic automaton by ``interegular``
(the regex-to-automaton library Lark itself uses when it is installed); states that
cannot reach an accepting state are dead, so ``step`` returns None exactly when no
continuation can match. The classes ``\\w``, ``\\d`` and ``\\s`` are the ASCII ones (as with
``re.ASCII``: ``\\w`` does not match ``"é"``), and ``\\uXXXX`` escapes are not supported (write
the character itself). Look-arounds and back-references are not regular: an error.

``GrammarMatcher(lark_source)``: a Lark grammar compiled for the LALR parser. Its
language: a text is a sentence when it splits into a sequence of pieces, each matching
one terminal's pattern (a ``%ignore``\\ d terminal anywhere between them, and at either
end), such that the terminals that are not ignored form a sentence of the grammar's LALR
parse table. The state is the set of live configurations (parser stack, terminal being
read, automaton state of that terminal); a terminal may end wherever its automaton
accepts, so every way of splitting the text is followed (Lark's own lexer instead takes
the longest match with priorities, so in rare grammars it rejects a text that some split
accepts; both agree on grammars whose terminals cannot be split differently). The
parser's steps are Lark's own parse table (``Lark(..., parser="lalr")``), driven on
tuples of states so that configurations can be hashed and cached.

Both matchers memoise ``step`` and ``accepting``: a vocabulary walk visits the same
(state, character) pairs again and again.
"""
from __future__ import annotations

import re
from typing import Iterable

from ...semantics.errors import PPLRuntimeError

#: at most this many live configurations in one grammar state (a guard against grammars
#: whose terminals can be split in exponentially many ways)
MAX_CONFIGURATIONS = 20_000
#: memo tables are cleared when they grow past this many entries
MAX_MEMO = 2_000_000

_NOT_REGULAR = re.compile(r"\(\?<?[=!]|\\[1-9]|\(\?P=|\\g<|\(\?\(")

#: Lark's common terminals written with a look-behind, and the regular expression of the
#: texts its lexer matches with them (ESCAPED_STRING: a quote, then characters other than
#: a newline in which a quote or a backslash is escaped by a backslash, then a quote)
REGULAR_EQUIVALENTS = {
    r'".*?(?<!\\)(\\\\)*?"': r'"(?:[^"\\\n]|\\[^\n])*"',
}


def _interegular():
    try:
        import interegular
    except ImportError as e:  # pragma: no cover - a dependency
        raise PPLRuntimeError("regex and grammar constraints need the 'interegular' package",
                              hint="pip install interegular (a dependency of ppl)") from e
    return interegular


class Automaton:
    """One regular expression as a deterministic automaton over characters, with its dead
    states removed (``step`` is None where no continuation can match)."""

    __slots__ = ("initial", "finals", "_alphabet", "_map")

    def __init__(self, pattern: str, what: str = "regex"):
        if _NOT_REGULAR.search(pattern):
            raise PPLRuntimeError(f"{what} {pattern!r} uses a look-around or a back-reference, which a "
                                  "constraint cannot check incrementally",
                                  hint="use a regular expression without (?=...), (?!...), (?<=...), "
                                       "(?<!...) or \\1")
        ir = _interegular()
        try:
            fsm = ir.parse_pattern(pattern).to_fsm().reduce()  # minimal: equal futures, one state
        except Exception as e:  # interegular's Unsupported / InvalidSyntax / re.error
            raise PPLRuntimeError(f"{what} {pattern!r} cannot be compiled: {type(e).__name__}: {e}",
                                  hint="write a regular expression in Python's syntax (character classes, "
                                       "groups, |, *, +, ?, {m,n})") from None
        live = _live_states(fsm.map, fsm.finals)
        self._alphabet = fsm.alphabet
        self._map = {q: {k: r for k, r in row.items() if r in live} for q, row in fsm.map.items() if q in live}
        self.initial = fsm.initial if fsm.initial in live else None
        self.finals = frozenset(fsm.finals) & live

    def step(self, q, ch: str):
        row = self._map.get(q)
        if row is None:
            return None
        key = self._alphabet[ch]
        return None if key is None else row.get(key)

    def accepts(self, text: str) -> bool:
        q = self.initial
        for ch in text:
            if q is None:
                return False
            q = self.step(q, ch)
        return q is not None and q in self.finals


def _live_states(transitions: dict, finals: Iterable) -> set:
    """The states from which an accepting state can be reached."""
    back: dict = {}
    for q, row in transitions.items():
        for r in row.values():
            back.setdefault(r, set()).add(q)
    live = set(finals)
    todo = list(live)
    while todo:
        r = todo.pop()
        for q in back.get(r, ()):
            if q not in live:
                live.add(q)
                todo.append(q)
    return live


class Matcher:
    """The interface (see the module docstring); subclasses give ``_step`` and
    ``_accepting``, this class memoises them."""

    start = None

    def __init__(self):
        self._steps: dict = {}
        self._accepts: dict = {}

    def step(self, state, ch: str):
        key = (state, ch)
        memo = self._steps
        try:
            return memo[key]
        except KeyError:
            pass
        if len(memo) > MAX_MEMO:
            memo.clear()
        out = memo[key] = self._step(state, ch)
        return out

    def accepting(self, state) -> bool:
        hit = self._accepts.get(state)
        if hit is None:
            if len(self._accepts) > MAX_MEMO:
                self._accepts.clear()
            hit = self._accepts[state] = bool(self._accepting(state))
        return hit

    def advance(self, state, text: str):
        for ch in text:
            if state is None:
                return None
            state = self.step(state, ch)
        return state

    def viable(self, text: str) -> bool:
        """Whether some sentence begins with ``text``."""
        return self.advance(self.start, text) is not None

    def accepts(self, text: str) -> bool:
        """Whether ``text`` is a sentence."""
        s = self.advance(self.start, text)
        return s is not None and self.accepting(s)

    def _step(self, state, ch):  # pragma: no cover - abstract
        raise NotImplementedError

    def _accepting(self, state):  # pragma: no cover - abstract
        raise NotImplementedError


class RegexMatcher(Matcher):
    """A regular expression matched against the whole text; the state is the automaton's."""

    def __init__(self, pattern: str):
        super().__init__()
        if not isinstance(pattern, str):
            raise PPLRuntimeError(f"regex(): the pattern must be a string, got {type(pattern).__name__}")
        self.pattern = pattern
        self.automaton = Automaton(pattern)
        self.start = self.automaton.initial  # None: the pattern matches nothing

    def _step(self, state, ch):
        return self.automaton.step(state, ch)

    def _accepting(self, state):
        return state in self.automaton.finals


# ----------------------------------------------------------------------- grammars
class GrammarMatcher(Matcher):
    """A Lark grammar (LALR) as an incremental matcher (see the module docstring). A state
    is a frozenset of configurations ``(stack, terminal, q)``: the parser's state stack
    (a tuple) after the terminals completed so far, the index of the terminal being read
    (-1: none yet) and its automaton state."""

    def __init__(self, source: str, start: str = "start"):
        super().__init__()
        if not isinstance(source, str):
            raise PPLRuntimeError(f"grammar(): the grammar must be a string of Lark source, got "
                                  f"{type(source).__name__}")
        self.source = source
        parser = _compile_lark(source, start)
        table = parser.parser.parser.parser.parse_table
        self._states = table.states
        self._start_state = table.start_states[start]
        self._end_state = table.end_states[start]
        from lark.parsers.lalr_analysis import Shift
        self._shift = Shift
        ignore = set(parser.ignore_tokens)
        # terminals: (name, automaton, ignored); an ignored terminal never reaches the parser
        self._terms: list = []
        for t in parser.terminals:
            regexp = t.pattern.to_regexp()
            regexp = REGULAR_EQUIVALENTS.get(regexp, regexp)
            auto = Automaton(regexp, f"terminal {t.name} of the grammar:")
            if auto.initial is None:
                continue  # matches nothing
            if t.name in ignore:
                self._terms.append((t.name, auto, True))
            if t.name not in ignore or any(t.name in row for row in self._states.values()):
                self._terms.append((t.name, auto, False))
        self._ignored = tuple(i for i, (_, _, ig) in enumerate(self._terms) if ig)
        self._feeds: dict = {}
        self._acceptable: dict = {}
        self._ends: dict = {}
        self._starts: dict = {}
        self.start = frozenset({((self._start_state,), -1, None)})

    # ---- the parser, on tuples of states
    def feed(self, stack: tuple, name: str):
        """The stack after the parser reads the terminal ``name``, or None (a syntax error)."""
        key = (stack, name)
        if key in self._feeds:
            return self._feeds[key]
        states, shift = self._states, self._shift
        st = list(stack)
        out = None
        while True:
            action = states[st[-1]].get(name)
            if action is None:
                break
            kind, arg = action
            if kind is shift:
                st.append(arg)
                out = tuple(st)
                break
            size = len(arg.expansion)
            if size:
                del st[-size:]
            st.append(states[st[-1]][arg.origin.name][1])
        if len(self._feeds) > MAX_MEMO:
            self._feeds.clear()
        self._feeds[key] = out
        return out

    def can_end(self, stack: tuple) -> bool:
        """Whether the parser accepts the input ending here (Lark's '$END')."""
        hit = self._ends.get(stack)
        if hit is not None:
            return hit
        states, shift, end = self._states, self._shift, self._end_state
        st = list(stack)
        ok = False
        while True:
            action = states[st[-1]].get("$END")
            if action is None or action[0] is shift:
                break
            rule = action[1]
            size = len(rule.expansion)
            if size:
                del st[-size:]
            st.append(states[st[-1]][rule.origin.name][1])
            if st[-1] == end:
                ok = True
                break
        self._ends[stack] = ok
        return ok

    def _acceptable_terms(self, stack: tuple) -> tuple:
        """Indices of the terminals that may start at this stack: those the parser can
        read here, and the ignored ones."""
        hit = self._acceptable.get(stack)
        if hit is None:
            hit = tuple(i for i, (name, _, ig) in enumerate(self._terms)
                        if ig or self.feed(stack, name) is not None)
            self._acceptable[stack] = hit
        return hit

    def _boundary(self, config):
        """The stack at which a new terminal may start after this configuration, or None
        (the terminal being read cannot end here)."""
        stack, t, q = config
        if t < 0:
            return stack
        name, auto, ignored = self._terms[t]
        if q not in auto.finals:
            return None
        return stack if ignored else self.feed(stack, name)

    def _start_on(self, stack: tuple, ch: str) -> tuple:
        """The configurations of a new terminal whose first character is ``ch``."""
        key = (stack, ch)
        hit = self._starts.get(key)
        if hit is None:
            out = []
            for i in self._acceptable_terms(stack):
                auto = self._terms[i][1]
                q = auto.step(auto.initial, ch)
                if q is not None:
                    out.append((stack, i, q))
            hit = self._starts[key] = tuple(out)
        return hit

    def _step(self, state, ch):
        out = set()
        terms = self._terms
        for config in state:
            stack, t, q = config
            if t >= 0:
                q2 = terms[t][1].step(q, ch)
                if q2 is not None:
                    out.add((stack, t, q2))
            b = self._boundary(config)
            if b is not None:
                out.update(self._start_on(b, ch))
        if not out:
            return None
        if len(out) > MAX_CONFIGURATIONS:
            raise PPLRuntimeError(f"grammar constraint: more than {MAX_CONFIGURATIONS} ways to split the text "
                                  "into terminals", hint="make the grammar's terminals unambiguous (e.g. "
                                                         "separate repeated words by a delimiter)")
        return frozenset(out)

    def _accepting(self, state):
        for config in state:
            b = self._boundary(config)
            if b is not None and self.can_end(b):
                return True
        return False


def _compile_lark(source: str, start: str):
    """``Lark(source, parser="lalr")``, its errors as located-ready PPLRuntimeErrors."""
    from lark import Lark
    from lark.exceptions import GrammarError, LarkError
    try:
        return Lark(source, parser="lalr", start=start)
    except GrammarError as e:
        raise PPLRuntimeError(f"grammar(): the grammar is not valid for Lark's LALR parser: "
                              f"{_first_line(e)}",
                              hint="grammar() takes Lark source, e.g. 'start: NUMBER (\",\" NUMBER)*' with "
                                   "'%import common.NUMBER'; it must be LALR(1) (no reduce/reduce "
                                   "conflicts)") from None
    except (LarkError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise PPLRuntimeError(f"grammar(): the grammar cannot be compiled: {type(e).__name__}: "
                              f"{_first_line(e)}",
                              hint="grammar() takes Lark source; its first rule is 'start'") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:3])[:300] if lines else type(e).__name__
