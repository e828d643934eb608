"""A KV cache carried across rollout steps, so sampling costs one incremental forward per token.

All rows' keys and values live side by side in one packed row (as packed batches in vLLM or FlashAttention's varlen
kernels: Kwon et al. 2023, https://arxiv.org/abs/2309.06180; Dao 2023, https://arxiv.org/abs/2307.08691), each column
tagged with the segment it belongs to and its position; a 4D attention mask lets each token see its own row's columns
only. So tokens of different lengths run in one forward without padding: a step's new token of every running env
*and* the whole prompt of an env that just restarted cost one forward together, where a padded batch would pad every
row to the prompt's length (or need a second forward).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import NamedTuple

import torch as th
from transformers import DynamicCache, PreTrainedModel

from sb3_textrl.lm.attention import packed_attention, packed_attention_mask
from sb3_textrl.lm.prefix_sharing import (
    LayerKeysValues,
    cache_keyword,
    cache_layers,
    forward_suffixes,
    make_cache,
    output_cache,
    prefix_cache,
    shared_prefix_length,
    split_prefix,
)
from sb3_textrl.lm.tokens import last_token_index, right_align
from sb3_textrl.lm.weight_prepacking import PrepackedLinears

__all__ = ["RolloutKVCache"]

# new rows remembered per weights version (each with its own keys and values: 2 x layers x kv_heads x head_dim numbers
# per token)
_MAX_ROWS_SEEN = 256
# dead columns (of finished episodes) kept until they outnumber the live ones and this many
_MIN_COLUMNS_DROPPED = 256
# new rows with more tokens than this run as a padded batch (attention sum(L^2)), not packed ((sum L)^2)
_MAX_PACKED_PREFILL = 256

# a new row's identity: the shared prefix's tokens (empty: none) and the row's own tokens after it
_RowKey = tuple[tuple[int, ...], tuple[int, ...]]


class _NewTokens(NamedTuple):
    """Tokens of one row (or of a shared prefix) that the call's packed forward runs."""

    row: int | None  # the observation row, None for a shared prefix
    ids: th.Tensor  # (n,) int64 token ids
    positions: th.Tensor  # (n,) int64 position ids
    sees: th.Tensor  # (2,) int64: the segments the tokens see, their own and their prefix's (a prefix's own twice)


class _KnownColumns(NamedTuple):
    """Keys and values computed before (a remembered row or prefix), to copy into the cache as one segment."""

    layers: list[LayerKeysValues]  # per layer, keys and values (kv_heads, n, head_dim)
    segment: int  # the segment they form
    positions: th.Tensor  # (n,) int64 position ids


class _PaddedRow(NamedTuple):
    """A new row queued for the padded prefill (:meth:`RolloutKVCache._prefill_padded`)."""

    row: int  # the observation row
    ids: th.Tensor  # (n,) int64: its tokens after the shared prefix
    positions: th.Tensor  # (n,) int64 position ids
    segment: int  # its segment in the cache
    key: _RowKey  # under which it is remembered


class _SeenRow(NamedTuple):
    """A new row computed under the current weights, remembered so that a restart on it costs no forward."""

    hidden: th.Tensor  # (hidden_size,): the last hidden state at its last token
    layers: list[LayerKeysValues]  # per layer, its own keys and values (kv_heads, n, head_dim)


@dataclass
class _CallPlan:
    """What a call adds to the cache, gathered before anything runs."""

    new_tokens: list[_NewTokens] = field(default_factory=list)  # to run in one packed forward, in this order
    known: list[_KnownColumns] = field(default_factory=list)  # to copy in first, in this order
    remember: dict[int, _RowKey] = field(default_factory=dict)  # rows of new_tokens to remember: row -> key


def _copy_columns(layers: list[LayerKeysValues], row: int, columns: slice) -> list[LayerKeysValues]:
    """Per layer, a copy of one row's keys and values over ``columns``: ``(kv_heads, n, head_dim)`` (a view would keep
    the whole cache alive)."""
    return [(k[row, :, columns].clone(), v[row, :, columns].clone()) for k, v in layers]


