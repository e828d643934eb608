"""Gymnasium environments of sb3_textrl, registered under the ``sb3_textrl/`` namespace on import."""

from gymnasium.envs.registration import register, registry

from sb3_textrl.envs.linear_toy import LinearToyEnv
from sb3_textrl.envs.text_generation import TextGenerationEnv
from sb3_textrl.envs.token_match import TokenMatchEnv
from sb3_textrl.envs.two_state_mdp import TwoStateMDPEnv

__all__ = ["LinearToyEnv", "TextGenerationEnv", "TokenMatchEnv", "TwoStateMDPEnv"]

if "sb3_textrl/TextGeneration-v0" not in registry:
    # no max_episode_steps: the env terminates itself at EOS or max_new_tokens (never truncates)
    register(id="sb3_textrl/TextGeneration-v0", entry_point="sb3_textrl.envs.text_generation:TextGenerationEnv")

# toy environments: checks for the algorithms (see their docstrings for the optimum and the chance level)
if "sb3_textrl/LinearToy-v0" not in registry:
    register(id="sb3_textrl/LinearToy-v0", entry_point="sb3_textrl.envs.linear_toy:LinearToyEnv", max_episode_steps=100)
if "sb3_textrl/TokenMatch-v0" not in registry:
    # no max_episode_steps: the env terminates after `length` tokens
    register(id="sb3_textrl/TokenMatch-v0", entry_point="sb3_textrl.envs.token_match:TokenMatchEnv")
if "sb3_textrl/TwoStateMDP-v0" not in registry:
    register(id="sb3_textrl/TwoStateMDP-v0", entry_point="sb3_textrl.envs.two_state_mdp:TwoStateMDPEnv", max_episode_steps=10)
