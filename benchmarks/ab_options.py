"""Variants of the main job that the learning benchmark tries as A/B rows (``--config NAME:ab.KEY=VALUE``) and the
library does not offer, since they gained nothing at a bounded KL (docs/learning.md has the rows):

- ``ab.normalize_scores=True``: :class:`ScoreNormalization`, the scores normalised by their running mean and std;
- ``ab.value_warmup_rollouts=N``: :class:`ValueWarmup`, the value head trained alone for the first N rollouts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

#: the ``ab.KEY`` options and their types
AB_OPTIONS: dict[str, type] = {"normalize_scores": bool, "value_warmup_rollouts": int}


class ScoreNormalization(VecEnvWrapper):
    """
    The reward of each finished episode's last step (its score, less any missing-EOS penalty) normalised by the running
    mean and standard deviation of those rewards: ``(r - mean) / sqrt(var + epsilon)``, the statistics first updated with
    the step's finished episodes (SB3's :class:`~stable_baselines3.common.running_mean_std.RunningMeanStd`). Ziegler et
    al. (2019), "Fine-Tuning Language Models from Human Preferences", normalise their reward model to mean 0 and
    variance 1 over the initial policy's samples; this is the running form. The other steps' rewards (0 for a
    sequence-level reward) are left as they are, and so is ``info["score"]``.

    Put it outermost (the algorithm's rewards), where an ended episode has ``done`` and ``info["score"]``.

    :param venv: text-generation environments (e.g. from :func:`~sb3_textrl.main_job.make_env`)
    :param epsilon: added to the variance (default 1e-8)
    """

    def __init__(self, venv: VecEnv, epsilon: float = 1e-8):
        super().__init__(venv)
        self.score_rms = RunningMeanStd(shape=())
        self.epsilon = epsilon

    def reset(self):
        return self.venv.reset()

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        ended = np.array([bool(done) and "score" in info for done, info in zip(dones, infos)])
        if ended.any():
            rewards = np.array(rewards, dtype=np.float64)
            self.score_rms.update(rewards[ended])
            rewards[ended] = (rewards[ended] - self.score_rms.mean) / np.sqrt(self.score_rms.var + self.epsilon)
            rewards = rewards.astype(np.float32)
        return obs, rewards, dones, infos


class ValueWarmup(BaseCallback):
    """
    Train the value head alone for the first ``rollouts`` updates: the LM's trainable weights are frozen
    (``requires_grad=False``) from the end of the first rollout to the end of rollout ``rollouts + 1``, so that the
    policy's first updates use advantages from a value head fitted to the returns rather than one that starts at zero.

    :param rollouts: how many updates train the value head alone (>= 0)
    """

    def __init__(self, rollouts: int):
        super().__init__()
        self.rollouts = int(rollouts)
        self.n_rollouts = 0
        self._lm_weights: list[th.nn.Parameter] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if not self._lm_weights:  # the LM's trainable weights, once (LoRA: the adapters only)
            self._lm_weights = [p for p in self.model.policy.lm.parameters() if p.requires_grad]
        self.n_rollouts += 1
        frozen = self.n_rollouts <= self.rollouts
        for weight in self._lm_weights:
            weight.requires_grad_(not frozen)


def ab_options(settings: dict[str, Any]) -> dict[str, Any]:
    """
    ``{KEY: value}`` for the ``ab.KEY`` settings, checked against :data:`AB_OPTIONS`.

    :raises ValueError: for an unknown key or a value of another type
    """
    options = {}
    for key, value in settings.items():
        if key not in AB_OPTIONS:
            raise ValueError(f"`ab.{key}`: not an A/B option of the benchmark, use one of {sorted(AB_OPTIONS)}.")
        if not isinstance(value, AB_OPTIONS[key]):
            raise ValueError(f"`ab.{key}={value!r}`: give a {AB_OPTIONS[key].__name__}.")
        options[key] = value
    return options
