"""Reference-based rewards: BLEU and chrF (``sacrebleu``), ROUGE-1/2/L (``rouge-score``) against per-prompt references.

References come as a mapping ``{prompt: [reference, ...]}`` or from a JSONL file with one object per line::

    {"prompt": "Translate to French: the cat.", "references": ["le chat.", "Le chat."]}

read by :func:`load_prompts_with_references`, which also returns the prompts for the environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

__all__ = [
    "ROUGE_MEASURES",
    "ROUGE_TYPES",
    "BLEUReward",
    "ChrFReward",
    "ReferenceReward",
    "RougeReward",
    "load_prompts_with_references",
]

#: the ROUGE variants :class:`RougeReward` computes
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
#: which score of a ROUGE variant is the reward
ROUGE_MEASURES = ("fmeasure", "precision", "recall")


def load_prompts_with_references(path: str | os.PathLike) -> tuple[list[str], dict[str, list[str]]]:
    """
    Read prompts and their references from a JSONL file.

    Each non-blank line is an object ``{"prompt": str, "references": [str, ...]}`` (a single string is taken as one
    reference). A prompt that appears on several lines keeps all their references.

    :param path: the ``.jsonl`` file
    :return: the prompts, in file order and without repeats (for the environment's ``prompts``), and the mapping
        from each prompt to its references (for the reference-based rewards' ``references``)
    :raises ValueError: naming the file and line, if the file is missing or a line is not such an object
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"`path={path!r}` is not a file: pass a JSONL file of {{'prompt': ..., 'references': [...]}} lines.")
    references: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error}).") from error
            if not isinstance(record, dict) or "prompt" not in record or "references" not in record:
                raise ValueError(
                    f"{path}, line {number}: expected an object with keys 'prompt' and 'references', got {line.strip()!r}."
                )
            prompt, refs = record["prompt"], record["references"]
            refs = [refs] if isinstance(refs, str) else refs
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{path}, line {number}: 'prompt' must be a non-empty string, got {prompt!r}.")
            if not isinstance(refs, list) or len(refs) == 0 or not all(isinstance(r, str) for r in refs):
                raise ValueError(f"{path}, line {number}: 'references' must be a non-empty list of strings, got {refs!r}.")
            references.setdefault(prompt, []).extend(refs)
    if not references:
        raise ValueError(f"{path} holds no prompts: write one {{'prompt': ..., 'references': [...]}} object per line.")
    return list(references), references


def _check_references(references) -> dict[str, list[str]]:
    if isinstance(references, (str, os.PathLike)):
        return load_prompts_with_references(references)[1]
    if not isinstance(references, Mapping) or len(references) == 0:
        raise ValueError(
            "`references` must be a non-empty mapping {prompt: [reference, ...]} or the path of a JSONL file of "
            f"{{'prompt': ..., 'references': [...]}} lines, got {type(references).__name__}."
        )
    checked = {}
    for prompt, refs in references.items():
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, Sequence) or len(refs) == 0 or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"`references[{prompt!r}]` must be a non-empty list of strings, got {refs!r}.")
        checked[str(prompt)] = list(refs)
    return checked


class ReferenceReward:
    """
    Base of the rewards that compare each completion with the references of its prompt.

    :param references: a mapping ``{prompt: [reference, ...]}``, or the path of a JSONL file read by
        :func:`load_prompts_with_references`
    :raises ValueError: if ``references`` is not such a mapping or file
    """

    name = "reference"

    def __init__(self, references: Mapping[str, Sequence[str]] | str | os.PathLike):
        self.references = _check_references(references)

    def references_for(self, prompt: str) -> list[str]:
        """The references of ``prompt``; a ``ValueError`` naming the prompt if it has none."""
        refs = self.references.get(prompt)
        if refs is None:
            raise ValueError(
                f"The prompt {prompt!r} has no references in `references` of the reward {self.name!r} "
                f"({len(self.references)} prompts have some): add it to the references file, or train on the prompts "
                "that `load_prompts_with_references` returns."
            )
        return refs

    def sentence_score(self, completion: str, references: list[str]) -> float:
        """
        The score of one completion against its prompt's references (implemented by each subclass).

        :raises NotImplementedError: in this base class
        """
        raise NotImplementedError

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [
            self.sentence_score(completion, self.references_for(prompt)) for prompt, completion in zip(prompts, completions)
        ]


class BLEUReward(ReferenceReward):
    """
    Sentence-level BLEU of each completion against its prompt's references, divided by 100: in [0, 1].

    Paper: Papineni et al. (2002), "BLEU: a Method for Automatic Evaluation of Machine Translation",
    https://aclanthology.org/P02-1040/, as implemented by ``sacrebleu`` (Post 2018, "A Call for Clarity in Reporting
    BLEU Scores", https://aclanthology.org/W18-6319/): ``BLEU(effective_order=True).sentence_score``, the geometric
    mean of the modified 1- to 4-gram precisions (only the orders the sentence has) with ``exp`` smoothing, times the
    brevity penalty; several references count n-grams against each and take the closest reference length.

    Batching: none needed (pure Python). Registered as ``"bleu"``.

    :param references: ``{prompt: [reference, ...]}`` or a JSONL path (see :func:`load_prompts_with_references`)
    :param tokenize: sacrebleu's tokenizer (``"13a"``, ``"intl"``, ``"zh"``, ``"ja-mecab"``, ``"char"``, ``"none"``...)
    :param lowercase: compare lowercased text
    :param smooth_method: ``"exp"``, ``"floor"``, ``"add-k"`` or ``"none"``
    """

    name = "bleu"

    def __init__(
        self,
        references: Mapping[str, Sequence[str]] | str | os.PathLike,
        tokenize: str = "13a",
        lowercase: bool = False,
        smooth_method: str = "exp",
    ):
        super().__init__(references)
        from sacrebleu.metrics import BLEU

        try:
            self.metric = BLEU(tokenize=tokenize, lowercase=lowercase, smooth_method=smooth_method, effective_order=True)
        except (AssertionError, KeyError, RuntimeError) as error:
            raise ValueError(
                f"Invalid sacrebleu BLEU option (`tokenize={tokenize!r}`, `smooth_method={smooth_method!r}`): {error}"
            ) from error

    def sentence_score(self, completion: str, references: list[str]) -> float:
        return self.metric.sentence_score(completion, references).score / 100.0


class ChrFReward(ReferenceReward):
    """
    Sentence-level chrF (or chrF++) of each completion against its prompt's references, divided by 100: in [0, 1].

    Paper: Popović (2015), "chrF: character n-gram F-score for automatic MT evaluation",
    https://aclanthology.org/W15-3049/ (chrF++: Popović 2017, https://aclanthology.org/W17-4770/), as implemented by
    ``sacrebleu``'s ``CHRF``: the F-beta score (beta = 2, recall weighted twice as much) of character n-grams up to
    ``char_order``, plus word n-grams up to ``word_order`` (2 for chrF++); with several references, the best one.

    Batching: none needed (pure Python). Registered as ``"chrf"``.

    :param references: ``{prompt: [reference, ...]}`` or a JSONL path (see :func:`load_prompts_with_references`)
    :param char_order: character n-gram order (6)
    :param word_order: word n-gram order (0 for chrF, 2 for chrF++)
    :param beta: weight of recall relative to precision
    :param lowercase: compare lowercased text
    """

    name = "chrf"

    def __init__(
        self,
        references: Mapping[str, Sequence[str]] | str | os.PathLike,
        char_order: int = 6,
        word_order: int = 0,
        beta: int = 2,
        lowercase: bool = False,
    ):
        super().__init__(references)
        from sacrebleu.metrics import CHRF

        self.metric = CHRF(char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase)

    def sentence_score(self, completion: str, references: list[str]) -> float:
        return self.metric.sentence_score(completion, references).score / 100.0


class RougeReward(ReferenceReward):
    """
    ROUGE-1, ROUGE-2 or ROUGE-L of each completion against its prompt's references: in [0, 1].

    Paper: Lin (2004), "ROUGE: A Package for Automatic Evaluation of Summaries", https://aclanthology.org/W04-1013/,
    as implemented by Google's ``rouge-score`` (https://github.com/google-research/google-research/tree/master/rouge):
    unigram (``rouge1``) or bigram (``rouge2``) overlap, or the longest common subsequence (``rougeL``), as an
    F-measure (or precision, or recall); with several references, the best one. Its tokenizer lowercases, keeps only
    ``[a-z0-9]`` and, with ``use_stemmer``, applies the Porter stemmer: it is meant for English.

    Batching: none needed (pure Python). Registered as ``"rouge1"``, ``"rouge2"`` and ``"rougeL"``.

    :param references: ``{prompt: [reference, ...]}`` or a JSONL path (see :func:`load_prompts_with_references`)
    :param rouge_type: ``"rouge1"``, ``"rouge2"`` or ``"rougeL"``
    :param measure: ``"fmeasure"``, ``"precision"`` or ``"recall"``
    :param use_stemmer: Porter-stem words before matching
    """

    def __init__(
        self,
        references: Mapping[str, Sequence[str]] | str | os.PathLike,
        rouge_type: str = "rougeL",
        measure: str = "fmeasure",
        use_stemmer: bool = True,
    ):
        if rouge_type not in ROUGE_TYPES:
            raise ValueError(f"Unknown `rouge_type={rouge_type!r}`: use one of {ROUGE_TYPES}.")
        if measure not in ROUGE_MEASURES:
            raise ValueError(f"Unknown `measure={measure!r}`: use one of {ROUGE_MEASURES}.")
        super().__init__(references)
        from rouge_score.rouge_scorer import RougeScorer

        self.name = rouge_type
        self.rouge_type = rouge_type
        self.measure = measure
        self.scorer = RougeScorer([rouge_type], use_stemmer=use_stemmer)

    def sentence_score(self, completion: str, references: list[str]) -> float:
        return max(getattr(self.scorer.score(ref, completion)[self.rouge_type], self.measure) for ref in references)
