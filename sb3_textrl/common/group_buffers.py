"""Rollout buffers for rounds of groups (:class:`GroupRolloutBuffer`, :class:`DictGroupRolloutBuffer`): they keep only
the real steps of a round, episode after episode, and yield minibatches of whole episodes.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, NamedTuple

import numpy as np
import torch as th
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.type_aliases import TensorDict

from sb3_textrl.common.group_advantages import group_advantages

__all__ = ["DictGroupRolloutBuffer", "GroupRolloutBuffer", "GroupRolloutBufferSamples"]


class GroupRolloutBufferSamples(NamedTuple):
    """
    A minibatch of whole episodes: ``n`` tokens (steps) of ``n_episodes`` episodes, episode after episode.

    ``observations`` ``(n, ...)`` (a dict of them for Dict observations), ``actions`` ``(n, action_dim)``,
    ``old_log_prob`` ``(n,)`` (at the rollout), ``advantages`` ``(n,)`` (each episode's advantage on each of its tokens),
    ``ref_log_prob`` ``(n,)`` under the reference model (``None`` unless computed), ``episode_lengths``
    ``(n_episodes,)`` int64 numpy, the lengths in the order of the tokens.
    """

    observations: th.Tensor | TensorDict
    actions: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    ref_log_prob: th.Tensor | None
    episode_lengths: np.ndarray


class _GroupBufferMixin:
    """
    The round logic of :class:`GroupRolloutBuffer` and :class:`DictGroupRolloutBuffer` (see the first).
    """

    buffer_size: int
    n_envs: int
    observations: Any
    actions: np.ndarray
    rewards: np.ndarray
    returns: np.ndarray
    episode_starts: np.ndarray
    values: np.ndarray
    log_probs: np.ndarray
    advantages: np.ndarray
    obs_shape: Any
    action_dim: int
    pos: int
    full: bool
    generator_ready: bool
    device: th.device

    def _init_group(self) -> None:
        self._capacity = (self.buffer_size, self.n_envs)
        #: the advantage estimator ``(scores, group_ids) -> advantages`` (set by the algorithm)
        self.advantage_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] = group_advantages

    def reset(self) -> None:
        if hasattr(self, "_capacity"):
            self.buffer_size, self.n_envs = self._capacity
        super().reset()  # type: ignore[misc]
        self.round_done = False
        #: ``(n_episodes,)`` int64: each episode's length, env, group id and first row; ``(n_episodes,)`` float64 scores
        self.episode_lengths = np.zeros(0, dtype=np.int64)
        self.episode_envs = np.zeros(0, dtype=np.int64)
        self.group_ids = np.zeros(0, dtype=np.int64)
        self.episode_offsets = np.zeros(0, dtype=np.int64)
        self.scores = np.zeros(0, dtype=np.float64)
        #: ``(n_tokens,)`` float32 reference log-probs, when the algorithm computes them
        self.ref_log_probs: np.ndarray | None = None

    def _obs_map(self, fn: Callable[[np.ndarray, Any], np.ndarray], obs: Any = None) -> None:
        if isinstance(self.observations, dict):
            for key in self.observations:
                self.observations[key] = fn(self.observations[key], None if obs is None else obs[key])
        else:
            self.observations = fn(self.observations, obs)

    def add_steps(
        self,
        step: int,
        env_indices: np.ndarray,
        obs: np.ndarray | dict[str, np.ndarray],
        actions: np.ndarray,
        rewards: np.ndarray,
        log_probs: th.Tensor,
    ) -> None:
        """
        Store one step of the running envs (the round's step ``step``: every env's episode began at step 0).

        :param step: the step of the round, ``0 <= step < buffer_size``
        :param env_indices: ``(n,)`` int, the running envs
        :param obs: their observations ``(n, ...)`` (a dict of them)
        :param actions: their actions ``(n, ...)``
        :param rewards: their rewards ``(n,)``
        :param log_probs: their actions' log-probabilities ``(n,)``
        """
        n = len(env_indices)
        if isinstance(self.observations, dict):
            for key in self.observations:
                self.observations[key][step, env_indices] = np.asarray(obs[key]).reshape((n, *self.obs_shape[key]))  # type: ignore[index]
        else:
            self.observations[step, env_indices] = np.asarray(obs).reshape((n, *self.obs_shape))
        self.actions[step, env_indices] = np.asarray(actions).reshape((n, self.action_dim))
        self.rewards[step, env_indices] = np.asarray(rewards)
        self.log_probs[step, env_indices] = log_probs.detach().cpu().numpy()
        self.pos = max(self.pos, step + 1)

    def finish_round(self, episode_lengths: np.ndarray, group_ids: np.ndarray) -> None:
        """
        Keep only the real steps: env ``e``'s episode is its first ``episode_lengths[e]`` steps. Afterwards the buffer
        holds ``N = sum(episode_lengths)`` steps, episode after episode in env order, as arrays of shape ``(N, 1, ...)``:
        the view of one environment that played the episodes back to back, so that code written for SB3's buffers
        (e.g. :class:`~sb3_textrl.common.callbacks.KLPenaltyCallback`) reads only real steps.

        :param episode_lengths: ``(n_envs,)`` int, each env's episode length (>= 1)
        :param group_ids: ``(n_envs,)`` int, each env's group id
        """
        lengths = np.asarray(episode_lengths, dtype=np.int64)
        steps = np.concatenate([np.arange(length) for length in lengths])
        envs = np.repeat(np.arange(len(lengths)), lengths)

        def take(array: np.ndarray, _: Any = None) -> np.ndarray:
            return array[steps, envs][:, None]

        self._obs_map(take)
        self.actions, self.rewards, self.log_probs = take(self.actions), take(self.rewards), take(self.log_probs)
        n_tokens = int(lengths.sum())
        self.values = np.zeros((n_tokens, 1), dtype=np.float32)
        self.returns = np.zeros((n_tokens, 1), dtype=np.float32)
        self.advantages = np.zeros((n_tokens, 1), dtype=np.float32)
        self.episode_lengths = lengths
        self.episode_envs = np.arange(len(lengths))
        self.group_ids = np.asarray(group_ids, dtype=np.int64)
        self.episode_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.episode_starts = np.zeros((n_tokens, 1), dtype=np.float32)
        self.episode_starts[self.episode_offsets, 0] = 1.0
        self.buffer_size, self.n_envs = n_tokens, 1
        self.pos, self.full, self.generator_ready, self.round_done = n_tokens, True, True, True

    def compute_returns_and_advantage(self, last_values: th.Tensor, dones: np.ndarray) -> None:
        """
        Each episode's score (the sum of its rewards, undiscounted), as every one of its tokens' return, and its
        advantage from :attr:`advantage_fn`, on every one of its tokens. Computed from the current rewards, so a
        callback that changes them (a KL penalty) can call it again.

        :param last_values: unused (there is no bootstrap: every episode has ended)
        :param dones: unused
        """
        assert self.round_done, "finish_round() must come before compute_returns_and_advantage()."
        self.scores = np.add.reduceat(self.rewards[:, 0].astype(np.float64), self.episode_offsets)
        advantages = np.asarray(self.advantage_fn(self.scores, self.group_ids), dtype=np.float64)
        self.returns[:, 0] = np.repeat(self.scores, self.episode_lengths)
        self.advantages[:, 0] = np.repeat(advantages, self.episode_lengths)

    def token_indices(self, episodes: np.ndarray) -> np.ndarray:
        """The rows of the given episodes' tokens, episode after episode (``(n_tokens,)`` int64)."""
        return np.concatenate(
            [np.arange(self.episode_offsets[e], self.episode_offsets[e] + self.episode_lengths[e]) for e in episodes]
        )

    def episode_batches(self, batch_size: int | None = None, shuffle: bool = True) -> Generator[np.ndarray, None, None]:
        """
        Pack the episodes greedily into minibatches of at most ``batch_size`` tokens (an episode longer than
        ``batch_size`` forms a minibatch of its own).

        :param batch_size: tokens per minibatch (``None``: all the episodes in one)
        :param shuffle: take the episodes in a random order (``np.random``), else in env order
        :return: a generator of ``(n_episodes,)`` int64 episode indices
        """
        assert self.round_done, "The round is not finished: no episodes yet."
        n_episodes = len(self.episode_lengths)
        order = np.random.permutation(n_episodes) if shuffle else np.arange(n_episodes)
        limit = int(self.episode_lengths.sum()) if batch_size is None else batch_size
        batch: list[int] = []
        size = 0
        for e in order:
            if batch and size + self.episode_lengths[e] > limit:
                yield np.asarray(batch, dtype=np.int64)
                batch, size = [], 0
            batch.append(int(e))
            size += int(self.episode_lengths[e])
        if batch:
            yield np.asarray(batch, dtype=np.int64)

    def observations_at(self, rows: np.ndarray) -> th.Tensor | TensorDict:
        """The observations of the given rows, as tensors on the buffer's device."""
        if isinstance(self.observations, dict):
            return {key: self.to_torch(value[rows, 0]) for key, value in self.observations.items()}  # type: ignore[attr-defined]
        return self.to_torch(self.observations[rows, 0])  # type: ignore[attr-defined]

    def get(self, batch_size: int | None = None) -> Generator[GroupRolloutBufferSamples, None, None]:  # type: ignore[override]
        """
        Yield minibatches of whole episodes in a random order, at most ``batch_size`` tokens each unless one episode is
        longer; every token appears once per call.

        :param batch_size: tokens per minibatch (default ``None``: the whole rollout in one minibatch)
        :return: a generator of :class:`GroupRolloutBufferSamples`
        """
        for episodes in self.episode_batches(batch_size, shuffle=True):
            rows = self.token_indices(episodes)
            yield GroupRolloutBufferSamples(
                observations=self.observations_at(rows),
                actions=self.to_torch(self.actions[rows, 0]),  # type: ignore[attr-defined]
                old_log_prob=self.to_torch(self.log_probs[rows, 0]),  # type: ignore[attr-defined]
                advantages=self.to_torch(self.advantages[rows, 0]),  # type: ignore[attr-defined]
                ref_log_prob=None if self.ref_log_probs is None else self.to_torch(self.ref_log_probs[rows]),  # type: ignore[attr-defined]
                episode_lengths=self.episode_lengths[episodes],
            )


class GroupRolloutBuffer(_GroupBufferMixin, RolloutBuffer):
    """
    A ``RolloutBuffer`` for one round of :class:`GroupedVecEnv`: it keeps only the real steps of the episodes, and
    yields minibatches of whole episodes.

    During the round, :meth:`add_steps` writes the running envs' steps into ``(n_steps, n_envs)`` arrays, env ``e``'s
    episode in rows ``0 .. L_e - 1`` of column ``e`` (every episode starts at the round's first step). At the end,
    :meth:`finish_round` keeps only these ``N = sum_e L_e`` real steps, episode after episode, as ``(N, 1, ...)`` arrays
    (``buffer_size = N``, ``n_envs = 1``; ``episode_starts`` marks each episode's first token); :meth:`reset` restores the
    ``(n_steps, n_envs)`` capacity. :meth:`compute_returns_and_advantage` sets each episode's score (the sum of its
    rewards) and advantage (``advantage_fn(scores, group_ids)``) on all its tokens. :meth:`get` yields
    :class:`GroupRolloutBufferSamples` of whole episodes.

    Use :class:`DictGroupRolloutBuffer` for Dict observations (text generation). The constructor's arguments are
    ``RolloutBuffer``'s (``gamma`` and ``gae_lambda`` are unused: every episode has ended, its score is its return).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_group()


class DictGroupRolloutBuffer(_GroupBufferMixin, DictRolloutBuffer):
    """
    :class:`GroupRolloutBuffer` for Dict observations (a ``DictRolloutBuffer``), e.g. the token observations of
    :class:`~sb3_textrl.envs.TextGenerationEnv`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_group()


GROUP_BUFFERS = (GroupRolloutBuffer, DictGroupRolloutBuffer)
