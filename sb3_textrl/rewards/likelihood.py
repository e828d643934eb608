"""LM likelihood: how probable a scorer language model finds each completion, given its prompt."""

from __future__ import annotations

import os

import torch as th

from sb3_textrl.rewards._models import ModelBackedReward, check_batching, load_pretrained, resolve_device

__all__ = ["LIKELIHOOD_OUTPUTS", "LMLikelihood"]

#: what :class:`LMLikelihood` returns per completion
LIKELIHOOD_OUTPUTS = ("mean_log_prob", "neg_perplexity")


class LMLikelihood(ModelBackedReward):
    """
    Mean log-probability (or negative perplexity) of each completion's tokens under a scorer causal LM, given the
    prompt: ``(1/T) sum_t log p(y_t | prompt, y_<t)``.

    Source: the per-token log-likelihood behind perplexity (Jelinek et al. 1977, "Perplexity - a measure of the
    difficulty of speech recognition tasks", https://doi.org/10.1121/1.2016299), here as a fluency reward.

    Range: ``output="mean_log_prob"``: (-inf, 0] nats per token (0: every token certain); ``"neg_perplexity"``:
    ``-exp(-mean_log_prob)``, in (-inf, -1]. Computed in float32.

    The prompt is encoded as the environment does (chat template when the scorer's tokenizer has one, unless
    ``use_chat_template=False``), the completion text is re-tokenized with the scorer's tokenizer, without special
    tokens. An empty completion is scored by the log-probability of EOS right after the prompt (so that stopping at
    once is not a free 0); ``append_eos=True`` scores EOS after every completion.

    Batching: ``batch_size`` (prompt, completion) rows per forward pass, right-padded; a row longer than
    ``max_length`` loses its first prompt tokens (and, if the completion alone is too long, its last tokens).

    Registered as ``"lm_likelihood"``.

    :param model_name_or_path: the scorer LM: an alias, a ``.gguf`` file or a local ``save_pretrained`` directory
        (see :func:`sb3_textrl.lm.loading.resolve_model`); often the policy's initial model
    :param output: ``"mean_log_prob"`` or ``"neg_perplexity"``
    :param append_eos: also score the scorer's EOS token after each completion
    :param use_chat_template: format the prompt with the scorer's chat template (default: when it has one)
    :param system_prompt: optional system message for the chat template
    :param batch_size: rows per forward pass
    :param device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``...
    :param max_length: the most tokens per row; default: the tokenizer's ``model_max_length`` (capped at 2048)
    :raises ValueError: if the model cannot be loaded or an argument is invalid
    """

    name = "lm_likelihood"

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        output: str = "mean_log_prob",
        append_eos: bool = False,
        use_chat_template: bool | None = None,
        system_prompt: str | None = None,
        batch_size: int = 8,
        device: th.device | str = "auto",
        max_length: int | None = None,
    ):
        self._init_kwargs = dict(
            model_name_or_path=model_name_or_path,
            output=output,
            append_eos=append_eos,
            use_chat_template=use_chat_template,
            system_prompt=system_prompt,
            batch_size=batch_size,
            device=device,
            max_length=max_length,
        )
        if output not in LIKELIHOOD_OUTPUTS:
            raise ValueError(f"Unknown `output={output!r}`: use one of {LIKELIHOOD_OUTPUTS}.")
        check_batching(batch_size, max_length)
        self.device = resolve_device(device)
        self.model, self.tokenizer = load_pretrained("AutoModelForCausalLM", model_name_or_path, self.device)
        has_template = self.tokenizer.chat_template is not None
        if use_chat_template and not has_template:
            raise ValueError(
                "`use_chat_template=True` but the scorer's tokenizer has no chat template: pass use_chat_template=False."
            )
        self.use_chat_template = has_template if use_chat_template is None else bool(use_chat_template)
        self.system_prompt = system_prompt
        self.output = output
        self.append_eos = bool(append_eos)
        self.batch_size = batch_size
        context = self.tokenizer.model_max_length
        self.max_length = max_length if max_length is not None else (int(context) if context and context < 2048 else 2048)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"The scorer's tokenizer (`model_name_or_path={model_name_or_path!r}`) has no EOS token.")
        self.eos_token_id = int(eos)

    def _row(self, prompt: str, completion: str) -> tuple[list[int], int]:
        """Token ids of prompt + completion, and the number of scored (completion) tokens at the end."""
        from sb3_textrl.lm.tokens import encode_prompt

        prompt_ids = encode_prompt(self.tokenizer, prompt, self.use_chat_template, self.system_prompt)
        completion_ids = [int(i) for i in self.tokenizer(completion, add_special_tokens=False)["input_ids"]]
        if self.append_eos or not completion_ids:
            completion_ids.append(self.eos_token_id)
        completion_ids = completion_ids[: self.max_length - 1]
        prompt_ids = prompt_ids[-(self.max_length - len(completion_ids)) :] or [self.eos_token_id]
        return prompt_ids + completion_ids, len(completion_ids)

    @th.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            rows = [
                self._row(p, c)
                for p, c in zip(prompts[start : start + self.batch_size], completions[start : start + self.batch_size])
            ]
            width = max(len(ids) for ids, _ in rows)
            input_ids = th.full((len(rows), width), int(self.tokenizer.pad_token_id), dtype=th.long)
            attention_mask = th.zeros((len(rows), width), dtype=th.long)
            scored = th.zeros((len(rows), width - 1), dtype=th.bool)  # over the targets input_ids[:, 1:]
            for i, (ids, n_scored) in enumerate(rows):
                input_ids[i, : len(ids)] = th.tensor(ids)
                attention_mask[i, : len(ids)] = 1
                scored[i, len(ids) - 1 - n_scored : len(ids) - 1] = True
            input_ids, attention_mask, scored = (
                input_ids.to(self.device),
                attention_mask.to(self.device),
                scored.to(self.device),
            )
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
            token_log_prob = th.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            mean = (token_log_prob * scored).sum(-1) / scored.sum(-1)
            values = -th.exp(-mean) if self.output == "neg_perplexity" else mean
            scores.extend(values.cpu().tolist())
        return scores
