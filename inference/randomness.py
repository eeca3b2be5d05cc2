"""Where an inference algorithm's random draws come from.

Algorithms take their randomness from an object with two methods: ``sample(dist, ctx)``
(a draw per particle) and ``resample(log_weights, scheme, n)`` (ancestor indices). The
default draws with torch's generator. ``ppl.testing.validity`` plugs in a source that
*enumerates* every possible outcome with its exact probability, which turns any
algorithm written against this interface into a finite sum that can be checked exactly.
"""
from __future__ import annotations

import torch

from .resampling import resample as _resample


class TorchRandomness:
    """Draws with torch's global generator (seed it with ``torch.manual_seed``)."""

    def sample(self, dist, ctx):
        return dist.sample(ctx)

    def resample(self, log_weights: torch.Tensor, scheme: str, n: int) -> torch.Tensor:
        return _resample(log_weights, scheme, n)
