"""Attention over packed rows: several sequences side by side in one row, each token attending only to its own.

Papers: scaled dot-product attention https://arxiv.org/abs/1706.03762, grouped-query attention
https://arxiv.org/abs/2305.13245

A 4D mask built by :func:`packed_attention_mask` says which key columns each query sees (its own segment, and a shared
prefix's); :func:`packed_sdpa_attention` runs PyTorch's SDPA over it without repeating the keys and values of
grouped-query attention. The KV cache (:mod:`sb3_textrl.lm.kv_cache`) and packed training forwards
(:mod:`sb3_textrl.lm.packing`) both run through it.
"""

from __future__ import annotations

import contextlib

import torch as th
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

__all__ = ["PACKED_ATTENTION", "packed_attention", "packed_attention_mask", "packed_sdpa_attention"]


# per boolean mask (one per forward, passed to every layer): its additive form, tiled over the n_rep query blocks
_ADDITIVE_MASKS = WeakTensorKeyDictionary()


def _additive_mask(attention_mask: th.Tensor, n_rep: int, dtype: th.dtype) -> th.Tensor:
    """
    ``attention_mask`` tiled over ``n_rep`` blocks of query rows and, if boolean, made additive (0 or ``-inf``, as SDPA
    makes it itself): built once per mask and reused by every layer. SDPA keeps the mask it gets for backward, so a
    converted copy per layer would keep one per layer (``n_rep x n_keys`` numbers per query token and layer); this one
    is kept once.
    """
    if n_rep == 1 and attention_mask.dtype != th.bool:
        return attention_mask  # as it is (and not cached: the entry would keep its own key alive)
    entry = _ADDITIVE_MASKS.get(attention_mask)
    if entry is not None and entry[0] == (n_rep, dtype):
        return entry[1]
    mask = attention_mask.repeat(1, 1, n_rep, 1) if n_rep > 1 else attention_mask
    if mask.dtype == th.bool:
        mask = th.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    _ADDITIVE_MASKS[attention_mask] = ((n_rep, dtype), mask)
    return mask


def packed_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """
    Scaled dot-product attention over the packed cache, for grouped-query attention without copies of the keys and
    values: the ``n_rep`` query heads that read one key/value head run as ``n_rep`` blocks of query rows of that head
    (transformers' own SDPA path repeats the whole cache per query head whenever a mask is given). Registered with
    transformers' ``AttentionInterface`` as :data:`PACKED_ATTENTION`; with dropout, a soft cap, a sliding window,
    attention sinks or a position bias, transformers' ``sdpa_attention_forward`` runs instead.

    :param module: the attention layer (read by the fallback only)
    :param query: ``(batch, heads, n_queries, head_dim)`` float
    :param key: ``(batch, kv_heads, n_keys, head_dim)``, and ``value`` alike, in ``query``'s dtype; ``heads`` a
        multiple of ``kv_heads``
    :param attention_mask: ``(batch, 1, n_queries, n_keys)`` boolean (True: attend) or additive float
    :param scaling: the scores' scale; ``None`` (default): ``head_dim ** -0.5``
    :param dropout: attention dropout probability (default 0.0; above 0 the fallback runs)
    :return: ``(batch, n_queries, heads, head_dim)`` in ``query``'s dtype and ``None`` (no attention weights), as
        transformers' attention functions return
    """
    if dropout or any(kwargs.get(name) is not None for name in ("softcap", "sliding_window", "s_aux", "position_bias")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    batch, heads, length, dim = query.shape
    n_rep = heads // key.shape[1]
    # query head h reads key/value head h // n_rep (transformers' repeat_kv order)
    query = query.reshape(batch, key.shape[1], n_rep * length, dim)
    mask = _additive_mask(attention_mask, n_rep, query.dtype)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


#: the name under which :func:`packed_sdpa_attention` is registered with transformers' ``AttentionInterface``
PACKED_ATTENTION = "sb3_textrl_packed_sdpa"
AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)


@contextlib.contextmanager
def packed_attention(lm: PreTrainedModel):
    """
    Within the block, the LM's attention layers run :func:`packed_sdpa_attention` (the config's attention
    implementation is restored on exit, errors included).

    :param lm: the causal LM; a composite model's config (one with ``sub_configs``) is left alone
    :return: a context manager that yields the attention implementation the block runs: :data:`PACKED_ATTENTION`, or
        the composite model's own
    """
    config = lm.config
    previous = config._attn_implementation
    if config.sub_configs:  # a composite model: leave its per-part settings alone
        yield previous
        return
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield PACKED_ATTENTION
    finally:
        config._attn_implementation = previous


def packed_attention_mask(
    key_segment: th.Tensor,
    key_position: th.Tensor,
    query_segments: th.Tensor,
    query_position: th.Tensor,
    attention: str = PACKED_ATTENTION,
    dtype: th.dtype = th.float32,
) -> th.Tensor:
    """
    The 4D attention mask of queries over packed columns: a query sees the columns of its segments at positions up to
    its own (causal within a row; a shared prefix is a segment of its own that several rows see).

    :param key_segment: ``(n_keys,)`` int64, segment of each key column
    :param key_position: ``(n_keys,)`` int64, position id of each key column
    :param query_segments: ``(n_queries, k)`` int64, the segments a query sees (its row's own, its prefix's, ...)
    :param query_position: ``(n_queries,)`` int64, position id of each query
    :param attention: the attention implementation that reads the mask (default :data:`PACKED_ATTENTION`)
    :param dtype: the dtype of an additive mask (``"eager"`` attention; default float32)
    :return: ``(1, 1, n_queries, n_keys)``: boolean (True: attend), or for ``"eager"`` additive, 0 or ``dtype``'s minimum
    """
    allowed = (key_segment[None, :, None] == query_segments[:, None, :]).any(dim=2)
    allowed &= key_position[None, :] <= query_position[:, None]
    if attention == "eager":  # adds the mask to the attention scores
        return th.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, th.finfo(dtype).min)[
            None, None
        ]
    return allowed[None, None]
