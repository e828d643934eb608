"""Prompt files for :class:`~sb3_textrl.envs.text_generation.TextGenerationEnv`: the training and held-out prompts
shipped with sb3_textrl, and a reader for text files with one prompt per line."""

from __future__ import annotations

import os
from importlib import resources

__all__ = ["packaged_prompts", "read_prompts"]


def packaged_prompts(name: str) -> str:
    """
    Path of a prompt file shipped with the package (in ``sb3_textrl/data``).

    :param name: file name: ``"prompts_train.txt"`` (the main job's training prompts) or ``"prompts_eval.txt"``
        (its held-out prompts)
    :return: the file's path (it is not checked to exist: :func:`read_prompts` does)
    """
    return str(resources.files("sb3_textrl") / "data" / name)


def read_prompts(path: str, argument: str) -> list[str]:
    """
    One prompt per non-empty line of a UTF-8 text file, stripped of surrounding whitespace.

    :param path: the text file
    :param argument: how the file was given (e.g. the CLI's ``--prompts``), named in the errors
    :return: the prompts, in file order
    :raises ValueError: if ``path`` is not a file, or holds no prompts
    """
    if not os.path.isfile(path):
        raise ValueError(f"`{argument}`: no such file {path!r}; give a text file with one prompt per line.")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"`{argument}`: {path!r} holds no prompts; give a text file with one prompt per line.")
    return prompts
