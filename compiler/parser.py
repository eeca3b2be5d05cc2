"""Text -> lark parse tree, with every syntax error turned into a ``PPLSyntaxError``.

The grammar lives in ``grammar.lark``; an ``Indenter`` post-lexer supplies the
_INDENT/_DEDENT tokens and rejects Python words that ppl does not have (``import``,
``class``, ...). Whatever the input, ``parse`` returns a tree or raises
``PPLSyntaxError`` with a span, the offending line and, where we can guess, a hint.
"""
from __future__ import annotations

import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.indenter import Indenter
from lark.lexer import PatternStr

from ppl.semantics.errors import PPLSyntaxError
from ppl.semantics.source import SourceFile, Span

KEYWORDS = frozenset(
    "observe factor condition def return if elif else for in while lambda and or not "
    "pass True False None".split()
)

_IMPORT_HINT = "models cannot import Python modules; pass data and functions as arguments"
_EXCEPTION_HINT = "ppl has no exceptions; use 'condition' to rule out outcomes"
RESERVED = {
    # Python words that are not ppl: using one is always an error, with this hint.
    "import": _IMPORT_HINT,
    "from": _IMPORT_HINT,
    "class": "ppl has no classes; write functions and pass values around",
    "global": "functions cannot rebind outer variables; return the new value instead",
    "nonlocal": "functions cannot rebind outer variables; return the new value instead",
    "with": "'with' is not supported",
    "try": _EXCEPTION_HINT,
    "except": _EXCEPTION_HINT,
    "finally": _EXCEPTION_HINT,
    "raise": _EXCEPTION_HINT,
    "assert": "use 'condition e' to constrain a model",
    "del": "values are immutable; simply stop using the name",
    "break": "loops cannot stop early; use 'while' with a condition",
    "continue": "loops cannot skip ahead; use 'if' inside the loop",
    "yield": "generators are not supported; build and return a list",
    "async": "'async' is not supported",
    "await": "'await' is not supported",
    "is": "use '==' to compare values",
}

MAX_BRACKET_DEPTH = 100
#: the deepest parse tree accepted (a statement in a function is about 10 levels deep,
#: each operator or conditional expression adds one)
MAX_NESTING = 400
_GRAMMAR = Path(__file__).with_name("grammar.lark")
_OPEN, _CLOSE = "([", ")]"


def _error(message: str, line: int, col: int, end_col: int | None = None, hint=None):
    return PPLSyntaxError(message, Span(line, col, line, col if end_col is None else end_col), hint)


class _Indenter(Indenter):
    """lark's Indenter, reporting bad indentation and non-ppl words as PPLSyntaxErrors."""

    NL_type = "_NEWLINE"
    OPEN_PAREN_types = ["LPAR", "LSQB"]
    CLOSE_PAREN_types = ["RPAR", "RSQB"]
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 8

    def handle_NL(self, token: Token):
        if self.paren_level > 0:
            return
        indent = token.rsplit("\n", 1)[-1]
        line, col = token.end_line, token.end_column
        if "\t" in indent:
            raise _error("tab in indentation", line, col,
                         hint="indent with spaces only (4 per level)")
        try:
            for tok in super().handle_NL(token):
                if tok.type != self.NL_type:  # (re)position indents at the line they start
                    tok = Token(tok.type, tok.value, token.end_pos, line, col, line, col, token.end_pos)
                yield tok
        except LarkError:  # DedentError
            raise _error("unindent does not match any outer indentation level", line, col,
                         hint="indent each block by the same amount (4 spaces per level)") from None

    def process(self, stream):
        fresh = _Indenter()  # indentation state per parse, so parses cannot interfere
        return Indenter.process(fresh, fresh._screen(stream))

    def _screen(self, stream):
        depth = 0
        for i, tok in enumerate(stream):
            if i == 0 and tok.column > 1 and tok.type != self.NL_type:
                raise _error("unexpected indent", tok.line, tok.column,
                             hint="the first line must not be indented")
            if tok.type == "NAME" and tok.value in RESERVED:
                raise _error(f"'{tok.value}' is not supported in ppl", tok.line, tok.column,
                             tok.end_column - 1, RESERVED[tok.value])
            if tok.type in self.OPEN_PAREN_types:
                depth += 1
                if depth > MAX_BRACKET_DEPTH:
                    raise _error("brackets are nested too deeply", tok.line, tok.column,
                                 hint=f"use at most {MAX_BRACKET_DEPTH} nested brackets")
            elif tok.type in self.CLOSE_PAREN_types:
                depth -= 1
            yield tok


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(
        _GRAMMAR.read_text(), parser="lalr", lexer="basic", postlex=_Indenter(),
        maybe_placeholders=True,
        # Spans end at the last real token, not at the newline/dedent after a block.
        propagate_positions=lambda c: not (isinstance(c, Token) and c.type in _LAYOUT),
    )


