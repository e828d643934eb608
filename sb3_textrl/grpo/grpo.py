"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", https://arxiv.org/abs/2402.03300) on SB3's
``OnPolicyAlgorithm``, through :class:`~sb3_textrl.common.group_algorithm.GroupOnPolicyAlgorithm`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule
from stable_baselines3.common.utils import FloatSchedule

from sb3_textrl.common.group_advantages import LOSS_TYPES, SCALE_REWARDS, group_advantages, token_loss_weights
from sb3_textrl.common.group_algorithm import GroupOnPolicyAlgorithm
from sb3_textrl.common.kl import k3_kl
from sb3_textrl.common.validation import check_positive_int

__all__ = ["GRPO", "clipped_surrogate_loss"]


def clipped_surrogate_loss(
    ratio: th.Tensor, advantages: th.Tensor, clip_range: float, clip_range_high: float | None = None
) -> th.Tensor:
    """
    The per-token clipped surrogate loss of PPO (Schulman et al. 2017, https://arxiv.org/abs/1707.06347, eq. 7), with
    DAPO's separate upper bound (Yu et al. 2025, https://arxiv.org/abs/2503.14476, "clip-higher", eq. 10):

    ``-min(r A, clip(r, 1 - clip_range, 1 + clip_range_high) A)``

    :param ratio: ``(n,)`` float, ``pi(a|s) / pi_old(a|s)``
    :param advantages: ``(n,)`` float
    :param clip_range: the lower bound's distance from 1, ``epsilon_low``
    :param clip_range_high: the upper bound's distance from 1, ``epsilon_high`` (``None``: ``clip_range``)
    :return: ``(n,)`` float, the loss of each token (to be weighted, see
        :func:`~sb3_textrl.common.group_advantages.token_loss_weights`)
    """
    high = clip_range if clip_range_high is None else clip_range_high
    return -th.min(advantages * ratio, advantages * th.clamp(ratio, 1.0 - clip_range, 1.0 + high))


