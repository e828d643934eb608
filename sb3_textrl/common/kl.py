"""KL divergence to the reference model: per-token estimators and the KL penalty coefficient controllers.

Estimators: Schulman (2020), "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html), which names them
k1, k2 and k3. With samples ``a ~ pi`` and ``log_ratio = log pi(a) - log pi_ref(a)`` (nats), each is an estimate of
``KL(pi || pi_ref)``:

- ``"k1"``: ``log_ratio``, unbiased, can be negative per sample;
- ``"k3"``: ``exp(-log_ratio) - 1 + log_ratio``, unbiased, always >= 0, lower variance.

The blog's k2, ``log_ratio ** 2 / 2``, is biased and not offered.

Controllers: Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences",
https://arxiv.org/abs/1909.08593, section 2.2: the coefficient beta of the KL-penalised reward of their eq. 2,
``R(x, y) = r(x, y) - beta * log(pi(y|x) / rho(y|x))``, either fixed or adapted once per rollout (their log-space
proportional controller) so that the KL per sequence approaches a target.
"""

from __future__ import annotations

import numpy as np
import torch as th

__all__ = ["KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController", "estimate_kl", "k3_kl"]

#: the per-token estimators :func:`estimate_kl` offers
KL_ESTIMATORS = ("k1", "k3")


def estimate_kl(log_prob: np.ndarray, ref_log_prob: np.ndarray, estimator: str = "k1") -> np.ndarray:
    """
    Per-token KL estimate from sampled tokens (k1 or k3 of Schulman's "Approximating KL Divergence", see the module
    docstring).

    :param log_prob: log-probabilities of the sampled tokens under the policy (any shape, float, nats)
    :param ref_log_prob: the same tokens' log-probabilities under the reference model (same shape)
    :param estimator: ``"k1"`` (default) or ``"k3"``
    :return: the per-token estimate, same shape, float64, nats
    :raises ValueError: for an unknown estimator
    """
    log_ratio = np.asarray(log_prob, dtype=np.float64) - np.asarray(ref_log_prob, dtype=np.float64)
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return np.expm1(-log_ratio) + log_ratio
    raise ValueError(f"Unknown KL `estimator={estimator!r}`: use one of {KL_ESTIMATORS}.")


class FixedKLController:
    """
    A constant KL penalty coefficient (beta of Ziegler et al. 2019, eq. 2).

    :param kl_coef: the coefficient beta (>= 0, finite)
    :raises ValueError: if ``kl_coef`` is negative or not finite
    """

    def __init__(self, kl_coef: float):
        if not np.isfinite(kl_coef) or kl_coef < 0:
            raise ValueError(f"`kl_coef` must be a finite number >= 0, got {kl_coef}.")
        self.kl_coef = float(kl_coef)

    def update(self, kl: float, n_episodes: int) -> None:
        """
        Nothing to adapt (the interface of :meth:`AdaptiveKLController.update`).

        :param kl: mean KL per sequence over the rollout (nats)
        :param n_episodes: number of episodes in the rollout
        """


class AdaptiveKLController(FixedKLController):
    """
    The adaptive coefficient beta of eq. 2 of Ziegler et al. (2019), with their log-space proportional controller
    (section 2.2): ``e = clip(KL / target - 1, -0.2, 0.2)``, then ``kl_coef *= 1 + e * n_episodes / horizon``, once per
    rollout (their ``K_beta`` is ``n_episodes / horizon``).

    :param kl_coef: initial coefficient (> 0, default 0.1)
    :param target: target KL per sequence (nats, > 0; default 6.0, as in Ziegler et al.)
    :param horizon: number of episodes over which the coefficient may change by a factor of about ``e``
        (> 0; default 10,000, as in Ziegler et al.)
    :raises ValueError: if an argument is not positive
    """

    def __init__(self, kl_coef: float = 0.1, target: float = 6.0, horizon: int = 10_000):
        super().__init__(kl_coef)
        if not kl_coef > 0:
            raise ValueError(f"`kl_coef` must be > 0 for an adaptive controller, got {kl_coef}.")
        if not np.isfinite(target) or target <= 0:
            raise ValueError(f"`target` (KL per sequence, nats) must be > 0, got {target}.")
        if horizon <= 0:
            raise ValueError(f"`horizon` (episodes) must be > 0, got {horizon}.")
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, kl: float, n_episodes: int) -> None:
        """
        Move the coefficient towards the target: up when ``kl`` is above it, down when below.

        :param kl: mean KL per sequence over the rollout (nats)
        :param n_episodes: number of episodes in the rollout
        """
        error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
        self.kl_coef *= 1.0 + error * n_episodes / self.horizon


def k3_kl(log_prob: th.Tensor, ref_log_prob: th.Tensor) -> th.Tensor:
    """
    The per-token k3 estimate of ``KL(pi || pi_ref)`` that GRPO puts in its loss (Shao et al. 2024, eq. 4; Schulman
    2020, http://joschu.net/blog/kl-approx.html): ``pi_ref / pi - log(pi_ref / pi) - 1``, always >= 0, differentiable in
    ``log_prob``.

    :param log_prob: ``(batch,)`` float, log-probabilities of the sampled tokens under the policy
    :param ref_log_prob: ``(batch,)`` float, the same under the reference model
    :return: ``(batch,)`` float, nats
    """
    log_ratio = ref_log_prob - log_prob
    return th.exp(log_ratio) - log_ratio - 1.0
