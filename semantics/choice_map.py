"""How a program transformation maps the old program's random choices to the new one's.

A transformation (IR program -> IR program, ``compiler/transforms.py``) may carry a
``choice_map`` attribute; ``ppl.testing.validity.check_transformation`` reads it to check
a transformation of a *continuous* program (finite ones are compared exactly on their
measures over return values). Three kinds:

* ``ChoiceMap.identity()``: the same addresses with the same values: p_new(z) = p_old(z).
* ``ChoiceMap.reparameterisation({"theta": "mu + tau * theta_raw"}, new=("theta_raw",))``:
  a change of variables T from the new program's choices to the old one's. Each old
  address replaced is given as an expression (the DSL's syntax) of the new program's
  choices, its data and, where the new program is static, its entry function's variables
  when it returns; ``new`` lists the new program's choices that replace them (as many
  numbers as they replace). Every other choice is kept as it is. The invariant:
  log p_old(T(z)) + log |det dT/dz_new| = log p_new(z) for every z.
* ``ChoiceMap.marginalisation(("z",))``: the old choices named are summed out (finite,
  discrete support) or integrated out (continuous; checked by quadrature, at most three
  numbers): log p_new(rest) = log sum_z p_old(rest, z).

This module holds only the declaration (no sympy, no checking), so that passes in
``compiler/`` can declare their maps without importing ``ppl.testing``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

KINDS = ("identity", "reparameterisation", "marginalisation")


@dataclass(frozen=True)
class ChoiceMap:
    kind: str
    old_from_new: Mapping[str, str] = field(default_factory=dict)
    new: tuple = ()
    summed_out: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind of choice map '{self.kind}' (one of {', '.join(KINDS)})")

    @classmethod
    def identity(cls) -> "ChoiceMap":
        return cls("identity")

    @classmethod
    def reparameterisation(cls, old_from_new: Mapping[str, str], new=()) -> "ChoiceMap":
        return cls("reparameterisation", dict(old_from_new), tuple(new))

    @classmethod
    def marginalisation(cls, summed_out) -> "ChoiceMap":
        return cls("marginalisation", summed_out=tuple(summed_out))

    def __hash__(self):
        return hash((self.kind, tuple(sorted(self.old_from_new.items())), self.new, self.summed_out))
