"""The reward protocols and the checks every score goes through.

Two kinds of reward functions:

- **Episode rewards** (the default): any callable ``(prompts: list[str], completions: list[str]) -> list[float]``
  returning one score per completion, called once the completion is finished.
- **Per-token (shaped) rewards**: a callable with the attribute ``per_token = True`` (see :func:`per_token_reward`),
  called as ``(prompts: list[str], completion_tokens: list[list[str]]) -> list[list[float]]``, where
  ``completion_tokens[i]`` holds the generated tokens of completion ``i`` so far, each decoded on its own, and the
  result one reward per token. It must be causal (the reward of token ``t`` depends only on tokens ``0..t``): the
  environment calls it after every step and pays the reward of the newest token.

Every call goes through :func:`score_completions` / :func:`score_tokens`, which raise a :class:`RewardError`
(a ``ValueError``) naming the reward and the prompt when the reward raises, returns the wrong number of scores,
a non-number, NaN or infinity.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "PerTokenRewardFn",
    "RewardError",
    "RewardFn",
    "is_per_token",
    "per_token_reward",
    "reward_name",
    "score_completions",
    "score_tokens",
    "term_scores",
]

#: an episode reward: ``(prompts, completions) -> one score per completion``
RewardFn = Callable[[list[str], list[str]], Sequence[float]]
#: a per-token reward: ``(prompts, completion_tokens) -> one list of rewards per completion, one per token``
PerTokenRewardFn = Callable[[list[str], list[list[str]]], Sequence[Sequence[float]]]


class RewardError(ValueError):
    """A reward function failed or returned something that is not one finite float per completion (or token)."""


def reward_name(reward_fn: Callable) -> str:
    """A readable name for a reward: its ``name`` attribute, function name or class name."""
    name = getattr(reward_fn, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(reward_fn, functools.partial):
        return reward_name(reward_fn.func)
    return getattr(reward_fn, "__name__", type(reward_fn).__name__)


def is_per_token(reward_fn: object) -> bool:
    """Whether ``reward_fn`` follows the per-token protocol (``per_token = True``)."""
    return bool(getattr(reward_fn, "per_token", False))


def per_token_reward(fn: PerTokenRewardFn) -> PerTokenRewardFn:
    """
    Mark ``fn`` as a per-token (shaped) reward, as a decorator::

        @per_token_reward
        def no_repeats(prompts, completion_tokens):
            return [[-1.0 if t > 0 and tokens[t] == tokens[t - 1] else 0.0 for t in range(len(tokens))]
                    for tokens in completion_tokens]

    :param fn: a callable ``(prompts, completion_tokens) -> list[list[float]]`` (see the module docstring)
    :return: ``fn`` itself, with ``fn.per_token = True``
    """
    fn.per_token = True  # type: ignore[attr-defined]
    return fn


def term_scores(reward_fn: object, index: int) -> dict[str, float] | None:
    """
    The per-term scores of completion ``index`` in the last call of a reward that keeps them (``last_term_scores``,
    e.g. :class:`~sb3_textrl.rewards.combined.CombinedReward`), for ``info["score_terms"]``; ``None`` for other rewards.
    """
    terms = getattr(reward_fn, "last_term_scores", None)
    if not isinstance(terms, dict) or not terms:
        return None
    return {name: float(scores[index]) for name, scores in terms.items()}


def _describe_prompts(prompts: Sequence[str]) -> str:
    if len(prompts) == 1:
        return f"prompt {prompts[0]!r}"
    shown = ", ".join(repr(p) for p in list(prompts)[:3])
    more = f" and {len(prompts) - 3} more" if len(prompts) > 3 else ""
    return f"prompts [{shown}{more}]"


def _call(reward_fn: Callable, prompts: list[str], completions: list) -> object:
    try:
        return reward_fn(prompts, completions)
    except RewardError:
        raise
    except Exception as error:  # not KeyboardInterrupt: a user stopping the terminal rater stops training
        raise RewardError(
            f"`reward_fn` ({reward_name(reward_fn)}) raised {type(error).__name__}: {error} "
            f"(while scoring {_describe_prompts(prompts)})."
        ) from error


def _as_list(reward_fn: Callable, scores: object, what: str, prompts: Sequence[str]) -> list:
    error: Exception | None = None
    if not isinstance(scores, (str, bytes)):  # a string is iterable but never a list of scores
        try:
            return list(scores)  # type: ignore[call-overload]
        except TypeError as type_error:
            error = type_error
    raise RewardError(
        f"`reward_fn` ({reward_name(reward_fn)}) must return {what}, got {type(scores).__name__} "
        f"(for {_describe_prompts(prompts)})."
    ) from error


def _check_score(reward_fn: Callable, prompt: str, score: object) -> float:
    if isinstance(score, np.ndarray) and score.ndim == 0:
        score = score.item()
    if not isinstance(score, numbers.Real):  # Python and NumPy ints/floats; not strings, tensors or None
        raise RewardError(
            f"`reward_fn` ({reward_name(reward_fn)}) returned {score!r} for prompt {prompt!r}: scores must be numbers."
        )
    value = float(score)
    if not math.isfinite(value):
        raise RewardError(
            f"`reward_fn` ({reward_name(reward_fn)}) returned {value} for prompt {prompt!r}: scores must be finite."
        )
    return value


def score_completions(reward_fn: RewardFn, prompts: list[str], completions: list[str]) -> list[float]:
    """
    Call an episode reward on a batch and check what it returns.

    :param reward_fn: a callable ``(prompts, completions) -> list[float]``
    :param prompts: one prompt per completion
    :param completions: the finished completions
    :return: one finite Python float per completion
    :raises RewardError: (a ``ValueError``) naming the reward function and the prompt, if it raises or returns the
        wrong number of scores, a non-number, NaN or infinity
    """
    prompts, completions = list(prompts), list(completions)
    scores = _as_list(reward_fn, _call(reward_fn, prompts, completions), "a list of floats", prompts)
    if len(scores) != len(completions):
        raise RewardError(
            f"`reward_fn` ({reward_name(reward_fn)}) returned {len(scores)} scores for {len(completions)} completions "
            f"(of {_describe_prompts(prompts)}): it must return exactly one float per completion."
        )
    return [_check_score(reward_fn, prompt, score) for prompt, score in zip(prompts, scores)]


def score_tokens(reward_fn: PerTokenRewardFn, prompts: list[str], completion_tokens: list[list[str]]) -> list[list[float]]:
    """
    Call a per-token reward on a batch and check what it returns.

    :param reward_fn: a per-token reward (``per_token = True``), ``(prompts, completion_tokens) -> list[list[float]]``
    :param prompts: one prompt per completion
    :param completion_tokens: for each completion, its tokens so far, each decoded on its own
    :return: for each completion, one finite Python float per token
    :raises RewardError: naming the reward function and the prompt, if it raises, returns the wrong number of
        lists or of rewards in a list, a non-number, NaN or infinity
    """
    prompts, completion_tokens = list(prompts), [list(tokens) for tokens in completion_tokens]
    rows = _as_list(reward_fn, _call(reward_fn, prompts, completion_tokens), "a list of lists of floats", prompts)
    if len(rows) != len(completion_tokens):
        raise RewardError(
            f"`reward_fn` ({reward_name(reward_fn)}) returned {len(rows)} lists for {len(completion_tokens)} completions "
            f"(of {_describe_prompts(prompts)}): a per-token reward returns one list of rewards per completion."
        )
    checked = []
    for prompt, tokens, row in zip(prompts, completion_tokens, rows):
        row = _as_list(reward_fn, row, "one list of floats per completion", [prompt])
        if len(row) != len(tokens):
            raise RewardError(
                f"`reward_fn` ({reward_name(reward_fn)}) returned {len(row)} rewards for the {len(tokens)} tokens of "
                f"the completion of prompt {prompt!r}: a per-token reward returns one float per token."
            )
        checked.append([_check_score(reward_fn, prompt, value) for value in row])
    return checked
