"""SB3 callbacks for RLHF-style fine-tuning of an ``LMPolicy``: the KL penalty against the reference model
(:class:`KLPenaltyCallback`), the per-rollout history of scores and KL (:class:`RolloutHistoryCallback`), and the
evaluation on held-out prompts (:class:`LMEvalCallback`).

Each subclasses SB3's ``BaseCallback``; pass them to ``model.learn(..., callback=CallbackList([...]))``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback, ProgressBarCallback

from sb3_textrl.common.evaluation import EvaluationResult, check_protocol, evaluate_prompts, evaluation_protocol
from sb3_textrl.common.kl import KL_ESTIMATORS, FixedKLController, estimate_kl
from sb3_textrl.common.plotting import plot_eval_curves, samples_markdown  # also importable from here, as before
from sb3_textrl.policies import CausalLMActorCriticPolicy
from sb3_textrl.rewards import RewardFn

__all__ = [
    "EVAL_KEYS",
    "EpisodeScores",
    "KLPenaltyCallback",
    "LMEvalCallback",
    "RolloutHistoryCallback",
    "TimestepsProgressBarCallback",
    "flat_observations",
]


def flat_observations(buffer: RolloutBuffer | DictRolloutBuffer, device: th.device) -> dict[str, th.Tensor] | th.Tensor:
    """
    The observations of a filled (not yet flattened) rollout buffer as one batch, in the buffer's (step, env) order:
    row ``s * n_envs + e`` is env ``e``'s observation at step ``s``.

    :param buffer: an SB3 rollout buffer whose observations are ``(n_steps, n_envs, ...)`` arrays (a dict of them for
        a ``DictRolloutBuffer``)
    :param device: where to put the tensors
    :return: ``(n_steps * n_envs, ...)`` tensors of the buffer's dtypes (a dict with the buffer's keys, e.g.
        ``input_ids`` and ``attention_mask`` int64 ``(n_steps * n_envs, max_length)``), or one tensor
    """
    if isinstance(buffer.observations, dict):
        return {
            key: th.as_tensor(value.reshape(-1, *value.shape[2:]), device=device) for key, value in buffer.observations.items()
        }
    return th.as_tensor(buffer.observations.reshape(-1, *buffer.observations.shape[2:]), device=device)


class EpisodeScores:
    """
    The raw scores (``info["score"]``) and per-term scores (``info["score_terms"]``) of the episodes that end, collected
    step by step: ``scores`` (one float per finished episode), ``terms`` (``{term: [float, ...]}``) and ``eos``
    (``info["eos"]``: whether the completion ended with an EOS token, for the episodes that say).
    """

    def __init__(self) -> None:
        self.scores: list[float] = []
        self.terms: dict[str, list[float]] = {}
        self.eos: list[bool] = []

    def collect(self, infos: list[dict], dones: np.ndarray) -> None:
        """
        Keep the scores of the episodes that ended in this vectorized step (those without ``"score"`` are skipped).

        :param infos: the step's infos (one dict for each env)
        :param dones: whether each env's episode ended (one bool for each env)
        """
        for info, done in zip(infos, dones):
            if done and "score" in info:
                self.scores.append(float(info["score"]))
                for term, value in info.get("score_terms", {}).items():
                    self.terms.setdefault(term, []).append(float(value))
                if "eos" in info:
                    self.eos.append(bool(info["eos"]))

    def mean(self) -> float:
        """The mean score of the episodes kept, ``nan`` when there is none."""
        return float(np.mean(self.scores)) if self.scores else float("nan")

    def eos_fraction(self) -> float:
        """The fraction of the episodes kept whose completion ended with EOS, ``nan`` when none says."""
        return float(np.mean(self.eos)) if self.eos else float("nan")

    def clear(self) -> None:
        """Forget the episodes kept."""
        self.scores, self.terms, self.eos = [], {}, []


class TimestepsProgressBarCallback(ProgressBarCallback):
    """
    SB3's progress bar (``learn(progress_bar=True)``), advanced by what the model's ``num_timesteps`` grew rather than by
    ``num_envs`` per step: right for algorithms that count only some envs' steps (GRPO and RLOO count the real tokens of
    a round, not the envs waiting for its end), so the bar ends at the budget.

    :raises ImportError: without ``tqdm`` and ``rich`` (as SB3's bar)
    """

    def _on_training_start(self) -> None:
        super()._on_training_start()
        self._counted = self.model.num_timesteps

    def _on_step(self) -> bool:
        self.pbar.update(self.model.num_timesteps - self._counted)
        self._counted = self.model.num_timesteps
        return True


class KLPenaltyCallback(BaseCallback):
    """
    Penalise each step's reward by the KL divergence from the reference model, with stock SB3 algorithms.

    Every step's reward becomes ``r_t - kl_coef * kl_t``, with ``kl_t`` an estimate of
    ``log pi(a_t|s_t) - log pi_ref(a_t|s_t)``, so that an episode's return is the score minus ``kl_coef`` times the
    sampled KL of the completion from the reference model: eq. 2 of Ziegler et al. (2019), "Fine-Tuning Language
    Models from Human Preferences", https://arxiv.org/abs/1909.08593.

    At the end of each rollout, the reference log-probs of all its steps are computed in one batched pass (one forward
    per episode), the buffer's rewards are penalised, and returns and advantages are recomputed with the buffer's own
    GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    https://arxiv.org/abs/1506.02438); then the controller updates the coefficient
    (:class:`~sb3_textrl.common.kl.AdaptiveKLController`: the controller of Ziegler et al., section 2.2).

    Logged: ``rollout/ref_kl`` (mean KL per episode, nats: total KL over the number of finished episodes),
    ``rollout/ref_kl_per_token``, ``rollout/score`` (mean raw score, ``info["score"]``, of the episodes that finished),
    ``rollout/score/<term>`` for each term of a combined reward (``info["score_terms"]``), ``rollout/eos_fraction`` (the
    fraction of the finished completions that ended with EOS, ``info["eos"]``), ``rollout/penalized_return`` (mean score
    minus ``kl_coef`` times KL per episode) and ``train/kl_coef`` (the coefficient used for this rollout).

    :param kl_coef: the KL penalty coefficient (beta, >= 0; default 0.05): a number (fixed; 0 disables the penalty, KL is
        still logged), or a controller, e.g. ``AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10_000)``
    :param estimator: per-token KL estimator, ``"k1"`` or ``"k3"`` (see :mod:`sb3_textrl.common.kl`). Default ``"k1"``: as a
        reward penalty, only k1's policy gradient equals the KL's gradient; k3's is biased (k3 itself depends on the
        policy) and, with an adaptive controller, can let the KL grow while the coefficient rises
    :param verbose: verbosity level
    :raises ValueError: if ``kl_coef`` is negative or not finite, or the estimator unknown; at the start of training,
        if the policy is not an ``LMPolicy`` with a reference model
    """

    def __init__(self, kl_coef: float | FixedKLController = 0.05, estimator: str = "k1", verbose: int = 0):
        super().__init__(verbose)
        self.controller = kl_coef if isinstance(kl_coef, FixedKLController) else FixedKLController(kl_coef)
        if estimator not in KL_ESTIMATORS:
            raise ValueError(f"Unknown KL `estimator={estimator!r}`: use one of {KL_ESTIMATORS}.")
        self.estimator = estimator
        self.last_kl: float = 0.0
        self._episodes = EpisodeScores()

    @property
    def kl_coef(self) -> float:
        """The current KL penalty coefficient (the controller's), used for the next rollout."""
        return self.controller.kl_coef

    def _init_callback(self) -> None:
        policy = self.model.policy
        if not isinstance(policy, CausalLMActorCriticPolicy) or policy.reference_model is None:
            raise ValueError(
                "KLPenaltyCallback needs an LMPolicy with a reference model: use PPO('LMPolicy', env) and keep "
                "policy_kwargs use_reference_model=True."
            )

    def _on_step(self) -> bool:
        self._episodes.collect(self.locals["infos"], self.locals["dones"])
        return True

    def _on_rollout_end(self) -> None:
        buffer = self.model.rollout_buffer
        policy: CausalLMActorCriticPolicy = self.model.policy  # type: ignore[assignment]
        obs = flat_observations(buffer, policy.device)
        actions = th.as_tensor(buffer.actions.reshape(-1), device=policy.device)
        ref_log_prob = policy.reference_log_prob(obs, actions).cpu().numpy().reshape(buffer.log_probs.shape)
        kl = estimate_kl(buffer.log_probs, ref_log_prob, self.estimator).astype(np.float32)
        n_episodes = int(buffer.episode_starts[1:].sum() + np.sum(self.locals["dones"]))  # episodes that ended
        kl_coef = self.kl_coef
        if kl_coef > 0:
            buffer.rewards -= kl_coef * kl
            # SB3 computed returns/advantages before this hook: recompute them from the penalised rewards
            buffer.compute_returns_and_advantage(last_values=self.locals["values"], dones=self.locals["dones"])
        self.last_kl = float(kl.sum() / max(1, n_episodes))
        score = self._episodes.mean()
        self.logger.record("rollout/ref_kl", self.last_kl)
        self.logger.record("rollout/ref_kl_per_token", float(kl.mean()))
        self.logger.record("rollout/score", score)
        for term, values in self._episodes.terms.items():
            self.logger.record(f"rollout/score/{term}", float(np.mean(values)))
        if self._episodes.eos:
            self.logger.record("rollout/eos_fraction", self._episodes.eos_fraction())
        self._episodes.clear()
        self.logger.record("rollout/penalized_return", score - kl_coef * self.last_kl)
        self.logger.record("train/kl_coef", kl_coef)
        self.controller.update(self.last_kl, n_episodes)


class RolloutHistoryCallback(BaseCallback):
    """
    Record, for each rollout, the mean score of the episodes that finished in it and the KL to the reference model.

    ``history`` is a list of dicts with keys ``timesteps``, ``score`` (mean raw score, ``nan`` if no episode finished),
    ``episodes``, ``eos_fraction`` (the fraction of them that ended with EOS, ``nan`` if none says), and ``kl`` and
    ``kl_coef`` (from a :class:`KLPenaltyCallback` given as ``kl_callback``, placed before this callback; else ``nan``).
    ``kl_coef`` is the coefficient for the next rollout. A combined reward adds ``score/<term>`` for each of its terms.
    Every value is a Python float; scores are in the reward's units, KL in nats per episode.

    :param kl_callback: the run's KL penalty callback, if any (default: none)
    :param verbose: verbosity level
    """

    def __init__(self, kl_callback: KLPenaltyCallback | None = None, verbose: int = 0):
        super().__init__(verbose)
        self.kl_callback = kl_callback
        self.history: list[dict[str, float]] = []
        self._episodes = EpisodeScores()

    def _on_step(self) -> bool:
        self._episodes.collect(self.locals["infos"], self.locals["dones"])
        return True

    def _on_rollout_end(self) -> None:
        self.history.append(
            {
                "timesteps": float(self.num_timesteps),
                "score": self._episodes.mean(),
                "episodes": float(len(self._episodes.scores)),
                "eos_fraction": self._episodes.eos_fraction(),
                "kl": self.kl_callback.last_kl if self.kl_callback is not None else float("nan"),
                "kl_coef": self.kl_callback.kl_coef if self.kl_callback is not None else float("nan"),
            }
        )
        for term, values in self._episodes.terms.items():
            self.history[-1][f"score/{term}"] = float(np.mean(values))
        self._episodes.clear()


#: what is logged under ``eval/`` (SB3 logger: stdout, CSV, TensorBoard...), from :class:`EvaluationResult` fields
EVAL_KEYS = {
    "reward_greedy": "eval/reward_greedy",
    "reward_sampled": "eval/reward_sampled",
    "reward_sampled_std": "eval/reward_sampled_std",
    "reward_sampled_sem": "eval/reward_sampled_sem",
    "reward_sampled_ci95": "eval/reward_sampled_ci95",
    "kl": "eval/ref_kl",
    "ref_perplexity": "eval/ref_perplexity",
    "distinct_1": "eval/distinct_1",
    "distinct_2": "eval/distinct_2",
}


class LMEvalCallback(BaseCallback):
    """
    Evaluate an LM policy on held-out prompts when training starts (the before point) and every ``eval_freq`` rollouts
    (:func:`~sb3_textrl.common.evaluation.evaluate_prompts`: each prompt gets a greedy and ``n_samples`` sampled
    completions, with common random numbers from ``seed``, so that the points of the curve differ by the model, not by
    sampling noise; the training's random streams are left as they were).

    Logged to the SB3 logger (so TensorBoard works with ``tensorboard_log``): ``eval/reward_greedy``,
    ``eval/reward_sampled`` (mean scores), ``eval/reward_sampled_std`` (over all samples), ``eval/reward_sampled_sem`` and
    ``eval/reward_sampled_ci95`` (standard error and 95 % confidence half-width of ``eval/reward_sampled``, over prompts:
    a prompt's mean over its samples is the unit), ``eval/ref_kl`` (KL to the reference model, nats per completion),
    ``eval/ref_perplexity`` (perplexity of the sampled completions under the reference model), ``eval/distinct_1`` and
    ``eval/distinct_2`` (Li et al. 2016). The evaluation at training start is dumped at once, at its step (as SB3's
    ``EvalCallback`` does); the others go out with the rollout's logs. ``results`` keeps one dict per evaluation (with
    ``timesteps``), ``protocol`` how they were made (for ``results.json``) and ``last_samples`` the latest table of
    sample completions; with ``log_path``, the samples are written as Markdown (``samples.md``) and the curves as a PNG
    (``eval_curves.png``: the sampled reward with its 95 % band, and the greedy reward) after each evaluation.

    When training starts at a step already in ``results`` (restored with :meth:`load_state_dict`, or a second
    ``learn()``), nothing is evaluated then; when it starts at step 0 and ``before`` is given, ``before`` is that
    point (no second evaluation of the same model).

    :param prompts: held-out prompts
    :param eval_freq: evaluate every this many rollouts (>= 1, default 10)
    :param reward_fn: reward name or callable, as in the environment (default ``"vader"``; completion-level only)
    :param reward_kwargs: keyword arguments of a named reward
    :param max_new_tokens: completion length limit, in tokens (default 32)
    :param n_samples: sampled completions per prompt (default 8)
    :param seed: seed of the common random numbers (default 0; ``None``: fresh draws from the global generator, which
        then changes the training's random stream)
    :param batch_size: prompts per ``generate`` call (default 16)
    :param n_table: sample completions kept in the table (default 4)
    :param log_path: folder for ``samples.md`` and ``eval_curves.png`` (default: none, nothing written)
    :param before: the evaluation of the untrained policy with this protocol, if already made (e.g. the CLI's
        evaluation before training): used as the step-0 point instead of evaluating again (default: none)
    :param verbose: 1 prints the metrics and the table
    :raises ValueError: for an empty prompt list, ``eval_freq`` < 1, a bad ``n_samples``, ``seed`` or ``batch_size``, or
        a ``before`` made with another protocol; at the start of training, for a policy that is not an ``LMPolicy``
    """

    def __init__(
        self,
        prompts: Sequence[str],
        eval_freq: int = 10,
        reward_fn: str | RewardFn = "vader",
        reward_kwargs: dict | None = None,
        max_new_tokens: int = 32,
        n_samples: int = 8,
        seed: int | None = 0,
        batch_size: int = 16,
        n_table: int = 4,
        log_path: str | None = None,
        before: EvaluationResult | None = None,
        verbose: int = 0,
    ):
        super().__init__(verbose)
        if isinstance(prompts, str) or not prompts:
            raise ValueError("`prompts` must be a non-empty list of held-out prompts.")
        if int(eval_freq) < 1:
            raise ValueError(f"`eval_freq` (rollouts between evaluations) must be >= 1, got {eval_freq}.")
        check_protocol(n_samples, seed, batch_size)
        self.prompts = list(prompts)
        self.eval_freq = int(eval_freq)
        self.evaluate_kwargs: dict[str, Any] = dict(
            reward_fn=reward_fn,
            reward_kwargs=reward_kwargs,
            max_new_tokens=max_new_tokens,
            n_samples=n_samples,
            seed=seed,
            batch_size=batch_size,
        )
        self.protocol = evaluation_protocol(len(self.prompts), n_samples, seed, max_new_tokens, batch_size)
        if before is not None and before.protocol != self.protocol:
            raise ValueError(
                f"`before` was evaluated with the protocol {before.protocol or '(none recorded)'}, the callback's is "
                f"{self.protocol}: evaluate it with the same settings, or leave `before` out."
            )
        self.before = before
        self.n_table = n_table
        self.log_path = log_path
        self.results: list[dict[str, float]] = []
        self.last_samples: list[dict[str, str | float]] = []
        self.n_rollouts = 0

    def _init_callback(self) -> None:
        if not isinstance(self.model.policy, CausalLMActorCriticPolicy):
            raise ValueError("LMEvalCallback evaluates an LMPolicy: build the model with PPO('LMPolicy', env).")

    def _on_training_start(self) -> None:
        if self.results and self.results[-1]["timesteps"] == self.num_timesteps:
            return  # this point is already on the curve
        if self.before is not None and self.num_timesteps == 0:
            self._record(self.before)
        else:
            self.evaluate()
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.dump(self.num_timesteps)

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.n_rollouts += 1
        if self.n_rollouts % self.eval_freq == 0:
            self.evaluate()

    def evaluate(self) -> dict[str, float]:
        """
        Evaluate now (the policy in eval mode, then back to its mode), log under ``eval/``, keep the result and, with
        ``log_path``, write ``samples.md`` and ``eval_curves.png``.

        :return: ``timesteps`` and the fields of :data:`EVAL_KEYS`, as floats
        """
        policy: CausalLMActorCriticPolicy = self.model.policy  # type: ignore[assignment]
        training = policy.training
        policy.set_training_mode(False)
        try:
            result = evaluate_prompts(policy, self.prompts, **self.evaluate_kwargs)
        finally:
            policy.set_training_mode(training)
        return self._record(result)

    def _record(self, result: EvaluationResult) -> dict[str, float]:
        """Log ``result`` under ``eval/`` at the current step, keep it and, with ``log_path``, write the files."""
        metrics = {"timesteps": float(self.num_timesteps)}
        for field, key in EVAL_KEYS.items():
            metrics[field] = float(getattr(result, field))
            self.logger.record(key, metrics[field])
        self.results.append(metrics)
        self.last_samples = result.samples[: self.n_table]
        if self.verbose:
            print(f"Eval at {self.num_timesteps} timesteps: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
            print(samples_markdown(self.last_samples))
        if self.log_path is not None:
            os.makedirs(self.log_path, exist_ok=True)
            with open(os.path.join(self.log_path, "samples.md"), "w", encoding="utf-8") as f:
                f.write(f"Samples at {self.num_timesteps} timesteps\n\n{samples_markdown(self.last_samples)}\n")
            plot_eval_curves(self.results, os.path.join(self.log_path, "eval_curves.png"))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (see :mod:`sb3_textrl.common.training_checkpoints`)."""
        return {"results": self.results, "last_samples": self.last_samples, "n_rollouts": self.n_rollouts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`state_dict` returned."""
        self.results, self.last_samples, self.n_rollouts = state["results"], state["last_samples"], state["n_rollouts"]
