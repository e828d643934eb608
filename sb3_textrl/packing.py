"""Padding-free forward passes over many rows: the rows' tokens packed side by side, a 4D mask keeping them apart.

A batch of rows of different lengths padded to the longest one computes every padding token through every layer: the
training and reference passes over a rollout's episodes (prompts and completions of all lengths) spend ~25-30 % of
their work on padding. Packing puts the rows' tokens one after another in a few packed rows ("bins") of at most
``max_tokens`` tokens, each token tagged with its row (segment) and position, and a block-diagonal causal mask lets
each token attend to its own row and the shared prefix only (packing without cross-contamination: Krell et al. 2021,
https://arxiv.org/abs/2107.02027; as ``DataCollatorWithFlattening`` in transformers or FlashAttention's varlen
kernels). Attention within a bin costs ``max_tokens`` keys per token instead of a row's length, which bounds the
bins: the linear layers' work, not attention's, dominates up to a few hundred tokens.
"""

from __future__ import annotations

import contextlib

import torch as th
from transformers import PreTrainedModel

from sb3_textrl.kv_cache import packed_attention, packed_attention_mask
from sb3_textrl.prefix_sharing import attended_spans, make_cache, prefix_cache, split_prefix

# tokens per packed row (a longer row gets a packed row of its own)
MAX_PACKED_TOKENS = 256
_PAD_SEGMENT = -2  # padding at the end of a packed row: attends to the other padding only (never to nothing: NaN)
_PREFIX_SEGMENT = -1


def pack(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """
    Rows into bins of at most ``max(max_tokens, longest row)`` tokens, first-fit by decreasing length.

    :param lengths: each row's number of tokens
    :param max_tokens: tokens per bin
    :return: the bins, each a list of row indices (none for no rows)
    """
    capacity = max([max_tokens, *lengths])
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        target = next((b for b, free in enumerate(room) if free >= lengths[row]), None)
        if target is None:
            bins.append([])
            room.append(capacity)
            target = len(bins) - 1
        bins[target].append(row)
        room[target] -= lengths[row]
    return bins


def packable(lm: PreTrainedModel, attention_mask: th.Tensor) -> bool:
    """
    Whether rows can run packed: every row's attended tokens contiguous (packing keeps only those), and no sliding
    window shorter than the rows (the packed mask has none).

    :param lm: the causal LM (its config's ``sliding_window``, if any)
    :param attention_mask: ``(batch, length)`` int64
    """
    window = getattr(lm.config.get_text_config(), "sliding_window", None)
    if window is not None and window < attention_mask.shape[1]:
        return False
    return bool(attended_spans(attention_mask)[2].all())


def forward_packed(
    lm: PreTrainedModel,
    input_ids: th.Tensor,
    attention_mask: th.Tensor,
    read_rows: th.Tensor,
    read_columns: th.Tensor,
    p: int = 0,
    max_tokens: int | None = None,
) -> th.Tensor:
    """
    The LM's last hidden states at some tokens of rows of contiguous tokens, computed packed (no padding); autograd
    flows through it as through a padded forward, whose results it equals up to float rounding.

    :param input_ids: ``(batch, length)`` int64
    :param attention_mask: ``(batch, length)`` int64; each row's attended tokens contiguous (see :func:`packable`)
    :param read_rows: ``(n,)`` int64, the rows to read
    :param read_columns: ``(n,)`` int64, the columns to read (attended, past the shared prefix)
    :param p: the number of opening tokens all rows share (:func:`~sb3_textrl.prefix_sharing.shared_prefix_length`),
        run once; 0: none
    :param max_tokens: tokens per packed row (default :data:`MAX_PACKED_TOKENS`)
    :return: ``(n, hidden_size)`` in the LM's dtype
    """
    device = input_ids.device
    prefix, suffix_ids, suffix_mask, offset = split_prefix(input_ids, attention_mask, p)
    lengths = suffix_mask.sum(dim=1)
    bins = pack(lengths.tolist(), MAX_PACKED_TOKENS if max_tokens is None else max_tokens)
    width = max(int(lengths[rows].sum()) for rows in bins)
    ids = th.zeros(len(bins), width, dtype=th.long, device=device)
    positions = th.zeros_like(ids)
    segments = th.full_like(ids, _PAD_SEGMENT)
    # where each row's suffix token lands: (bin, column)
    where_bin, where_column = th.zeros_like(suffix_ids), th.zeros_like(suffix_ids)
    for b, rows in enumerate(bins):
        start = 0
        for row in rows:
            n = int(lengths[row])
            ids[b, start : start + n] = suffix_ids[row, :n]
            positions[b, start : start + n] = p + th.arange(n, device=device)
            segments[b, start : start + n] = row
            where_bin[row, :n], where_column[row, :n] = b, start + th.arange(n, device=device)
            start += n
    past, key_segment, key_position, tokens = None, segments, positions, dict(input_ids=ids)
    if p:
        # one embedding lookup for prefix and rows: the dense gradient of a vocabulary-sized table is made once per
        # lookup (113 MB for SmolLM2), so two lookups would make it twice
        embeds = lm.get_input_embeddings()(th.cat([prefix, ids.flatten()]))
        tokens = dict(inputs_embeds=embeds[p:].view(*ids.shape, -1))
        layers = prefix_cache(lm, prefix, embeds[:p])
    # eager attention (e.g. for TRPO's double backward) stays eager, with an additive mask
    eager = lm.config._attn_implementation == "eager"
    with contextlib.nullcontext("eager") if eager else packed_attention(lm) as attention:
        if p:
            past = make_cache(layers, read_only=True, batch=len(bins))
            prefix_positions = th.arange(p, device=device)[None].expand(len(bins), -1)
            key_segment = th.cat([th.full_like(prefix_positions, _PREFIX_SEGMENT), segments], dim=1)
            key_position = th.cat([prefix_positions, positions], dim=1)
        mask = th.cat(
            [
                packed_attention_mask(
                    key_segment[b],
                    key_position[b],
                    th.stack([segments[b], th.where(segments[b] == _PAD_SEGMENT, _PAD_SEGMENT, _PREFIX_SEGMENT)], dim=1),
                    positions[b],
                    attention,
                    lm.dtype,
                )
                for b in range(len(bins))
            ]
        )
        out = lm.base_model(**tokens, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=False)
    suffix_columns = read_columns - offset[read_rows]
    return out[0][where_bin[read_rows, suffix_columns], where_column[read_rows, suffix_columns]]