_LAYOUT = {"_NEWLINE", "_INDENT", "_DEDENT"}


def parse(text: str, filename: str = "<model>", line_offset: int = 0) -> Tree:
    """The lark parse tree of ``text``; see ``parse_source``."""
    return parse_source(SourceFile(filename, text, line_offset))


def parse_source(source: SourceFile) -> Tree:
    """The lark parse tree of a source file, or a ``PPLSyntaxError`` pointing into it."""
    text = source.text if source.text.endswith("\n") else source.text + "\n"
    try:
        tree = _lark().parse(text)
        _check_nesting(tree)
        return tree
    except PPLSyntaxError as e:
        err = e
    except UnexpectedInput as e:
        err = _convert(e, source)
    except (LarkError, RecursionError) as e:
        err = PPLSyntaxError(f"cannot parse this program ({type(e).__name__})", Span(1, 1))
    err.span = replace(err.span, source=source)
    raise err


def _check_nesting(tree: Tree) -> None:
    """Refuse a parse tree nested more than ``MAX_NESTING`` levels (a chain of 10,000
    ``**`` or ``a if c else``): every later stage walks the tree recursively. Measured
    with an explicit stack, so this check itself cannot overflow."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            meta = node.meta
            line, col = (meta.line, meta.column) if not meta.empty else (1, 1)
            raise _error(f"the program is nested too deeply (more than {MAX_NESTING} levels)", line, col,
                         hint="split long chains of operators or conditional expressions into several "
                              "assignments")
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, Tree))


# ------------------------------------------------------------------------ error messages
_COMPOUND = ("if", "elif", "else", "for", "while", "def")
_COMPARE = {"==", "!=", "<", "<=", ">", ">="}
_AT_HINT = ("decorators are not supported; '@' is matrix multiplication (`X @ beta`) or annotates a "
            "random choice (`z ~ flip(0.5) @enumerate`)")
_CHAR_HINTS = {
    "@": _AT_HINT,
    ";": "write one statement per line",
    "{": "dicts and sets are not supported; use lists and tuples",
    "}": "dicts and sets are not supported; use lists and tuples",
    "\\": "line continuations are not supported; wrap the expression in brackets",
    "&": "use 'and'", "|": "use 'or'", "!": "use 'not'",
    "'": "this string is never closed", '"': "this string is never closed",
}


def _describe(tok: Token) -> str:
    kind = {"_NEWLINE": "end of line", "_INDENT": "indent", "_DEDENT": "end of block",
            "$END": "end of input"}
    if tok.type in kind:
        return kind[tok.type]
    if tok.type == "NAME":
        return f"name '{tok.value}'"
    if tok.type in ("INT", "FLOAT"):
        return f"number {tok.value}"
    if tok.type == "STRING":
        return f"string {tok.value}"
    return repr(str(tok.value))


def _literals(names) -> set[str]:
    """Expected terminal names -> their literal text where they have one."""
    out = set()
    for name in names:
        try:
            pattern = _lark().get_terminal(name).pattern
        except KeyError:
            out.add(name)
            continue
        out.add(pattern.value if isinstance(pattern, PatternStr) else name)
    return out


def _brackets(text: str) -> str | None:
    """A hint about the first unbalanced bracket in ``text``, ignoring strings/comments."""
    stack: list[tuple[str, int]] = []
    for m in re.finditer(r"""#[^\n]*|'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|[()\[\]]""", text):
        ch, pos = m.group(), m.start()
        where = f"line {text.count(chr(10), 0, pos) + 1}"
        if ch in _OPEN:
            stack.append((ch, pos))
        elif ch in _CLOSE:
            if not stack:
                return f"unbalanced brackets: the '{ch}' on {where} has no matching opening bracket"
            op, _ = stack.pop()
            if _OPEN.index(op) != _CLOSE.index(ch):
                return f"mismatched brackets: '{op}' closed by '{ch}' on {where}"
    if stack:
        op, pos = stack[-1]
        return f"unbalanced brackets: the '{op}' on line {text.count(chr(10), 0, pos) + 1} is never closed"
    return None


