""":class:`GroupOnPolicyAlgorithm`, the base of GRPO and RLOO: an SB3 ``OnPolicyAlgorithm`` whose ``collect_rollouts``
plays one round of a :class:`~sb3_textrl.common.group_vec_env.GroupedVecEnv` per rollout and calls the policy only on
the envs whose episode is still running.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback, ConvertCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy, BasePolicy, MultiInputActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule, TensorDict
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv

from sb3_textrl.common.callbacks import TimestepsProgressBarCallback
from sb3_textrl.common.group_advantages import frac_zero_std
from sb3_textrl.common.group_buffers import GROUP_BUFFERS, DictGroupRolloutBuffer, GroupRolloutBuffer
from sb3_textrl.common.group_vec_env import GroupedVecEnv
from sb3_textrl.common.validation import check_positive_int
from sb3_textrl.lm.log_probs import sample_categorical
from sb3_textrl.policies import CausalLMActorCriticPolicy

__all__ = ["GroupOnPolicyAlgorithm"]

SelfGroupAlgorithm = TypeVar("SelfGroupAlgorithm", bound="GroupOnPolicyAlgorithm")


class GroupOnPolicyAlgorithm(OnPolicyAlgorithm):
    """
    The base of GRPO and RLOO: an SB3 ``OnPolicyAlgorithm`` whose rollouts are rounds of a :class:`GroupedVecEnv`.

    Paper: https://arxiv.org/abs/2402.03300 (Shao et al. 2024, GRPO: a group's other completions as the baseline)

    **A rollout is one round.** ``collect_rollouts`` starts a round (``env.reset()``: each group on one prompt), then
    at each step samples actions from the policy's distribution for the envs whose episode is still running only
    (``policy.get_distribution``: no value pass) and steps them (``env.step_running``); a finished env waits, and is
    neither stepped nor shown to the policy. The round ends when every episode has ended; every episode of every group
    starts and ends in it, so the group statistics are complete. ``num_timesteps`` counts real steps (tokens).
    Callbacks get ``on_rollout_start``, ``on_step`` (with ``self.locals`` holding ``new_obs``, ``rewards``, ``dones``,
    ``infos`` for all the envs, a waiting env with reward 0 and ``done=False``, and ``running``, the indices of the envs
    stepped) and ``on_rollout_end``, as in SB3. SB3's progress bar advances by ``n_envs`` per step, waiting envs included.

    **The buffer** (:class:`GroupRolloutBuffer`) keeps only the real steps; after the round it looks like one env that
    played the episodes back to back (arrays ``(N, 1)``, ``episode_starts`` at each episode's first token), and in
    ``on_rollout_end`` ``self.locals["dones"]`` is ``[True]`` and ``self.locals["values"]`` zeros, for that view: a
    :class:`~sb3_textrl.common.callbacks.KLPenaltyCallback` penalises the real steps' rewards and its call of
    ``compute_returns_and_advantage`` recomputes the scores and the group advantages from them.

    **KL to the reference model**: either as that callback's reward penalty, or in the loss with ``beta > 0``: the k3
    estimate (:func:`k3_kl`) per token, against reference log-probs computed once per rollout
    (``policy.reference_log_prob``, one forward per episode), logged as ``train/ref_kl``.

    Subclasses implement :meth:`compute_advantages` and ``train``.

    :param policy: the policy (``LMPolicy``, ``MlpPolicy``...)
    :param env: a :class:`GroupedVecEnv` (``make_text_vec_env(..., group_size=G)`` or :func:`make_group_vec_env`)
    :param learning_rate: the learning rate, or a function of the remaining progress (from 1 to 0)
    :param n_steps: the longest episode a round may hold, in steps per env: the rollout buffer has room for
        ``n_steps * n_envs`` steps and a round whose episode runs longer raises a ``ValueError``. For text generation,
        at least ``max_new_tokens`` (checked at construction). A rollout holds the sum of the episode lengths in steps
    :param batch_size: tokens per minibatch, whole episodes packed greedily (``None``: the whole rollout at once)
    :param ent_coef: entropy coefficient for the loss
    :param max_grad_norm: the maximum norm for gradient clipping (``None``: no clipping)
    :param beta: the coefficient of the k3 KL to the reference model in the loss (0: none, and no reference pass)
    :param rollout_buffer_class: a :class:`GroupRolloutBuffer` or :class:`DictGroupRolloutBuffer` class (``None``:
        chosen from the observation space)
    :param rollout_buffer_kwargs: keyword arguments of the rollout buffer
    :param stats_window_size: window size for the rollout logging (episodes)
    :param tensorboard_log: the log location for tensorboard (``None``: no logging)
    :param policy_kwargs: additional arguments of the policy
    :param verbose: 0 no output, 1 info, 2 debug
    :param seed: seed for the pseudo random generators (and the draws of the group prompts)
    :param device: the device (cpu, cuda, ...), ``"auto"``: the GPU if possible
    :param _init_setup_model: whether to build the network at the creation of the instance
    :raises ValueError: if ``n_steps`` or ``batch_size`` is not a positive integer, ``beta`` is negative or needs a
        reference model that the policy lacks, ``env`` is not a :class:`GroupedVecEnv` (outermost), ``n_steps`` is
        below the env's ``max_new_tokens``, or ``rollout_buffer_class`` is not a group buffer
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": ActorCriticPolicy,
        "CnnPolicy": ActorCriticCnnPolicy,
        "MultiInputPolicy": MultiInputActorCriticPolicy,
    }
    rollout_buffer: GroupRolloutBuffer | DictGroupRolloutBuffer  # type: ignore[assignment]

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule,
        n_steps: int,
        batch_size: int | None,
        ent_coef: float,
        max_grad_norm: float | None,
        beta: float,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ):
        check_positive_int(n_steps, "n_steps", " (the longest episode of a round)")
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size", " or None (the whole rollout)")
        if not np.isfinite(beta) or beta < 0:
            raise ValueError(f"`beta` (the KL coefficient in the loss) must be a finite number >= 0, got {beta!r}.")
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=1.0,  # an episode's score is its undiscounted return
            gae_lambda=1.0,
            ent_coef=ent_coef,
            vf_coef=0.0,  # no value loss: the baseline is the group's
            max_grad_norm=max_grad_norm,  # type: ignore[arg-type]
            use_sde=False,
            sde_sample_freq=-1,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
            _init_setup_model=False,
            supported_action_spaces=(spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary),
        )
        self.batch_size = batch_size
        self.beta = float(beta)
        self._round_ready = False  # whether _last_obs is the start of a round not yet played (see _setup_learn)
        if self.env is not None:
            self._check_group_env(self.env)

    # --- setup --------------------------------------------------------------------------------------------------------

    def _check_group_env(self, env: VecEnv) -> None:
        if not isinstance(env, GroupedVecEnv):
            raise ValueError(
                f"{type(self).__name__} plays rounds of groups of episodes on the same prompt: `env` must be a GroupedVecEnv "
                "(outermost), e.g. make_text_vec_env(n_envs=8, group_size=4, env_kwargs=...) or "
                f"make_group_vec_env(env_id, 8, 4); got {type(env).__name__}."
            )

    def _check_n_steps(self, env: VecEnv) -> None:
        try:
            longest = max(int(n) for n in env.get_attr("max_new_tokens"))
        except AttributeError:
            return
        if self.n_steps < longest:
            raise ValueError(
                f"`n_steps` ({self.n_steps}) must be at least the env's `max_new_tokens` ({longest}): a rollout holds one "
                f"whole round, and an episode can last max_new_tokens steps. Pass n_steps={longest}."
            )

    def set_env(self, env: GymEnv, force_reset: bool = True) -> None:
        """SB3's ``set_env``, for a :class:`GroupedVecEnv` only (see :meth:`_check_group_env`)."""
        super().set_env(env, force_reset)
        self._check_group_env(self.env)  # type: ignore[arg-type]
        self._check_n_steps(self.env)  # type: ignore[arg-type]

    def _setup_model(self) -> None:
        if self.rollout_buffer_class is None:
            dict_obs = isinstance(self.observation_space, spaces.Dict)
            self.rollout_buffer_class = DictGroupRolloutBuffer if dict_obs else GroupRolloutBuffer
        elif not issubclass(self.rollout_buffer_class, GROUP_BUFFERS):
            raise ValueError(
                f"`rollout_buffer_class` must be GroupRolloutBuffer or DictGroupRolloutBuffer (or a subclass): "
                f"{type(self).__name__} stores rounds of whole episodes. Got {self.rollout_buffer_class.__name__}."
            )
        if self.env is not None:  # here, not in __init__: load() sets the saved n_steps between the two
            self._check_n_steps(self.env)
        super()._setup_model()
        self.rollout_buffer.advantage_fn = self.compute_advantages
        if self.beta > 0 and getattr(self.policy, "reference_model", None) is None:
            raise ValueError(
                f"`beta` ({self.beta}) > 0 puts the KL to the reference model in the loss, but the policy has no reference "
                "model: use LMPolicy with policy_kwargs=dict(use_reference_model=True), or beta=0."
            )

    def compute_advantages(self, scores: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
        """
        The advantage of each episode from the scores of its group.

        :param scores: ``(n_episodes,)`` float64, each episode's score
        :param group_ids: ``(n_episodes,)`` int64, each episode's group
        :return: ``(n_episodes,)`` advantages
        """
        raise NotImplementedError

    # --- rollouts -----------------------------------------------------------------------------------------------------

    def _setup_learn(self, *args, **kwargs):
        # whether SB3's _setup_learn resets the env here (a new round, drawn for the first rollout) or keeps _last_obs
        rounds = getattr(self.env, "n_rounds", None)
        result = super()._setup_learn(*args, **kwargs)
        self._round_ready = self.env is not None and getattr(self.env, "n_rounds", None) != rounds
        return result

    def _sample(self, obs: th.Tensor | TensorDict) -> tuple[th.Tensor, th.Tensor]:
        """Actions and their log-probs from the policy's distribution (no value pass)."""
        distribution = self.policy.get_distribution(obs)
        if isinstance(self.policy, CausalLMActorCriticPolicy):
            # the LM policy's own sampler, as in its forward(): one uniform number per row
            actions = sample_categorical(distribution.distribution.probs)  # type: ignore[attr-defined]
        else:
            actions = distribution.get_actions()
        return actions, distribution.log_prob(actions)

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """
        Play one round of ``env`` and store its real steps in ``rollout_buffer`` (see the class docstring).

        :param env: the training environment, a :class:`GroupedVecEnv`
        :param callback: called at each step and at the start and end of the rollout
        :param rollout_buffer: a group rollout buffer
        :param n_rollout_steps: the most steps an episode may take (``n_steps``)
        :return: True, or False if a callback stopped the rollout
        :raises ValueError: if an episode is still running after ``n_rollout_steps`` steps
        """
        assert isinstance(env, GroupedVecEnv) and isinstance(rollout_buffer, GROUP_BUFFERS)
        self.policy.set_training_mode(False)
        rollout_buffer.reset()
        # a round starts with each rollout; learn()'s own reset may have just drawn one, whose observations are _last_obs
        if not (self._round_ready and env.at_round_start and self._last_obs is not None):
            self._last_obs = env.reset()  # type: ignore[assignment]
        self._round_ready = False
        callback.on_rollout_start()

        episode_lengths = np.zeros(env.num_envs, dtype=np.int64)
        group_ids = env.env_groups.copy()
        n_steps = 0
        while env.running.any():
            running = np.flatnonzero(env.running)
            if n_steps >= n_rollout_steps:
                raise ValueError(
                    f"The episodes of env(s) {running.tolist()} are still running after `n_steps`={n_rollout_steps} steps: "
                    f"a rollout of {type(self).__name__} holds one whole round. Raise `n_steps` to the longest episode "
                    "(max_new_tokens for text generation)."
                )
            obs = _take(self._last_obs, running)
            with th.no_grad():
                obs_tensor = obs_as_tensor(obs, self.device)  # type: ignore[arg-type]
                actions, log_probs = self._sample(obs_tensor)
            actions = actions.cpu().numpy()
            clipped_actions = actions
            if isinstance(self.action_space, spaces.Box):
                if self.policy.squash_output:
                    clipped_actions = self.policy.unscale_action(clipped_actions)
                else:
                    clipped_actions = np.clip(actions, self.action_space.low, self.action_space.high)

            new_obs, rewards, dones, infos = env.step_running(clipped_actions)
            self.num_timesteps += len(running)

            # Give access to local variables
            callback.update_locals(locals())
            if not callback.on_step():
                return False

            self._update_info_buffer(infos, dones)
            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.reshape(-1, 1)
            rollout_buffer.add_steps(n_steps, running, obs, actions, rewards[running], log_probs)  # type: ignore[arg-type]
            ended = running[dones[running]]
            episode_lengths[ended] = n_steps + 1
            self._last_obs = new_obs  # type: ignore[assignment]
            n_steps += 1

        rollout_buffer.finish_round(episode_lengths, group_ids)
        rollout_buffer.compute_returns_and_advantage(last_values=th.zeros(1), dones=np.ones(1, dtype=bool))
        self.logger.record("rollout/frac_reward_zero_std", frac_zero_std(rollout_buffer.scores, group_ids))
        self._last_episode_starts = np.ones(env.num_envs, dtype=bool)
        # for the callbacks: the buffer's view, one env whose last episode ends with the rollout
        values = th.zeros((1, 1), device=self.device)
        dones = np.ones(1, dtype=bool)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    # --- training helpers ---------------------------------------------------------------------------------------------

    def _log_prob_entropy(self, obs: th.Tensor | TensorDict, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor | None]:
        """Log-probs ``(n,)`` and entropies ``(n,)`` (or ``None``) of the actions, from the policy's distribution."""
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        if isinstance(self.policy, CausalLMActorCriticPolicy):
            # its fused log-prob/entropy path (one vocabulary-sized tensor per row); the value head is one dot product
            _, log_prob, entropy = self.policy.evaluate_actions(obs, actions)
            return log_prob, entropy
        distribution = self.policy.get_distribution(obs)
        return distribution.log_prob(actions), distribution.entropy()

    def _compute_reference_log_probs(self) -> None:
        """Fill ``rollout_buffer.ref_log_probs`` (``(n_tokens,)`` float32) from the reference model, one forward per
        episode, in minibatches of ``batch_size`` tokens."""
        buffer = self.rollout_buffer
        ref = np.zeros(buffer.buffer_size, dtype=np.float32)
        for episodes in buffer.episode_batches(self.batch_size, shuffle=False):
            rows = buffer.token_indices(episodes)
            actions = buffer.to_torch(buffer.actions[rows, 0]).reshape(-1)
            ref[rows] = self.policy.reference_log_prob(buffer.observations_at(rows), actions).float().cpu().numpy()  # type: ignore[operator]
        buffer.ref_log_probs = ref

    def _init_callback(self, callback: MaybeCallback, progress_bar: bool = False) -> BaseCallback:
        """SB3's, with a progress bar that counts real steps (:class:`TimestepsProgressBarCallback`): SB3's own adds
        ``num_envs`` per step, waiting envs included, and would run past the budget."""
        if progress_bar:
            callbacks = callback if isinstance(callback, list) else [] if callback is None else [callback]
            callbacks = [c if isinstance(c, BaseCallback) else ConvertCallback(c) for c in callbacks]
            callback = [*callbacks, TimestepsProgressBarCallback()]
        return super()._init_callback(callback, progress_bar=False)

    def learn(
        self: SelfGroupAlgorithm,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfGroupAlgorithm:
        """
        SB3's ``learn``, logging after every rollout (one round) by default, under the algorithm's class name
        (``tb_log_name=None``: ``"GRPO"``, ``"RLOO"``).
        """
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name or type(self).__name__,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )



def _take(obs: Any, rows: np.ndarray) -> Any:
    if isinstance(obs, dict):
        return {key: value[rows] for key, value in obs.items()}
    return obs[rows]
