"""Lexicon-based sentiment rewards."""

from __future__ import annotations

__all__ = ["VaderSentiment"]


class VaderSentiment:
    """
    VADER compound sentiment of each completion, in [-1, 1] (the prompt is ignored).

    Paper: Hutto & Gilbert (2014), "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text",
    https://ojs.aaai.org/index.php/ICWSM/article/view/14550, with the lexicon shipped in the ``vaderSentiment`` package
    (https://github.com/cjhutto/vaderSentiment).

    The compound score is the sum of the valences of the words (with rules for negation, intensifiers, "but",
    punctuation and capitals), normalised to [-1, 1] by ``x / sqrt(x^2 + 15)``; an empty completion scores 0.
    Rule-based (no batching needed).

    Registered as ``"vader"``.
    """

    name = "vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [float(self.analyzer.polarity_scores(text)["compound"]) for text in completions]

    def __deepcopy__(self, memo: dict) -> VaderSentiment:
        return self  # stateless after construction: share the lexicon between copies
