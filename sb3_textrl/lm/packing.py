"""Padding-free forward passes over many rows: the rows' tokens packed side by side, a 4D mask keeping them apart.

Paper (packing without cross-contamination): https://arxiv.org/abs/2107.02027

A batch of rows of different lengths padded to the longest one computes every padding token through every layer (the
training and reference passes over a rollout's episodes hold prompts and completions of all lengths). Packing puts the
rows' tokens one after another in a few packed rows ("bins") of at most ``max_tokens`` tokens, each token tagged with
its row (segment) and position, and a block-diagonal causal mask lets each token attend to its own row and the shared
prefix only (Krell et al. 2021; as ``DataCollatorWithFlattening`` in transformers or FlashAttention's varlen kernels).
Attention within a bin costs ``max_tokens`` keys per token instead of a row's length, which bounds the bins: the
linear layers' work, not attention's, dominates up to a few hundred tokens.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import NamedTuple

import torch as th
from transformers import PreTrainedModel

from sb3_textrl.lm.attention import packed_attention, packed_attention_mask
from sb3_textrl.lm.prefix_sharing import (
    SplitRows,
    attended_spans,
    cache_keyword,
    make_cache,
    prefix_cache,
    split_prefix,
)

__all__ = [
    "MAX_PACKED_TOKENS",
    "MIN_GROUP_OPENING",
    "OpeningGroup",
    "forward_packed",
    "group_openings",
    "pack",
    "packable",
    "prefix_leads",
]

# tokens per packed row (a longer row gets a packed row of its own)
MAX_PACKED_TOKENS = 256
_PAD_SEGMENT = -2  # padding at the end of a packed row: attends to the other padding only (never to nothing: NaN)
_PREFIX_SEGMENT = -1
# rows whose openings agree on fewer tokens (beyond the shared prefix) run them each
MIN_GROUP_OPENING = 8


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
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


def pack(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """
    Rows into as few bins of at most ``max(max_tokens, longest row)`` tokens as first-fit by decreasing length finds,
    filled evenly: the packed rows are as wide as the fullest bin, and every other bin is padded to its width (300
    tokens in bins of 256 and 44 would run 512).

    Source: first-fit decreasing bin packing (Johnson 1973), the capacity lowered to the smallest that keeps the
    number of bins.

    :param lengths: each row's number of tokens (``>= 1``)
    :param max_tokens: tokens per bin (``>= 1``)
    :return: the bins, each a list of row indices, longest rows first (none for no rows)
    """
    if not lengths:
        return []
    longest, total = max(lengths), sum(lengths)
    limit = max(max_tokens, longest)
    n_bins = -(-total // limit)
    while True:  # the smallest capacity that fits the rows in n_bins bins, else one bin more
        capacity = max(longest, -(-total // n_bins))
        while True:
            bins = _first_fit(lengths, capacity)
            if len(bins) <= n_bins:
                return bins
            if capacity == limit:
                break
            capacity = min(limit, capacity + max(1, capacity // 16))
        n_bins += 1


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
    return bool(attended_spans(attention_mask).contiguous.all())


def prefix_leads(p: int, max_tokens: int) -> bool:
    """
    Whether a shared prefix of ``p`` tokens opens every packed row of ``max_tokens`` (else it runs once, apart): a
    copy per packed row costs less than a forward of its own while it fills at most a quarter of the row.

    :param p: the shared prefix's number of tokens (0: none, never leads)
    :param max_tokens: tokens per packed row
    """
    return 0 < p <= max_tokens // 4


class OpeningGroup(NamedTuple):
    """Rows that open with the same tokens beyond the shared prefix, as :func:`group_openings` finds them."""

    rows: list[int]
    """the rows' indices (two or more), in the order of their tokens"""
    opening: int
    """the number of suffix tokens they all open with"""


def group_openings(
    suffix_ids: th.Tensor, lengths: th.Tensor, limits: th.Tensor, min_length: int = MIN_GROUP_OPENING
) -> list[OpeningGroup]:
    """
    Groups of rows that open with the same tokens (episodes on the same prompt), beyond the prefix all rows share.

    Rows are sorted by their tokens, so rows with a long common opening sit next to each other; a group is a run of
    neighbours whose common opening is at least ``min_length`` tokens, and its opening is the shortest of those.

    :param suffix_ids: ``(batch, width)`` int64, the rows' tokens after the shared prefix, left-aligned
    :param lengths: ``(batch,)`` int64, each row's number of tokens there
    :param limits: ``(batch,)`` int64, the longest opening each row may share (tokens before the first one read)
    :param min_length: shorter common openings are not worth a segment of their own (default :data:`MIN_GROUP_OPENING`)
    :return: ``(rows, opening)`` per group of two rows or more
    """
    rows = sorted(range(len(lengths)), key=lambda i: suffix_ids[i, : int(lengths[i])].tolist())
    groups: list[OpeningGroup] = []
    run, opening = rows[:1], 0
    for a, b in itertools.pairwise(rows):
        n = int(min(lengths[a], lengths[b], limits[a], limits[b]))
        common = int((suffix_ids[a, :n] == suffix_ids[b, :n]).int().cumprod(dim=0).sum())
        if common >= min_length:
            opening = common if len(run) == 1 else min(opening, common)
            run.append(b)
            continue
        if len(run) > 1:
            groups.append(OpeningGroup(run, opening))
        run = [b]
    if len(run) > 1:
        groups.append(OpeningGroup(run, opening))
    return groups


