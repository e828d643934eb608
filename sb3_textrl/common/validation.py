"""Checks to run before training: they catch set-ups that SB3 accepts but that would train on garbage or fail late.

Each check raises a ``ValueError`` that names the argument, states the values and says how to fix it.
:func:`check_lm_setup` runs all of them on a built model; the CLI runs :func:`check_rollout_size` on its arguments
before loading any model::

    model = PPO("LMPolicy", env, n_steps=24, batch_size=96)
    check_lm_setup(model)   # before model.learn(...)
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv, unwrap_vec_normalize

from sb3_textrl.lm.loading import load_tokenizer

__all__ = ["check_lm_setup", "check_positive_int", "check_rollout_size", "check_same_lm", "check_vec_env"]


def check_positive_int(value: Any, name: str, meaning: str = "") -> None:
    """
    Refuse anything but a positive integer (``bool`` included, although Python counts it as an ``int``).

    :param value: the value given
    :param name: how the argument is called where it was given (``n_steps``, ``--n-envs``...)
    :param meaning: words that follow "a positive integer" in the message, e.g. ``" or None (the whole rollout)"``
    :raises ValueError: "`name` must be a positive integer{meaning}, got {value!r}."
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer{meaning}, got {value!r}.")


def check_rollout_size(
    n_steps: int, n_envs: int, batch_size: int | None, names: tuple[str, str, str] = ("n_steps", "n_envs", "batch_size")
) -> None:
    """
    A rollout (``n_steps * n_envs`` transitions) must hold at least one minibatch of ``batch_size`` transitions.

    SB3 only warns when ``batch_size`` exceeds the rollout (every update then sees one short minibatch), and asserts
    ``n_steps * n_envs > 1``.

    :param n_steps: steps per environment per rollout
    :param n_envs: number of environments
    :param batch_size: minibatch size (``None`` for algorithms without minibatches, e.g. A2C)
    :param names: how the three arguments are called where they were given (e.g. the CLI's ``--n-steps``)
    :raises ValueError: if a value is not a positive integer, the rollout holds a single transition, or it is smaller
        than ``batch_size``
    """
    for name, value in zip(names, (n_steps, n_envs, batch_size)):
        if value is None and name == names[2]:
            continue
        check_positive_int(value, name)
    steps, envs, batch = names
    rollout = int(n_steps) * int(n_envs)
    if rollout <= 1:
        raise ValueError(
            f"`{steps} * {envs}` must be greater than 1 (advantage normalisation), got {steps}={n_steps} and "
            f"{envs}={n_envs}: raise `{steps}` or `{envs}`."
        )
    if batch_size is not None and batch_size > rollout:
        raise ValueError(
            f"`{batch}` ({batch_size}) is larger than a rollout, `{steps} * {envs}` = {n_steps} * {n_envs} = {rollout} "
            f"transitions: lower `{batch}` to at most {rollout}, or raise `{envs}` or `{steps}`."
        )


def _token_keys(observation_space: spaces.Space) -> list[str | None]:
    """The parts of an observation that hold integers (token ids, masks): dict keys, or ``[None]`` for a Box."""
    if isinstance(observation_space, spaces.Dict):
        return [
            key
            for key, space in observation_space.spaces.items()
            if isinstance(space, spaces.Box) and np.issubdtype(space.dtype, np.integer)
        ]
    if isinstance(observation_space, spaces.Box) and np.issubdtype(observation_space.dtype, np.integer):
        return [None]
    return []


