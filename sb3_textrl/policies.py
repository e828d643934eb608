"""``LMPolicy``: an SB3 actor-critic policy whose actor is a Hugging Face causal LM."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
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
from sb3_textrl.lm.loading import load_causal_lm, load_tokenizer
from sb3_textrl.lm.log_probs import lm_head_logits, log_prob_and_entropy, sample_categorical
from sb3_textrl.lm.optim import ADAM_CLASSES, allocate_adam_state, release_unstepped_adam_state
from sb3_textrl.lm.packing import forward_packed, packable
from sb3_textrl.lm.prefix_sharing import forward_suffixes, prefix_cache, shared_prefix_length, split_prefix
from sb3_textrl.lm.tokens import last_token_index, position_ids

# bound on the elements of the (chunk, batch, length) comparison that finds shared prefixes
_COVER_CHUNK_ELEMENTS = 1 << 24


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


def covering_rows(input_ids: th.Tensor, attention_mask: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """
    Group observations that are prefixes of one another, so one forward pass serves them all.

    Under causal attention, the hidden state at the last token of row ``i`` only depends on the tokens and mask up to
    that position. Row ``j`` *covers* row ``i`` when both agree there; then row ``i``'s outputs can be read off row
    ``j``'s forward pass at the same position. All the steps of one episode are covered by its last observation.

    :param input_ids: ``(batch, length)`` int64 token ids
    :param attention_mask: ``(batch, length)`` int64 mask
    :return: ``rows``, the indices of the rows to run (``(n_rows,)``), and ``cover``, for each input row the index
        into ``rows`` of the row that covers it (``(batch,)``)
    """
    batch, length = input_ids.shape
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    last = last_token_index(attention_mask)
    positions = th.arange(length, device=input_ids.device)
    best = th.empty(batch, dtype=th.long, device=input_ids.device)
    chunk = max(1, _COVER_CHUNK_ELEMENTS // max(1, batch * length))
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        mask_i = mask[start:stop, None, :]
        same = (mask_i == mask[None]) & (~mask_i | (input_ids[start:stop, None, :] == input_ids[None]))
        relevant = positions[None, None, :] <= last[start:stop, None, None]
        covers = (same | ~relevant).all(dim=-1)  # (chunk, batch): row j covers row i
        best[start:stop] = th.where(covers, lengths[None, :], -1).argmax(dim=1)
    rows, cover = th.unique(best, return_inverse=True)
    return rows, cover


class CausalLMActorCriticPolicy(ActorCriticPolicy):
    """
    Actor-critic policy over a causal language model, for SB3's on-policy algorithms (PPO, A2C, TRPO, REINFORCE).

    The actor is the LM: its LM-head logits (float32) at the last attended token of the observation are the
    ``Categorical`` action distribution over the next token. The critic is a value head, a zero-initialised
    ``Linear(hidden_size, 1)``, on the LM's last hidden state at the same token (shared trunk, one trainable copy
    of the LM). Dropout is always off, so rollouts and updates see the same distribution. Position ids come from the
    attention mask (left padding is exact).

    A frozen copy of the initial LM, the reference model, gives ``ref_logp`` for the KL penalty of
    Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences" (https://arxiv.org/abs/1909.08593);
    see :class:`~sb3_textrl.common.callbacks.KLPenaltyCallback`. It is outside ``parameters()``, the optimizer and the
    state dict (a saved model holds the LM once; loading rebuilds the reference from ``model_name_or_path``).

    Observations from the same episode are prefixes of one another: ``evaluate_actions``, ``get_distribution`` and
    ``predict_values`` run one forward pass per group of such observations (see :func:`covering_rows`), so a minibatch
    holding whole episodes costs one forward pass per episode. In eval mode without gradients (rollouts, ``predict``),
    a KV cache carried from call to call (:class:`~sb3_textrl.lm.kv_cache.RolloutKVCache`) makes each new token cost one
    incremental forward; it is dropped whenever the weights may have changed (mode switch, in-place update, loading).
    The optimizer frees the gradients right after each ``step()`` (``zero_grad(set_to_none=True)`` in a post-step
    hook): read them before stepping. Adam's (and AdamW's) state is made when the policy first enters training mode
    (``set_training_mode(True)``, before the first minibatch), not at the first ``step()``: zero moments, as that step
    would make them, placed next to the weights rather than among a minibatch's freed activations
    (:func:`~sb3_textrl.lm.optim.allocate_adam_state`).

    :param observation_space: a :class:`~sb3_textrl.common.spaces.TokenObservationSpace` (or a ``Box`` of token ids)
    :param action_space: ``Discrete(n)``, ``n`` the LM's logits width
    :param lr_schedule: learning rate schedule
    :param model_name_or_path: the LM to fine-tune (alias, ``.gguf`` file or local directory); default: the one the
        environment was built for (``observation_space.model_name_or_path``). Never a model object: it is pickled.
    :param model_kwargs: keyword arguments for ``AutoModelForCausalLM.from_pretrained``, e.g.
        ``dict(attn_implementation="eager")`` (needed by TRPO's double backward on CPU)
    :param use_reference_model: keep a frozen copy of the initial LM for the KL penalty
    :param use_kv_cache: carry a KV cache across calls made without gradients (rollouts); results are the same
    :param prefix_sharing: run the opening tokens that observations share (a chat template's system prompt) once per
        batch, in rollouts, updates and reference passes (:mod:`sb3_textrl.lm.prefix_sharing`), and in packed updates and
        reference passes the opening of episodes on the same prompt once per group
        (:func:`~sb3_textrl.lm.packing.group_openings`); results are the same up to float rounding
    :param packing: run the rows of a training or reference pass packed side by side in a few rows of ~256 tokens,
        without padding (:mod:`sb3_textrl.lm.packing`); results are the same up to float rounding
    :param prepacked_weights: on a CPU in float32, run the rollouts' MLP layers and LM head on oneDNN-prepacked
        copies of their weights, made again after each update and dropped when training starts
        (:mod:`sb3_textrl.lm.weight_prepacking`): rollouts ~15-25 % faster here, results the same up to float rounding; under
        glibc's allocator the peak RSS can end ~1 % higher (the freed copies fragment its heap)
    :param activation_checkpointing: keep only each decoder layer's input in training passes and recompute the layer
        in the backward pass (:mod:`sb3_textrl.lm.activation_checkpointing`): ``True`` checkpoints every layer, an int
        ``n`` every ``n``-th. Activation memory of a minibatch falls ~20x (every layer), for ~10-20 % more update time (SmolLM2
        on a CPU); results are the same. Default ``False``. Needs transformers >= 5 (``activation_checkpointing_enable``)
    :param lean_activations: in training passes, run the LM's gated MLPs and RMSNorms (Llama-style models) through
        autograd functions that keep only their inputs for backward and recompute the elementwise parts
        (:mod:`sb3_textrl.lm.lean_activations`): a minibatch's activations ~1/3 smaller for SmolLM2, no matrix product
        recomputed, results the same up to float rounding. Layers of other forms keep their stock forward
    :param autocast_dtype: run the LM's trunk under ``torch.autocast`` in this dtype (``"bfloat16"`` or
        ``"float16"``), e.g. on a GPU; the LM head, logits, log-probs and values stay float32. Default: off (float32).
        On a CPU without native instructions for that dtype (e.g. AVX2 only: no AVX512-BF16 or AMX) the matrix products
        are emulated: measured 6x slower forwards and 35x slower backwards than float32 on an AVX2 EPYC; a
        ``UserWarning`` says so at the first autocast
    :param lora_config: a peft ``LoraConfig`` (or its dict): train low-rank adapters (and the value head) only; the
        reference log-probs then come from the same model with the adapters disabled (no second copy in memory), and
        the saved state holds only the trained tensors (the base weights are reloaded from ``model_name_or_path``)
    :param kwargs: the other keyword arguments of ``ActorCriticPolicy`` (``optimizer_class``, ``optimizer_kwargs``, ...;
        Adam and AdamW default to ``dict(eps=1e-5, fused=True)``);
        ``net_arch`` and ``activation_fn`` are ignored (there is no MLP)
    :raises ValueError: if no LM is named, the LM's logits width differs from ``action_space.n``, the environment
        was built for an LM with another tokenizer, a switch (``use_reference_model``, ``use_kv_cache``,
        ``prefix_sharing``, ``packing``, ``prepacked_weights``, ``lean_activations``) is not a bool, or
        ``activation_checkpointing`` is not a bool or a positive int or not supported by the LM or the installed
        transformers
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
        self.use_reference_model = use_reference_model
        self.use_kv_cache = use_kv_cache
        self.prefix_sharing = prefix_sharing
        self.packing = packing
        self.prepacked_weights = prepacked_weights
        self.lean_activations = lean_activations
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
        kwargs.setdefault("ortho_init", False)
        optimizer_class = kwargs.get("optimizer_class", th.optim.Adam)
        if optimizer_class in ADAM_CLASSES:
            # SB3's default Adam eps, and the fused kernel: ~5x faster steps over an LM's ~100M parameters
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
        self._kv_cache.reset()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # a copied optimizer comes without its hooks (torch.optim.Optimizer.__getstate__ keeps none): hook the copy
        if "optimizer" in state and self._after_optimizer_step not in self.optimizer._optimizer_step_post_hooks.values():
            self.optimizer.register_step_post_hook(self._after_optimizer_step)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            model_name_or_path=self.model_name_or_path,
            model_kwargs=self.model_kwargs,
            use_reference_model=self.use_reference_model,
            use_kv_cache=self.use_kv_cache,
            prefix_sharing=self.prefix_sharing,
            packing=self.packing,
            prepacked_weights=self.prepacked_weights,
            activation_checkpointing=self.activation_checkpointing,
            lean_activations=self.lean_activations,
            autocast_dtype=self.autocast_dtype,
            lora_config=self.lora_config,
        )
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

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        if self.device.type == "cpu" and _emulated_on_cpu(self.autocast_dtype):
            warnings.warn(
                f"`autocast_dtype={self.autocast_dtype!r}` on a CPU without native {self.autocast_dtype} matrix "
                "instructions: the products are emulated, several times slower than float32 (measured 6x forward, "
                "35x backward on an AVX2 CPU). Build the policy with `autocast_dtype=None` on this machine.",
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
        if mode != self.training:
            self._kv_cache.reset()  # a new phase (rollout or update) starts
        if mode and hasattr(self, "optimizer"):  # Adam's moments before the first minibatch's activations (optim.py)
            allocate_adam_state(self.optimizer)
        super().train(mode)
        self.lm.eval()  # dropout stays off: the probability ratio must be 1 at the first update
        if self.activation_checkpointing:
            set_checkpointing(self.lm, mode)
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._kv_cache.reset()
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
        # the KV cache serves rollouts and predict() (eval mode, no gradients); never training steps such as TRPO's
        # line search
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

    def _distribution_and_values(self, obs: PyTorchObs) -> tuple[CategoricalDistribution, th.Tensor]:
        hidden = self._last_hidden(obs, self.lm, cached=True)
        distribution = self.action_dist.proba_distribution(action_logits=self._logits(hidden, self.lm, obs, cached=True))
        values = self.value_head(hidden.float())
        return distribution, values

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """
        Sample the next token.

        :param obs: token observations, ``(n_envs, max_length)`` int64 ``input_ids`` and ``attention_mask``
        :param deterministic: take the most likely token (greedy decoding)
        :return: actions ``(n_envs,)`` int64 token ids, values ``(n_envs, 1)`` float32, log-probs ``(n_envs,)`` float32
        """
        distribution, values = self._distribution_and_values(obs)
        actions = self._sample(distribution, deterministic)
        return actions, values, distribution.log_prob(actions)

    @staticmethod
    def _sample(distribution: CategoricalDistribution, deterministic: bool) -> th.Tensor:
        if deterministic:
            return distribution.mode()
        return sample_categorical(distribution.distribution.probs)

    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """
        Values, log-probs and entropies of the given tokens, one forward pass per group of prefix-sharing observations.

        :param obs: ``(batch, max_length)`` int64 ``input_ids`` and ``attention_mask``
        :param actions: ``(batch,)`` token ids
        :return: values ``(batch, 1)``, log-probs ``(batch,)``, entropies ``(batch,)``, all float32
        """
        hidden = self._last_hidden(obs, self.lm, cached=True)
        # no Categorical object here: its autograd graph keeps ~4 vocabulary-sized tensors per row, this keeps one
        log_prob, entropy = log_prob_and_entropy(self._logits(hidden, self.lm, obs), actions.long().flatten())
        return self.value_head(hidden.float()), log_prob, entropy

    def get_distribution(self, obs: PyTorchObs) -> CategoricalDistribution:
        return self._distribution_and_values(obs)[0]

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        """Values ``(batch, 1)`` float32 of the observations."""
        return self.value_head(self._last_hidden(obs, self.lm, cached=True).float())

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self._sample(self.get_distribution(observation), deterministic)

    @th.no_grad()
    def reference_log_prob(self, obs: PyTorchObs, actions: th.Tensor) -> th.Tensor:
        """
        Log-probabilities of ``actions`` under the frozen reference model, ``(batch,)`` float32.

        :raises ValueError: if the policy was built with ``use_reference_model=False``
        """
        if self.reference_model is None:
            raise ValueError("This policy has no reference model: build it with policy_kwargs=dict(use_reference_model=True).")
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


@functools.cache
def _emulated_on_cpu(dtype: str) -> bool:
    """Whether this CPU lacks native matrix instructions for ``dtype`` (oneDNN's own check; False if unknown)."""
    check = {"bfloat16": "_is_mkldnn_bf16_supported", "float16": "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return not getattr(th.ops.mkldnn, check)()
    except (AttributeError, RuntimeError):
        return False


def make_peft_model(lm: PreTrainedModel, lora_config: Any):
    """
    Inject LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) into ``lm`` in place with peft.

    :param lm: the causal LM; its base weights are frozen
    :param lora_config: a ``peft.LoraConfig`` or the dict of its arguments
    :return: the ``PeftModel`` wrapping ``lm``
    :raises ValueError: if peft is not installed or the config is not a LoRA config
    """
    try:
        import peft
    except ImportError as error:
        raise ValueError("`lora_config` needs the `peft` package: `pip install peft`.") from error
    if isinstance(lora_config, dict):
        lora_config = peft.LoraConfig(**lora_config)
    if not isinstance(lora_config, peft.LoraConfig):
        raise ValueError(
            f"`lora_config` must be a peft.LoraConfig or a dict of its arguments, got {type(lora_config).__name__}."
        )
    return peft.get_peft_model(lm, copy.deepcopy(lora_config))


LMPolicy = CausalLMActorCriticPolicy
