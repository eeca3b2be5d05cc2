"""Language models and reward models as primitives of the DSL (see ``base`` for the
backend protocols)."""
from .base import LanguageModel, RewardModel

__all__ = ["LanguageModel", "RewardModel"]
