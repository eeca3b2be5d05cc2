"""ppl.inference: inference algorithms as transformations of a model's meaning.

``METHODS`` maps each ``method=`` name (of ``@ppl.infer``, ``Model.run`` and the CLI's
``--method``) to a function ``(model, data, **options)`` returning the inference layer's
own result type (``inference.population``: ``Population``, ``Chains``, ``Optimum``, or
exact paths); the Python face wraps it into a result object. ``ppl.register_method`` adds
a user's algorithm; existing names and their results never change meaning.
"""
from __future__ import annotations

from .methods import METHODS, run_enumerate, run_importance, run_prior
from .population import Chains, Optimum, Population

__all__ = ["METHODS", "run_enumerate", "run_importance", "run_prior", "Population", "Chains", "Optimum"]
