"""Test helpers for ppl: hypothesis strategies (``ppl.testing.strategies``)."""
