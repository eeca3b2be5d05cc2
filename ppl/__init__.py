"""ppl: a probabilistic programming language embedded in Python.

Models are written in a small Python-like language; ``ppl.model`` compiles one to an
intermediate representation with an exact measure semantics, and ``ppl.infer`` /
``Model.run`` run inference on it, vectorised over particles with torch.
"""
from __future__ import annotations

from .api import InferenceFunction, Model, compile_source, infer, model, python_function
from .result import ExactResult, Site, WeightedResult
from .semantics.errors import (InfiniteSupportError, PPLCheckError, PPLError, PPLRecursionError,
                               PPLRuntimeError, PPLSyntaxError, ZeroEvidenceError)

__version__ = "0.1.0"

__all__ = [
    "model", "infer", "Model", "InferenceFunction", "compile_source", "python_function",
    "WeightedResult", "ExactResult", "Site",
    "PPLError", "PPLSyntaxError", "PPLCheckError", "PPLRuntimeError", "PPLRecursionError",
    "ZeroEvidenceError", "InfiniteSupportError",
]
