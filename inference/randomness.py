"""Where an inference algorithm's random draws come from.

Algorithms take their randomness from an object with methods ``sample(dist, ctx)``
(a draw per particle), ``resample(log_weights, scheme, n)`` (ancestor indices) and, for
``smc_steer``, ``select_without_replacement(log_weights, n)`` (distinct indices and their
new log weights). The default draws with torch's generator. ``ppl.testing.validity``
plugs in a source that *enumerates* every possible outcome with its exact probability,
which turns any algorithm written against this interface into a finite sum that can be
checked exactly.
"""
from __future__ import annotations

import torch

from .resampling import normalised, resample as _resample, without_replacement


class TorchRandomness:
    """Draws with torch's global generator (seed it with ``torch.manual_seed``)."""

    def sample(self, dist, ctx):
        return dist.sample(ctx)

    def resample(self, log_weights: torch.Tensor, scheme: str, n: int) -> torch.Tensor:
        return _resample(log_weights, scheme, n)

    def select_without_replacement(self, log_weights: torch.Tensor, n: int):
        """(indices, new log weights): n distinct particles chosen without replacement
        (``resampling.without_replacement``)."""
        return without_replacement(normalised(log_weights), n)
