"""REINFORCE: Monte-Carlo policy gradient (Williams 1992, "Simple statistical gradient-following algorithms for
connectionist reinforcement learning", https://doi.org/10.1007/BF00992696) on SB3's ``OnPolicyAlgorithm``."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy, BasePolicy, MultiInputActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import explained_variance
from torch import nn

from sb3_textrl.common.validation import check_positive_int

__all__ = ["REINFORCE", "SelfREINFORCE", "incomplete_episode_mask"]

SelfREINFORCE = TypeVar("SelfREINFORCE", bound="REINFORCE")

# where the value output layer lives: SB3's ActorCriticPolicy, sb3_textrl's LMPolicy
_VALUE_LAYER_NAMES = ("value_net", "value_head")


def incomplete_episode_mask(episode_starts: np.ndarray, last_dones: np.ndarray) -> np.ndarray:
    """
    The steps whose episode is still running when the rollout ends, so their Monte-Carlo return is not known.

    :param episode_starts: ``(n_steps, n_envs)`` float or bool, 1 where a step is the first of an episode
        (``RolloutBuffer.episode_starts``)
    :param last_dones: ``(n_envs,)`` bool, whether the rollout's last step ended an episode (one bool for each env)
    :return: ``(n_steps, n_envs)`` bool, True for the steps after the last episode end of each env
    """
    episode_starts = np.asarray(episode_starts).astype(bool)
    # the episode ends at step t when step t + 1 starts one (or, at the last step, when the env reported done)
    dones = np.concatenate([episode_starts[1:], np.asarray(last_dones).astype(bool).reshape(1, -1)])
    ends_later = np.flip(np.logical_or.accumulate(np.flip(dones, axis=0), axis=0), axis=0)
    return ~ends_later


class REINFORCE(OnPolicyAlgorithm):
    """
    REINFORCE: Monte-Carlo policy gradient, with an optional learned baseline and return normalisation.

    Paper: https://doi.org/10.1007/BF00992696 (Williams 1992, "Simple statistical gradient-following algorithms for
    connectionist reinforcement learning")
    Introduction: https://spinningup.openai.com/en/latest/spinningup/rl_intro3.html

    Built on SB3's ``OnPolicyAlgorithm`` (rollouts, buffer, logging, save/load are SB3's) like A2C, with two
    differences: the policy gradient is weighted by whole-episode returns ``G_t = sum_k gamma^k r_{t+k}`` (the
    rollout buffer's returns with ``gae_lambda=1``, see ``RolloutBuffer.compute_returns_and_advantage``), and each
    rollout makes exactly one gradient step, computed in minibatches of ``batch_size`` steps whose gradients
    are summed (the same step as one batch, in less memory: A2C sends the whole rollout through the policy at once).
    The loss, averaged over the rollout, is

    ``-(G_t - b(s_t)) * log pi(a_t | s_t) + vf_coef * (G_t - V(s_t))^2 - ent_coef * H(pi(. | s_t))``

    - ``use_baseline=True``: ``b = V``, the policy's value head, fitted to ``G_t``; an episode still running when the
      rollout ends (or truncated by a time limit) gets the value of its last observation as the rest of its return.
    - ``use_baseline=False``: ``b = 0`` and no value loss; the policy's value output layer is set to zero and frozen,
      so ``V = 0`` everywhere (no value enters the returns: a time-limit truncation ends the return there).
      An episode still running when the rollout ends has no return yet: its steps are left out of the update (use
      ``n_steps`` well above the episode length).
    - ``normalize_returns=True``: the weights ``G_t - b(s_t)`` are standardised over the rollout (mean 0, std 1)
      before the update; without a baseline this subtracts the mean return, a constant baseline.

    Use ``REINFORCE("MlpPolicy", "CartPole-v1")`` or, once ``sb3_textrl`` is imported, ``REINFORCE("LMPolicy", env)``.
    Logged: ``train/policy_gradient_loss``, ``train/entropy_loss``, ``train/n_updates`` and, with a baseline,
    ``train/value_loss`` and ``train/explained_variance``; ``train/kept_fraction`` when steps were left out.

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, MultiInputPolicy, LMPolicy, ...)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: The learning rate, it can be a function
        of the current progress remaining (from 1 to 0)
    :param n_steps: The number of steps to run for each environment per update
        (i.e. batch size is n_steps * n_env where n_env is number of environment copies running in parallel).
        Without a baseline, only the episodes that end within these steps are learned from.
    :param batch_size: Minibatch size for the gradient accumulation: the rollout goes through the policy in
        minibatches of this many steps and their gradients are summed into the one update (``None``: the whole
        rollout at once). With an episode buffer (``rollout_buffer_class=EpisodeRolloutBuffer``) minibatches hold
        whole episodes.
    :param gamma: Discount factor
    :param use_baseline: Whether to subtract the learned value ``V(s_t)`` from the return (and fit it)
    :param normalize_returns: Whether to standardise the policy-gradient weights over the rollout
    :param ent_coef: Entropy coefficient for the loss calculation
    :param vf_coef: Value function coefficient for the loss calculation (with ``use_baseline=True``)
    :param max_grad_norm: The maximum value for the gradient clipping (``None``: no clipping)
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
        instead of action noise exploration (default: False)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE
        Default: -1 (only sample at the beginning of the rollout)
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it will be automatically selected.
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation.
    :param stats_window_size: Window size for the rollout logging, specifying the number of episodes to average
        the reported success rate, mean episode length, and mean reward over
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param policy_kwargs: additional arguments to be passed to the policy on creation
    :param verbose: Verbosity level: 0 for no output, 1 for info messages (such as device or wrappers used), 2 for
        debug messages
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run.
        Setting it to auto, the code will be run on the GPU if possible.
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    :raises ValueError: if ``n_steps`` or ``batch_size`` is not a positive integer, or if ``use_baseline=False``
        with a policy that has no ``value_net`` or ``value_head`` to zero
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": ActorCriticPolicy,
        "CnnPolicy": ActorCriticCnnPolicy,
        "MultiInputPolicy": MultiInputActorCriticPolicy,
    }

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 1024,
        batch_size: int | None = None,
        gamma: float = 0.99,
        use_baseline: bool = True,
        normalize_returns: bool = False,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float | None = 0.5,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
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
        check_positive_int(n_steps, "n_steps")
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size", " or None (the whole rollout)")
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=1.0,  # Monte-Carlo returns: the buffer's TD(1) returns are the discounted sums of rewards
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,  # type: ignore[arg-type]
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
            _init_setup_model=False,
            supported_action_spaces=(
                spaces.Box,
                spaces.Discrete,
                spaces.MultiDiscrete,
                spaces.MultiBinary,
            ),
        )
        self.batch_size = batch_size
        self.use_baseline = use_baseline
        self.normalize_returns = normalize_returns
        if normalize_returns and self.n_steps * self.n_envs < 2:
            raise ValueError(
                f"`normalize_returns=True` needs `n_steps * n_envs` > 1 (a standard deviation). "
                f"Currently n_steps={self.n_steps} and n_envs={self.n_envs}."
            )
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        super()._setup_model()
        if not self.use_baseline:
            self._zero_value_layer()

    def _zero_value_layer(self) -> None:
        """Set the policy's value output layer to zero and freeze it: ``V = 0`` in rollouts, returns and bootstraps."""
        for name in _VALUE_LAYER_NAMES:
            layer = getattr(self.policy, name, None)
            if isinstance(layer, nn.Module):
                break
        else:
            raise ValueError(
                f"`use_baseline=False` sets the policy's value output to 0, but {type(self.policy).__name__} has no "
                f"`value_net` or `value_head` layer. Use `use_baseline=True` or a policy with such a layer."
            )
        with th.no_grad():
            for param in layer.parameters():
                param.zero_()
                param.requires_grad_(False)

    def policy_gradient_weights(self) -> tuple[np.ndarray, int]:
        """
        The weight of each step's ``log pi(a_t | s_t)`` in the policy gradient, from the filled rollout buffer.

        :return: ``(n_steps, n_envs)`` float32 weights, ``G_t - b(s_t)``, standardised with ``normalize_returns``, 0 for
            the steps left out (without a baseline, those of episodes still running at the rollout's end); and the
            number of steps kept
        """
        buffer = self.rollout_buffer
        # with gae_lambda=1 the buffer's advantages are G_t - V(s_t), hence G_t without a baseline (V = 0)
        weights = buffer.advantages.reshape(buffer.buffer_size, buffer.n_envs).copy()
        if self.use_baseline:
            keep = np.ones_like(weights, dtype=bool)
        else:
            keep = ~incomplete_episode_mask(buffer.episode_starts, self._last_episode_starts)  # type: ignore[arg-type]
        n_kept = int(keep.sum())
        if self.normalize_returns and n_kept > 0:
            weights = (weights - weights[keep].mean()) / (weights[keep].std() + 1e-8)
        weights[~keep] = 0.0
        return weights.astype(np.float32), n_kept

    def train(self) -> None:
        """
        Update the policy from the rollout buffer: one gradient step, accumulated over minibatches of ``batch_size``
        (the loss of the class docstring: Williams' REINFORCE update, with the baseline ``b = V`` or 0). A rollout in which
        no step can be kept is skipped with a warning.
        """
        # Switch to train mode (this affects batch norm / dropout)
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)

        buffer = self.rollout_buffer
        assert not buffer.generator_ready, "REINFORCE.train() needs a freshly filled rollout buffer."
        weights, n_kept = self.policy_gradient_weights()
        if n_kept == 0:
            warnings.warn(
                f"No episode ended within the rollout of n_steps={self.n_steps} steps per env: REINFORCE without a "
                "baseline learns only from complete episodes, so this rollout is skipped. Raise `n_steps` above the "
                "episode length or use `use_baseline=True`."
            )
            return
        # the samples carry the weights as their advantages
        buffer.advantages = weights
        n_total = buffer.buffer_size * buffer.n_envs

        self.policy.optimizer.zero_grad()
        policy_loss_sum, value_loss_sum, entropy_loss_sum = 0.0, 0.0, 0.0
        for rollout_data in buffer.get(self.batch_size):
            actions = rollout_data.actions
            if isinstance(self.action_space, spaces.Discrete):
                # Convert discrete action from float to long
                actions = actions.long().flatten()

            values, log_prob, entropy = self.policy.evaluate_actions(rollout_data.observations, actions)

            # sums over the minibatch, divided by the rollout's size: the minibatches add up to the rollout's mean
            policy_loss = -(rollout_data.advantages * log_prob).sum() / n_kept
            if entropy is None:
                # Approximate entropy when no analytical form
                entropy_loss = log_prob.sum() / n_total
            else:
                entropy_loss = -entropy.sum() / n_total
            loss = policy_loss + self.ent_coef * entropy_loss
            if self.use_baseline:
                value_loss = ((rollout_data.returns - values.flatten()) ** 2).sum() / n_total
                loss = loss + self.vf_coef * value_loss
                value_loss_sum += value_loss.item()
            loss.backward()
            policy_loss_sum += policy_loss.item()
            entropy_loss_sum += entropy_loss.item()

        if self.max_grad_norm is not None:
            th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        self.policy.optimizer.step()

        self._n_updates += 1
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/policy_gradient_loss", policy_loss_sum)
        self.logger.record("train/entropy_loss", entropy_loss_sum)
        if self.use_baseline:
            self.logger.record("train/value_loss", value_loss_sum)
            self.logger.record(
                "train/explained_variance", explained_variance(buffer.values.flatten(), buffer.returns.flatten())
            )
        if n_kept < n_total:
            self.logger.record("train/kept_fraction", n_kept / n_total)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())

    def learn(
        self: SelfREINFORCE,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 100,
        tb_log_name: str = "REINFORCE",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfREINFORCE:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )
