"""Stock SB3 algorithms and sb3_textrl's REINFORCE / LMPolicy on the toy environments: a benchmark, not a test.

- ``sb3_textrl/LinearToy-v0`` (continuous control): PPO, A2C, SAC, TD3 and, if sb3-contrib is installed, TRPO,
  all with the stock ``MlpPolicy``.
- ``sb3_textrl/TokenMatch-v0``, modes ``fixed`` and ``copy``: PPO, A2C, REINFORCE and the group methods GRPO and
  RLOO (8 envs in groups of 4 that start each round alike), each with ``MlpPolicy`` and with ``LMPolicy`` on a tiny
  random Llama whose vocabulary is the env's (built here, nothing downloaded).

Each run trains for the same number of environment steps per environment (the budget) and is evaluated with the
greedy policy on the same seeded episodes (``reset(seed=10_000 + i)``) at regular intervals. The table gives the
final evaluation return, mean ± std over the seeds; the PNG draws the learning curves (mean ± std band). Defaults
finish in about 7 minutes on 2 shared CPU cores (428 s measured).

    python benchmarks/compare_sb3.py                    # 3 seeds, writes outputs/compare_sb3/{curves.png,results.json}
    python benchmarks/compare_sb3.py --seeds 1 --scale 0.2   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3 import A2C, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import sb3_textrl  # noqa: F401  (registers the envs and "LMPolicy")
from sb3_textrl import GRPO, REINFORCE, RLOO, make_group_vec_env
from sb3_textrl.testing import build_tiny_lm

try:
    from sb3_contrib import TRPO
except ImportError:  # sb3-contrib is optional
    TRPO = None

LINEAR_TOY = "sb3_textrl/LinearToy-v0"
TOKEN_MATCH = "sb3_textrl/TokenMatch-v0"
TOKEN_MATCH_KWARGS = dict(length=8, vocab_size=16)  # chance 0.5, optimum 8
# LinearToy reference returns (envs/linear_toy.py docstring): a = sign(1 - s) and a uniformly random policy
LINEAR_TOY_OPTIMUM, LINEAR_TOY_CHANCE = -9.3, -114.0


@dataclass
class Case:
    """One (environment, algorithm, policy) cell of the table."""

    env_id: str
    env_kwargs: dict[str, Any]
    label: str  # the panel of the figure
    algo: type[BaseAlgorithm]
    policy: str
    n_envs: int
    algo_kwargs: dict[str, Any] = field(default_factory=dict)
    group_size: int | None = None  # GRPO, RLOO: envs in groups that start each round alike (make_group_vec_env)


def cases(lm_path: str) -> list[Case]:
    small = dict(net_arch=[64, 64])
    off_policy = dict(batch_size=64, learning_starts=500, train_freq=2, gradient_steps=1, policy_kwargs=small)
    out = [
        Case(LINEAR_TOY, {}, "LinearToy", PPO, "MlpPolicy", 4, dict(n_steps=128, batch_size=64, policy_kwargs=small)),
        Case(LINEAR_TOY, {}, "LinearToy", A2C, "MlpPolicy", 4, dict(n_steps=8, policy_kwargs=small)),
        Case(LINEAR_TOY, {}, "LinearToy", SAC, "MlpPolicy", 1, off_policy),
        Case(LINEAR_TOY, {}, "LinearToy", TD3, "MlpPolicy", 1, off_policy),
    ]
    if TRPO is not None:
        out.append(
            Case(LINEAR_TOY, {}, "LinearToy", TRPO, "MlpPolicy", 4, dict(n_steps=128, batch_size=128, policy_kwargs=small))
        )
    on_policy: list[tuple[type[BaseAlgorithm], dict[str, Any]]] = [
        (PPO, dict(n_steps=64, batch_size=64, n_epochs=4, learning_rate=1e-3, ent_coef=0.01)),
        (A2C, dict(n_steps=8, learning_rate=1e-3, ent_coef=0.01)),
        (REINFORCE, dict(n_steps=16, learning_rate=3e-3, ent_coef=0.01)),
    ]
    # one round per rollout: n_steps = the episode length; 2 groups of 4 episodes per round
    group_methods: list[tuple[type[BaseAlgorithm], dict[str, Any]]] = [
        (GRPO, dict(n_steps=TOKEN_MATCH_KWARGS["length"], n_epochs=4, learning_rate=3e-3, ent_coef=0.01)),
        (RLOO, dict(n_steps=TOKEN_MATCH_KWARGS["length"], learning_rate=3e-3, ent_coef=0.01)),
    ]
    lm_kwargs = dict(model_name_or_path=lm_path, use_reference_model=False)
    for mode in ("fixed", "copy"):
        env_kwargs = dict(TOKEN_MATCH_KWARGS, mode=mode)
        for algo, kwargs in on_policy:
            out.append(Case(TOKEN_MATCH, env_kwargs, f"TokenMatch {mode}", algo, "MlpPolicy", 4, kwargs))
            out.append(
                Case(TOKEN_MATCH, env_kwargs, f"TokenMatch {mode}", algo, "LMPolicy", 4, dict(kwargs, policy_kwargs=lm_kwargs))
            )
        for algo, kwargs in group_methods:
            label = f"TokenMatch {mode}"
            out.append(Case(TOKEN_MATCH, env_kwargs, label, algo, "MlpPolicy", 8, kwargs, group_size=4))
            out.append(
                Case(TOKEN_MATCH, env_kwargs, label, algo, "LMPolicy", 8, dict(kwargs, policy_kwargs=lm_kwargs), group_size=4)
            )
    return out


def evaluate(model: BaseAlgorithm, env: gym.Env, n_episodes: int) -> float:
    """Mean return of the greedy policy over the episodes ``reset(seed=10_000 + i)``, the same for every run."""
    returns = []
    for i in range(n_episodes):
        obs, _ = env.reset(seed=10_000 + i)
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


class CurveCallback(BaseCallback):
    """Evaluate every ``eval_freq`` environment steps (and before training) into ``self.curve``."""

    def __init__(self, evaluate_fn: Callable[[], float], eval_freq: int):
        super().__init__()
        self.evaluate_fn = evaluate_fn
        self.eval_freq = eval_freq
        self.curve: list[tuple[int, float]] = []
        self._next = 0

    def _on_training_start(self) -> None:
        self.curve.append((0, self.evaluate_fn()))
        self._next = self.eval_freq

    def _on_step(self) -> bool:
        if self.num_timesteps >= self._next:
            self.curve.append((self.num_timesteps, self.evaluate_fn()))
            self._next += self.eval_freq
        return True


def run(case: Case, seed: int, budget: int, n_points: int, n_eval: int) -> dict[str, Any]:
    env_kwargs = dict(case.env_kwargs)
    if env_kwargs.get("mode") == "fixed":
        env_kwargs["target_seed"] = seed  # one target per seed: the seeds are different problems
    if case.group_size is None:
        env = make_vec_env(case.env_id, n_envs=case.n_envs, seed=seed, env_kwargs=env_kwargs)
    else:
        env = make_group_vec_env(case.env_id, case.n_envs, case.group_size, seed=seed, env_kwargs=env_kwargs)
    eval_env = gym.make(case.env_id, **env_kwargs)
    # a deep copy: SB3's off-policy algorithms write `use_sde` into the policy_kwargs dict they are given
    model = case.algo(case.policy, env, seed=seed, **copy.deepcopy(case.algo_kwargs))
    callback = CurveCallback(lambda: evaluate(model, eval_env, n_eval), eval_freq=budget // n_points)
    start = time.perf_counter()
    model.learn(total_timesteps=budget, callback=callback)
    final = evaluate(model, eval_env, n_eval)
    if callback.curve[-1][0] < model.num_timesteps:
        callback.curve.append((model.num_timesteps, final))
    return {"curve": callback.curve, "final": final, "seconds": time.perf_counter() - start}


def reference_lines(label: str) -> tuple[float, float]:
    """(chance, optimum) returns of a panel."""
    if label == "LinearToy":
        return LINEAR_TOY_CHANCE, LINEAR_TOY_OPTIMUM
    return TOKEN_MATCH_KWARGS["length"] / TOKEN_MATCH_KWARGS["vocab_size"], float(TOKEN_MATCH_KWARGS["length"])


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in results))
    algos = list(dict.fromkeys(r["algo"] for r in results))
    colors = {algo: f"C{i}" for i, algo in enumerate(algos)}  # one colour per algorithm, dashed for LMPolicy
    fig, axes = plt.subplots(1, len(labels), figsize=(5.2 * len(labels), 4.2))
    for ax, label in zip(np.atleast_1d(axes), labels):
        for r in (r for r in results if r["label"] == label):
            steps = np.array([s for s, _ in r["runs"][0]["curve"]])
            n = min(len(run["curve"]) for run in r["runs"])
            values = np.array([[v for _, v in run["curve"][:n]] for run in r["runs"]])
            mean, std = values.mean(axis=0), values.std(axis=0)
            style = dict(color=colors[r["algo"]], linestyle="-" if r["policy"] == "MlpPolicy" else "--")
            ax.plot(steps[:n], mean, label=f"{r['algo']} {r['policy']}", **style)
            ax.fill_between(steps[:n], mean - std, mean + std, alpha=0.12, color=style["color"])
        chance, optimum = reference_lines(label)
        ax.axhline(optimum, color="k", linewidth=0.8, linestyle=":", label="optimum")
        ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="random policy")
        ax.set_title(label)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("greedy evaluation return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the budgets (environment steps)")
    parser.add_argument("--linear-toy-steps", type=int, default=5000)
    parser.add_argument("--token-match-steps", type=int, default=10_000)
    parser.add_argument("--points", type=int, default=10, help="evaluations along each learning curve")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--only", default="", help="run only the cases whose 'env algo policy' contains this text")
    parser.add_argument("--out", default="outputs/compare_sb3")
    args = parser.parse_args()
    th.set_num_threads(1)  # tiny networks: threads cost more than they save

    os.makedirs(args.out, exist_ok=True)
    results = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as lm_dir:
        lm_path = build_tiny_lm(lm_dir, "llama", vocab_size=TOKEN_MATCH_KWARGS["vocab_size"])
        for case in cases(lm_path):
            name = f"{case.label} {case.algo.__name__} {case.policy}"
            if args.only not in name:
                continue
            steps = args.linear_toy_steps if case.env_id == LINEAR_TOY else args.token_match_steps
            budget = int(steps * args.scale)
            runs = [run(case, seed, budget, args.points, args.eval_episodes) for seed in range(args.seeds)]
            finals = np.array([r["final"] for r in runs])
            results.append(
                {
                    "label": case.label,
                    "algo": case.algo.__name__,
                    "policy": case.policy,
                    "budget": budget,
                    "mean": float(finals.mean()),
                    "std": float(finals.std()),
                    "seconds": float(np.mean([r["seconds"] for r in runs])),
                    "runs": runs,
                }
            )
            print(f"{name:40s} {finals.mean():8.2f} ± {finals.std():6.2f}  ({results[-1]['seconds']:.1f} s/run)", flush=True)

    lines = [
        f"| env | algorithm | policy | steps | eval return, mean ± std ({args.seeds} seeds) | random | optimum | s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        chance, optimum = reference_lines(r["label"])
        lines.append(
            f"| {r['label']} | {r['algo']} | {r['policy']} | {r['budget']} | {r['mean']:.2f} ± {r['std']:.2f} "
            f"| {chance:.2f} | {optimum:.2f} | {r['seconds']:.1f} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    png = os.path.join(args.out, "curves.png")
    plot(results, png)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(f"\nlearning curves: {png}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
