"""What a resumable checkpoint holds besides the algorithm's own zip: the RNG streams, the episodes in flight, the
callbacks' state and the algorithm's counters, captured at a rollout boundary and restored on resume
(:mod:`sb3_textrl.common.training_checkpoints` writes and reads them)."""

from __future__ import annotations

import contextlib
import copy
import random
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecEnv

from sb3_textrl.common.callbacks import KLPenaltyCallback, RolloutHistoryCallback

__all__ = [
    "EPISODE_ATTRS_NAME",
    "MODEL_STATE_ATTRS",
    "MONITOR_STATE_ATTRS",
    "RESUME_FORMAT",
    "RESUME_STATE_NAME",
    "callback_state",
    "capture_env_state",
    "capture_training_state",
    "flatten_callbacks",
    "get_rng_state",
    "load_callback_state",
    "model_attributes",
    "restore_env_state",
    "set_rng_state",
]

#: the member of a checkpoint's zip that holds the training state (a pickle)
RESUME_STATE_NAME = "sb3_textrl_resume.pkl"
#: the version of the training state's layout; a checkpoint of another version is refused
RESUME_FORMAT = 1

#: an env that lists the attributes holding its episode in flight under this name is resumed mid-episode
#: (:class:`~sb3_textrl.envs.text_generation.TextGenerationEnv` does)
EPISODE_ATTRS_NAME = "episode_state_attrs"
#: attributes of SB3's ``Monitor`` that hold the episode in flight
MONITOR_STATE_ATTRS = ("rewards",)
#: attributes of the algorithm that change during a rollout (the rest of ``save()`` does not)
MODEL_STATE_ATTRS = (
    "num_timesteps",
    "_episode_num",
    "_n_updates",
    "_current_progress_remaining",
    "ep_info_buffer",
    "ep_success_buffer",
    "_last_obs",
    "_last_episode_starts",
    "_last_original_obs",
)


