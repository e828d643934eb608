"""Prefix sharing: sequences that open with the same tokens (a chat template's system prompt) run that prefix once.

A chat model's prompts usually start with the same tokens (SmolLM2's template adds a ~30-token system prompt to every
prompt). Under causal attention the keys and values of those tokens do not depend on what follows, so a batch of
rows with a common prefix of ``p`` tokens is run as one forward over the prefix (one row) and one forward over the
rows' suffixes attending to the prefix's key/value cache (as prefix caching in vLLM or SGLang). The results equal a
forward over the full rows up to float rounding; the prefill costs ``p + sum(suffix lengths)`` tokens instead of
``sum(row lengths)``. Gradients flow through the shared prefix (it is computed once per batch, with autograd).
"""

from __future__ import annotations

import torch as th
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from sb3_textrl.lm.activation_checkpointing import paused

# shorter shared prefixes are not worth a second forward call
MIN_PREFIX_LENGTH = 8


def cache_layers(cache: DynamicCache) -> list[tuple[th.Tensor, th.Tensor]]:
    """Per-layer ``(keys, values)``, each ``(batch, kv_heads, length, head_dim)``."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


class _ReadOnlyLayer(DynamicLayer):
    """A cache layer whose ``update`` returns the cached keys and values followed by the new ones, storing nothing."""

    def update(self, key_states: th.Tensor, value_states: th.Tensor, *args, **kwargs) -> tuple[th.Tensor, th.Tensor]:
        return th.cat([self.keys, key_states], dim=-2), th.cat([self.values, value_states], dim=-2)


def make_cache(layers: list[tuple[th.Tensor, th.Tensor]], read_only: bool = False, batch: int | None = None) -> DynamicCache:
    """
    A ``DynamicCache`` holding the given per-layer ``(keys, values)``.

    :param layers: per layer, keys and values ``(batch, kv_heads, length, head_dim)``
    :param read_only: forward passes read the cache but never extend it, so the same pass run twice (as a
        checkpointed layer is, see :mod:`sb3_textrl.lm.activation_checkpointing`) sees the same keys
    :param batch: expand one-row keys and values to this many rows (views, not copies); ``None``: as given
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


def attended_spans(attention_mask: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """First attended column, number of attended tokens, and whether those tokens are contiguous, per row."""
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    start = mask.int().argmax(dim=1)
    runs = (mask[:, 1:] & ~mask[:, :-1]).sum(dim=1) + mask[:, 0]
    return start, lengths, runs == 1


def _left_aligned(input_ids: th.Tensor, start: th.Tensor) -> th.Tensor:
    index = (start[:, None] + th.arange(input_ids.shape[1], device=input_ids.device)).clamp(max=input_ids.shape[1] - 1)
    return input_ids.gather(1, index)


def shared_prefix_length(input_ids: th.Tensor, attention_mask: th.Tensor, min_length: int = MIN_PREFIX_LENGTH) -> int:
    """
    The number of tokens every row opens with, leaving each row at least one token of its own.

    :param input_ids: ``(batch, length)`` int64
    :param attention_mask: ``(batch, length)`` int64; rows whose attended tokens are not contiguous share nothing
    :param min_length: shorter common prefixes count as none
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


def split_prefix(input_ids: th.Tensor, attention_mask: th.Tensor, p: int) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
    """
    Cut rows that share their first ``p`` attended tokens into the prefix and left-aligned suffixes.

    :return: ``prefix`` ``(p,)``, ``suffix_ids`` and ``suffix_mask`` ``(batch, suffix_width)`` (right padding),
        and ``offset`` ``(batch,)``: column ``c`` of row ``i`` is suffix column ``c - offset[i]``
    """
    start, lengths, _ = attended_spans(attention_mask)
    aligned = _left_aligned(input_ids, start)
    width = int(lengths.max()) - p
    suffix_mask = (th.arange(width, device=input_ids.device)[None, :] < (lengths - p)[:, None]).to(attention_mask.dtype)
    suffix_ids = aligned[:, p : p + width] * suffix_mask  # padding becomes token 0, never attended
    return aligned[0, :p], suffix_ids, suffix_mask, start + p


def prefix_cache(
    lm: PreTrainedModel, prefix: th.Tensor, inputs_embeds: th.Tensor | None = None
) -> list[tuple[th.Tensor, th.Tensor]]:
    """
    Per-layer keys and values of ``prefix`` (``(p,)`` token ids), one row, positions ``0..p-1``.

    :param inputs_embeds: ``(p, hidden_size)``, the prefix's input embeddings if already looked up
    """
    p = prefix.shape[0]
    positions = th.arange(p, device=prefix.device)[None]
    tokens = dict(input_ids=prefix[None]) if inputs_embeds is None else dict(inputs_embeds=inputs_embeds[None])
    with paused(lm):  # a checkpointed layer fills no cache
        out = lm.base_model(**tokens, attention_mask=th.ones_like(positions), position_ids=positions, use_cache=True)
    return cache_layers(out.past_key_values)


def forward_suffixes(
    lm: PreTrainedModel,
    prefix_layers: list[tuple[th.Tensor, th.Tensor]],
    suffix_ids: th.Tensor,
    suffix_mask: th.Tensor,
    use_cache: bool = False,
) -> tuple[th.Tensor, th.Tensor, DynamicCache | None]:
    """
    Run the suffixes of rows that all open with the prefix whose cache is ``prefix_layers``.

    :param prefix_layers: from :func:`prefix_cache` (one row; expanded to the batch, not copied); empty: no prefix
    :param suffix_ids: ``(batch, width)`` int64, left-aligned
    :param suffix_mask: ``(batch, width)`` int64, right padding
    :return: last hidden states ``(batch, width, hidden_size)`` over the suffix columns, the attention mask over
        prefix + suffix ``(batch, p + width)``, and (``use_cache``) the cache of prefix + suffix
    """
    batch, width = suffix_ids.shape
    p = prefix_layers[0][0].shape[2] if prefix_layers else 0
    # read-only: the cache ends with the prefix
    past = make_cache(prefix_layers, read_only=not use_cache, batch=batch) if p else None
    mask = th.cat([suffix_mask.new_ones(batch, p), suffix_mask], dim=1)
    positions = (p + th.arange(width, device=suffix_ids.device))[None].expand(batch, -1)
    out = lm.base_model(
        input_ids=suffix_ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=use_cache
    )
    return out[0], mask, out.past_key_values if use_cache else None
