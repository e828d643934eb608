"""A learned reward model: any ``AutoModelForSequenceClassification`` saved in a local directory."""

from __future__ import annotations

import os

import torch as th

from sb3_textrl.rewards._models import ModelBackedReward, check_batching, load_pretrained, resolve_device

__all__ = ["REWARD_MODEL_OUTPUTS", "SequenceClassifierReward"]

#: what :class:`SequenceClassifierReward` returns per completion
REWARD_MODEL_OUTPUTS = ("logit", "probability", "log_probability")


class SequenceClassifierReward(ModelBackedReward):
    """
    The score of a sequence classifier (a reward model) for each completion, optionally paired with its prompt.

    Paper: Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences",
    https://arxiv.org/abs/1909.08593 (a reward model with a scalar head over the LM's last token), and
    Ouyang et al. (2022), "Training language models to follow instructions with human feedback",
    https://arxiv.org/abs/2203.02155. Any ``AutoModelForSequenceClassification`` works: a reward model with one
    logit (``num_labels=1``), or a classifier such as a sentiment model, choosing one label.

    Range: ``output="logit"``: the raw logit, unbounded (its scale is the model's); ``"probability"``: in [0, 1], the
    softmax over the labels (the sigmoid of the logit when ``num_labels == 1``); ``"log_probability"``: in
    (-inf, 0]. Scores are computed in float32, whatever the model's dtype on disk.

    Batching: completions are scored ``batch_size`` at a time, right-padded (decoder models such as
    ``LlamaForSequenceClassification`` read the last non-pad token); each text is cut to ``max_length`` tokens
    (``truncation=True``), and an empty completion is scored as a single EOS (or pad) token.

    Registered as ``"reward_model"``.

    :param model_name_or_path: a local directory written by ``save_pretrained`` (model and tokenizer); never downloaded
    :param label: which logit is the score: an index, a label name from ``config.id2label`` (e.g. ``"POSITIVE"``),
        or ``None`` for a model with a single logit
    :param output: ``"logit"``, ``"probability"`` or ``"log_probability"`` of ``label``
    :param pair_with_prompt: encode ``(prompt, completion)`` as a text pair (the tokenizer's pair format, e.g.
        ``[CLS] prompt [SEP] completion [SEP]`` for BERT, concatenation for GPT-2/Llama) instead of the completion alone
    :param batch_size: completions per forward pass
    :param device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``...
    :param max_length: the most tokens per (paired) text; default: the tokenizer's ``model_max_length`` (capped at 512)
    :raises ValueError: if the model cannot be loaded, or ``label``, ``output``, ``batch_size`` or ``max_length`` is invalid
    """

    name = "reward_model"

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        label: int | str | None = None,
        output: str = "logit",
        pair_with_prompt: bool = False,
        batch_size: int = 16,
        device: th.device | str = "auto",
        max_length: int | None = None,
    ):
        self._init_kwargs = dict(
            model_name_or_path=model_name_or_path,
            label=label,
            output=output,
            pair_with_prompt=pair_with_prompt,
            batch_size=batch_size,
            device=device,
            max_length=max_length,
        )
        if output not in REWARD_MODEL_OUTPUTS:
            raise ValueError(f"Unknown `output={output!r}`: use one of {REWARD_MODEL_OUTPUTS}.")
        check_batching(batch_size, max_length)
        self.device = resolve_device(device)
        self.model, self.tokenizer = load_pretrained("AutoModelForSequenceClassification", model_name_or_path, self.device)
        if getattr(self.model.config, "pad_token_id", None) is None:  # needed to find the last token of right-padded rows
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label = self._label_index(label)
        self.output = output
        self.pair_with_prompt = bool(pair_with_prompt)
        self.batch_size = batch_size
        context = self.tokenizer.model_max_length
        self.max_length = max_length if max_length is not None else (int(context) if context and context < 512 else 512)
        self._filler_id = (
            self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.pad_token_id
        )

    def _label_index(self, label: int | str | None) -> int:
        config = self.model.config
        n_labels = int(config.num_labels)
        labels = {int(i): str(name) for i, name in (config.id2label or {}).items()}
        if label is None:
            if n_labels != 1:
                raise ValueError(
                    f"The model has {n_labels} labels {labels}: choose the one that is the score with `label=` (an index "
                    "or a label name)."
                )
            return 0
        if isinstance(label, str):
            matches = [i for i, name in labels.items() if name == label] or [
                i for i, name in labels.items() if name.lower() == label.lower()
            ]
            if len(matches) != 1:
                raise ValueError(f"`label={label!r}` is not one of the model's labels {labels}: pass one of them or an index.")
            return matches[0]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n_labels:
            raise ValueError(f"`label={label!r}` must be a label index in [0, {n_labels}) or a label name from {labels}.")
        return label

    def _encode(self, prompts: list[str], completions: list[str]) -> dict[str, th.Tensor]:
        kwargs = dict(truncation=True, max_length=self.max_length)
        if self.pair_with_prompt:
            encoded = self.tokenizer(prompts, completions, **kwargs)
        else:
            encoded = self.tokenizer(completions, **kwargs)
        rows = [ids if len(ids) > 0 else [self._filler_id] for ids in encoded["input_ids"]]
        width = max(len(ids) for ids in rows)
        batch = {
            "input_ids": th.full((len(rows), width), int(self.model.config.pad_token_id), dtype=th.long),
            "attention_mask": th.zeros((len(rows), width), dtype=th.long),
        }
        if "token_type_ids" in encoded:  # BERT-style pairs: segment ids matter
            batch["token_type_ids"] = th.zeros((len(rows), width), dtype=th.long)
        for i, ids in enumerate(rows):  # right padding: decoder classifiers read the last non-pad token
            batch["input_ids"][i, : len(ids)] = th.tensor(ids)
            batch["attention_mask"][i, : len(ids)] = 1
            if "token_type_ids" in batch and encoded["input_ids"][i]:
                batch["token_type_ids"][i, : len(ids)] = th.tensor(encoded["token_type_ids"][i])
        return {key: value.to(self.device) for key, value in batch.items()}

    @th.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            batch = self._encode(prompts[start : start + self.batch_size], completions[start : start + self.batch_size])
            logits = self.model(**batch).logits.float()  # (batch, num_labels)
            if self.output == "logit":
                values = logits[:, self.label]
            elif logits.shape[-1] == 1:
                values = th.nn.functional.logsigmoid(logits[:, 0])
            else:
                values = th.log_softmax(logits, dim=-1)[:, self.label]
            if self.output == "probability":
                values = values.exp()
            scores.extend(values.cpu().tolist())
        return scores