class RolloutKVCache:
    """
    The key/value cache of the observations a policy saw at its previous call, one segment per environment.

    At each call, every row is either the same observation as before (its hidden state is reused), the same plus one
    token (an incremental step over that token), or new (an environment reset: its whole observation runs). All of a
    call's new tokens, steps and new rows alike, run in **one** forward over the packed cache; position ids follow each
    observation's mask, so the results equal a forward over the full observation up to float rounding. Correct for any
    sequence of observations: a row whose tokens do not extend the cached ones is recomputed.

    New rows run only what follows the opening tokens that all current observations share (a chat template's system
    prompt; :mod:`sb3_textrl.lm.prefix_sharing`): the prefix is one segment, computed once per weights version, that the
    rows see besides their own; each distinct new row is also computed once per weights version (an env restarting on
    a prompt already seen costs no forward: its keys and values are copied into the cache).

    Needs an LM that accepts a custom 4D attention mask (transformers' Llama, GPT-2, Qwen2, ... with
    ``attn_implementation`` ``"sdpa"`` or ``"eager"``); sliding-window attention is not applied in this path.

    :param lm: the causal LM (its ``base_model`` is run); any change of its weights (an optimizer step, a load, a move)
        empties the cache at the next call
    """

    def __init__(self, lm: PreTrainedModel):
        self.lm = lm
        self.linears = PrepackedLinears(lm.base_model, head=lm.get_output_embeddings())
        self.reset()

    def _weights_fingerprint(self) -> tuple[int, int]:
        # in-place updates (optimizer steps, load_state_dict) bump a tensor's version; `p.data = ...` moves its storage
        params = self._params
        return sum(p._version for p in params), hash(tuple(p.data_ptr() for p in params))

    def reset(self) -> None:
        """Forget everything: cached columns, remembered prefixes and rows, prepacked weights."""
        self._params = list(self.lm.parameters())  # collected once, not at every call (a walk over all modules)
        # keys and values of each shared prefix (by its tokens) under the current weights: per layer (kv_heads, p, dim)
        self.prefix_layers: dict[tuple[int, ...], list[LayerKeysValues]] = {}
        # each new row seen under the current weights, by (prefix, own tokens)
        self.rows_seen: dict[_RowKey, _SeenRow] = {}
        self.fingerprint: tuple[int, int] | None = None
        self.input_ids: th.Tensor | None = None  # (batch, max_length): the observations the cache holds
        self.obs_mask: th.Tensor | None = None
        self.hidden: th.Tensor | None = None  # (batch, hidden_size): last hidden state of each row
        self.layers: list[LayerKeysValues] = []  # per layer (1, kv_heads, length, head_dim)
        self.cache: DynamicCache | None = None  # the same tensors as `layers`, as a cache object the LM can extend
        self.segment = th.empty(0, dtype=th.long)  # (length,): segment of each column
        self.position = th.empty(0, dtype=th.long)  # (length,): position id of each column
        self.row_segments: th.Tensor | None = None  # (batch, 2): each row's own segment and its prefix's
        self.prefix_segments: dict[tuple[int, ...], int] = {}  # prefixes in the cache: their segment
        self._next_segment = 0
        self.linears.clear()
        self._forwards = 0  # calls that ran a forward under the current weights

    @property
    def length(self) -> int:
        """Number of columns the cache holds."""
        return int(self.segment.shape[0])

    def _new_segment(self) -> int:
        self._next_segment += 1
        return self._next_segment - 1

    @th.no_grad()
    def last_hidden(
        self, input_ids: th.Tensor, attention_mask: th.Tensor, prefix_sharing: bool = True, prepacked_weights: bool = True
    ) -> th.Tensor:
        """
        The LM's last hidden state at the last attended token of each observation (no gradients).

        :param input_ids: ``(batch, max_length)`` int64
        :param attention_mask: ``(batch, max_length)`` int64
        :param prefix_sharing: new rows run only what follows the opening tokens all observations share (default)
        :param prepacked_weights: from the second forward under the same weights on, run the MLP layers on prepacked
            copies of their weights, and pack the LM head's for ``self.linears.logits``
            (:mod:`sb3_textrl.lm.weight_prepacking`; CPU, float32). Default ``True``
        :return: ``(batch, hidden_size)`` in the LM's dtype (the cache's own tensor, not a copy: do not change it)
        :raises ValueError: if a row attends to no token
        """
        batch, device = input_ids.shape[0], input_ids.device
        if not bool(attention_mask.any(dim=1).all()):
            empty = (~attention_mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"Observation rows {empty} attend to no token (`attention_mask` all 0): nothing to condition on.")
        fingerprint = self._weights_fingerprint()
        new_last = last_token_index(attention_mask)
        if self.input_ids is None or self.input_ids.shape != input_ids.shape or fingerprint != self.fingerprint:
            self.reset()
            self.fingerprint = fingerprint
            self.segment, self.position = self.segment.to(device), self.position.to(device)
            self.row_segments = th.full((batch, 2), -1, dtype=th.long, device=device)
            same = extended = th.zeros(batch, dtype=th.bool, device=device)
        else:
            old_ids, old_mask = self.input_ids, self.obs_mask
            old_last = last_token_index(old_mask)
            tokens_kept = ((input_ids == old_ids) | ~old_mask.bool()).all(dim=1)
            same = tokens_kept & (attention_mask == old_mask).all(dim=1)
            grown = old_mask.clone()
            grown[th.arange(batch), (old_last + 1).clamp(max=input_ids.shape[1] - 1)] = 1
            extended = tokens_kept & (new_last == old_last + 1) & (attention_mask == grown).all(dim=1)
            if same.all():
                return self.hidden
        # the second forward under these weights on (a rollout, not a one-off predict()) runs on prepacked weights
        self._forwards += 1
        with self.linears.applied(batch) if prepacked_weights and self._forwards > 1 else contextlib.nullcontext():
            self._run(input_ids, attention_mask, new_last, same, extended, prefix_sharing)
        self._drop_dead_columns()
        return self.hidden

    def _run(
        self,
        input_ids: th.Tensor,
        attention_mask: th.Tensor,
        new_last: th.Tensor,
        same: th.Tensor,
        extended: th.Tensor,
        prefix_sharing: bool,
    ) -> None:
        """
        Run the call's new tokens (the rows' steps, new rows, a new shared prefix) and set ``self.hidden``.

        :param new_last: ``(batch,)`` int64: each row's last attended column
        :param same: ``(batch,)`` bool: rows whose observation is the cached one
        :param extended: ``(batch,)`` bool: rows whose observation is the cached one plus one token
        """
        batch = input_ids.shape[0]
        plan = _CallPlan()
        hidden: list[th.Tensor | None] = [self.hidden[i] if bool(same[i]) else None for i in range(batch)]
        for i in extended.nonzero().flatten().tolist():
            position = attention_mask[i].sum(dim=0, keepdim=True) - 1
            plan.new_tokens.append(_NewTokens(i, input_ids[i, new_last[i : i + 1]], position, self.row_segments[i]))
        fresh = ~(same | extended)
        if fresh.any():
            self._plan_new_rows(input_ids, attention_mask, fresh.nonzero().flatten(), prefix_sharing, plan, hidden)
        if plan.known:
            self._append(plan.known)
        if plan.new_tokens:
            self._forward(plan.new_tokens, hidden, plan.remember)
        self.input_ids, self.obs_mask, self.hidden = input_ids.clone(), attention_mask.clone(), th.stack(hidden)

    def _plan_new_rows(
        self,
        input_ids: th.Tensor,
        attention_mask: th.Tensor,
        rows: th.Tensor,
        prefix_sharing: bool,
        plan: _CallPlan,
        hidden: list[th.Tensor | None],
    ) -> None:
        """
        Give each new row (an env reset) its segment, and plan how its keys and values get into the cache: copied in
        if remembered, else run in the call's packed forward, or in a padded prefill first when the call holds many
        new tokens (whose hidden states it fills in ``hidden`` at once).

        :param rows: ``(n,)`` int64, the new rows
        """
        p = shared_prefix_length(input_ids, attention_mask) if prefix_sharing else 0
        if p:
            prefix, ids, mask, _ = split_prefix(input_ids[rows], attention_mask[rows], p)
            prefix_key = tuple(prefix.tolist())
        else:
            prefix, prefix_key, (ids, mask) = None, (), right_align(input_ids[rows], attention_mask[rows])
        positions = p + (mask.cumsum(dim=1) - 1).clamp(min=0)
        owns = mask.bool()
        keys = [(prefix_key, tuple(ids[j, own].tolist())) for j, own in enumerate(owns)]
        # many new tokens at once (all envs starting, predict() over prompts): a padded batch forward instead
        padded = sum(len(key[1]) for key in keys if key not in self.rows_seen) > _MAX_PACKED_PREFILL
        if p and padded and prefix_key not in self.prefix_layers:
            self.prefix_layers = {prefix_key: [(k[0], v[0]) for k, v in prefix_cache(self.lm, prefix)]}
        prefix_segment = self._prefix_segment(prefix_key, prefix, plan) if p else -1
        queued: list[_PaddedRow] = []
        for j, i in enumerate(rows.tolist()):
            own, key = owns[j], keys[j]
            segment = self._new_segment()
            self.row_segments[i] = th.tensor([segment, prefix_segment if p else segment], device=input_ids.device)
            if key in self.rows_seen:  # its keys and values are known: copy them in, no forward
                seen = self.rows_seen[key]
                hidden[i] = seen.hidden
                plan.known.append(_KnownColumns(seen.layers, segment, positions[j, own]))
            elif padded:
                queued.append(_PaddedRow(i, ids[j, own], positions[j, own], segment, key))
            else:
                plan.remember[i] = key
                plan.new_tokens.append(_NewTokens(i, ids[j, own], positions[j, own], self.row_segments[i]))
        if queued:
            plan.known += self._prefill_padded(queued, prefix_key, hidden)

    def _prefix_segment(self, prefix_key: tuple[int, ...], prefix: th.Tensor, plan: _CallPlan) -> int:
        """The prefix's segment in the cache: kept, copied in from memory, or queued to run in this call's forward."""
        if prefix_key in self.prefix_segments:
            return self.prefix_segments[prefix_key]
        segment = self._new_segment()
        self.prefix_segments[prefix_key] = segment
        positions = th.arange(len(prefix_key), device=prefix.device)
        if prefix_key in self.prefix_layers:
            plan.known.append(_KnownColumns(self.prefix_layers[prefix_key], segment, positions))
        else:  # first in the call's forward, so that the rows that follow it see it
            sees = th.tensor([segment, segment], device=prefix.device)
            plan.new_tokens.insert(0, _NewTokens(None, prefix, positions, sees))
        return segment

    def _prefill_padded(
        self, queued: list[_PaddedRow], prefix_key: tuple[int, ...], hidden: list[th.Tensor | None]
    ) -> list[_KnownColumns]:
        """
        New rows as one padded batch after the shared prefix's cache (:func:`forward_suffixes`), to be copied into the
        packed cache: the attention of a packed forward over ``n`` new rows costs ``n`` times more.

        :return: the rows' keys and values, as :meth:`_append` takes them
        """
        lengths = [len(row.ids) for row in queued]
        suffix_ids = th.nn.utils.rnn.pad_sequence([row.ids for row in queued], batch_first=True)
        lengths_t = th.tensor(lengths, device=suffix_ids.device)
        suffix_mask = (th.arange(suffix_ids.shape[1], device=suffix_ids.device)[None] < lengths_t[:, None]).long()
        prefix_layers = [(k[None], v[None]) for k, v in self.prefix_layers[prefix_key]] if prefix_key else []
        out, _, cache = forward_suffixes(self.lm, prefix_layers, suffix_ids, suffix_mask, use_cache=True)
        layers, p = cache_layers(cache), len(prefix_key)
        self._make_room(len(queued))
        known = []
        for b, row in enumerate(queued):
            hidden[row.row] = out[b, lengths[b] - 1].clone()
            row_layers = _copy_columns(layers, b, slice(p, p + lengths[b]))
            self.rows_seen[row.key] = _SeenRow(hidden[row.row], row_layers)
            known.append(_KnownColumns(row_layers, row.segment, row.positions))
        return known

    def _make_room(self, n_rows: int) -> None:
        if len(self.rows_seen) + n_rows > _MAX_ROWS_SEEN:  # bounded (predict() over many prompts)
            self.rows_seen = {}

    def _append(self, known: list[_KnownColumns]) -> None:
        """Copy known keys and values into the cache, one segment each, in one concatenation per layer."""
        merged = []
        for index in range(len(known[0].layers)):
            keys = [columns.layers[index][0][None] for columns in known]
            values = [columns.layers[index][1][None] for columns in known]
            if self.layers:
                keys.insert(0, self.layers[index][0])
                values.insert(0, self.layers[index][1])
            merged.append((th.cat(keys, dim=2), th.cat(values, dim=2)))
        self.layers = merged
        self.cache = None
        self.segment = th.cat([self.segment, *(th.full_like(c.positions, c.segment) for c in known)])
        self.position = th.cat([self.position, *(c.positions for c in known)])

    def _forward(self, new_tokens: list[_NewTokens], hidden: list[th.Tensor | None], remember: dict[int, _RowKey]) -> None:
        """One forward over all new tokens, packed; fills ``hidden`` and remembers new rows and prefixes."""
        ids = th.cat([g.ids for g in new_tokens])
        positions = th.cat([g.positions for g in new_tokens])
        sees = th.cat([g.sees[None].expand(len(g.ids), 2) for g in new_tokens])
        segments = sees[:, 0]
        if self.cache is None and self.layers:
            self.cache = make_cache(self.layers)
        base = self.lm.base_model
        with packed_attention(self.lm) as attention:
            mask = packed_attention_mask(
                th.cat([self.segment, segments]), th.cat([self.position, positions]), sees, positions, attention, self.lm.dtype
            )
            # an empty cache of plain layers (not the one the model would make from its config: no sliding window)
            cache = self.cache if self.cache is not None else DynamicCache()
            out = base(
                input_ids=ids[None],
                attention_mask=mask,
                position_ids=positions[None],
                **{cache_keyword(base): cache},
                use_cache=True,
            )
        start = self.length
        self.cache = output_cache(out)
        self.layers = cache_layers(self.cache)
        self.segment, self.position = th.cat([self.segment, segments]), th.cat([self.position, positions])
        self._make_room(len(remember))
        offset = 0
        for row, group_ids, _, _ in new_tokens:
            n = len(group_ids)
            columns = slice(start + offset, start + offset + n)
            offset += n
            if row is None:  # a prefix: remember its keys and values
                prefix_key = tuple(group_ids.tolist())
                self.prefix_layers = {prefix_key: _copy_columns(self.layers, 0, columns)}
                continue
            hidden[row] = out[0][0, offset - 1]
            if row in remember:
                self.rows_seen[remember[row]] = _SeenRow(hidden[row].clone(), _copy_columns(self.layers, 0, columns))

    def _drop_dead_columns(self) -> None:
        """Drop the columns of finished episodes (and unused prefixes) once they outnumber the live ones."""
        live = th.isin(self.segment, self.row_segments.flatten())
        dead = self.length - int(live.sum())
        if dead <= max(_MIN_COLUMNS_DROPPED, self.length - dead):
            return
        keep = live.nonzero().flatten()
        self.layers = [(k[:, :, keep], v[:, :, keep]) for k, v in self.layers]
        self.cache = None
        self.segment, self.position = self.segment[keep], self.position[keep]
        kept = set(self.segment.unique().tolist())
        self.prefix_segments = {key: s for key, s in self.prefix_segments.items() if s in kept}
