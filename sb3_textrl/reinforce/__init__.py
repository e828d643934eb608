"""REINFORCE (Williams 1992): Monte-Carlo policy gradient on SB3's ``OnPolicyAlgorithm``, with its policy aliases."""

from sb3_textrl.reinforce.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_textrl.reinforce.reinforce import REINFORCE, incomplete_episode_mask

__all__ = ["REINFORCE", "CnnPolicy", "MlpPolicy", "MultiInputPolicy", "incomplete_episode_mask"]
