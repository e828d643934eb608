"""Batched scoring: one reward call per vectorized step for all the text-generation episodes that end in it.

A :class:`~sb3_textrl.envs.TextGenerationEnv` scores its own completion when its episode ends: with ``n_envs``
environments, that is up to ``n_envs`` reward calls per step, each with a batch of one, which wastes a reward model's
batching. With ``defer_scoring=True`` the environments only report the finished completion (``info["prompt"]``,
``info["completion"]``, ``info["score_deferred"] = True``, reward 0), and :class:`BatchedRewardVecEnv`, wrapped around
their ``VecEnv``, scores them together in the main process::

    from stable_baselines3 import PPO
    from sb3_textrl.common.vec_env import make_text_vec_env

    env = make_text_vec_env(n_envs=8, seed=0, env_kwargs=dict(model_name_or_path=path, prompts=prompts,
                                                              reward_fn="reward_model",
                                                              reward_kwargs=dict(model_name_or_path=rm_path)))
    PPO("LMPolicy", env, n_steps=64).learn(10_000)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecEnvWrapper, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from sb3_textrl.common.group_vec_env import GroupedVecEnv, check_group_size, group_member_fn
from sb3_textrl.common.validation import check_positive_int
from sb3_textrl.common.whole_episodes import WholeEpisodeVecEnv
from sb3_textrl.rewards import RewardError, RewardFn, get_reward_fn, is_per_token, reward_name, score_completions, term_scores

__all__ = ["TEXT_GENERATION_ENV_ID", "BatchedRewardVecEnv", "make_text_vec_env"]

#: the registered id of :class:`~sb3_textrl.envs.TextGenerationEnv`, the default of :func:`make_text_vec_env`
TEXT_GENERATION_ENV_ID = "sb3_textrl/TextGeneration-v0"


class BatchedRewardVecEnv(VecEnvWrapper):
    """
    Score, with one call of the reward function per step, all the episodes of a ``VecEnv`` of text-generation
    environments (built with ``defer_scoring=True``) that end in that step.

    In :meth:`step_wait`, the episodes whose ``info`` has ``score_deferred`` are scored as one batch, in env order;
    each score is added to that env's reward (so SB3's rollout buffer, and a :class:`~sb3_textrl.KLPenaltyCallback`,
    see it as the last step's reward) and written to ``info["score"]`` (with ``info["score_terms"]`` for a reward that
    keeps per-term scores, e.g. ``"combined"``), as the environment itself would have done. ``DummyVecEnv`` and
    ``SubprocVecEnv`` both work: the wrapper reads only the step's infos and, once, ``get_attr``.

    **Monitor statistics.** SB3's ``Monitor`` wraps each environment *inside* the ``VecEnv`` (``make_vec_env`` adds
    it), so the episode return it computes misses the deferred score. The wrapper adds the score to
    ``info["episode"]["r"]`` when that key is present (rounded to 6 digits, as ``Monitor`` does), which is what SB3
    reads for ``rollout/ep_rew_mean``, ``evaluate_policy`` and ``EvalCallback``. The ``Monitor``'s own CSV file and
    ``get_episode_rewards()`` still miss it: to get those right too, put a ``VecMonitor`` *outside* this wrapper
    instead, as :func:`make_text_vec_env` does (no per-env ``Monitor``).

    **Errors.** A reward that raises, returns NaN, a non-number or the wrong number of scores raises a
    :class:`~sb3_textrl.rewards.RewardError` (a ``ValueError``) naming the reward and the prompt. Nothing else is
    touched: the model keeps its weights, optimizer and ``num_timesteps`` (``model.save()`` works), the failed batch is
    kept in ``failed_batch`` as ``(env_index, prompt, completion)`` tuples, and ``model.learn(...,
    reset_num_timesteps=False)`` goes on (the failed episodes get no reward).

    :param venv: a ``VecEnv`` of text-generation environments built with ``defer_scoring=True``
    :param reward_fn: the reward: a name, a callable or an object (see :func:`sb3_textrl.rewards.get_reward_fn`);
        ``None`` takes the environments' own ``reward_fn`` and ``reward_kwargs`` arguments
    :param reward_kwargs: arguments of a named reward
    :raises ValueError: if an environment does not defer its scoring, there is no reward, or it is a per-token reward
    """

    def __init__(self, venv: VecEnv, reward_fn: str | RewardFn | None = None, reward_kwargs: dict | None = None):
        super().__init__(venv)
        try:
            deferred = venv.get_attr("defer_scoring")
        except AttributeError:
            deferred = [False]
        if not all(deferred):
            raise ValueError(
                "BatchedRewardVecEnv needs environments that leave the scoring to it: build them with defer_scoring=True "
                "in `env_kwargs` (or use sb3_textrl.make_text_vec_env), else every episode would be scored twice."
            )
        if reward_fn is None:
            reward_fn, reward_kwargs = (
                venv.get_attr("reward_spec", indices=[0])[0],
                venv.get_attr("reward_kwargs", indices=[0])[0],
            )
            if reward_fn is None:
                raise ValueError(
                    "No reward: pass `reward_fn` to BatchedRewardVecEnv (the environments were built with reward_fn=None)."
                )
        self.reward_fn = get_reward_fn(reward_fn, reward_kwargs)
        if is_per_token(self.reward_fn):
            raise ValueError(
                f"`reward_fn` ({reward_name(self.reward_fn)}) is a per-token reward, paid at every step by the environment "
                "itself: build the environments with defer_scoring=False and without this wrapper."
            )
        self.n_calls = 0  # reward calls so far: at most one per step
        self.n_scored = 0  # episodes scored so far
        self.failed_batch: list[tuple[int, str, str]] | None = None

    def reset(self):
        return self.venv.reset()

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        ended = [i for i in range(len(infos)) if dones[i] and infos[i].get("score_deferred", False)]
        if not ended:
            return obs, rewards, dones, infos
        prompts = [infos[i]["prompt"] for i in ended]
        completions = [infos[i]["completion"] for i in ended]
        try:
            scores = score_completions(self.reward_fn, prompts, completions)
        except RewardError:
            self.failed_batch = list(zip(ended, prompts, completions))
            raise
        self.n_calls += 1
        self.n_scored += len(ended)
        rewards = np.array(rewards, dtype=np.float32)
        infos = list(infos)
        for j, i in enumerate(ended):
            info = {key: value for key, value in infos[i].items() if key != "score_deferred"}
            info["score"] = scores[j]
            terms = term_scores(self.reward_fn, j)
            if terms is not None:
                info["score_terms"] = terms
            rewards[i] += scores[j]
            if "episode" in info:  # a Monitor inside the VecEnv: its return lacks the score
                info["episode"] = {**info["episode"], "r": round(float(info["episode"]["r"]) + scores[j], 6)}
            infos[i] = info
        return obs, rewards, dones, infos


def _env_fn(env_id: str, rank: int, seed: int | None, env_kwargs: dict[str, Any]) -> Callable[[], gym.Env]:
    def _init() -> gym.Env:
        env = gym.make(env_id, **env_kwargs)
        if seed is not None:
            env.action_space.seed(seed + rank)  # the env itself is seeded at the first reset (VecEnv.seed)
        return env

    return _init


def make_text_vec_env(
    n_envs: int = 1,
    seed: int | None = None,
    env_kwargs: dict[str, Any] | None = None,
    vec_env_cls: type[DummyVecEnv | SubprocVecEnv] | None = None,
    vec_env_kwargs: dict[str, Any] | None = None,
    monitor_filename: str | os.PathLike | None = None,
    env_id: str = TEXT_GENERATION_ENV_ID,
    group_size: int | None = None,
    whole_episodes: bool = False,
) -> VecEnv:
    """
    Build ``n_envs`` text-generation environments whose episodes are scored in one batch per step:
    ``VecMonitor(BatchedRewardVecEnv(vec_env_cls([gym.make(env_id, **env_kwargs, defer_scoring=True), ...])))``.

    The reward (``env_kwargs["reward_fn"]`` and ``env_kwargs["reward_kwargs"]``, default ``"vader"``) is built once,
    in this process, and held by the wrapper; the environments get ``reward_fn=None``. A per-token reward cannot be
    deferred: the environments then score by themselves (no :class:`BatchedRewardVecEnv`). Episode statistics come
    from the outer ``VecMonitor``, so they include the scores. Seeding follows SB3's ``make_vec_env``: env ``i`` is
    reset with ``seed + i`` and its action space seeded with ``seed + i``.

    :param n_envs: the number of environments
    :param seed: the base seed (``None``: random)
    :param env_kwargs: keyword arguments of ``gym.make(env_id, ...)`` (``model_name_or_path``, ``prompts``,
        ``reward_fn``, ``reward_kwargs``, ``max_new_tokens``...)
    :param vec_env_cls: ``DummyVecEnv`` (default) or ``SubprocVecEnv``
    :param vec_env_kwargs: keyword arguments of ``vec_env_cls`` (e.g. ``start_method="fork"``)
    :param monitor_filename: where ``VecMonitor`` writes its CSV log (``None``: no file)
    :param env_id: a registered text-generation environment
    :param group_size: for GRPO and RLOO: play the envs in groups of ``group_size`` consecutive envs that start each
        episode on the same prompt, in rounds (a :class:`~sb3_textrl.common.group_vec_env.GroupedVecEnv`, outermost;
        ``info["group"]`` on each finished episode). ``None`` (default): independent envs
    :param whole_episodes: for PPO, A2C and REINFORCE: play the envs in rounds of ``max_new_tokens`` steps (a
        :class:`~sb3_textrl.common.whole_episodes.WholeEpisodeVecEnv`, outermost), so that a rollout whose ``n_steps``
        is a multiple of ``max_new_tokens`` holds whole episodes only; an env that has finished its episode waits with
        an empty observation. Train with ``rollout_buffer_class=EpisodeRolloutBuffer``. Default ``False``: each env
        starts its next episode at once, and a rollout's end cuts the running episodes
    :return: the wrapped ``VecEnv``
    :raises ValueError: if ``n_envs`` is not a positive integer, the reward is invalid, ``group_size`` is < 2 or
        does not divide ``n_envs``, or both ``group_size`` and ``whole_episodes`` are given
    """
    check_positive_int(n_envs, "n_envs")
    if group_size is not None:
        check_group_size(group_size, int(n_envs))
        if whole_episodes:
            raise ValueError(
                "`whole_episodes=True` and `group_size` do not go together: groups already play whole episodes, in "
                "rounds. Pass group_size for GRPO and RLOO, whole_episodes for PPO, A2C and REINFORCE."
            )
    env_kwargs = dict(env_kwargs or {})
    if "defer_scoring" in env_kwargs:
        raise ValueError("Do not pass `defer_scoring` in `env_kwargs`: make_text_vec_env sets it.")
    reward = get_reward_fn(env_kwargs.pop("reward_fn", "vader"), env_kwargs.pop("reward_kwargs", None))
    deferred = not is_per_token(reward)
    if deferred:
        env_kwargs.update(reward_fn=None, defer_scoring=True)
    else:
        env_kwargs["reward_fn"] = reward
    vec_env_cls = vec_env_cls or DummyVecEnv
    env_fns = [_env_fn(env_id, rank, seed, env_kwargs) for rank in range(int(n_envs))]
    if group_size is not None or whole_episodes:  # each env waits, once its episode has ended, for the rest of its round
        env_fns = [group_member_fn(env_fn) for env_fn in env_fns]
    venv: VecEnv = vec_env_cls(env_fns, **(vec_env_kwargs or {}))
    venv.seed(seed)
    if deferred:
        venv = BatchedRewardVecEnv(venv, reward)
    venv = VecMonitor(venv, filename=None if monitor_filename is None else os.fspath(monitor_filename))
    if whole_episodes:
        return WholeEpisodeVecEnv(venv, round_steps=venv.get_attr("max_new_tokens", indices=[0])[0])
    return venv if group_size is None else GroupedVecEnv(venv, group_size, seed=seed)
