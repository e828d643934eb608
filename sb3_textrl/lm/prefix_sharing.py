"""Prefix sharing: sequences that open with the same tokens (a chat template's system prompt) run that prefix once.

Paper (prefix caching, as in SGLang's RadixAttention): https://arxiv.org/abs/2312.07104

A chat model's prompts usually start with the same tokens (SmolLM2's template adds a ~30-token system prompt to every
prompt). Under causal attention the keys and values of those tokens do not depend on what follows, so a batch of
rows with a common prefix of ``p`` tokens is run as one forward over the prefix (one row) and one forward over the
rows' suffixes attending to the prefix's key/value cache (as prefix caching in vLLM or SGLang). The results equal a
forward over the full rows up to float rounding; the prefill costs ``p + sum(suffix lengths)`` tokens instead of
``sum(row lengths)``. Gradients flow through the shared prefix (it is computed once per batch, with autograd).

The module also holds this package's few contacts with transformers' cache API: the keyword a model's forward takes a
cache through (:func:`cache_keyword`), the cache a forward returns (:func:`output_cache`), a cache made from keys and
values (:func:`make_cache`) and the keys and values of a cache (:func:`cache_layers`).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch as th
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput

from sb3_textrl.lm.activation_checkpointing import paused

__all__ = [
    "MIN_PREFIX_LENGTH",
    "AttendedSpans",
    "LayerKeysValues",
    "SplitRows",
    "SuffixForward",
    "attended_spans",
    "cache_keyword",
    "cache_layers",
    "forward_suffixes",
    "make_cache",
    "output_cache",
    "prefix_cache",
    "shared_prefix_length",
    "split_prefix",
]

# shorter shared prefixes are not worth a second forward call
MIN_PREFIX_LENGTH = 8

#: One decoder layer's cached ``(keys, values)``, each ``(batch, kv_heads, length, head_dim)`` in the LM's dtype
#: (``batch`` dropped where a single row is kept).
LayerKeysValues = tuple[th.Tensor, th.Tensor]

# the keyword through which a model class's forward takes a KV cache (read once per class from its signature)
_CACHE_KEYWORDS: dict[type, str] = {}
# transformers' own name for it, for a forward whose signature names neither (``**kwargs`` only): its outputs' field
_DEFAULT_CACHE_KEYWORD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_keyword(model: nn.Module) -> str:
    """
    The keyword argument through which ``model``'s forward takes a KV cache.

    transformers renamed ``past_key_values`` to ``cache`` (``LlamaModel.forward(..., cache=...)``; the old name warns
    with a ``FutureWarning`` at every call and goes in 5.40). Older releases, and models whose own code still names it
    ``past_key_values`` (remote code), would take a ``cache=`` argument into ``**kwargs`` and silently ignore it, so
    the name is read from the forward's signature, once per model class.

    :param model: the module whose forward is called (an LM's ``base_model``)
    :return: ``"cache"`` or ``"past_key_values"`` (where the signature names neither: the installed transformers' name)
    """
    keyword = _CACHE_KEYWORDS.get(type(model))
    if keyword is None:
        parameters = inspect.signature(type(model).forward).parameters
        keyword = next((name for name in ("cache", "past_key_values") if name in parameters), _DEFAULT_CACHE_KEYWORD)
        _CACHE_KEYWORDS[type(model)] = keyword
    return keyword


def output_cache(output: ModelOutput) -> DynamicCache | None:
    """
    The KV cache a forward returned: ``output.cache``, or ``output.past_key_values`` for an output class that still
    has that field (transformers before the rename; reading the old name of a renamed field logs a deprecation).

    :param output: a model's output (``BaseModelOutputWithPast`` or alike)
    :return: the cache, ``None`` where the forward ran with ``use_cache=False``
    """
    if "cache" in getattr(type(output), "__dataclass_fields__", ()):
        return output.cache
    return output.past_key_values


def cache_layers(cache: DynamicCache) -> list[LayerKeysValues]:
    """
    Per-layer ``(keys, values)`` of a cache (its own tensors, not copies).

    :param cache: a ``DynamicCache`` (transformers >= 4.56: one ``cache.layers`` entry per decoder layer)
    :return: per layer, keys and values ``(batch, kv_heads, length, head_dim)``
    """
    return [(layer.keys, layer.values) for layer in cache.layers]


class _ReadOnlyLayer(DynamicLayer):
    """A cache layer whose ``update`` returns the cached keys and values followed by the new ones, storing nothing."""

    def update(self, key_states: th.Tensor, value_states: th.Tensor, *args, **kwargs) -> tuple[th.Tensor, th.Tensor]:
        return th.cat([self.keys, key_states], dim=-2), th.cat([self.values, value_states], dim=-2)


def make_cache(layers: list[LayerKeysValues], read_only: bool = False, batch: int | None = None) -> DynamicCache:
    """
    A ``DynamicCache`` holding the given per-layer ``(keys, values)``.

    The cache is made without the model's config, so every layer is a plain ``DynamicLayer`` (no sliding window: the
    packed caches of this package hold every column a token may see).

    :param layers: per layer, keys and values ``(batch, kv_heads, length, head_dim)``
    :param read_only: forward passes read the cache but never extend it, so the same pass run twice (as a
        checkpointed layer is, see :mod:`sb3_textrl.lm.activation_checkpointing`) sees the same keys. Default ``False``
    :param batch: expand one-row keys and values to this many rows (views, not copies); ``None`` (default): as given
    :return: the cache, holding ``layers``' tensors (or views of them), not copies
    """
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        if batch is not None:
            keys, values = keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)
        cache.update(keys, values, index)
    if read_only:
        for layer in cache.layers:
            layer.__class__ = _ReadOnlyLayer
    return cache


class AttendedSpans(NamedTuple):
    """Where each row's attended tokens are, as :func:`attended_spans` finds them."""

    start: th.Tensor
    """``(batch,)`` int64: the first attended column (0 for a row that attends to nothing)"""
    lengths: th.Tensor
    """``(batch,)`` int64: the number of attended tokens"""
    contiguous: th.Tensor
    """``(batch,)`` bool: whether the attended tokens are one run (no holes in the mask)"""


def attended_spans(attention_mask: th.Tensor) -> AttendedSpans:
    """
    First attended column, number of attended tokens, and whether those tokens are contiguous, per row.

    :param attention_mask: ``(batch, length)`` int64 or bool (1/True: attended)
    :return: ``start``, ``lengths`` and ``contiguous``, each ``(batch,)``
    """
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    start = mask.int().argmax(dim=1)
    runs = (mask[:, 1:] & ~mask[:, :-1]).sum(dim=1) + mask[:, 0]
    return AttendedSpans(start, lengths, runs == 1)


def _left_aligned(input_ids: th.Tensor, start: th.Tensor) -> th.Tensor:
    index = (start[:, None] + th.arange(input_ids.shape[1], device=input_ids.device)).clamp(max=input_ids.shape[1] - 1)
    return input_ids.gather(1, index)


def shared_prefix_length(input_ids: th.Tensor, attention_mask: th.Tensor, min_length: int = MIN_PREFIX_LENGTH) -> int:
    """
    The number of tokens every row opens with, leaving each row at least one token of its own.

    :param input_ids: ``(batch, length)`` int64
    :param attention_mask: ``(batch, length)`` int64; rows whose attended tokens are not contiguous share nothing
    :param min_length: shorter common prefixes count as none (default :data:`MIN_PREFIX_LENGTH`)
    :return: ``p >= min_length``, or 0 (fewer than two rows, no long common prefix, or a row with holes in its mask)
    """
    if input_ids.shape[0] < 2:
        return 0
    start, lengths, contiguous = attended_spans(attention_mask)
    if not bool(contiguous.all()):
        return 0
    aligned = _left_aligned(input_ids, start)
    width = int(lengths.min()) - 1  # each row keeps at least its last token
    if width < min_length:
        return 0
    agree = (aligned[:, :width] == aligned[:1, :width]).all(dim=0)
    length = int(agree.int().cumprod(dim=0).sum())
    return length if length >= min_length else 0


class SplitRows(NamedTuple):
    """Rows cut into the prefix they share and their own suffixes, as :func:`split_prefix` cuts them."""

    prefix: th.Tensor
    """``(p,)`` int64: the shared prefix's token ids"""
    suffix_ids: th.Tensor
    """``(batch, suffix_width)`` int64: each row's tokens after the prefix, left-aligned (padding: token 0)"""
    suffix_mask: th.Tensor
    """``(batch, suffix_width)``, ``attention_mask``'s dtype: 1 over each row's suffix tokens (right padding)"""
    offset: th.Tensor
    """``(batch,)`` int64: column ``c`` of row ``i`` is suffix column ``c - offset[i]``"""


def split_prefix(input_ids: th.Tensor, attention_mask: th.Tensor, p: int) -> SplitRows:
    """
    Cut rows that share their first ``p`` attended tokens into the prefix and left-aligned suffixes.

    :param input_ids: ``(batch, length)`` int64
    :param attention_mask: ``(batch, length)`` int64, each row's attended tokens contiguous
    :param p: the number of attended tokens all rows open with (:func:`shared_prefix_length`); 0: no prefix
    :return: ``prefix``, ``suffix_ids``, ``suffix_mask`` and ``offset`` (see :class:`SplitRows`); ``suffix_width`` is
        the longest row's number of attended tokens minus ``p``
    """
    start, lengths, _ = attended_spans(attention_mask)
    aligned = _left_aligned(input_ids, start)
    width = int(lengths.max()) - p
    suffix_mask = (th.arange(width, device=input_ids.device)[None, :] < (lengths - p)[:, None]).to(attention_mask.dtype)
    suffix_ids = aligned[:, p : p + width] * suffix_mask  # padding becomes token 0, never attended
    return SplitRows(aligned[0, :p], suffix_ids, suffix_mask, start + p)


def prefix_cache(lm: PreTrainedModel, prefix: th.Tensor, inputs_embeds: th.Tensor | None = None) -> list[LayerKeysValues]:
    """
    Per-layer keys and values of ``prefix``, one row, positions ``0..p-1`` (with autograd, if enabled).

    :param lm: the causal LM (its ``base_model`` runs; checkpointed layers run without checkpointing here, since a
        checkpointed layer fills no cache)
    :param prefix: ``(p,)`` int64 token ids
    :param inputs_embeds: ``(p, hidden_size)``, the prefix's input embeddings if already looked up; default ``None``
    :return: per layer, keys and values ``(1, kv_heads, p, head_dim)`` in the LM's dtype
    """
    p = prefix.shape[0]
    positions = th.arange(p, device=prefix.device)[None]
    tokens = dict(input_ids=prefix[None]) if inputs_embeds is None else dict(inputs_embeds=inputs_embeds[None])
    with paused(lm):  # a checkpointed layer fills no cache
        out = lm.base_model(**tokens, attention_mask=th.ones_like(positions), position_ids=positions, use_cache=True)
    return cache_layers(output_cache(out))


class SuffixForward(NamedTuple):
    """What :func:`forward_suffixes` returns."""

    hidden: th.Tensor
    """``(batch, width, hidden_size)``: the last hidden states over the suffix columns, in the LM's dtype"""
    attention_mask: th.Tensor
    """``(batch, p + width)``, ``suffix_mask``'s dtype: the attention mask over prefix + suffix"""
    cache: DynamicCache | None
    """the cache of prefix + suffix (``use_cache``), else ``None``"""


def forward_suffixes(
    lm: PreTrainedModel,
    prefix_layers: list[LayerKeysValues],
    suffix_ids: th.Tensor,
    suffix_mask: th.Tensor,
    use_cache: bool = False,
) -> SuffixForward:
    """
    Run the suffixes of rows that all open with the prefix whose cache is ``prefix_layers``.

    :param lm: the causal LM (its ``base_model`` runs)
    :param prefix_layers: from :func:`prefix_cache` (one row; expanded to the batch, not copied); empty: no prefix
    :param suffix_ids: ``(batch, width)`` int64, left-aligned
    :param suffix_mask: ``(batch, width)`` int64, right padding
    :param use_cache: return the cache of prefix + suffix (the prefix's keys expanded to the batch); default ``False``:
        the prefix's cache is only read
    :return: ``hidden``, ``attention_mask`` and ``cache`` (see :class:`SuffixForward`)
    """
    batch, width = suffix_ids.shape
    p = prefix_layers[0][0].shape[2] if prefix_layers else 0
    # read-only: the cache ends with the prefix
    past = make_cache(prefix_layers, read_only=not use_cache, batch=batch) if p else None
    mask = th.cat([suffix_mask.new_ones(batch, p), suffix_mask], dim=1)
    positions = (p + th.arange(width, device=suffix_ids.device))[None].expand(batch, -1)
    base = lm.base_model
    out = base(
        input_ids=suffix_ids, attention_mask=mask, position_ids=positions, **{cache_keyword(base): past}, use_cache=use_cache
    )
    return SuffixForward(out[0], mask, output_cache(out) if use_cache else None)
