"""Gymnasium environments of sb3_textrl, registered under the ``sb3_textrl/`` namespace on import."""

from gymnasium.envs.registration import register, registry
from sb3_textrl.envs.text_generation import TextGenerationEnv

__all__ = ["TextGenerationEnv"]

if "sb3_textrl/TextGeneration-v0" not in registry:
    # no max_episode_steps: the env terminates itself at EOS or max_new_tokens (never truncates)
    register(id="sb3_textrl/TextGeneration-v0", entry_point="sb3_textrl.envs.text_generation:TextGenerationEnv")