# --- RNG streams ------------------------------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """The global RNG states: Python ``random``, NumPy's global generator, torch (and CUDA, if initialised)."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": th.get_rng_state()}
    if th.cuda.is_available() and th.cuda.is_initialized():
        state["cuda"] = th.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`get_rng_state` (CUDA's only on a machine with as many GPUs)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    th.set_rng_state(state["torch"])
    if "cuda" in state and th.cuda.is_available() and th.cuda.device_count() == len(state["cuda"]):
        th.cuda.set_rng_state_all(state["cuda"])


def _generator(bit_generator_state: dict[str, Any]) -> np.random.Generator:
    bit_generator = getattr(np.random, bit_generator_state["bit_generator"])()
    bit_generator.state = bit_generator_state
    return np.random.Generator(bit_generator)


# --- environments -----------------------------------------------------------------------------------------------------


def _episode_attrs(env: VecEnv) -> tuple[str, ...] | None:
    """The attributes that hold each environment's episode in flight, if the environments list them."""
    if not env.has_attr(EPISODE_ATTRS_NAME):
        return None
    names = {tuple(attrs) for attrs in env.get_attr(EPISODE_ATTRS_NAME)}
    return names.pop() if len(names) == 1 else None


def _stateful_vec_env(env: VecEnv) -> VecEnv | None:
    """The VecEnv of ``env``'s wrapper chain that keeps a state of its own (``state_dict``/``load_state_dict``: the
    prompt draws of a :class:`~sb3_textrl.common.group_vec_env.GroupedVecEnv`), or ``None``."""
    while isinstance(env, VecEnv):
        if callable(getattr(type(env), "state_dict", None)) and callable(getattr(type(env), "load_state_dict", None)):
            return env
        env = getattr(env, "venv", None)  # type: ignore[assignment]
    return None


def capture_env_state(env: VecEnv) -> dict[str, Any]:
    """Each environment's ``np_random`` state, the ``state_dict()`` of a VecEnv in the wrapper chain that has one (a
    ``GroupedVecEnv``'s prompt draws) and, for environments that list them, the episodes in flight."""
    state: dict[str, Any] = {
        "n_envs": env.num_envs,
        "np_random": [copy.deepcopy(generator.bit_generator.state) for generator in env.get_attr("np_random")],
    }
    stateful = _stateful_vec_env(env)
    if stateful is not None:
        state["vec_env"] = copy.deepcopy(stateful.state_dict())  # type: ignore[attr-defined]
    names = _episode_attrs(env)
    if names is not None:
        state["episodes"] = {name: copy.deepcopy(env.get_attr(name)) for name in names}
        if all(env.env_is_wrapped(Monitor)):
            state["monitor"] = {name: copy.deepcopy(env.get_attr(name)) for name in MONITOR_STATE_ATTRS}
    return state


def restore_env_state(env: VecEnv, state: dict[str, Any]) -> tuple[Any, bool]:
    """
    Reset the environments (this consumes the seeds a freshly loaded model set), then put back each ``np_random``, the
    wrapper chain's own state (a ``GroupedVecEnv``'s prompt draws) and, when the environments list the same episode
    attributes as at the checkpoint, the episodes in flight.

    :return: the observations of the reset, and whether the episodes in flight were restored
    :raises ValueError: if the number of environments differs from the checkpoint's
    """
    if state["n_envs"] != env.num_envs:
        raise ValueError(
            f"`env` has {env.num_envs} environments but the checkpoint was taken with {state['n_envs']}: "
            f"resume with n_envs={state['n_envs']}."
        )
    observations = env.reset()
    stateful = _stateful_vec_env(env)
    if stateful is not None and "vec_env" in state:  # after the reset, which drew from the new env's own state
        stateful.load_state_dict(state["vec_env"])  # type: ignore[attr-defined]
    names = _episode_attrs(env)
    restored = "episodes" in state and names is not None and set(names) == set(state["episodes"])
    if "episodes" in state and not restored:
        warnings.warn(
            "The environments do not hold the same episode state as at the checkpoint: the episodes in flight restart."
        )
    groups = [state["episodes"]] if restored else []
    if restored and "monitor" in state and all(env.env_is_wrapped(Monitor)):
        groups.append(state["monitor"])
    for i in range(env.num_envs):
        env.env_method("set_wrapper_attr", "np_random", _generator(state["np_random"][i]), indices=[i])
        for group in groups:
            for name, values in group.items():
                env.env_method("set_wrapper_attr", name, copy.deepcopy(values[i]), indices=[i])
    return observations, restored


# --- callbacks --------------------------------------------------------------------------------------------------------


def flatten_callbacks(callbacks: Sequence[BaseCallback]) -> list[BaseCallback]:
    """The callbacks in order, those inside a ``CallbackList`` (at any depth) in its place."""
    flat: list[BaseCallback] = []
    for callback in callbacks:
        flat += flatten_callbacks(callback.callbacks) if isinstance(callback, CallbackList) else [callback]
    return flat


def callback_state(callback: BaseCallback) -> dict[str, Any]:
    """
    What a callback needs to continue: the KL controller (coefficient, target...) and last KL of a
    :class:`~sb3_textrl.common.callbacks.KLPenaltyCallback`, the history of a
    :class:`~sb3_textrl.common.callbacks.RolloutHistoryCallback`, or ``state_dict()`` for any callback that has
    ``state_dict``/``load_state_dict``.

    :raises ValueError: for a callback whose state cannot be saved
    """
    if hasattr(callback, "state_dict") and hasattr(callback, "load_state_dict"):
        return {"class": type(callback).__name__, "state": copy.deepcopy(callback.state_dict())}
    if isinstance(callback, KLPenaltyCallback):
        return {
            "class": type(callback).__name__,
            "controller_class": type(callback.controller).__name__,
            "controller": copy.deepcopy(vars(callback.controller)),
            "last_kl": callback.last_kl,
        }
    if isinstance(callback, RolloutHistoryCallback):  # at a rollout boundary its per-rollout buffer is empty
        return {"class": type(callback).__name__, "history": copy.deepcopy(callback.history)}
    raise ValueError(
        f"Cannot checkpoint the state of the callback {type(callback).__name__}: give it `state_dict()` and "
        "`load_state_dict(state)` methods, or leave it out of `callbacks`."
    )


def load_callback_state(callback: BaseCallback, state: dict[str, Any]) -> None:
    """Put back what :func:`callback_state` saved.

    :raises ValueError: if the callback or its KL controller is not of the saved class
    """
    if state["class"] != type(callback).__name__:
        raise ValueError(
            f"The checkpoint holds the state of a {state['class']} where {type(callback).__name__} was given: "
            "pass `callbacks` in the order they were checkpointed."
        )
    if "state" in state:
        callback.load_state_dict(copy.deepcopy(state["state"]))  # type: ignore[attr-defined]
    elif isinstance(callback, KLPenaltyCallback):
        if state["controller_class"] != type(callback.controller).__name__:
            raise ValueError(
                f"The checkpoint's KL controller is a {state['controller_class']} but `kl_coef` is a "
                f"{type(callback.controller).__name__}: resume with the same KL settings (CLI: the same --kl-target)."
            )
        callback.controller.__dict__.update(copy.deepcopy(state["controller"]))
        callback.last_kl = state["last_kl"]
    elif isinstance(callback, RolloutHistoryCallback):
        callback.history = copy.deepcopy(state["history"])


# --- the training state and the checkpoint file -----------------------------------------------------------------------


def capture_training_state(
    model: BaseAlgorithm, callbacks: Sequence[BaseCallback] = (), extra_state: dict[str, Any] | None = None
) -> dict[str, Any]:
    """
    Everything a checkpoint holds besides the algorithm's zip, as it is now (call it at a rollout boundary).

    :param model: the algorithm
    :param callbacks: callbacks whose state to keep (see :func:`callback_state`)
    :param extra_state: picklable data to keep with the checkpoint
    :return: a picklable dict: ``format``, ``algorithm`` (``"module:Class"``), ``model`` (the attributes of
        :data:`MODEL_STATE_ATTRS`), ``rng`` (:func:`get_rng_state`), ``env`` (:func:`capture_env_state`, ``None``
        without an env), ``callbacks`` (one :func:`callback_state` each) and ``extra``
    :raises ValueError: for a callback whose state cannot be saved
    """
    env = model.get_env()
    return {
        "format": RESUME_FORMAT,
        "algorithm": f"{type(model).__module__}:{type(model).__qualname__}",
        "model": {name: copy.deepcopy(getattr(model, name)) for name in MODEL_STATE_ATTRS if hasattr(model, name)},
        "rng": get_rng_state(),
        "env": capture_env_state(env) if env is not None else None,
        "callbacks": [callback_state(callback) for callback in flatten_callbacks(callbacks)],
        "extra": copy.deepcopy(extra_state) if extra_state is not None else {},
    }


@contextlib.contextmanager
def model_attributes(model: BaseAlgorithm, values: dict[str, Any]) -> Iterator[None]:
    """Set some attributes of the model for the duration of the block (those it had are put back after it)."""
    saved = {name: getattr(model, name) for name in values if hasattr(model, name)}
    try:
        for name, value in values.items():
            setattr(model, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(model, name, value)
