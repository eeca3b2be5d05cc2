"""What inference needs from a compiled model: the ``ModelLike`` protocol.

``ppl.api.Model`` (the user-facing class) satisfies it; an algorithm in ``inference/``
depends on this protocol only, never on ``ppl.api``. The pieces:

* ``program``: the lowered IR (``semantics.ir.Program``), ``entry``: the function to run;
* ``interpreter(exact=False)``: an ``Interpreter`` for the program (exact: plain Python
  values, for enumeration);
* ``builtins()``: the builtin functions the interpreter was made with;
* ``prepare_data(data, device)``: the entry's arguments as runtime values on ``device``;
* ``bind(args, data)``: the entry's arguments as a dict (positional ``args``, then the
  ``data`` keywords, then the entry's defaults), an unknown name a located error.

Source text is compiled by the Python face (a guide program written in the DSL comes to
``inference/`` already compiled), so ``inference/`` never imports the compiler.
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

    def bind(self, args: tuple = (), data: Mapping[str, Any] | None = None) -> dict: ...
