"""ppl.inference: inference algorithms as transformations of a model's meaning.

``METHODS`` maps each ``method=`` name (of ``@ppl.infer``, ``Model.run`` and the CLI's
``--method``) to a function ``(model, data, **options) -> result``. Later algorithms
register here; existing names and their results never change meaning.
"""
from __future__ import annotations

from .methods import METHODS, run_enumerate, run_importance, run_prior

__all__ = ["METHODS", "run_enumerate", "run_importance", "run_prior"]
