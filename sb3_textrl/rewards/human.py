"""Human scores: from a file of ratings, or typed at the terminal during (small) runs."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Callable
from typing import TextIO

__all__ = ["HumanRatings", "TerminalRater"]


def _key(completion: str) -> str:
    return completion.strip()


class HumanRatings:
    """
    Human ratings read from a file, looked up by (prompt, completion).

    Source: learning from human ratings of samples, as in Christiano et al. (2017), "Deep Reinforcement Learning
    from Human Preferences", https://arxiv.org/abs/1706.03741 and Stiennon et al. (2020), "Learning to summarize from
    human feedback", https://arxiv.org/abs/2009.01325; here the ratings are used directly as rewards, with no reward
    model in between (train one and use ``"reward_model"`` for anything but small, repeated prompt sets).

    The file is JSONL (``.jsonl``/``.json``: one ``{"prompt": ..., "completion": ..., "score": ...}`` per line) or
    CSV (``.csv`` with the header ``prompt,completion,score``). A rating whose prompt is missing or empty applies to
    the completion under any prompt. Completions are matched after stripping surrounding whitespace; several ratings
    of the same pair are averaged. The file is read again when it changes, so that ratings can be added while
    training runs. :class:`TerminalRater` with ``record_path`` writes this format.

    Range: the raters' scale (whatever the file holds). Batching: dictionary look-ups.

    Registered as ``"human_file"``.

    :param path: the ratings file
    :param default: the score of a completion nobody rated; ``None`` (default) makes it an error
    :raises ValueError: naming the file and line, if the file is missing or malformed
    """

    name = "human_file"

    def __init__(self, path: str | os.PathLike, default: float | None = None):
        self.path = os.fspath(path)
        if default is not None and (
            isinstance(default, bool) or not isinstance(default, (int, float)) or not math.isfinite(default)
        ):
            raise ValueError(f"`default` must be a finite number or None, got {default!r}.")
        self.default = default
        self._mtime: float | None = None
        self.ratings: dict[tuple[str | None, str], float] = {}
        self._read()

    def _records(self):
        if not os.path.isfile(self.path):
            raise ValueError(
                f"`path={self.path!r}` is not a file: pass a JSONL file of {{'prompt', 'completion', 'score'}} lines or a CSV "
                "file with the header prompt,completion,score."
            )
        with open(self.path, encoding="utf-8", newline="") as file:
            if self.path.endswith(".csv"):
                reader = csv.DictReader(file)
                if reader.fieldnames is None or not {"completion", "score"} <= set(reader.fieldnames):
                    raise ValueError(
                        f"{self.path}: the CSV header must name the columns prompt,completion,score, got {reader.fieldnames}."
                    )
                for number, row in enumerate(reader, start=2):
                    yield number, row
            else:
                for number, line in enumerate(file, start=1):
                    if line.strip():
                        try:
                            yield number, json.loads(line)
                        except json.JSONDecodeError as error:
                            raise ValueError(f"{self.path}, line {number}: not valid JSON ({error}).") from error

    def _read(self) -> None:
        sums: dict[tuple[str | None, str], list[float]] = {}
        for number, record in self._records():
            if not isinstance(record, dict) or not isinstance(record.get("completion"), str):
                raise ValueError(f"{self.path}, line {number}: expected 'completion' (a string) and 'score', got {record!r}.")
            try:
                score = float(record["score"])
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(
                    f"{self.path}, line {number}: 'score' must be a number, got {record.get('score')!r}."
                ) from error
            if not math.isfinite(score):
                raise ValueError(f"{self.path}, line {number}: 'score' must be finite, got {score}.")
            prompt = record.get("prompt") or None
            sums.setdefault((prompt, _key(record["completion"])), []).append(score)
        self.ratings = {key: sum(values) / len(values) for key, values in sums.items()}
        self._mtime = os.path.getmtime(self.path)

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        if os.path.isfile(self.path) and os.path.getmtime(self.path) != self._mtime:
            self._read()
        scores = []
        for prompt, completion in zip(prompts, completions):
            key = _key(completion)
            score = self.ratings.get((prompt, key), self.ratings.get((None, key), self.default))
            if score is None:
                raise ValueError(
                    f"No rating in {self.path} for the completion {completion!r} of prompt {prompt!r}: add one, or pass "
                    "`default=` for unrated completions."
                )
            scores.append(score)
        return scores


class TerminalRater:
    """
    Ask a person at the terminal to score each finished completion (for small, supervised runs).

    Source: the interactive human-in-the-loop setting of Christiano et al. (2017), "Deep Reinforcement Learning from
    Human Preferences", https://arxiv.org/abs/1706.03741, with direct scores instead of pairwise preferences.

    For each completion of a batch it prints the prompt and the completion, then reads a number in ``[low, high]``
    (asking again after anything else). A pair already rated in this process is not asked again. With
    ``record_path``, each rating is appended to a JSONL file that :class:`HumanRatings` reads, so that a later run can
    reuse them. Use it with :func:`~sb3_textrl.common.vec_env.make_text_vec_env`, so that the batch is rated in the main
    process, and with few steps: every episode waits for a person.

    Range: ``[low, high]`` (default [-1, 1]). Batching: one prompt per completion, in order.

    Registered as ``"human_terminal"``.

    :param low: the lowest allowed score
    :param high: the highest allowed score
    :param record_path: a JSONL file to append the ratings to (``None``: keep them in memory only)
    :param input_fn: reads one line after printing its argument (default: :func:`input`)
    :param output: where to print the completions (default: ``sys.stdout`` at the time of the call)
    :raises ValueError: if ``low >= high``
    """

    name = "human_terminal"

    def __init__(
        self,
        low: float = -1.0,
        high: float = 1.0,
        record_path: str | os.PathLike | None = None,
        input_fn: Callable[[str], str] | None = None,
        output: TextIO | None = None,
    ):
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"`low` ({low}) must be lower than `high` ({high}), both finite.")
        self.low, self.high = float(low), float(high)
        self.record_path = None if record_path is None else os.fspath(record_path)
        self.input_fn = input_fn
        self.output = output
        self.ratings: dict[tuple[str, str], float] = {}

    def _ask(self, prompt: str, completion: str, index: int, total: int) -> float:
        output = self.output or sys.stdout
        read = self.input_fn or input
        print(f"\n[{index}/{total}] Prompt: {prompt}\nCompletion: {completion}", file=output, flush=True)
        while True:
            try:
                answer = read(f"Score in [{self.low:g}, {self.high:g}]: ")
            except EOFError as error:
                raise RuntimeError(
                    "The terminal rater got no input (stdin closed): it needs a person at a terminal. For unattended runs, "
                    "rate into a file and use the reward 'human_file'."
                ) from error
            try:
                score = float(answer)
            except ValueError:
                score = math.nan
            if self.low <= score <= self.high:  # False for nan
                return score
            print(f"Please type a number between {self.low:g} and {self.high:g}.", file=output, flush=True)

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        scores = []
        for index, (prompt, completion) in enumerate(zip(prompts, completions), start=1):
            key = (prompt, _key(completion))
            if key not in self.ratings:
                self.ratings[key] = self._ask(prompt, completion, index, len(completions))
                if self.record_path is not None:
                    with open(self.record_path, "a", encoding="utf-8") as file:
                        record = {"prompt": prompt, "completion": completion, "score": self.ratings[key]}
                        file.write(json.dumps(record) + "\n")
            scores.append(self.ratings[key])
        return scores

    def __deepcopy__(self, memo: dict) -> TerminalRater:
        return self  # one person, one memory of ratings
