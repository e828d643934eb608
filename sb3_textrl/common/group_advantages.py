"""Group-relative advantages and per-token loss weights, the estimators GRPO and RLOO share (pure numpy).

Paper: https://arxiv.org/abs/2402.03300 (Shao et al. 2024, "DeepSeekMath", section 4: GRPO)

GRPO and RLOO sample ``G`` completions of each prompt and use the other completions of the same prompt as the
baseline, instead of a learned value: :func:`group_advantages` (GRPO's ``(score - group mean) / (group std + eps)``),
:func:`leave_one_out_advantages` (RLOO's), :func:`frac_zero_std`, and :func:`token_loss_weights` (how a per-token
loss is averaged: ``"grpo"``, ``"dr_grpo"``, ``"dapo"``).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "LOSS_TYPES",
    "SCALE_REWARDS",
    "frac_zero_std",
    "group_advantages",
    "leave_one_out_advantages",
    "token_loss_weights",
]


#: the ``scale_rewards`` of :func:`group_advantages`
SCALE_REWARDS = ("group", "batch", "none")
#: the ``loss_type`` of :func:`token_loss_weights`
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def _groups(scores: np.ndarray, group_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scores, inverse, counts)``: float64 scores ``(n,)``, each score's group ``(n,)`` in ``0..n_groups-1`` and the
    group sizes ``(n_groups,)``."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    group_ids = np.asarray(group_ids).reshape(-1)
    if scores.shape != group_ids.shape:
        raise ValueError(
            f"`scores` ({scores.shape[0]}) and `group_ids` ({group_ids.shape[0]}) must have one entry per episode."
        )
    _, inverse, counts = np.unique(group_ids, return_inverse=True, return_counts=True)
    if np.any(counts < 2):
        raise ValueError(
            f"Every group needs at least 2 episodes for a group baseline, but group(s) "
            f"{np.unique(group_ids)[counts < 2].tolist()} have one: use `group_size` >= 2 and whole groups."
        )
    return scores, inverse.reshape(-1), counts


def group_advantages(scores: np.ndarray, group_ids: np.ndarray, scale_rewards: str = "group", eps: float = 1e-4) -> np.ndarray:
    """
    GRPO's group-relative advantages (Shao et al. 2024, https://arxiv.org/abs/2402.03300, eq. 3 and section 4.1.2),
    one per episode: the score minus the mean score of its group, divided by a standard deviation plus ``eps``.

    ``A_i = (s_i - mean_g(i)) / (std + eps)``, where ``mean_g`` is the mean score of the group ``g`` of episode ``i``, and

    - ``scale_rewards="group"`` (default, the paper's): ``std`` is the group's sample standard deviation (``ddof=1``,
      as ``torch.std`` computes it in TRL, verl and OpenRLHF);
    - ``"batch"``: ``std`` is the sample standard deviation of all the scores (TRL's ``scale_rewards="batch"``);
    - ``"none"``: no division, ``A_i = s_i - mean_g(i)`` (Liu et al. 2025, "Understanding R1-Zero-Like Training",
      https://arxiv.org/abs/2503.20783: the std division weighs the prompts unevenly).

    A group whose scores are all equal gets advantages 0.

    :param scores: ``(n_episodes,)`` float, each episode's score (its return)
    :param group_ids: ``(n_episodes,)`` int, the group of each episode (any integers; a group's episodes need not be
        contiguous)
    :param scale_rewards: ``"group"``, ``"batch"`` or ``"none"``
    :param eps: added to the standard deviation (default 1e-4, as TRL)
    :return: ``(n_episodes,)`` float64 advantages
    :raises ValueError: for an unknown ``scale_rewards``, arrays of different lengths, or a group of fewer than 2 episodes
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"`scale_rewards` must be one of {SCALE_REWARDS}, got {scale_rewards!r}.")
    scores, inverse, counts = _groups(scores, group_ids)
    centered = scores - (np.bincount(inverse, weights=scores) / counts)[inverse]
    if scale_rewards == "none":
        return centered
    if scale_rewards == "group":
        std = np.sqrt(np.bincount(inverse, weights=centered**2) / (counts - 1))[inverse]
    else:
        std = np.full_like(scores, scores.std(ddof=1))
    return centered / (std + eps)


def leave_one_out_advantages(scores: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
    """
    RLOO's advantages (Ahmadian et al. 2024, "Back to Basics", https://arxiv.org/abs/2402.14740, eq. 7; Kool et al.
    2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"): each episode's score minus the mean score of the *other*
    episodes of its group,

    ``A_i = s_i - (S_g - s_i) / (n_g - 1) = n_g / (n_g - 1) * (s_i - S_g / n_g)``,

    with ``S_g`` the sum and ``n_g`` the number of scores of the group ``g`` of episode ``i``. The baseline does not
    depend on ``s_i``, so the gradient stays unbiased.

    :param scores: ``(n_episodes,)`` float, each episode's score
    :param group_ids: ``(n_episodes,)`` int, the group of each episode
    :return: ``(n_episodes,)`` float64 advantages
    :raises ValueError: for arrays of different lengths or a group of fewer than 2 episodes
    """
    scores, inverse, counts = _groups(scores, group_ids)
    sums = np.bincount(inverse, weights=scores)[inverse]
    return scores - (sums - scores) / (counts[inverse] - 1)


def frac_zero_std(scores: np.ndarray, group_ids: np.ndarray) -> float:
    """
    The fraction of groups whose episodes all got the same score (standard deviation 0, to ``np.isclose``): their
    group-relative advantages are 0 and they add nothing to the policy gradient (logged as
    ``rollout/frac_reward_zero_std``).

    :param scores: ``(n_episodes,)`` float, each episode's score
    :param group_ids: ``(n_episodes,)`` int, the group of each episode
    :return: a fraction in [0, 1]
    """
    scores, inverse, counts = _groups(scores, group_ids)
    centered = scores - (np.bincount(inverse, weights=scores) / counts)[inverse]
    std = np.sqrt(np.bincount(inverse, weights=centered**2) / counts)
    return float(np.mean(np.isclose(std, 0.0)))


def token_loss_weights(
    episode_lengths: np.ndarray, loss_type: str = "grpo", max_completion_length: int | None = None
) -> np.ndarray:
    """
    The weight of each token's loss ``l_{i,t}`` in a minibatch's loss ``L = sum_i sum_t w_{i,t} l_{i,t}``, for
    ``n`` episodes of lengths ``|o_i|``:

    - ``"grpo"``: ``w = 1 / (n |o_i|)``, the mean over each completion's tokens, then over the completions (Shao et al.
      2024, https://arxiv.org/abs/2402.03300, eq. 3);
    - ``"dr_grpo"``: ``w = 1 / (n * max_completion_length)``: each completion's sum over its tokens divided by a constant,
      so a long completion is not weighed down per token (Liu et al. 2025, https://arxiv.org/abs/2503.20783, eq. 5);
    - ``"dapo"``: ``w = 1 / sum_i |o_i|``, the mean over all the tokens of the minibatch (Yu et al. 2025, "DAPO",
      https://arxiv.org/abs/2503.14476, eq. 8).

    :param episode_lengths: ``(n,)`` int, the length of each episode, in the order in which their tokens are laid out
    :param loss_type: ``"grpo"``, ``"dr_grpo"`` or ``"dapo"``
    :param max_completion_length: the constant of ``"dr_grpo"``, at least the longest episode (unused otherwise)
    :return: ``(sum(episode_lengths),)`` float64 weights, episode after episode; they sum to 1 for ``"grpo"`` and
        ``"dapo"``
    :raises ValueError: for an unknown ``loss_type``, an empty or non-positive length, or a ``max_completion_length``
        missing or shorter than an episode with ``"dr_grpo"``
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"`loss_type` must be one of {LOSS_TYPES}, got {loss_type!r}.")
    lengths = np.asarray(episode_lengths, dtype=np.int64).reshape(-1)
    if lengths.size == 0 or np.any(lengths < 1):
        raise ValueError(f"`episode_lengths` must be positive integers, one per episode, got {lengths.tolist()}.")
    n = lengths.size
    if loss_type == "grpo":
        return np.repeat(1.0 / (n * lengths), lengths)
    if loss_type == "dapo":
        return np.full(int(lengths.sum()), 1.0 / lengths.sum())
    if max_completion_length is None or max_completion_length < lengths.max():
        raise ValueError(
            f"`loss_type='dr_grpo'` divides by `max_completion_length`, which must be at least the longest episode "
            f"({lengths.max()} tokens), got {max_completion_length!r}."
        )
    return np.full(int(lengths.sum()), 1.0 / (n * max_completion_length))
