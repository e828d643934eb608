"""FSDP mode of data-parallel PPO: the LM's gradients and Adam state sharded across ranks (``torch.distributed.fsdp``).

:func:`~sb3_textrl.distributed.prepare_model` with ``fsdp=True`` wraps the policy with PyTorch's FSDP2
(``fully_shard``): one group per decoder layer, one for the rest of the LM (embeddings, final norm, LM head, tied or
not) and one for the value head. Each rank then holds:

- a **shard** of every trainable parameter, of its gradient and of its Adam moments (the optimizer is rebuilt over the
  shards, a ``DTensor`` each): for Adam, gradients and moments are 3/4 of a replica's training state;
- **full parameters** (FSDP's all-gathered copy) whenever ranks may run different forwards: rollouts (the KV cache
  restarts, episodes end), rank 0's evaluations and the reference passes. Those forwards make no collective.

Where the collectives happen (every rank makes them at the same point, in the same order):

- after wrapping: one forward of the LM on a dummy token, which all-gathers every group;
- in each ``loss.backward()``: every group reduce-scatters (averages) its gradients into the shards once, and frees its
  full parameters (``reshard_after_backward``); SB3's ``clip_grad_norm_`` then sees sharded gradients, whose norm is
  the global one (one all-reduce), and ``optimizer.step()`` steps the shards;
- after each ``optimizer.step()`` (a post-step hook): every group all-gathers its updated parameters, so the next
  minibatch, the next rollout and rank 0's evaluation run on full, up-to-date weights;
- to save: :meth:`ShardedPolicy.full_state_dict` gathers the full state dict (rank 0 gets it) and all-gathers again.

Every rank takes as many minibatches (:class:`~sb3_textrl.distributed.DistributedEpisodeRolloutBuffer`) and each
minibatch runs exactly one forward of the LM with gradients, so the reduce-scatters line up. Prefix sharing would run
one *or two* forwards per minibatch, depending on the data of each rank (two forwards through a layer before one
backward make two reduce-scatters): it is refused.

The frozen reference model stays a full replica on each rank: it has no gradients nor optimizer state to shard, and
it runs in the rollouts' data-dependent forwards, where a sharded model would need collectives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch as th
import torch.distributed as dist
from torch import nn

__all__ = ["ShardedPolicy", "check_fsdp_policy", "decoder_layers"]


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """
    The decoder layers of a Hugging Face causal LM: the modules whose class ``lm._no_split_modules`` names (the blocks
    that ``device_map`` never splits), in the order of ``lm.modules()``.

    :raises ValueError: if the LM names no such module
    """
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [module for module in lm.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(
            f"FSDP mode: cannot find the decoder layers of {type(lm).__name__} (its `_no_split_modules` is {names or None}): "
            "use data-parallel training without `fsdp`."
        )
    return layers


def check_fsdp_policy(policy: nn.Module) -> None:
    """
    Refuse the policies FSDP mode cannot train correctly.

    :raises ValueError: for a policy that is not an ``LMPolicy``, with ``prefix_sharing=True`` (see the module docstring), with
        ``lora_config`` (its trainable state is small: average its gradients with ``fsdp=False``), or with an
        optimizer that holds state (a resumed run: FSDP mode starts with a fresh optimizer)
    """
    from sb3_textrl.policies import CausalLMActorCriticPolicy

    if not isinstance(policy, CausalLMActorCriticPolicy):
        raise ValueError(f"FSDP mode needs an LMPolicy, got {type(policy).__name__}.")
    if policy.prefix_sharing:
        raise ValueError(
            "FSDP mode: `prefix_sharing=True` runs one or two forwards of the LM per minibatch depending on each rank's "
            "data, so the ranks' reduce-scatters would not line up: build the policy with "
            "policy_kwargs=dict(prefix_sharing=False)."
        )
    if getattr(policy, "lora_config", None) is not None:
        raise ValueError(
            "FSDP mode does not shard LoRA adapters (their gradients and Adam state are small): train with "
            "`lora_config` without `fsdp` (the default data-parallel mode averages the adapters' gradients)."
        )
    if policy.optimizer.state:
        raise ValueError(
            "FSDP mode rebuilds the optimizer over the parameter shards, but this policy's optimizer holds state "
            "(a loaded or resumed model): start a new run, or resume without `fsdp`."
        )


class ShardedPolicy:
    """
    An ``LMPolicy`` wrapped in place with FSDP2 (``fully_shard``) for data-parallel PPO: gradients and Adam state
    sharded, full parameters between updates (see :mod:`sb3_textrl.distributed.fsdp`). All ranks must build it at the
    same point, from identical weights (broadcast them first).

    The policy keeps its class and its attributes; its trainable parameters become ``DTensor`` shards while gradients
    are reduced and the optimizer steps, and its optimizer (``policy.optimizer``) is replaced by one of the same class
    and hyperparameters over the shards.

    :param policy: an ``LMPolicy`` (``prefix_sharing=False``, no ``lora_config``, fresh optimizer), on its device
    :param mesh: a 1-D device mesh over all ranks (default: ``init_device_mesh`` on the policy's device type)
    :raises ValueError: see :func:`check_fsdp_policy`, :func:`decoder_layers`
    """

    def __init__(self, policy: nn.Module, mesh: Any = None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        check_fsdp_policy(policy)
        device = next(policy.parameters()).device
        if mesh is None:
            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        self.policy = policy
        self.mesh = mesh
        lm = policy.lm
        # parameters stay full after forwards (no all-gather in backward); each backward frees them after its
        # reduce-scatter, and the post-step hook gathers them again
        for layer in decoder_layers(lm):
            fully_shard(layer, mesh=mesh, reshard_after_forward=False)
        fully_shard(lm, mesh=mesh, reshard_after_forward=False)  # embeddings, final norm, LM head (tied or not)
        fully_shard(policy.value_head, mesh=mesh, reshard_after_forward=False)
        self.modules = [module for module in policy.modules() if hasattr(module, "unshard") and hasattr(module, "reshard")]
        for module in self.modules:
            # the parameters are full when a backward starts: no all-gather in backward. FSDP would otherwise prefetch
            # groups in the order of the forwards recorded since the last backward, which rollouts and rank 0's
            # evaluation make different on each rank
            module.set_unshard_in_backward(False)
        # one forward through the LM's own forward makes `lm` FSDP's root (the policy runs `lm.base_model`, whose first
        # layer would otherwise become a root of its own) and all-gathers every group; then the value head
        with th.no_grad():
            lm(input_ids=th.zeros((1, 1), dtype=th.long, device=device), use_cache=False)
            policy.value_head(th.zeros((1, policy.value_head.in_features), device=device))
        for module in self.modules:
            module.reshard()  # local: registers the shards, which the optimizer steps
        old = policy.optimizer
        trainable = [p for p in policy.parameters() if p.requires_grad]  # in the same order as before
        policy.optimizer = type(old)(trainable, **old.defaults)
        self.unshard()
        policy.optimizer.register_step_post_hook(self._after_step)
        if hasattr(policy, "reset_kv_cache"):
            policy.reset_kv_cache()  # the LM's parameters are new tensors

    def _after_step(self, optimizer: th.optim.Optimizer, args, kwargs) -> None:
        self.unshard()  # first: the KV cache's reset below collects the LM's (now full) parameters
        self.policy._after_optimizer_step(optimizer, args, kwargs)  # LMPolicy's own hook: free gradients, drop the cache

    def unshard(self) -> None:
        """All-gather the full parameters of every group that holds only its shard (a collective: all ranks call it)."""
        for module in self.modules:
            module.unshard()

    def full_state_dict(self) -> dict[str, th.Tensor]:
        """
        The policy's full state dict on CPU, as a single-process ``LMPolicy`` has it (a collective: all ranks call it;
        the parameters are all-gathered again afterwards).

        :return: the state dict on rank 0, ``{}`` on the other ranks
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.policy, options=options)
        self.unshard()  # state_dict() reshards every group (any state_dict() call does: only this one may be made)
        return state

    @contextlib.contextmanager
    def as_full_state(self, state: dict[str, th.Tensor]) -> Iterator[None]:
        """
        Within the block, ``policy.state_dict()``, ``policy.lm.state_dict()`` and ``policy.optimizer.state_dict()``
        return a single-process policy's: ``state`` (from :meth:`full_state_dict`), its ``lm.`` part, and an optimizer
        state without the sharded moments (a loaded model's Adam starts afresh). Rank 0 saves with it
        (``model.save``, ``policy.save_pretrained``); it makes no collective.

        :param state: the full state dict (rank 0's :meth:`full_state_dict`)
        """
        policy, lm, optimizer = self.policy, self.policy.lm, self.policy.optimizer
        lm_state = {key[len("lm.") :]: value for key, value in state.items() if key.startswith("lm.")}
        groups = optimizer.state_dict()["param_groups"]
        policy.state_dict = lambda *args, **kwargs: dict(state)
        lm.state_dict = lambda *args, **kwargs: dict(lm_state)
        optimizer.state_dict = lambda: {"state": {}, "param_groups": [dict(group) for group in groups]}
        try:
            yield
        finally:
            for module in (policy, lm, optimizer):
                del module.state_dict