class _Piece(NamedTuple):
    """A run of one row's suffix tokens placed in a packed row: the row's own tokens, or its group's opening."""

    segment: int  # the segment the tokens form: the row's index, or an opening's (numbered after the rows')
    row: int  # the row whose suffix tokens these are
    first: int  # first suffix column
    stop: int  # one past the last suffix column
    sees: int  # the other segment the tokens see: their group's opening, or the shared prefix (_PREFIX_SEGMENT)


class _PackedRows(NamedTuple):
    """The rows' suffix tokens laid out in packed rows, after ``lead`` columns of the shared prefix."""

    ids: th.Tensor  # (n_bins, width) int64 token ids (padding: 0)
    positions: th.Tensor  # (n_bins, width) int64 position ids (padding: 0)
    segments: th.Tensor  # (n_bins, width) int64: the segment of each column (_PAD_SEGMENT, _PREFIX_SEGMENT, a piece's)
    sees: th.Tensor  # (n_bins, width) int64: the other segment each column sees
    token_bin: th.Tensor  # (batch, suffix_width) int64: the packed row of each row's suffix token
    token_column: th.Tensor  # (batch, suffix_width) int64: its column there


def _opening_limits(lengths: th.Tensor, width: int, read_rows: th.Tensor, read_suffix_columns: th.Tensor) -> th.Tensor:
    """``(batch,)`` int64: each row's longest opening to share, up to the first of its suffix columns read."""
    limits = th.full_like(lengths, width)
    return limits.scatter_reduce_(0, read_rows, read_suffix_columns, reduce="amin")


def _units(groups: list[OpeningGroup], lengths: list[int], capacity: int) -> list[list[_Piece]]:
    """
    The pieces to place, in units that share a packed row: a group's opening with its rows (a group wider than
    ``capacity`` splits, each part with a copy of the opening), or a row of no group.
    """
    units: list[list[_Piece]] = []
    opening_segment, used = len(lengths) - 1, 0  # the openings' segments follow the rows'
    for rows, n in groups:
        for row in rows:
            size = lengths[row] - n
            if row == rows[0] or used + size > capacity:
                opening_segment, used = opening_segment + 1, n
                units.append([_Piece(opening_segment, row, 0, n, _PREFIX_SEGMENT)])
            units[-1].append(_Piece(row, row, n, lengths[row], opening_segment))
            used += size
    grouped = {row for rows, _ in groups for row in rows}
    units += [[_Piece(row, row, 0, lengths[row], _PREFIX_SEGMENT)] for row in range(len(lengths)) if row not in grouped]
    return units


def _lay_out(units: list[list[_Piece]], rows: SplitRows, p: int, lead: int, capacity: int) -> _PackedRows:
    """Bin-pack the units (:func:`pack`) into packed rows that open with the prefix's first ``lead`` tokens."""
    suffix_ids, device = rows.suffix_ids, rows.suffix_ids.device
    sizes = [sum(stop - first for _, _, first, stop, _ in unit) for unit in units]
    bins = pack(sizes, capacity)
    width = lead + max(sum(sizes[u] for u in unit_indices) for unit_indices in bins)
    ids = th.zeros(len(bins), width, dtype=th.long, device=device)
    positions = th.zeros_like(ids)
    segments = th.full_like(ids, _PAD_SEGMENT)
    sees = th.full_like(ids, _PAD_SEGMENT)
    ids[:, :lead], positions[:, :lead] = rows.prefix[:lead], th.arange(lead, device=device)
    segments[:, :lead], sees[:, :lead] = _PREFIX_SEGMENT, _PREFIX_SEGMENT
    token_bin, token_column = th.zeros_like(suffix_ids), th.zeros_like(suffix_ids)
    n_rows = len(suffix_ids)
    for b, unit_indices in enumerate(bins):
        start = lead
        for segment, row, first, stop, other in (piece for u in unit_indices for piece in units[u]):
            n = stop - first
            ids[b, start : start + n] = suffix_ids[row, first:stop]
            positions[b, start : start + n] = p + th.arange(first, stop, device=device)
            segments[b, start : start + n], sees[b, start : start + n] = segment, other
            if segment < n_rows:
                token_bin[row, first:stop], token_column[row, first:stop] = b, start + th.arange(n, device=device)
            start += n
    return _PackedRows(ids, positions, segments, sees, token_bin, token_column)


