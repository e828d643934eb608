"""Held-out evaluation of an LM policy: completions with ``generate``, their scores with their spread, the KL to the
reference model, the perplexity under it, and distinct-n (:func:`evaluate_prompts`, which
:class:`~sb3_textrl.LMEvalCallback` runs).

The protocol is built to compare evaluations (before and after training, or two configurations): every prompt gets
``n_samples`` sampled completions and a greedy one, and with a ``seed`` the sampling uses common random numbers (the
same random draws at every evaluation), so that two evaluations differ by their models rather than by sampling noise.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch as th
from transformers import PreTrainedModel

from sb3_textrl.common.validation import check_positive_int
from sb3_textrl.lm.loading import eos_token_ids
from sb3_textrl.lm.tokens import encode_prompt, position_ids
from sb3_textrl.policies import CausalLMActorCriticPolicy
from sb3_textrl.rewards import RewardFn, get_reward_fn, is_per_token, score_completions

__all__ = [
    "EvaluationResult",
    "check_protocol",
    "distinct_n",
    "evaluate_prompts",
    "evaluation_protocol",
    "generate_tokens",
    "left_pad",
    "mean_sem_ci95",
    "paired_difference",
    "restored_rng",
    "seed_draws",
    "sequence_log_prob",
    "t_quantile_975",
]


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
    :param do_sample: sample (``True``: draws from torch's global generators, the CPU's and the LM device's) or take
        the most probable token (``False``: no random draw)
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


#: the 0.975 quantile of Student's t for 1 to 9 degrees of freedom (``scipy.stats.t.ppf(0.975, dof)``, 6 decimals)
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157)


def t_quantile_975(dof: int) -> float:
    """
    The 0.975 quantile of Student's t distribution: the factor of a two-sided 95 % confidence interval on a mean
    (12.706 for 1 degree of freedom, 2.262 for 9, 1.960 in the limit). Tabulated below 10 degrees of freedom, then the
    expansion of Abramowitz & Stegun (1964), 26.7.5, whose error is below 1e-5 there.

    :param dof: degrees of freedom (>= 1)
    :return: the quantile
    """
    check_positive_int(dof, "dof")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959963984540054  # the normal's 0.975 quantile
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3 + g4 / dof**4


def mean_sem_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """
    The mean of ``values``, its standard error and the half-width of its two-sided 95 % confidence interval (Student's
    t with ``n - 1`` degrees of freedom), the values taken as independent draws.

    :param values: the values (``n >= 1``)
    :return: ``mean``, ``sem = std(values, ddof=1) / sqrt(n)`` and ``t_{0.975, n-1} * sem`` (both ``nan`` for one value)
    """
    array = np.asarray(values, dtype=np.float64)
    if len(array) < 2:
        return float(np.mean(array)) if len(array) else float("nan"), float("nan"), float("nan")
    sem = float(np.std(array, ddof=1) / math.sqrt(len(array)))
    return float(np.mean(array)), sem, t_quantile_975(len(array) - 1) * sem


def check_protocol(n_samples: int, seed: int | None, batch_size: int) -> None:
    """
    Check the sampling settings of :func:`evaluate_prompts`.

    :raises ValueError: if ``n_samples`` or ``batch_size`` is not a positive integer, or ``seed`` neither ``None`` nor an
        integer >= 0
    """
    check_positive_int(n_samples, "n_samples", " (sampled completions per prompt)")
    check_positive_int(batch_size, "batch_size", " (prompts per generate call)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"`seed` must be None (fresh random draws) or an integer >= 0 (common random numbers), got {seed!r}.")


def evaluation_protocol(n_prompts: int, n_samples: int, seed: int | None, max_new_tokens: int, batch_size: int) -> dict:
    """
    What defines an evaluation of :func:`evaluate_prompts`, as written to ``results.json``: two evaluations compare
    (their sampled completions share their random draws, with a seed) when their protocols and prompts are equal.

    :return: ``n_prompts``, ``n_samples``, ``seed``, ``max_new_tokens``, ``batch_size``, ``greedy`` (``True``: a greedy
        completion per prompt too) and ``temperature`` (1.0: sampling from the full softmax)
    """
    return dict(
        n_prompts=n_prompts,
        n_samples=n_samples,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        greedy=True,
        temperature=1.0,
    )


@contextlib.contextmanager
def restored_rng(device: th.device | str = "cpu") -> Iterator[None]:
    """
    Leave the global random streams as they were: torch's CPU generator and ``device``'s (an accelerator), numpy's
    global ``RandomState`` and Python's ``random`` are saved on entry and put back on exit, whatever happens inside.

    :param device: the accelerator whose generator is also kept (default ``"cpu"``: the CPU generator only)
    """
    device = th.device(device)
    devices: list[int] = []
    if device.type not in ("cpu", "meta"):
        devices = [th.get_device_module(device.type).current_device() if device.index is None else device.index]
    np_state, py_state = np.random.get_state(), random.getstate()
    with th.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def seed_draws(seed: int, key: Sequence[int], device: th.device | str = "cpu") -> None:
    """
    Seed torch's CPU generator and ``device``'s (an accelerator; other devices are left alone), numpy's global
    ``RandomState`` and Python's ``random`` with one 32-bit seed derived from ``seed`` and ``key`` by numpy's
    ``SeedSequence`` (independent streams for different keys). Call it inside :func:`restored_rng`.

    :param seed: the evaluation's seed (>= 0)
    :param key: what the draws are for, e.g. ``(first prompt index of the batch, sample index)`` (integers >= 0)
    :param device: the accelerator whose generator is seeded too (default ``"cpu"``)
    """
    device = th.device(device)
    value = int(np.random.SeedSequence([int(seed), *map(int, key)]).generate_state(1)[0])
    th.default_generator.manual_seed(value)
    if device.type == "cuda":
        with th.cuda.device(device):  # that device's generator only (th.manual_seed would seed every GPU's)
            th.cuda.manual_seed(value)
    elif device.type not in ("cpu", "meta"):
        th.get_device_module(device.type).manual_seed(value)
    np.random.seed(value)
    random.seed(value)


@dataclass
class EvaluationResult:
    """
    Held-out evaluation (:func:`evaluate_prompts`). Scores are in the reward's units; floats are Python floats, ``nan``
    when undefined; everything is JSON-friendly, for ``results.json``.

    - ``reward_greedy``, ``reward_sampled``: the mean score of the greedy completions and of all sampled completions
    - ``kl``: KL to the reference model (nats per completion); ``ref_perplexity``: perplexity of the sampled completions
      under the reference model; ``distinct_1``, ``distinct_2``: distinct-n of the sampled completions
    - ``samples``: for each prompt, a dict with ``prompt``, ``greedy``, ``greedy_score``, ``sampled`` and
      ``sampled_score`` (its first sampled completion)
    - ``reward_sampled_std``: standard deviation of all ``n_prompts * n_samples`` sampled scores (``ddof=1``)
    - ``reward_sampled_sem``, ``reward_sampled_ci95``: standard error of ``reward_sampled`` and the half-width of its
      95 % confidence interval (Student's t), over prompts: the unit is a prompt's mean over its samples, so they
      measure how much the mean would move with other prompts and other draws
    - ``reward_sampled_per_prompt``: each prompt's mean sampled score (``n_prompts`` floats, in prompt order)
    - ``sampled_scores``: every sampled score, ``n_prompts`` lists of ``n_samples`` floats
    - ``n_samples``, ``seed`` and ``protocol`` (:func:`evaluation_protocol`): how the evaluation was made; ``None``,
      ``None`` and ``{}`` for a result saved before these fields existed
    """

    reward_greedy: float
    reward_sampled: float
    kl: float
    samples: list[dict[str, str | float]] = field(default_factory=list)
    ref_perplexity: float = float("nan")
    distinct_1: float = float("nan")
    distinct_2: float = float("nan")
    reward_sampled_std: float = float("nan")
    reward_sampled_sem: float = float("nan")
    reward_sampled_ci95: float = float("nan")
    reward_sampled_per_prompt: list[float] = field(default_factory=list)
    sampled_scores: list[list[float]] = field(default_factory=list)
    n_samples: int | None = None
    seed: int | None = None
    protocol: dict[str, Any] = field(default_factory=dict)


def paired_difference(before: EvaluationResult, after: EvaluationResult) -> tuple[float, float]:
    """
    The change of the mean sampled reward from ``before`` to ``after``, with the half-width of its 95 % confidence
    interval from the per-prompt differences (paired: the prompt's mean over its samples is the unit; with common random
    numbers the pairs share their random draws, which makes the interval much narrower than either result's own).

    :param before: an evaluation (:func:`evaluate_prompts`)
    :param after: an evaluation of the same prompts with the same protocol
    :return: ``mean(after - before)`` over prompts (the reward's units) and the half-width (``nan`` for one prompt)
    :raises ValueError: if the two protocols differ or a result has no per-prompt scores
    """
    if before.protocol != after.protocol or not before.reward_sampled_per_prompt:
        raise ValueError(
            f"`before` and `after` must be evaluations of the same prompts with the same protocol, got {before.protocol} "
            f"and {after.protocol}: evaluate both with the same evaluate_prompts settings."
        )
    differences = np.subtract(after.reward_sampled_per_prompt, before.reward_sampled_per_prompt)
    mean, _, ci95 = mean_sem_ci95(differences)
    return mean, ci95


class _BatchEvaluation(NamedTuple):
    """What one batch of prompts gives: ``samples`` rows, ``sampled_scores`` (one list of ``n_samples`` per prompt),
    the sampled texts, the KLs (one per sampled completion), the reference log-probability total and its token count."""

    samples: list[dict[str, str | float]]
    sampled_scores: list[list[float]]
    sampled_texts: list[str]
    kls: list[float]
    ref_total: float
    n_tokens: int


def _evaluate_batch(
    policy: CausalLMActorCriticPolicy,
    reward_fn: RewardFn,
    prompts: list[str],
    prompt_ids: list[list[int]],
    start: int,
    max_new_tokens: int,
    n_samples: int,
    seed: int | None,
) -> _BatchEvaluation:
    """The greedy and ``n_samples`` sampled completions of one batch of prompts (the first at index ``start``), scored;
    with a ``seed``, sample ``k`` draws from :func:`seed_draws` keyed ``(start, k)``."""
    tokenizer, lm = policy.tokenizer, policy.lm
    device = next(lm.parameters()).device
    eos = eos_token_ids(policy.model_name_or_path)  # the same ends as the environment's
    pad = int(tokenizer.pad_token_id)
    greedy_text = [
        tokenizer.decode(c, skip_special_tokens=True)
        for c in generate_tokens(lm, prompt_ids, max_new_tokens, eos, pad, do_sample=False)
    ]
    greedy_scores = [float(s) for s in score_completions(reward_fn, prompts, greedy_text)]
    scores, texts, kls, ref_total, n_tokens, first = [], [], [], 0.0, 0, []
    for k in range(n_samples):
        if seed is not None:
            seed_draws(seed, (start, k), device)
        sampled = generate_tokens(lm, prompt_ids, max_new_tokens, eos, pad, do_sample=True)
        sampled_text = [tokenizer.decode(c, skip_special_tokens=True) for c in sampled]
        scores.append([float(s) for s in score_completions(reward_fn, prompts, sampled_text)])
        texts += sampled_text
        if k == 0:
            first = list(zip(sampled_text, scores[0]))
        if policy.reference_model is not None:
            with policy.reference_context():
                ref_log_prob = sequence_log_prob(policy.reference_model, prompt_ids, sampled, pad)
            kls += (sequence_log_prob(lm, prompt_ids, sampled, pad) - ref_log_prob).tolist()
            ref_total += float(ref_log_prob.sum())
            n_tokens += sum(len(c) for c in sampled)
    samples = [
        {"prompt": prompt, "greedy": g_text, "greedy_score": g_score, "sampled": s_text, "sampled_score": s_score}
        for prompt, g_text, g_score, (s_text, s_score) in zip(prompts, greedy_text, greedy_scores, first)
    ]
    per_prompt = [list(row) for row in zip(*scores)]  # (n_samples, batch) -> (batch, n_samples)
    return _BatchEvaluation(samples, per_prompt, texts, kls, ref_total, n_tokens)


def _result(batches: list[_BatchEvaluation], protocol: dict[str, Any]) -> EvaluationResult:
    """The :class:`EvaluationResult` of the evaluated batches, in prompt order, under ``protocol``."""
    sampled_scores = [row for b in batches for row in b.sampled_scores]
    per_prompt = [float(np.mean(row)) for row in sampled_scores]
    _, sem, ci95 = mean_sem_ci95(per_prompt)
    kls = [kl for b in batches for kl in b.kls]
    ref_total, n_tokens = sum(b.ref_total for b in batches), sum(b.n_tokens for b in batches)
    sampled_texts = [text for b in batches for text in b.sampled_texts]
    samples = [s for b in batches for s in b.samples]
    all_scores = np.ravel(sampled_scores)
    return EvaluationResult(
        reward_greedy=float(np.mean([s["greedy_score"] for s in samples])),
        reward_sampled=float(np.mean(all_scores)),
        kl=float(np.mean(kls)) if kls else float("nan"),
        samples=samples,
        ref_perplexity=float(np.exp(-ref_total / n_tokens)) if n_tokens else float("nan"),
        distinct_1=distinct_n(sampled_texts, 1),
        distinct_2=distinct_n(sampled_texts, 2),
        reward_sampled_std=float(np.std(all_scores, ddof=1)) if len(all_scores) > 1 else float("nan"),
        reward_sampled_sem=sem,
        reward_sampled_ci95=ci95,
        reward_sampled_per_prompt=per_prompt,
        sampled_scores=sampled_scores,
        n_samples=protocol["n_samples"],
        seed=protocol["seed"],
        protocol=protocol,
    )


def evaluate_prompts(
    policy: CausalLMActorCriticPolicy,
    prompts: Sequence[str],
    reward_fn: str | RewardFn = "vader",
    max_new_tokens: int = 32,
    reward_kwargs: dict | None = None,
    n_samples: int = 8,
    use_chat_template: bool | None = None,
    system_prompt: str | None = None,
    batch_size: int = 16,
    seed: int | None = 0,
) -> EvaluationResult:
    """
    Evaluate an LM policy on held-out prompts, with the same prompt formatting as ``TextGeneration-v0``.

    Protocol: each prompt gets one greedy completion and ``n_samples`` completions sampled from the policy's full
    softmax (temperature 1, no top-k/top-p), each at most ``max_new_tokens`` tokens. With a ``seed`` the sampling uses
    common random numbers: sample ``k`` of the batch whose first prompt is prompt ``i`` is drawn from generators seeded
    from ``(seed, i, k)`` (:func:`seed_draws`), so every evaluation with the same prompts, ``n_samples``, ``batch_size``
    and ``seed`` draws the same random numbers (torch samples a token as the argmax of its probabilities over fixed
    exponential noise: a model that changed little samples mostly the same tokens), and the difference between two
    evaluations, before and after training or between configurations, comes from the models, not from sampling noise
    (same device and library versions assumed). The global random streams (torch's CPU generator and the LM's
    device's, numpy's, ``random``'s) are left exactly as they were, so evaluating does not change training.
    ``seed=None`` draws fresh random numbers from the global torch generator (which it advances).

    :param policy: the policy to evaluate (its reference model gives the KL)
    :param prompts: held-out prompts (at least one)
    :param reward_fn: reward name or callable, as in the environment (default ``"vader"``; completion-level: a
        per-token reward is refused)
    :param max_new_tokens: completion length limit, in tokens (default 32)
    :param reward_kwargs: keyword arguments of a named reward, as in the environment
    :param n_samples: sampled completions per prompt (default 8; the greedy one is unique)
    :param use_chat_template: format prompts with the tokenizer's chat template (default: when it has one)
    :param system_prompt: optional system message for the chat template
    :param batch_size: prompts per ``generate`` call (default 16; part of the protocol: the random draws depend on it)
    :param seed: seed of the common random numbers (default 0), or ``None`` for fresh draws
    :return: an :class:`EvaluationResult`: mean greedy reward, mean sampled reward with its spread (standard deviation
        over all samples; standard error and 95 % confidence half-width over prompts, each prompt's mean over its
        samples being the unit) and the per-prompt means, mean KL (nats per completion, k1 estimate over the sampled
        completions: sum of ``log pi - log pi_ref``; ``nan`` without reference model), the perplexity of the sampled
        completions under the reference model (``exp`` of minus the mean token log-probability), their distinct-1 and
        distinct-2, for each prompt its greedy and first sampled completion with their scores, and the ``protocol``
    :raises ValueError: for no prompt, a per-token reward, a reward name or ``reward_kwargs`` that
        :func:`~sb3_textrl.rewards.get_reward_fn` refuses, or a bad ``n_samples``, ``batch_size`` or ``seed``
        (:func:`check_protocol`)
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"`prompts` must be a non-empty list of held-out prompts, got {prompts!r}.")
    check_protocol(n_samples, seed, batch_size)
    reward_fn = get_reward_fn(reward_fn, reward_kwargs)
    if is_per_token(reward_fn):
        raise ValueError("`reward_fn` is a per-token reward: evaluate_prompts needs a completion-level reward.")
    tokenizer = policy.tokenizer
    use_chat_template = tokenizer.chat_template is not None if use_chat_template is None else use_chat_template
    encoded = [encode_prompt(tokenizer, p, use_chat_template, system_prompt) for p in prompts]
    device = next(policy.lm.parameters()).device
    batches = []
    with restored_rng(device) if seed is not None else contextlib.nullcontext():
        for start in range(0, len(prompts), batch_size):
            batch_prompts, batch_ids = list(prompts[start : start + batch_size]), encoded[start : start + batch_size]
            batches.append(
                _evaluate_batch(policy, reward_fn, batch_prompts, batch_ids, start, max_new_tokens, n_samples, seed)
            )
    protocol = evaluation_protocol(len(prompts), n_samples, None if seed is None else int(seed), max_new_tokens, batch_size)
    return _result(batches, protocol)
