"""How a run is shown: training and evaluation curves as PNG files (matplotlib's ``Agg`` backend, no display needed),
and sample completions as Markdown tables."""

from __future__ import annotations

import math
import os

import numpy as np

__all__ = ["plot_eval_curves", "plot_rollout_history", "samples_markdown"]


def plot_rollout_history(history: list[dict[str, float]], path: str, title: str = "") -> str:
    """
    Draw the mean score and the KL to the reference model per rollout (see
    :class:`~sb3_textrl.common.callbacks.RolloutHistoryCallback`) into a PNG file: two panels against timesteps
    (tokens), the score (the reward's units) and the KL (nats per episode; left empty when every KL is ``nan``).

    :param history: ``RolloutHistoryCallback.history``: dicts with ``timesteps``, ``score`` and ``kl``
    :param path: the PNG file to write (its folder is created)
    :param title: figure title (default: none)
    :return: ``path``
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["timesteps"] for h in history]
    fig, (ax_score, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_score.plot(steps, [h["score"] for h in history], marker=".", color="tab:blue")
    ax_score.set_xlabel("timesteps (tokens)")
    ax_score.set_ylabel("mean score of finished episodes")
    ax_score.set_title("reward per rollout")
    ax_score.grid(alpha=0.3)
    kls = [h["kl"] for h in history]
    if any(not math.isnan(k) for k in kls):
        ax_kl.plot(steps, kls, marker=".", color="tab:red")
    ax_kl.set_xlabel("timesteps (tokens)")
    ax_kl.set_ylabel("KL to reference (nats / episode)")
    ax_kl.set_title("KL per rollout")
    ax_kl.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_eval_curves(results: list[dict[str, float]], path: str) -> str:
    """
    Draw the held-out evaluation metrics against timesteps (tokens) into a PNG file, one panel per metric: reward (the
    mean sampled reward with a band of its 95 % confidence interval, ``reward_sampled_ci95``, and the greedy reward), KL
    to the reference model (nats per completion), perplexity under the reference model, and distinct-1/2. A metric that
    is ``nan`` at every evaluation is left out of its panel, and so is the band where the half-width is ``nan`` or
    missing (a single prompt, or results saved before it was computed).

    :param results: ``LMEvalCallback.results`` (see :class:`~sb3_textrl.common.callbacks.LMEvalCallback`): dicts with
        ``timesteps`` and the fields of :data:`~sb3_textrl.common.callbacks.EVAL_KEYS`
    :param path: the PNG file to write (its folder must exist)
    :return: ``path``
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["timesteps"] for r in results], dtype=float)
    panels = [("reward", ["reward_sampled", "reward_greedy"]), ("KL to reference (nats)", ["kl"]),
              ("perplexity under reference", ["ref_perplexity"]), ("distinct-n", ["distinct_1", "distinct_2"])]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (title, fields) in zip(axes, panels):
        for field in fields:
            values = np.array([r[field] for r in results], dtype=float)
            if np.all(np.isnan(values)):
                continue
            (line,) = ax.plot(steps, values, marker=".", label=field)
            half = np.array([r.get(f"{field}_ci95", np.nan) for r in results], dtype=float)
            if not np.all(np.isnan(half)):
                ax.fill_between(steps, values - half, values + half, color=line.get_color(), alpha=0.2, linewidth=0,
                                label=f"{field} ± 95% CI")  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("timesteps (tokens)")
        ax.grid(alpha=0.3)
        if len(fields) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def samples_markdown(samples: list[dict[str, str | float]]) -> str:
    """
    A Markdown table of sample completions with their scores: one row per prompt, with its greedy and sampled
    completions (surrounding whitespace stripped, newlines as spaces, ``|`` escaped) and their scores (signed, two
    decimals).

    :param samples: dicts with ``prompt``, ``greedy``, ``greedy_score``, ``sampled`` and ``sampled_score``
        (:attr:`~sb3_textrl.common.evaluation.EvaluationResult.samples`)
    :return: the table, header included, lines joined with ``\\n``
    """
    rows = ["| prompt | greedy | score | sampled | score |", "|---|---|---|---|---|"]
    for s in samples:
        cells = [str(s["prompt"]), str(s["greedy"]).strip(), f"{s['greedy_score']:+.2f}"]
        cells += [str(s["sampled"]).strip(), f"{s['sampled_score']:+.2f}"]
        rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(rows)
