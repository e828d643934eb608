"""Categorical maths over full-vocabulary logits: the LM head's product, log-probs and entropies with a lean backward,
and fast sampling."""

from __future__ import annotations

import torch as th

__all__ = ["lm_head_logits", "log_prob_and_entropy", "sample_categorical"]


def lm_head_logits(hidden: th.Tensor, weight: th.Tensor, bias: th.Tensor | None = None) -> th.Tensor:
    """
    ``hidden @ weight.T + bias``, as ``nn.functional.linear``, computed as ``(weight @ hidden.T).T`` on a CPU.

    The LM head's weight (``(vocab_size, hidden_size)``) does not fit in any cache, so its product is bound by how fast
    the matrix library streams it: on a CPU, MKL's kernel for ``weight @ hidden.T`` can stream it faster than the one
    ``linear`` picks (``hidden @ weight.T``), for a rollout step's few rows as for a training minibatch. On other
    devices, and for ``hidden`` of another rank than 2, this is ``linear``. The results equal ``linear``'s up to float
    rounding (another order of summation).

    :param hidden: ``(batch, hidden_size)`` float
    :param weight: ``(vocab_size, hidden_size)``, same dtype and device
    :param bias: ``(vocab_size,)`` or ``None`` (default)
    :return: logits ``(batch, vocab_size)`` in ``hidden``'s dtype, contiguous
    """
    if hidden.device.type != "cpu" or hidden.dim() != 2:
        return th.nn.functional.linear(hidden, weight, bias)
    logits = th.mm(weight, hidden.t()).t().contiguous()
    return logits if bias is None else logits + bias


class _LogProbEntropy(th.autograd.Function):
    """
    ``log softmax(logits)[action]`` and the entropy ``-sum p log p`` per row, saving only the logits for backward.

    ``torch.distributions.Categorical`` keeps the normalised logits, the probabilities, their clamped copy and more
    for autograd: about four ``(batch, vocab_size)`` tensors. This keeps one and recomputes the softmax in backward.
    Gradients (``z`` the logits, ``p`` their softmax, ``H`` the entropy): ``d log p_a / dz_j = 1[j = a] - p_j`` and
    ``dH / dz_j = -p_j (log p_j + H)``.
    """

    @staticmethod
    def forward(ctx, logits: th.Tensor, actions: th.Tensor):
        lse = th.logsumexp(logits, dim=-1)
        log_prob = logits.gather(1, actions[:, None]).squeeze(1) - lse
        entropy = lse - (th.softmax(logits, dim=-1) * logits).sum(dim=-1)
        ctx.save_for_backward(logits, actions, lse, entropy)
        return log_prob, entropy

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy):
        logits, actions, lse, entropy = ctx.saved_tensors
        if grad_log_prob is None:
            grad_log_prob = th.zeros_like(lse)
        log_p = logits - lse[:, None]
        weight = grad_log_prob[:, None]
        if grad_entropy is not None:
            weight = weight + grad_entropy[:, None] * (log_p + entropy[:, None])
        grad = log_p.exp_().mul_(weight).neg_()
        grad.scatter_add_(1, actions[:, None], grad_log_prob[:, None])
        return grad, None


def log_prob_and_entropy(logits: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """
    Log-probabilities of ``actions`` and entropies of the categorical distributions with these logits.

    :param logits: ``(batch, vocab_size)`` float, finite
    :param actions: ``(batch,)`` int64 token ids
    :return: ``log_prob`` and ``entropy``, each ``(batch,)`` in the logits' dtype (nats); equal to
        ``Categorical(logits=logits).log_prob(actions)`` and ``.entropy()``, gradients included
    """
    return _LogProbEntropy.apply(logits, actions.long())


def sample_categorical(probs: th.Tensor) -> th.Tensor:
    """
    One token per row, drawn with probability ``probs`` (inverse transform sampling: one uniform number per row).

    ``torch.multinomial`` (what ``Categorical.sample`` and ``generate`` use) draws one exponential random number per
    *category*; this draws one per row, then runs a cumulative sum and a binary search. The cumulative sum is float64,
    so the rounding of a vocabulary's worth of float32 terms does not bias the draw. Draws from the global torch
    generator of ``probs``' device (``torch.manual_seed`` makes them reproducible).

    Source: the inversion method (Devroye 1986, "Non-Uniform Random Variate Generation", chapter II.2).

    :param probs: ``(batch, n)`` float, non-negative, rows summing to ~1 (a softmax; each row is scaled by its sum)
    :return: ``(batch,)`` int64 indices; categories of probability 0 are never drawn
    """
    cdf = probs.double().cumsum(dim=-1)
    u = th.rand((probs.shape[0], 1), dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    # first category whose cumulative probability exceeds u: category i covers [cdf[i-1], cdf[i])
    return th.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
