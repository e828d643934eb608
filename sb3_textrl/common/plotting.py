"""Training curves as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import math
import os


def plot_rollout_history(history: list[dict[str, float]], path: str, title: str = "") -> str:
    """
    Draw the mean score and the KL to the reference model per rollout (see
    :class:`~sb3_textrl.common.callbacks.RolloutHistoryCallback`) into a PNG file.

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
