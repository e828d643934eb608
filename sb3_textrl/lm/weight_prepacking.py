"""
Linear layers of a rollout's forwards on oneDNN-prepacked weights (CPU, float32, no gradients).

A rollout step multiplies a few rows (one new token per env) by every weight matrix of the LM, so it is bound by how
fast the matrix library streams the weights, and MKL's ``linear`` kernel can stream them well below the memory's
bandwidth. oneDNN's kernel, on a copy of the weights reordered into its blocked layout (the ops PyTorch's Inductor uses
when it freezes a CPU model), can stream them faster. The copy costs a reorder after each change of the weights, and
the copies' memory (the packed matrices' size) while a rollout runs: the policy frees its gradients after each
optimizer step, and its :class:`~sb3_textrl.lm.kv_cache.RolloutKVCache` drops the copy when training starts, so the
copy takes the gradients' place. Results equal ``linear``'s up to float32 rounding (a different order of summation).
``benchmarks/rollout.py`` measures rollouts with and without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch as th
from torch import nn

__all__ = ["PrepackedLinears", "mlp_min_numel", "packable_linears"]


def _ops_available() -> bool:
    ops = getattr(th.ops, "mkldnn", None)
    return th.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


def packable_linears(model: nn.Module, min_numel: int = 0) -> list[nn.Linear]:
    """
    The layers of ``model`` whose weights can be prepacked: plain ``nn.Linear`` (not subclasses, which may compute
    something else) with float32 weights on the CPU held whole (not an FSDP shard, a ``DTensor``), and no ``forward``
    already replaced on the instance (hooks of accelerate's offloading do that).

    :param model: any module (its own and its children's layers are listed)
    :param min_numel: leave out the layers whose weight has fewer elements (default 0: none left out)
    :return: the layers, in ``model.modules()`` order; empty where oneDNN's ops are missing from this PyTorch build
    """
    if not _ops_available():
        return []
    return [
        module
        for module in model.modules()
        if type(module) is nn.Linear
        and module.weight.numel() >= min_numel
        and module.weight.device.type == "cpu"
        and module.weight.dtype == th.float32
        and type(module.weight.data) is th.Tensor
        and "forward" not in module.__dict__
    ]


def mlp_min_numel(model: nn.Module) -> int:
    """
    The smallest weight, in elements, that :class:`PrepackedLinears` packs in a decoder: ``2 * hidden_size**2``. The
    MLP's matrices of a transformer are larger (Llama-style models have an intermediate size of about 8/3 of the hidden
    size), its attention projections are not: those would cost their reorder for little gain, and the MLP's copies
    alone stay below the size of the gradients they replace.

    :param model: a module with a transformers ``config`` (its text config's ``hidden_size``)
    :return: ``2 * hidden_size**2``, or 0 for a model without a config or ``hidden_size`` (every layer packs)
    """
    config = getattr(model, "config", None)
    hidden_size = getattr(config.get_text_config(), "hidden_size", None) if config is not None else None
    return 2 * hidden_size**2 if hidden_size else 0


class PrepackedLinears:
    """
    oneDNN-prepacked copies of the weights of a model's MLP layers (:func:`mlp_min_numel`), used in place of the
    layers while :meth:`applied` is entered without gradients, and of its LM head's (:meth:`logits`).

    Nothing checks that the weights still match the copies: call :meth:`clear` whenever they change (the rollout KV
    cache does, whenever it drops its keys and values).

    :param model: the module whose ``nn.Linear`` layers run packed (an LM's decoder)
    :param head: the LM head, packed too (whatever its size) and read through :meth:`logits`: the decoder never calls
        it. Its vocabulary-sized weight is the largest a rollout step streams. ``None`` (default): no head
    """

    def __init__(self, model: nn.Module, head: nn.Module | None = None):
        self.model = model
        self.head = head
        self.packed: dict[nn.Linear, th.Tensor] | None = None  # None: not packed under the current weights

    def clear(self) -> None:
        """Drop the packed copies (the weights changed, or training starts and needs the memory)."""
        self.packed = None

    @contextlib.contextmanager
    def applied(self, rows: int) -> Iterator[None]:
        """
        Run the model's linear layers on packed weights within the context: packs them first if needed.

        Nothing changes with gradients enabled, under autocast, or where no layer can be packed
        (:func:`packable_linears`: another device or dtype, a PyTorch without oneDNN).

        :param rows: the number of rows the forwards multiply (a layout hint for the packing)
        """
        if th.is_grad_enabled() or th.is_autocast_enabled("cpu"):
            yield
            return
        if self.packed is None:  # (an empty dict where nothing is packable: a GPU, bfloat16 weights)
            reorder = th.ops.mkldnn._reorder_linear_weight
            layers = packable_linears(self.model, mlp_min_numel(self.model))
            layers += packable_linears(self.head) if self.head is not None else []
            self.packed = {m: reorder(m.weight.detach(), rows) for m in layers}
        patched = list(self.packed.items())
        for module, weight in patched:
            module.forward = _PackedForward(weight, module.bias)
        try:
            yield
        finally:
            for module, _ in patched:
                module.__dict__.pop("forward", None)

    def logits(self, hidden: th.Tensor) -> th.Tensor | None:
        """
        The head's output on its packed weight: ``hidden @ head.weight.T + head.bias``.

        :param hidden: ``(batch, hidden_size)`` float32, from a forward under the weights the copies were made from
        :return: ``(batch, vocab_size)`` float32, or ``None`` where the head is not packed (no packed forward ran since
            the last :meth:`clear`, another device or dtype) or ``hidden`` is not float32 without gradients
        """
        weight = self.packed.get(self.head) if self.packed else None
        if weight is None or hidden.dtype != th.float32 or th.is_grad_enabled():
            return None
        return _PackedForward(weight, self.head.bias)(hidden)


class _PackedForward:
    """``linear(x, weight, bias)`` on a packed weight: ``x`` ``(..., in_features)`` float32."""

    def __init__(self, weight: th.Tensor, bias: th.Tensor | None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: th.Tensor) -> th.Tensor:
        return th.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [None], "")
