"""``LMPolicy``: an SB3 actor-critic policy whose actor is a Hugging Face causal LM (internals: ``docs/policy.md``)."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import CategoricalDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn
from transformers import PreTrainedModel

from sb3_textrl.common.validation import check_same_lm
from sb3_textrl.lm.activation_checkpointing import enable_checkpointing, set_checkpointing
from sb3_textrl.lm.kv_cache import RolloutKVCache
from sb3_textrl.lm.lean_activations import enable_lean_activations
from sb3_textrl.lm.loading import dtype_emulated_on_cpu as _emulated_on_cpu  # the name tests patch
from sb3_textrl.lm.loading import load_causal_lm, load_tokenizer, make_peft_model
from sb3_textrl.lm.log_probs import lm_head_logits, log_prob_and_entropy, sample_categorical
from sb3_textrl.lm.optim import ADAM_CLASSES, allocate_adam_state, release_unstepped_adam_state
from sb3_textrl.lm.packing import forward_packed, packable
from sb3_textrl.lm.prefix_sharing import forward_suffixes, prefix_cache, shared_prefix_length, split_prefix
from sb3_textrl.lm.tokens import covering_rows, last_token_index, position_ids, steps_out_of_order

__all__ = ["CausalLMActorCriticPolicy", "LMPolicy", "on_real_rows", "real_rows", "split_observation"]

# LMPolicy's own constructor arguments, saved with the model (_get_constructor_parameters)
_LM_ARGUMENTS = ("model_name_or_path", "model_kwargs", "use_reference_model", "use_kv_cache", "prefix_sharing", "packing")
_LM_ARGUMENTS += ("prepacked_weights", "activation_checkpointing", "lean_activations", "autocast_dtype", "lora_config")


def split_observation(obs: PyTorchObs) -> tuple[th.Tensor, th.Tensor]:
    """
    ``(input_ids, attention_mask)``, both ``(batch, length)`` int64, from a token observation.

    :param obs: a dict with ``input_ids`` and ``attention_mask``
        (see :class:`~sb3_textrl.common.spaces.TokenObservationSpace`),
        or a tensor of token ids (every token attended)
    """
    if isinstance(obs, dict):
        input_ids, attention_mask = obs["input_ids"].long(), obs["attention_mask"].long()
    else:
        input_ids = obs.long()
        attention_mask = th.ones_like(input_ids)
    if input_ids.dim() == 1:
        input_ids, attention_mask = input_ids[None], attention_mask[None]
    return input_ids, attention_mask


def real_rows(obs: PyTorchObs) -> th.Tensor | None:
    """
    Which observations hold tokens: ``(batch,)`` bool, or ``None`` when all do (the usual case). An empty observation
    (``attention_mask`` all zero) is an env waiting for its round
    (:class:`~sb3_textrl.common.whole_episodes.WholeEpisodeVecEnv`).
    """
    if not isinstance(obs, dict):
        return None
    real = obs["attention_mask"].bool().any(dim=1)
    return None if bool(real.all()) else real


def on_real_rows(method: Callable[..., Any], obs: dict[str, th.Tensor], real: th.Tensor, empty: Any, *row_args, **kwargs):
    """
    ``method`` on the observations that hold tokens (and the same rows of ``row_args``), its outputs (a tensor or a
    tuple of tensors, the batch first) spread back over the whole batch with zeros on the empty rows.

    :param empty: the outputs when no observation holds tokens (zeros of the right shapes)
    """
    if not bool(real.any()):
        return empty
    outputs = method({key: value[real] for key, value in obs.items()}, *(arg[real] for arg in row_args), **kwargs)

    def spread(values: th.Tensor) -> th.Tensor:
        return values.new_zeros((len(real), *values.shape[1:])).index_put((real,), values)

    return tuple(map(spread, outputs)) if isinstance(outputs, tuple) else spread(outputs)


class CausalLMActorCriticPolicy(ActorCriticPolicy):
    """
    Actor-critic policy over a Hugging Face causal LM, for SB3's on-policy algorithms (PPO, A2C, TRPO, REINFORCE).

    Paper: https://arxiv.org/abs/1909.08593 (Ziegler et al. 2019: value head on the LM's trunk, KL to a reference LM)

    The actor is the LM: its logits at the last attended token are the ``Categorical`` distribution over the next token.
    The critic is a zero-initialised ``Linear(hidden_size, 1)`` on the same hidden state. Dropout stays off. Train on
    minibatches of whole episodes (``rollout_buffer_class=EpisodeRolloutBuffer``). How it all works: ``docs/policy.md``.

    :param observation_space: a :class:`~sb3_textrl.common.spaces.TokenObservationSpace` (or a ``Box`` of token ids)
    :param action_space: ``Discrete(n)``, ``n`` the LM's logits width
    :param lr_schedule: learning rate schedule
    :param model_name_or_path: the LM (alias, ``.gguf`` file or directory; default: the env's); a name, never a model
    :param model_kwargs: keyword arguments of ``from_pretrained`` (TRPO on a CPU needs ``attn_implementation="eager"``)
    :param use_reference_model: keep a frozen copy of the initial LM, for the KL penalty
    :param use_kv_cache: carry a KV cache from one rollout call to the next (eval mode, no gradients)
    :param prefix_sharing: run the opening tokens the observations share once per batch (prefix caching, as in SGLang)
    :param packing: run training and reference passes without padding, rows packed side by side (Krell et al. 2021)
    :param prepacked_weights: on a CPU in float32, run rollouts on oneDNN-prepacked copies of the MLP and LM-head weights
    :param activation_checkpointing: recompute decoder layers in backward (Chen et al. 2016): ``True`` all, ``n`` every n-th
    :param lean_activations: keep only the inputs of Llama-style gated MLPs and RMSNorms for backward (selective recompute)
    :param autocast_dtype: ``"bfloat16"`` or ``"float16"``: run the LM's trunk under ``torch.autocast``; ``None``: float32
    :param lora_config: a peft ``LoraConfig`` or its dict: train LoRA adapters (Hu et al. 2021) and the value head only
    :param kwargs: ``ActorCriticPolicy``'s other keyword arguments (``optimizer_class``, ``optimizer_kwargs``, ...)
    :raises ValueError: if no LM is named, its vocabulary is not the env's, or an option has a wrong type or value
    :raises FloatingPointError: if the LM produces NaN or infinite logits (they never reach the sampler)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        model_name_or_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        use_reference_model: bool = True,
        use_kv_cache: bool = True,
        prefix_sharing: bool = True,
        packing: bool = True,
        prepacked_weights: bool = True,
        activation_checkpointing: bool | int = False,
        lean_activations: bool = True,
        autocast_dtype: str | None = None,
        lora_config: Any = None,
        **kwargs,
    ):
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"LMPolicy needs a Discrete action space of token ids, got {action_space}.")
        if kwargs.get("use_sde"):
            raise ValueError("`use_sde=True` is for continuous actions; LMPolicy's actions are token ids.")
        env_model = getattr(observation_space, "model_name_or_path", None)
        if model_name_or_path is None:
            model_name_or_path = env_model
        if model_name_or_path is None:
            raise ValueError(
                "LMPolicy does not know which LM to use: pass policy_kwargs=dict(model_name_or_path=...) "
                "or use an environment built for an LM (e.g. sb3_textrl/TextGeneration-v0)."
            )
        if not isinstance(model_name_or_path, (str, os.PathLike)):
            raise ValueError(
                f"`model_name_or_path` must be a name or path (it is pickled with the model), "
                f"got {type(model_name_or_path).__name__}."
            )
        self.model_name_or_path = os.fspath(model_name_or_path)
        if env_model is not None:
            check_same_lm(env_model, self.model_name_or_path)  # same width, other vocabulary: refuse too
        self.model_kwargs = dict(model_kwargs or {})
        switches = dict(use_reference_model=use_reference_model, use_kv_cache=use_kv_cache)
        switches.update(prefix_sharing=prefix_sharing, packing=packing, prepacked_weights=prepacked_weights)
        switches.update(lean_activations=lean_activations)
        for name, value in switches.items():
            if not isinstance(value, bool):  # a string such as "false" would turn it on
                raise ValueError(f"`{name}` must be True or False, got {value!r}.")
            setattr(self, name, value)
        if isinstance(activation_checkpointing, bool) or activation_checkpointing is None:
            activation_checkpointing = bool(activation_checkpointing)
        elif not isinstance(activation_checkpointing, int) or activation_checkpointing < 1:
            raise ValueError(
                "`activation_checkpointing` must be True, False or a number n >= 1 (checkpoint every n-th decoder "
                f"layer), got {activation_checkpointing!r}."
            )
        self.activation_checkpointing = activation_checkpointing
        if autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"`autocast_dtype` must be None, 'bfloat16' or 'float16', got {autocast_dtype!r}.")
        self.autocast_dtype = autocast_dtype
        self.lora_config = lora_config
        self._warned_shuffled_buffer = False  # see _warn_if_shuffled_buffer
        self._rollout_rows, self._rollout_start = 0, None  # rows forward() saw since the rollout began, its first call
        kwargs.setdefault("ortho_init", False)
        optimizer_class = kwargs.get("optimizer_class", th.optim.Adam)
        if optimizer_class in ADAM_CLASSES:
            # SB3's default Adam eps, and the fused kernel (all parameters updated in a few kernels, not one per tensor)
            kwargs["optimizer_kwargs"] = {"eps": 1e-5, "fused": True, **(kwargs.get("optimizer_kwargs") or {})}
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    # --- construction -------------------------------------------------------------------------------------------------

    def _build(self, lr_schedule: Schedule) -> None:
        lm = load_causal_lm(self.model_name_or_path, self.model_kwargs)
        width = lm.get_output_embeddings().weight.shape[0]
        if width != self.action_space.n:
            raise ValueError(
                f"The LM `model_name_or_path={self.model_name_or_path!r}` has {width} logits but the action space is "
                f"Discrete({self.action_space.n}): the environment was built for another vocabulary. Build the env and "
                "the policy from the same `model_name_or_path`."
            )
        lm.config.use_cache = False
        # tuples keep these out of parameters(), state_dict() and the optimizer
        self._peft: tuple[Any, ...] = ()
        self._reference: tuple[PreTrainedModel, ...] = ()
        if self.lora_config is not None:
            # peft injects the adapters into `lm` in place; the PeftModel wrapper only switches them on and off
            self._peft = (make_peft_model(lm, self.lora_config),)
        elif self.use_reference_model:
            self._reference = (copy.deepcopy(lm).requires_grad_(False).eval(),)
        if self.activation_checkpointing:  # after the reference copy, which never trains
            enable_checkpointing(lm, every_n_layers=int(self.activation_checkpointing))
        if self.lean_activations:
            enable_lean_activations(lm)
        self.lm: PreTrainedModel = lm
        hidden_size = lm.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self._kv_cache = RolloutKVCache(lm)
        trainable = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = self.optimizer_class(trainable, lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]
        self.optimizer.register_step_post_hook(self._after_optimizer_step)

    def _after_optimizer_step(self, optimizer: th.optim.Optimizer, args, kwargs) -> None:
        # the gradients are spent: free them (as zero_grad(set_to_none=True) would before the next backward), so that
        # the next minibatch's forward does not hold them next to its activations
        optimizer.zero_grad(set_to_none=True)
        # the weights changed: fused Adam steps them without bumping their version counters, which the KV cache checks
        self.reset_kv_cache()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # a copied optimizer comes without its hooks (torch.optim.Optimizer.__getstate__ keeps none): hook the copy
        if "optimizer" in state and self._after_optimizer_step not in self.optimizer._optimizer_step_post_hooks.values():
            self.optimizer.register_step_post_hook(self._after_optimizer_step)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update({name: getattr(self, name) for name in _LM_ARGUMENTS})  # names and plain data: never the model
        return data

    @property
    def reference_model(self) -> PreTrainedModel | None:
        """
        The frozen initial LM: a copy, or with LoRA the policy's own LM (run with the adapters disabled);
        ``None`` with ``use_reference_model=False``.
        """
        if self._peft:
            return self.lm if self.use_reference_model else None
        return self._reference[0] if self._reference else None

    def reference_context(self):
        """A context in which :attr:`reference_model` computes the reference outputs (with LoRA: adapters off)."""
        return self._peft[0].disable_adapter() if self._peft else contextlib.nullcontext()

    @property
    def kv_cache(self) -> RolloutKVCache:
        """The KV cache that rollout calls (eval mode, no gradients) carry from one call to the next."""
        return self._kv_cache

    def reset_kv_cache(self) -> None:
        """Drop the rollout KV cache and its prepacked weights. The policy does so whenever its weights may change
        (optimizer step, loading, ``.to()``, a mode switch); call it after changing them another way."""
        self._kv_cache.reset()

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        if self.device.type == "cpu" and _emulated_on_cpu(self.autocast_dtype):
            warnings.warn(
                f"`autocast_dtype={self.autocast_dtype!r}` on a CPU without native {self.autocast_dtype} matrix "
                "instructions: the products are emulated, several times slower than float32. Build the policy with "
                "`autocast_dtype=None` on this machine.",
                UserWarning,
                stacklevel=3,
            )
        return th.autocast(device_type=self.device.type, dtype=getattr(th, self.autocast_dtype))

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self._peft:  # only what trains: adapters and value head; the base weights come from model_name_or_path
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            state = type(state)((k, v) for k, v in state.items() if not k.startswith("lm.") or k in trainable)
        return state

    @property
    def tokenizer(self):
        return load_tokenizer(self.model_name_or_path)

    def _apply(self, fn, *args, **kwargs):
        if hasattr(self, "_kv_cache"):
            self._kv_cache.reset()
        if hasattr(self, "optimizer"):  # moments made up front but never stepped: made again where the weights go
            release_unstepped_adam_state(self.optimizer)
        super()._apply(fn, *args, **kwargs)
        for model in self._reference:  # .to(device) moves the reference model too
            model._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> CausalLMActorCriticPolicy:
        if self.training and not mode:  # a rollout begins
            self._rollout_rows, self._rollout_start = 0, None
        if mode != self.training:
            self.reset_kv_cache()  # a new phase (rollout or update) starts
        if mode and hasattr(self, "optimizer"):  # Adam's moments before the first minibatch's activations (optim.py)
            allocate_adam_state(self.optimizer)
        super().train(mode)
        self.lm.eval()  # dropout stays off: the probability ratio must be 1 at the first update
        if self.activation_checkpointing:
            set_checkpointing(self.lm, mode)
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.reset_kv_cache()
        if not self._peft:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        expected = set(self.state_dict())
        missing = expected - set(state_dict)
        unexpected = set(state_dict) - set(super().state_dict())
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"LoRA policy state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        return result

    # --- forward passes -----------------------------------------------------------------------------------------------

    def _rollout_call(self) -> bool:
        # rollouts and predict() (eval mode, no gradients); never training steps such as TRPO's line search
        return self.use_kv_cache and not self.training and not th.is_grad_enabled()

    def _last_hidden(self, obs: PyTorchObs, lm: PreTrainedModel, cached: bool = False) -> th.Tensor:
        """
        The LM's last hidden state at the last attended token of each observation.

        :param cached: may use the rollout KV cache (the policy's own LM only)
        :return: ``(batch, hidden_size)`` in the LM's dtype
        """
        input_ids, attention_mask = split_observation(obs)
        if cached and self._rollout_call():
            with self._autocast():
                return self._kv_cache.last_hidden(input_ids, attention_mask, self.prefix_sharing, self.prepacked_weights)
        rows, cover = covering_rows(input_ids, attention_mask)
        if cached and self.training and len(input_ids) < self._rollout_rows:  # a training minibatch, part of a rollout
            self._warn_if_shuffled_buffer(input_ids, attention_mask, cover)
        ids, mask = input_ids[rows], attention_mask[rows]
        # shared by all observations, not only the covering rows: every observation read keeps its last token out of
        # the prefix (episodes on one prompt share it whole, and their first observation ends with it)
        p = shared_prefix_length(input_ids, attention_mask) if self.prefix_sharing else 0
        if self.packing and len(rows) > 1 and packable(lm, mask):  # no padding; the shared opening runs once
            with self._autocast():
                read_columns = last_token_index(attention_mask)
                return forward_packed(lm, ids, mask, cover, read_columns, p, share_openings=self.prefix_sharing)
        if p:  # the rows' common opening (a chat template's system prompt) runs once
            prefix, suffix_ids, suffix_mask, offset = split_prefix(ids, mask, p)
            with self._autocast():
                hidden = forward_suffixes(lm, prefix_cache(lm, prefix), suffix_ids, suffix_mask)[0]
            return hidden[cover, last_token_index(attention_mask) - offset[cover]]
        # drop the columns that no row attends to (left padding of short prompts, right padding after the text)
        attended = mask.any(dim=0).nonzero()
        first, stop = int(attended.min()), int(attended.max()) + 1
        ids, mask = ids[:, first:stop], mask[:, first:stop]
        with self._autocast():
            hidden = lm.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)[0]
        return hidden[cover, last_token_index(attention_mask) - first]

    def _warn_if_shuffled_buffer(self, input_ids: th.Tensor, attention_mask: th.Tensor, cover: th.Tensor) -> None:
        # SB3's RolloutBuffer shuffles steps: each minibatch runs a forward pass over every episode it holds a step of
        if self._warned_shuffled_buffer or not steps_out_of_order(input_ids, attention_mask, cover, self._rollout_start):
            return
        self._warned_shuffled_buffer = True
        warnings.warn(
            "LMPolicy is training on minibatches that hold pieces of episodes in shuffled order (SB3's RolloutBuffer or "
            "DictRolloutBuffer): each minibatch runs a forward pass over every episode it holds a step of, so an update "
            "runs the same tokens several times. Build the algorithm with `rollout_buffer_class=EpisodeRolloutBuffer` "
            "(`from sb3_textrl.common.buffers import EpisodeRolloutBuffer`) for minibatches of whole episodes, one "
            "forward pass each.",
            UserWarning,
            stacklevel=4,
        )

    def _logits(self, hidden: th.Tensor, lm: PreTrainedModel, obs: PyTorchObs, cached: bool = False) -> th.Tensor:
        """
        Next-token logits, ``(batch, vocab_size)`` float32, computed in float32.

        :param cached: ``hidden`` came from the rollout KV cache (the policy's own LM): the LM head may run on the
            cache's prepacked copy of its weight
        :raises FloatingPointError: if any logit is NaN or infinite
        """
        logits = self._kv_cache.linears.logits(hidden) if cached and self.prepacked_weights and self._rollout_call() else None
        if logits is None:
            head = lm.get_output_embeddings()
            logits = lm_head_logits(hidden.float(), head.weight.float(), None if head.bias is None else head.bias.float())
        softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
        if softcap:
            logits = th.tanh(logits / softcap) * softcap
        finite = th.isfinite(logits).all(dim=1)
        if not bool(finite.all()):
            rows = (~finite).nonzero().squeeze(1).tolist()
            lengths = split_observation(obs)[1].sum(dim=1)[rows].tolist()
            raise FloatingPointError(
                f"The LM produced NaN or infinite logits for {len(rows)} of {len(finite)} observations (rows {rows[:8]}, "
                f"holding {lengths[:8]} tokens): nothing was sampled. The weights have probably diverged: lower the "
                "learning rate, keep `max_grad_norm`, or resume from the last checkpoint."
            )
        return logits

    def distribution_and_values(self, obs: PyTorchObs) -> tuple[CategoricalDistribution, th.Tensor]:
        """
        The next-token distribution and the values of the observations, from one forward pass (or the rollout KV cache
        in eval mode without gradients).

        :param obs: token observations, ``(batch, max_length)`` int64 ``input_ids`` and ``attention_mask``
        :return: the distribution over each row's next token (the policy's ``action_dist``, which the next call reuses:
            keep its tensors, not the object) and values ``(batch, 1)`` float32
        """
        hidden = self._last_hidden(obs, self.lm, cached=True)
        distribution = self.action_dist.proba_distribution(action_logits=self._logits(hidden, self.lm, obs, cached=True))
        values = self.value_head(hidden.float())
        return distribution, values

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """
        Sample the next token.

        :param obs: token observations, ``(n_envs, max_length)`` int64 ``input_ids`` and ``attention_mask``; an empty
            one (``attention_mask`` all zero: an env waiting for its round,
            :class:`~sb3_textrl.common.whole_episodes.WholeEpisodeVecEnv`) runs nothing and gets token 0, value 0 and
            log-prob 0
        :param deterministic: take the most likely token (greedy decoding)
        :return: actions ``(n_envs,)`` int64 token ids, values ``(n_envs, 1)`` float32, log-probs ``(n_envs,)`` float32
        """
        real = real_rows(obs)
        if real is not None:
            empty = (th.zeros(len(real), dtype=th.long, device=self.device), self._zeros(real, 1), self._zeros(real))
            return on_real_rows(self.forward, obs, real, empty, deterministic=deterministic)
        distribution, values = self.distribution_and_values(obs)
        actions = self._sample(distribution, deterministic)
        if not self.training:  # SB3's collect_rollouts: one call per step, every env's observation
            if self._rollout_start is None:  # these may continue episodes that the last rollout cut
                self._rollout_start = split_observation(obs)
            self._rollout_rows += len(actions)
        return actions, values, distribution.log_prob(actions)

    @staticmethod
    def _sample(distribution: CategoricalDistribution, deterministic: bool) -> th.Tensor:
        if deterministic:
            return distribution.mode()
        return sample_categorical(distribution.distribution.probs)

    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """
        Values, log-probs and entropies of the given tokens, one forward pass per group of prefix-sharing observations.

        :param obs: ``(batch, max_length)`` int64 ``input_ids`` and ``attention_mask`` (an empty row gets zeros)
        :param actions: ``(batch,)`` token ids
        :return: values ``(batch, 1)``, log-probs ``(batch,)``, entropies ``(batch,)``, all float32
        """
        real = real_rows(obs)
        if real is not None:
            empty = (self._zeros(real, 1), self._zeros(real), self._zeros(real))
            return on_real_rows(self.evaluate_actions, obs, real, empty, actions)
        hidden = self._last_hidden(obs, self.lm, cached=True)
        # no Categorical object here: its autograd graph keeps ~4 vocabulary-sized tensors per row, this keeps one
        log_prob, entropy = log_prob_and_entropy(self._logits(hidden, self.lm, obs), actions.long().flatten())
        return self.value_head(hidden.float()), log_prob, entropy

    def get_distribution(self, obs: PyTorchObs) -> CategoricalDistribution:
        return self.distribution_and_values(obs)[0]

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        """Values ``(batch, 1)`` float32 of the observations (0 for an empty one)."""
        real = real_rows(obs)
        if real is not None:
            return on_real_rows(self.predict_values, obs, real, self._zeros(real, 1))
        return self.value_head(self._last_hidden(obs, self.lm, cached=True).float())

    def _zeros(self, real: th.Tensor, *shape: int) -> th.Tensor:
        """float32 zeros ``(batch, *shape)``, the outputs of a batch of empty observations"""
        return th.zeros((len(real), *shape), device=self.device)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        real = real_rows(observation)
        if real is not None:
            empty = th.zeros(len(real), dtype=th.long, device=self.device)
            return on_real_rows(self._predict, observation, real, empty, deterministic=deterministic)
        return self._sample(self.get_distribution(observation), deterministic)

    @th.no_grad()
    def reference_log_prob(self, obs: PyTorchObs, actions: th.Tensor) -> th.Tensor:
        """
        Log-probabilities of ``actions`` under the frozen reference model, ``(batch,)`` float32.

        An empty observation (``attention_mask`` all zero) gets 0, as :meth:`forward` gives it.

        :raises ValueError: if the policy was built with ``use_reference_model=False``
        """
        if self.reference_model is None:
            raise ValueError("This policy has no reference model: build it with policy_kwargs=dict(use_reference_model=True).")
        real = real_rows(obs)
        if real is not None:
            return on_real_rows(self.reference_log_prob, obs, real, self._zeros(real), actions)
        with self.reference_context():
            hidden = self._last_hidden(obs, self.reference_model)
            logits = self._logits(hidden, self.reference_model, obs)
        return th.log_softmax(logits, dim=-1).gather(1, actions.long().reshape(-1, 1)).squeeze(1)

    # --- export -------------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str) -> None:
        """
        Export the fine-tuned LM and its tokenizer with ``save_pretrained`` (loadable by ``AutoModelForCausalLM``),
        plus the value head as ``value_head.pt``.
        """
        os.makedirs(save_directory, exist_ok=True)
        if self._peft:  # a plain model with the adapters merged in, for transformers users
            copy.deepcopy(self._peft[0]).merge_and_unload().save_pretrained(save_directory)
        else:
            self.lm.save_pretrained(save_directory)
        self.tokenizer.save_pretrained(save_directory)
        th.save(self.value_head.state_dict(), os.path.join(save_directory, "value_head.pt"))


LMPolicy = CausalLMActorCriticPolicy
