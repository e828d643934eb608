"""Reward functions: score completions, batched.

A reward function is any callable ``(prompts: list[str], completions: list[str]) -> list[float]`` returning one
score per completion, or a per-token reward (see :mod:`sb3_textrl.rewards.base`). The built-in ones are available
by name through :func:`get_reward_fn` (``TextGenerationEnv(reward_fn=name, reward_kwargs=dict(...))``):

============================  ===========================================  ======================
name                          class                                        range
============================  ===========================================  ======================
``"vader"``                   :class:`VaderSentiment`                      [-1, 1]
``"reward_model"``            :class:`SequenceClassifierReward`            logit / [0, 1] / <= 0
``"embedding_similarity"``    :class:`EmbeddingSimilarity`                 [-1, 1]
``"bleu"``, ``"chrf"``        :class:`BLEUReward`, :class:`ChrFReward`     [0, 1]
``"rouge1/2/L"``              :class:`RougeReward`                         [0, 1]
``"lm_likelihood"``           :class:`LMLikelihood`                        (-inf, 0] nats/token
``"human_file"``              :class:`HumanRatings`                        the raters' scale
``"human_terminal"``          :class:`TerminalRater`                       [low, high]
``"combined"``                :class:`CombinedReward`                      weighted sum
============================  ===========================================  ======================
"""

from sb3_textrl.rewards.base import (
    PerTokenRewardFn,
    RewardError,
    RewardFn,
    is_per_token,
    per_token_reward,
    reward_name,
    score_completions,
    score_tokens,
    term_scores,
)
from sb3_textrl.rewards.combined import CombinedReward
from sb3_textrl.rewards.embedding import EmbeddingSimilarity, minilm_path
from sb3_textrl.rewards.human import HumanRatings, TerminalRater
from sb3_textrl.rewards.likelihood import LMLikelihood
from sb3_textrl.rewards.reference import BLEUReward, ChrFReward, ReferenceReward, RougeReward, load_prompts_with_references
from sb3_textrl.rewards.registry import REWARD_REGISTRY, check_reward_spec, get_reward_fn
from sb3_textrl.rewards.reward_model import SequenceClassifierReward
from sb3_textrl.rewards.sentiment import VaderSentiment

__all__ = [
    "REWARD_REGISTRY",
    "BLEUReward",
    "ChrFReward",
    "CombinedReward",
    "EmbeddingSimilarity",
    "HumanRatings",
    "LMLikelihood",
    "PerTokenRewardFn",
    "ReferenceReward",
    "RewardError",
    "RewardFn",
    "RougeReward",
    "SequenceClassifierReward",
    "TerminalRater",
    "VaderSentiment",
    "check_reward_spec",
    "get_reward_fn",
    "is_per_token",
    "load_prompts_with_references",
    "minilm_path",
    "per_token_reward",
    "reward_name",
    "score_completions",
    "score_tokens",
    "term_scores",
]