def _run_packed(lm: PreTrainedModel, packed: _PackedRows, prefix: th.Tensor, apart: bool) -> th.Tensor:
    """
    One forward over the packed rows; a prefix run ``apart`` goes first, into a read-only cache the packed rows see.

    :return: the last hidden states ``(n_bins, width, hidden_size)``
    """
    p, n_bins, device = len(prefix), len(packed.ids), packed.ids.device
    past, key_segment, key_position, tokens = None, packed.segments, packed.positions, dict(input_ids=packed.ids)
    if apart:
        # one embedding lookup for prefix and rows: the dense gradient of a vocabulary-sized table is made once per
        # lookup (vocab_size x hidden_size numbers), so two lookups would make it twice
        embeds = lm.get_input_embeddings()(th.cat([prefix, packed.ids.flatten()]))
        tokens = dict(inputs_embeds=embeds[p:].view(*packed.ids.shape, -1))
        layers = prefix_cache(lm, prefix, embeds[:p])
    # eager attention (e.g. for TRPO's double backward) stays eager, with an additive mask
    eager = lm.config._attn_implementation == "eager"
    with contextlib.nullcontext("eager") if eager else packed_attention(lm) as attention:
        if apart:
            past = make_cache(layers, read_only=True, batch=n_bins)
            prefix_positions = th.arange(p, device=device)[None].expand(n_bins, -1)
            key_segment = th.cat([th.full_like(prefix_positions, _PREFIX_SEGMENT), packed.segments], dim=1)
            key_position = th.cat([prefix_positions, packed.positions], dim=1)
        prefix_seen = th.where(packed.segments == _PAD_SEGMENT, _PAD_SEGMENT, _PREFIX_SEGMENT)
        mask = th.cat(
            [
                packed_attention_mask(
                    key_segment[b],
                    key_position[b],
                    th.stack([packed.segments[b], packed.sees[b], prefix_seen[b]], dim=1),
                    packed.positions[b],
                    attention,
                    lm.dtype,
                )
                for b in range(n_bins)
            ]
        )
        base = lm.base_model
        cache = {cache_keyword(base): past}
        out = base(**tokens, attention_mask=mask, position_ids=packed.positions, **cache, use_cache=False)
    return out[0]


def forward_packed(
    lm: PreTrainedModel,
    input_ids: th.Tensor,
    attention_mask: th.Tensor,
    read_rows: th.Tensor,
    read_columns: th.Tensor,
    p: int = 0,
    max_tokens: int | None = None,
    share_openings: bool = True,
) -> th.Tensor:
    """
    The LM's last hidden states at some tokens of rows of contiguous tokens, computed packed (no padding); autograd
    flows through it as through a padded forward, whose results it equals up to float rounding.

    Rows that open alike beyond the shared prefix (:func:`group_openings`: episodes on the same prompt) run that
    opening once, as a segment of its own in the same packed row as theirs, which their tokens attend to (a prefix tree
    of depth two, as RadixAttention in SGLang shares a prompt's cache between requests:
    https://arxiv.org/abs/2312.07104).

    :param lm: the causal LM (its ``base_model`` runs)
    :param input_ids: ``(batch, length)`` int64
    :param attention_mask: ``(batch, length)`` int64; each row's attended tokens contiguous (see :func:`packable`)
    :param read_rows: ``(n,)`` int64, the rows to read
    :param read_columns: ``(n,)`` int64, the columns to read (attended, past the shared prefix); a group's opening
        stops before the first column read in each of its rows
    :param p: the number of opening tokens all rows share (:func:`~sb3_textrl.lm.prefix_sharing.shared_prefix_length`):
        they open every packed row, or, if longer than :func:`prefix_leads` allows, run once apart; 0 (default): none
    :param max_tokens: tokens per packed row (default :data:`MAX_PACKED_TOKENS`)
    :param share_openings: run the common opening of rows that open alike once (default), else every row runs all
        its tokens
    :return: ``(n, hidden_size)`` in the LM's dtype
    """
    rows = split_prefix(input_ids, attention_mask, p)
    lengths = rows.suffix_mask.sum(dim=1)
    read_suffix_columns = read_columns - rows.offset[read_rows]
    if share_openings:
        groups = group_openings(
            rows.suffix_ids, lengths, _opening_limits(lengths, rows.suffix_ids.shape[1], read_rows, read_suffix_columns)
        )
    else:
        groups = []
    max_tokens = MAX_PACKED_TOKENS if max_tokens is None else max_tokens
    # a short shared prefix opens every packed row: one forward, and one gradient per weight. Run apart (its own forward
    # and a cache the rows read), each weight gets a second, tiny gradient to add up, which costs more on small
    # minibatches
    lead = p if prefix_leads(p, max_tokens) else 0
    capacity = max_tokens - lead  # tokens per packed row after the prefix
    packed = _lay_out(_units(groups, lengths.tolist(), capacity), rows, p, lead, capacity)
    hidden = _run_packed(lm, packed, rows.prefix, apart=p > 0 and not lead)
    return hidden[packed.token_bin[read_rows, read_suffix_columns], packed.token_column[read_rows, read_suffix_columns]]
