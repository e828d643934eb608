"""Held-out evaluation of an LM policy: completions with ``generate``, their scores, the KL to the reference model,
the perplexity under it, and distinct-n (:func:`evaluate_prompts`, which :class:`~sb3_textrl.LMEvalCallback` runs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch as th
from transformers import PreTrainedModel

from sb3_textrl.lm.loading import eos_token_ids
from sb3_textrl.lm.tokens import encode_prompt, position_ids
from sb3_textrl.policies import CausalLMActorCriticPolicy
from sb3_textrl.rewards import RewardFn, get_reward_fn, is_per_token, score_completions

__all__ = ["EvaluationResult", "distinct_n", "evaluate_prompts", "generate_tokens", "left_pad", "sequence_log_prob"]


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[th.Tensor, th.Tensor]:
    """
    Left-pad token id lists into one batch.

    :param sequences: the token ids of each row (a row may be empty)
    :param pad_token_id: the id of the padding slots
    :return: ``input_ids`` and ``attention_mask``, both ``(len(sequences), max_len)`` int64 on CPU, ``max_len`` the
        longest row's length; the mask is 1 on the tokens, 0 on the padding
    """
    width = max(len(s) for s in sequences)
    input_ids = th.full((len(sequences), width), pad_token_id, dtype=th.long)
    attention_mask = th.zeros((len(sequences), width), dtype=th.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            input_ids[row, width - len(seq) :] = th.as_tensor(list(seq), dtype=th.long)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask


@th.no_grad()
def generate_tokens(
    lm: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    do_sample: bool,
) -> list[list[int]]:
    """
    Complete a batch of prompts with ``lm.generate`` (KV cache), sampling from the full softmax (temperature 1,
    no top-k/top-p: the policy's own distribution) or greedily.

    :param lm: the causal LM (on any device: the prompts follow its parameters)
    :param prompt_ids: the token ids of each prompt (left-padded together)
    :param max_new_tokens: the most tokens generated per prompt
    :param eos_token_ids: the ids that end a completion
    :param pad_token_id: the id of the padding slots
    :param do_sample: sample (``True``) or take the most probable token (``False``)
    :return: the generated token ids of each prompt, up to and including the first EOS
    """
    device = next(lm.parameters()).device
    input_ids, attention_mask = left_pad(prompt_ids, pad_token_id)
    output = lm.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=1.0 if do_sample else None,
        top_k=0 if do_sample else None,
        top_p=1.0 if do_sample else None,
        eos_token_id=list(eos_token_ids),
        pad_token_id=pad_token_id,
        use_cache=True,
        # one rank generates alone (rank 0 evaluates): transformers would otherwise make every step a collective
        # when the LM is FSDP-wrapped (`sb3_textrl.distributed.fsdp`)
        synced_gpus=False,
    )
    completions = []
    for row in output[:, input_ids.shape[1] :].tolist():
        ends = [i for i, token in enumerate(row) if token in eos_token_ids]
        completions.append(row[: ends[0] + 1] if ends else row)
    return completions


@th.no_grad()
def sequence_log_prob(
    lm: PreTrainedModel, prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_token_id: int
) -> np.ndarray:
    """
    Sum over each completion's tokens of ``log p(token | prompt, previous tokens)`` under ``lm``, in one forward pass
    (rows left-padded, log-softmax in float32).

    :param lm: the causal LM
    :param prompt_ids: the token ids of each prompt
    :param completions: the token ids of each prompt's completion (an empty one scores 0)
    :param pad_token_id: the id of the padding slots
    :return: ``(batch,)`` float64 log-probabilities (nats), ``batch = len(completions)``
    """
    device = next(lm.parameters()).device
    input_ids, attention_mask = left_pad([list(p) + list(c) for p, c in zip(prompt_ids, completions)], pad_token_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    positions = position_ids(attention_mask)
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False).logits
    log_probs = th.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    totals = []
    for row, completion in enumerate(completions):
        n = len(completion)
        totals.append(float(log_probs[row, log_probs.shape[1] - n :].sum()) if n else 0.0)
    return np.asarray(totals)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """
    Distinct-n: unique word n-grams over all word n-grams of the texts (Li et al. 2016, "A Diversity-Promoting
    Objective Function for Neural Conversation Models", https://arxiv.org/abs/1510.03055), in [0, 1]; ``nan`` when the
    texts hold no n-gram. Words are split on whitespace; n-grams do not cross texts.

    :param texts: the texts
    :param n: the n-gram order (1: distinct-1)
    :return: the fraction of distinct n-grams
    """
    ngrams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else float("nan")


@dataclass
class EvaluationResult:
    """
    Held-out evaluation: mean scores (greedy, sampled; the reward's units), KL to the reference model (nats per
    completion), perplexity of the sampled completions under the reference model, distinct-1/2 of the sampled
    completions (all Python floats, ``nan`` when undefined), and ``samples``: for each prompt, a dict with ``prompt``,
    ``greedy``, ``greedy_score``, ``sampled`` and ``sampled_score``.
    """

    reward_greedy: float
    reward_sampled: float
    kl: float
    samples: list[dict[str, str | float]] = field(default_factory=list)
    ref_perplexity: float = float("nan")
    distinct_1: float = float("nan")
    distinct_2: float = float("nan")


def evaluate_prompts(
    policy: CausalLMActorCriticPolicy,
    prompts: Sequence[str],
    reward_fn: str | RewardFn = "vader",
    max_new_tokens: int = 32,
    reward_kwargs: dict | None = None,
    n_samples: int = 1,
    use_chat_template: bool | None = None,
    system_prompt: str | None = None,
    batch_size: int = 16,
) -> EvaluationResult:
    """
    Evaluate an LM policy on held-out prompts, with the same prompt formatting as ``TextGeneration-v0``.

    :param policy: the policy to evaluate (its reference model gives the KL)
    :param prompts: held-out prompts
    :param reward_fn: reward name or callable, as in the environment (default ``"vader"``; completion-level: a
        per-token reward is refused)
    :param max_new_tokens: completion length limit, in tokens (default 32)
    :param reward_kwargs: keyword arguments of a named reward, as in the environment
    :param n_samples: sampled completions per prompt (default 1; the greedy one is unique)
    :param use_chat_template: format prompts with the tokenizer's chat template (default: when it has one)
    :param system_prompt: optional system message for the chat template
    :param batch_size: prompts per ``generate`` call (default 16)
    :return: mean greedy reward, mean sampled reward, mean KL (nats per completion, k1 estimate over the sampled
        completions: sum of ``log pi - log pi_ref``; ``nan`` without reference model), the perplexity of the sampled
        completions under the reference model (``exp`` of minus the mean token log-probability), their distinct-1 and
        distinct-2, and, for each prompt, its greedy and first sampled completion with their scores
    :raises ValueError: for a per-token reward, or a reward name or ``reward_kwargs`` that
        :func:`~sb3_textrl.rewards.get_reward_fn` refuses
    """
    reward_fn = get_reward_fn(reward_fn, reward_kwargs)
    if is_per_token(reward_fn):
        raise ValueError("`reward_fn` is a per-token reward: evaluate_prompts needs a completion-level reward.")
    tokenizer = policy.tokenizer
    use_chat_template = tokenizer.chat_template is not None if use_chat_template is None else use_chat_template
    eos = eos_token_ids(policy.model_name_or_path)  # the same ends as the environment's
    pad = int(tokenizer.pad_token_id)
    encoded = [encode_prompt(tokenizer, p, use_chat_template, system_prompt) for p in prompts]
    greedy_scores, sampled_scores, kls = [], [], []
    ref_total, n_tokens, sampled_texts = 0.0, 0, []
    samples: list[dict[str, str | float]] = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[start : start + batch_size])
        batch_ids = encoded[start : start + batch_size]
        greedy = generate_tokens(policy.lm, batch_ids, max_new_tokens, eos, pad, do_sample=False)
        greedy_text = [tokenizer.decode(c, skip_special_tokens=True) for c in greedy]
        greedy_batch = score_completions(reward_fn, batch_prompts, greedy_text)
        greedy_scores += greedy_batch
        first_sampled: list[tuple[str, float]] = []
        for k in range(n_samples):
            sampled = generate_tokens(policy.lm, batch_ids, max_new_tokens, eos, pad, do_sample=True)
            sampled_text = [tokenizer.decode(c, skip_special_tokens=True) for c in sampled]
            scores = score_completions(reward_fn, batch_prompts, sampled_text)
            sampled_scores += scores
            sampled_texts += sampled_text
            if policy.reference_model is not None:
                with policy.reference_context():
                    ref_log_prob = sequence_log_prob(policy.reference_model, batch_ids, sampled, pad)
                kl = sequence_log_prob(policy.lm, batch_ids, sampled, pad) - ref_log_prob
                kls += kl.tolist()
                ref_total += float(ref_log_prob.sum())
                n_tokens += sum(len(c) for c in sampled)
            if k == 0:
                first_sampled = list(zip(sampled_text, scores))
        for prompt, g_text, g_score, (s_text, s_score) in zip(batch_prompts, greedy_text, greedy_batch, first_sampled):
            samples.append(
                {"prompt": prompt, "greedy": g_text, "greedy_score": g_score, "sampled": s_text, "sampled_score": s_score}
            )
    return EvaluationResult(
        reward_greedy=float(np.mean(greedy_scores)),
        reward_sampled=float(np.mean(sampled_scores)),
        kl=float(np.mean(kls)) if kls else float("nan"),
        samples=samples,
        ref_perplexity=float(np.exp(-ref_total / n_tokens)) if n_tokens else float("nan"),
        distinct_1=distinct_n(sampled_texts, 1),
        distinct_2=distinct_n(sampled_texts, 2),
    )
