"""Shared plumbing for rewards backed by a Hugging Face model: device choice, a per-process model cache, copy rules."""

from __future__ import annotations

import functools
import os

import torch as th

from sb3_textrl.lm.loading import _load, load_tokenizer, model_name, resolve_model

__all__ = ["ModelBackedReward", "check_batching", "load_pretrained", "resolve_device"]


def check_batching(batch_size: int, max_length: int | None = None) -> None:
    """
    Check the batching arguments of a model-backed reward.

    :param batch_size: texts per forward pass
    :param max_length: the most tokens per text (``None``: the reward's default)
    :raises ValueError: unless ``batch_size`` is a positive integer and ``max_length`` is None or an integer >= 2
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"`max_length` must be an integer of at least 2 (or None), got {max_length!r}.")


def resolve_device(device: th.device | str) -> th.device:
    """
    The torch device of a reward's model: ``"auto"`` is CUDA when available, else CPU (as in SB3's ``get_device``).

    :raises ValueError: for a string or object torch does not read as a device
    """
    if device == "auto":
        return th.device("cuda" if th.cuda.is_available() else "cpu")
    try:
        return th.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"`device={device!r}` is not a torch device: use 'auto', 'cpu' or 'cuda'.") from error


@functools.lru_cache(maxsize=8)
def _load_pretrained(loader_name: str, path: str, device: str):
    import transformers

    loader = getattr(transformers, loader_name)
    model = _load("model", loader, resolve_model(path), dtype=th.float32)
    return model.to(device).eval().requires_grad_(False)


def load_pretrained(loader_name: str, model_name_or_path: str | os.PathLike, device: th.device):
    """
    A float32 model in eval mode, without gradients, loaded once per process for each (class, path, device):
    every environment that builds the same reward by name shares it.

    :param loader_name: a ``transformers`` auto class, e.g. ``"AutoModelForSequenceClassification"``
    :param model_name_or_path: a local directory (see :func:`sb3_textrl.lm.loading.resolve_model`); never downloaded
    :param device: where to put the weights
    :return: the model and its tokenizer (which pads with EOS when it has no pad token)
    """
    path = model_name(model_name_or_path)
    return _load_pretrained(loader_name, path, str(device)), load_tokenizer(path)


def _rebuild(cls: type, kwargs: dict):
    return cls(**kwargs)


class ModelBackedReward:
    """
    Base for rewards that hold a model: copies share it (``gym.make`` deep-copies its keyword arguments) and pickles
    (``SubprocVecEnv``, ``model.save``) carry only the constructor arguments, the model being loaded again on the
    other side. Subclasses set ``self._init_kwargs`` to their constructor arguments.
    """

    _init_kwargs: dict

    def __deepcopy__(self, memo: dict):
        return self

    def __reduce__(self):
        return (_rebuild, (type(self), self._init_kwargs))
