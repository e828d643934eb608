"""RLOO (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740): REINFORCE with the leave-one-out baseline of each
prompt's completions, on SB3's ``OnPolicyAlgorithm``."""

from sb3_textrl.rloo.rloo import RLOO

__all__ = ["RLOO"]
