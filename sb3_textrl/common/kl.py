"""KL divergence to the reference model: per-token estimators and the KL penalty coefficient controllers.

Estimators: Schulman, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html). With samples
``a ~ pi`` and ``log_ratio = log pi(a) - log pi_ref(a)``:

- ``"k1"``: ``log_ratio``, unbiased, can be negative per sample;
- ``"k3"``: ``exp(-log_ratio) - 1 + log_ratio``, unbiased, always >= 0, lower variance.

Controllers: Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences",
https://arxiv.org/abs/1909.08593, section 2.2: a fixed coefficient, or one adapted once per rollout so that the
KL per sequence approaches a target.
"""

from __future__ import annotations

import numpy as np

KL_ESTIMATORS = ("k1", "k3")


def estimate_kl(log_prob: np.ndarray, ref_log_prob: np.ndarray, estimator: str = "k1") -> np.ndarray:
    """
    Per-token KL estimate from sampled tokens.

    :param log_prob: log-probabilities of the sampled tokens under the policy (any shape, float)
    :param ref_log_prob: the same tokens' log-probabilities under the reference model (same shape)
    :param estimator: ``"k1"`` or ``"k3"``
    :return: the per-token estimate, same shape, nats
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
    A constant KL penalty coefficient.

    :param kl_coef: the coefficient beta (>= 0)
    :raises ValueError: if ``kl_coef`` is negative or not finite
    """

    def __init__(self, kl_coef: float):
        if not np.isfinite(kl_coef) or kl_coef < 0:
            raise ValueError(f"`kl_coef` must be a finite number >= 0, got {kl_coef}.")
        self.kl_coef = float(kl_coef)

    def update(self, kl: float, n_episodes: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController(FixedKLController):
    """
    The adaptive KL coefficient of Ziegler et al. (2019), eq. in section 2.2:
    ``e = clip(KL / target - 1, -0.2, 0.2)``, then ``kl_coef *= 1 + e * n_episodes / horizon``, once per rollout.

    :param kl_coef: initial coefficient (> 0)
    :param target: target KL per sequence (nats, e.g. 6.0 in Ziegler et al.)
    :param horizon: number of episodes over which the coefficient may change by a factor of about ``e``
        (10,000 in Ziegler et al.)
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
        :param kl: mean KL per sequence over the rollout (nats)
        :param n_episodes: number of episodes in the rollout
        """
        error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
        self.kl_coef *= 1.0 + error * n_episodes / self.horizon
