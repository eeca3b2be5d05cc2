"""Source files and spans: every IR node remembers where it came from."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SourceFile:
    """The text of a model and the name errors report for it.

    ``line_offset`` shifts reported line numbers, for a model body that lives inside
    a Python file (a decorated function's docstring)."""

    name: str
    text: str
    line_offset: int = 0

    def line(self, lineno: int) -> str:
        """The text of 1-based line ``lineno`` (in this file's own numbering)."""
        lines = self.text.splitlines()
        if 1 <= lineno <= len(lines):
            return lines[lineno - 1]
        return ""


@dataclass(frozen=True)
class Span:
    """A 1-based, end-inclusive region of a source file."""

    line: int
    col: int
    end_line: int = 0
    end_col: int = 0
    source: SourceFile | None = field(default=None, compare=False, repr=False)

    @property
    def filename(self) -> str:
        return self.source.name if self.source else "<model>"

    @property
    def display_line(self) -> int:
        return self.line + (self.source.line_offset if self.source else 0)

    def location(self) -> str:
        return f"{self.filename}:{self.display_line}:{self.col}"

    def excerpt(self) -> str:
        """The source line with a caret (or carets) under the span."""
        if self.source is None:
            return ""
        text = self.source.line(self.line)
        if not text:
            return ""
        if self.end_line == self.line and self.end_col >= self.col:
            width = max(1, self.end_col - self.col + 1)
        else:
            width = max(1, len(text.rstrip()) - self.col + 1)
        gutter = f"{self.display_line:>5} | "
        return f"{gutter}{text}\n{' ' * len(gutter)}{' ' * (self.col - 1)}{'^' * width}"


NO_SPAN = Span(0, 0)