def check_vec_env(env: Any) -> None:
    """
    The environment is one SB3 can train LMPolicy on.

    - A Gymnasium vector env (``gym.make_vec``, ``gymnasium.vector.SyncVectorEnv``...) is not an SB3 ``VecEnv``:
      SB3 rejects it with a message about OpenAI Gym.
    - ``VecNormalize(norm_obs=True)`` would turn token ids and attention masks into normalised floats, which the
      policy would then truncate back to (wrong) integers.

    :param env: what is passed to the algorithm: a ``gymnasium.Env``, an SB3 ``VecEnv`` or an env id
    :raises ValueError: in the two cases above
    """
    if isinstance(env, gym.vector.VectorEnv):
        raise ValueError(
            f"`env` is a Gymnasium vector env ({type(env).__name__}), but SB3 needs its own `VecEnv` API: build it with "
            "`stable_baselines3.common.env_util.make_vec_env(env_id, n_envs=..., env_kwargs=...)` "
            "(or `DummyVecEnv([make_env] * n_envs)`) instead of `gym.make_vec(...)`."
        )
    if not isinstance(env, VecEnv):
        return
    normalize = unwrap_vec_normalize(env)
    if normalize is None or not normalize.norm_obs:
        return
    token_keys = _token_keys(normalize.observation_space)
    if isinstance(normalize.observation_space, spaces.Dict):
        keys = normalize.norm_obs_keys if normalize.norm_obs_keys is not None else list(normalize.observation_space.spaces)
        normalised = [key for key in token_keys if key in keys]
    else:
        normalised = token_keys
    if normalised:
        what = "the token ids" if normalised == [None] else f"the integer observations {normalised}"
        raise ValueError(
            f"`VecNormalize(norm_obs=True)` would normalise {what} into floats, and LMPolicy would read garbage token ids: "
            "wrap with `VecNormalize(venv, norm_obs=False)` (reward normalisation, `norm_reward=True`, is fine)."
        )


def _tokenizer_difference(first: str, second: str) -> str | None:
    """Why the tokenizers of two LMs differ (``None`` if they encode text to the same ids)."""
    a, b = load_tokenizer(first), load_tokenizer(second)
    if a.get_vocab() != b.get_vocab():
        return f"vocabularies of {len(a)} and {len(b)} tokens with different ids"
    for attribute in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(a, attribute) != getattr(b, attribute):
            return f"`{attribute}` {getattr(a, attribute)} vs {getattr(b, attribute)}"
    return None


def check_same_lm(env_model: str, policy_model: str) -> None:
    """
    The env's token ids and the policy's LM belong to the same tokenizer.

    Two different names may hold the same LM (a copy, a fine-tuned export with its tokenizer): they pass when their
    tokenizers agree. The policy already refuses an LM whose logits width differs from the action space; this also
    catches LMs of the same width with different vocabularies.

    :param env_model: the env's ``model_name_or_path``
    :param policy_model: the policy's ``model_name_or_path``
    :raises ValueError: if the tokenizers differ
    """
    if str(env_model) == str(policy_model):
        return
    difference = _tokenizer_difference(env_model, policy_model)
    if difference is not None:
        raise ValueError(
            f"The environment tokenizes for `model_name_or_path={env_model!r}` but the policy's LM is "
            f"`model_name_or_path={policy_model!r}`, and their tokenizers differ ({difference}): the same token id would mean "
            "different text. Build the env and the policy from the same LM (leave out policy_kwargs['model_name_or_path'] "
            "to use the env's)."
        )


def check_lm_setup(model: BaseAlgorithm, env: Any = None) -> None:
    """
    Run the checks of this module on a model built with ``LMPolicy``, before ``learn``.

    :param model: the algorithm (PPO, A2C, TRPO, REINFORCE)
    :param env: the environment to check (default: the model's)
    :raises ValueError: for a rollout smaller than a minibatch, a Gymnasium vector env, ``VecNormalize`` over token ids,
        or an env and a policy built for different LMs
    """
    env = model.get_env() if env is None else env
    check_vec_env(env)
    n_steps = getattr(model, "n_steps", None)
    if n_steps is not None and env is not None:
        check_rollout_size(n_steps, env.num_envs, getattr(model, "batch_size", None))
    env_model = getattr(getattr(env, "observation_space", None), "model_name_or_path", None)
    policy_model = getattr(model.policy, "model_name_or_path", None)
    if env_model is not None and policy_model is not None:
        check_same_lm(env_model, policy_model)
