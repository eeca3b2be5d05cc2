"""Syntax highlighting of ppl source, with Lark's lexer over the language's own grammar.

``tokens(text)`` splits source into (kind, text) pieces whose concatenation is the text
itself; kinds: "keyword", "distribution", "builtin", "function" (the name after ``def``),
"name", "number", "string", "comment", "operator", "space", "text" (anything the lexer
does not accept: shown as it is). ``to_html(text)`` renders them as ``<span>``s with
inline styles in a ``<pre>`` block (notebooks, the playground). Highlighting never
raises: a lexing error leaves the rest of the text plain.
"""
from __future__ import annotations

import html
import re
from functools import lru_cache
from pathlib import Path

from lark import Lark
from lark.exceptions import LarkError

from ..stdlib.distributions import DISTRIBUTIONS
from .parser import KEYWORDS

_GRAMMAR = Path(__file__).with_name("grammar.lark")

#: kind -> inline CSS
STYLES = {
    "keyword": "color:#0033b3;font-weight:bold",
    "distribution": "color:#067d17",
    "builtin": "color:#00627a",
    "function": "color:#795e26;font-weight:bold",
    "number": "color:#1750eb",
    "string": "color:#a31515",
    "comment": "color:#8c8c8c;font-style:italic",
    "operator": "color:#871094;font-weight:bold",
}
#: the statements and operators of probability: ``~``, ``@`` (of an annotation, ``@enumerate``;
#: between two values ``@`` is matrix multiplication, punctuation like ``*``: ``_annotations``)
_PROBABILISTIC_OPERATORS = {"~", "@"}
_COMMENT = re.compile(r"#[^\n]*")
_PRE_STYLE = ("font-family:monospace;font-size:12.5px;line-height:1.35;background:#f7f7f9;"
              "border:1px solid #e1e1e8;border-radius:3px;padding:6px 10px;margin:4px 0;overflow-x:auto")


@lru_cache(maxsize=1)
def _lexer() -> Lark:
    """The grammar's basic lexer (no indentation post-lexer: layout stays text)."""
    return Lark(_GRAMMAR.read_text(), parser="lalr", lexer="basic")


@lru_cache(maxsize=1)
def _builtin_names() -> frozenset:
    from ..stdlib.prelude import builtins
    return frozenset(builtins())


def tokens(text: str) -> list[tuple[str, str]]:
    """(kind, piece) pairs covering ``text`` exactly (see the module docstring)."""
    out: list[tuple[str, str]] = []
    pos = 0
    after_def = False
    try:
        for tok in _lexer().lex(text, dont_ignore=True):
            start = tok.start_pos
            if start > pos:
                out.append(("space", text[pos:start]))
            kind = _kind(tok.type, str(tok), after_def)
            if kind == "layout":
                out.extend(_layout(str(tok)))
            else:
                out.append((kind, str(tok)))
            if kind != "space" and kind != "layout":
                after_def = str(tok) == "def"
            pos = tok.end_pos
    except LarkError:  # a character the language does not have: the rest as plain text
        pass
    if pos < len(text):
        out.append(("text", text[pos:]))
    return _annotations(out)


def _annotations(pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """An ``@`` is the operator of an annotation only when ``enumerate`` follows it;
    otherwise it is matrix multiplication (punctuation, as ``*`` is)."""
    out = list(pieces)
    for i, (kind, piece) in enumerate(out):
        if piece == "@" and kind == "operator":
            after = next((p for k, p in out[i + 1:] if k != "space"), "")
            if after != "enumerate":
                out[i] = ("punctuation", piece)
    return out


def _kind(token_type: str, value: str, after_def: bool) -> str:
    if token_type == "_NEWLINE":
        return "layout"
    if token_type == "COMMENT":
        return "comment"
    if token_type in ("INT", "FLOAT"):
        return "number"
    if token_type == "STRING":
        return "string"
    if token_type == "NAME":
        if after_def:
            return "function"
        if value in DISTRIBUTIONS:
            return "distribution"
        if value in _builtin_names():
            return "builtin"
        return "name"
    if value in KEYWORDS:
        return "keyword"
    if value in _PROBABILISTIC_OPERATORS:
        return "operator"
    if not value.strip():
        return "space"
    return "punctuation"


def _layout(piece: str) -> list[tuple[str, str]]:
    """A newline token (newlines, indentation and whole-line comments) split into
    comments and space."""
    out, pos = [], 0
    for m in _COMMENT.finditer(piece):
        if m.start() > pos:
            out.append(("space", piece[pos:m.start()]))
        out.append(("comment", m.group()))
        pos = m.end()
    if pos < len(piece):
        out.append(("space", piece[pos:]))
    return out


def to_html(text: str) -> str:
    """``text`` highlighted: a ``<pre class="ppl-source">`` of styled ``<span>``s."""
    spans = []
    for kind, piece in tokens(text):
        escaped = html.escape(piece)
        style = STYLES.get(kind)
        spans.append(f'<span class="ppl-{kind}" style="{style}">{escaped}</span>' if style else escaped)
    return f'<pre class="ppl-source" style="{_PRE_STYLE}">' + "".join(spans) + "</pre>"
