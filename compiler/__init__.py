"""ppl.compiler: the front end. Source text -> IR (``parse_program``) -> static checks
(``check``).

    parse_program(text, filename="<model>", line_offset=0) -> ir.Program
"""
from __future__ import annotations

from ppl.semantics import ir
from ppl.semantics.source import SourceFile

from .lower import lower
from .parser import parse_source


def parse_program(text: str, filename: str = "<model>", line_offset: int = 0) -> ir.Program:
    """Parse a program (a file of ``def``s) into IR; bad input raises ``PPLSyntaxError``."""
    source = SourceFile(filename, text, line_offset)
    return lower(parse_source(source), source)


__all__ = ["parse_program"]
