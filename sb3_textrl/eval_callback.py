"""An SB3 callback that evaluates an LM policy on held-out prompts every N rollouts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from sb3_textrl.evaluation import evaluate_prompts
from sb3_textrl.policies import CausalLMActorCriticPolicy
from sb3_textrl.rewards import RewardFn

#: what is logged under ``eval/`` (SB3 logger: stdout, CSV, TensorBoard...), from :class:`EvaluationResult` fields
EVAL_KEYS = {
    "reward_greedy": "eval/reward_greedy",
    "reward_sampled": "eval/reward_sampled",
    "kl": "eval/ref_kl",
    "ref_perplexity": "eval/ref_perplexity",
    "distinct_1": "eval/distinct_1",
    "distinct_2": "eval/distinct_2",
}


class LMEvalCallback(BaseCallback):
    """
    Evaluate an LM policy on held-out prompts every ``eval_freq`` rollouts (:func:`~sb3_textrl.evaluation.evaluate_prompts`).

    Logged to the SB3 logger (so TensorBoard works with ``tensorboard_log``): ``eval/reward_greedy``,
    ``eval/reward_sampled`` (mean scores), ``eval/ref_kl`` (KL to the reference model, nats per completion),
    ``eval/ref_perplexity`` (perplexity of the sampled completions under the reference model), ``eval/distinct_1`` and
    ``eval/distinct_2`` (Li et al. 2016). ``results`` keeps one dict per evaluation (with ``timesteps``) and
    ``last_samples`` the latest table of sample completions; with ``log_path``, the samples are written as Markdown
    (``samples.md``) and the curves as a PNG (``eval_curves.png``) after each evaluation.

    :param prompts: held-out prompts
    :param eval_freq: evaluate every this many rollouts (> 0)
    :param reward_fn: reward name or callable, as in the environment
    :param reward_kwargs: keyword arguments of a named reward
    :param max_new_tokens: completion length limit
    :param n_samples: sampled completions per prompt
    :param n_table: sample completions kept in the table
    :param log_path: folder for ``samples.md`` and ``eval_curves.png`` (optional)
    :param verbose: 1 prints the metrics and the table
    :raises ValueError: for an empty prompt list or ``eval_freq`` < 1, or a policy that is not an ``LMPolicy``
    """

    def __init__(
        self,
        prompts: Sequence[str],
        eval_freq: int = 10,
        reward_fn: str | RewardFn = "vader",
        reward_kwargs: dict | None = None,
        max_new_tokens: int = 32,
        n_samples: int = 1,
        n_table: int = 4,
        log_path: str | None = None,
        verbose: int = 0,
    ):
        super().__init__(verbose)
        if isinstance(prompts, str) or not prompts:
            raise ValueError("`prompts` must be a non-empty list of held-out prompts.")
        if int(eval_freq) < 1:
            raise ValueError(f"`eval_freq` (rollouts between evaluations) must be >= 1, got {eval_freq}.")
        self.prompts = list(prompts)
        self.eval_freq = int(eval_freq)
        self.evaluate_kwargs: dict[str, Any] = dict(
            reward_fn=reward_fn, reward_kwargs=reward_kwargs, max_new_tokens=max_new_tokens, n_samples=n_samples
        )
        self.n_table = n_table
        self.log_path = log_path
        self.results: list[dict[str, float]] = []
        self.last_samples: list[dict[str, str | float]] = []
        self.n_rollouts = 0

    def _init_callback(self) -> None:
        if not isinstance(self.model.policy, CausalLMActorCriticPolicy):
            raise ValueError("LMEvalCallback evaluates an LMPolicy: build the model with PPO('LMPolicy', env).")

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.n_rollouts += 1
        if self.n_rollouts % self.eval_freq == 0:
            self.evaluate()

    def evaluate(self) -> dict[str, float]:
        """Evaluate now, log, and return the metrics."""
        policy: CausalLMActorCriticPolicy = self.model.policy  # type: ignore[assignment]
        training = policy.training
        policy.set_training_mode(False)
        result = evaluate_prompts(policy, self.prompts, **self.evaluate_kwargs)
        policy.set_training_mode(training)
        metrics = {"timesteps": float(self.num_timesteps)}
        for field, key in EVAL_KEYS.items():
            metrics[field] = float(getattr(result, field))
            self.logger.record(key, metrics[field])
        self.results.append(metrics)
        self.last_samples = result.samples[: self.n_table]
        if self.verbose:
            print(f"Eval at {self.num_timesteps} timesteps: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
            print(samples_markdown(self.last_samples))
        if self.log_path is not None:
            os.makedirs(self.log_path, exist_ok=True)
            with open(os.path.join(self.log_path, "samples.md"), "w", encoding="utf-8") as f:
                f.write(f"Samples at {self.num_timesteps} timesteps\n\n{samples_markdown(self.last_samples)}\n")
            plot_eval_curves(self.results, os.path.join(self.log_path, "eval_curves.png"))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (see :mod:`sb3_textrl.checkpoints`)."""
        return {"results": self.results, "last_samples": self.last_samples, "n_rollouts": self.n_rollouts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.results, self.last_samples, self.n_rollouts = state["results"], state["last_samples"], state["n_rollouts"]


def samples_markdown(samples: list[dict[str, str | float]]) -> str:
    """A Markdown table of sample completions with their scores."""
    rows = ["| prompt | greedy | score | sampled | score |", "|---|---|---|---|---|"]
    for s in samples:
        cells = [str(s["prompt"]), str(s["greedy"]).strip(), f"{s['greedy_score']:+.2f}"]
        cells += [str(s["sampled"]).strip(), f"{s['sampled_score']:+.2f}"]
        rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(rows)


def plot_eval_curves(results: list[dict[str, float]], path: str) -> str:
    """Draw the evaluation metrics against timesteps into a PNG (one panel per metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["timesteps"] for r in results]
    panels = [("reward", ["reward_greedy", "reward_sampled"]), ("KL to reference (nats)", ["kl"]),
              ("perplexity under reference", ["ref_perplexity"]), ("distinct-n", ["distinct_1", "distinct_2"])]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (title, fields) in zip(axes, panels):
        for field in fields:
            values = [r[field] for r in results]
            if not all(np.isnan(values)):
                ax.plot(steps, values, marker=".", label=field)
        ax.set_title(title)
        ax.set_xlabel("timesteps (tokens)")
        ax.grid(alpha=0.3)
        if len(fields) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
