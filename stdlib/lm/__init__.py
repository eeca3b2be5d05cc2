"""Language models and reward models as primitives of the DSL.

* ``base``: the backend protocols (``LanguageModel.next_logprobs``, ``RewardModel.score``);
* ``dsl``: their values in the DSL (``lm.next_token``, ``lm.generate``, ``rm(prompt, text)``);
* ``toy``: an exact bigram language model and a word-score reward model, for tests and teaching;
* ``small``: a character-level GRU trained in seconds on standard-library docstrings;
* ``hf``: Hugging Face causal LMs and sequence-classification reward models (local files
  only; needs the ``lm`` extra, imported when first used);
* ``cache``: the prefix-keyed state cache both neural backends share;
* ``batcher``: ``BatchingLM``, concurrent queries served by one batched backend call per tick.
"""
from .base import LanguageModel, RewardModel
from .batcher import BatchingLM, run_concurrently
from .hf import HFCausalLM, HFRewardModel
from .small import SmallLM, load_or_train, train
from .toy import ToyLM, ToyReward

__all__ = ["LanguageModel", "RewardModel", "BatchingLM", "run_concurrently", "ToyLM", "ToyReward", "SmallLM", "train", "load_or_train",
           "HFCausalLM", "HFRewardModel"]
