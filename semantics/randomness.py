"""Where an inference algorithm's random draws come from.

Algorithms take their randomness from an object with methods ``sample(dist, ctx)``
(a draw per particle), ``resample(log_weights, scheme, n)`` (ancestor indices; for a
weighted scheme, ancestors and new log weights), for
``smc_steer`` ``select_without_replacement(log_weights, n)`` (distinct indices and their
new log weights), and for MCMC (MH, PMMH) ``choose(sizes)`` (a uniform index per chain),
``normal(shape, device)`` (a random-walk step) and ``accept(log_alpha)`` (the MH test).
The default (``TorchRandomness``) draws with the run's own ``torch.Generator``
(``stdlib.rng``: thread-safe, reproducible for a seed). The exact checker
(testing/validity.py) plugs in a source that *enumerates* every possible outcome with its
exact probability, which turns any algorithm written against this interface into a finite
sum that can be checked exactly.

It lives in ``semantics`` with the run kit that uses it (the ``prior`` chooser and the SMC
resampling rule, ``semantics.resampling_rule``); ``inference.randomness`` is the same module.
"""
from __future__ import annotations

import contextlib

import torch

from ..stdlib import rng
from .resampling import normalised, resample as _resample, without_replacement


class TorchRandomness:
    """Draws with torch generators.

    ``generator`` None (the default): the current run's generators (``Model.run(...,
    seed=s)`` gives each run its own, seeded with s; outside a run, torch's global
    generator). A ``torch.Generator``: every draw made through this object comes from it
    (it must be on the device of the run)."""

    generator: torch.Generator | None = None

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def drawing(self):
        """A context in which ppl's draws come from this object's generator."""
        return contextlib.nullcontext() if self.generator is None else rng.using(self.generator)

    def gen(self, device) -> torch.Generator | None:
        """The generator for a draw on ``device``."""
        return self.generator if self.generator is not None else rng.generator(device)

    def sample(self, dist, ctx):
        if self.generator is None:  # the run's generators: nothing to switch to
            return dist.sample(ctx)
        with self.drawing():
            return dist.sample(ctx)

    def resample(self, log_weights: torch.Tensor, scheme: str, n: int) -> torch.Tensor:
        with self.drawing():
            return _resample(log_weights, scheme, n)

    def select_without_replacement(self, log_weights: torch.Tensor, n: int):
        """(indices, new log weights): n distinct particles chosen without replacement
        (``resampling.without_replacement``)."""
        with self.drawing():
            return without_replacement(normalised(log_weights), n)

    # -- MCMC ------------------------------------------------------------------------
    def choose(self, sizes: torch.Tensor) -> torch.Tensor:
        """A uniform index in [0, sizes[c]) per chain."""
        u = self.uniform(sizes.shape, sizes.device)
        return torch.minimum((u * sizes).floor().long(), (sizes - 1).clamp(min=0).long())

    def normal(self, shape, device) -> torch.Tensor:
        """Standard normal draws (float64)."""
        return torch.randn(shape, device=device, dtype=torch.float64, generator=self.gen(device))

    def uniform(self, shape, device) -> torch.Tensor:
        """Uniform draws on [0, 1) (float64)."""
        return torch.rand(shape, dtype=torch.float64, device=device, generator=self.gen(device))

    def accept(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """The Metropolis-Hastings test per chain: True with probability min(1, exp(log_alpha))."""
        return torch.log(self.uniform(log_alpha.shape, log_alpha.device)) < log_alpha
