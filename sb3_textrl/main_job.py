"""The main job, built from its settings: the environments, the algorithm and the KL callback that
``sb3-textrl train`` runs for a :class:`~sb3_textrl.config.TrainConfig` (benchmarks build the same job with them)."""

from __future__ import annotations

from typing import Any

from stable_baselines3 import A2C, PPO
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv

from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.common.callbacks import KLPenaltyCallback
from sb3_textrl.common.kl import AdaptiveKLController
from sb3_textrl.common.vec_env import make_text_vec_env
from sb3_textrl.config import GROUP_ALGOS, TrainConfig
from sb3_textrl.grpo import GRPO
from sb3_textrl.reinforce import REINFORCE
from sb3_textrl.rloo import RLOO

__all__ = ["algorithm_kwargs", "make_env", "make_kl_callback", "make_model"]


def make_env(config: TrainConfig, prompts: list[str], seed: int) -> VecEnv:
    """
    The main job's ``config.n_envs`` environments over ``prompts``, scored with one reward call per step
    (:func:`~sb3_textrl.common.vec_env.make_text_vec_env`); for GRPO and RLOO in groups of ``config.group_size`` envs
    that play each round on one prompt (a :class:`~sb3_textrl.common.group_vec_env.GroupedVecEnv`); with
    ``config.whole_episodes`` in rounds of whole episodes (a :class:`~sb3_textrl.common.whole_episodes.WholeEpisodeVecEnv`).

    :param config: the main job's settings (``model``, ``reward``, ``reward_kwargs``, ``max_new_tokens``,
        ``missing_eos_penalty``, ``n_envs``, ``algo``, ``group_size``, ``whole_episodes``)
    :param prompts: the training prompts
    :param seed: the base seed (env ``i`` gets ``seed + i``)
    """
    env_kwargs = dict(
        model_name_or_path=config.model,
        prompts=prompts,
        reward_fn=config.reward,
        reward_kwargs=config.reward_kwargs,
        max_new_tokens=config.max_new_tokens,
        missing_eos_penalty=config.missing_eos_penalty,
        render_mode=None,
    )
    group_size = config.group_size if config.algo in GROUP_ALGOS else None
    whole_episodes = config.plays_whole_episodes
    return make_text_vec_env(
        n_envs=config.n_envs, seed=seed, env_kwargs=env_kwargs, group_size=group_size, whole_episodes=whole_episodes
    )


def algorithm_kwargs(config: TrainConfig) -> dict[str, Any]:
    """
    The keywords of ``config.algo``'s constructor from ``config``: only those the algorithm takes (GRPO gets no
    ``gae_lambda``, A2C no ``batch_size``...), and the episode rollout buffer for PPO, A2C and REINFORCE (GRPO and RLOO
    have their group buffers).

    :param config: the main job's settings
    :return: the keywords, ``policy_kwargs`` aside
    """
    settings: dict[str, Any] = dict(
        learning_rate=config.learning_rate,
        n_steps=config.rollout_steps,
        ent_coef=config.ent_coef,
        max_grad_norm=config.max_grad_norm,
    )
    if config.algo in GROUP_ALGOS:
        settings.update(batch_size=config.batch_size, beta=config.beta)
        if config.algo == "grpo":
            settings.update(
                n_epochs=config.n_epochs,
                clip_range=config.clip_range,
                clip_range_high=config.clip_range_high,
                scale_rewards=config.scale_rewards,
                loss_type=config.loss_type,
            )
        return settings
    settings.update(gamma=config.gamma, vf_coef=config.vf_coef, rollout_buffer_class=EpisodeRolloutBuffer)
    if config.algo in ("ppo", "a2c"):
        settings["gae_lambda"] = config.gae_lambda
    if config.algo in ("ppo", "reinforce"):
        settings["batch_size"] = config.batch_size
    if config.algo == "ppo":
        settings.update(n_epochs=config.n_epochs, clip_range=config.clip_range)
    if config.algo == "a2c":
        settings["use_rms_prop"] = False  # Adam, as the other algorithms (RMSprop is A2C's default)
    return settings


def make_model(config: TrainConfig, env: VecEnv, **kwargs: Any) -> OnPolicyAlgorithm:
    """
    ``PPO("LMPolicy", env)`` (or the algorithm ``config.algo`` names) with the main job's hyperparameters from
    ``config`` (:func:`algorithm_kwargs`) and ``policy_kwargs=dict(activation_checkpointing=...)`` (and
    ``prefix_sharing=False`` with ``config.fsdp``).

    :param config: the main job's settings
    :param env: the environments, e.g. from :func:`make_env` (grouped for GRPO and RLOO)
    :param kwargs: more keywords of the algorithm (``seed``, ``device``, ``verbose``), or ones that replace the main
        job's (``rollout_buffer_class``, ``policy_kwargs``)
    """
    algorithm = {"ppo": PPO, "a2c": A2C, "reinforce": REINFORCE, "grpo": GRPO, "rloo": RLOO}[config.algo]
    policy_kwargs = dict(activation_checkpointing=config.activation_checkpointing or False)
    if config.fsdp:  # one forward per minibatch on every rank (see sb3_textrl.distributed.fsdp)
        policy_kwargs["prefix_sharing"] = False
    settings = {**algorithm_kwargs(config), "policy_kwargs": policy_kwargs}
    return algorithm("LMPolicy", env, **{**settings, **kwargs})


def make_kl_callback(config: TrainConfig) -> KLPenaltyCallback:
    """
    The main job's KL penalty to the reference model: a fixed ``kl_coef``, or with ``kl_target`` an
    :class:`~sb3_textrl.common.kl.AdaptiveKLController` that starts there.

    :param config: the main job's settings (``kl_coef``, ``kl_target``, ``kl_horizon``, ``kl_estimator``)
    """
    kl_coef: float | AdaptiveKLController = config.kl_coef
    if config.kl_target is not None:
        kl_coef = AdaptiveKLController(kl_coef=config.kl_coef, target=config.kl_target, horizon=config.kl_horizon)
    return KLPenaltyCallback(kl_coef=kl_coef, estimator=config.kl_estimator)
