"""Reward names: :data:`REWARD_REGISTRY` and :func:`get_reward_fn`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from sb3_textrl.rewards.base import RewardFn
from sb3_textrl.rewards.combined import CombinedReward
from sb3_textrl.rewards.embedding import EmbeddingSimilarity
from sb3_textrl.rewards.human import HumanRatings, TerminalRater
from sb3_textrl.rewards.likelihood import LMLikelihood
from sb3_textrl.rewards.reference import BLEUReward, ChrFReward, RougeReward
from sb3_textrl.rewards.reward_model import SequenceClassifierReward
from sb3_textrl.rewards.sentiment import VaderSentiment

__all__ = ["REWARD_REGISTRY", "check_reward_spec", "get_reward_fn"]

#: name -> constructor; ``get_reward_fn(name, reward_kwargs)`` calls it with ``**reward_kwargs``
REWARD_REGISTRY: dict[str, Callable[..., RewardFn]] = {
    "vader": VaderSentiment,
    "reward_model": SequenceClassifierReward,
    "embedding_similarity": EmbeddingSimilarity,
    "bleu": BLEUReward,
    "chrf": ChrFReward,
    "rouge1": functools.partial(RougeReward, rouge_type="rouge1"),
    "rouge2": functools.partial(RougeReward, rouge_type="rouge2"),
    "rougeL": functools.partial(RougeReward, rouge_type="rougeL"),
    "lm_likelihood": LMLikelihood,
    "human_file": HumanRatings,
    "human_terminal": TerminalRater,
    "combined": CombinedReward,
}


def _factory(reward_fn: str | RewardFn, reward_kwargs: dict | None) -> Callable[[], RewardFn]:
    """Check a reward spec without building it: a function that builds it."""
    if reward_kwargs is not None and not isinstance(reward_kwargs, dict):
        raise ValueError(f"`reward_kwargs` must be a dict of keyword arguments or None, got {type(reward_kwargs).__name__}.")
    if isinstance(reward_fn, str):
        if reward_fn not in REWARD_REGISTRY:
            raise ValueError(
                f"Unknown `reward_fn={reward_fn!r}`: use one of {sorted(REWARD_REGISTRY)} "
                "or pass a callable (prompts: list[str], completions: list[str]) -> list[float]."
            )
        factory = REWARD_REGISTRY[reward_fn]
        kwargs = reward_kwargs or {}
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as error:
            raise ValueError(
                f"`reward_kwargs={kwargs!r}` do not fit the reward {reward_fn!r} ({error}): "
                f"its arguments are {inspect.signature(factory)}."
            ) from error
        return functools.partial(factory, **kwargs)
    if not callable(reward_fn):
        raise ValueError(
            f"`reward_fn` must be a reward name ({sorted(REWARD_REGISTRY)}) or a callable "
            f"(prompts: list[str], completions: list[str]) -> list[float], got {type(reward_fn).__name__}."
        )
    if reward_kwargs:
        raise ValueError(
            f"`reward_kwargs` only applies when `reward_fn` is a name, but `reward_fn` is a {type(reward_fn).__name__}: "
            "build the object with its arguments instead."
        )
    return lambda: reward_fn


def check_reward_spec(reward_fn: str | RewardFn, reward_kwargs: dict | None = None) -> None:
    """
    Check, without building anything, that :func:`get_reward_fn` would accept these arguments.

    :raises ValueError: as :func:`get_reward_fn` does for an unknown name, a non-callable or unfit ``reward_kwargs``
    """
    _factory(reward_fn, reward_kwargs)


def get_reward_fn(reward_fn: str | RewardFn, reward_kwargs: dict | None = None) -> RewardFn:
    """
    Resolve a reward function given by name (built with ``reward_kwargs``) or as a callable.

    :param reward_fn: a name from :data:`REWARD_REGISTRY`, or a callable ``(prompts, completions) -> list[float]``
        (or a per-token reward, see :mod:`sb3_textrl.rewards.base`)
    :param reward_kwargs: keyword arguments of the named reward's constructor, e.g.
        ``get_reward_fn("bleu", dict(references="prompts.jsonl"))``; only with a name
    :return: the callable
    :raises ValueError: for an unknown name, an object that is not callable, or ``reward_kwargs`` that do not fit
    """
    return _factory(reward_fn, reward_kwargs)()
