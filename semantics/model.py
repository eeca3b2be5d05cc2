"""What inference needs from a compiled model: the ``ModelLike`` protocol.

``ppl.api.Model`` (the user-facing class) satisfies it; an algorithm in ``inference/``
depends on this protocol only, never on ``ppl.api``. The pieces:

* ``program``: the lowered IR (``semantics.ir.Program``), ``entry``: the function to run;
* ``interpreter(exact=False)``: an ``Interpreter`` for the program (exact: plain Python
  values, for enumeration);
* ``builtins()``: the builtin functions the interpreter was made with;
* ``prepare_data(data, device)``: the entry's arguments as runtime values on ``device``;
* ``compile_sibling(source, entry)``: another model compiled with the same builtins and
  options (how a guide program written in the DSL is compiled without importing the
  compiler into ``inference/``).
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable


@runtime_checkable
class ModelLike(Protocol):
    program: Any
    entry: str

    def interpreter(self, exact: bool = False) -> Any: ...

    def builtins(self) -> dict: ...

    def prepare_data(self, data: Mapping[str, Any], device) -> dict: ...
