"""Activation checkpointing of the policy's LM during training passes, compatible with prefix sharing.

Paper: https://arxiv.org/abs/1604.06174

transformers' checkpointing (``activation_checkpointing_enable``) keeps only each decoder layer's input during the
forward pass and recomputes the layer in the backward pass (Chen et al. 2016, "Training Deep Nets with Sublinear
Memory Cost"): a checkpointed layer keeps one ``hidden_size`` vector per token for backward instead of all its
activations, for one more forward pass of compute. Three things keep it exact with this package's training passes:

- the shared prefix's keys and values reach the layers in a cache that is only read
  (:func:`~sb3_textrl.lm.prefix_sharing.make_cache` with ``read_only=True``), so a
  layer recomputed in the backward pass sees the same keys as in the forward pass (transformers drops any other
  cache under checkpointing);
- the recomputation runs the attention implementation the forward pass ran (packed passes switch it for their
  duration, which is over by the time of the backward pass);
- LMPolicy keeps its LM in eval mode (no dropout), so checkpointing is switched on per decoder layer
  (:func:`set_checkpointing`), not through ``lm.train()``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from transformers import PreTrainedModel

__all__ = ["enable_checkpointing", "paused", "set_checkpointing"]

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # transformers < 4.52: no per-layer checkpointing class
    GradientCheckpointingLayer = type("GradientCheckpointingLayer", (), {})


def _layers(lm: PreTrainedModel) -> list[GradientCheckpointingLayer]:
    return [module for module in lm.modules() if isinstance(module, GradientCheckpointingLayer)]


class _AttentionImplementation:
    """Within the block, ``lm`` runs this attention implementation (reusable: a double backward recomputes twice)."""

    def __init__(self, lm: PreTrainedModel, implementation: str):
        self.lm, self.implementation, self.previous = lm, implementation, []

    def __enter__(self) -> None:
        self.previous.append(self.lm.config._attn_implementation)
        self.lm.config._attn_implementation = self.implementation

    def __exit__(self, *exc) -> None:
        self.lm.config._attn_implementation = self.previous.pop()


def _contexts(lm: PreTrainedModel) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    # called by torch.utils.checkpoint as a layer runs forward: its recomputation will use this attention again
    return contextlib.nullcontext(), _AttentionImplementation(lm, lm.config._attn_implementation)


def enable_checkpointing(lm: PreTrainedModel, every_n_layers: int = 1) -> None:
    """
    Checkpoint every ``every_n_layers``-th decoder layer of ``lm`` (non-reentrant ``torch.utils.checkpoint``) whenever
    :func:`set_checkpointing` has switched it on; it starts switched off.

    :param lm: the causal LM, changed in place (its decoder layers, each a transformers ``GradientCheckpointingLayer``)
    :param every_n_layers: checkpoint layers ``0, n, 2n, ...`` (default 1: every layer)
    :raises ValueError: if the installed transformers is older than 5 (no ``activation_checkpointing_enable``, no
        read-only caches in checkpointed layers), or if the model does not support checkpointing
    """
    # transformers < 5 has no activation_checkpointing_enable and drops every cache (the shared prefix) in checkpointed
    # layers: the results would be silently wrong
    if not hasattr(lm, "activation_checkpointing_enable") or not hasattr(
        GradientCheckpointingLayer, "_can_checkpoint_with_cache"
    ):
        raise ValueError(
            "activation_checkpointing needs transformers >= 5 (activation_checkpointing_enable and read-only caches in "
            "checkpointed layers): upgrade transformers or build the policy with activation_checkpointing=False."
        )
    if not getattr(lm, "supports_gradient_checkpointing", False) or not _layers(lm):
        raise ValueError(
            f"{type(lm).__name__} does not support activation checkpointing: build the policy with "
            "policy_kwargs=dict(activation_checkpointing=False)."
        )
    kwargs = dict(use_reentrant=False, context_fn=functools.partial(_contexts, lm))
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    for layer in _layers(lm):
        # training passes give the layers the shared prefix in a read-only cache (make_cache(read_only=True))
        layer._can_checkpoint_with_cache = True
    set_checkpointing(lm, False)


def set_checkpointing(lm: PreTrainedModel, active: bool) -> None:
    """
    Switch checkpointing on or off: transformers checkpoints a layer in training mode only, so this sets the training
    flag of the decoder layers alone (their children, e.g. dropout, stay in eval mode).

    :param lm: the causal LM, after :func:`enable_checkpointing` (otherwise its layers never checkpoint either way)
    :param active: ``True`` for training passes, ``False`` for rollouts and reference passes
    """
    for layer in _layers(lm):
        layer.training = active


@contextlib.contextmanager
def paused(lm: PreTrainedModel) -> Iterator[None]:
    """
    Within the block, the layers run without checkpointing (e.g. to fill a cache, which checkpointing forbids); those
    that checkpointed before do again on exit, errors included.

    :param lm: the causal LM
    """
    layers = [layer for layer in _layers(lm) if layer.gradient_checkpointing and layer.training]
    for layer in layers:
        layer.training = False
    try:
        yield
    finally:
        for layer in layers:
            layer.training = True
