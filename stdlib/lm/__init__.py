"""Language models and reward models as primitives of the DSL.

* ``base``: the backend protocols (``LanguageModel.next_logprobs``, ``RewardModel.score``);
* ``dsl``: their values in the DSL (``lm.next_token``, ``lm.generate``, ``rm(prompt, text)``);
* ``toy``: an exact bigram language model and a word-score reward model, for tests and teaching.
"""
from .base import LanguageModel, RewardModel
from .toy import ToyLM, ToyReward

__all__ = ["LanguageModel", "RewardModel", "ToyLM", "ToyReward"]