class GRPO(GroupOnPolicyAlgorithm):
    """
    Group Relative Policy Optimization (GRPO): PPO's clipped surrogate with group-relative advantages and no critic.

    Paper: https://arxiv.org/abs/2402.03300 (Shao et al. 2024, "DeepSeekMath", section 4)
    Variants: https://arxiv.org/abs/2503.20783 (Liu et al. 2025, Dr. GRPO), https://arxiv.org/abs/2503.14476 (Yu et
    al. 2025, DAPO)

    Each prompt gets ``G`` completions (a group: ``group_size`` envs of a
    :class:`~sb3_textrl.common.group_vec_env.GroupedVecEnv`, one round per rollout, see
    :class:`~sb3_textrl.common.group_algorithm.GroupOnPolicyAlgorithm`). Completion ``i`` of score ``s_i`` (its episode
    return) gets the advantage ``A_i = (s_i - mean_g) / (std + eps)`` on each of its tokens
    (:func:`~sb3_textrl.common.group_advantages.group_advantages`), and the policy follows the per-token loss

    ``l_{i,t} = -min(r_{i,t} A_i, clip(r_{i,t}, 1 - clip_range, 1 + clip_range_high) A_i) + beta * KL3_{i,t}``

    with ``r = pi(a|s) / pi_old(a|s)`` and ``KL3`` the k3 estimate of the KL to the reference model
    (:func:`~sb3_textrl.common.kl.k3_kl`), averaged over each minibatch as ``loss_type`` says
    (:func:`~sb3_textrl.common.group_advantages.token_loss_weights`) for ``n_epochs`` epochs over the rollout. With
    ``n_epochs=1`` and one minibatch (the defaults) the ratio is 1: this is REINFORCE with the group baseline. There is
    no value loss: the policy's value head is neither used nor trained.

    Use ``GRPO("LMPolicy", make_text_vec_env(n_envs=8, group_size=4, env_kwargs=...), n_steps=max_new_tokens)``, or
    ``GRPO("MlpPolicy", make_group_vec_env("sb3_textrl/TokenMatch-v0", 8, 4))``.
    Logged: ``train/policy_gradient_loss``, ``train/clip_fraction``, ``train/approx_kl``, ``train/entropy_loss``,
    ``train/loss``, ``train/clip_range``, ``train/n_updates``, with ``beta > 0`` ``train/ref_kl`` (mean k3 per token,
    weighted as the loss), and ``rollout/frac_reward_zero_std`` (the groups whose completions all scored the same).

    :param policy: the policy (``LMPolicy``, ``MlpPolicy``...)
    :param env: a :class:`~sb3_textrl.common.group_vec_env.GroupedVecEnv`
    :param learning_rate: the learning rate, or a function of the remaining progress (default 1e-6, for LMs as in TRL;
        raise it for small networks)
    :param n_steps: the longest episode a rollout may hold (default 64), at least ``max_new_tokens``; a rollout is one
        round, so ``n_steps = max_new_tokens`` wastes no buffer space
    :param batch_size: tokens per minibatch, whole episodes packed greedily (default ``None``: the whole rollout)
    :param n_epochs: epochs over the rollout (default 1, DeepSeekMath's and TRL's)
    :param clip_range: the clipping parameter, ``epsilon`` (low side), or a function of the remaining progress
        (default 0.2)
    :param clip_range_high: the upper clipping parameter (DAPO's clip-higher, e.g. 0.28), a number or a function of the
        remaining progress; ``None`` (default): ``clip_range``
    :param scale_rewards: ``"group"`` (default), ``"batch"`` or ``"none"``, see
        :func:`~sb3_textrl.common.group_advantages.group_advantages`
    :param loss_type: ``"grpo"`` (default), ``"dr_grpo"`` (its constant is ``n_steps``) or ``"dapo"``, see
        :func:`~sb3_textrl.common.group_advantages.token_loss_weights`
    :param beta: the coefficient of the k3 KL to the reference model in the loss (default 0: none, and no reference
        pass; DeepSeekMath used 0.04). For a KL reward penalty instead use
        :class:`~sb3_textrl.common.callbacks.KLPenaltyCallback`
    :param ent_coef: entropy coefficient for the loss (default 0)
    :param max_grad_norm: the maximum norm for gradient clipping (default 0.5; ``None``: no clipping)
    :param target_kl: stop the epochs early when the approximate KL between the rollout and the current policy
        exceeds ``1.5 * target_kl``, as PPO (default ``None``: no limit)
    :param rollout_buffer_class: a group rollout buffer class (``None``: chosen from the observation space)
    :param rollout_buffer_kwargs: keyword arguments of the rollout buffer
    :param stats_window_size: window size for the rollout logging (episodes)
    :param tensorboard_log: the log location for tensorboard (``None``: no logging)
    :param policy_kwargs: additional arguments of the policy
    :param verbose: 0 no output, 1 info, 2 debug
    :param seed: seed for the pseudo random generators (and the prompt draws)
    :param device: the device (cpu, cuda, ...), ``"auto"``: the GPU if possible
    :param _init_setup_model: whether to build the network at the creation of the instance
    :raises ValueError: for an unknown ``scale_rewards`` or ``loss_type``, ``n_epochs`` < 1, a ``clip_range`` or
        ``clip_range_high`` that is not positive, and the errors of
        :class:`~sb3_textrl.common.group_algorithm.GroupOnPolicyAlgorithm` (``n_steps``, ``batch_size``, ``beta``, ``env``)
    """

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-6,
        n_steps: int = 64,
        batch_size: int | None = None,
        n_epochs: int = 1,
        clip_range: float | Schedule = 0.2,
        clip_range_high: float | Schedule | None = None,
        scale_rewards: str = "group",
        loss_type: str = "grpo",
        beta: float = 0.0,
        ent_coef: float = 0.0,
        max_grad_norm: float | None = 0.5,
        target_kl: float | None = None,
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
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"`scale_rewards` must be one of {SCALE_REWARDS}, got {scale_rewards!r}.")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"`loss_type` must be one of {LOSS_TYPES}, got {loss_type!r}.")
        check_positive_int(n_epochs, "n_epochs")
        for name, value in (("clip_range", clip_range), ("clip_range_high", clip_range_high)):
            if isinstance(value, (int, float)) and not value > 0:
                raise ValueError(f"`{name}` must be positive (the clipping's distance from 1), got {value!r}.")
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
        self.n_epochs = int(n_epochs)
        self.clip_range = clip_range
        self.clip_range_high = clip_range_high
        self.scale_rewards = scale_rewards
        self.loss_type = loss_type
        self.target_kl = target_kl
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        super()._setup_model()
        self.clip_range = FloatSchedule(self.clip_range)
        if self.clip_range_high is not None:
            self.clip_range_high = FloatSchedule(self.clip_range_high)

    def compute_advantages(self, scores: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
        """
        Group-relative advantages, ``scale_rewards`` as configured (see
        :func:`~sb3_textrl.common.group_advantages.group_advantages`).

        :param scores: ``(n_episodes,)`` float64, each episode's score
        :param group_ids: ``(n_episodes,)`` int64, each episode's group
        :return: ``(n_episodes,)`` float64 advantages
        """
        return group_advantages(scores, group_ids, self.scale_rewards)

    def train(self) -> None:
        """
        Update the policy from the rollout buffer: ``n_epochs`` epochs of minibatches of whole episodes, one gradient
        step per minibatch, on the loss of the class docstring.
        """
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_low = float(self.clip_range(self._current_progress_remaining))  # type: ignore[operator]
        clip_high = clip_low if self.clip_range_high is None else float(self.clip_range_high(self._current_progress_remaining))  # type: ignore[operator]
        buffer = self.rollout_buffer
        if self.beta > 0:
            self._compute_reference_log_probs()

        pg_losses, entropy_losses, clip_fractions, approx_kl_divs, ref_kls = [], [], [], [], []
        loss = th.zeros(())
        continue_training = True
        for epoch in range(self.n_epochs):
            for data in buffer.get(self.batch_size):
                log_prob, entropy = self._log_prob_entropy(data.observations, data.actions)
                weights = th.as_tensor(
                    token_loss_weights(data.episode_lengths, self.loss_type, self.n_steps),
                    dtype=log_prob.dtype,
                    device=log_prob.device,
                )
                ratio = th.exp(log_prob - data.old_log_prob)
                policy_loss = (weights * clipped_surrogate_loss(ratio, data.advantages, clip_low, clip_high)).sum()
                if entropy is None:  # no analytical form: approximate it by -log pi
                    entropy_loss = (weights * log_prob).sum()
                else:
                    entropy_loss = -(weights * entropy).sum()
                loss = policy_loss + self.ent_coef * entropy_loss
                if self.beta > 0:
                    assert data.ref_log_prob is not None
                    ref_kl = (weights * k3_kl(log_prob, data.ref_log_prob)).sum()
                    loss = loss + self.beta * ref_kl
                    ref_kls.append(ref_kl.item())
                pg_losses.append(policy_loss.item())
                entropy_losses.append(entropy_loss.item())
                with th.no_grad():
                    clipped = (ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)
                    clip_fractions.append(th.mean(clipped.float()).item())
                    # approximate KL between the rollout's and the current policy, http://joschu.net/blog/kl-approx.html
                    log_ratio = log_prob - data.old_log_prob
                    approx_kl_div = th.mean((th.exp(log_ratio) - 1) - log_ratio).cpu().numpy()
                    approx_kl_divs.append(approx_kl_div)
                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl_div:.2f}")
                    break

                self.policy.optimizer.zero_grad()
                loss.backward()
                if self.max_grad_norm is not None:
                    th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
            self._n_updates += 1
            if not continue_training:
                break

        self.logger.record("train/policy_gradient_loss", float(np.mean(pg_losses)) if pg_losses else 0.0)
        self.logger.record("train/entropy_loss", float(np.mean(entropy_losses)) if entropy_losses else 0.0)
        self.logger.record("train/clip_fraction", float(np.mean(clip_fractions)) if clip_fractions else 0.0)
        self.logger.record("train/approx_kl", float(np.mean(approx_kl_divs)) if approx_kl_divs else 0.0)
        self.logger.record("train/loss", loss.item())
        if self.beta > 0:
            self.logger.record("train/ref_kl", float(np.mean(ref_kls)) if ref_kls else 0.0)
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_low)
        if self.clip_range_high is not None:
            self.logger.record("train/clip_range_high", clip_high)
