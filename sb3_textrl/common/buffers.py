"""Rollout buffers that hand minibatches of whole episodes to the policy."""

from __future__ import annotations

import itertools
from collections.abc import Generator
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.type_aliases import DictRolloutBufferSamples

__all__ = ["EpisodeRolloutBuffer"]


class EpisodeRolloutBuffer(DictRolloutBuffer):
    """
    A ``DictRolloutBuffer`` whose minibatches hold whole episodes, in a random episode order.

    ``LMPolicy`` computes all the steps of an episode from one forward pass over its last observation
    (see :func:`sb3_textrl.lm.tokens.covering_rows`), so a minibatch of whole episodes costs one forward pass per
    episode instead of one per step. Pass it to any on-policy algorithm with
    ``PPO("LMPolicy", env, rollout_buffer_class=EpisodeRolloutBuffer)``; the training loop stays stock.

    Episodes are packed greedily into minibatches of at most ``batch_size`` steps (an episode longer than
    ``batch_size`` forms a minibatch of its own), so minibatch sizes vary. Episodes cut by the rollout's end are
    treated as episodes of their own. Steps whose observation is empty (``attention_mask`` all zero: an env waiting for
    its round, :class:`~sb3_textrl.common.whole_episodes.WholeEpisodeVecEnv`) are left out.

    :param args: ``DictRolloutBuffer``'s arguments (``buffer_size``, ``observation_space``, ``action_space``...)
    :param whiten_advantages: whiten the advantages over the whole rollout once they are computed (mean 0, standard
        deviation 1 over its real steps, waiting steps left out), as Ziegler et al. (2019) and Huang et al. (2024,
        "The N Implementation Details of RLHF with PPO") do, rather than per minibatch as SB3's PPO does with
        ``normalize_advantage=True``; pair it with ``normalize_advantage=False``. The returns (value targets) stay as
        computed. Default ``False``; pass it with ``rollout_buffer_kwargs=dict(whiten_advantages=True)``.
    :param kwargs: ``DictRolloutBuffer``'s keywords (``device``, ``gae_lambda``, ``gamma``, ``n_envs``)
    """

    def __init__(self, *args: Any, whiten_advantages: bool = False, **kwargs: Any):
        self.whiten_advantages = whiten_advantages
        super().__init__(*args, **kwargs)

    def reset(self) -> None:
        """Empty the buffer (``DictRolloutBuffer.reset``) and forget the episode boundaries."""
        super().reset()
        self._episodes: list[np.ndarray] | None = None

    def compute_returns_and_advantage(self, last_values: th.Tensor, dones: np.ndarray) -> None:
        """
        GAE advantages and returns (``DictRolloutBuffer.compute_returns_and_advantage``, Schulman et al. 2016), then,
        with ``whiten_advantages``, the advantages whitened over the rollout's real steps.

        :param last_values: ``(n_envs,)`` float, the value of each env's observation after the rollout
        :param dones: ``(n_envs,)`` bool, whether each env's last step ended its episode
        """
        super().compute_returns_and_advantage(last_values, dones)
        if self.whiten_advantages:
            real = self._real_steps().reshape(self.n_envs, self.buffer_size).T  # (n_steps, n_envs), as stored
            advantages = self.advantages[real]
            self.advantages[real] = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    def _flatten(self) -> None:
        # (n_steps, n_envs, ...) -> (n_envs * n_steps, ...): each env's steps become contiguous
        for key, obs in self.observations.items():
            self.observations[key] = self.swap_and_flatten(obs)
        for name in ["actions", "values", "log_probs", "advantages", "returns"]:
            self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])
        self.generator_ready = True

    def episode_indices(self) -> list[np.ndarray]:
        """
        Where each episode's steps lie in the flattened buffer (valid once the buffer is full).

        The flattened buffer is env-major: step ``s`` of env ``e`` is at index ``e * n_steps + s``. The first step of
        the rollout starts an episode in each env (a cut one, if it began in the previous rollout).

        :return: one int64 array of flat indices per episode, its steps in time order; the episodes in env order,
            then time order; the steps of empty observations (waiting envs) left out
        """
        if self._episodes is None:
            starts = self.episode_starts.astype(bool).copy()
            starts[0, :] = True  # the rollout's first step starts a (possibly cut) episode in each env
            flat_starts = np.flatnonzero(starts.T.reshape(-1))
            bounds = [*flat_starts.tolist(), self.buffer_size * self.n_envs]
            real = self._real_steps()
            episodes = (np.arange(a, b) for a, b in itertools.pairwise(bounds))
            self._episodes = [steps for steps in (e[real[e]] for e in episodes) if len(steps)]
        return self._episodes

    def _real_steps(self) -> np.ndarray:
        """``(n_envs * n_steps,)`` bool in flat (env-major) order: the steps whose observation holds tokens."""
        mask = self.observations.get("attention_mask")
        if mask is None:
            return np.ones(self.buffer_size * self.n_envs, dtype=bool)
        real = mask.reshape(*mask.shape[: 1 if self.generator_ready else 2], -1).any(axis=-1)
        return real if self.generator_ready else real.T.reshape(-1)

    def get(self, batch_size: int | None = None) -> Generator[DictRolloutBufferSamples, None, None]:
        """
        Yield minibatches of whole episodes, the episodes in a random order (``np.random``), each minibatch at most
        ``batch_size`` steps unless it is one longer episode; every step appears once per call (but waiting steps:
        none).

        :param batch_size: the most steps per minibatch (default ``None``: the whole rollout in one minibatch)
        :return: a generator of ``DictRolloutBufferSamples``, each holding the steps of its episodes in order
        """
        assert self.full, ""
        if not self.generator_ready:
            self._flatten()
        episodes = self.episode_indices()
        batch_size = self.buffer_size * self.n_envs if batch_size is None else batch_size
        batch: list[np.ndarray] = []
        size = 0
        for e in np.random.permutation(len(episodes)):
            episode = episodes[e]
            if batch and size + len(episode) > batch_size:
                yield self._get_samples(np.concatenate(batch))
                batch, size = [], 0
            batch.append(episode)
            size += len(episode)
        if batch:
            yield self._get_samples(np.concatenate(batch))
