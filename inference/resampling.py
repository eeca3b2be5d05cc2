"""Resampling lives in ``semantics.resampling`` (generic particle machinery, with the
registry of schemes and their exact laws); this module name is the same module."""
import sys

from ..semantics import resampling as _resampling

sys.modules[__name__] = _resampling
