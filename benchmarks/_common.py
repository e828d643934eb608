"""What the benchmarks share: the main job's training prompts in a vectorized TextGeneration-v0, and a PPO iteration
timer."""

from __future__ import annotations

import sys
import time

from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnv

import sb3_textrl  # noqa: F401  (registers the env and "LMPolicy")
from sb3_textrl.envs.prompts import packaged_prompts, read_prompts


def make_env(model: str, n_envs: int, max_new_tokens: int, n_prompts: int | None = None) -> VecEnv:
    """``n_envs`` seeded copies of ``TextGeneration-v0`` over the packaged training prompts (the first ``n_prompts``)."""
    prompts = read_prompts(packaged_prompts("prompts_train.txt"), "--prompts")[:n_prompts]
    env_kwargs = dict(model_name_or_path=model, prompts=prompts, max_new_tokens=max_new_tokens, render_mode=None)
    return make_vec_env("sb3_textrl/TextGeneration-v0", n_envs=n_envs, seed=0, env_kwargs=env_kwargs)


class IterationTimer(BaseCallback):
    """
    Wall-clock seconds of each PPO iteration inside ``learn()``: from one rollout start to the next, the last one
    ending with training.

    :param label: print each iteration's seconds to stderr as it ends, after this label (``None``: silent)
    """

    def __init__(self, label: str | None = None):
        super().__init__()
        self.label = label
        self.starts: list[float] = []

    def _on_rollout_start(self) -> None:
        self.starts.append(time.perf_counter())
        if self.label is not None and len(self.starts) > 1:
            print(f"{self.label} iteration {len(self.starts) - 1}: {self.seconds[-1]:.1f} s", file=sys.stderr)

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        self.starts.append(time.perf_counter())

    @property
    def seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]
