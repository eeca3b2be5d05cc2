"""Where an inference algorithm's random draws come from: ``TorchRandomness`` and the
randomness interface live in ``semantics.randomness`` (beside the run kit that draws
through them); this module name is the same module."""
import sys

from ..semantics import randomness as _randomness

sys.modules[__name__] = _randomness
