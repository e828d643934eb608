"""Atomic checkpoints that resume a run exactly, for SB3's on-policy algorithms.

A checkpoint is one file named as SB3's ``CheckpointCallback`` names them, ``{name_prefix}_{num_timesteps}_steps.zip``:
the algorithm's own zip (``PPO.load`` reads it as usual) plus one member, ``sb3_textrl_resume.pkl``, holding what
``save()`` leaves out and a run needs to continue where it stopped:

- the state of the callbacks given (the KL controller's coefficient, the rollout history);
- the RNG streams: Python's ``random``, NumPy's global generator (minibatch order), torch's (token sampling; CUDA's
  too when initialised), each environment's ``np_random`` (prompt choice) and a ``GroupedVecEnv``'s prompt draws
  (GRPO, RLOO);
- the episodes in flight: the attributes each environment lists in ``episode_state_attrs`` (``TextGenerationEnv``:
  its prompt and tokens so far) and the ``Monitor``'s rewards, with the algorithm's ``_last_obs`` and
  ``_last_episode_starts``;
- anything the caller adds (``extra_state``: the CLI stores its arguments and the evaluation before training).

Checkpoints are taken at rollout boundaries, after the update of the previous rollout, so that resuming from one
replays the same computation: with the same seed, a run resumed on CPU gives the same weights as an uninterrupted one.
Each file is written to a temporary name in the same directory, flushed to disk, then renamed with ``os.replace``:
a run killed mid-save leaves the previous checkpoints intact and never a partial one under a checkpoint name.

Environments without ``episode_state_attrs`` restart their episodes on resume: the episodes in flight at the
checkpoint are lost (at most one partial episode per environment), the RNG streams are still restored.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.save_util import json_to_data

from sb3_textrl.common.training_state import (
    RESUME_FORMAT,
    RESUME_STATE_NAME,
    callback_state,
    capture_training_state,
    flatten_callbacks,
    load_callback_state,
    model_attributes,
    restore_env_state,
    set_rng_state,
)
from sb3_textrl.lm.loading import resolve_model

__all__ = [
    "RESUME_STATE_NAME",  # from training_state: the zip member that holds the training state
    "AtomicCheckpointCallback",
    "atomic_write",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "read_resume_state",
    "save_checkpoint",
]


def _temporary_path(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".tmp-{os.getpid()}-{name}")


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """
    Write a file atomically: ``write(temporary_path)`` in the same directory, flush it to disk, ``os.replace`` it.

    :param path: the final path (its directory is created)
    :param write: writes the file's content to the path it is given (keep ``path``'s extension: it is kept)
    :return: ``path``
    :raises BaseException: whatever ``write`` raises (the temporary file is removed, ``path`` is left as it was)
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = _temporary_path(path)
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def save_checkpoint(
    model: BaseAlgorithm,
    path: str,
    state: dict[str, Any] | None = None,
    callbacks: Sequence[BaseCallback] = (),
    extra_state: dict[str, Any] | None = None,
) -> str:
    """
    Atomically write ``model.save()`` plus the training state to one zip.

    :param model: the algorithm
    :param path: where to write (``.zip``)
    :param state: a state from :func:`capture_training_state` (default: the state now; the model's weights must not
        have changed since it was captured)
    :param callbacks: callbacks whose state to keep, when ``state`` is not given
    :param extra_state: picklable data to keep, when ``state`` is not given
    :return: ``path``
    """
    if state is None:
        state = capture_training_state(model, callbacks, extra_state)

    def write(temporary: str) -> None:
        with model_attributes(model, state["model"]):  # the zip's own counters match the resume state
            model.save(temporary)
        with zipfile.ZipFile(temporary, "a") as archive:
            archive.writestr(RESUME_STATE_NAME, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    return atomic_write(path, write)


def read_resume_state(path: str) -> dict[str, Any] | None:
    """
    The training state stored in a checkpoint (see :func:`~sb3_textrl.common.training_state.capture_training_state`),
    or ``None`` for a plain SB3 zip.

    :param path: an SB3 zip
    :raises ValueError: if the state was written in another resume format
    """
    with zipfile.ZipFile(path) as archive:
        if RESUME_STATE_NAME not in archive.namelist():
            return None
        state = pickle.loads(archive.read(RESUME_STATE_NAME))
    if state.get("format") != RESUME_FORMAT:
        raise ValueError(
            f"The checkpoint {path!r} has resume format {state.get('format')}; this version reads {RESUME_FORMAT}."
        )
    return state


def list_checkpoints(save_path: str, name_prefix: str = "rl_model") -> list[tuple[int, str]]:
    """
    ``(num_timesteps, path)`` of the checkpoints in ``save_path`` (files named ``{name_prefix}_{num_timesteps}_steps.zip``),
    oldest first (temporary files excluded); ``[]`` when the folder does not exist.
    """
    if not os.path.isdir(save_path):
        return []
    pattern = re.compile(rf"^{re.escape(name_prefix)}_(\d+)_steps\.zip$")
    found = [(int(m.group(1)), os.path.join(save_path, name)) for name in os.listdir(save_path) if (m := pattern.match(name))]
    return sorted(found)


def latest_checkpoint(save_path: str, name_prefix: str = "rl_model") -> str | None:
    """The checkpoint with the most timesteps in ``save_path``, or ``None``."""
    found = list_checkpoints(save_path, name_prefix)
    return found[-1][1] if found else None


# --- loading ----------------------------------------------------------------------------------------------------------


def _saved_data(path: str) -> dict[str, Any]:
    with zipfile.ZipFile(path) as archive:
        return json_to_data(archive.read("data").decode())


def _saved_lm(data: dict[str, Any]) -> str | None:
    return (data.get("policy_kwargs") or {}).get("model_name_or_path") or getattr(
        data.get("observation_space"), "model_name_or_path", None
    )


def _algorithm_class(name: str) -> type[BaseAlgorithm]:
    module, _, qualname = name.partition(":")
    return getattr(importlib.import_module(module), qualname)


def load_model(
    path: str,
    algorithm: type[BaseAlgorithm] | None = None,
    env: Any = None,
    device: th.device | str = "auto",
    model_name_or_path: str | None = None,
    **kwargs,
) -> BaseAlgorithm:
    """
    ``algorithm.load(path, env, device)`` for a model with an ``LMPolicy``, with a clear error when its LM is gone.

    ``load()`` rebuilds the policy from the ``model_name_or_path`` it was trained with (and the reference model from
    it), then loads the saved weights. If that LM has moved, pass its new location as ``model_name_or_path``.

    :param path: an SB3 zip (a checkpoint or ``model.save()``'s file)
    :param algorithm: the algorithm class (default: the one recorded in a checkpoint, else ``PPO``)
    :param env: the environment to train on (as in ``load``)
    :param device: torch device
    :param model_name_or_path: where the LM is now, if not where it was when the model was saved
    :param kwargs: other arguments of ``load`` (``custom_objects``, ...)
    :raises ValueError: if ``path`` is not an SB3 zip, the LM cannot be found, or the weights do not fit it
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"`path` {path!r} is not a model saved by SB3 (a .zip written by `model.save()`).")
    if algorithm is None:
        state = read_resume_state(path)
        if state is not None:
            algorithm = _algorithm_class(state["algorithm"])
        else:
            from stable_baselines3 import PPO

            algorithm = PPO
    data = _saved_data(path)
    custom_objects = dict(kwargs.pop("custom_objects", None) or {})
    lm = _saved_lm(data)
    if model_name_or_path is not None:
        lm = os.fspath(model_name_or_path)
        custom_objects["policy_kwargs"] = {**(data.get("policy_kwargs") or {}), "model_name_or_path": lm}
    if lm is not None:
        try:
            resolve_model(lm)
        except ValueError as error:
            raise ValueError(
                f"The model saved in {path!r} was trained with the LM `model_name_or_path={lm!r}`, which cannot be found "
                f"({error}) If the LM has moved, pass its new location: `load_model(path, model_name_or_path=NEW_LOCATION)`; "
                "CLI: `--model NEW_LOCATION --resume`."
            ) from error
    try:
        model = algorithm.load(path, env=env, device=device, custom_objects=custom_objects, **kwargs)
    except RuntimeError as error:
        raise ValueError(
            f"The weights saved in {path!r} do not fit the LM `model_name_or_path={lm!r}` ({error}): "
            "pass the LM the model was trained with as `model_name_or_path`."
        ) from error
    if model_name_or_path is not None and hasattr(model.observation_space, "model_name_or_path"):
        model.observation_space.model_name_or_path = lm  # a later save() records the new location
    return model


def load_checkpoint(
    path: str,
    env: Any = None,
    callbacks: Sequence[BaseCallback] = (),
    algorithm: type[BaseAlgorithm] | None = None,
    device: th.device | str = "auto",
    model_name_or_path: str | None = None,
    restore_rng: bool = True,
    **kwargs,
) -> tuple[BaseAlgorithm, dict[str, Any]]:
    """
    Load a checkpoint to continue training: the model, then the state of ``env``, ``callbacks`` and the RNG streams.

    Continue with ``model.learn(total_timesteps - model.num_timesteps, callback=..., reset_num_timesteps=False)``
    right away: anything that draws random numbers in between changes the run.

    :param path: a checkpoint written by :class:`AtomicCheckpointCallback` or :func:`save_checkpoint`
    :param env: the environment to train on, built as for the checkpointed run (same number of environments)
    :param callbacks: the callbacks of the checkpointed run, in the same order, freshly built: their state is restored
    :param algorithm: the algorithm class (default: the one recorded in the checkpoint)
    :param device: torch device
    :param model_name_or_path: where the LM is now, if it moved (see :func:`load_model`)
    :param restore_rng: restore the global RNG states (Python, NumPy, torch)
    :param kwargs: other arguments of ``load``
    :return: the model, and the ``extra_state`` saved with the checkpoint
    :raises ValueError: if the file holds no training state, or ``env``/``callbacks`` do not match it
    """
    state = read_resume_state(os.fspath(path))
    if state is None:
        raise ValueError(
            f"{path!r} is a plain SB3 zip, without the training state to resume from: load it with `PPO.load(path)`, "
            "or resume from a checkpoint written by `AtomicCheckpointCallback`."
        )
    callbacks = flatten_callbacks(callbacks)
    if len(callbacks) != len(state["callbacks"]):
        saved = [s["class"] for s in state["callbacks"]]
        raise ValueError(
            f"`callbacks`: the checkpoint holds the state of {saved}, got {[type(c).__name__ for c in callbacks]}."
        )
    model = load_model(path, algorithm, env=env, device=device, model_name_or_path=model_name_or_path, **kwargs)
    vec_env = model.get_env()
    if vec_env is not None and state["env"] is not None:
        observations, restored = restore_env_state(vec_env, state["env"])
        if restored:
            model._last_obs = copy.deepcopy(state["model"]["_last_obs"])
            model._last_episode_starts = copy.deepcopy(state["model"]["_last_episode_starts"])
            if state["model"].get("_last_original_obs") is not None:
                model._last_original_obs = copy.deepcopy(state["model"]["_last_original_obs"])
        else:  # episodes restart: no reset in learn(), which would reseed the environments
            model._last_obs = observations
            model._last_episode_starts = np.ones((vec_env.num_envs,), dtype=bool)
    for callback, saved in zip(callbacks, state["callbacks"]):
        load_callback_state(callback, saved)
    if restore_rng:
        set_rng_state(state["rng"])
    return model, state["extra"]


# --- the callback -----------------------------------------------------------------------------------------------------


class AtomicCheckpointCallback(CheckpointCallback):
    """
    Save a resumable checkpoint every ``save_freq`` rollouts, atomically; stop and save on request (e.g. on SIGINT).

    Based on SB3's ``CheckpointCallback``: same file names (``{name_prefix}_{num_timesteps}_steps.zip`` and
    ``{name_prefix}_vecnormalize_{num_timesteps}_steps.pkl``), but ``save_freq`` counts rollouts, not
    ``env.step()`` calls, and checkpoints are only taken at rollout boundaries, after the previous rollout's update:
    the only points a run can be resumed from exactly. Each checkpoint also holds the training state (see the module
    docstring), written to a temporary file and renamed.

    At every rollout boundary the training state is also kept in memory, so that :meth:`request_stop` (from a signal
    handler) ends training at the next step (``stopped`` then tells that ``learn`` returned early) and
    :meth:`save_last_boundary` writes the checkpoint of that boundary: at most the rollout in progress is lost.

    Resume with :func:`load_checkpoint`, then ``model.learn(remaining, reset_num_timesteps=False)``.

    :param save_freq: save every ``save_freq`` rollouts (0: only when asked to)
    :param save_path: folder of the checkpoints (created at the first save)
    :param name_prefix: common prefix of the files
    :param save_vecnormalize: also save the ``VecNormalize`` statistics (its running return is not saved)
    :param callbacks: callbacks whose state the checkpoints keep, e.g. ``[kl_callback, history_callback]``
        (see :func:`callback_state`); pass the same ones to :func:`load_checkpoint`
    :param extra_state: picklable data to store in every checkpoint
    :param keep_last: keep only the newest ``keep_last`` checkpoints (``None``: keep all, as SB3 does)
    :param verbose: 2 prints each save
    :raises ValueError: for a negative ``save_freq``, ``keep_last < 1``, a callback whose state cannot be saved,
        or (at the start of training) an algorithm that is not on-policy
    :raises FloatingPointError: when a checkpoint is due and the weights hold NaN or infinite values (a diverged update;
        nothing is written, the earlier checkpoints stay)
    """

    def __init__(
        self,
        save_freq: int,
        save_path: str,
        name_prefix: str = "rl_model",
        save_vecnormalize: bool = False,
        callbacks: Sequence[BaseCallback] = (),
        extra_state: dict[str, Any] | None = None,
        keep_last: int | None = None,
        verbose: int = 0,
    ):
        if isinstance(save_freq, bool) or not isinstance(save_freq, (int, np.integer)) or save_freq < 0:
            raise ValueError(f"`save_freq` (rollouts between checkpoints) must be an integer >= 0, got {save_freq!r}.")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"`keep_last` must be None (keep all) or >= 1, got {keep_last}.")
        super().__init__(int(save_freq), save_path, name_prefix, save_vecnormalize=save_vecnormalize, verbose=verbose)
        self.state_callbacks = flatten_callbacks(callbacks)
        for callback in self.state_callbacks:
            callback_state(callback)  # fail now, not at the first save
        self.extra_state = extra_state
        self.keep_last = keep_last
        self.stop_requested = False
        self.stopped = False
        self.last_checkpoint: str | None = None
        self._boundary_state: dict[str, Any] | None = None
        self._rollout_ended = False
        self._last_saved_timesteps: int | None = None

    def _init_callback(self) -> None:
        if not isinstance(self.model, OnPolicyAlgorithm):
            raise ValueError(
                f"AtomicCheckpointCallback needs an on-policy algorithm (PPO, A2C, TRPO, REINFORCE), got "
                f"{type(self.model).__name__}: use SB3's CheckpointCallback."
            )
        # no folder until the first save; temporary files of killed runs are garbage
        if os.path.isdir(self.save_path):
            pattern = re.compile(rf"^\.tmp-(\d+)-{re.escape(self.name_prefix)}_")
            for name in os.listdir(self.save_path):
                match = pattern.match(name)
                if match and int(match.group(1)) != os.getpid():
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(self.save_path, name))

    @property
    def rollout_size(self) -> int:
        """Transitions per rollout, ``n_steps * n_envs``."""
        return self.model.n_steps * self.model.n_envs  # type: ignore[attr-defined]

    def request_stop(self) -> None:
        """End training at the next step (safe to call from a signal handler); then call :meth:`save_last_boundary`."""
        self.stop_requested = True

    def _on_training_start(self) -> None:
        self._last_saved_timesteps = self.model.num_timesteps  # a resumed run does not save its starting point again
        self.stopped = False
        self._boundary_state = None
        self._rollout_ended = False

    def _at_boundary(self) -> None:
        self._boundary_state = capture_training_state(self.model, self.state_callbacks, self.extra_state)
        n_rollouts = self.model.num_timesteps // self.rollout_size
        due = self.save_freq > 0 and n_rollouts > 0 and n_rollouts % self.save_freq == 0
        if due and self.model.num_timesteps != self._last_saved_timesteps:
            self._save(self._boundary_state)

    def _on_rollout_start(self) -> None:
        self._rollout_ended = False
        self._at_boundary()

    def _on_rollout_end(self) -> None:
        self._rollout_ended = True

    def _on_step(self) -> bool:
        if self.stop_requested:
            self.stopped = True  # learn() ends inside this rollout: the last boundary is where to resume from
            return False
        return True

    def _on_training_end(self) -> None:
        if self._rollout_ended:  # the last rollout's update has run: this is a boundary
            self._at_boundary()

    def save_last_boundary(self) -> str:
        """
        Write the checkpoint of the last rollout boundary (after an interrupted ``learn``: the weights have not changed
        since, the steps of the rollout in progress are dropped).

        :return: the checkpoint's path
        :raises RuntimeError: if no rollout has started
        """
        if self._boundary_state is None:
            raise RuntimeError("No rollout has started: there is no state to checkpoint.")
        return self._save(self._boundary_state)

    def _path(self, checkpoint_type: str, extension: str, num_timesteps: int) -> str:
        return os.path.join(self.save_path, f"{self.name_prefix}_{checkpoint_type}{num_timesteps}_steps.{extension}")

    def _save(self, state: dict[str, Any]) -> str:
        num_timesteps = int(state["model"]["num_timesteps"])
        if not all(bool(th.isfinite(p).all()) for p in self.model.policy.parameters()):
            raise FloatingPointError(
                f"The weights hold NaN or infinite values after the update that ended at num_timesteps={num_timesteps}: "
                f"no checkpoint written (the last one is {self.last_checkpoint or 'none from this run'}). "
                "Resume from the last checkpoint with a lower learning rate (CLI: --resume --learning-rate ...)."
            )
        path = save_checkpoint(self.model, self._path("", "zip", num_timesteps), state)
        normalize = self.model.get_vec_normalize_env()
        if self.save_vecnormalize and normalize is not None:
            atomic_write(self._path("vecnormalize_", "pkl", num_timesteps), normalize.save)
        self._last_saved_timesteps = num_timesteps
        self.last_checkpoint = path
        if self.verbose >= 2:
            print(f"Saving model checkpoint to {path}")
        if self.keep_last is not None:
            for steps, old in list_checkpoints(self.save_path, self.name_prefix)[: -self.keep_last]:
                for stale in (old, self._path("vecnormalize_", "pkl", steps)):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(stale)
        return path
