"""A KV cache carried across rollout steps, so sampling costs one incremental forward per token."""

from __future__ import annotations

import torch as th
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from sb3_textrl.prefix_sharing import (
    cache_layers,
    forward_suffixes,
    make_cache,
    prefix_cache,
    shared_prefix_length,
    split_prefix,
)
from sb3_textrl.token_masks import last_token_index, position_ids

# new rows remembered per weights version (SmolLM2: ~45 KiB per token of a row's own keys and values)
_MAX_ROWS_SEEN = 256


def _left_pad(tensor: th.Tensor, width: int, dim: int) -> th.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, pad)


def right_align(input_ids: th.Tensor, attention_mask: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """Roll each row so that its last attended token is in the last column (keeps the mask's holes)."""
    width = input_ids.shape[1]
    positions = th.arange(width, device=input_ids.device)
    last = last_token_index(attention_mask)
    index = (positions[None, :] - (width - 1 - last[:, None])) % width
    return input_ids.gather(1, index), attention_mask.gather(1, index)


class RolloutKVCache:
    """
    The key/value cache of the observations a policy saw at its previous call, one row per environment.

    At each call, every row is either the same observation as before (its hidden state is reused), the same plus one
    token (one incremental forward over that token), or new (an environment reset: a forward over its whole
    observation). Rows keep their own attention mask over the cache, and position ids follow the observation's
    mask, so the results equal a forward over the full observation. Correct for any sequence of observations: a row
    whose tokens do not extend the cached ones is recomputed.

    New rows run only what follows the opening tokens that all current observations share (a chat template's system
    prompt): that prefix's keys and values are computed once per weights version (:mod:`sb3_textrl.prefix_sharing`),
    and so are those of each distinct new row (an env restarting on a prompt already seen costs no forward).

    :param lm: the causal LM (its ``base_model`` is run)
    """

    def __init__(self, lm: PreTrainedModel):
        self.lm = lm
        self.reset()

    def _weights_fingerprint(self) -> tuple[int, int]:
        # in-place updates (optimizer steps, load_state_dict) bump a tensor's version; `p.data = ...` moves its storage
        params = self._params
        return sum(p._version for p in params), hash(tuple(p.data_ptr() for p in params))

    def reset(self) -> None:
        self._params = list(self.lm.parameters())  # collected once: walking the modules costs ~3 ms per call
        # keys and values of the shared prefix (by its tokens) under the current weights
        self.prefix_layers: dict[tuple[int, ...], list[tuple[th.Tensor, th.Tensor]]] = {}
        # each new row seen under the current weights, by (prefix, own tokens): last hidden state, own keys/values
        self.rows_seen: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[th.Tensor, list]] = {}
        self.fingerprint: tuple[int, int] | None = None
        self.input_ids: th.Tensor | None = None  # (batch, max_length): the observations the cache holds
        self.obs_mask: th.Tensor | None = None
        self.cache_mask: th.Tensor | None = None  # (batch, cache_length)
        self.layers: list[tuple[th.Tensor, th.Tensor]] = []
        self.cache: DynamicCache | None = None  # the same tensors as `layers`, as a cache object the LM can extend
        self.hidden: th.Tensor | None = None  # (batch, hidden_size): last hidden state of each row

    def _run(self, input_ids, attention_mask, position_ids, past=None):
        out = self.lm.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past,
            use_cache=True,
        )
        return out[0][:, -1], out.past_key_values

    @th.no_grad()
    def last_hidden(self, input_ids: th.Tensor, attention_mask: th.Tensor, prefix_sharing: bool = True) -> th.Tensor:
        """
        The LM's last hidden state at the last attended token of each observation.

        :param input_ids: ``(batch, max_length)`` int64
        :param attention_mask: ``(batch, max_length)`` int64
        :param prefix_sharing: new rows run only what follows the opening tokens all observations share
        :return: ``(batch, hidden_size)``
        """
        batch = input_ids.shape[0]
        fingerprint = self._weights_fingerprint()
        if (
            self.input_ids is None
            or self.input_ids.shape != input_ids.shape
            or fingerprint != self.fingerprint
            or self.cache_mask.shape[1] > 2 * input_ids.shape[1]  # rows that never advance: rebuild, stay bounded
        ):
            self.reset()
            self.fingerprint = fingerprint
            return self._store(
                input_ids,
                attention_mask,
                *self._fresh(input_ids, attention_mask, self._prefix_length(input_ids, attention_mask, prefix_sharing)),
            )
        old_ids, old_mask = self.input_ids, self.obs_mask
        new_last, old_last = last_token_index(attention_mask), last_token_index(old_mask)
        tokens_kept = ((input_ids == old_ids) | ~old_mask.bool()).all(dim=1)
        same = tokens_kept & (attention_mask == old_mask).all(dim=1)
        grown = old_mask.clone()
        grown[th.arange(batch), (old_last + 1).clamp(max=input_ids.shape[1] - 1)] = 1
        extended = tokens_kept & (new_last == old_last + 1) & (attention_mask == grown).all(dim=1)
        fresh = ~(same | extended)
        if same.all():
            return self.hidden
        if extended.all():  # the common case: every env took one step; extend the cache in place
            new_positions = (attention_mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)
            self.cache_mask = F.pad(self.cache_mask, (0, 1), value=1)
            past = self.cache if self.cache is not None else make_cache(self.layers)
            new_tokens = input_ids[th.arange(batch), new_last][:, None]
            hidden, self.cache = self._run(new_tokens, self.cache_mask, new_positions, past)
            self.layers = cache_layers(self.cache)
            return self._store(input_ids, attention_mask, hidden, None, None)

        hidden = th.empty_like(self.hidden)
        width = self.cache_mask.shape[1] + 1
        parts: list[tuple[th.Tensor, th.Tensor, list[tuple[th.Tensor, th.Tensor]]]] = []  # (rows, mask, layers)
        if extended.any():
            rows = extended.nonzero().squeeze(1)
            mask = F.pad(self.cache_mask[rows], (0, 1), value=1)
            past = make_cache([(k[rows], v[rows]) for k, v in self.layers])
            new_positions = (attention_mask[rows].sum(dim=1, keepdim=True) - 1).clamp(min=0)
            hidden[rows], cache = self._run(input_ids[rows, new_last[rows]][:, None], mask, new_positions, past)
            parts.append((rows, mask, cache_layers(cache)))
        if same.any():
            rows = same.nonzero().squeeze(1)
            hidden[rows] = self.hidden[rows]
            # a masked dummy column keeps every row's cache the same length
            layers = [(F.pad(k[rows], (0, 0, 0, 1)), F.pad(v[rows], (0, 0, 0, 1))) for k, v in self.layers]
            parts.append((rows, F.pad(self.cache_mask[rows], (0, 1), value=0), layers))
        if fresh.any():
            rows = fresh.nonzero().squeeze(1)
            prefix_length = self._prefix_length(input_ids, attention_mask, prefix_sharing)
            fresh_hidden, mask, layers = self._fresh(input_ids[rows], attention_mask[rows], prefix_length)
            hidden[rows] = fresh_hidden
            width = max(width, mask.shape[1])
            parts.append((rows, mask, layers))

        cache_mask = th.zeros((batch, width), dtype=attention_mask.dtype, device=attention_mask.device)
        merged = [
            (k.new_zeros((batch, *k.shape[1:2], width, k.shape[3])), v.new_zeros((batch, *v.shape[1:2], width, v.shape[3])))
            for k, v in parts[0][2]
        ]
        for rows, mask, layers in parts:
            cache_mask[rows] = _left_pad(mask, width, dim=1)
            for (mk, mv), (k, v) in zip(merged, layers):
                mk[rows] = _left_pad(k, width, dim=2)
                mv[rows] = _left_pad(v, width, dim=2)
        self.cache_mask, self.layers, self.cache = cache_mask, merged, None
        return self._store(input_ids, attention_mask, hidden, None, None)

    @staticmethod
    def _prefix_length(input_ids: th.Tensor, attention_mask: th.Tensor, prefix_sharing: bool) -> int:
        # from the current observations only (not from earlier calls), so that results never depend on history
        return shared_prefix_length(input_ids, attention_mask) if prefix_sharing else 0

    def _fresh(self, input_ids: th.Tensor, attention_mask: th.Tensor, prefix_length: int = 0):
        """New rows; with ``prefix_length``, rows whose first ``prefix_length`` attended tokens are the same."""
        if prefix_length:
            return self._fresh_after_prefix(input_ids, attention_mask, prefix_length)
        ids, mask = right_align(input_ids, attention_mask)
        attended = mask.any(dim=0).nonzero()
        ids, mask = ids[:, int(attended.min()) :], mask[:, int(attended.min()) :]
        hidden, cache = self._run(ids, mask, position_ids(mask))
        return hidden, mask, cache_layers(cache)

    def _fresh_after_prefix(self, input_ids: th.Tensor, attention_mask: th.Tensor, p: int):
        """
        New rows that share their first ``p`` tokens: the prefix's keys and values are computed once, and so is each
        distinct row (an env that restarts on a prompt already seen under these weights costs no forward).
        """
        prefix, suffix_ids, suffix_mask, _ = split_prefix(input_ids, attention_mask, p)
        prefix_key = tuple(prefix.tolist())
        if prefix_key not in self.prefix_layers:  # per weights version: reset() empties it
            self.prefix_layers = {prefix_key: prefix_cache(self.lm, prefix)}  # one prefix at a time
        prefix_layers = self.prefix_layers[prefix_key]
        lengths = suffix_mask.sum(dim=1).tolist()
        keys = [(prefix_key, tuple(row[:n].tolist())) for row, n in zip(suffix_ids, lengths)]
        todo = [i for i, key in enumerate(keys) if key not in self.rows_seen]
        if len(self.rows_seen) + len(todo) > _MAX_ROWS_SEEN:  # bounded (predict() over many prompts): keep this call's
            self.rows_seen = {key: self.rows_seen[key] for key in keys if key in self.rows_seen}
        if todo:
            rows = th.tensor(todo, device=input_ids.device)
            width = max(lengths[i] for i in todo)
            hidden, _, cache = forward_suffixes(
                self.lm, prefix_layers, suffix_ids[rows, :width], suffix_mask[rows, :width], use_cache=True
            )
            layers = cache_layers(cache)
            for j, i in enumerate(todo):
                n = lengths[i]
                # copies: a view would keep the whole batch's cache alive
                suffix_layers = [(k[j, :, p : p + n].clone(), v[j, :, p : p + n].clone()) for k, v in layers]
                self.rows_seen[keys[i]] = (hidden[j, n - 1].clone(), suffix_layers)
        # the layout of forward_suffixes: prefix columns, then each row's own tokens, right padding
        batch, width = suffix_ids.shape
        merged = []
        for index, (prefix_keys, prefix_values) in enumerate(prefix_layers):
            keys_out = prefix_keys.new_zeros(batch, prefix_keys.shape[1], p + width, prefix_keys.shape[3])
            values_out = th.zeros_like(keys_out)
            keys_out[:, :, :p], values_out[:, :, :p] = prefix_keys, prefix_values
            for i, key in enumerate(keys):
                row_keys, row_values = self.rows_seen[key][1][index]
                keys_out[i, :, p : p + lengths[i]], values_out[i, :, p : p + lengths[i]] = row_keys, row_values
            merged.append((keys_out, values_out))
        hidden = th.stack([self.rows_seen[key][0] for key in keys])
        return hidden, th.cat([suffix_mask.new_ones(batch, p), suffix_mask], dim=1), merged

    def _store(self, input_ids, attention_mask, hidden, cache_mask, layers) -> th.Tensor:
        if cache_mask is not None:
            self.cache_mask, self.layers, self.cache = cache_mask, layers, None
        # drop the leading columns that no row attends to any more (finished episodes)
        attended = self.cache_mask.any(dim=0).nonzero()
        start = int(attended.min()) if len(attended) else 0
        if start > 0:
            self.cache_mask = self.cache_mask[:, start:]
            self.layers = [(k[:, :, start:], v[:, :, start:]) for k, v in self.layers]
            self.cache = None
        self.input_ids, self.obs_mask, self.hidden = input_ids.clone(), attention_mask.clone(), hidden
        return hidden
