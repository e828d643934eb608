"""Environments played in rounds of groups: ``n_envs / group_size`` groups of consecutive envs, each group starting every
episode of a round on one prompt (GRPO, RLOO).

At each round every group draws one prompt and all its envs start on it; an env whose episode has ended waits (it is
neither stepped nor reset) until every episode of the round has ended. Each env is wrapped in a
:class:`GroupMemberWrapper`, which does the waiting; :class:`GroupedVecEnv` draws the prompts and steps only the
running envs. :func:`make_group_vec_env` builds one for any Gymnasium env; ``make_text_vec_env(..., group_size=G)``
for text generation.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecEnvWrapper, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from sb3_textrl.common.validation import check_positive_int

__all__ = [
    "GroupMemberWrapper",
    "GroupedVecEnv",
    "check_group_size",
    "group_member_fn",
    "make_group_vec_env",
    "start_options",
]


# the reset option by which GroupedVecEnv starts a round (its value: the env's group id)
_GROUP_OPTION = "group"


def check_group_size(group_size: int, n_envs: int, names: tuple[str, str] = ("group_size", "n_envs")) -> None:
    """
    Check that ``n_envs`` environments form whole groups of ``group_size``.

    :param group_size: episodes per prompt
    :param n_envs: number of environments
    :param names: how the two arguments are called where they were given (e.g. the CLI's ``--group-size``)
    :raises ValueError: if ``group_size`` is not an integer >= 2 or does not divide ``n_envs``
    """
    size, envs = names
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 2:
        raise ValueError(
            f"`{size}` must be an integer >= 2 (completions per prompt: a group baseline needs at least two), "
            f"got {group_size!r}: e.g. {size}=4 with {envs}=16."
        )
    if n_envs % group_size != 0:
        raise ValueError(
            f"`{size}` ({group_size}) must divide `{envs}` ({n_envs}): the envs form {envs} / {size} groups. Use "
            f"{envs}={group_size * max(1, round(n_envs / group_size))}, or a {size} that divides {n_envs}."
        )


def start_options(group_id: int, **options: Any) -> dict[str, Any]:
    """
    The reset options by which a :class:`GroupMemberWrapper` starts a new episode (any other reset makes a finished
    env wait).

    :param group_id: the episode's group (or round) id
    :param options: more options for the wrapped environment (``prompt_index``, or ``seed`` for its seed)
    :return: the options, for ``VecEnv.set_options``
    """
    return {_GROUP_OPTION: int(group_id), **options}


def _copy_obs(obs: Any) -> Any:
    if isinstance(obs, dict):
        return {key: np.array(value, copy=True) for key, value in obs.items()}
    return np.array(obs, copy=True)


class GroupMemberWrapper(gym.Wrapper):
    """
    One environment of a group: once its episode has ended it waits, neither reset nor stepped, until
    :class:`GroupedVecEnv` starts the next round.

    A ``VecEnv`` resets an environment as soon as its episode ends; this wrapper answers that automatic reset (a reset
    without the round option) with the last observation and starts waiting. While waiting, ``step`` does not reach the
    wrapped environment: it returns the last observation, reward 0, ``terminated=truncated=False`` and
    ``info["waiting"] = True``. A reset with ``options={"group": group_id, ...}`` (what :meth:`GroupedVecEnv.reset`
    sends) starts a new episode: the other options (``prompt_index``) go to the wrapped environment, and an option
    ``seed`` replaces the ``seed`` argument (so a whole group can start from one seed).

    :param env: the environment
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.waiting = False
        self._ended = False
        self._last_obs: Any = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        options = dict(options or {})
        if _GROUP_OPTION not in options and self._ended:  # the VecEnv's automatic reset: wait for the next round
            self.waiting = True
            return _copy_obs(self._last_obs), {"waiting": True}
        options.pop(_GROUP_OPTION, None)
        seed = options.pop("seed", seed)
        obs, info = self.env.reset(seed=seed, options=options or None)
        self.waiting, self._ended, self._last_obs = False, False, obs
        return obs, info

    def step(self, action):
        if self.waiting:
            return _copy_obs(self._last_obs), 0.0, False, False, {"waiting": True}
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._last_obs = obs
        self._ended = bool(terminated or truncated)
        return obs, reward, terminated, truncated, info


class GroupedVecEnv(VecEnvWrapper):
    """
    A ``VecEnv`` whose environments form groups of ``group_size`` consecutive envs, played in rounds.

    **Rounds.** :meth:`reset` starts a round: each group draws one start, and all its envs reset on it. For environments
    with a ``prompts`` list (:class:`~sb3_textrl.envs.TextGenerationEnv`) the start is a prompt index, passed as
    ``options={"prompt_index": i}``; the prompts are drawn without replacement, a fresh shuffle of the list each time
    it runs out (an epoch over the prompts), from this wrapper's RNG (seeded by ``seed()``). For other environments it
    is a seed, drawn from the same RNG and passed to ``reset(seed=...)``: the group starts in the same state when the
    start state depends only on the seed (e.g. ``sb3_textrl/TokenMatch-v0`` in ``"copy"`` mode).

    During a round, an env whose episode has ended waits (see :class:`GroupMemberWrapper`) until all the episodes of
    the round have ended; :attr:`running` tells which envs are still playing. :meth:`step_running` steps only those
    (one action for each running env, in env order). The info of a step that ends an episode holds ``group``, the
    episode's group id (unique over the wrapper's life: ``n_groups`` new ids per round), and ``prompt_index`` when the
    start is a prompt.

    **Stock algorithms.** The plain ``step()`` of the VecEnv API works while every env is running. Once an episode has
    ended, a plain ``step()`` raises a ``ValueError``: PPO, A2C or REINFORCE would feed the waiting envs' observations
    to the policy as steps. Use :class:`GroupOnPolicyAlgorithm` (GRPO, RLOO), or an env built without ``group_size``.

    Built by :func:`make_group_vec_env` and ``make_text_vec_env(..., group_size=G)``: every environment inside must
    be wrapped in :class:`GroupMemberWrapper` (the outermost ``gym.Wrapper``), and this wrapper must be the outermost
    ``VecEnv`` wrapper. Wrappers in between (``VecMonitor``, the batched reward) see waiting envs as steps with reward 0:
    a ``VecMonitor`` counts them into the next episode's length, which :meth:`reset` clears.

    :param venv: the vectorized environments, each wrapped in :class:`GroupMemberWrapper`
    :param group_size: envs per group, >= 2, dividing ``venv.num_envs``
    :param seed: the seed of the draws (``None``: random); ``seed()`` sets it again
    :raises ValueError: if ``group_size`` is not valid or an env is not wrapped in :class:`GroupMemberWrapper`
    """

    def __init__(self, venv: VecEnv, group_size: int, seed: int | None = None):
        check_group_size(group_size, venv.num_envs)
        super().__init__(venv)
        if not all(venv.env_is_wrapped(GroupMemberWrapper)):
            raise ValueError(
                "GroupedVecEnv needs every env wrapped in GroupMemberWrapper (which makes an env wait for its round): "
                "build the VecEnv with make_group_vec_env or make_text_vec_env(..., group_size=G)."
            )
        self.group_size = int(group_size)
        self.n_groups = self.num_envs // self.group_size
        try:
            self.n_prompts: int | None = len(venv.get_attr("prompts", indices=[0])[0])
        except AttributeError:
            self.n_prompts = None
        self._rng = np.random.default_rng(seed)
        self._queue = np.zeros(0, dtype=np.int64)
        #: which envs' episodes are still running in this round, ``(num_envs,)`` bool
        self.running = np.zeros(self.num_envs, dtype=bool)
        #: the group id of each env's episode in this round, ``(num_envs,)`` int64 (-1 before the first round)
        self.env_groups = np.full(self.num_envs, -1, dtype=np.int64)
        #: the prompt index of each env's episode in this round, ``(num_envs,)`` int64 (-1 when starts are seeds)
        self.env_prompts = np.full(self.num_envs, -1, dtype=np.int64)
        #: rounds started so far
        self.n_rounds = 0
        self._round_steps = 0
        self._next_group = 0
        self._before_round: dict[str, Any] | None = None  # the draws' state before this round was drawn
        self._actions: np.ndarray | None = None

    @property
    def at_round_start(self) -> bool:
        """Whether a round has just started: every env is running and none has been stepped yet."""
        return bool(self.running.all()) and self._round_steps == 0 and self.n_rounds > 0

    def state_dict(self) -> dict[str, Any]:
        """
        The state of the draws and of the group ids from which the next round not yet played is drawn, to resume a run
        with the same prompts (see :meth:`load_state_dict`): at a round's start (:attr:`at_round_start`, as when SB3
        checkpoints at a rollout's start) that round's own, so that a resumed run plays it again.
        """
        if self.at_round_start and self._before_round is not None:
            return copy.deepcopy(self._before_round)
        return self._draw_state()

    def _draw_state(self) -> dict[str, Any]:
        rng = copy.deepcopy(self._rng.bit_generator.state)
        return {"rng": rng, "queue": self._queue.copy(), "next_group": self._next_group}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`state_dict` returned (the next :meth:`reset` then draws as the saved run would)."""
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng"]
        self._queue = np.asarray(state["queue"], dtype=np.int64).copy()
        self._next_group = int(state["next_group"])

    def seed(self, seed: int | None = None):
        """Seed the draws of the group starts and, through the wrapped VecEnv, the environments."""
        self._rng = np.random.default_rng(seed)
        self._queue = np.zeros(0, dtype=np.int64)
        return self.venv.seed(seed)

    def _draw_starts(self) -> np.ndarray:
        if self.n_prompts is None:
            return self._rng.integers(2**31 - 1, size=self.n_groups)
        while self._queue.size < self.n_groups:
            self._queue = np.concatenate([self._queue, self._rng.permutation(self.n_prompts)])
        starts, self._queue = self._queue[: self.n_groups], self._queue[self.n_groups :]
        return starts

    def reset(self) -> VecEnvObs:
        """
        Start a round: draw one start per group and reset every env on its group's start.

        :return: the first observations, one for each env
        """
        self._before_round = self._draw_state()
        starts = self._draw_starts()
        group_ids = self._next_group + np.arange(self.n_groups, dtype=np.int64)
        self._next_group += self.n_groups
        key = "seed" if self.n_prompts is None else "prompt_index"
        self.venv.set_options(
            [
                start_options(group_ids[e // self.group_size], **{key: int(starts[e // self.group_size])})
                for e in range(self.num_envs)
            ]
        )
        obs = self.venv.reset()
        self.env_groups = np.repeat(group_ids, self.group_size)
        self.env_prompts = (
            np.full(self.num_envs, -1, dtype=np.int64) if self.n_prompts is None else np.repeat(starts, self.group_size)
        )
        self.running[:] = True
        self._round_steps = 0
        self.n_rounds += 1
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        if not self.running.all():
            waiting = np.flatnonzero(~self.running).tolist()
            raise ValueError(
                f"Env(s) {waiting} have ended their episode and wait for the rest of the round (`group_size`="
                f"{self.group_size}): a plain step() would give them actions on observations that are not steps of an "
                "episode. Train with GRPO or RLOO (they call step_running), call reset() to start the next round, or "
                "build the env without `group_size` for PPO, A2C or REINFORCE."
            )
        self._remember_actions(np.asarray(actions))
        self.venv.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        return self._after_step(*self.venv.step_wait())

    def _remember_actions(self, actions: np.ndarray) -> None:
        if self._actions is None or self._actions.shape[1:] != actions.shape[1:] or self._actions.dtype != actions.dtype:
            self._actions = np.zeros((self.num_envs, *actions.shape[1:]), dtype=actions.dtype)
        self._actions[self.running] = actions if len(actions) == int(self.running.sum()) else actions[self.running]

    def step_running(self, actions: np.ndarray) -> VecEnvStepReturn:
        """
        Step the envs whose episode is still running; the waiting ones are not stepped.

        :param actions: one action for each running env, in env order (``(n_running, ...)``)
        :return: ``obs, rewards, dones, infos`` for all the envs, as ``step()`` returns them; a waiting env has its last
            observation, reward 0, ``done=False`` and ``info["waiting"] = True``
        :raises ValueError: if the round is over (call :meth:`reset`) or the number of actions differs from the
            number of running envs
        """
        n_running = int(self.running.sum())
        if n_running == 0:
            raise ValueError("Every episode of the round has ended: call reset() to start the next round.")
        actions = np.asarray(actions)
        if len(actions) != n_running:
            raise ValueError(f"step_running() needs one action for each of the {n_running} running envs, got {len(actions)}.")
        self._remember_actions(actions)
        assert self._actions is not None
        self.venv.step_async(self._actions.copy())  # the waiting envs' actions are ignored by their GroupMemberWrapper
        return self._after_step(*self.venv.step_wait())

    def _after_step(self, obs: VecEnvObs, rewards: np.ndarray, dones: np.ndarray, infos: list[dict]) -> VecEnvStepReturn:
        dones = np.asarray(dones, dtype=bool) & self.running
        rewards = np.where(self.running, rewards, 0.0).astype(np.float32)
        for e in np.flatnonzero(dones):
            infos[e]["group"] = int(self.env_groups[e])
            if self.env_prompts[e] >= 0:
                infos[e]["prompt_index"] = int(self.env_prompts[e])
        self.running &= ~dones
        self._round_steps += 1
        return obs, rewards, dones, infos


def group_member_fn(env_fn: Callable[[], gym.Env]) -> Callable[[], GroupMemberWrapper]:
    """
    Wrap an environment factory so that its environment is a :class:`GroupMemberWrapper` (picklable for
    ``SubprocVecEnv`` when ``env_fn`` is).

    :param env_fn: a function that builds the environment
    :return: a function that builds it wrapped
    """

    def _init() -> GroupMemberWrapper:
        return GroupMemberWrapper(env_fn())

    return _init


def make_group_vec_env(
    env_id: str | Callable[..., gym.Env],
    n_envs: int,
    group_size: int,
    seed: int | None = None,
    env_kwargs: dict[str, Any] | None = None,
    vec_env_cls: type[DummyVecEnv | SubprocVecEnv] | None = None,
    vec_env_kwargs: dict[str, Any] | None = None,
    monitor_filename: str | os.PathLike | None = None,
) -> GroupedVecEnv:
    """
    Build ``n_envs`` environments in groups of ``group_size``, for GRPO and RLOO:
    ``GroupedVecEnv(VecMonitor(vec_env_cls([GroupMemberWrapper(gym.make(env_id, **env_kwargs)), ...])))``.

    For text generation use ``make_text_vec_env(..., group_size=G)``, which also scores the completions in batches.
    Seeding follows SB3's ``make_vec_env`` (env ``i`` gets ``seed + i`` at its first reset, its action space
    ``seed + i``); the draws of the group starts are seeded with ``seed``.

    :param env_id: a registered environment id, or a function that builds the environment from ``**env_kwargs``
    :param n_envs: the number of environments, a multiple of ``group_size``
    :param group_size: environments per group (episodes per prompt), >= 2
    :param seed: the base seed (``None``: random)
    :param env_kwargs: keyword arguments of ``gym.make(env_id, ...)`` (or of ``env_id``)
    :param vec_env_cls: ``DummyVecEnv`` (default) or ``SubprocVecEnv``
    :param vec_env_kwargs: keyword arguments of ``vec_env_cls``
    :param monitor_filename: where ``VecMonitor`` writes its CSV log (``None``: no file)
    :return: the :class:`GroupedVecEnv`
    :raises ValueError: if ``n_envs`` is not a positive integer, or ``group_size`` is < 2 or does not divide ``n_envs``
    """
    check_positive_int(n_envs, "n_envs")
    check_group_size(group_size, int(n_envs))
    env_kwargs = dict(env_kwargs or {})

    def _env_fn(rank: int) -> Callable[[], gym.Env]:
        def _init() -> gym.Env:
            env = gym.make(env_id, **env_kwargs) if isinstance(env_id, str) else env_id(**env_kwargs)
            if seed is not None:
                env.action_space.seed(seed + rank)
            return GroupMemberWrapper(env)

        return _init

    venv = (vec_env_cls or DummyVecEnv)([_env_fn(rank) for rank in range(int(n_envs))], **(vec_env_kwargs or {}))
    venv.seed(seed)
    monitored = VecMonitor(venv, filename=None if monitor_filename is None else os.fspath(monitor_filename))
    return GroupedVecEnv(monitored, group_size, seed=seed)
