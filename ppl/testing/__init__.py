"""Test helpers for ppl: hypothesis strategies (``ppl.testing.strategies``), Monte
Carlo standard errors for checking weighted results (``ppl.testing.montecarlo``), and
simulation-based calibration of any inference method on any model
(``ppl.testing.sbc(model, method, data, ...)``, module ``ppl/testing/sbc.py``; after this
import ``ppl.testing.sbc`` is the function: take the module's other names with
``from ppl.testing.sbc import ...``)."""
from .sbc import SBCResult, observing, prior_predictive, sbc

__all__ = ["sbc", "SBCResult", "observing", "prior_predictive"]
