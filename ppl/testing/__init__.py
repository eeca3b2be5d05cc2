"""Test helpers for ppl: hypothesis strategies (``ppl.testing.strategies``) and Monte
Carlo standard errors for checking weighted results (``ppl.testing.montecarlo``)."""
