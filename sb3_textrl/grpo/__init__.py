"""GRPO (Shao et al. 2024, https://arxiv.org/abs/2402.03300): group-relative advantages under PPO's clipped surrogate,
on SB3's ``OnPolicyAlgorithm``."""

from sb3_textrl.grpo.grpo import GRPO, clipped_surrogate_loss

__all__ = ["GRPO", "clipped_surrogate_loss"]
