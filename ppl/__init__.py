"""ppl: a probabilistic programming language embedded in Python.

Models are written in a small Python-like language; ``ppl.model`` compiles one to an
intermediate representation with an exact measure semantics, and ``ppl.infer`` /
``Model.run`` run inference on it, vectorised over particles with torch.
"""
from __future__ import annotations

from .api import InferenceFunction, Model, compile_source, infer, model, python_function
from .inference.amortized import Guide, guide
from .inference.product import ProductOfExperts
from .result import ExactResult, MCMCResult, Site, WeightedResult
from .semantics.limits import Limits, limits, set_limits
from .semantics.errors import (InfiniteSupportError, PPLCheckError, PPLDiagnosticWarning, PPLError,
                               PPLRecursionError, PPLRuntimeError, PPLSyntaxError, ZeroEvidenceError)

__version__ = "0.1.0"

__all__ = [
    "model", "infer", "Model", "InferenceFunction", "compile_source", "python_function",
    "WeightedResult", "ExactResult", "MCMCResult", "Site", "ProductOfExperts", "product", "guide", "Guide",
    "PPLError", "PPLSyntaxError", "PPLCheckError", "PPLRuntimeError", "PPLRecursionError",
    "ZeroEvidenceError", "InfiniteSupportError", "PPLDiagnosticWarning", "set_limits", "limits", "Limits",
]


def product(m1, m2, a: float = 1.0, b: float = 1.0) -> ProductOfExperts:
    """The product of experts p1^a * p2^b of two models over the same choices."""
    return ProductOfExperts(m1, m2, a, b)
