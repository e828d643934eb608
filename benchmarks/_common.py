"""What the benchmarks share: the main job's training prompts in a vectorized TextGeneration-v0."""

from __future__ import annotations

from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnv

import sb3_textrl  # noqa: F401  (registers the env and "LMPolicy")
from sb3_textrl.cli import packaged_prompts, read_prompts


def make_env(model: str, n_envs: int, max_new_tokens: int, n_prompts: int | None = None) -> VecEnv:
    """``n_envs`` seeded copies of ``TextGeneration-v0`` over the packaged training prompts (the first ``n_prompts``)."""
    prompts = read_prompts(packaged_prompts("prompts_train.txt"), "--prompts")[:n_prompts]
    env_kwargs = dict(model_name_or_path=model, prompts=prompts, max_new_tokens=max_new_tokens, render_mode=None)
    return make_vec_env("sb3_textrl/TextGeneration-v0", n_envs=n_envs, seed=0, env_kwargs=env_kwargs)
