"""Rollouts of whole episodes under SB3's own ``collect_rollouts``: environments that start their episodes together, in
rounds as long as the longest episode, so that no episode begins in one rollout and ends in the next.

A stock on-policy algorithm steps every env ``n_steps`` times per rollout. With independent envs, an episode that is
running when the rollout ends is cut: its first part is trained on advantages bootstrapped from the value head (zero at
the start of training), its second part in the next rollout. :class:`WholeEpisodeVecEnv` plays rounds of
``round_steps`` steps instead: every env starts an episode at the round's start, and an env whose episode has ended
waits, with an *empty observation* (``attention_mask`` all zero), until the round is over. With ``n_steps`` a multiple
of ``round_steps`` every rollout then holds whole episodes, as a loop over ``model.generate`` batches does.

The waiting steps cost almost nothing and teach nothing: ``LMPolicy`` runs no forward for an empty observation (token
0, value 0, log-probability 0, reference log-probability 0, so a KL penalty of 0), and
:class:`~sb3_textrl.common.buffers.EpisodeRolloutBuffer` leaves them out of the minibatches. They do count as SB3
timesteps (``n_envs`` per step, waiting or not). Built by ``make_text_vec_env(..., whole_episodes=True)``.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from sb3_textrl.common.group_vec_env import GroupMemberWrapper, start_options
from sb3_textrl.common.validation import check_positive_int

__all__ = ["WholeEpisodeVecEnv", "empty_observations"]


def empty_observations(obs: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """
    ``obs`` with the given rows emptied: every array zero there, so ``attention_mask`` attends to no token.

    :param obs: token observations, ``(n_envs, max_length)`` arrays under ``input_ids`` and ``attention_mask``
    :param rows: ``(n_envs,)`` bool, the rows to empty
    :return: a new dict (the arrays are copies)
    """
    emptied = {key: np.array(value, copy=True) for key, value in obs.items()}
    for value in emptied.values():
        value[rows] = 0
    return emptied


class WholeEpisodeVecEnv(VecEnvWrapper):
    """
    A ``VecEnv`` played in rounds of ``round_steps`` steps: all envs start an episode together at a round's start, and
    an env whose episode has ended waits for the round's end, so that a rollout of ``n_steps`` steps, a multiple of
    ``round_steps``, holds whole episodes only.

    While an env waits, its observation is empty (``attention_mask`` all zero, see :func:`empty_observations`), its
    reward 0, its ``done`` ``False`` and ``info["waiting"]`` ``True``; it is not stepped (its
    :class:`~sb3_textrl.common.group_vec_env.GroupMemberWrapper` answers for it). The step that ends the round returns
    the first observations of the next round (each env starts on a prompt of its own, drawn as its ``reset`` draws);
    the episodes that ended in that step keep their ``terminal_observation`` in their info. Episode statistics
    (``VecMonitor`` inside) count only the real steps.

    Use it with ``LMPolicy`` (which runs nothing for an empty observation) and
    :class:`~sb3_textrl.common.buffers.EpisodeRolloutBuffer` (which leaves the waiting steps out of the minibatches).
    ``round_steps`` must be at least the longest episode: ``max_new_tokens`` for text generation.

    :param venv: the vectorized environments, each wrapped in ``GroupMemberWrapper``, with token observations
        (a ``Dict`` space holding ``attention_mask``)
    :param round_steps: steps per round (>= the longest episode)
    :raises ValueError: if ``round_steps`` is not a positive integer, an env is not wrapped in ``GroupMemberWrapper``
        or the observations have no ``attention_mask``; at the end of a round in which an episode is still running
        (``round_steps`` shorter than that episode)
    """

    def __init__(self, venv: VecEnv, round_steps: int):
        check_positive_int(round_steps, "round_steps", " (steps per round: at least the longest episode, max_new_tokens)")
        super().__init__(venv)
        if not all(venv.env_is_wrapped(GroupMemberWrapper)):
            raise ValueError(
                "WholeEpisodeVecEnv needs every env wrapped in GroupMemberWrapper (which makes an env wait for the round's "
                "end): build it with make_text_vec_env(..., whole_episodes=True)."
            )
        space = self.observation_space
        if not isinstance(space, spaces.Dict) or "attention_mask" not in space.spaces:
            raise ValueError(
                f"WholeEpisodeVecEnv marks a waiting env with an empty `attention_mask`, which {space} does not have: use "
                "it with token observations (sb3_textrl.common.spaces.TokenObservationSpace)."
            )
        self.round_steps = int(round_steps)
        #: which envs' episodes are still running in this round, ``(num_envs,)`` bool
        self.running = np.zeros(self.num_envs, dtype=bool)
        #: rounds started so far
        self.n_rounds = 0
        self._round_step = 0

    def reset(self) -> VecEnvObs:
        """
        Start a round: every env starts a new episode.

        :return: the first observations, one for each env
        """
        self.venv.set_options([start_options(self.n_rounds) for _ in range(self.num_envs)])
        obs = self.venv.reset()
        self.running[:] = True
        self._round_step = 0
        self.n_rounds += 1
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self.venv.step_async(actions)  # a waiting env's GroupMemberWrapper ignores its action

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        dones = np.asarray(dones, dtype=bool) & self.running
        rewards = np.where(self.running, rewards, 0.0).astype(np.float32)
        self.running &= ~dones
        self._round_step += 1
        if self._round_step < self.round_steps:
            return empty_observations(obs, ~self.running), rewards, dones, infos  # type: ignore[arg-type]
        if self.running.any():
            raise ValueError(
                f"The episodes of env(s) {np.flatnonzero(self.running).tolist()} are still running after a round of "
                f"`round_steps`={self.round_steps} steps: make round_steps at least the longest episode (max_new_tokens)."
            )
        return self.reset(), rewards, dones, infos

