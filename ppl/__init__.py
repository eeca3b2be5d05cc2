"""ppl: a probabilistic programming language embedded in Python.

Models are written in a small Python-like language; ``ppl.model`` compiles one to an
intermediate representation with an exact measure semantics, and ``ppl.infer`` /
``Model.run`` run inference on it, vectorised over particles with torch.
"""
from __future__ import annotations

from .api import InferenceFunction, Model, compile_source, infer, model, python_function
from .guide import Guide, guide
from .inference import product as _product
from .registry import register_method
from .semantics.resampling import register_resampling
from .result import ExactResult, MCMCResult, Site, WeightedResult, as_result
from .semantics.options import OptionSpec
from .semantics.limits import Limits, limits, set_limits
from .semantics.errors import (InfiniteSupportError, PPLCheckError, PPLDiagnosticWarning, PPLError,
                               PPLRecursionError, PPLRuntimeError, PPLSyntaxError, ZeroEvidenceError)

__version__ = "0.1.0"

__all__ = [
    "model", "infer", "Model", "InferenceFunction", "compile_source", "python_function",
    "WeightedResult", "ExactResult", "MCMCResult", "Site", "ProductOfExperts", "product", "guide", "Guide",
    "register_method", "register_resampling", "OptionSpec",
    "PPLError", "PPLSyntaxError", "PPLCheckError", "PPLRuntimeError", "PPLRecursionError",
    "ZeroEvidenceError", "InfiniteSupportError", "PPLDiagnosticWarning", "set_limits", "limits", "Limits",
]


class ProductOfExperts(_product.ProductOfExperts):
    """p1^a * p2^b over the choices of ``m1`` (which ``m2`` must also make): see
    ``inference.product``. ``run`` returns a result object (``WeightedResult`` for
    "importance", ``ExactResult`` for "enumerate")."""

    def run(self, *args, **kwargs):
        return as_result(super().run(*args, **kwargs))


def load_ipython_extension(ipython) -> None:
    """``%load_ext ppl`` in IPython/Jupyter: the ``%%ppl`` cell magic (``ppl.notebook``)."""
    from .notebook import load_ipython_extension as load
    load(ipython)


def product(m1, m2, a: float = 1.0, b: float = 1.0) -> ProductOfExperts:
    """The product of experts p1^a * p2^b of two models over the same choices."""
    return ProductOfExperts(m1, m2, a, b)
