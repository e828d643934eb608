"""Reward functions: score completions, batched.

A reward function is any callable ``(prompts: list[str], completions: list[str]) -> list[float]`` returning one
score per completion. Built-in ones are available by name through :func:`get_reward_fn`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


class VaderSentiment:
    """
    VADER compound sentiment of each completion, in [-1, 1] (the prompt is ignored).

    Source: Hutto & Gilbert (2014), "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text",
    with the lexicon shipped in the ``vaderSentiment`` package.
    """

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [float(self.analyzer.polarity_scores(text)["compound"]) for text in completions]

    def __deepcopy__(self, memo: dict) -> VaderSentiment:
        return self  # stateless after construction: share the lexicon between copies


REWARD_REGISTRY: dict[str, Callable[[], RewardFn]] = {
    "vader": VaderSentiment,
}


def get_reward_fn(reward_fn: str | RewardFn) -> RewardFn:
    """
    Resolve a reward function given by name or as a callable.

    :param reward_fn: a name from :data:`REWARD_REGISTRY` or a callable ``(prompts, completions) -> list[float]``
    :return: the callable
    :raises ValueError: for an unknown name or an object that is not callable
    """
    if isinstance(reward_fn, str):
        if reward_fn not in REWARD_REGISTRY:
            raise ValueError(
                f"Unknown `reward_fn={reward_fn!r}`: use one of {sorted(REWARD_REGISTRY)} "
                "or pass a callable (prompts: list[str], completions: list[str]) -> list[float]."
            )
        return REWARD_REGISTRY[reward_fn]()
    if not callable(reward_fn):
        raise ValueError(
            f"`reward_fn` must be a reward name ({sorted(REWARD_REGISTRY)}) or a callable "
            f"(prompts: list[str], completions: list[str]) -> list[float], got {type(reward_fn).__name__}."
        )
    return reward_fn


def reward_name(reward_fn: RewardFn) -> str:
    return getattr(reward_fn, "__name__", type(reward_fn).__name__)


def score_completions(reward_fn: RewardFn, prompts: list[str], completions: list[str]) -> list[float]:
    """
    Call ``reward_fn`` on a batch and check what it returns.

    :return: one finite Python float per completion
    :raises ValueError: naming the reward function and the prompt, if it returns the wrong number of scores,
        a non-number, NaN or infinity
    """
    scores = reward_fn(list(prompts), list(completions))
    try:
        scores = list(scores)
    except TypeError as error:
        raise ValueError(
            f"`reward_fn` ({reward_name(reward_fn)}) must return a list of floats, got {type(scores).__name__}."
        ) from error
    if len(scores) != len(completions):
        raise ValueError(
            f"`reward_fn` ({reward_name(reward_fn)}) returned {len(scores)} scores for {len(completions)} completions: "
            "it must return exactly one float per completion."
        )
    checked = []
    for prompt, score in zip(prompts, scores):
        if isinstance(score, np.ndarray) and score.ndim == 0:
            score = score.item()
        if not isinstance(score, numbers.Real):  # Python and NumPy ints/floats; not strings, tensors or None
            raise ValueError(
                f"`reward_fn` ({reward_name(reward_fn)}) returned {score!r} for prompt {prompt!r}: scores must be numbers."
            )
        value = float(score)
        if not math.isfinite(value):
            raise ValueError(
                f"`reward_fn` ({reward_name(reward_fn)}) returned {value} for prompt {prompt!r}: scores must be finite."
            )
        checked.append(value)
    return checked