def _keyword_above(source: SourceFile, line: int) -> str:
    """The first word of the closest non-blank, non-comment line above ``line``."""
    for n in range(line - 1, 0, -1):
        words = source.line(n).split()
        if words and not words[0].startswith("#"):
            return re.split(r"\W", words[0])[0]
    return ""


def _convert(e: UnexpectedInput, source: SourceFile) -> PPLSyntaxError:
    """A lark error -> a PPLSyntaxError with a message in ppl's terms and a hint."""
    lines = source.text.splitlines() or [""]
    line = e.line if isinstance(e.line, int) and e.line > 0 else len(lines)
    col = e.column if isinstance(e.column, int) and e.column > 0 else 1
    text = source.line(line)
    first = re.split(r"\W", text.split()[0])[0] if text.split() else ""
    before = text[: col - 1].rstrip()
    brackets = _brackets(source.text)

    if isinstance(e, UnexpectedCharacters):
        ch = source.text[e.pos_in_stream] if e.pos_in_stream < len(source.text) else ""
        hint = _CHAR_HINTS.get(ch) or brackets
        return _error(f"unexpected character {ch!r}", line, col, hint=hint)
    if not isinstance(e, UnexpectedToken):
        return _error("unexpected end of input", line, col, hint=brackets)

    tok = e.token
    expected = _literals(e.expected)
    end = col + len(tok.value) - 1 if tok.type not in _LAYOUT and tok.value else col
    desc = _describe(tok)
    if tok.type in ("$END", "_DEDENT"):  # dedents only fail at the end of the input
        desc = "end of input"
        line = max((n for n, s in enumerate(lines, 1) if s.strip()), default=1)
        col = end = len(lines[line - 1]) + 1
    message, hint = f"unexpected {desc}", None

    if tok.value == "=":
        if before[-1:] and before[-1] in "+-*/%":
            hint = f"augmented assignment is not supported; write 'x = x {before[-1]} ...'"
        elif re.search(r"[^=!<>]=[^=]", before + " "):
            hint = "chained assignment is not supported; assign one name at a time"
        else:
            hint = "use '==' to compare values; '=' assigns"
    elif tok.value in _COMPARE and before and not expected & _COMPARE:
        hint = "chained comparisons are not supported; write 'a < b and b < c'"
    elif ":" in expected and tok.type in ("_NEWLINE", "$END"):
        message = "expected ':'"
        hint = f"end the '{first}' line with ':'" if first in _COMPOUND else None
    elif tok.value == "not" and text[col - 1:].split()[1:2] == ["in"]:
        hint = "'not in' is not supported; write 'not (a in b)'"
    elif "else" in expected and tok.type in ("_NEWLINE", "$END"):
        hint = "a conditional expression needs an 'else': 'a if cond else b'"
    elif tok.value == "if" and first == "else":
        hint = "write 'elif' instead of 'else if'"
    elif "_INDENT" in expected:
        kw = _keyword_above(source, line)
        message = "expected an indented block"
        hint = f"indent the body of '{kw}' by 4 spaces" if kw in _COMPOUND else None
    elif tok.type == "_INDENT":
        hint = "this line is indented more than the block it is in"
    elif "~" in expected and first == "observe":
        hint = "write 'observe <value> ~ <distribution>'"
    elif tok.value == "@":
        hint = _AT_HINT
    elif tok.value == "~":
        hint = "'~' makes a random choice; write 'x ~ dist' as a statement of its own"
    elif expected == {"NAME"}:
        message = f"expected a name, found {desc}"
    elif "NAME" in expected and "def" not in expected:
        message = f"expected an expression, found {desc}"
    elif tok.type == "STRING" and re.fullmatch(r"[A-Za-z]{1,2}", before.split()[-1] if before else ""):
        hint = "string prefixes (f, r, b) are not supported"
    elif tok.type in ("NAME", "INT", "FLOAT", "STRING") and tok.value not in KEYWORDS:
        hint = "is an operator or ',' missing between two expressions?"
    return _error(message, line, col, max(end, col), hint or brackets)
