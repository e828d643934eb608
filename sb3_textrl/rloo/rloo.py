"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
Learning from Human Feedback in LLMs", https://arxiv.org/abs/2402.14740) on SB3's ``OnPolicyAlgorithm``, through
:class:`~sb3_textrl.common.group_algorithm.GroupOnPolicyAlgorithm`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule

from sb3_textrl.common.group_advantages import leave_one_out_advantages
from sb3_textrl.common.group_algorithm import GroupOnPolicyAlgorithm
from sb3_textrl.common.kl import k3_kl

__all__ = ["RLOO"]


class RLOO(GroupOnPolicyAlgorithm):
    """
    REINFORCE Leave-One-Out (RLOO): REINFORCE on whole completions, each baselined by the mean score of the other
    completions of its prompt.

    Paper: https://arxiv.org/abs/2402.14740 (Ahmadian et al. 2024, "Back to Basics", section 3.3)
    Baseline: Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!" (ICLR workshop DeepRLStructPred)

    Each prompt gets ``k`` completions (a group: ``group_size`` envs of a
    :class:`~sb3_textrl.common.group_vec_env.GroupedVecEnv`, one round per rollout, see
    :class:`~sb3_textrl.common.group_algorithm.GroupOnPolicyAlgorithm`). Completion ``y_i`` of score ``s_i`` (its
    episode return) gets the advantage ``A_i = s_i - 1/(k-1) sum_{j != i} s_j``
    (:func:`~sb3_textrl.common.group_advantages.leave_one_out_advantages`), and the policy follows the REINFORCE
    gradient of the paper's eq. 7, the whole completion being one action:

    ``loss = -1/N sum_i A_i log pi(y_i | x_i) = -1/N sum_i A_i sum_t log pi(a_{i,t} | s_{i,t})``

    over the ``N`` completions of the rollout (plus ``beta`` times the k3 KL to the reference model summed over each
    completion's tokens, and ``ent_coef`` times the negative entropy, weighted alike). Each rollout makes one gradient
    step, computed in minibatches of whole episodes of at most ``batch_size`` tokens whose gradients are summed. There
    is no value loss: the policy's value head is neither used nor trained. The paper puts the KL in the reward: use
    :class:`~sb3_textrl.common.callbacks.KLPenaltyCallback` for that.

    Use ``RLOO("LMPolicy", make_text_vec_env(n_envs=8, group_size=4, env_kwargs=...), n_steps=max_new_tokens)``, or
    ``RLOO("MlpPolicy", make_group_vec_env("sb3_textrl/TokenMatch-v0", 8, 4))``.
    Logged: ``train/policy_gradient_loss``, ``train/entropy_loss``, ``train/approx_kl`` (between the rollout's and the
    updated policy's log-probs, before the step: 0 up to rounding, a check), ``train/n_updates``, with ``beta > 0``
    ``train/ref_kl`` (k3 per completion), and ``rollout/frac_reward_zero_std``.

    :param policy: the policy (``LMPolicy``, ``MlpPolicy``...)
    :param env: a :class:`~sb3_textrl.common.group_vec_env.GroupedVecEnv`
    :param learning_rate: the learning rate, or a function of the remaining progress (default 1e-6, for LMs as in TRL;
        raise it for small networks)
    :param n_steps: the longest episode a rollout may hold (default 64), at least ``max_new_tokens``
    :param batch_size: tokens per minibatch of the gradient accumulation, whole episodes packed greedily (default
        ``None``: the whole rollout at once)
    :param beta: the coefficient of the k3 KL to the reference model in the loss (default 0: none, no reference pass)
    :param ent_coef: entropy coefficient for the loss (default 0)
    :param max_grad_norm: the maximum norm for gradient clipping (default 0.5; ``None``: no clipping)
    :param rollout_buffer_class: a group rollout buffer class (``None``: chosen from the observation space)
    :param rollout_buffer_kwargs: keyword arguments of the rollout buffer
    :param stats_window_size: window size for the rollout logging (episodes)
    :param tensorboard_log: the log location for tensorboard (``None``: no logging)
    :param policy_kwargs: additional arguments of the policy
    :param verbose: 0 no output, 1 info, 2 debug
    :param seed: seed for the pseudo random generators (and the prompt draws)
    :param device: the device (cpu, cuda, ...), ``"auto"``: the GPU if possible
    :param _init_setup_model: whether to build the network at the creation of the instance
    :raises ValueError: the errors of :class:`~sb3_textrl.common.group_algorithm.GroupOnPolicyAlgorithm` (``n_steps``,
        ``batch_size``, ``beta``, ``env``)
    """

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-6,
        n_steps: int = 64,
        batch_size: int | None = None,
        beta: float = 0.0,
        ent_coef: float = 0.0,
        max_grad_norm: float | None = 0.5,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ):
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            ent_coef=ent_coef,
            max_grad_norm=max_grad_norm,
            beta=beta,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
        )
        if _init_setup_model:
            self._setup_model()

    def compute_advantages(self, scores: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
        """
        Leave-one-out advantages (see :func:`~sb3_textrl.common.group_advantages.leave_one_out_advantages`).

        :param scores: ``(n_episodes,)`` float64, each episode's score
        :param group_ids: ``(n_episodes,)`` int64, each episode's group
        :return: ``(n_episodes,)`` float64 advantages
        """
        return leave_one_out_advantages(scores, group_ids)

    def train(self) -> None:
        """
        Update the policy from the rollout buffer: one gradient step on the loss of the class docstring, accumulated over
        minibatches of whole episodes.
        """
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        buffer = self.rollout_buffer
        if self.beta > 0:
            self._compute_reference_log_probs()
        n_episodes = len(buffer.episode_lengths)
        n_tokens = buffer.buffer_size

        self.policy.optimizer.zero_grad()
        policy_loss_sum, entropy_loss_sum, ref_kl_sum, approx_kl_sum = 0.0, 0.0, 0.0, 0.0
        for data in buffer.get(self.batch_size):
            log_prob, entropy = self._log_prob_entropy(data.observations, data.actions)
            # sums over the minibatch's tokens, divided by the rollout's completions: the minibatches add up to the loss
            policy_loss = -(data.advantages * log_prob).sum() / n_episodes
            if entropy is None:  # no analytical form: approximate it by -log pi
                entropy_loss = log_prob.sum() / n_episodes
            else:
                entropy_loss = -entropy.sum() / n_episodes
            loss = policy_loss + self.ent_coef * entropy_loss
            if self.beta > 0:
                assert data.ref_log_prob is not None
                ref_kl = k3_kl(log_prob, data.ref_log_prob).sum() / n_episodes
                loss = loss + self.beta * ref_kl
                ref_kl_sum += ref_kl.item()
            loss.backward()
            policy_loss_sum += policy_loss.item()
            entropy_loss_sum += entropy_loss.item()
            with th.no_grad():
                log_ratio = log_prob - data.old_log_prob
                approx_kl_sum += ((th.exp(log_ratio) - 1) - log_ratio).sum().item()

        if self.max_grad_norm is not None:
            th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        self.policy.optimizer.step()

        self._n_updates += 1
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/policy_gradient_loss", policy_loss_sum)
        self.logger.record("train/entropy_loss", entropy_loss_sum)
        self.logger.record("train/approx_kl", approx_kl_sum / n_tokens)
        if self.beta > 0:
            self.logger.record("train/ref_kl", ref_kl_sum)
