"""SB3 callbacks for RLHF-style fine-tuning: the KL penalty against the reference model, and rollout history."""

from __future__ import annotations

import numpy as np
import torch as th
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback

from sb3_textrl.policies import CausalLMActorCriticPolicy


def flat_observations(buffer: RolloutBuffer | DictRolloutBuffer, device: th.device) -> dict[str, th.Tensor] | th.Tensor:
    """The buffer's observations as ``(n_steps * n_envs, ...)`` tensors, in the buffer's (step, env) order."""
    if isinstance(buffer.observations, dict):
        return {
            key: th.as_tensor(value.reshape(-1, *value.shape[2:]), device=device) for key, value in buffer.observations.items()
        }
    return th.as_tensor(buffer.observations.reshape(-1, *buffer.observations.shape[2:]), device=device)


class KLPenaltyCallback(BaseCallback):
    """
    Penalise each step's reward by the KL divergence from the reference model, with stock SB3 algorithms.

    Every step's reward becomes ``r_t - kl_coef * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))``, so that an episode's
    return is the score minus ``kl_coef`` times the sampled KL of the completion from the reference model:
    eq. 2 of Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences",
    https://arxiv.org/abs/1909.08593 (the per-token "k1" estimator).

    At the end of each rollout, the reference log-probs of all its steps are computed in one batched pass (one forward
    per episode), the buffer's rewards are penalised, and returns and advantages (GAE) are recomputed.

    Logged: ``rollout/ref_kl`` (mean KL per episode, nats: total KL over the number of finished episodes),
    ``rollout/ref_kl_per_token`` and ``train/kl_coef``.

    :param kl_coef: KL penalty coefficient (beta in Ziegler et al.); 0 disables the penalty (KL is still logged)
    :param verbose: verbosity level
    :raises ValueError: if ``kl_coef`` is negative, or the policy has no reference model
    """

    def __init__(self, kl_coef: float = 0.05, verbose: int = 0):
        super().__init__(verbose)
        if not np.isfinite(kl_coef) or kl_coef < 0:
            raise ValueError(f"`kl_coef` must be a finite number >= 0, got {kl_coef}.")
        self.kl_coef = float(kl_coef)
        self.last_kl: float = 0.0

    def _init_callback(self) -> None:
        policy = self.model.policy
        if not isinstance(policy, CausalLMActorCriticPolicy) or policy.reference_model is None:
            raise ValueError(
                "KLPenaltyCallback needs an LMPolicy with a reference model: use PPO('LMPolicy', env) and keep "
                "policy_kwargs use_reference_model=True."
            )

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        buffer = self.model.rollout_buffer
        policy: CausalLMActorCriticPolicy = self.model.policy  # type: ignore[assignment]
        obs = flat_observations(buffer, policy.device)
        actions = th.as_tensor(buffer.actions.reshape(-1), device=policy.device)
        ref_log_prob = policy.reference_log_prob(obs, actions).cpu().numpy()
        kl = buffer.log_probs - ref_log_prob.reshape(buffer.log_probs.shape)
        if self.kl_coef > 0:
            buffer.rewards -= self.kl_coef * kl
            # SB3 computed returns/advantages before this hook: recompute them from the penalised rewards
            buffer.compute_returns_and_advantage(last_values=self.locals["values"], dones=self.locals["dones"])
        n_episodes = max(1, int(buffer.episode_starts[1:].sum() + np.sum(self.locals["dones"])))
        self.last_kl = float(kl.sum() / n_episodes)
        self.logger.record("rollout/ref_kl", self.last_kl)
        self.logger.record("rollout/ref_kl_per_token", float(kl.mean()))
        self.logger.record("train/kl_coef", self.kl_coef)


class RolloutHistoryCallback(BaseCallback):
    """
    Record, for each rollout, the mean score of the episodes that finished in it and the KL to the reference model.

    ``history`` is a list of dicts with keys ``timesteps``, ``score`` (mean raw score, ``nan`` if no episode
    finished), ``episodes`` and ``kl`` (from a :class:`KLPenaltyCallback` given as ``kl_callback``, else ``nan``).
    """

    def __init__(self, kl_callback: KLPenaltyCallback | None = None, verbose: int = 0):
        super().__init__(verbose)
        self.kl_callback = kl_callback
        self.history: list[dict[str, float]] = []
        self._scores: list[float] = []

    def _on_step(self) -> bool:
        for info, done in zip(self.locals["infos"], self.locals["dones"]):
            if done and "score" in info:
                self._scores.append(float(info["score"]))
        return True

    def _on_rollout_end(self) -> None:
        self.history.append(
            {
                "timesteps": float(self.num_timesteps),
                "score": float(np.mean(self._scores)) if self._scores else float("nan"),
                "episodes": float(len(self._scores)),
                "kl": self.kl_callback.last_kl if self.kl_callback is not None else float("nan"),
            }
        )
        self._scores = []
