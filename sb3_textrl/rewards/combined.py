"""A weighted sum of rewards, each term kept for logging."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from sb3_textrl.rewards.base import RewardFn, is_per_token, reward_name, score_completions

__all__ = ["CombinedReward", "RewardSpec"]

#: a term of a combined reward: a reward name from the registry or an episode reward callable
RewardSpec = str | RewardFn


class CombinedReward:
    """
    A weighted sum of episode rewards: ``score = sum_i weight_i * reward_i(prompts, completions)``.

    Source: linear scalarisation of several objectives, see Roijers et al. (2013), "A Survey of Multi-Objective
    Sequential Decision-Making", https://arxiv.org/abs/1402.0590.

    Each term is any reward of :mod:`sb3_textrl.rewards`, by name or object, called once per batch and checked on its
    own (an error names the term). After each call, ``last_term_scores`` maps each term's name to its raw
    (unweighted) score of every completion and ``last_terms`` to their mean: the environment puts the former into
    each finished episode's ``info["score_terms"]``, so that a callback can log every term.

    Range: the weighted sum of the terms' ranges. Batching: each term's own.

    Registered as ``"combined"``, e.g. ``reward_fn="combined", reward_kwargs=dict(terms=[("vader", 1.0),
    ("lm_likelihood", 0.1, dict(model_name_or_path=path))])``.

    :param terms: a mapping ``{reward: weight}`` (e.g. ``{"vader": 1.0, my_reward: 0.5}``), or a list of
        ``(reward, weight)`` or ``(reward, weight, reward_kwargs)`` tuples, where ``reward`` is a name from
        :data:`~sb3_textrl.rewards.REWARD_REGISTRY` or an episode reward callable, and ``reward_kwargs`` the
        arguments of a named reward. Term names are the rewards' names (``"vader"``, ``"bleu"``...), with ``_2``,
        ``_3``... added to repeats.
    :raises ValueError: if ``terms`` is empty or malformed, a weight is not a finite number, or a term is a
        per-token reward
    """

    name = "combined"

    def __init__(self, terms: Mapping[RewardSpec, float] | Sequence[tuple]):
        from sb3_textrl.rewards.registry import get_reward_fn  # the registry lists this class

        items = list(terms.items()) if isinstance(terms, Mapping) else terms
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or len(items) == 0:
            raise ValueError(
                "`terms` must be a non-empty mapping {reward: weight} or list of (reward, weight[, reward_kwargs]) tuples, "
                f"got {terms!r}."
            )
        self.terms: dict[str, tuple[Callable, float]] = {}
        for i, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise ValueError(f"`terms[{i}]` must be (reward, weight) or (reward, weight, reward_kwargs), got {item!r}.")
            spec, weight = item[0], item[1]
            kwargs = item[2] if len(item) == 3 else None
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or weight != weight
                or abs(weight) == float("inf")
            ):
                raise ValueError(f"The weight of `terms[{i}]` ({spec!r}) must be a finite number, got {weight!r}.")
            fn = get_reward_fn(spec, kwargs)
            if is_per_token(fn):
                raise ValueError(f"`terms[{i}]` ({reward_name(fn)}) is a per-token reward: combine only episode rewards.")
            name = spec if isinstance(spec, str) else reward_name(fn)
            unique, n = name, 1
            while unique in self.terms:
                n += 1
                unique = f"{name}_{n}"
            self.terms[unique] = (fn, float(weight))
        self.last_term_scores: dict[str, list[float]] = {}
        self.last_terms: dict[str, float] = {}

    @property
    def weights(self) -> dict[str, float]:
        """Each term's weight, by term name."""
        return {name: weight for name, (_, weight) in self.terms.items()}

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        term_scores = {name: score_completions(fn, prompts, completions) for name, (fn, _) in self.terms.items()}
        self.last_term_scores = term_scores
        self.last_terms = {name: sum(scores) / len(scores) for name, scores in term_scores.items() if scores}
        return [sum(self.terms[name][1] * term_scores[name][i] for name in self.terms) for i in range(len(completions))]

    def __deepcopy__(self, memo: dict) -> CombinedReward:
        return self  # the terms may hold models: copies share them
