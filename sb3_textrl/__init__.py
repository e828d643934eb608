"""sb3_textrl: fine-tune causal language models with Stable-Baselines3 on Gymnasium text environments.

Importing the package registers the ``sb3_textrl/`` Gymnasium environments and makes ``"LMPolicy"`` resolvable
by name in PPO, A2C, REINFORCE, GRPO, RLOO and (when sb3-contrib is installed) TRPO.
"""

import sys

from sb3_textrl import _moved_modules, envs  # noqa: F401  (old import paths keep working; registers the environments)
from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.common.callbacks import KLPenaltyCallback, LMEvalCallback, RolloutHistoryCallback
from sb3_textrl.common.group_vec_env import GroupedVecEnv, make_group_vec_env
from sb3_textrl.common.kl import AdaptiveKLController, FixedKLController
from sb3_textrl.common.spaces import TokenObservationSpace
from sb3_textrl.common.training_checkpoints import AtomicCheckpointCallback, load_checkpoint, load_model
from sb3_textrl.common.validation import check_lm_setup
from sb3_textrl.common.vec_env import make_text_vec_env
from sb3_textrl.grpo import GRPO
from sb3_textrl.policies import CausalLMActorCriticPolicy, LMPolicy
from sb3_textrl.registration import register_policy_alias
from sb3_textrl.reinforce import REINFORCE
from sb3_textrl.rewards import get_reward_fn
from sb3_textrl.rloo import RLOO
from sb3_textrl.version import __version__

register_policy_alias()

if "rl_zoo3.exp_manager" in sys.modules:  # inside an RL Zoo process (`--gym-packages sb3_textrl`): add its hooks
    from sb3_textrl import zoo  # noqa: F401

__all__ = [
    "GRPO",
    "REINFORCE",
    "RLOO",
    "AdaptiveKLController",
    "AtomicCheckpointCallback",
    "CausalLMActorCriticPolicy",
    "EpisodeRolloutBuffer",
    "FixedKLController",
    "GroupedVecEnv",
    "KLPenaltyCallback",
    "LMEvalCallback",
    "LMPolicy",
    "RolloutHistoryCallback",
    "TokenObservationSpace",
    "__version__",
    "check_lm_setup",
    "get_reward_fn",
    "load_checkpoint",
    "load_model",
    "make_group_vec_env",
    "make_text_vec_env",
]
