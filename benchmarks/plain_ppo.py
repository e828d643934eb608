"""A plain PPO loop for LMs in torch + transformers (no SB3), the baseline of ``benchmarks/learning.py``: the classic
recipe of Ziegler et al. 2019 as Huang et al. 2024 spell it out, written CleanRL style (one file, flat loop).

Papers: https://arxiv.org/abs/1909.08593 (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"),
https://arxiv.org/abs/2403.17031 (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO")

Each iteration: ``batch_episodes`` prompts drawn uniformly, one complete episode each from ``model.generate``
(temperature 1, no top-k/top-p, up to ``max_new_tokens`` tokens, ending at the first EOS); one forward of the policy
(log-probs and values) and one of the frozen reference over the whole sequences; per-token rewards
``-kl_coef * (log pi - log pi_ref)`` (k1) plus the completion's score at its last token; GAE over the completion
(no bootstrap: a completion is finished); advantages whitened over the batch; then ``n_epochs`` epochs of shuffled
minibatches of ``batch_size`` whole sequences: clipped surrogate, clipped value loss weighted ``vf_coef``, AdamW,
gradient-norm clipping. The value head is a zero-initialised ``Linear(hidden_size, 1)`` on the LM's last hidden state
(a shared trunk). The LM runs in eval mode throughout (no dropout).

    lm = load_causal_lm("smollm2-135m-instruct")
    loop = PlainPPO(lm, copy.deepcopy(lm), tokenizer, prompt_ids, prompts, reward_fn, eos_ids, PlainPPOArgs(), seed=0)
    stats = loop.iteration()  # {"score": ..., "kl": ..., "generate_s": ..., ...}
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch as th
from torch import nn
from transformers import PreTrainedModel


@dataclass
class PlainPPOArgs:
    batch_episodes: int = 16
    """the complete episodes (prompts, one completion each) per iteration"""
    max_new_tokens: int = 24
    """the most tokens of a completion"""
    temperature: float = 1.0
    """the sampling temperature (no top-k, no top-p)"""
    kl_coef: float = 0.05
    """the coefficient of the per-token k1 KL penalty to the reference model"""
    gamma: float = 1.0
    """the discount factor"""
    gae_lambda: float = 0.95
    """the lambda of the general advantage estimation"""
    clip_range: float = 0.2
    """the surrogate clipping coefficient"""
    clip_range_vf: float = 0.2
    """the value clipping coefficient (around the rollout's values)"""
    vf_coef: float = 0.1
    """the value loss coefficient"""
    learning_rate: float = 1e-5
    """the AdamW learning rate"""
    n_epochs: int = 2
    """the epochs over the batch per iteration"""
    batch_size: int = 8
    """the whole sequences per minibatch"""
    max_grad_norm: float = 1.0
    """the gradient-norm clipping"""


def masked_mean(x: th.Tensor, mask: th.Tensor) -> th.Tensor:
    return (x * mask).sum() / mask.sum()


def masked_whiten(x: th.Tensor, mask: th.Tensor) -> th.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * th.rsqrt(var + 1e-8) * mask


def gae(rewards: th.Tensor, values: th.Tensor, gamma: float, gae_lambda: float) -> th.Tensor:
    """
    Generalized advantage estimates (Schulman et al. 2016, eq. 16) over ``(batch, length)`` completions whose rewards
    and values are 0 after their end, so nothing is bootstrapped.
    """
    advantages = th.zeros_like(rewards)
    lastgaelam = th.zeros(rewards.shape[0], device=rewards.device)
    n = rewards.shape[1]
    for t in reversed(range(n)):
        next_values = values[:, t + 1] if t < n - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * gae_lambda * lastgaelam
        advantages[:, t] = lastgaelam
    return advantages


class PlainPPO:
    """
    PPO on whole episodes from ``model.generate`` (see the module docstring).

    :param lm: the causal LM to train (in place)
    :param ref_lm: the frozen reference LM (the initial weights), for the KL penalty
    :param prompt_ids: the token ids of each training prompt (chat-formatted as the env does)
    :param prompts: the training prompts' text, given to ``reward_fn``
    :param reward_fn: ``(prompts, completions) -> list[float]``, one score per completion
    :param eos_token_ids: the ids that end a completion
    :param pad_token_id: the id of the padding slots
    :param decode: token ids -> text of a completion (special tokens skipped)
    :param args: the hyperparameters
    :param seed: seeds the prompt draws and torch's generator
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        ref_lm: PreTrainedModel,
        prompt_ids: Sequence[Sequence[int]],
        prompts: Sequence[str],
        reward_fn: Callable[[list[str], list[str]], list[float]],
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        decode: Callable[[list[int]], str],
        args: PlainPPOArgs,
        seed: int = 0,
    ):
        self.lm, self.ref_lm, self.args = lm.eval(), ref_lm.eval().requires_grad_(False), args
        self.prompt_ids, self.prompts, self.reward_fn, self.decode = list(prompt_ids), list(prompts), reward_fn, decode
        self.eos, self.pad = th.tensor(list(eos_token_ids)), int(pad_token_id)
        self.device = next(lm.parameters()).device
        self.rng = np.random.default_rng(seed)
        th.manual_seed(seed)
        hidden_size = lm.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden_size, 1, device=self.device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.params = [p for p in [*lm.parameters(), *self.value_head.parameters()] if p.requires_grad]
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = th.optim.AdamW(self.params, lr=args.learning_rate, eps=1e-5, weight_decay=0.0, fused=fused)

    def forward(self, lm: PreTrainedModel, input_ids: th.Tensor, attention_mask: th.Tensor, context: int, values: bool):
        """
        Log-probs of the completion tokens (columns ``context:``) and, with ``values``, the values of the states
        before them: both ``(batch, completion width)`` float32.
        """
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
        width = input_ids.shape[1] - context
        out = lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            output_hidden_states=values,
            logits_to_keep=width + 1,
            use_cache=False,
        )
        logits = out.logits[:, :-1].float() / self.args.temperature
        log_probs = th.log_softmax(logits, dim=-1).gather(2, input_ids[:, context:, None]).squeeze(2)
        if not values:
            return log_probs, None
        hidden = out.hidden_states[-1][:, context - 1 : -1]
        return log_probs, self.value_head(hidden.float()).squeeze(2)

    def iteration(self) -> dict[str, float]:
        """One PPO iteration: rollout, advantages, update. Returns the batch's mean score, KL and the seconds of each part."""
        args, t0 = self.args, time.perf_counter()
        # ROLLOUT: complete episodes from generate
        draws = self.rng.integers(len(self.prompts), size=args.batch_episodes)
        width = max(len(self.prompt_ids[i]) for i in draws)
        prompt_ids = th.full((len(draws), width), self.pad, dtype=th.long)
        prompt_mask = th.zeros_like(prompt_ids)
        for row, i in enumerate(draws):  # left padding: every completion starts at column `width`
            prompt_ids[row, width - len(self.prompt_ids[i]) :] = th.tensor(self.prompt_ids[i])
            prompt_mask[row, width - len(self.prompt_ids[i]) :] = 1
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
        with th.no_grad():
            output = self.lm.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                max_new_tokens=args.max_new_tokens,
                do_sample=True,
                temperature=args.temperature,
                top_k=0,
                top_p=1.0,
                eos_token_id=self.eos.tolist(),
                pad_token_id=self.pad,
                use_cache=True,
            )
        completion = output[:, width:]
        is_eos = th.isin(completion, self.eos.to(self.device))
        mask = ((is_eos.long().cumsum(1) - is_eos.long()) == 0).float()  # up to and including the first EOS
        lengths = mask.sum(1).long()
        texts = [self.decode(row[:n].tolist()) for row, n in zip(completion, lengths)]
        scores = th.tensor(self.reward_fn([self.prompts[i] for i in draws], texts), dtype=th.float32, device=self.device)
        input_ids, attention_mask = output, th.cat([prompt_mask, mask.long()], dim=1)
        t1 = time.perf_counter()

        # log-probs and values of the policy, log-probs of the reference
        with th.no_grad():
            old_log_probs, old_values = self.forward(self.lm, input_ids, attention_mask, width, values=True)
            ref_log_probs, _ = self.forward(self.ref_lm, input_ids, attention_mask, width, values=False)
        old_values = old_values * mask
        kl = (old_log_probs - ref_log_probs) * mask
        rewards = -args.kl_coef * kl
        rewards[th.arange(len(draws)), lengths - 1] += scores  # the score at the last token

        advantages = gae(rewards, old_values, args.gamma, args.gae_lambda)
        returns = advantages + old_values
        advantages = masked_whiten(advantages, mask)
        t2 = time.perf_counter()

        # UPDATE: n_epochs of minibatches of whole sequences
        clip_fracs = []
        for _ in range(args.n_epochs):
            for mb in th.randperm(len(draws)).split(args.batch_size):
                mb_mask = mask[mb]
                log_probs, values = self.forward(self.lm, input_ids[mb], attention_mask[mb], width, values=True)
                ratio = th.exp(log_probs - old_log_probs[mb])
                pg_loss1 = -advantages[mb] * ratio
                pg_loss2 = -advantages[mb] * th.clamp(ratio, 1 - args.clip_range, 1 + args.clip_range)
                pg_loss = masked_mean(th.max(pg_loss1, pg_loss2), mb_mask)
                values_clipped = old_values[mb] + th.clamp(values - old_values[mb], -args.clip_range_vf, args.clip_range_vf)
                v_loss1 = (values - returns[mb]) ** 2
                v_loss2 = (values_clipped - returns[mb]) ** 2
                v_loss = 0.5 * masked_mean(th.max(v_loss1, v_loss2), mb_mask)
                loss = pg_loss + args.vf_coef * v_loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.params, args.max_grad_norm)
                self.optimizer.step()
                clip_fracs.append(float(masked_mean(((ratio - 1).abs() > args.clip_range).float(), mb_mask)))
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {
            "score": float(scores.mean()),
            "kl": float(kl.sum(1).mean()),  # nats per completion
            "tokens": int(lengths.sum()),
            "clip_fraction": float(np.mean(clip_fracs)),
            "generate_s": t1 - t0,
            "forward_s": t2 - t1,
            "update_s": t3 - t2,
        }


def args_with(overrides: dict) -> PlainPPOArgs:
    """:class:`PlainPPOArgs` with ``overrides`` (field name -> value); unknown names are refused."""
    names = {f.name for f in dataclasses.fields(PlainPPOArgs)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"Unknown plain-loop setting(s) {unknown}: use the fields of PlainPPOArgs, {sorted(names)}.")
    return PlainPPOArgs(**overrides)
